"""The Fiji command manifest (``plugin.yml``) and the ImageJ macro menu files generated from it.

No Java here: ``tem-ij install-fiji`` and the manifest test use this module without a JVM.

Every menu command is a small ImageJ1 macro (``fiji_scripts/TEM_Train_Model....ijm`` ...). Its
``Dialog.*`` calls make it recordable and usable from macros with no dialog; it then hands the
chosen options to Python with ``run("TEM Bridge")`` (which the bridge intercepts to register its
macro extension) and ``Ext.temRun(command, options, error)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

BRIDGE_COMMAND = "TEM Bridge"
BRIDGE_PROPERTY = "tem_ij.bridge"
SUBMENU = "TEM Segmentation"
# The macro expression of the message a command shows in a Fiji not started by `tem-ij fiji`: it names
# this very Fiji.app (getDirectory("imagej")), so the line can be pasted as it is.
NOT_ATTACHED = (
    '"TEM Segmentation needs its Python side, which is not running in this Fiji.\\n \\n'
    'Quit Fiji and start it from a terminal with:\\n    tem-ij fiji \\"" + getDirectory("imagej") + "\\"\\n \\n'
    "If tem-ij is not found, activate the Python environment you installed tem_ij_plugin in; it needs its "
    'Fiji extra there: pip install \\"tem_ij_plugin[fiji]\\" (from a source checkout: pip install -e '
    '\\".[fiji]\\"). tem-ij doctor checks that environment."'
)
_TYPES = ("number", "choice", "string", "file", "folder", "checkbox")


@dataclass
class Arg:
    """One dialog field / macro argument."""

    key: str
    label: str
    type: str
    default: object = None
    choices: list = field(default_factory=list)


@dataclass
class Command:
    """One menu command: its name, the Python function that serves it and its arguments."""

    name: str
    function: str
    help: str = ""
    needs_image: bool = False
    args: list = field(default_factory=list)

    @property
    def menu_name(self) -> str:
        """The name in the menu, which macros record: ImageJ's "..." marks a command that opens a dialog."""
        return self.name + "..." if self.args else self.name

    @property
    def filename(self) -> str:
        """The command's ``.ijm`` file name: its menu name with underscores for spaces."""
        # ImageJ installs plugins/**/*.ijm whose name holds an underscore, underscores shown as spaces
        return self.menu_name.replace(" ", "_") + ".ijm"


def repo_root() -> Path:
    """The source tree holding ``plugin.yml`` and ``fiji_scripts/``: the source of truth of the menus."""
    return Path(__file__).resolve().parents[2]


def menu_root() -> Path:
    """The folder holding ``plugin.yml`` and ``fiji_scripts/`` in this installation.

    A wheel carries a copy in the package (``tem_ij_plugin/fiji/menu/``, written by ``setup.py`` at
    build time); an editable install or a source checkout has no such copy and reads the source tree.
    """
    packaged = Path(__file__).resolve().parent / "menu"
    return packaged if (packaged / "plugin.yml").is_file() else repo_root()


def macro_key(label: str) -> str:
    """The macro key ImageJ derives from a dialog label: its first word, lower-cased."""
    return label.split(" ")[0].split(":")[0].lower()


def load_manifest(path: str | Path | None = None) -> dict:
    """Read ``plugin.yml``; ``commands`` becomes a list of :class:`Command`.

    Raises
    ------
    UserError
        A missing file, or a command or argument that breaks the rules (unknown type, a key that is
        not the label's first word, a duplicate key or command).
    """
    import yaml

    path = Path(path) if path else menu_root() / "plugin.yml"
    if not path.is_file():
        raise UserError(f"{path} not found: this installation of tem_ij_plugin is incomplete; reinstall it")
    data = yaml.safe_load(path.read_text())
    commands = []
    for c in data.get("commands") or []:
        args = [Arg(**a) for a in c.pop("args", [])]
        cmd = Command(**c, args=args)
        keys = [a.key for a in args]
        if len(set(keys)) != len(keys):
            raise UserError(f"plugin.yml: {cmd.name} has duplicate argument keys {keys}")
        for a in args:
            if a.type not in _TYPES:
                raise UserError(f"plugin.yml: {cmd.name}/{a.key}: unknown type {a.type}")
            if macro_key(a.label) != a.key:
                raise UserError(f"plugin.yml: {cmd.name}/{a.key}: the label '{a.label}' gives key {macro_key(a.label)}")
            if a.type == "choice" and a.default not in a.choices:
                raise UserError(f"plugin.yml: {cmd.name}/{a.key}: default {a.default} is not a choice")
        commands.append(cmd)
    names = [c.name for c in commands]
    if len(set(names)) != len(names):
        raise UserError("plugin.yml: duplicate command names")
    data["commands"] = commands
    return data


