"""The pure-Python twin of ``_tracer.c``: the backend used when no compiled tracer matches the
target's ABI (no compiler, no headers). Shipped into the target as source: standard library only,
CPython 3.8-3.13.

Same module interface as the C module and, event for event, the same records: ``configure``,
``set_active``, ``reset``, ``pump``, ``stop_pump``, ``stats``; ``install``/``uninstall``/
``thread_hook`` on 3.8-3.11 (``BACKEND == "settrace"``); ``mon_configure`` and the
``sys.monitoring`` callbacks ``mon_start``/``mon_throw``/``mon_return``/``mon_unwind``/
``mon_raise``/``mon_line``/``mon_jump`` on 3.12+ (``BACKEND == "monitoring"``); plus
``IMPLEMENTATION = "python"``. The per-code cache (``decide`` once per code object), the
per-thread state (depth, calls, ``on_thread``), the postfix program (compiled here to a Python
function that evaluates every op in order, as C does), the record layout, the bounded double
buffer with its drop, lossless and dead modes, the depth rules and the line numbers are the C
module's; see its comments and docs/internals.md. tests/test_pytracer.py compares the two on
every interpreter.

The settrace backend (3.8-3.11)
-------------------------------
The C module installs a C function with ``PyEval_SetTrace``, which sees every event of every
frame. Here the trace function is a Python function installed with ``sys.settrace``
(``sys.setprofile`` in profile mode), and CPython delivers only 'call' events to it, every other
event to the frame's ``f_trace``. So the global function returns the local one for *every*
frame (depth must drop on every return, as in C) and, like C, turns ``f_trace_lines`` off where
no line event can match; frames already running when tracing starts (and, in a thread started
through ``threading``, the frames under its first call) get the local function as ``f_trace``.
Line numbers: C reads the ``f_lineno`` field on 3.8-3.10 in settrace mode (CPython keeps it
current while a trace function is set). ``frame.f_lineno`` returns that field on 3.8/3.9 only
while the frame has an ``f_trace``, and setting ``f_trace`` overwrites it, so there the field is
read and kept through ctypes where it matters (see ``_mark``).

Python offers no way to set *another* thread's trace function before 3.12: pdb, and pydevd
without its compiled helper, reach the current thread and threads started later through
``threading.settrace`` only. pydevd's helper does what the C module does: make the other
thread's state current with ``PyThreadState_Swap`` and set the function there. This module does
the same through ``ctypes.pythonapi`` (standard library, no compiler). No bytecode may run while
another thread's state is current (a GIL hand-off then aborts the interpreter: "tstate mix-up"),
and a thread state must not be used after the GIL was released (its thread may have exited). So
the walk over the thread states and every swap, ``sys.gettrace()``, ``sys.settrace()`` and swap
back happen inside one ``list()`` call over C iterators (``map``, ``zip``, ``tee``,
``takewhile``, ``functools.partial``): no bytecode runs and the GIL is held throughout, as in the
C loop.

Differences from the C module, all on the settrace backend (3.8-3.11):

- A thread that already has a trace function (settrace mode) or profile function (profile mode)
  when the session starts is left alone and not traced. C replaces it for the session and
  restores it; from Python only the function's object is visible, and reinstalling that object
  with ``sys.settrace`` would not restore a C-level tracer (line_profiler's, say) faithfully.
- Without ctypes (or with ``CROSS_THREAD = False``), ``install`` reaches the calling thread only,
  and the agent excludes its own thread: threads that exist when the session starts are not
  traced at all; threads started afterwards through ``threading`` are, exactly as with C.
  Without ctypes on 3.8/3.9, an event of a frame that was running before tracing reached it,
  before the frame starts another line, reports that frame's current line where C reports the
  stale ``f_lineno`` field (often the ``def`` line).
- An ``exclude_ident`` other than the calling thread's (the agent always passes its own) is
  honoured lazily: that thread drops the tracer at its first event.
- ``sys.gettrace()``/``sys.getprofile()`` show the function ``hunter_attach_tracer``/
  ``hunter_attach_profiler``, not the C module's marker string.
- A frame whose event was being handled while the session ended may keep ``f_trace`` set to
  ``hunter_attach_local`` (so may suspended generators). With no trace function on the thread
  CPython never calls it; under another tracer it clears itself at its first call.
- Residual risks: a Python audit hook on ``sys.settrace`` runs while another thread's state is
  current (C: the same); a thread state that holds a pending exception while it waits for the
  GIL makes ctypes report an error after the swap, which is undone at once.

On both backends: a KeyboardInterrupt (any BaseException) raised inside the tracer, typically by
a signal handler that ran while the tracer did, propagates into the target's code as it would
without tracing (on settrace CPython then removes that thread's tracer); C swallows those that
happen inside the agent's callbacks. Argument texts are always the agent's ``fmt`` output; C
makes those of builtin scalars itself, with the same text except that its call-argument JSON
keeps non-ASCII characters unescaped (the same JSON value).

The monitoring backend (3.12+) is a port: ``sys.monitoring`` callbacks are plain Python
functions and get the same arguments as the C ones. Neither ``sys.settrace`` nor
``sys.monitoring`` re-enters a callback while one runs, so the agent's Python code (decide,
on_thread, fmt, pypred) is never traced, as with C.

Speed: every event costs a Python call. A matched event costs about 1-3 us (C: 0.1-0.2 us); code
that never matches costs two calls per call on 3.8-3.11 and nothing on 3.12+ once disabled.
"""

from __future__ import annotations

import _socket
import array
import errno
import os
import select
import socket
import sys
from functools import partial
from itertools import chain, repeat, starmap, takewhile, tee
from operator import methodcaller
from time import monotonic_ns
from typing import Any, Callable, Dict, List, Optional, Tuple
from weakref import ref as _weakref

from . import green, protocol

IMPLEMENTATION = "python"
_MONITORING = sys.version_info >= (3, 12)
BACKEND = "monitoring" if _MONITORING else "settrace"
#: 3.8-3.11: reach threads other than the caller through ctypes (see the module docstring).
CROSS_THREAD = True

K_CALL, K_LINE, K_RETURN, K_EXCEPTION = protocol.CALL, protocol.LINE, protocol.RETURN, \
    protocol.EXCEPTION
STACK_MAX = 64
_U64 = 1 << 64
_I64_MIN = 1 << 63

