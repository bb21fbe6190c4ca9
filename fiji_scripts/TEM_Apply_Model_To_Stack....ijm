// TEM Apply Model To Stack...: Plugins > TEM Segmentation (tem_ij_plugin 0.2.0)
// Predicts a stack file, or every TIFF in a folder, into an output folder without opening windows.
// Generated from plugin.yml by `tem-ij install-fiji --write-scripts`: edit plugin.yml, not this file.
bridge = "" + call("java.lang.System.getProperty", "tem_ij.bridge");
if (bridge == "" || bridge == "null") exit("TEM Segmentation needs its Python side, which is not running in this Fiji.\n \nQuit Fiji and start it from a terminal with:\n    tem-ij fiji \"" + getDirectory("imagej") + "\"\n \nIf tem-ij is not found, activate the Python environment you installed tem_ij_plugin in; it needs its Fiji extra there: pip install \"tem_ij_plugin[fiji]\" (from a source checkout: pip install -e \".[fiji]\"). tem-ij doctor checks that environment.");
interactive = "" + call("ij.Macro.getOptions");
if (interactive == "" || interactive == "null") interactive = "1"; else interactive = "0";
options = "interactive=" + interactive;
Dialog.create("TEM Apply Model To Stack");
Dialog.addFile("Input (TIFF file or folder)", "");
Dialog.addDirectory("Output folder", "");
Dialog.addChoice("Kind", newArray("probabilities", "labels", "both"), "probabilities");
Dialog.addChoice("Device", newArray("auto", "cpu", "cuda", "mps"), "auto");
Dialog.addCheckbox("Resume an interrupted run (finished files and planes are kept)", false);
Dialog.addMessage("Predicts a stack file, or every TIFF in a folder, into an output folder without opening windows.");
Dialog.addHelp("<html><h3>TEM Apply Model To Stack</h3><p>Predicts a stack file, or every TIFF in a folder, into an output folder without opening windows.</p><ul><li><b>Input (TIFF file or folder)</b>: macro key <code>input</code></li><li><b>Output folder</b>: macro key <code>output</code></li><li><b>Kind</b>: macro key <code>kind</code></li><li><b>Device</b>: macro key <code>device</code></li><li><b>Resume an interrupted run (finished files and planes are kept)</b>: macro key <code>resume</code></li></ul><p>In a macro: <code>run(&quot;TEM Apply Model To Stack...&quot;, &quot;input=[...] output=[...] kind=[...] device=[...] resume&quot;);</code></p><p>More: the tem_ij_plugin README, section <i>In Fiji: Plugins &gt; TEM Segmentation</i>.</p>");
Dialog.show();
options = options + " input=[" + Dialog.getString() + "]";
options = options + " output=[" + Dialog.getString() + "]";
options = options + " kind=[" + Dialog.getChoice() + "]";
options = options + " device=[" + Dialog.getChoice() + "]";
if (Dialog.getCheckbox()) options = options + " resume";
run("TEM Bridge");
Ext.temRun("TEM Apply Model To Stack", options, error);
if (error != "") exit;
