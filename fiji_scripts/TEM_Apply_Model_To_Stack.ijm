// TEM Apply Model To Stack: Plugins > TEM Segmentation (tem_ij_plugin 0.2.0)
// Predicts a stack file, or every TIFF in a folder, into an output folder without opening windows.
// Generated from plugin.yml by `tem-ij install-fiji --write-scripts`: edit plugin.yml, not this file.
bridge = "" + call("java.lang.System.getProperty", "tem_ij.bridge");
if (bridge == "" || bridge == "null") exit("TEM Segmentation needs its Python side, which is not running in this Fiji.\n \nQuit Fiji and start it from a terminal with:\n    tem-ij fiji /path/to/Fiji.app\n \n(install it once with: pip install \"tem_ij_plugin[fiji]\")");
interactive = "" + call("ij.Macro.getOptions");
if (interactive == "" || interactive == "null") interactive = "1"; else interactive = "0";
options = "interactive=" + interactive;
Dialog.create("TEM Apply Model To Stack");
Dialog.addString("Input (TIFF file or folder)", "", 30);
Dialog.addString("Output folder", "", 30);
Dialog.addChoice("Kind", newArray("probabilities", "labels", "both"), "probabilities");
Dialog.addChoice("Device", newArray("auto", "cpu", "cuda", "mps"), "auto");
Dialog.addCheckbox("Resume an interrupted run (finished files and planes are kept)", false);
Dialog.addMessage("Predicts a stack file, or every TIFF in a folder, into an output folder without opening windows.");
Dialog.show();
options = options + " input=[" + Dialog.getString() + "]";
options = options + " output=[" + Dialog.getString() + "]";
options = options + " kind=[" + Dialog.getChoice() + "]";
options = options + " device=[" + Dialog.getChoice() + "]";
if (Dialog.getCheckbox()) options = options + " resume";
run("TEM Bridge");
Ext.temRun("TEM Apply Model To Stack", options, error);
if (error != "") exit;