_pack_event = protocol.EVENT.pack_into
_pack_u32 = protocol.U32.pack_into
_pack_drop = protocol.DROP.pack_into
_EVENT_SIZE = protocol.EVENT.size
_DROP_SIZE = protocol.DROP.size
_REC_EVENT = protocol.REC_EVENT
_REC_DROP = protocol.REC_DROP
_FLAG_ARG = protocol.FLAG_ARG
_FLAG_HIDDEN = protocol.FLAG_HIDDEN
_HIDDEN_RETURNS = 1 << protocol.HIDDEN_RETURNS
_FRAME_HEADER = protocol.FRAME_HEADER
_RECORDS = protocol.RECORDS
_REPR_FAILED = b"<repr failed>"
_SEND_FLAGS = getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0)
# The real primitives even under gevent or eventlet (green.py): OS threads, their idents, locks
# that hold no hub, sockets and poll that never switch greenlets.
_get_ident = green.get_ident
_allocate_lock = green.allocate_lock
_poll = green.original("select", "poll") or select.poll
_getframe = sys._getframe
_GLOBALS = globals()

# ---- session state (the C module's globals) ---------------------------------------------------
_active = False
_detached = True  # no install()ed session: a tracer that still gets called removes itself
_generation = 0
_t0 = 0
_main_ident = 0
_decide: Any = None
_on_thread: Any = None
_fmt: Any = None
_pypred: Any = None
# id(code) -> [code, code_id, kinds, program or None]. The entry keeps the
# code object alive, so its id is not reused while cached (the C cache holds a reference too).
_cache: Dict[int, List[Any]] = {}
_programs: Dict[bytes, Callable[..., bool]] = {}
_tls = green.local()
_mode = 0  # settrace backend: 0 settrace, 1 setprofile
_exclude: Optional[int] = None  # a thread other than install()'s caller to keep out


class _State:
    """Per-thread state; a thread's first event of a session resets it (gen differs)."""

    __slots__ = ("gen", "tid", "skip", "depth", "calls", "ident")

    def __init__(self) -> None:
        self.gen = 0
        self.tid = 0
        self.skip = 1  # 0 traced, 1 not traced, 2 not ours (settrace: another global tracer)
        self.depth = 0
        self.calls = 0
        self.ident = 0


def _new_state() -> _State:
    st = _tls.s = _State()
    return st


# ---- the double buffer ------------------------------------------------------------------------
# Producers (traced threads) append to _fill under _mu; pump() swaps it with _spare and sends the
# spare without holding _mu. _thread locks only: this module must not import threading.
_mu = _allocate_lock()
_data_waiters: List[Any] = []  # pump() waiting for records
_space_waiters: List[Any] = []  # producers waiting for room (lossless mode)
_fill: Any = None  # bytearray of _cap bytes, or None without a session
_spare: Any = None
_cap = 0
_len = 0
_drop_mode = False
_stop = False
_finished = False  # pump() flushed for the last time: the session takes no more events
_dead = False
_sent = 0  # seen = sent + dropped, as in C where both count every event that gets this far
_dropped = 0
_pending_drop = 0
_block_ns = 0


def _after_fork_in_child() -> None:
    """In a forked child only the forking thread exists: _mu, if another thread held it at the
    fork, would stay held for ever, and the waiters are not there. (The agent's own fork hook,
    registered later, runs after this one and resets the session.)"""
    global _mu
    _mu = _allocate_lock()
    del _data_waiters[:]
    del _space_waiters[:]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _wait(waiters: List[Any], timeout: float) -> None:
    """Condition wait on _mu (held): release it, sleep until notified or timeout, retake it."""
    w = _allocate_lock()
    w.acquire()
    waiters.append(w)
    _mu.release()
    try:
        if timeout > 0:
            w.acquire(True, timeout)
    finally:
        _mu.acquire()
        try:
            waiters.remove(w)
        except ValueError:
            pass


def _notify(waiters: List[Any]) -> None:
    for w in waiters:
        try:
            w.release()
        except RuntimeError:
            pass
    del waiters[:]


def _reserve(n: int) -> int:
    """Room for n bytes in _fill: its offset, or -1 when the record must be dropped. Called with
    _mu held; may release it while waiting for room (lossless mode)."""
    global _dead, _len, _pending_drop
    if n > _cap or _finished:
        return -1
    if _len + n > _cap and not _drop_mode and not _dead:
        start = monotonic_ns()
        while _len + n > _cap and not _dead and not _finished:
            _notify(_data_waiters)
            _wait(_space_waiters, 0.05)  # 50 ms slices, so that a dead consumer is noticed
            if monotonic_ns() - start >= _block_ns:
                _dead = True
    if _len + n > _cap or _finished:
        return -1
    if _pending_drop:
        if _len + _DROP_SIZE + n > _cap:
            return -1
        _pack_drop(_fill, _len, _REC_DROP, _pending_drop)
        _len += _DROP_SIZE
        _pending_drop = 0
    pos = _len
    if pos == 0 and _data_waiters:
        _notify(_data_waiters)
    _len = pos + n
    return pos


def _append_meta(data: bytes) -> None:
    """A CODE or THREAD record made by the agent. Never dropped silently: without it the CLI
    cannot decode later events, so drop mode waits for room like lossless mode."""
    global _drop_mode
    n = len(data)
    with _mu:
        pos = _reserve(n)
        if pos < 0 and _drop_mode and not _dead:
            _drop_mode = False
            try:
                pos = _reserve(n)
            finally:
                _drop_mode = True
        if pos >= 0 and _fill is not None:
            _fill[pos:pos + n] = data


def _emit(tid: int, kind: int, code_id: int, lineno: int, depth: int,
          data: Optional[bytes], hidden: bool = False) -> None:
    """An EVENT record. A hidden one (protocol.py) has no argument and is not counted, not even
    when it finds no room in drop mode."""
    global _sent, _dropped, _pending_drop, _len
    ts = monotonic_ns() - _t0
    if ts < 0:
        ts = 0
    n = _EVENT_SIZE if data is None else _EVENT_SIZE + 4 + len(data)
    with _mu:
        if _finished:  # an event in flight when the session ended: it is not part of it
            return
        pos = _len
        if _pending_drop or pos + n > _cap:
            pos = _reserve(n)
            if pos < 0:
                if not _finished and not hidden:
                    _dropped += 1
                    _pending_drop += 1
                return
        else:
            if pos == 0 and _data_waiters:
                _notify(_data_waiters)
            _len = pos + n
        buf = _fill
        if data is None:
            _pack_event(buf, pos, _REC_EVENT, kind, _FLAG_HIDDEN if hidden else 0, tid, code_id,
                        lineno if lineno > 0 else 0, depth, ts)
            if hidden:
                return
        else:
            _pack_event(buf, pos, _REC_EVENT, kind, _FLAG_ARG, tid, code_id,
                        lineno if lineno > 0 else 0, depth, ts)
            _pack_u32(buf, pos + _EVENT_SIZE, len(data))
            buf[pos + _EVENT_SIZE + 4:pos + n] = data  # type: ignore[index]
        _sent += 1


