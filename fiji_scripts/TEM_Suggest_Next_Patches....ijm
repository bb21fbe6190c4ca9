// TEM Suggest Next Patches...: Plugins > TEM Segmentation (tem_ij_plugin 0.2.0)
// Adds rectangles suggest-1..k to the ROI Manager and draws them over the image.
// Generated from plugin.yml by `tem-ij install-fiji --write-scripts`: edit plugin.yml, not this file.
bridge = "" + call("java.lang.System.getProperty", "tem_ij.bridge");
if (bridge == "" || bridge == "null") exit("TEM Segmentation needs its Python side, which is not running in this Fiji.\n \nQuit Fiji and start it from a terminal with:\n    tem-ij fiji \"" + getDirectory("imagej") + "\"\n \nIf tem-ij is not found, activate the Python environment you installed tem_ij_plugin in; it needs its Fiji extra there: pip install \"tem_ij_plugin[fiji]\" (from a source checkout: pip install -e \".[fiji]\"). tem-ij doctor checks that environment.");
interactive = "" + call("ij.Macro.getOptions");
if (interactive == "" || interactive == "null") interactive = "1"; else interactive = "0";
options = "interactive=" + interactive;
Dialog.create("TEM Suggest Next Patches");
Dialog.addNumber("Number of suggestions", 5);
Dialog.addFile("ROIs file (empty = ROI Manager)", "");
Dialog.addChoice("Device", newArray("auto", "cpu", "cuda", "mps"), "auto");
Dialog.addCheckbox("All slices for ROIs without a slice position", false);
Dialog.addMessage("Adds rectangles suggest-1..k to the ROI Manager and draws them over the image.");
Dialog.addHelp("<html><h3>TEM Suggest Next Patches</h3><p>Adds rectangles suggest-1..k to the ROI Manager and draws them over the image.</p><ul><li><b>Number of suggestions</b>: macro key <code>number</code></li><li><b>ROIs file (empty = ROI Manager)</b>: macro key <code>rois</code></li><li><b>Device</b>: macro key <code>device</code></li><li><b>All slices for ROIs without a slice position</b>: macro key <code>all</code></li></ul><p>In a macro: <code>run(&quot;TEM Suggest Next Patches...&quot;, &quot;number=[...] rois=[...] device=[...] all&quot;);</code></p><p>More: the tem_ij_plugin README, section <i>In Fiji: Plugins &gt; TEM Segmentation</i>.</p>");
Dialog.show();
options = options + " number=[" + Dialog.getNumber() + "]";
options = options + " rois=[" + Dialog.getString() + "]";
options = options + " device=[" + Dialog.getChoice() + "]";
if (Dialog.getCheckbox()) options = options + " all";
run("TEM Bridge");
Ext.temRun("TEM Suggest Next Patches", options, error);
if (error != "") exit;
