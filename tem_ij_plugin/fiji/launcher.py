"""``tem-ij fiji`` and ``tem-ij install-fiji``: start ImageJ with the bridge attached, install the menus.

The Python process owns the JVM. A Fiji.app is started through pyimagej (its local jars, no
downloads); a plain ``ij.jar`` (Debian's ``libij-java``) through scyjava alone, which is also how the
tests and servers without Fiji run macros.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from .manifest import SUBMENU, load_manifest, menu_root, repo_root

if TYPE_CHECKING:
    from .bridge import Bridge

log = logging.getLogger(__name__)

DEBIAN_IJ_JAR = "/usr/share/java/ij.jar"


def scripts_folder() -> Path:
    """The menu macros of this installation (see :func:`~tem_ij_plugin.fiji.manifest.menu_root`)."""
    folder = menu_root() / "fiji_scripts"
    if not folder.is_dir():
        raise UserError(f"{folder} not found: this installation of tem_ij_plugin is incomplete; reinstall it")
    return folder


def source_scripts_folder() -> Path:
    """``fiji_scripts/`` of the source checkout, which ``install-fiji --write-scripts`` regenerates."""
    root = repo_root()
    if not (root / "plugin.yml").is_file() or not (root / "tem_ij_plugin").is_dir():
        raise UserError(
            "--write-scripts regenerates fiji_scripts/ of a source checkout (developers); "
            "this installation has none (an installed package keeps its generated copy)"
        )
    return root / "fiji_scripts"


def install_scripts(plugins_dir: Path) -> Path:
    """Copy the menu macros into ``plugins_dir/TEM Segmentation/``; earlier versions' extra macros go.

    Returns
    -------
    Path
        The folder written.
    """
    manifest = load_manifest()
    source = scripts_folder()
    names = {c.filename for c in manifest["commands"]}
    missing = sorted(n for n in names if not (source / n).is_file())
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}; run tem-ij install-fiji --write-scripts")
    target = plugins_dir / SUBMENU
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.ijm"):
        if old.name not in names and _generated(old):  # a macro of your own in this folder stays
            old.unlink()
    for name in sorted(names):
        shutil.copyfile(source / name, target / name)
    return target


def _generated(path: Path) -> bool:
    """Whether a menu macro is one we generated (an earlier version's), by the header we write."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(1000)
    except (OSError, UnicodeDecodeError):
        return False
    return "(tem_ij_plugin " in head and "Generated from plugin.yml" in head


def install_fiji(fiji_dir: str | os.PathLike) -> Path:
    """``tem-ij install-fiji PATH/Fiji.app``: the menu files into ``Fiji.app/plugins/TEM Segmentation/``."""
    fiji = Path(fiji_dir).expanduser()
    if not (fiji / "plugins").is_dir():
        raise UserError(f"{fiji} is not a Fiji or ImageJ folder (it has no plugins/ folder)")
    return install_scripts(fiji / "plugins")


def _needs_display() -> None:
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        raise UserError(
            "no display: ImageJ's menus and ROI Manager need one. On a server run it under a virtual display: "
            "xvfb-run -a tem-ij fiji ..."
        )


_MEM = re.compile(r"([0-9]{1,7})([kKmMgG])")
_MEM_MB = {"k": 1 / 1024, "m": 1, "g": 1024}
_XMX = re.compile(r"-Xmx([0-9]{1,7}[kKmMgG]?)")


def heap_option(mem: str | None = None, fiji_dir: Path | None = None) -> str:
    """The JVM's ``-Xmx``: ``mem`` (``8g``, ``6000m``), else the Fiji.app's own setting, else 75 % of the RAM.

    Fiji keeps its memory setting (Edit > Options > Memory & Threads, or by hand) as ``-Xmx...`` in
    ``jvm.cfg`` or ``ImageJ.cfg`` beside its launcher; 75 % of the physical memory is Fiji's default.
    A JVM left to itself takes a quarter, too little for a TEM stack and its probabilities.

    Raises
    ------
    UserError
        A ``mem`` that is not a size.
    """
    if mem is not None:
        size = _MEM.fullmatch(mem)
        if not size or int(size.group(1)) * _MEM_MB[size.group(2).lower()] < 256:
            raise UserError(f"--mem {mem}: give a size of at least 256m, such as 8g or 6000m")
        return f"-Xmx{mem}"
    for name in ("jvm.cfg", "ImageJ.cfg"):
        cfg = fiji_dir / name if fiji_dir is not None else None
        if cfg is not None and cfg.is_file():
            found = _XMX.search(cfg.read_text(errors="replace")[:65536])
            if found:
                log.info("Java memory from %s: %s", cfg, found.group(1))
                return found.group(0)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 4 << 30
    return f"-Xmx{max(512, int(total * 0.75) >> 20)}m"


def start_plain_imagej(jar: str | os.PathLike, plugins_dir: str | os.PathLike, mem: str | None = None) -> None:
    """Start a JVM with a plain ImageJ jar whose plugins folder is ``plugins_dir/plugins``.

    Offline: scyjava is told never to fetch a JVM or artifacts. ``mem`` is the JVM's memory (see
    :func:`heap_option`).
    """
    import scyjava

    jar = Path(jar)
    if not jar.is_file():
        raise UserError(f"{jar} not found; on Debian/Ubuntu: apt-get install libij-java")
    _needs_display()
    if not scyjava.jvm_started():
        scyjava.config.set_java_constraints(fetch="never")
        scyjava.config.add_classpath(str(jar))
        scyjava.config.add_option(f"-Dplugins.dir={plugins_dir}")
        scyjava.config.add_option(heap_option(mem))
        scyjava.start_jvm()


def _load_settings(path):
    if not path:
        return None
    from ..config import load_settings

    return load_settings(path)


def run_macro(path: str | os.PathLike, bridge: Bridge) -> tuple:
    """Run a macro file and wait for it.

    Returns
    -------
    (int, str)
        The exit status (0, or 1 when the macro aborted or a TEM command failed) and ImageJ's log.
    """
    from scyjava import jimport

    IJ = jimport("ij.IJ")
    macro = Path(path).expanduser()
    if not macro.is_file():
        raise UserError(f"{macro}: no such macro file")
    # Not in this (main) thread: ImageJ marks a thread that runs a macro and may stop all such
    # threads when a macro aborts (Interpreter.abortAllMacroThreads)
    results = []
    worker = threading.Thread(target=lambda: results.append(IJ.runMacroFile(str(macro.resolve()))), daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    result = results[0] if results else "[aborted]"
    text = IJ.getLog()
    failed = (result is not None and str(result) == "[aborted]") or bool(bridge.errors)
    return (1 if failed else 0), ("" if text is None else str(text).rstrip())


def _wait_for_quit() -> None:
    from scyjava import jimport

    IJ = jimport("ij.IJ")
    deadline = time.monotonic() + 120  # Fiji's window appears a little after showUI() returns
    while IJ.getInstance() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    # Sleeping here leaves Python free for the menu commands, which call in from ImageJ's threads
    while IJ.getInstance() is not None:
        time.sleep(0.5)


def run_fiji(
    fiji_dir: str | os.PathLike | None = None,
    imagej_jar: str | os.PathLike | None = None,
    macro: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    mem: str | None = None,
) -> tuple:
    """``tem-ij fiji``: start ImageJ with the bridge and wait until it quits, or run a macro in it.

    ``mem`` is the JVM's memory (``8g``; default from the Fiji.app, see :func:`heap_option`).

    Returns
    -------
    (int, str)
        The exit status and, after a macro, ImageJ's log ("" otherwise).
    """
    from .bridge import Bridge, dispose_windows

    settings = _load_settings(config)
    if fiji_dir is None and imagej_jar is None:
        if Path(DEBIAN_IJ_JAR).is_file():
            imagej_jar = DEBIAN_IJ_JAR
        else:
            raise UserError("give the Fiji.app folder (tem-ij fiji PATH/Fiji.app) or --imagej-jar PATH/ij.jar")
    if fiji_dir is not None:
        return _run_fiji_app(Path(fiji_dir).expanduser(), macro, settings, mem)
    with tempfile.TemporaryDirectory(prefix="tem-ij-imagej-") as tmp:
        install_scripts(Path(tmp) / "plugins")
        start_plain_imagej(imagej_jar, tmp, mem)
        from scyjava import jimport

        bridge = Bridge(settings, log_errors=macro is not None).attach()
        try:
            if macro is not None:
                return run_macro(macro, bridge)
            jimport("ij.ImageJ")()
            _wait_for_quit()
            return 0, ""
        finally:
            dispose_windows()


def _run_fiji_app(fiji: Path, macro, settings, mem: str | None = None) -> int:
    """A user's Fiji.app through pyimagej.

    Not run by the tests: pyimagej resolves ImageJ2 through Maven, and this machine is offline.
    """
    try:
        import imagej
        import scyjava
    except ImportError as exc:
        raise UserError('starting Fiji needs pyimagej: pip install "tem_ij_plugin[fiji]"') from exc
    from .bridge import Bridge, dispose_windows

    target = install_fiji(fiji)
    log.info("menu commands installed in %s", target)
    bridge = Bridge(settings, log_errors=macro is not None)
    # On macOS the GUI must own the main thread, so init() may not return before Fiji quits:
    # the bridge attaches as soon as the JVM is up instead.
    scyjava.when_jvm_starts(bridge.attach)
    scyjava.config.add_option(heap_option(mem, fiji))
    mode = "gui" if sys.platform == "darwin" and macro is None else "interactive"
    ij = imagej.init(str(fiji), mode=mode)
    try:
        if macro is not None:
            return run_macro(macro, bridge)
        if mode == "interactive":
            ij.ui().showUI()
            _wait_for_quit()
        return 0, ""
    finally:
        dispose_windows()