# ---- programs (docs/internals.md) ---------------------------------------------------------------
_FIELDS = ("depth", "lineno", "calls", "tid")
_CMPS = ("==", "!=", "<", "<=", ">", ">=")


def _py(index: int, frame: Any, kind: int, arg: Any, depth: int, calls: int) -> bool:
    """A PY op: the agent's pypred. A failing or odd answer is false, as in C."""
    try:
        return bool(_pypred(index, frame, kind, arg, depth, calls))
    except Exception:
        return False


def _compile(ops: List[int]) -> Callable[..., bool]:
    """The postfix program as a Python function ``(kind, depth, lineno, calls, tid, frame, arg)``
    that evaluates every op in order, as the C interpreter does (PY ops have side effects, so
    there is no short-circuit), and returns False where C finds the program malformed. Only ints
    from the program reach the generated source."""
    body: List[str] = []
    sp = 0
    p = 0
    end = len(ops)
    ok = True

    def field(f: int) -> str:
        return _FIELDS[f] if 0 <= f < len(_FIELDS) else "0"

    while p < end:
        op = ops[p]
        p += 1
        if op in (0, 1):  # TRUE, FALSE
            if sp >= STACK_MAX:
                ok = False
                break
            body.append("s%d = %s" % (sp, "True" if op == 0 else "False"))
            sp += 1
        elif op in (2, 3):  # AND, OR
            if sp < 2:
                ok = False
                break
            sp -= 1
            body.append("s%d = s%d %s s%d" % (sp - 1, sp - 1, "and" if op == 2 else "or", sp))
        elif op == 4:  # NOT
            if sp < 1:
                ok = False
                break
            body.append("s%d = not s%d" % (sp - 1, sp - 1))
        elif op == 5:  # KIND mask
            if p >= end or sp >= STACK_MAX:
                ok = False
                break
            body.append("s%d = ((1 << kind) & %d) != 0" % (sp, ops[p]))
            p += 1
            sp += 1
        elif op == 6:  # CMP field cmp value
            if end - p < 3 or sp >= STACK_MAX:
                ok = False
                break
            f, c, v = ops[p], ops[p + 1], ops[p + 2]
            p += 3
            if 0 <= c < len(_CMPS):
                body.append("s%d = %s %s %d" % (sp, field(f), _CMPS[c], v))
            else:
                body.append("s%d = False" % sp)
            sp += 1
        elif op == 7:  # IN field n v1..vn
            if end - p < 2 or sp >= STACK_MAX:
                ok = False
                break
            f, count = ops[p], ops[p + 1]
            p += 2
            if count < 0 or end - p < count:
                ok = False
                break
            values = tuple(int(v) for v in ops[p:p + count])
            p += count
            body.append("s%d = %s in %r" % (sp, field(f), values))
            sp += 1
        elif op == 8:  # PY index
            if p >= end or sp >= STACK_MAX:
                ok = False
                break
            body.append("s%d = _py(%d, frame, kind, arg, depth, calls)" % (sp, ops[p]))
            p += 1
            sp += 1
        else:
            ok = False
            break
    body.append("return s0" if ok and sp == 1 else "return False")
    source = "def program(kind, depth, lineno, calls, tid, frame, arg):\n    " + \
        "\n    ".join(body) + "\n"
    namespace: Dict[str, Any] = {"_py": _py}
    exec(compile(source, "<hunter_attach program>", "exec"), namespace)
    return namespace["program"]  # type: ignore[no-any-return]


def _program(prog: Any) -> Callable[..., bool]:
    view = memoryview(prog)
    if not view.c_contiguous:
        raise BufferError("program is not contiguous")
    raw = view.tobytes()
    fn = _programs.get(raw)
    if fn is None:
        ops = array.array("q")
        ops.frombytes(raw[:len(raw) // 8 * 8])
        fn = _programs[raw] = _compile(ops.tolist())
    return fn


# ---- code cache, threads, events --------------------------------------------------------------
def _lookup(code: Any, frame: Any) -> List[Any]:
    """Ask the agent about a code object once. decide(code, frame) returns None (never matches)
    or (code_id, kinds, program bytes or None, CODE record bytes[, parameters]). The parameters
    serve the C module's own reprs; here fmt makes every argument text. A failing callback or an
    odd answer counts as "never": tracing must not break the target."""
    try:
        r = _decide(code, frame)
    except Exception:
        r = None
    e: List[Any] = [code, 0, 0, None]
    if r is not None:
        try:
            if not isinstance(r, tuple) or len(r) not in (4, 5):
                raise TypeError("decide() must return a 4- or 5-tuple")
            code_id, kinds, prog, meta = r[:4]
            if not isinstance(code_id, int) or not isinstance(kinds, int):
                raise TypeError("code id and kinds must be ints")
            fn = None if prog is None else _program(prog)
            e[1] = code_id & 0xFFFFFFFF
            e[2] = kinds & 0xFFFFFFFF
            e[3] = fn
            if isinstance(meta, bytes):
                _append_meta(meta)
        except Exception:
            e[1:] = [0, 0, None]
    # Published only once complete (deciding and _append_meta let other threads run, and a
    # half-made entry reads as "never matches"); if another thread decided meanwhile, its
    # entry stands.
    return _cache.setdefault(id(code), e)


def _enter(st: _State) -> bool:
    """First event of this thread in this session: the agent names it (THREAD record), tells us
    to skip it (its own thread: None), or to ask again at its next event (False)."""
    st.gen = _generation
    st.depth = 0
    st.calls = 0
    st.skip = 1
    ident = _get_ident()
    st.ident = -1 if ident == _main_ident else (ident - _U64 if ident >= _I64_MIN else ident)
    if not _MONITORING:
        if ident == _exclude:
            _remove_self()
            return False
        if _mode == 0 and sys.gettrace() is not hunter_attach_tracer:
            st.skip = 2  # a frame we marked in a thread that has another tracer: hands off
            return False
    if _gl_enabled:
        _gl_hook_thread()
    try:
        # with greenlets, the agent names the greenlet, not the thread
        current = _gl_current(_tls.gl) if _gl_enabled else None
        r = _on_thread(current) if current is not None else _on_thread()
    except Exception:
        return False
    if r is False:
        st.gen = 0  # not ready to be named yet (a thread still starting): ask again
        return False
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], int):
        st.tid = r[0] & 0xFFFFFFFF
        st.skip = 0
        if isinstance(r[1], bytes):
            _append_meta(r[1])
    return not st.skip


