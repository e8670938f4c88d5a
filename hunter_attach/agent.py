"""The agent: runs inside the target, on its own thread, for one trace session.

Shipped into the target as source (stdlib only, CPython 3.8+); the bootstrap builds the package
``_hunter_attach`` from it and calls :func:`serve`. The agent never raises into the target: every
failure is reported to the CLI as an ERROR frame, and the tracer is removed on every path.

The hot path is in the C module ``_tracer``; this module answers its questions once per code
object (:meth:`Session.decide`) and once per thread (:meth:`Session.on_thread`), makes the safe
reprs of matched events, and moves control frames.
"""

from __future__ import annotations

import linecache
import os
import socket
import sys
from array import array
from time import monotonic as _monotonic
from typing import Any, Dict, List, Optional, Tuple

from . import filters, green, protocol, saferepr

# Only one session at a time per process: the C tracer's state is process-wide. Module state
# survives between sessions because the bootstrap reuses this package when its sources match.
_session_lock = green.allocate_lock()  # real locks and idents even under gevent (green.py)
_current: List[Any] = [None, None]  # the running Session and its socket, for the fork hook
_fork_hook_installed = False

MAX_SOURCE_LINES = 400


class AgentError(Exception):
    """A failure the CLI should show the user as is."""


def _needs_counting(tree: Dict[str, Any]) -> bool:
    """Does the query need every call counted (`calls`, or From's relative depth)? Then the
    sys.monitoring backend cannot disable code that never matches."""
    if tree.get("op") == "from" or tree.get("field") == "calls":
        return True
    children = list(tree.get("args", ())) + [tree[k] for k in ("arg", "condition", "predicate")
                                             if isinstance(tree.get(k), dict)]
    return any(_needs_counting(child) for child in children)


def _narrows_code(tree: Dict[str, Any]) -> bool:
    """Does the query rule out most code objects by their static fields (module=x,
    function_in=..., filename_sw=...)? Only then does disabling unmatched code in
    sys.monitoring pay for computing each matched event's depth from its stack; a query that
    matches nearly all code is cheaper with every call counted."""
    op = tree.get("op")
    if op == "cmp":
        return tree.get("field") in ("module", "function", "filename") or (
            tree.get("field") == "stdlib" and tree.get("value") is True)
    if op == "and":
        return any(_narrows_code(child) for child in tree.get("args", ()))
    if op == "or":
        return bool(tree.get("args")) and all(_narrows_code(child) for child in tree["args"])
    return False


def _main_ident() -> int:
    threading = sys.modules.get("threading")
    # Under gevent or eventlet, threading's main thread has a greenlet's ident, not its OS
    # thread's: the tracer, the delivering thread's check (on_thread) and threadid=None need
    # the real one.
    if threading is not None and not green.hub_library_loaded():
        return threading.main_thread().ident or 0
    # Without a trustworthy threading module, the oldest thread state is the main thread, and
    # sys._current_frames() lists thread states newest first.
    idents = list(sys._current_frames())
    return idents[-1] if idents else 0


def _thread_name(ident: int, main: bool) -> str:
    threading = sys.modules.get("threading")
    if threading is not None:
        # threading._active, not current_thread(): the latter would register a dummy thread
        # object in the target for threads started with _thread.
        thread = threading._active.get(ident)  # type: ignore[attr-defined]
        name = saferepr.thread_name(thread) if thread is not None else None
        if name is not None:
            return str(name)
    return "MainThread" if main else "Thread-%d" % ident


def _is_ours(code: Any, module: Any) -> bool:
    """Is this code the tool's own: the agent package, the bootstrap template (BOOT_MODULE), or
    the injected line that runs it (a "<string>" holding the template)? A late second
    delivery of the bootstrap may run on a traced thread; none of it is ever an event."""
    if type(module) is str and module.startswith(protocol.PACKAGE):
        return True
    return code.co_filename == "<string>" and any(
        type(const) is str and const.startswith(protocol.BOOT_MARKER) for const in code.co_consts)


def _bottom(frame: Any) -> Any:
    """The outermost frame of a stack: what the thread was started to run."""
    while frame.f_back is not None:
        frame = frame.f_back
    return frame


