"""The error hierarchy: every failure the CLI reports, with its exit code and a fix-it hint.

The CLI catches :class:`HunterAttachError` at the top and prints ``hunter-trace: <message>`` plus
the hint, never a traceback. The exit codes are documented in the README ("Exit codes").
"""

from __future__ import annotations

PTRACE_HINT = (
    "ptrace was refused. Fixes: run as root or as the target's user; "
    "set /proc/sys/kernel/yama/ptrace_scope to 0 (sysctl kernel.yama.ptrace_scope=0); "
    "grant CAP_SYS_PTRACE (docker run --cap-add=SYS_PTRACE, or securityContext.capabilities.add "
    "[SYS_PTRACE] in Kubernetes); or let the service open a manhole socket and drop --gdb."
)

VERSION_HINT = "hunter-trace traces CPython 3.8–3.13."
PID_HINT = "Find the pid of a Python process with `pgrep -af python` or `ps aux`."

BUSY_HINT = (
    "One hunter-trace session per process at a time: stop the other one (Ctrl-C in it), or "
    "trace both queries in one session: 'Q(...) | Q(...)'."
)


class HunterAttachError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with; ``hint`` says how to fix it."""

    exit_code = 1
    default_hint = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = self.default_hint if hint is None else hint

    def __str__(self) -> str:
        return self.message


class OutputFailed(HunterAttachError):
    """The events could not be written (a full disk, a directory removed meanwhile). The session
    was detached cleanly; exit code 1."""

    default_hint = "Check the output's disk and directory; the target was released."


class QueryError(HunterAttachError):
    """A query term or option that does not parse. Nothing has been sent to the target."""

    exit_code = 2
    default_hint = "See 'Query language' in the README for fields and operators."


class OptionError(QueryError):
    """An option's value that cannot work (-t 0, -p twice, an unwritable --perfetto file).
    Checked before anything touches the target."""

    default_hint = "Run 'hunter-trace -h' for the options."


class TargetError(HunterAttachError):
    """No such process, a zombie, or not a CPython we can trace."""

    exit_code = 3
    default_hint = f"{VERSION_HINT} {PID_HINT}"


class PermissionDenied(HunterAttachError):
    """We may not trace this process (another user, ptrace refused)."""

    exit_code = 4
    default_hint = PTRACE_HINT


class ToolMissing(HunterAttachError):
    """A required tool (gdb) or endpoint (the manhole socket) is not there."""

    exit_code = 5
    default_hint = (
        "Without --gdb the service must have called manhole.install(); with --gdb, gdb must "
        "be installed (apt-get install gdb).")


class AttachTimeout(HunterAttachError):
    """A step of attaching did not finish in time."""

    exit_code = 6
    default_hint = "Allow more time with -t SECONDS; -v shows which step is slow."


class InjectionFailed(HunterAttachError):
    """gdb or manhole could not run the bootstrap, or the agent failed to start."""

    exit_code = 7
    default_hint = (
        "Nothing was left in the target. Run again with -v to see each step; if this repeats, "
        "please report it with that output.")


class TargetExited(HunterAttachError):
    """The target went away while we were attaching or tracing. No hint: it is news, in one
    line, not a mistake to fix."""

    exit_code = 8


class ProtocolError(HunterAttachError):
    """The agent sent something that is not a valid frame."""

    exit_code = 9
    default_hint = (
        "The target was released. This is a bug: please report it with the output of -v.")