# ---- greenlets as pseudo-threads (the C module's gl_* functions; see _tracer.c) ---------------
# On every greenlet switch greenlet_switch() saves the thread's _State for the greenlet left
# and puts back the entered one's, or a fresh one that its next event names through
# on_thread(greenlet). greenlet's trace function is per OS thread and only the thread itself
# can set it: the hook goes on at a thread's first event of a session and comes off at that
# thread's next switch after the session ends.
_gl_enabled = False
_gl_functions: Any = None  # greenlet's (getcurrent, settrace, gettrace); kept after a session
_gl_exclude = 0  # the agent's thread: never hooked
_gl_every = False  # hook every traced thread (gevent, eventlet loaded)
_gl_parent: Any = None  # greenlet.greenlet's own "parent" and "dead" descriptors (C getters)
_gl_dead: Any = None
# id(greenlet) -> (weak reference, its saved _State): the reference tells a live greenlet from
# a new one at a dead one's address.
_gl_states: Dict[int, Tuple[Any, _State]] = {}
_gl_sweep_at = 64


class _GlThread:
    """This thread's hook: the session it belongs to, the function it replaced, the greenlet
    running now (weakly)."""

    __slots__ = ("gen", "prev", "hooked", "cur")

    def __init__(self) -> None:
        self.gen = 0
        self.prev: Any = None
        self.hooked = False
        self.cur: Any = None


def _gl_thread() -> _GlThread:
    try:
        return _tls.gl  # type: ignore[no-any-return]
    except AttributeError:
        gl = _tls.gl = _GlThread()
        return gl


def _gl_current(gl: _GlThread) -> Any:
    return gl.cur() if gl.cur is not None and gl.gen == _generation else None


def _gl_hook_thread() -> None:
    """A thread's first event of the session: learn which greenlet runs now and put our switch
    hook on the thread if it runs greenlets (see _tracer.c). Only greenlet's C functions run."""
    gl = _gl_thread()
    if gl.gen == _generation:
        return
    gl.gen = _generation
    gl.cur = None
    if _get_ident() == _gl_exclude:
        return
    getcurrent, settrace, gettrace = _gl_functions
    try:
        current = getcurrent()
        main = _gl_parent is None or _gl_parent.__get__(current, type(current)) is None
        if main and not _gl_every and not gl.hooked:
            return
        if not gl.hooked:
            previous = gettrace()
            settrace(greenlet_switch)
            gl.prev = previous
            gl.hooked = True
        # else ours is still on from an earlier session, directly or in the chain of a
        # function put over it: it gets every switch as it is, and gl.prev stays
        gl.cur = _weakref(current)
        if not main:
            # In a greenlet other than the thread's main one at the thread's first event: what
            # is under the event's frame was on its stack before attach (see _tracer.c).
            frame: Any = _getframe(1)
            while frame is not None and frame.f_globals is _GLOBALS:
                frame = frame.f_back  # our own callers: the monitoring callback
            _gl_note_stack(frame.f_back if frame is not None else None)
    except Exception:
        pass


def _gl_note_stack(frame: Any) -> None:
    """Walk mode: frame and those under it were on the stack before attach."""
    if _MONITORING and _walk and _preexisting is not None:
        while frame is not None:
            _preexisting.add(frame)
            frame = frame.f_back


def _gl_unhook(gl: _GlThread) -> None:
    """Put the previous function back, unless another one went on over ours (it may call ours
    as its previous one: then ours keeps passing through to gl.prev)."""
    try:
        if _gl_functions[2]() is not greenlet_switch:
            return
        _gl_functions[1](gl.prev)
    except Exception:
        return
    gl.prev = gl.cur = None
    gl.hooked = False


def _gl_switched(origin: Any, target: Any) -> None:
    global _gl_sweep_at
    try:
        st = _tls.s
    except AttributeError:
        st = None
    if _gl_dead is not None and _gl_dead.__get__(origin, type(origin)) is True:
        if st is not None and st.gen == _generation and not st.skip:
            # its pseudo-thread ended: the CLI forgets it
            _append_meta(protocol.THREAD_END.pack(protocol.REC_THREAD_END, st.tid))
    elif st is not None:  # even unnamed: the greenlet has been seen (see the walk-mode note)
        if len(_gl_states) >= _gl_sweep_at:
            for key in [k for k, (ref, _) in _gl_states.items() if ref() is None]:
                del _gl_states[key]
            _gl_sweep_at = max(64, 2 * len(_gl_states))
        try:
            _gl_states[id(origin)] = (_weakref(origin), st)
        except TypeError:
            pass
    gl = _tls.gl
    gl.cur = _weakref(target)
    saved = _gl_states.get(id(target))
    if saved is not None and saved[0]() is target:
        _tls.s = saved[1]
        return
    _tls.s = _State()  # its first event names it
    # Walk mode, a greenlet entered for the first time this session: what is on its stack was
    # there before attach (a new greenlet's stack is empty), see _tracer.c.
    try:
        _gl_note_stack(_getframe(2))  # under us and greenlet_switch: the entered greenlet's
    except ValueError:
        pass


def greenlet_switch(event: Any, args: Any) -> None:
    """greenlet.settrace() callback. A previous function is called after us, as greenlet
    would have, its errors included."""
    gl = _gl_thread()
    prev = gl.prev
    if not gl.hooked:
        pass
    elif not _active or gl.gen != _generation or not _gl_enabled:
        _gl_unhook(gl)  # this thread's session is over: hand it back
    elif type(args) is tuple and len(args) == 2:
        _gl_switched(args[0], args[1])
    if prev is not None:
        prev(event, args)


def greenlets(getcurrent: Any, settrace: Any = None, gettrace: Any = None,
              exclude_ident: int = 0, greenlet_type: Any = None, every_thread: Any = False
              ) -> None:
    """greenlets(getcurrent, settrace, gettrace, agent_ident, greenlet.greenlet, every_thread)
    or greenlets(None)."""
    global _gl_enabled, _gl_functions, _gl_exclude, _gl_parent, _gl_dead, _gl_every
    if getcurrent is None:
        _gl_enabled = False
        return
    if not (callable(getcurrent) and callable(settrace) and callable(gettrace)):
        raise TypeError("greenlets(getcurrent, settrace, gettrace, ident)")
    _gl_functions = (getcurrent, settrace, gettrace)
    _gl_exclude = exclude_ident
    _gl_every = bool(every_thread)
    descriptors = vars(greenlet_type) if isinstance(greenlet_type, type) else {}
    _gl_parent = descriptors.get("parent")
    _gl_dead = descriptors.get("dead")
    _gl_enabled = True


def _on_event(st: _State, e: List[Any], frame: Any, kind: int, lineno: int, arg: Any) -> None:
    prog = e[3]
    if prog is not None and not prog(kind, st.depth, lineno, st.calls, st.ident, frame, arg):
        if kind == K_RETURN and e[2] & _HIDDEN_RETURNS:
            _emit(st.tid, kind, e[1], lineno, st.depth, None, True)
        return
    if kind == K_LINE or _fmt is None:
        _emit(st.tid, kind, e[1], lineno, st.depth, None)
        return
    try:
        s = _fmt(kind, frame, arg)
        data = str.encode(s, "utf-8") if isinstance(s, str) else _REPR_FAILED
    except Exception:
        data = _REPR_FAILED
    _emit(st.tid, kind, e[1], lineno, st.depth, data)