# The OS thread's id (3.8+ on Linux), CPython's own even under gevent or eventlet; None: the
# agent cannot tell OS threads apart, and does not report any as ended.
_get_native_id = green.original("_thread", "get_native_id")


def _native_id() -> int:
    return int(_get_native_id()) if _get_native_id is not None else 0


def _with_hidden_returns(kinds: int, program: Optional[bytes]) -> Tuple[int, Optional[bytes]]:
    """kinds and program for a code whose calls can match, under --summary: its returns are
    delivered too, and those that do not match go out hidden (HIDDEN_RETURNS). When returns
    could not match before, the program gets ``AND KIND(kinds)``, which keeps them out. The
    original program is pure then (a `from` needs returns, so it has them already)."""
    if not kinds & (1 << protocol.RETURN):
        tail = array("q", [filters.OP_KIND, kinds]).tobytes()
        if program is not None:
            tail += array("q", [filters.OP_AND]).tobytes()
        program = (program or b"") + tail
        kinds |= 1 << protocol.RETURN
    return kinds | (1 << protocol.HIDDEN_RETURNS), program


class Session:
    def __init__(self, sock: socket.socket, tracer: Any, config: Dict[str, Any]) -> None:
        self.sock = sock
        self.tracer = tracer
        self.config = config
        self.filter = filters.Filter(config["query"])
        self.repr_limit = int(config.get("repr_limit", 1024))
        self.main_ident = _main_ident()
        self.my_ident = green.get_ident()
        # The thread that ran the bootstrap, unless it is the main thread (a pending call): the
        # gdb helper's or manhole's connection thread, busy on our behalf for a while yet. Known
        # by its outermost frame, not its ident, which a new thread may reuse once it ends.
        self.delivery_frame: Any = None
        delivered_by = config.get("delivered_by")
        if delivered_by not in (None, self.my_ident, self.main_ident):
            top = sys._current_frames().get(delivered_by)
            self.delivery_frame = _bottom(top) if top is not None else None
        self.next_code = 1
        self.next_thread = 1
        self.linecache_added: set = set()
        self.backend = ""
        self.tool_id: Optional[int] = None
        self.previous_thread_hook: Any = None
        self.enable_lines: Any = None
        self.registered: List[int] = []
        self.lined_codes: List[Any] = []
        self.mode = 0
        self.suspended: List[str] = []
        self.greenlets = ""
        # --summary: the tracer also sends the returns of code whose calls can match, hidden
        # (protocol.py), so that a call's time ends at its real return.
        self.hidden_returns = bool(config.get("summary", False))
        # ident -> (thread id, native id) of the traced threads, to tell the CLI which ended.
        self.thread_ids: Dict[int, Tuple[int, int]] = {}
        self.last_reap = 0.0

    # ---- callbacks from the C tracer (tracing is off while they run) ----------------------
    def decide(self, code: Any, frame: Any) -> Optional[Tuple[int, int, Any, bytes, tuple]]:
        name = frame.f_globals.get("__name__", "") if frame is not None else ""
        module_file = frame.f_globals.get("__file__") if frame is not None else None
        if _is_ours(code, name):
            return None
        decision = self.filter.decide(code, name, module_file)  # hunter's rules for odd names
        # str() of a plain value runs no user code; anything else is shown as "?"
        module = "?" if name is None or not saferepr.is_plain(name) else str(name)
        if decision.never:
            return None
        code_id = self.next_code
        self.next_code += 1
        if self.enable_lines is not None and decision.kinds & (1 << protocol.LINE):
            self.enable_lines(code)
        meta = protocol.encode_meta(protocol.REC_CODE, self.code_info(code_id, code, module, frame))
        program = decision.program.tobytes() if decision.program is not None else None
        kinds = decision.kinds
        if self.hidden_returns and kinds & (1 << protocol.CALL):
            kinds, program = _with_hidden_returns(kinds, program)
        names = code.co_varnames
        args = tuple((display, var, names.index(var))
                     for display, var in saferepr.arguments(code))
        return code_id, kinds, program, meta, args

    def code_info(self, code_id: int, code: Any, module: str, frame: Any) -> Dict[str, Any]:
        """The CODE record: what the CLI needs to render any event of this code object."""
        module_globals = filters.loader_globals(frame.f_globals) if frame is not None else None
        module_file = saferepr.plain_str(frame.f_globals.get("__file__")) \
            if frame is not None else None
        filename = filters.event_filename(code.co_filename, module_file)
        if filename not in linecache.cache:
            self.linecache_added.add(filename)
        try:
            all_lines = linecache.getlines(filename, module_globals)
        except Exception:
            all_lines = []
        first = code.co_firstlineno
        last = first
        try:
            if hasattr(code, "co_lines"):
                last = max([line for _, _, line in code.co_lines() if line] or [first])
            else:  # 3.8/3.9: co_lnotab holds signed line deltas
                line = first
                for delta in code.co_lnotab[1::2]:
                    line += delta - 256 if delta >= 128 else delta
                    last = max(last, line)
        except Exception:
            pass
        last = min(last, first + MAX_SOURCE_LINES, len(all_lines))
        lines = {str(n): all_lines[n - 1] for n in range(max(first, 1), last + 1)}
        fullsource = ""
        if frame is not None:
            fullsource = filters.event_fullsource(filename, frame, first, "call")
        try:
            stdlib = filters.event_stdlib(module, filename)
        except Exception:
            stdlib = False
        return {
            "id": code_id,
            "filename": filename,
            "module": module,
            "function": code.co_name,
            "qualname": getattr(code, "co_qualname", code.co_name),
            "firstlineno": first,
            "stdlib": bool(stdlib),
            "lines": lines,
            "fullsource": fullsource,
        }

    def on_thread(self, greenlet: Any = None) -> Any:
        """(thread id, THREAD record); None to never trace this thread; False to ask again.
        `greenlet`: the greenlet running, when the tracer keeps greenlets apart (_tracer.c)."""
        ident = green.get_ident()
        if ident == self.my_ident:
            return None
        main = ident == self.main_ident
        if not main:
            bottom = _bottom(sys._getframe())  # below us: the frames of the event's thread
            if bottom is self.delivery_frame or _is_ours(
                    bottom.f_code, bottom.f_globals.get("__name__")):
                return None  # one of ours: the bootstrap's threads, manhole's connection
        threading = sys.modules.get("threading")
        if (not main and threading is not None and ident not in threading._active  # type: ignore
                and threading._limbo):  # type: ignore[attr-defined]
            # A threading.Thread between start() and registering itself: its name is not
            # known yet. sys.monitoring reports these first events; settrace does not.
            return False
        thread_id = self.next_thread
        self.next_thread += 1
        info = {"id": thread_id, "ident": ident, "name": _thread_name(ident, main), "main": main}
        if greenlet is not None:
            thread_main, name = green.greenlet_info(greenlet)
            if not thread_main:  # a greenlet is a pseudo-thread of its own, named after itself
                info.update(name=name, greenlet=True)
                return thread_id, protocol.encode_meta(protocol.REC_THREAD, info)
        # A pthread ident is reused once its thread has ended: a new OS thread with the ident
        # of a traced one means that one ended. (The tracer's per-thread state is per OS
        # thread, so the new one got here and gets a new id.)
        native = _native_id()
        ended = b""
        old = self.thread_ids.get(ident)
        if old is not None and old[1] != native:
            ended = protocol.THREAD_END.pack(protocol.REC_THREAD_END, old[0])
        self.thread_ids[ident] = (thread_id, native)
        return thread_id, ended + protocol.encode_meta(protocol.REC_THREAD, info)

    def reap_threads(self, final: bool = False) -> None:
        """At most once a second (and at STOP: ``final``), from the agent's thread: a
        THREAD_END record for each traced thread whose OS thread is gone, so that the CLI
        forgets it. /proc/self/task lists the live OS threads (no Python code runs, unlike
        asking threading); the tracer's state of a thread lives as long as its OS thread, even
        past its last Python frame."""
        now = _monotonic()
        if now - self.last_reap < 1.0 and not final:
            return
        self.last_reap = now
        entries = list(self.thread_ids.items())  # before the listing: these were alive then
        try:
            live = {int(name) for name in os.listdir("/proc/self/task")}
        except (OSError, ValueError):
            return
        for ident, entry in entries:
            if entry[1] and entry[1] not in live:
                if not self.tracer.append(protocol.THREAD_END.pack(protocol.REC_THREAD_END,
                                                                   entry[0])):
                    return  # no room now: next time
                if self.thread_ids.get(ident) is entry:
                    del self.thread_ids[ident]

    def fmt(self, kind: int, frame: Any, arg: Any) -> str:
        if kind == protocol.CALL:
            return saferepr.call_arguments(frame, self.repr_limit)
        return saferepr.trimmed(arg, self.repr_limit)

    # ---- install / uninstall ------------------------------------------------------------------
    def install(self) -> int:
        t = self.tracer
        t.configure(decide=self.decide, on_thread=self.on_thread, fmt=self.fmt,
                    pypred=self.filter.pypred,
                    buffer_size=int(self.config.get("buffer_size", 1 << 20)),
                    drop=bool(self.config.get("drop", False)),
                    block_timeout=float(self.config.get("block_timeout", 10.0)),
                    main_ident=self.main_ident, repr_limit=self.repr_limit)
        self.greenlets = self.hook_greenlets()
        if t.BACKEND == "monitoring":
            return self.install_monitoring()
        kinds = filters.kinds_mask(self.filter.tree)
        # A profile hook is cheaper, but gets no line or exception events, and before 3.11 it
        # would report some returns' line numbers unlike settrace (see frame_line in C). The
        # summary's hidden returns do not count here: every hook reports returns, and a hidden
        # one's line is never shown.
        profile_ok = (1 << protocol.CALL) | (
            (1 << protocol.RETURN) if sys.version_info >= (3, 11) else 0)
        mode = 1 if not kinds & ~profile_ok else 0
        self.backend = "profile" if mode else "settrace"
        threading = sys.modules.get("threading")
        if threading is not None:
            if mode:
                self.previous_thread_hook = threading._profile_hook  # type: ignore[attr-defined]
                threading.setprofile(t.thread_hook)
            else:
                self.previous_thread_hook = threading._trace_hook  # type: ignore[attr-defined]
                threading.settrace(t.thread_hook)
        self.mode = mode
        count = int(t.install(mode, self.my_ident))
        # Another tool's settrace/setprofile function (coverage.py, cProfile) is set aside on
        # these threads until uninstall() puts it back: the CLI says so.
        plain = "a Python sys.%s function" % ("setprofile" if mode else "settrace")
        self.suspended = sorted(plain if name in ("function", "method") else name
                                for name in (t.suspended() if hasattr(t, "suspended") else ()))
        if self.previous_thread_hook is not None and not self.suspended:
            self.suspended = ["threading hook %s" % type(self.previous_thread_hook).__name__]
        t.set_active(True)
        return count

    def install_monitoring(self) -> int:
        mon = sys.monitoring  # type: ignore[attr-defined]
        for tool in (4, 3, 5, 2, 1, 0):
            if mon.get_tool(tool) is None:
                mon.use_tool_id(tool, "hunter-attach")
                self.tool_id = tool
                # From here uninstall() must undo what follows, even if it fails half way.
                self.backend = "monitoring"
                break
        else:
            raise AgentError("all sys.monitoring tool ids are in use by other tools")
        E = mon.events
        t = self.tracer
        kinds = filters.kinds_mask(self.filter.tree)
        walk = _narrows_code(self.filter.tree) and not _needs_counting(self.filter.tree)
        wanted = []
        # Line events are enabled per code object by decide(), which runs on a code's first
        # event: a line-only query still needs the starts to see code objects at all.
        if walk is False or kinds & ((1 << protocol.CALL) | (1 << protocol.LINE)):
            wanted += [(E.PY_START, t.mon_start), (E.PY_RESUME, t.mon_start),
                       (E.PY_THROW, t.mon_throw)]
        if walk is False or kinds & (1 << protocol.RETURN) or (
                self.hidden_returns and kinds & (1 << protocol.CALL)):
            wanted += [(E.PY_RETURN, t.mon_return), (E.PY_YIELD, t.mon_return),
                       (E.PY_UNWIND, t.mon_unwind)]
        if kinds & (1 << protocol.EXCEPTION):
            wanted.append((E.RAISE, t.mon_raise))
        preexisting = set()
        if walk:
            # Frames on some stack now: depth counts only frames entered after this point.
            for ident, top in sys._current_frames().items():
                frame: Any = top
                while frame is not None and ident != self.my_ident:
                    preexisting.add(frame)
                    frame = frame.f_back
        threading = sys.modules.get("threading")
        boot = ()
        if threading is not None:
            boot = tuple(getattr(threading.Thread, name).__code__
                         for name in ("_bootstrap", "_bootstrap_inner"))
        t.mon_configure(walk, mon.DISABLE, preexisting, boot)
        events = 0
        for event, func in [(E.LINE, t.mon_line), (E.JUMP, t.mon_jump)] + wanted:
            self.registered.append(event)
            mon.register_callback(self.tool_id, event, func)
            if event not in (E.LINE, E.JUMP):
                events |= event
        tool_id = self.tool_id

        def enable_lines(code: Any) -> None:
            # LINE (and JUMP, see mon_jump) only on code objects where a line event can match.
            mon.set_local_events(tool_id, code, E.LINE | E.JUMP)
            self.lined_codes.append(code)

        self.enable_lines = enable_lines
        mon.set_events(self.tool_id, events)
        self.tracer.set_active(True)
        return len(sys._current_frames()) - 1

    def hook_greenlets(self) -> str:
        """Tell greenlets apart (see _tracer.c): "" when the target has none, else READY's
        "greenlets" note: "traced", or why not (the CLI shows it)."""
        if not green.greenlets_in_use():
            return ""
        functions = green.greenlet_functions()
        hook = getattr(self.tracer, "greenlets", None)
        if functions is None or hook is None:
            return ("greenlets are not told apart (this greenlet module has no C settrace): "
                    "events show their thread's name, and depths of its greenlets mix")
        hook(*functions, self.my_ident, green.greenlet_type(), green.hub_library_loaded())
        return "traced"

    def uninstall(self) -> None:
        t = self.tracer
        t.set_active(False)
        if getattr(self, "greenlets", "") == "traced":
            # Each thread's switch hook takes itself out at the thread's next switch: greenlet
            # lets only the thread itself set its trace function.
            t.greenlets(None)
        if self.backend == "monitoring":
            mon = sys.monitoring  # type: ignore[attr-defined]
            if self.tool_id is not None and mon.get_tool(self.tool_id) == "hunter-attach":
                mon.set_events(self.tool_id, 0)
                for code in self.lined_codes:
                    mon.set_local_events(self.tool_id, code, 0)
                for event in self.registered:
                    mon.register_callback(self.tool_id, event, None)
                mon.free_tool_id(self.tool_id)
            self.tool_id = None
        elif self.backend:
            threading = sys.modules.get("threading")
            if threading is not None:
                if self.mode:
                    threading.setprofile(self.previous_thread_hook)
                else:
                    threading.settrace(self.previous_thread_hook)
            t.uninstall()
        for filename in self.linecache_added:
            linecache.cache.pop(filename, None)


