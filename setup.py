"""Build hook: the wheel carries the Fiji menu files as package data.

``plugin.yml`` and ``fiji_scripts/*.ijm`` stay at the top of the repository (their source of truth);
the build copies them into ``tem_ij_plugin/fiji/menu/``, where an installed package finds them
(:func:`tem_ij_plugin.fiji.manifest.menu_root`). Everything else is in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithMenus(build_py):
    """``build_py`` that also copies the menu manifest and macros into the built package."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the source tree itself
            return
        menu = Path(self.build_lib) / "tem_ij_plugin" / "fiji" / "menu"
        scripts = menu / "fiji_scripts"
        scripts.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HERE / "plugin.yml", menu / "plugin.yml")
        macros = sorted((HERE / "fiji_scripts").glob("*.ijm"))
        if not macros:
            raise RuntimeError("fiji_scripts/ holds no .ijm files: run tem-ij install-fiji --write-scripts")
        for macro in macros:
            shutil.copyfile(macro, scripts / macro.name)


setup(cmdclass={"build_py": BuildWithMenus})