if sys.version_info < (3, 10):
    # C reads the f_lineno field of a frame on 3.8/3.9 in settrace mode (see _line). From Python,
    # frame.f_lineno returns that field only while the frame has an f_trace, and setting f_trace
    # overwrites the field with the line of f_lasti. So where the field matters and f_trace is
    # not set, it is read (and, when we set f_trace, put back) through ctypes at the offset that
    # _lineno_offset() finds on a probe frame. It is stale (often co_firstlineno) in frames that
    # were not traced at their last line start, and that is what C reports for them.
    _lineno_at: List[Any] = []

    def _lineno_offset() -> Any:
        """(ctypes.c_int, offset of PyFrameObject.f_lineno) or None when it cannot be found."""
        if not _lineno_at:
            found = None
            try:
                import ctypes

                def probe() -> Any:
                    yield None

                gen = probe()
                next(gen)
                frame = gen.gi_frame
                frame.f_trace = hunter_attach_local  # stores the line of f_lasti in the field
                line, lasti = frame.f_lineno, frame.f_lasti
                frame.f_trace = None
                at = ctypes.c_int.from_address
                base = id(frame)
                hits = [off for off in range(16, type(frame).__basicsize__ - 4, 4)
                        if at(base + off).value == lasti and at(base + off + 4).value == line]
                if len(hits) == 1 and line != lasti:
                    found = (ctypes.c_int, hits[0] + 4)
            except Exception:
                pass
            _lineno_at.append(found)
        return _lineno_at[0]

    def _mark(frame: Any) -> None:
        """Give a running frame our f_trace, keeping its f_lineno field as C would see it."""
        if frame.f_trace is not None:
            return
        field = _lineno_offset()
        if field is None:
            frame.f_trace = hunter_attach_local
            return
        lineno = field[0].from_address(id(frame) + field[1])
        old = lineno.value
        frame.f_trace = hunter_attach_local
        lineno.value = old

    def _line(frame: Any) -> int:
        """C's frame_line(): in settrace mode the f_lineno field, which CPython keeps up to date
        while a trace function is set; PyFrame_GetLineNumber() otherwise."""
        if _mode == 0 and frame.f_trace is None:
            field = _lineno_offset()
            if field is not None:
                return field[0].from_address(id(frame) + field[1]).value  # type: ignore
            frame.f_trace = hunter_attach_local  # without ctypes: the line of f_lasti
            line = frame.f_lineno
            frame.f_trace = None
            return line  # type: ignore[no-any-return]
        return frame.f_lineno  # type: ignore[no-any-return]
else:
    def _mark(frame: Any) -> None:
        """Give a running frame our f_trace."""
        if frame.f_trace is None:
            frame.f_trace = hunter_attach_local

    def _line(frame: Any) -> int:
        """PyFrame_GetLineNumber(), which 3.10 and 3.11 also use in settrace mode (3.10 sets
        the f_lineno field before calling any trace function)."""
        line = frame.f_lineno
        return -1 if line is None else line  # type: ignore[no-any-return]


# ---- settrace / profile backend (3.8-3.11) ------------------------------------------------------
def hunter_attach_tracer(frame: Any, event: str, arg: Any) -> Any:
    """The sys.settrace() function: CPython calls it for 'call' events only."""
    if not _active:
        if _detached:
            _remove_self()
            return None
        return hunter_attach_local
    try:
        st = _tls.s
    except AttributeError:
        st = _new_state()
    if st.gen == _generation:
        if st.skip:
            return hunter_attach_local
    elif not _enter(st):
        return hunter_attach_local
    code = frame.f_code
    e = _cache.get(id(code)) or _lookup(code, frame)
    if not (e[1] and e[2] & 2):
        frame.f_trace_lines = False  # no line event of this frame can match
    if e[1] and e[2] & 1:
        _on_event(st, e, frame, K_CALL, _line(frame), None)
    st.depth += 1
    st.calls += 1
    return hunter_attach_local


def hunter_attach_local(frame: Any, event: str, arg: Any) -> Any:
    """Every frame's f_trace: line, return and exception events."""
    if not _active or _mode:
        if _detached or _mode:
            frame.f_trace = None
            return None
        return hunter_attach_local
    try:
        st = _tls.s
    except AttributeError:
        st = _new_state()
    if st.gen == _generation:
        if st.skip:
            if st.skip == 2:
                frame.f_trace = None
                return None
            return hunter_attach_local
    elif not _enter(st):
        if st.skip == 2:
            frame.f_trace = None
            return None
        return hunter_attach_local
    if event == "line":
        kind = K_LINE
    elif event == "return":
        kind = K_RETURN
        if st.depth > 0:
            st.depth -= 1
    elif event == "exception":
        kind = K_EXCEPTION
    else:
        return hunter_attach_local
    code = frame.f_code
    e = _cache.get(id(code)) or _lookup(code, frame)
    if e[1] and (e[2] >> kind) & 1:
        # f_trace is set (we are it), so even 3.8/3.9 return the f_lineno field (see _line)
        line = frame.f_lineno
        if line is None:
            line = -1
        if e[3] is None and (kind == K_LINE or _fmt is None):
            _emit(st.tid, kind, e[1], line, st.depth, None)  # the common case, inlined
        else:
            _on_event(st, e, frame, kind, line, arg)
    return hunter_attach_local


def hunter_attach_profiler(frame: Any, event: str, arg: Any) -> None:
    """The sys.setprofile() function (profile mode: calls and returns only)."""
    if not _active:
        if _detached:
            _remove_self()
        return
    try:
        st = _tls.s
    except AttributeError:
        st = _new_state()
    if st.gen == _generation:
        if st.skip:
            return
    elif not _enter(st):
        return
    if event == "call":
        code = frame.f_code
        e = _cache.get(id(code)) or _lookup(code, frame)
        if e[1] and e[2] & 1:
            _on_event(st, e, frame, K_CALL, _line(frame), None)
        st.depth += 1
        st.calls += 1
    elif event == "return":
        if st.depth > 0:
            st.depth -= 1
        code = frame.f_code
        e = _cache.get(id(code)) or _lookup(code, frame)
        if e[1] and e[2] & 4:
            _on_event(st, e, frame, K_RETURN, _line(frame), arg)


def _functions() -> Tuple[Any, Callable[[], Any], Callable[[Any], None]]:
    if _mode == 1:
        return hunter_attach_profiler, sys.getprofile, sys.setprofile
    return hunter_attach_tracer, sys.gettrace, sys.settrace


