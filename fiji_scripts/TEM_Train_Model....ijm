// TEM Train Model...: Plugins > TEM Segmentation (tem_ij_plugin 0.2.0)
// Trains a model from the ROI Manager's ROIs on the current image, warm-starting from the current model.
// Generated from plugin.yml by `tem-ij install-fiji --write-scripts`: edit plugin.yml, not this file.
bridge = "" + call("java.lang.System.getProperty", "tem_ij.bridge");
if (bridge == "" || bridge == "null") exit("TEM Segmentation needs its Python side, which is not running in this Fiji.\n \nQuit Fiji and start it from a terminal with:\n    tem-ij fiji \"" + getDirectory("imagej") + "\"\n \nIf tem-ij is not found, activate the Python environment you installed tem_ij_plugin in; it needs its Fiji extra there: pip install \"tem_ij_plugin[fiji]\" (from a source checkout: pip install -e \".[fiji]\"). tem-ij doctor checks that environment.");
interactive = "" + call("ij.Macro.getOptions");
if (interactive == "" || interactive == "null") interactive = "1"; else interactive = "0";
options = "interactive=" + interactive;
Dialog.create("TEM Train Model");
Dialog.addNumber("Max minutes", 10);
Dialog.addChoice("Device", newArray("auto", "cpu", "cuda", "mps"), "auto");
Dialog.addFile("ROIs file (empty = ROI Manager)", "");
Dialog.addString("Show probabilities of (classes, all or none)", "none", 30);
Dialog.addDirectory("Project folder (optional)", "");
Dialog.addFile("Settings file (optional YAML)", "");
Dialog.addCheckbox("New model (ignore the current one)", false);
Dialog.addCheckbox("All slices for ROIs without a slice position", false);
Dialog.addMessage("Trains a model from the ROI Manager's ROIs on the current image, warm-starting from the current model.");
Dialog.addHelp("<html><h3>TEM Train Model</h3><p>Trains a model from the ROI Manager&#x27;s ROIs on the current image, warm-starting from the current model.</p><ul><li><b>Max minutes</b>: macro key <code>max</code></li><li><b>Device</b>: macro key <code>device</code></li><li><b>ROIs file (empty = ROI Manager)</b>: macro key <code>rois</code></li><li><b>Show probabilities of (classes, all or none)</b>: macro key <code>show</code></li><li><b>Project folder (optional)</b>: macro key <code>project</code></li><li><b>Settings file (optional YAML)</b>: macro key <code>settings</code></li><li><b>New model (ignore the current one)</b>: macro key <code>new</code></li><li><b>All slices for ROIs without a slice position</b>: macro key <code>all</code></li></ul><p>In a macro: <code>run(&quot;TEM Train Model...&quot;, &quot;max=[...] device=[...] rois=[...] show=[...] project=[...] settings=[...] new all&quot;);</code></p><p>More: the tem_ij_plugin README, section <i>In Fiji: Plugins &gt; TEM Segmentation</i>.</p>");
Dialog.show();
options = options + " max=[" + Dialog.getNumber() + "]";
options = options + " device=[" + Dialog.getChoice() + "]";
options = options + " rois=[" + Dialog.getString() + "]";
options = options + " show=[" + Dialog.getString() + "]";
options = options + " project=[" + Dialog.getString() + "]";
options = options + " settings=[" + Dialog.getString() + "]";
if (Dialog.getCheckbox()) options = options + " new";
if (Dialog.getCheckbox()) options = options + " all";
run("TEM Bridge");
Ext.temRun("TEM Train Model", options, error);
if (error != "") exit;
