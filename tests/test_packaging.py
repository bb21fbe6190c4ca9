"""A normal install: a wheel built from the repository, installed into a fresh virtual environment and
run from outside the source tree, gives the whole product, the Fiji menu files included.

The virtual environment sees this interpreter's packages (``--system-site-packages``) so that torch is
not installed twice; the wheel itself is installed into the venv, and a test checks that it is the
copy that runs, not the editable source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tem_ij_plugin import __version__
from tem_ij_plugin.fiji.manifest import load_manifest, repo_root

pytestmark = pytest.mark.slow
ROOT = repo_root()
IJ_JAR = Path("/usr/share/java/ij.jar")
# What a source distribution carries (MANIFEST.in): the wheel is built from a copy of just these, so
# that neither a stale build/ folder nor an untracked file of this checkout can slip into it.
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "plugin.yml", "fiji_scripts", "tem_ij_plugin")


def _run(args, cwd, check=True, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict:
    """A venv holding the wheel built from a copy of the sources; ``cwd`` lies outside every source tree."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "menu"))
        else:
            shutil.copyfile(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    wheel = next((tmp / "dist").glob("tem_ij_plugin-*.whl"))
    env_dir = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], cwd=tmp)
    python = env_dir / "bin" / "python"
    # --ignore-installed: the editable install of this checkout is visible and must not satisfy it
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)], cwd=tmp)
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return {"python": python, "tem_ij": env_dir / "bin" / "tem-ij", "prefix": env_dir, "cwd": cwd}


def test_the_installed_copy_runs_not_the_source_tree(venv):
    out = _run([str(venv["python"]), "-c", "import tem_ij_plugin; print(tem_ij_plugin.__file__)"], venv["cwd"])
    assert Path(out.stdout.strip()).is_relative_to(venv["prefix"])


def test_tem_ij_version_is_the_package_version(venv):
    out = _run([str(venv["tem_ij"]), "--version"], venv["cwd"])
    assert out.stdout.strip() == f"tem-ij {__version__}"


def test_installed_metadata_has_the_package_version(venv):
    code = "import importlib.metadata as m; print(m.version('tem_ij_plugin'))"
    assert _run([str(venv["python"]), "-c", code], venv["cwd"]).stdout.strip() == __version__


def test_installed_module_has_the_package_version(venv):
    code = "import tem_ij_plugin; print(tem_ij_plugin.__version__)"
    assert _run([str(venv["python"]), "-c", code], venv["cwd"]).stdout.strip() == __version__


def test_install_fiji_from_the_wheel_installs_every_menu_macro(venv, tmp_path):
    (tmp_path / "Fiji.app" / "plugins").mkdir(parents=True)
    _run([str(venv["tem_ij"]), "install-fiji", str(tmp_path / "Fiji.app")], venv["cwd"])
    installed = sorted(p.name for p in (tmp_path / "Fiji.app" / "plugins" / "TEM Segmentation").glob("*.ijm"))
    assert installed == sorted(c.filename for c in load_manifest()["commands"])


def test_installed_menu_macros_are_the_source_trees(venv, tmp_path):
    (tmp_path / "Fiji.app" / "plugins").mkdir(parents=True)
    _run([str(venv["tem_ij"]), "install-fiji", str(tmp_path / "Fiji.app")], venv["cwd"])
    folder = tmp_path / "Fiji.app" / "plugins" / "TEM Segmentation"
    differ = [p.name for p in folder.glob("*.ijm") if p.read_bytes() != (ROOT / "fiji_scripts" / p.name).read_bytes()]
    assert differ == []


def test_write_scripts_refuses_without_a_source_checkout(venv):
    out = _run([str(venv["tem_ij"]), "install-fiji", "--write-scripts"], venv["cwd"], check=False)
    assert out.returncode == 2
    assert "source checkout" in out.stderr


@pytest.mark.fiji
def test_tem_ij_fiji_from_the_wheel_runs_a_tem_command(venv, tmp_path):
    if not IJ_JAR.is_file() or not os.environ.get("DISPLAY"):
        if os.environ.get("TEM_IJ_REQUIRE_FIJI") == "1":
            pytest.fail(f"real ImageJ is required in CI: {IJ_JAR} or a display is missing")
        pytest.skip(f"{IJ_JAR} or a display is missing")
    macro = tmp_path / "check.ijm"
    macro.write_text('run("TEM Check Environment", "quiet");\nprint("macro finished");\n')
    out = _run([str(venv["tem_ij"]), "fiji", "--imagej-jar", str(IJ_JAR), "--macro", str(macro)], venv["cwd"])
    assert f"tem_ij_plugin {__version__}" in out.stdout