def _remove_self() -> None:
    """Take our function off the current thread (a thread that must not or no longer be traced).
    We only ever install where there was no function, so there is nothing to restore."""
    for getter, setter in ((sys.gettrace, sys.settrace), (sys.getprofile, sys.setprofile)):
        if getter() in (hunter_attach_tracer, hunter_attach_profiler):
            setter(None)


def thread_hook(frame: Any, event: str, arg: Any) -> Any:
    """threading.settrace()/setprofile() hook for threads started while we trace: the first call
    in the new thread lands here; we put our function in place and handle that event."""
    func, _, setter = _functions()
    setter(func if _active else None)
    if _active and event == "call":
        if _mode == 0:
            # the frames below (threading's _bootstrap_inner...): C gets their events too
            back = frame.f_back
            while back is not None:
                _mark(back)
                back = back.f_back
        return func(frame, event, arg)
    return None


class _Api:
    """ctypes access to the thread states (3.8-3.11). Only PYFUNCTYPE prototypes of our own:
    they hold the GIL during the call and leave ctypes.pythonapi's attributes untouched."""

    def __init__(self) -> None:
        import ctypes

        ptr = ctypes.c_void_p
        proto = ctypes.PYFUNCTYPE
        lib = ctypes.pythonapi
        self.get = proto(ptr)(("PyThreadState_Get", lib))
        self.swap = proto(ptr, ptr)(("PyThreadState_Swap", lib))
        self.head = proto(ptr, ptr)(("PyInterpreterState_ThreadHead", lib))
        self.next = proto(ptr, ptr)(("PyThreadState_Next", lib))
        if sys.version_info >= (3, 9):
            self.interp = proto(ptr, ptr)(("PyThreadState_GetInterpreter", lib))
        else:  # 3.8's PyThreadState starts with prev, next, interp
            offset = 2 * ctypes.sizeof(ptr)
            self.interp = lambda ts: ptr.from_address(ts + offset).value

    def apply(self, getter: Callable[[], Any], by_key: Dict[Any, Any],
              by_current: Dict[int, Any]) -> Tuple[int, List[Tuple[Any, ...]]]:
        """For every thread state ts of this interpreter: make it current, read getter(), call
        ``by_key.get((ts, id(current)), by_current.get(id(current), noop))()``, swap back.

        Everything happens inside one list() call over C iterators: no bytecode runs, so the GIL
        is never released and no thread state can go away or change underneath (see the module
        docstring). Returns our thread state and (ts, _, id(previous function), _, _) per
        thread."""
        me = self.get()
        interp = self.interp(me)
        states: List[Any] = []
        walk = chain(
            map(states.append, starmap(self.head, ((interp,),))),
            map(states.append, takewhile(bool, map(self.next, iter(states)))),
        )
        cur_a, cur_b, cur_c = tee(map(id, starmap(getter, repeat(()))), 3)
        actions = map(by_key.get, zip(iter(states), cur_a),
                      map(by_current.get, cur_b, repeat(bool)))
        steps = zip(iter(states), map(self.swap, iter(states)), cur_c,
                    map(methodcaller("__call__"), actions), starmap(self.swap, repeat((me,))))
        try:
            out = list(chain(walk, steps))
        except BaseException:
            self.swap(me)  # an error while another state was current: be ourselves again first
            raise
        return me, [t for t in out if t is not None]


_api_cache: List[Any] = []


def _api() -> Optional[_Api]:
    if not _api_cache:
        try:
            _api_cache.append(_Api() if not _MONITORING else None)
        except Exception:
            _api_cache.append(None)
    return _api_cache[0] if CROSS_THREAD else None


def _mark_frames(skip: Tuple[Optional[int], ...]) -> None:
    """f_trace on the running frames of every thread but `skip`, so that their line, return and
    exception events arrive as they do with the C module (which gets every frame's events)."""
    for ident, top in sys._current_frames().items():
        if ident in skip:
            continue
        frame: Any = top
        while frame is not None:
            _mark(frame)
            frame = frame.f_back


def install(mode: int, exclude_ident: int) -> int:
    """Trace every thread but exclude_ident (settrace, or setprofile when mode is 1). Returns
    the number of threads that got the tracer."""
    global _mode, _exclude, _detached
    mode = int(mode)
    exclude_ident = int(exclude_ident)
    _mode = 1 if mode == 1 else 0
    _detached = False
    func, getter, setter = _functions()
    me = _get_ident()
    _exclude = exclude_ident if exclude_ident != me else None
    api = _api()
    if api is None:
        if exclude_ident == me or getter() is not None:
            return 0
        if _mode == 0:
            frame: Any = _getframe()
            while frame is not None:
                _mark(frame)
                frame = frame.f_back
        setter(func)
        return 1
    skip = (exclude_ident, me) if exclude_ident == me else (exclude_ident,)
    if _mode == 0:
        _mark_frames(skip)
    none = id(None)
    me_ts = api.get()
    by_key = {(me_ts, none): bool} if exclude_ident == me else {}
    _, records = api.apply(getter, by_key, {none: partial(setter, func)})
    if _mode == 0:
        _mark_frames(skip)  # frames pushed between the first pass and the install
    count = sum(1 for r in records if r[2] == none and (r[0] != me_ts or exclude_ident != me))
    if _exclude is not None and _exclude in sys._current_frames():
        count -= 1
    return max(count, 0)


def uninstall() -> int:
    """Remove our function from every thread that still has it. Returns how many had it."""
    global _exclude, _detached
    _detached = True
    func, getter, setter = _functions()
    api = _api()
    removed = 0
    if api is None:
        if getter() is func:
            setter(None)
            removed = 1
    else:
        _, records = api.apply(getter, {}, {id(func): partial(setter, None)})
        removed = sum(1 for r in records if r[2] == id(func))
    for top in sys._current_frames().values():
        frame: Any = top
        while frame is not None:
            if frame.f_trace is hunter_attach_local:
                frame.f_trace = None
            frame = frame.f_back
    _exclude = None
    return removed


# ---- sys.monitoring backend (3.12+) -------------------------------------------------------------
# The agent registers these with sys.monitoring.register_callback(). Two ways to know depth (see
# the C module):
#
# - counting (queries that use `calls` or From): every PY_START/PY_RESUME/PY_THROW opens a level
#   and every PY_RETURN/PY_YIELD/PY_UNWIND closes one, exactly as settrace counts;
# - walking (everything else): code that can never match gets DISABLE on its first event; a
#   matched event's depth is the number of its frame's ancestors entered after attach, found by
#   walking f_back up to a frame that was on a stack at attach or a thread's bootstrap frame.
#
# Only PY_START, PY_RESUME, PY_RETURN, PY_YIELD, LINE and JUMP may return DISABLE; CPython raises
# into the target for the others, so those callbacks never do.
_walk = False
_preexisting: Any = None  # set of frames on some stack at attach (walk mode)
_boot_codes: Any = None  # tuple: threading's _bootstrap and _bootstrap_inner codes
_disable: Any = None  # sys.monitoring.DISABLE
_jump_lines: Dict[int, Tuple[Any, Dict[int, int]]] = {}