def _send(sock: socket.socket, data: bytes) -> None:
    sock.settimeout(5.0)
    sock.sendall(data)


def _read_control(sock: socket.socket, reader: protocol.FrameReader) -> Optional[List[int]]:
    """Read what made the socket readable: the control frames' types, or None for EOF."""
    sock.settimeout(1.0)
    try:
        data = sock.recv(65536)
    except (socket.timeout, OSError):
        return None
    if not data:
        return None
    try:
        return [ftype for ftype, _ in reader.feed(data)]
    except protocol.FrameError:
        return None


def _pump_until(sock: socket.socket, tracer: Any, reader: protocol.FrameReader,
                tick: Any = None) -> bool:
    """Stream until STOP (True) or until the CLI is gone (False). KEEPALIVEs tell the tracer
    that a CLI which reads slowly is still there. ``tick(final)`` runs after each control frame
    (at least every second: the CLI's KEEPALIVE), and with final=True at STOP."""
    while True:
        if tracer.pump(sock.fileno(), 50, 10000) != 1:
            return False  # the socket failed, or the CLI took nothing and said nothing
        frames = _read_control(sock, reader)
        if frames is None:
            return False
        for ftype in frames:
            if ftype == protocol.STOP:
                if tick is not None:
                    tick(True)  # what ended since the last tick, before the final flush
                return True
            if ftype == protocol.KEEPALIVE:
                tracer.alive()
        if tick is not None:
            tick(False)