def _quote(s) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def help_html(cmd: Command) -> str:
    """What the dialog's Help button shows: the command, each field with its macro key, and a macro call."""
    from html import escape

    rows = "".join(f"<li><b>{escape(a.label)}</b>: macro key <code>{a.key}</code></li>" for a in cmd.args)
    call = " ".join(f"{a.key}=[...]" if a.type != "checkbox" else a.key for a in cmd.args)
    return (
        f"<html><h3>{escape(cmd.name)}</h3><p>{escape(cmd.help or '')}</p><ul>{rows}</ul>"
        f"<p>In a macro: <code>run(&quot;{escape(cmd.menu_name)}&quot;, &quot;{escape(call)}&quot;);</code></p>"
        "<p>More: the tem_ij_plugin README, section <i>In Fiji: Plugins &gt; TEM Segmentation</i>.</p>"
    )


def macro_source(cmd: Command, version: str) -> str:
    """The ImageJ macro of one menu command."""
    lines = [
        f"// {cmd.menu_name}: Plugins > {SUBMENU} (tem_ij_plugin {version})",
        f"// {cmd.help}",
        "// Generated from plugin.yml by `tem-ij install-fiji --write-scripts`: edit plugin.yml, not this file.",
        f'bridge = "" + call("java.lang.System.getProperty", "{BRIDGE_PROPERTY}");',
        f'if (bridge == "" || bridge == "null") exit({NOT_ATTACHED});',
        # Macro options present = a macro or a recorded command, so no file choosers may open
        'interactive = "" + call("ij.Macro.getOptions");',
        'if (interactive == "" || interactive == "null") interactive = "1"; else interactive = "0";',
        'options = "interactive=" + interactive;',
    ]
    if cmd.args:
        lines.append(f"Dialog.create({_quote(cmd.name)});")
        for a in cmd.args:
            if a.type == "number":
                lines.append(f"Dialog.addNumber({_quote(a.label)}, {a.default});")
            elif a.type == "choice":
                choices = ", ".join(_quote(c) for c in a.choices)
                lines.append(f"Dialog.addChoice({_quote(a.label)}, newArray({choices}), {_quote(a.default)});")
            elif a.type == "string":
                lines.append(f"Dialog.addString({_quote(a.label)}, {_quote(a.default)}, 30);")
            elif a.type in ("file", "folder"):  # a text field with a Browse button
                add = "Dialog.addFile" if a.type == "file" else "Dialog.addDirectory"
                lines.append(f"{add}({_quote(a.label)}, {_quote(a.default)});")
            else:
                lines.append(f"Dialog.addCheckbox({_quote(a.label)}, {'true' if a.default else 'false'});")
        if cmd.help:
            lines.append(f"Dialog.addMessage({_quote(cmd.help)});")
        lines.append(f"Dialog.addHelp({_quote(help_html(cmd))});")
        lines.append("Dialog.show();")
        text = "Dialog.getString()"
        getters = {"number": "Dialog.getNumber()", "choice": "Dialog.getChoice()", "string": text, "file": text}
        getters["folder"] = text
        for a in cmd.args:
            if a.type == "checkbox":
                lines.append(f'if (Dialog.getCheckbox()) options = options + " {a.key}";')
            else:
                lines.append(f'options = options + " {a.key}=[" + {getters[a.type]} + "]";')
    lines += [
        f'run("{BRIDGE_COMMAND}");',
        f"Ext.temRun({_quote(cmd.name)}, options, error);",
        # The bridge has reported the error and flagged the calling macro to abort
        'if (error != "") exit;',
    ]
    return "\n".join(lines) + "\n"


def write_scripts(folder: str | Path, manifest: dict | None = None) -> list:
    """Write every command's macro into ``folder``; returns the paths."""
    from .. import __version__

    manifest = manifest or load_manifest()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for cmd in manifest["commands"]:
        p = folder / cmd.filename
        p.write_text(macro_source(cmd, __version__))
        paths.append(p)
    return paths


_OPTION = re.compile(r"(\w+)(?:=(\[[^\]]*\]|\S*))?")


def parse_options(options: str) -> dict:
    """Parse ImageJ macro options (``key=value key=[a value] flag``) into a dict; flags map to True."""
    out = {}
    for m in _OPTION.finditer(options or ""):
        key, value = m.group(1), m.group(2)
        if value is None:
            out[key] = True
        else:
            out[key] = value[1:-1] if value.startswith("[") else value
    return out
