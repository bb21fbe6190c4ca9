"""The bridge: ImageJ menu macros call Python through it.

Each menu macro runs ``run("TEM Bridge")``, which an ``ij.CommandListener`` implemented here
intercepts to register a macro extension on that macro's interpreter, then calls
``Ext.temRun(command, options, error)``. The command therefore runs synchronously in the macro's own
thread (ImageJ's command thread, never the event thread), so the macro's next line sees its result.

The work happens in the extension call, not in the listener, on purpose: ImageJ calls command listeners
while holding a lock that every other menu command needs, so long work there would block all of
ImageJ (including ``TEM Stop Training``) until it ended.
"""

from __future__ import annotations

import importlib
import logging
import threading
import traceback
from dataclasses import dataclass, field

from scyjava import jimport

from ..errors import Cancelled, UserError
from .manifest import BRIDGE_COMMAND, BRIDGE_PROPERTY, Command, load_manifest, parse_options

log = logging.getLogger(__name__)
MACRO_THREAD_SUFFIX = "Macro$"  # ImageJ's Macro_Runner appends it to the name of a thread running a macro


class CancelFlag:
    """Set by ``TEM Stop Training`` or by Esc in ImageJ; quacks like the ``threading.Event`` engines poll."""

    def __init__(self, stop: threading.Event):
        self.stop = stop

    def is_set(self) -> bool:
        """Whether ``TEM Stop Training`` ran or Esc was pressed in ImageJ."""
        return self.stop.is_set() or bool(jimport("ij.IJ").escapePressed())


@dataclass
class Context:
    """What a command function gets: the bridge, its parsed options and the current image."""

    bridge: Bridge
    command: Command
    options: dict
    image: object = None  # ij.ImagePlus when the command needs one
    cancel: CancelFlag = None
    results: dict = field(default_factory=dict)

    @property
    def interactive(self) -> bool:
        """True when a person clicked the menu (no macro options), so dialogs may open."""
        return self.options.get("interactive") == "1"

    @property
    def batch(self) -> bool:
        """True when errors go to the Log window: the bridge logs them, or a macro runs in batch mode."""
        return self.bridge.log_errors or bool(jimport("ij.macro.Interpreter").isBatchMode())

    def text(self, key: str) -> str:
        """The option ``key`` as a stripped string ("" when absent)."""
        return str(self.options.get(key, "")).strip()

    def number(self, key: str, low: float | None = None) -> float:
        """The option ``key`` as a number, at least ``low`` when given; anything else is a :class:`UserError`."""
        raw = self.options.get(key, "")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise UserError(f"{self.command.name}: {key}={raw} is not a number") from None
        if low is not None and value < low:
            raise UserError(f"{self.command.name}: {key} must be at least {low:g}, not {value:g}")
        return value

    def choice(self, key: str) -> str:
        """The option ``key``, which must be one of its argument's choices (a :class:`UserError` otherwise)."""
        value = self.text(key)
        arg = next(a for a in self.command.args if a.key == key)
        if value not in arg.choices:
            raise UserError(f"{self.command.name}: {key}={value} is not one of {', '.join(arg.choices)}")
        return value

    def status(self, message: str, fraction: float | None = None) -> None:
        """Show ``message`` in ImageJ's status bar and ``fraction`` (clipped to 0..1) as its progress, if given."""
        IJ = jimport("ij.IJ")
        IJ.showStatus(message)
        if fraction is not None:
            IJ.showProgress(min(max(float(fraction), 0.0), 1.0))


