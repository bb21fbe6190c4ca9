// TEM Show Patch Grid...: Plugins > TEM Segmentation (tem_ij_plugin 0.2.0)
// Overlay of the 256x256 patch grid as the next training will split it - training patches red, validation blue, unused green.
// Generated from plugin.yml by `tem-ij install-fiji --write-scripts`: edit plugin.yml, not this file.
bridge = "" + call("java.lang.System.getProperty", "tem_ij.bridge");
if (bridge == "" || bridge == "null") exit("TEM Segmentation needs its Python side, which is not running in this Fiji.\n \nQuit Fiji and start it from a terminal with:\n    tem-ij fiji \"" + getDirectory("imagej") + "\"\n \nIf tem-ij is not found, activate the Python environment you installed tem_ij_plugin in; it needs its Fiji extra there: pip install \"tem_ij_plugin[fiji]\" (from a source checkout: pip install -e \".[fiji]\"). tem-ij doctor checks that environment.");
interactive = "" + call("ij.Macro.getOptions");
if (interactive == "" || interactive == "null") interactive = "1"; else interactive = "0";
options = "interactive=" + interactive;
Dialog.create("TEM Show Patch Grid");
Dialog.addFile("ROIs file (empty = ROI Manager)", "");
Dialog.addCheckbox("All slices for ROIs without a slice position", false);
Dialog.addDirectory("Project folder (optional; its current round is the next training's start)", "");
Dialog.addMessage("Overlay of the 256x256 patch grid as the next training will split it - training patches red, validation blue, unused green.");
Dialog.addHelp("<html><h3>TEM Show Patch Grid</h3><p>Overlay of the 256x256 patch grid as the next training will split it - training patches red, validation blue, unused green.</p><ul><li><b>ROIs file (empty = ROI Manager)</b>: macro key <code>rois</code></li><li><b>All slices for ROIs without a slice position</b>: macro key <code>all</code></li><li><b>Project folder (optional; its current round is the next training&#x27;s start)</b>: macro key <code>project</code></li></ul><p>In a macro: <code>run(&quot;TEM Show Patch Grid...&quot;, &quot;rois=[...] all project=[...]&quot;);</code></p><p>More: the tem_ij_plugin README, section <i>In Fiji: Plugins &gt; TEM Segmentation</i>.</p>");
Dialog.show();
options = options + " rois=[" + Dialog.getString() + "]";
if (Dialog.getCheckbox()) options = options + " all";
options = options + " project=[" + Dialog.getString() + "]";
run("TEM Bridge");
Ext.temRun("TEM Show Patch Grid", options, error);
if (error != "") exit;
