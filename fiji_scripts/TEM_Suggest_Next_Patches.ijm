// TEM Suggest Next Patches: Plugins > TEM Segmentation (tem_ij_plugin 0.2.0)
// Adds rectangles suggest-1..k to the ROI Manager and draws them over the image.
// Generated from plugin.yml by `tem-ij install-fiji --write-scripts`: edit plugin.yml, not this file.
bridge = "" + call("java.lang.System.getProperty", "tem_ij.bridge");
if (bridge == "" || bridge == "null") exit("TEM Segmentation needs its Python side, which is not running in this Fiji.\n \nQuit Fiji and start it from a terminal with:\n    tem-ij fiji /path/to/Fiji.app\n \n(install it once with: pip install \"tem_ij_plugin[fiji]\")");
interactive = "" + call("ij.Macro.getOptions");
if (interactive == "" || interactive == "null") interactive = "1"; else interactive = "0";
options = "interactive=" + interactive;
Dialog.create("TEM Suggest Next Patches");
Dialog.addNumber("Number of suggestions", 5);
Dialog.addString("ROIs file (empty = ROI Manager)", "", 30);
Dialog.addChoice("Device", newArray("auto", "cpu", "cuda", "mps"), "auto");
Dialog.addCheckbox("All slices for ROIs without a slice position", false);
Dialog.addMessage("Adds rectangles suggest-1..k to the ROI Manager and draws them over the image.");
Dialog.show();
options = options + " number=[" + Dialog.getNumber() + "]";
options = options + " rois=[" + Dialog.getString() + "]";
options = options + " device=[" + Dialog.getChoice() + "]";
if (Dialog.getCheckbox()) options = options + " all";
run("TEM Bridge");
Ext.temRun("TEM Suggest Next Patches", options, error);
if (error != "") exit;
