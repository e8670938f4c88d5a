"""Manhole mode: deliver the bootstrap through the service's own manhole socket.

Works with both of manhole's connection handlers: ``exec`` runs each line it reads, ``repl`` is an
interactive console that echoes. We send one line, half-close our side so that either handler
sees EOF right after running it, and drain whatever it printed (which is never shown, except with
-v), so that the service's stdout redirection ends as soon as possible.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Callable, Optional

from ..errors import (
    AttachTimeout,
    InjectionFailed,
    OptionError,
    PermissionDenied,
    QueryError,
    TargetExited,
    ToolMissing,
)
from ..target import signal_dispositions


def parse_signal(text: str) -> int:
    """'SIGUSR1', 'USR1', 'usr1' or '10' -> 10."""
    value = text.strip()
    if value.isdigit():
        num = int(value)
        if 0 < num < signal.NSIG:
            return num
    else:
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        sig = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
        if sig is not None:
            return int(sig)
    raise QueryError("-s %s: not a signal name or number" % text,
                     "Use a name such as SIGUSR1 or USR1, or a number such as 10.")


# Never sent, whatever the target does with them: they cannot be caught or they stop the process
# (the first five), or, when a service catches them, its handler means something else than
# "wake the manhole": stop, reload, reap a child, report a fault, a timer.
_REFUSED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
            signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGABRT,
            signal.SIGALRM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGSEGV, signal.SIGBUS,
            signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS, signal.SIGXCPU,
            signal.SIGXFSZ}


def check_signal(pid: int, sig: int) -> None:
    """Refuse (exit 2, nothing sent) a signal that would do the target harm: one that cannot be
    caught or stops it, or one it does not catch, whose default action may well end it. A
    signal it ignores would do nothing, so waiting for a manhole to wake would be pointless."""
    name = _signal_name(sig)
    if sig in _REFUSED:
        raise OptionError("-s %s: this signal stops, ends or reloads processes; it is never sent"
                          % name,
                          "Use the signal the service gave manhole.install(activate_on=...), "
                          "usually USR1 or USR2.")
    try:
        caught, ignored = signal_dispositions(pid)
    except OSError:
        raise TargetExited("process %d does not exist" % pid) from None
    bit = 1 << (sig - 1)
    if ignored & bit:
        raise OptionError("-s %s: process %d ignores this signal, so it cannot wake a manhole"
                          % (name, pid),
                          "Use the signal the service gave manhole.install(activate_on=...).")
    if not caught & bit:
        raise OptionError("-s %s: process %d does not catch this signal: it cannot wake a "
                          "manhole, and it may end the process" % (name, pid),
                          "Check the service's manhole.install(activate_on=...), or use --gdb.")


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def _connect(path: str) -> Optional[socket.socket]:
    """A connection to a manhole socket that accepts at once, or None."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(path)
        return sock
    except OSError:
        sock.close()
        return None


def socket_path(pid: int, root: str = "/") -> str:
    return os.path.join(root, "tmp", "manhole-%d" % pid)


def inject(pid: int, code: str, *, sig: Optional[int], timeout: float, root: str = "/",
           log: Callable[[str], None] = lambda s: None) -> socket.socket:
    """Run ``code`` in the target through its manhole. Returns the open manhole connection,
    which the caller closes once the agent has connected back (closing earlier can make the
    ``repl`` handler stop before it has run our line)."""
    path = socket_path(pid, root)
    if sig is not None:
        check_signal(pid, sig)
    # A manhole that is already awake is not signalled again: manhole 1.8 would try to start
    # its thread a second time and raise in the target's main thread.
    sock = _connect(path) if sig is not None else None
    if sock is not None:
        log("the manhole at %s is already awake: no signal sent" % path)
        return _send_line(sock, code, path, log)
    if sig is not None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            raise TargetExited("process %d does not exist" % pid) from None
        except PermissionError:
            raise PermissionDenied("not allowed to send signal %d to process %d" % (sig, pid),
                                   "Run as the target's user or root.") from None
        log("sent signal %d to %d" % (sig, pid))
    elif not os.path.exists(path):
        raise ToolMissing(
            "no manhole socket at %s" % path,
            "The service must call manhole.install() (add -s SIGNAL if it installed manhole "
            "with activate_on=SIGNAL), or use --gdb.")
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                if sig is not None:
                    raise AttachTimeout(
                        "no manhole socket at %s %.1fs after the signal" % (path, timeout),
                        "Check that the service installed manhole with activate_on=<this "
                        "signal>, or raise -t.") from None
                raise ToolMissing("the manhole socket %s refused the connection (%s)"
                                  % (path, exc.strerror),
                                  "The socket is stale or manhole is not running.") from None
            time.sleep(0.005)
        except PermissionError:
            sock.close()
            raise PermissionDenied("not allowed to connect to %s" % path,
                                   "Run as the service's user or root.") from None
        except OSError as exc:
            sock.close()
            raise ToolMissing("cannot connect to %s: %s" % (path, exc)) from None
    return _send_line(sock, code, path, log)


def _send_line(sock: socket.socket, code: str, path: str,
               log: Callable[[str], None]) -> socket.socket:
    log("connected to %s" % path)
    try:
        sock.settimeout(5.0)
        sock.sendall(code.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        sock.close()
        raise InjectionFailed("the manhole at %s closed the connection (%s)"
                              % (path, exc.strerror or exc),
                              "Another client may be connected to it, or the service is "
                              "exiting; try again, or use --gdb.") from None
    return sock


def drain(sock: socket.socket, log: Callable[[str], None], wait: float = 0.5) -> None:
    """Read what manhole printed until it closes, then close."""
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                break
            for line in data.decode(errors="replace").splitlines():
                log("manhole: " + line)
    except OSError:
        pass
    finally:
        sock.close()
