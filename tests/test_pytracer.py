"""The pure-Python tracer (hunter_attach/pytracer.py) against the C tracer, on every interpreter.

Each run is a real target process on a pyenv CPython 3.8-3.13: it builds the ``_hunter_attach``
package from the sources as the bootstrap does, starts ``agent.serve`` on one end of a socketpair
on a ``_thread`` thread while a workload runs in the main thread, in a thread started before the
agent and in one started after it; this process reads the RECORDS, sends STOP and checks BYE. The
same script runs with the C tracer built for that interpreter, and the event sequences (kind,
function, line, depth, thread name, argument text) must be identical, for several queries, in
two sessions one after the other. Also: the documented differences (a thread that has its own
trace function, no cross-thread install), overflow (drop and dead modes), and in-process units
for the program compiler and pump().
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import time
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import pytest
from support import ROOT, interpreters

from hunter_attach import build, protocol

PYTHONS = interpreters()

WORKLOAD = r'''
import threading


def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


def gen(n):
    for i in range(n):
        yield i * 2


class Thing:
    def __init__(self, x):
        self.x = x

    def method(self, y):
        return self.x + y

    def __repr__(self):
        return "Thing(%r)" % self.x


def fails(x):
    raise ValueError(x)


def catches():
    r = ""
    try:
        fails(1)
    except ValueError as exc:
        r = str(exc)
    finally:
        r = r + "!"
    return r


class CM:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def with_block():
    with CM():
        v = 1
    return v


def returns_in_finally():
    try:
        return 1
    finally:
        x = 2  # noqa


def unwinds(n):
    if n == 0:
        raise KeyError(n)
    return unwinds(n - 1)


def loop(n):
    total = 0
    for i in range(n):
        if i % 2:
            total += i
        else:
            total -= 1
    while n > 0:
        n -= 1
    return total


def scalars(text, data, ratio, flag, nothing, *rest, key="\u00e9t\u00e9\n", **extra):
    def inner():
        return text
    return inner(), data, ratio, flag, nothing, rest, key, extra


def work(tag):
    scalars("caf\u00e9\t" + tag, b"\x00\xff", 1.5, True, None, 7, [8], key="k", other={1: 2})
    total = fib(5)
    total += sum(gen(3))
    thing = Thing(total)
    total = thing.method(3)
    text = catches()
    total += with_block() + returns_in_finally() + loop(5)
    try:
        unwinds(2)
    except KeyError:
        pass
    inc = lambda a: a + 1  # noqa: E731
    total = inc(total)
    values = [x * 2 for x in range(2)]
    return total, text, tag, values


def pre_body(go):
    a = 1
    go.wait()
    b = a + 1
    return work("pre"), b


def post_body():
    return work("post")


def main_body(go, stdin):
    x = 0
    stdin.readline()
    go.set()
    t = threading.Thread(target=post_body, name="post")
    t.start()
    r = work("main")
    t.join()
    return r, x
'''

# Runs in the target interpreter: argv = repo root, workload dir, tracer ("py" or the path of a
# compiled one), JSON options: fds (one session per socket, one after the other), config,
# cross (pytracer.CROSS_THREAD), foreign (the thread started before attach has its own tracer).
TARGET = r"""
import _thread, importlib.util, json, os, socket, sys, threading, time, types

root, wdir, which, options = sys.argv[1:5]
options = json.loads(options)
sys.path.insert(0, wdir)
import workload

pkg = types.ModuleType('_hunter_attach')
pkg.__path__ = []
pkg.__package__ = '_hunter_attach'
sys.modules['_hunter_attach'] = pkg
for name in ('protocol', 'green', 'saferepr', 'filters', 'agent', 'pytracer'):
    with open(os.path.join(root, 'hunter_attach', name + '.py')) as f:
        source = f.read()
    mod = types.ModuleType('_hunter_attach.' + name)
    mod.__package__ = '_hunter_attach'
    sys.modules[mod.__name__] = mod
    setattr(pkg, name, mod)
    exec(compile(source, '<hunter_attach/%s.py>' % name, 'exec'), mod.__dict__)
