// TEM Predict Probabilities...: Plugins > TEM Segmentation (tem_ij_plugin 0.2.0)
// Probability maps of the current image or stack as a new 32-bit image, one channel per class.
// Generated from plugin.yml by `tem-ij install-fiji --write-scripts`: edit plugin.yml, not this file.
bridge = "" + call("java.lang.System.getProperty", "tem_ij.bridge");
if (bridge == "" || bridge == "null") exit("TEM Segmentation needs its Python side, which is not running in this Fiji.\n \nQuit Fiji and start it from a terminal with:\n    tem-ij fiji \"" + getDirectory("imagej") + "\"\n \nIf tem-ij is not found, activate the Python environment you installed tem_ij_plugin in; it needs its Fiji extra there: pip install \"tem_ij_plugin[fiji]\" (from a source checkout: pip install -e \".[fiji]\"). tem-ij doctor checks that environment.");
interactive = "" + call("ij.Macro.getOptions");
if (interactive == "" || interactive == "null") interactive = "1"; else interactive = "0";
options = "interactive=" + interactive;
Dialog.create("TEM Predict Probabilities");
Dialog.addChoice("Output", newArray("probabilities", "labels"), "probabilities");
Dialog.addChoice("Device", newArray("auto", "cpu", "cuda", "mps"), "auto");
Dialog.addMessage("Probability maps of the current image or stack as a new 32-bit image, one channel per class.");
Dialog.addHelp("<html><h3>TEM Predict Probabilities</h3><p>Probability maps of the current image or stack as a new 32-bit image, one channel per class.</p><ul><li><b>Output</b>: macro key <code>output</code></li><li><b>Device</b>: macro key <code>device</code></li></ul><p>In a macro: <code>run(&quot;TEM Predict Probabilities...&quot;, &quot;output=[...] device=[...]&quot;);</code></p><p>More: the tem_ij_plugin README, section <i>In Fiji: Plugins &gt; TEM Segmentation</i>.</p>");
Dialog.show();
options = options + " output=[" + Dialog.getChoice() + "]";
options = options + " device=[" + Dialog.getChoice() + "]";
run("TEM Bridge");
Ext.temRun("TEM Predict Probabilities", options, error);
if (error != "") exit;