def serve(sock: socket.socket, tracer: Any, config: Dict[str, Any]) -> None:
    """Run one session to its end. Called by the bootstrap on the agent's thread."""
    if not _session_lock.acquire(False):
        _send(sock, protocol.encode_json(protocol.ERROR, {
            "message": "another hunter-trace session is already tracing this process"}))
        return
    session = None
    try:
        if tracer is None:
            raise AgentError("no tracer for this Python (%s)" % sys.version.split()[0])
        session = Session(sock, tracer, config)
        _current[:] = [session, sock]
        _install_fork_hook()
        threads = session.install()
        backend = session.backend
        if getattr(tracer, "IMPLEMENTATION", "c") == "python":
            backend = "python-" + backend
        _send(sock, protocol.encode_json(protocol.READY, {
            "backend": backend, "threads": threads, "aliases": session.filter.aliases,
            "missing": session.filter.missing, "suspended": session.suspended,
            "python": list(sys.version_info[:3]), "pid": os.getpid(),
            "greenlets": session.greenlets}))
        reader = protocol.FrameReader(1 << 16)
        graceful = _pump_until(sock, tracer, reader, session.reap_threads)
        if not graceful:
            tracer.abandon()  # nobody will read: threads waiting for room go on at once
        session.uninstall()
        if graceful:
            # Flush what is buffered, as long as the CLI keeps taking it or saying it is alive.
            tracer.stop_pump(True)
            rc = tracer.pump(sock.fileno(), 0, 10000)
            while rc == 1 and _read_control(sock, reader) is not None:
                tracer.alive()
                rc = tracer.pump(sock.fileno(), 0, 10000)
            if rc == 0:
                _send(sock, protocol.encode_json(protocol.BYE, tracer.stats()))
        else:
            _remove_session_dir(config.get("session_dir"))
    except BaseException as exc:  # never into the target
        try:
            if session is not None:
                tracer.abandon()
                session.uninstall()
        except BaseException:
            pass
        try:
            _send(sock, protocol.encode_json(protocol.ERROR, {
                "message": "%s: %s" % (type(exc).__name__, exc)}))
        except BaseException:
            pass
    finally:
        try:
            tracer.reset()
        except BaseException:
            pass
        try:
            sock.close()
        except BaseException:
            pass
        _current[:] = [None, None]
        _session_lock.release()


