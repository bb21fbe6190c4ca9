// TEM Find Objects...: Plugins > TEM Segmentation (tem_ij_plugin 0.2.0)
// Objects of one class: a label image, their outlines CLASS-ID in the ROI Manager and their measurements in the Results table.
// Generated from plugin.yml by `tem-ij install-fiji --write-scripts`: edit plugin.yml, not this file.
bridge = "" + call("java.lang.System.getProperty", "tem_ij.bridge");
if (bridge == "" || bridge == "null") exit("TEM Segmentation needs its Python side, which is not running in this Fiji.\n \nQuit Fiji and start it from a terminal with:\n    tem-ij fiji \"" + getDirectory("imagej") + "\"\n \nIf tem-ij is not found, activate the Python environment you installed tem_ij_plugin in; it needs its Fiji extra there: pip install \"tem_ij_plugin[fiji]\" (from a source checkout: pip install -e \".[fiji]\"). tem-ij doctor checks that environment.");
interactive = "" + call("ij.Macro.getOptions");
if (interactive == "" || interactive == "null") interactive = "1"; else interactive = "0";
options = "interactive=" + interactive;
Dialog.create("TEM Find Objects");
Dialog.addString("Class (empty = the one that is not background)", "", 30);
Dialog.addChoice("Split touching objects by", newArray("probability", "distance", "none"), "probability");
Dialog.addNumber("Minimum area in pixels (0 = from your annotations)", 0);
Dialog.addChoice("Device", newArray("auto", "cpu", "cuda", "mps"), "auto");
Dialog.addCheckbox("Proposals: name outlines proposal-N (training ignores them until renamed)", false);
Dialog.addMessage("Objects of one class: a label image, their outlines CLASS-ID in the ROI Manager and their measurements in the Results table.");
Dialog.addHelp("<html><h3>TEM Find Objects</h3><p>Objects of one class: a label image, their outlines CLASS-ID in the ROI Manager and their measurements in the Results table.</p><ul><li><b>Class (empty = the one that is not background)</b>: macro key <code>class</code></li><li><b>Split touching objects by</b>: macro key <code>split</code></li><li><b>Minimum area in pixels (0 = from your annotations)</b>: macro key <code>minimum</code></li><li><b>Device</b>: macro key <code>device</code></li><li><b>Proposals: name outlines proposal-N (training ignores them until renamed)</b>: macro key <code>proposals</code></li></ul><p>In a macro: <code>run(&quot;TEM Find Objects...&quot;, &quot;class=[...] split=[...] minimum=[...] device=[...] proposals&quot;);</code></p><p>More: the tem_ij_plugin README, section <i>In Fiji: Plugins &gt; TEM Segmentation</i>.</p>");
Dialog.show();
options = options + " class=[" + Dialog.getString() + "]";
options = options + " split=[" + Dialog.getChoice() + "]";
options = options + " minimum=[" + Dialog.getNumber() + "]";
options = options + " device=[" + Dialog.getChoice() + "]";
if (Dialog.getCheckbox()) options = options + " proposals";
run("TEM Bridge");
Ext.temRun("TEM Find Objects", options, error);
if (error != "") exit;
