"""The manifest (plugin.yml) against the menu files and the Python targets; no JVM needed."""

from __future__ import annotations

import importlib
import re

import pytest

from tem_ij_plugin import __version__
from tem_ij_plugin.errors import UserError
from tem_ij_plugin.fiji.manifest import load_manifest, macro_key, macro_source, parse_options, repo_root

SCRIPTS = repo_root() / "fiji_scripts"
_DIALOG = re.compile(r"Dialog\.add(Number|Choice|String|File|Directory|Checkbox)\(\"((?:[^\"\\]|\\.)*)\"")
_TYPES = {"Number": "number", "Choice": "choice", "String": "string", "File": "file", "Directory": "folder"}
_TYPES["Checkbox"] = "checkbox"


def _target(spec: str):
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_command_has_its_menu_file_with_matching_dialog_fields():
    manifest = load_manifest()
    commands = manifest["commands"]
    assert len(commands) == 10
    for cmd in commands:
        text = (SCRIPTS / cmd.filename).read_text()
        fields = [(_TYPES[t], macro_key(label)) for t, label in _DIALOG.findall(text)]
        assert fields == [(a.type, a.key) for a in cmd.args], cmd.name
        assert f'Ext.temRun("{cmd.name}", options, error);' in text
        for a in cmd.args:  # each field is handed to Python under its key
            assert f" {a.key}" in text
        # the committed file is what plugin.yml generates (edit plugin.yml, then --write-scripts)
        assert text == macro_source(cmd, __version__), f"regenerate {cmd.filename}"
        assert callable(_target(cmd.function)), cmd.function


def test_nothing_outside_the_manifest():
    manifest = load_manifest()
    files = {p.name for p in SCRIPTS.iterdir() if p.suffix == ".ijm"}
    assert files == {c.filename for c in manifest["commands"]}
    from tem_ij_plugin.fiji import commands as module

    served = {c.function.split(":")[1] for c in manifest["commands"]}
    public = {n for n, f in vars(module).items() if callable(f) and getattr(f, "__module__", "") == module.__name__}
    # every public command function of the module is in the manifest (helpers are private or classes)
    assert {n for n in public if not n.startswith("_") and n[0].islower()} - served <= {
        "roi_manager",
    }
    for entry in manifest["cli"]:
        assert callable(_target(entry["function"])), entry


def test_dialog_keys_are_unique_first_words():
    for cmd in load_manifest()["commands"]:
        keys = [macro_key(a.label) for a in cmd.args]
        assert len(set(keys)) == len(keys)


def test_parse_options_reads_imagej_macro_options():
    opts = parse_options("interactive=0 max=[2.5] device=cpu rois=[/data/my rois/RoiSet.zip] new show=[]")
    assert opts == {
        "interactive": "0",
        "max": "2.5",
        "device": "cpu",
        "rois": "/data/my rois/RoiSet.zip",
        "new": True,
        "show": "",
    }
    assert parse_options("") == {}


def test_a_broken_manifest_is_refused(tmp_path):
    bad = tmp_path / "plugin.yml"
    bad.write_text(
        "name: x\nversion: '1'\ncommands:\n  - name: TEM X\n    function: a:b\n"
        "    args:\n      - {key: max, label: Minutes max, type: number, default: 1}\n"
    )
    with pytest.raises(UserError, match="gives key minutes"):
        load_manifest(bad)


def test_install_replaces_our_old_menu_macros_but_keeps_a_users_own(tmp_path):
    from tem_ij_plugin.fiji.launcher import install_scripts

    folder = tmp_path / "plugins" / "TEM Segmentation"
    folder.mkdir(parents=True)
    old = folder / "TEM_Retired_Command.ijm"  # as an earlier version generated it
    old.write_text("// TEM Retired Command (tem_ij_plugin 0.1.0)\n// Generated from plugin.yml by ...\n")
    mine = folder / "My_Batch.ijm"
    mine.write_text('run("TEM Predict Probabilities");\n')
    install_scripts(tmp_path / "plugins")
    assert not old.exists()
    assert mine.read_text() == 'run("TEM Predict Probabilities");\n'


def test_commands_that_open_a_dialog_end_in_dots_in_the_menu():
    commands = {c.name: c for c in load_manifest()["commands"]}
    assert commands["TEM Train Model"].menu_name == "TEM Train Model..."
    assert commands["TEM Train Model"].filename == "TEM_Train_Model....ijm"
    assert commands["TEM Stop Training"].menu_name == "TEM Stop Training"
    assert all(c.menu_name.endswith("...") == bool(c.args) for c in commands.values())


def test_install_over_0_2_replaces_the_menu_files_named_without_dots(tmp_path):
    from tem_ij_plugin.fiji.launcher import install_scripts

    folder = tmp_path / "plugins" / "TEM Segmentation"
    folder.mkdir(parents=True)
    old = folder / "TEM_Train_Model.ijm"  # 0.2's file: ImageJ would show the command twice
    header = "// TEM Train Model: Plugins > TEM Segmentation (tem_ij_plugin 0.2.0)\n"
    old.write_text(header + "// Generated from plugin.yml by `tem-ij install-fiji --write-scripts`\n")
    install_scripts(tmp_path / "plugins")
    assert not old.exists()
    assert (folder / "TEM_Train_Model....ijm").is_file()


def test_file_and_folder_fields_have_a_browse_button():
    cmd = next(c for c in load_manifest()["commands"] if c.name == "TEM Apply Model To Stack")
    text = macro_source(cmd, __version__)
    assert 'Dialog.addFile("Input (TIFF file or folder)", "");' in text
    assert 'Dialog.addDirectory("Output folder", "");' in text


def test_every_dialog_has_a_help_button_naming_its_macro_keys():
    for cmd in load_manifest()["commands"]:
        if cmd.args:
            help_line = next(line for line in macro_source(cmd, __version__).splitlines() if "Dialog.addHelp" in line)
            assert all(f"<code>{a.key}</code>" in help_line for a in cmd.args), cmd.name


# -- the JVM's memory (tem-ij fiji --mem) ------------------------------------------------------------


def test_mem_sets_the_java_heap():
    from tem_ij_plugin.fiji.launcher import heap_option

    assert heap_option("8g") == "-Xmx8g"


def test_a_fiji_app_keeps_its_own_memory_setting(tmp_path):
    from tem_ij_plugin.fiji.launcher import heap_option

    (tmp_path / "jvm.cfg").write_text("-Xss4m\n-Xmx12000m\n")
    assert heap_option(None, tmp_path) == "-Xmx12000m"


def test_without_a_setting_java_gets_three_quarters_of_the_memory(tmp_path):
    import os

    from tem_ij_plugin.fiji.launcher import heap_option

    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    assert abs(int(heap_option(None, tmp_path)[4:-1]) - 0.75 * total_mb) <= 1


@pytest.mark.parametrize("mem", ["lots", "8", "100m"])  # a bare 8 is 8 bytes to Java
def test_a_mem_that_is_not_a_size_is_refused(mem):
    from tem_ij_plugin.fiji.launcher import heap_option

    with pytest.raises(UserError, match="such as 8g"):
        heap_option(mem)