def _frame_line(frame: Any) -> int:
    if frame is None:
        return 0
    line = frame.f_lineno
    return -1 if line is None else line  # type: ignore[no-any-return]


def _is_base(frame: Any) -> bool:
    if _preexisting is not None and frame in _preexisting:
        return True
    if _boot_codes is not None:
        code = frame.f_code
        for boot in _boot_codes:
            if boot is code:
                return True
    return False


def _walked_depth(frame: Any, kind: int) -> int:
    if frame is None or _is_base(frame):
        return 0
    n = 0
    f = frame.f_back
    while f is not None:
        if _is_base(f):
            break
        n += 1
        f = f.f_back
    return n + 1 if kind == K_LINE or kind == K_EXCEPTION else n


def _mon_state() -> Optional[_State]:
    """The thread's state when this event is to be looked at, else None."""
    try:
        st = _tls.s
    except AttributeError:
        st = _new_state()
    if st.gen == _generation:
        return None if st.skip else st
    return st if _enter(st) else None


def _seen(code: Any) -> Tuple[Any, Any]:
    """The frame a monitoring event happened in (the callback's caller) and the code's entry."""
    try:
        frame = _getframe(2)
    except ValueError:
        frame = None
    return frame, _cache.get(id(code)) or _lookup(code, frame)


def mon_start(code: Any, offset: int) -> Any:
    """PY_START, PY_RESUME."""
    if not _active:
        return None
    st = _mon_state()
    if st is None:
        return None
    frame, e = _seen(code)
    if _walk:
        if not (e[1] and e[2] & 1):
            return _disable
        st.depth = _walked_depth(frame, K_CALL)
        _on_event(st, e, frame, K_CALL, _frame_line(frame), None)
        return None
    if e[1] and e[2] & 1:
        _on_event(st, e, frame, K_CALL, _frame_line(frame), None)
    st.depth += 1
    st.calls += 1
    return None


def mon_throw(code: Any, offset: int, exc: Any) -> None:
    """PY_THROW: a call that cannot be disabled."""
    if not _active:
        return
    st = _mon_state()
    if st is None:
        return
    frame, e = _seen(code)
    if _walk:
        if e[1] and e[2] & 1:
            st.depth = _walked_depth(frame, K_CALL)
            _on_event(st, e, frame, K_CALL, _frame_line(frame), None)
        return
    if e[1] and e[2] & 1:
        _on_event(st, e, frame, K_CALL, _frame_line(frame), None)
    st.depth += 1
    st.calls += 1


def mon_return(code: Any, offset: int, value: Any) -> Any:
    """PY_RETURN, PY_YIELD."""
    if not _active:
        return None
    st = _mon_state()
    if st is None:
        return None
    frame, e = _seen(code)
    if _walk:
        if not (e[1] and e[2] & 4):
            return _disable
        st.depth = _walked_depth(frame, K_RETURN)
    elif st.depth > 0:
        st.depth -= 1
    if e[1] and e[2] & 4:
        _on_event(st, e, frame, K_RETURN, _frame_line(frame), value)
    return None


def mon_unwind(code: Any, offset: int, exc: Any) -> None:
    """PY_UNWIND: settrace reports this return with None."""
    if not _active:
        return
    st = _mon_state()
    if st is None:
        return
    frame, e = _seen(code)
    if _walk:
        if not (e[1] and e[2] & 4):
            return
        st.depth = _walked_depth(frame, K_RETURN)
    elif st.depth > 0:
        st.depth -= 1
    if e[1] and e[2] & 4:
        _on_event(st, e, frame, K_RETURN, _frame_line(frame), None)


def mon_raise(code: Any, offset: int, exc: Any) -> None:
    """RAISE."""
    if not _active:
        return
    st = _mon_state()
    if st is None:
        return
    frame, e = _seen(code)
    if not (e[1] and e[2] & 8):
        return
    if _walk:
        st.depth = _walked_depth(frame, K_EXCEPTION)
    _on_event(st, e, frame, K_EXCEPTION, _frame_line(frame),
              (type(exc), exc, getattr(exc, "__traceback__", None)))


def mon_line(code: Any, line: int) -> Any:
    """LINE: enabled only on code objects whose lines can match."""
    if not _active:
        return None
    st = _mon_state()
    if st is None:
        return None
    try:
        line = int(line)
    except Exception:
        line = -1
    frame, e = _seen(code)
    if _walk:
        if not (e[1] and e[2] & 2):
            return _disable
        st.depth = _walked_depth(frame, K_LINE)
    if e[1] and e[2] & 2:
        if e[3] is None:
            _emit(st.tid, K_LINE, e[1], line, st.depth, None)  # the common case, inlined
        else:
            _on_event(st, e, frame, K_LINE, line, None)
    return None


def _addr2line(code: Any, offset: int) -> int:
    """PyCode_Addr2Line(code, offset), from co_lines(), cached per code object."""
    if offset < 0:
        return code.co_firstlineno  # type: ignore[no-any-return]
    known = _jump_lines.get(id(code))
    if known is None or known[0] is not code:
        table: Dict[int, int] = {}
        for start, end, line in code.co_lines():
            for at in range(start, end, 2):
                table[at] = -1 if line is None else line
        known = _jump_lines[id(code)] = (code, table)
    return known[1].get(offset, -1)


def mon_jump(code: Any, src: int, dst: int) -> Any:
    """JUMP, enabled with LINE: settrace reports a backward jump that stays on one line (a loop
    or an inlined comprehension on a single line) as another line event, and so do we. Forward
    jumps and jumps to another line (which LINE reports) are disabled."""
    if not _active:
        return None
    st = _mon_state()
    if st is None:
        return None
    try:
        src, dst = int(src), int(dst)
    except Exception:
        return None
    if dst > src:
        return _disable
    line = _addr2line(code, src)
    if line != _addr2line(code, dst):
        return _disable
    frame, e = _seen(code)
    if _walk:
        if not (e[1] and e[2] & 2):
            return _disable
        st.depth = _walked_depth(frame, K_LINE)
    if e[1] and e[2] & 2:
        _on_event(st, e, frame, K_LINE, line, None)
    return None