if which == 'py':
    tracer = pkg.pytracer
    tracer.CROSS_THREAD = options['cross']
else:
    spec = importlib.util.spec_from_file_location('_hunter_attach._tracer', which)
    tracer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tracer)
pkg._tracer = tracer
kept = []


def own_tracer(frame, event, arg):
    return None


def pre_main(go, worked, after):
    if options['foreign']:
        sys.settrace(own_tracer)
    workload.pre_body(go)
    during = sys.gettrace() is own_tracer
    worked.set()
    after.wait()  # the session is over
    if options['foreign']:
        kept.append((during, sys.gettrace() is own_tracer))
        sys.settrace(None)


def agent(sock, done):
    try:
        pkg.agent.serve(sock, tracer, options['config'])
    finally:
        done.release()


for fd in options['fds']:
    go, worked, after = threading.Event(), threading.Event(), threading.Event()
    pre = threading.Thread(target=pre_main, args=(go, worked, after), name='pre')
    pre.start()
    done = _thread.allocate_lock()
    done.acquire()
    _thread.start_new_thread(agent, (socket.socket(fileno=fd), done))
    workload.main_body(go, sys.stdin)
    worked.wait()
    print('done', flush=True)
    done.acquire()
    after.set()
    pre.join()
    deadline = time.monotonic() + 5
    while len(sys._current_frames()) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    frames = []
    f = sys._getframe()
    while f is not None:
        frames.append(f.f_trace is not None)
        f = f.f_back
    mon = getattr(sys, 'monitoring', None)
    print(json.dumps({
        'gettrace': repr(sys.gettrace()), 'getprofile': repr(sys.getprofile()),
        'thread_trace': repr(threading._trace_hook),
        'thread_profile': repr(threading._profile_hook),
        'tools': [i for i in range(6) if mon is not None and mon.get_tool(i) is not None],
        'threads': len(sys._current_frames()), 'active': threading.active_count(),
        'f_trace': any(frames), 'foreign': kept[-1] if kept else None,
    }), flush=True)
"""

Event = Tuple[str, str, int, int, str, Optional[str]]


class Run:
    """One session: what the agent sent and the target's state after it."""

    def __init__(self) -> None:
        self.ready: Dict[str, Any] = {}
        self.bye: Dict[str, Any] = {}
        self.status: Dict[str, Any] = {}
        self.events: List[Event] = []
        self.errors: List[Dict[str, Any]] = []
        self.codes: Dict[int, Dict[str, Any]] = {}
        self.threads: Dict[int, Dict[str, Any]] = {}
        self.drops = 0
        self.orphans = 0  # events whose CODE or THREAD record never arrived

    def by_thread(self) -> Dict[str, List[Event]]:
        out: Dict[str, List[Event]] = {}
        for ev in self.events:
            out.setdefault(ev[4], []).append(ev)
        return out

    def feed(self, payload: bytes) -> None:
        for rtype, rec in protocol.iter_records(payload):
            if rtype == protocol.REC_CODE:
                self.codes[rec["id"]] = rec
            elif rtype == protocol.REC_THREAD:
                self.threads[rec["id"]] = rec
            elif rtype == protocol.REC_DROP:
                self.drops += rec
            elif rtype != protocol.REC_EVENT:
                continue  # THREAD_END: when the agent notices differs from run to run
            else:
                kind, thread, code, lineno, depth, _, arg = rec
                if code not in self.codes or thread not in self.threads:
                    self.orphans += 1
                    continue
                if arg is not None and kind == protocol.CALL:
                    # C makes the JSON of scalar arguments itself, without json.dumps' ASCII
                    # escapes: compare the decoded lists
                    arg = json.dumps(json.loads(arg))
                if arg is not None:
                    arg = _ADDRESS.sub("0x?", arg)
                self.events.append((protocol.KINDS[kind], self.codes[code]["function"], lineno,
                                    depth, self.threads[thread]["name"], arg))


_ADDRESS = re.compile(r"0x[0-9a-f]+")