def _remove_session_dir(path: Any) -> None:
    """The CLI died (SIGKILL): remove what it would have removed, its private directory holding
    the tracer's copy, so nothing stale stays in /tmp."""
    if not isinstance(path, str) or not os.path.basename(path).startswith("hunter-attach-"):
        return
    try:
        for name in os.listdir(path):
            if name == "s" or name.startswith(("_tracer", "_helper")):
                os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except OSError:
        pass


def _install_fork_hook() -> None:
    """A forked child must not keep any of its parent's session: not the tracer, not the
    socket to the parent's CLI, not the lock that says a session is running (the child could
    never be traced itself). os.register_at_fork hooks cannot be removed, so one is installed
    per process and it only acts during a session."""
    global _fork_hook_installed
    if _fork_hook_installed or not hasattr(os, "register_at_fork"):
        return

    def after_in_child() -> None:
        global _session_lock
        session, sock = _current
        _current[:] = [None, None]
        _session_lock = green.allocate_lock()  # the parent's agent thread is not here
        for step in (lambda: session.uninstall() if session is not None else None,
                     lambda: session.tracer.reset() if session is not None else None,
                     lambda: sock.close() if sock is not None else None):
            try:
                step()
            except BaseException:
                pass

    os.register_at_fork(after_in_child=after_in_child)
    _fork_hook_installed = True