def mon_configure(walk: Any, disable: Any, preexisting: Any, boot_codes: Any) -> None:
    """mon_configure(walk, DISABLE, preexisting frames, bootstrap codes): after configure()."""
    global _walk, _disable, _preexisting, _boot_codes
    walk = bool(walk)
    if not isinstance(boot_codes, tuple):
        raise TypeError("boot_codes must be a tuple")
    if walk and not isinstance(preexisting, (set, frozenset)):
        raise TypeError("preexisting must be a set")
    _walk = walk
    _disable = disable
    _preexisting = preexisting if walk else None
    _boot_codes = boot_codes


def _mon_reset() -> None:
    global _walk, _preexisting, _boot_codes
    _walk = False
    _preexisting = None
    _boot_codes = None
    _jump_lines.clear()


if _MONITORING:
    del install, uninstall, thread_hook
else:
    del mon_configure, mon_start, mon_throw, mon_return, mon_unwind, mon_raise, mon_line, mon_jump


# ---- session control ----------------------------------------------------------------------------
def configure(decide: Any, on_thread: Any, fmt: Any, pypred: Any, buffer_size: int, drop: Any,
              block_timeout: float, main_ident: int, repr_limit: int = 1024) -> None:
    """Prepare a session: callbacks, buffer size, drop mode. ``repr_limit`` is accepted for the
    C module's interface: C makes the reprs of builtin scalars itself with it, here the agent's
    ``fmt`` makes every argument text (the same text, see the module docstring)."""
    global _decide, _on_thread, _fmt, _pypred, _fill, _spare, _cap, _len, _drop_mode, _stop
    global _finished, _dead, _sent, _dropped, _pending_drop, _block_ns, _main_ident
    global _generation, _t0
    size = buffer_size.__index__()
    drop_mode = bool(drop)
    block_ns = int(float(block_timeout) * 1e9)
    repr_limit.__index__()
    if not isinstance(main_ident, int):
        raise TypeError("main_ident must be an int")
    if _active:
        raise RuntimeError("a session is already active")
    if size < 4096:
        size = 4096
    _cache.clear()
    _programs.clear()
    _jump_lines.clear()
    _gl_states.clear()
    greenlets(None)
    _decide, _on_thread, _pypred = decide, on_thread, pypred
    _fmt = fmt  # None: no argument text
    with _mu:
        _fill = bytearray(size)
        _spare = bytearray(size)
        _cap = size
        _len = 0
        _drop_mode = drop_mode
        _stop = _dead = _finished = False
        _sent = _dropped = _pending_drop = 0
        _block_ns = block_ns
    _main_ident = main_ident & (_U64 - 1)
    _generation += 1
    _t0 = monotonic_ns()


def set_active(flag: Any) -> None:
    """Turn event processing on or off."""
    global _active
    try:
        _active = bool(flag)
    except Exception:
        _active = False


def reset() -> None:
    """Forget the session: code cache, callbacks, buffers. Call after the tracer is removed."""
    global _active, _generation, _decide, _on_thread, _fmt, _pypred, _fill, _spare, _cap, _len
    _active = False
    _generation += 1
    _cache.clear()
    _programs.clear()
    _gl_states.clear()
    greenlets(None)
    _mon_reset()
    _decide = _on_thread = _fmt = _pypred = None
    with _mu:
        _fill = _spare = None
        _cap = _len = 0


def _send_all(sock: Any, data: Any, timeout_ms: int) -> int:
    view = memoryview(data)
    while len(view):
        try:
            w = sock.send(view, _SEND_FLAGS)
        except BlockingIOError:
            poller = _poll()
            poller.register(sock.fileno(), select.POLLOUT)
            if not poller.poll(timeout_ms):
                return -errno.ETIMEDOUT
            continue
        except InterruptedError:
            continue
        except OSError as exc:
            return -(exc.errno or errno.EPIPE)
        if w <= 0:
            return -errno.EPIPE
        view = view[w:]
    return 0


def pump(fd: int, idle_ms: int, send_timeout_ms: int) -> int:
    """Move records to the socket fd until there is something to read on it (a control frame,
    or EOF because the CLI died) -> 1; stop_pump(True) was called and everything is flushed
    -> 0; the socket failed -> -errno. Blocks in lock waits, send() and poll(), never spins."""
    global _fill, _spare, _len, _dead, _finished
    fd, idle_ms, send_timeout_ms = int(fd), int(idle_ms), int(send_timeout_ms)
    sock = _socket.socket(fileno=fd)  # a view of the agent's socket; detached, never closed
    try:
        if sock.gettimeout() is not None:  # socket.setdefaulttimeout() in the target
            sock.settimeout(0.0)
        readable = _poll()
        readable.register(fd, select.POLLIN)
        while True:
            with _mu:
                if _len == 0 and not _stop:
                    _wait(_data_waiters, idle_ms / 1000.0)
                stopping = _stop
                n = 0
                out = None
                if _len and _fill is not None:
                    out = _fill
                    n = _len
                    _fill = _spare
                    _spare = out
                    _len = 0
                    _notify(_space_waiters)
            if n:
                # `out` is the spare buffer now: producers never touch it until the next swap,
                # which only this thread performs.
                rc = _send_all(sock, _FRAME_HEADER.pack(n, _RECORDS), send_timeout_ms)
                if not rc:
                    rc = _send_all(sock, memoryview(out)[:n], send_timeout_ms)  # type: ignore
                if rc:
                    with _mu:
                        _dead = True
                        _notify(_space_waiters)
                    return rc
            if stopping:
                if n:
                    continue  # flush until a pass finds the buffer empty
                with _mu:
                    _finished = True
                    _notify(_space_waiters)
                return 0
            if readable.poll(0):
                return 1
    finally:
        sock.detach()


def stop_pump(flag: Any) -> None:
    """Ask pump() to flush and return."""
    global _stop
    with _mu:
        _stop = bool(flag)
        _notify(_data_waiters)
        _notify(_space_waiters)


def abandon() -> None:
    """The CLI is gone: producers waiting for room give up."""
    global _dead
    _dead = True


def append(data: bytes) -> bool:
    """A record made by the agent on its own thread (THREAD_END), if there is room now. Never
    waits: the agent's thread is the one that makes room."""
    n = len(data)
    with _mu:
        if _fill is None or _finished or _len + n + (_DROP_SIZE if _pending_drop else 0) > _cap:
            return False
        pos = _reserve(n)
        if pos < 0:
            return False
        _fill[pos:pos + n] = data
        return True


def alive() -> None:
    """The CLI sent a KEEPALIVE. The twin keeps the simpler rule of the first C version: a
    producer or a send that waits block_timeout for room gives up, KEEPALIVE or not."""


def stats() -> Dict[str, int]:
    """Counters of this session."""
    with _mu:
        return {"seen": _sent + _dropped, "sent": _sent, "dropped": _dropped, "dead": int(_dead),
                "codes": len(_cache)}
