// TEM Save Model...: Plugins > TEM Segmentation (tem_ij_plugin 0.2.0)
// Saves the current model to a .model file.
// Generated from plugin.yml by `tem-ij install-fiji --write-scripts`: edit plugin.yml, not this file.
bridge = "" + call("java.lang.System.getProperty", "tem_ij.bridge");
if (bridge == "" || bridge == "null") exit("TEM Segmentation needs its Python side, which is not running in this Fiji.\n \nQuit Fiji and start it from a terminal with:\n    tem-ij fiji \"" + getDirectory("imagej") + "\"\n \nIf tem-ij is not found, activate the Python environment you installed tem_ij_plugin in; it needs its Fiji extra there: pip install \"tem_ij_plugin[fiji]\" (from a source checkout: pip install -e \".[fiji]\"). tem-ij doctor checks that environment.");
interactive = "" + call("ij.Macro.getOptions");
if (interactive == "" || interactive == "null") interactive = "1"; else interactive = "0";
options = "interactive=" + interactive;
Dialog.create("TEM Save Model");
Dialog.addFile("Model file", "");
Dialog.addMessage("Saves the current model to a .model file.");
Dialog.addHelp("<html><h3>TEM Save Model</h3><p>Saves the current model to a .model file.</p><ul><li><b>Model file</b>: macro key <code>model</code></li></ul><p>In a macro: <code>run(&quot;TEM Save Model...&quot;, &quot;model=[...]&quot;);</code></p><p>More: the tem_ij_plugin README, section <i>In Fiji: Plugins &gt; TEM Segmentation</i>.</p>");
Dialog.show();
options = options + " model=[" + Dialog.getString() + "]";
run("TEM Bridge");
Ext.temRun("TEM Save Model", options, error);
if (error != "") exit;