class Bridge:
    """Serves the menu commands of ``plugin.yml`` inside a running ImageJ.

    Parameters
    ----------
    settings : Settings, optional
        Training settings when a command gives no settings file (defaults otherwise).
    log_errors : bool
        Report errors to ImageJ's log instead of a dialog (the macro runner, where no one can click OK).
    """

    def __init__(self, settings=None, log_errors: bool = False):
        self.settings = settings
        self.log_errors = log_errors
        self.commands = {c.name: c for c in load_manifest()["commands"]}
        # Macros of 0.2 call the commands by their names before the "..." (run("TEM Train Model", ...)),
        # which ImageJ's run() would not find: the listener turns them into the menu names
        self.menu_names = {c.name: c.menu_name for c in self.commands.values()}
        self.menu_names.update({c.menu_name: c.menu_name for c in self.commands.values()})
        self.model = None
        self.model_path = None
        self.stop = threading.Event()
        self.training = threading.Lock()
        self.errors: list = []
        self.last: dict = {}
        self.progress: dict | None = None  # the running training's last progress event
        self._listener = None
        self._extension = None
        self._callers: dict = {}

    def caller(self):
        """The macro interpreter that ran the command now running in this thread (None from a menu click)."""
        return self._callers.get(threading.get_ident())

    # -- wiring ---------------------------------------------------------------------------------------
    def attach(self) -> Bridge:
        """Register the command listener and tell the menu macros that Python is here."""
        from jpype import JArray, JImplements, JOverride, JString

        Functions = jimport("ij.macro.Functions")
        Interpreter = jimport("ij.macro.Interpreter")
        Descriptor = jimport("ij.macro.ExtensionDescriptor")
        MacroExtension = jimport("ij.macro.MacroExtension")
        bridge = self

        @JImplements("ij.macro.MacroExtension")
        class Extension:
            @JOverride
            def getExtensionFunctions(self):
                text = MacroExtension.ARG_STRING
                types = (text, text, MacroExtension.ARG_OUTPUT + text)
                return JArray(Descriptor)([Descriptor.newDescriptor("temRun", self, *types)])

            @JOverride
            def handleExtension(self, name, args):
                error = bridge.run(str(args[0]), str(args[1]))
                args[2][0] = JString(error)
                return None

        @JImplements("ij.CommandListener")
        class Listener:
            @JOverride
            def commandExecuting(self, command):
                name = str(command) if command is not None else ""
                if name == BRIDGE_COMMAND:
                    Functions.registerExtensions(bridge._extension)
                    return None
                if name in bridge.menu_names:
                    # Still in the caller's context: its menu macro has not started its own interpreter
                    bridge._callers[threading.get_ident()] = Interpreter.getInstance()
                    return JString(bridge.menu_names[name])
                return command

        self._extension = Extension()
        self._listener = Listener()
        jimport("ij.Executer").addCommandListener(self._listener)
        from .. import __version__

        jimport("java.lang.System").setProperty(BRIDGE_PROPERTY, __version__)
        return self

    def detach(self) -> None:
        """Remove the listener; menu macros then say how to start the bridge."""
        if self._listener is not None:
            jimport("ij.Executer").removeCommandListener(self._listener)
            self._listener = None
        jimport("java.lang.System").clearProperty(BRIDGE_PROPERTY)

    # -- dispatch -------------------------------------------------------------------------------------
    def run(self, name: str, options: str) -> str:
        """Run one menu command; returns "" or the error message already shown to the user.

        Never raises: a Python exception must not reach ImageJ's interpreter.
        """
        IJ = jimport("ij.IJ")
        command = self.commands.get(name)
        thread = jimport("java.lang.Thread").currentThread()
        thread_name = str(thread.getName())
        if thread_name.endswith(MACRO_THREAD_SUFFIX):
            # Esc makes ImageJ stop (Thread.stop) every thread named "...Macro$" whose macro has not ended
            # 2 s later. In Python that ThreadDeath would land mid-command (a long training step) and
            # lose the model; Esc still cancels us, through IJ.escapePressed() in CancelFlag.
            thread.setName(thread_name[: -len(MACRO_THREAD_SUFFIX)])
        try:
            if command is None:
                raise UserError(f"unknown command '{name}'; the menu files do not match this tem_ij_plugin")
            ctx = Context(self, command, parse_options(options), cancel=CancelFlag(self.stop))
            if ctx.interactive:
                complete_recording(command, ctx.options)
            if command.needs_image:
                ctx.image = jimport("ij.WindowManager").getCurrentImage()
                if ctx.image is None:
                    raise UserError("there is no image open; open a TEM image (File > Open...) first")
            module, func = command.function.split(":")
            IJ.resetEscape()
            getattr(importlib.import_module(module), func)(ctx)
            self.last[name] = ctx.results
            return ""
        except UserError as exc:
            message = str(exc)
        except Cancelled as exc:
            message = f"cancelled ({exc})" if str(exc) else "cancelled"
        except Exception as exc:  # a bug of ours: report it, never let it unwind into ImageJ
            IJ.log("".join(traceback.format_exception(exc)))
            message = f"internal error: {type(exc).__name__}: {exc} (the Log window has the details)"
        finally:
            thread.setName(thread_name)  # before abort_caller: Macro.abort only unwinds a "Macro$" thread
            IJ.showProgress(1.0)
            self._callers.pop(threading.get_ident(), None)
        self.report(name, message)
        self.abort_caller()
        return message

    @staticmethod
    def abort_caller() -> None:
        """Make the macro that ran the failed command stop after it, so its next line never runs on a missing result.

        ``Macro.abort`` flags the abort (checked when ``run()`` returns) and, in a macro thread, also throws
        to unwind; that throw is expected here.
        """
        try:
            jimport("ij.Macro").abort()
        except Exception:  # noqa: S110 - the RuntimeException("Macro canceled") is the mechanism
            pass

    def report(self, title: str, message: str) -> None:
        """Show an error: a dialog for a person, the Log window in batch mode and under the macro runner."""
        self.errors.append((title, message))
        log.error("%s: %s", title, message)
        IJ = jimport("ij.IJ")
        IJ.showStatus(f"{title}: failed")
        if self.log_errors or jimport("ij.macro.Interpreter").isBatchMode():
            IJ.log(f"{title}: {message}")
        else:
            IJ.error(title, message)


def complete_recording(command: Command, options: dict) -> None:
    """Record the dialog's choices that ImageJ's Recorder missed, so the recorded line replays them.

    ``GenericDialog`` decides whether to record in ``dispose()``, after it has already woken the macro
    thread; under load the macro can read its fields first and record nothing, leaving a bare
    ``run("TEM ...");`` that reopens the dialog on replay. The menu command is still the one being
    recorded (ImageJ writes the line when it ends), so recording the keys again, all of them in the
    dialog's order, completes that line.
    """
    Recorder = jimport("ij.plugin.frame.Recorder")
    if not Recorder.record or str(Recorder.getCommand()) != command.menu_name:
        return
    recorded = parse_options(str(Recorder.getCommandOptions() or ""))
    wanted = [a.key for a in command.args if a.key in options]  # an unticked checkbox is absent
    if all(key in recorded for key in wanted):
        return
    Recorder.resetCommandOptions()
    for key in wanted:
        if options[key] is True:
            Recorder.recordOption(key)
        else:
            Recorder.recordOption(key, str(options[key]) or "[]")  # GenericDialog records "" as []


def dispose_windows() -> None:
    """Dispose every AWT window: a JVM that still has one keeps the process alive at exit."""
    for window in jimport("java.awt.Window").getWindows():
        window.dispose()