class Target:
    def __init__(self, python: str, tracer: str, config: Dict[str, Any], tmp_path: Any,
                 sessions: int = 1, cross: bool = True, foreign: bool = False,
                 sndbuf: int = 0) -> None:
        wdir = tmp_path / "w"
        wdir.mkdir(exist_ok=True)
        (wdir / "workload.py").write_text(WORKLOAD)
        script = tmp_path / "target.py"
        script.write_text(TARGET)
        pairs = [socket.socketpair() for _ in range(sessions)]
        for ours, theirs in pairs:
            if sndbuf:  # a small socket buffer: the pump blocks soon when we do not read
                theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
                ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
        self.socks = [ours for ours, _ in pairs]
        fds = [theirs.fileno() for _, theirs in pairs]
        options = {"fds": fds, "config": config, "cross": cross, "foreign": foreign}
        self.proc = subprocess.Popen(
            [python, "-I", str(script), ROOT, str(wdir), tracer, json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=fds)
        for _, theirs in pairs:
            theirs.close()
        self.out = b""

    def lines(self) -> List[bytes]:
        return self.out.split(b"\n")[:-1]

    def read_stdout(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            raise AssertionError("target exited: %s" % self.proc.stderr.read().decode())
        self.out += chunk

    def session(self, index: int, timeout: float, read: str = "all") -> Run:
        """Run session `index` to BYE: READY -> go -> (workload) -> done -> STOP -> BYE. read:
        "all" as they come, "late" only once the workload is done, "slow" 2 KiB per 10 ms."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        sock = self.socks[index]
        run = Run()
        reader = protocol.FrameReader()
        done_line = 2 * index + 1  # each session prints 'done' and a status line
        stopped = False
        deadline = time.monotonic() + timeout
        while not run.bye and not run.errors:
            if time.monotonic() > deadline:
                raise AssertionError("target timed out: %r" % self.out)
            stdout_done = len(self.lines()) >= done_line
            watch = [self.proc.stdout] + (
                [sock] if read != "late" or stdout_done or not run.ready else [])
            ready, _, _ = select.select(watch, [], [], 0.5)
            if self.proc.stdout in ready:
                self.read_stdout()
            if len(self.lines()) >= done_line and not stopped:
                sock.sendall(protocol.encode_frame(protocol.STOP))
                stopped = True
            if sock not in ready:
                continue
            data = sock.recv(2048 if read == "slow" else 1 << 20)
            if read == "slow":
                time.sleep(0.01)
            if not data:
                break
            for ftype, payload in reader.feed(data):
                if ftype == protocol.READY:
                    run.ready = protocol.decode_json(payload)
                    self.proc.stdin.write(b"go\n")
                    self.proc.stdin.flush()
                elif ftype == protocol.BYE:
                    run.bye = protocol.decode_json(payload)
                elif ftype == protocol.ERROR:
                    run.errors.append(protocol.decode_json(payload))
                elif ftype == protocol.RECORDS:
                    run.feed(payload)
        assert not run.errors, run.errors
        while len(self.lines()) < done_line + 1:
            if time.monotonic() > deadline:
                raise AssertionError("no status line: %r" % self.out)
            self.read_stdout()
        run.status = json.loads(self.lines()[done_line].decode())
        return run

    def close(self, timeout: float) -> None:
        try:
            _, err = self.proc.communicate(timeout=timeout)
            assert self.proc.returncode == 0, err.decode()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for sock in self.socks:
                sock.close()


def run_target(python: str, tracer: str, query: Dict[str, Any], tmp_path: Any,
               sessions: int = 1, timeout: float = 30, read: str = "all",
               **options: Any) -> List[Run]:
    target = Target(python, tracer, dict({"query": query, "repr_limit": 200},
                                         **options.pop("config", {})),
                    tmp_path, sessions=sessions, **options)
    try:
        return [target.session(i, timeout, read) for i in range(sessions)]
    finally:
        target.close(timeout)


_c_tracers: Dict[str, str] = {}


def c_tracer(python: str) -> str:
    """The C tracer for this interpreter, as the CLI finds or builds it."""
    if python not in _c_tracers:
        version = tuple(int(x) for x in python.split("/")[-3].split("."))
        found = build.tracer_for(version, python, lambda msg: None)
        if found is None:
            pytest.skip("no C tracer for %s" % python)
        path = found.path
        if os.path.getmtime(path) < os.path.getmtime(build.SOURCE):
            # the one `pip install -e .` built, older than _tracer.c: build the current source
            info = build.probe_interpreter(python)
            fresh = build.cache_dir() / "test-pytracer" / ("_tracer" + info["suffix"])
            if not build.build(info["include"], fresh, lambda msg: None):
                pytest.skip("cannot build the C tracer for %s" % python)
            path = str(fresh)
        _c_tracers[python] = path
    return _c_tracers[python]


MODULE = {"op": "cmp", "field": "module", "cmp": "eq", "value": "workload"}
QUERIES: Dict[str, Dict[str, Any]] = {
    "module": MODULE,
    # a residual program with every op kind, a PY op (threadname) included
    "program": {"op": "and", "args": [MODULE, {"op": "or", "args": [
        {"op": "cmp", "field": "depth", "cmp": "lt", "value": 3},
        {"op": "cmp", "field": "lineno", "cmp": "in", "value": [8, 9, 41, 42]},
        {"op": "cmp", "field": "function", "cmp": "eq", "value": "catches"}]},
        {"op": "not", "arg": {"op": "cmp", "field": "threadname", "cmp": "eq", "value": "pre"}},
        {"op": "not", "arg": {"op": "cmp", "field": "kind", "cmp": "eq", "value": "line"}}]},
    # calls and returns only: setprofile mode on 3.11 (call-only on 3.8-3.10)
    "calls": {"op": "and", "args": [MODULE, {"op": "cmp", "field": "kind", "cmp": "in",
                                             "value": ["call", "return"]}]},
    "call-only": {"op": "and", "args": [MODULE, {"op": "cmp", "field": "kind", "cmp": "eq",
                                                 "value": "call"}]},
    # events of the frames under a thread's first traced call (threading's bootstrap)
    "bootstrap": {"op": "or", "args": [MODULE, {"op": "cmp", "field": "function", "cmp": "in",
                                                "value": ["_bootstrap", "_bootstrap_inner"]}]},
    # `calls` and From make the sys.monitoring backend count every call instead of walking
    "counting": {"op": "and", "args": [MODULE, {"op": "cmp", "field": "calls", "cmp": "gte",
                                                "value": 3}]},
    "from": {"op": "and", "args": [MODULE, {"op": "from", "condition": {
        "op": "cmp", "field": "function", "cmp": "eq", "value": "catches"}, "predicate": {
        "op": "cmp", "field": "depth", "cmp": "lt", "value": 2}}]},
}


def clean(status: Dict[str, Any]) -> None:
    assert status["gettrace"] == "None" and status["getprofile"] == "None", status
    assert status["thread_trace"] == "None" and status["thread_profile"] == "None", status
    assert status["tools"] == [], status
    assert status["threads"] == 1 and status["active"] == 1, status
    assert not status["f_trace"], status


def compare(c_run: Run, py_run: Run) -> None:
    assert py_run.ready["backend"] == "python-" + c_run.ready["backend"]
    assert py_run.ready["threads"] == c_run.ready["threads"]
    c_threads, py_threads = c_run.by_thread(), py_run.by_thread()
    for name in c_threads:
        assert py_threads.get(name) == c_threads[name], name
    assert set(py_threads) == set(c_threads)
    for key in ("seen", "sent", "dropped", "dead"):
        assert py_run.bye[key] == c_run.bye[key], key
    assert py_run.bye["sent"] == len(py_run.events)


@pytest.mark.parametrize("version", sorted(PYTHONS))
@pytest.mark.parametrize("query", sorted(QUERIES))
def test_same_events_as_c(version: str, query: str, tmp_path: Any) -> None:
    """Every event of every thread the same as with the C tracer, in two sessions one after the
    other in the same process (the second reuses the module state of the first)."""
    python = PYTHONS[version]
    c_runs = run_target(python, c_tracer(python), QUERIES[query], tmp_path, sessions=2)
    py_runs = run_target(python, "py", QUERIES[query], tmp_path, sessions=2)
    for c_run, py_run in zip(c_runs, py_runs):
        clean(py_run.status)
        clean(c_run.status)
        assert set(c_run.by_thread()) == {"MainThread", "pre", "post"} - (
            {"pre"} if query == "program" else set())
        assert len(c_run.events) > 30
        compare(c_run, py_run)
    assert c_runs[0].by_thread() == c_runs[1].by_thread()


SETTRACE = sorted(v for v in PYTHONS if tuple(map(int, v.split("."))) < (3, 12))


@pytest.mark.parametrize("version", SETTRACE)
def test_without_cross_thread_install(version: str, tmp_path: Any) -> None:
    """The documented limit of pytracer without ctypes (CROSS_THREAD = False) on 3.8-3.11:
    threads that run when the session starts are not traced at all (install() reaches only the
    calling thread, which the agent excludes); threads started later through threading are,
    exactly as with C."""
    python = PYTHONS[version]
    (c_run,) = run_target(python, c_tracer(python), MODULE, tmp_path)
    (py_run,) = run_target(python, "py", MODULE, tmp_path, cross=False)
    clean(py_run.status)
    assert py_run.ready["threads"] == 0 and c_run.ready["threads"] == 2
    assert set(py_run.by_thread()) == {"post"}
    assert py_run.by_thread()["post"] == c_run.by_thread()["post"]


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_thread_with_its_own_tracer(version: str, tmp_path: Any) -> None:
    """A thread that already has a trace function when the session starts: C replaces it for the
    session and restores it; pytracer (settrace backend) leaves that thread alone. Both keep the
    thread's function. On sys.monitoring, a trace function does not matter: same events."""
    python = PYTHONS[version]
    (c_run,) = run_target(python, c_tracer(python), MODULE, tmp_path, foreign=True)
    (py_run,) = run_target(python, "py", MODULE, tmp_path, foreign=True)
    c_threads, py_threads = c_run.by_thread(), py_run.by_thread()
    assert set(c_threads) == {"MainThread", "pre", "post"}
    # (the thread's function is in place during the session, and after it)
    assert py_run.status["foreign"] == [True, True]
    assert c_run.status["foreign"] == [version not in SETTRACE, True]
    if version in SETTRACE:
        assert py_run.ready["threads"] == c_run.ready["threads"] - 1
        assert set(py_threads) == {"MainThread", "post"}
        for name in py_threads:
            assert py_threads[name] == c_threads[name]
    else:
        compare(c_run, py_run)


def subsequence(part: List[Event], whole: List[Event]) -> bool:
    it = iter(whole)
    return all(any(ev == other for other in it) for ev in part)


@pytest.mark.parametrize("version", sorted(PYTHONS))
@pytest.mark.parametrize("mode", ["drop", "dead"])
def test_overflow(version: str, mode: str, tmp_path: Any) -> None:
    """A consumer that cannot keep up. drop: it reads slowly, events are dropped and counted in
    DROP records. dead (lossless): it reads nothing until the workload is done, a producer waits
    block_timeout, then the session is dead and drops without waiting. Timing decides which
    events survive, so the rules are checked: the counters add up to the C tracer's complete
    stream, each thread's events are a subsequence of it, in order.

    Shared with the C tracer and kept as it is: a CODE or THREAD record that finds no room is
    lost (the session is dead, or a pending DROP record takes the last bytes: reserve() waits
    for n bytes, then needs n + 9), and later events of that code or thread cannot be decoded
    (counted as orphans). The C tracer is not run here: it also garbles call arguments when
    threads wait for room (its static argbuf)."""
    python = PYTHONS[version]
    config = {"buffer_size": 4096, "drop": mode == "drop", "block_timeout": 0.2}
    (full,) = run_target(python, c_tracer(python), MODULE, tmp_path)
    (run,) = run_target(python, "py", MODULE, tmp_path, sndbuf=4096, config=config,
                        read="slow" if mode == "drop" else "late")
    bye = run.bye
    assert bye["seen"] == bye["sent"] + bye["dropped"] == len(full.events), bye
    assert bye["dropped"] > 0 and bye["sent"] == len(run.events) + run.orphans, bye
    assert run.drops <= bye["dropped"]
    assert bye["dead"] == (mode == "dead"), bye
    if mode == "drop":
        assert run.drops > 0
    for name, events in run.by_thread().items():
        assert subsequence(events, full.by_thread()[name]), name


# ---- in-process units: the program compiler, the pump ------------------------------------------
def c_program(ops: List[int], kind: int, depth: int, lineno: int, calls: int, tid: int,
              py: Any) -> bool:
    """_tracer.c's run_program(), line for line."""
    st: List[bool] = []
    fields = {0: depth, 1: lineno, 2: calls, 3: tid}
    p, end = 0, len(ops)
    while p < end:
        op = ops[p]
        p += 1
        if op in (0, 1):
            if len(st) >= 64:
                return False
            st.append(op == 0)
        elif op in (2, 3):
            if len(st) < 2:
                return False
            b, a = st.pop(), st.pop()
            st.append((a and b) if op == 2 else (a or b))
        elif op == 4:
            if not st:
                return False
            st[-1] = not st[-1]
        elif op == 5:
            if p >= end or len(st) >= 64:
                return False
            st.append(((1 << kind) & ops[p]) != 0)
            p += 1
        elif op == 6:
            if end - p < 3 or len(st) >= 64:
                return False
            x, c, y = fields.get(ops[p], 0), ops[p + 1], ops[p + 2]
            st.append({0: x == y, 1: x != y, 2: x < y, 3: x <= y, 4: x > y,
                       5: x >= y}.get(c, False))
            p += 3
        elif op == 7:
            if end - p < 2 or len(st) >= 64:
                return False
            v, n = fields.get(ops[p], 0), ops[p + 1]
            p += 2
            if n < 0 or end - p < n:
                return False
            st.append(v in ops[p:p + n])
            p += n
        elif op == 8:
            if p >= end or len(st) >= 64:
                return False
            st.append(bool(py(ops[p])))
            p += 1
        else:
            return False
    return len(st) == 1 and st[0]


def random_program(rnd: Any) -> List[int]:
    def tree(depth: int) -> List[int]:
        r = rnd.random()
        if depth > 4 or r < 0.35:
            leaf = rnd.randrange(5)
            if leaf == 0:
                return [rnd.randrange(2)]
            if leaf == 1:
                return [5, rnd.randrange(-20, 20)]
            if leaf == 2:
                return [6, rnd.randrange(-1, 5), rnd.randrange(-1, 7), rnd.randrange(-3, 12)]
            if leaf == 3:
                n = rnd.randrange(4)
                return [7, rnd.randrange(-1, 5), n] + [rnd.randrange(-3, 12) for _ in range(n)]
            return [8, rnd.randrange(3)]
        if r < 0.5:
            return tree(depth + 1) + [4]
        return tree(depth + 1) + tree(depth + 1) + [rnd.choice((2, 3))]

    ops = tree(0)
    if rnd.random() < 0.3:  # malformed: cut, spliced or with a stray opcode
        how = rnd.randrange(3)
        at = rnd.randrange(len(ops) + 1)
        if how == 0:
            ops = ops[:at]
        elif how == 1:
            ops = ops[:at] + [rnd.randrange(-2, 12)] + ops[at:]
        else:
            ops = ops + ops[:at]
    return ops


def test_program_compiler() -> None:
    """pytracer compiles programs to Python functions: same answers as the C interpreter and
    the same pypred calls in the same order (PY ops have side effects), malformed ones too."""
    import random

    from hunter_attach import pytracer

    rnd = random.Random(1234)
    programs = [random_program(rnd) for _ in range(1500)]
    programs += [[0] * 64 + [2] * 63, [0] * 65 + [2] * 64, [7, 0, 2, 1], [8], [6, 0, 0]]
    calls: List[Tuple[Any, ...]] = []

    def pypred(index: int, frame: Any, kind: int, arg: Any, depth: int, calls_: int) -> Any:
        calls.append((index, frame, kind, arg, depth, calls_))
        if index == 2:
            raise ValueError("a failing predicate is false")
        return index == 1

    saved = pytracer._pypred
    pytracer._pypred = pypred
    try:
        for ops in programs:
            fn = pytracer._compile(ops)
            for kind, depth, lineno, ncalls, tid in ((0, 0, 1, 0, -1), (1, 3, 7, 5, 99),
                                                      (2, 1, 10, 2, -1), (3, 5, -1, 9, 4)):
                calls.clear()
                got = fn(kind, depth, lineno, ncalls, tid, "frame", "arg")
                got_calls = list(calls)
                calls.clear()
                want = c_program(ops, kind, depth, lineno, ncalls, tid, partial(
                    _py, pypred, frame="frame", kind=kind, arg="arg", depth=depth,
                    calls=ncalls))
                assert (got, got_calls) == (want, calls), ops
    finally:
        pytracer._pypred = saved


def _py(pypred: Any, index: int, frame: Any, kind: int, arg: Any, depth: int,
        calls: int) -> bool:
    try:
        return bool(pypred(index, frame, kind, arg, depth, calls))
    except Exception:
        return False


def test_pump() -> None:
    """pump()'s return codes and flushing, stop_pump(), and that an idle pump sleeps."""
    import errno
    import threading

    from hunter_attach import pytracer

    pytracer.configure(decide=None, on_thread=None, fmt=None, pypred=None, buffer_size=4096,
                       drop=False, block_timeout=1.0, main_ident=0)
    ours, theirs = socket.socketpair()
    try:
        for i in range(3):
            pytracer._emit(7, protocol.LINE, 3, 10 + i, i, None)
        pytracer._emit(7, protocol.RETURN, 3, 13, 0, "é".encode())
        ours.sendall(protocol.encode_frame(protocol.STOP))
        assert pytracer.pump(theirs.fileno(), 50, 1000) == 1  # something to read
        reader = protocol.FrameReader()
        frames = reader.feed(ours.recv(1 << 16))
        assert [f for f, _ in frames] == [protocol.RECORDS]
        records = list(protocol.iter_records(frames[0][1]))
        assert [rec[1][2:5] for rec in records] == [(3, 10, 0), (3, 11, 1), (3, 12, 2), (3, 13, 0)]
        assert records[-1][1][6] == "é" and records[0][1][1] == 7
        theirs.recv(100)  # the STOP frame

        # idle: the pump waits on a lock, it does not spin
        result: List[int] = []
        start = time.process_time()
        thread = threading.Thread(target=lambda: result.append(
            pytracer.pump(theirs.fileno(), 50, 1000)))
        thread.start()
        time.sleep(0.5)
        pytracer._emit(7, protocol.LINE, 3, 20, 0, None)
        pytracer.stop_pump(True)
        thread.join(5)
        assert result == [0] and time.process_time() - start < 0.2
        assert [rec[1][3] for rec in protocol.iter_records(reader.feed(ours.recv(1 << 16))[0][1])
                ] == [20]
        pytracer._emit(7, protocol.LINE, 3, 21, 0, None)  # after the final flush: not counted
        assert pytracer.stats() == {"seen": 5, "sent": 5, "dropped": 0, "dead": 0, "codes": 0}

        pytracer.stop_pump(False)
        pytracer.reset()
        pytracer.configure(decide=None, on_thread=None, fmt=None, pypred=None, buffer_size=4096,
                           drop=True, block_timeout=1.0, main_ident=0)
        pytracer._emit(1, protocol.LINE, 3, 20, 0, None)
        ours.close()
        assert pytracer.pump(theirs.fileno(), 50, 1000) == -errno.EPIPE
        assert pytracer.stats()["dead"] == 1
    finally:
        pytracer.reset()
        ours.close()
        theirs.close()
