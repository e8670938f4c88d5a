"""The C tracer's own test suite, run inside one target interpreter (CPython 3.8+, stdlib only).

    python tracer_harness.py TRACER_SO PACKAGE_DIR [--only NAME,...] [--skip NAME,...]
                             [--modules protocol,green,saferepr,filters,agent]
    python tracer_harness.py --list

It builds the package ``_hunter_attach`` from PACKAGE_DIR's sources the way bootstrap.py does
(``--modules``, in that order; default protocol, green, saferepr, filters, agent, as
session.AGENT_MODULES), loads the compiled tracer TRACER_SO as ``_hunter_attach._tracer``, and
runs real sessions: ``agent.serve`` on one end of a socketpair in a ``_thread`` thread, this
script playing the CLI on the other end, while a workload runs.

Each test prints one JSON line: {"test", "ok", "error", "seconds", "data"}; the last line is
{"done": true}. A test that hangs for HA_HARNESS_TEST_TIMEOUT seconds (default 30) makes
faulthandler print every thread's stack to stderr and end the process.
tests/test_tracer_unit.py runs this under every interpreter it finds.

The reference for event sequences is an oracle: the same workload under a pure-Python
``sys.settrace`` function that counts depth and calls the way the tracer documents it (a call at
the caller's depth, the events inside it one deeper, the return after the decrement) and asks
``filters.Filter.decide`` + ``filters.run_program`` + ``pypred`` whether each event matches.
Workloads run on a ``_thread`` worker started before the session, so that on every backend the
tracer's per-thread depth and calls counters start at 0 at the workload's first call.
"""

import _thread
import atexit
import base64
import faulthandler
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
import types

PACKAGE = "_hunter_attach"
MODULES = ("protocol", "green", "saferepr", "filters", "agent")
WORKLOAD_MODULE = "ha_workload"
MARKER = "<hunter-attach tracer>"
TEST_TIMEOUT = float(os.environ.get("HA_HARNESS_TEST_TIMEOUT", "30"))

WORKLOAD_SOURCE = '''\
def add(a, b):
    c = a + b
    return c


def fail(x):
    raise ValueError(x)


def gen(n):
    for i in range(n):
        yield i


def main():
    total = add(1, 2)
    try:
        fail("boom")
    except ValueError:
        total += 1
    for v in gen(2):
        total += v
    return total


def rec(n):
    if n:
        return rec(n - 1)
    return 0


def pad(a, s):
    return a


def many(n):
    for i in range(n):
        pad(i, "xxxxxxxxxxxxxxxxxxxx")
    return n


def mixed():
    main()
    rec(4)
    return many(3)
'''


def line_of(text):
    """Line number of the first line of the workload that is exactly ``text`` (stripped)."""
    for i, line in enumerate(WORKLOAD_SOURCE.splitlines(), 1):
        if line.strip() == text:
            return i
    raise KeyError(text)


# ---- loading, as bootstrap.py does ---------------------------------------------------------------

def load_package(src_dir, tracer_path, modules=MODULES):
    pkg = types.ModuleType(PACKAGE)
    pkg.__path__ = []
    pkg.__package__ = PACKAGE
    sys.modules[PACKAGE] = pkg
    for name in modules:
        with open(os.path.join(src_dir, name + ".py")) as f:
            source = f.read()
        mod = types.ModuleType(PACKAGE + "." + name)
        mod.__package__ = PACKAGE
        sys.modules[mod.__name__] = mod
        setattr(pkg, name, mod)
        exec(compile(source, "<hunter_attach/%s.py>" % name, "exec"), mod.__dict__)
    spec = importlib.util.spec_from_file_location(PACKAGE + "._tracer", tracer_path)
    tracer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tracer)
    pkg._tracer = tracer
    sys.modules[PACKAGE + "._tracer"] = tracer
    return pkg


def load_workload():
    d = tempfile.mkdtemp(prefix="ha-harness-")
    atexit.register(shutil.rmtree, d, True)
    path = os.path.join(d, WORKLOAD_MODULE + ".py")
    with open(path, "w") as f:
        f.write(WORKLOAD_SOURCE)
    sys.path.insert(0, d)
    try:
        return __import__(WORKLOAD_MODULE)
    finally:
        sys.path.remove(d)


pkg = None
agent = protocol = filters = tracer = wl = None


class Failure(AssertionError):
    pass


def check(cond, message, *details):
    if not cond:
        if details:
            message += ": " + " ".join(repr(d) for d in details)
        raise Failure(message)


def eq(actual, expected, what):
    if actual != expected:
        raise Failure("%s:\n  expected %r\n  actual   %r" % (what, expected, actual))


# ---- the worker: a _thread thread started before the session, running jobs -----------------------

class Worker:
    def __init__(self):
        self.go = _thread.allocate_lock()
        self.go.acquire()
        self.done = _thread.allocate_lock()
        self.done.acquire()
        self.job = None
        self.result = None
        self.ident = None
        self.elapsed = 0.0
        _thread.start_new_thread(self.loop, ())
        self.run(lambda: None)

    def loop(self):
        self.ident = _thread.get_ident()
        while True:
            self.go.acquire()
            job = self.job
            if job is None:
                self.done.release()
                return
            started = time.monotonic()
            try:
                self.result = job()
            except BaseException as exc:  # reported by run()
                self.result = exc
            self.elapsed = time.monotonic() - started
            self.done.release()

    def run(self, job, timeout=60):
        self.job = job
        self.go.release()
        if not self.done.acquire(True, timeout):
            raise Failure("the workload did not finish in %s s" % timeout)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def close(self):
        self.job = None
        self.go.release()
        self.done.acquire(True, 10)


# ---- the CLI's end of the socket -----------------------------------------------------------------

class Trace:
    """What the agent sent, decoded and checked for the record-order rules."""

    def __init__(self):
        self.codes = {}
        self.threads = {}
        self.events = []  # dicts
        self.drops = []  # (count, number of events before it)
        self.ended = set()  # ids of THREAD_END records
        self.hidden = []  # hidden events (--summary's returns), as iter_records gives them
        self.bye = None
        self.error = None
        self.payloads = []
        self.problems = []

    def add_records(self, payload, keep):
        if keep:
            self.payloads.append(payload)
        for rtype, rec in protocol.iter_records(payload):
            if rtype == protocol.REC_EVENT:
                kind, thread, code, lineno, depth, ts, arg = rec
                if code not in self.codes:
                    self.problems.append("event before its CODE record: %r" % (rec,))
                if thread not in self.threads:
                    self.problems.append("event before its THREAD record: %r" % (rec,))
                if thread in self.ended:
                    self.problems.append("event after its THREAD_END record: %r" % (rec,))
                info = self.codes.get(code, {})
                self.events.append({
                    "kind": protocol.KINDS[kind], "thread": thread, "code": code,
                    "function": info.get("function"), "module": info.get("module"),
                    "lineno": lineno, "depth": depth, "ts": ts, "arg": arg})
            elif rtype == protocol.REC_CODE:
                if rec["id"] in self.codes:
                    self.problems.append("code id %d sent twice" % rec["id"])
                self.codes[rec["id"]] = rec
            elif rtype == protocol.REC_THREAD:
                if rec["id"] in self.threads:
                    self.problems.append("thread id %d sent twice" % rec["id"])
                self.threads[rec["id"]] = rec
            elif rtype == protocol.REC_THREAD_END:
                if rec not in self.threads:
                    self.problems.append("THREAD_END of unknown thread %d" % rec)
                self.ended.add(rec)
            elif rtype == protocol.REC_HIDDEN:
                self.hidden.append(rec)
            else:
                self.drops.append((rec, len(self.events)))

    def of_thread(self, ident, module=WORKLOAD_MODULE):
        ids = [t["id"] for t in self.threads.values() if t["ident"] == ident]
        return [e for e in self.events if e["thread"] in ids and e["module"] == module]


class Client:
    """Runs agent.serve on a socketpair and reads what it sends."""

    def __init__(self, config, sockbuf=None, keep_payloads=False):
        self.config = dict(config)
        self.a, self.b = socket.socketpair()
        if sockbuf:
            for s, opt in ((self.a, socket.SO_SNDBUF), (self.a, socket.SO_RCVBUF),
                           (self.b, socket.SO_SNDBUF), (self.b, socket.SO_RCVBUF)):
                s.setsockopt(socket.SOL_SOCKET, opt, sockbuf)
        self.trace = Trace()
        self.keep = keep_payloads
        self.frames = protocol.FrameReader()
        self.pending = []
        self.delay = 0.0
        self.chunk = 1 << 16
        self.reading = False
        self.reader_done = _thread.allocate_lock()
        self.agent_done = _thread.allocate_lock()
        self.agent_done.acquire()
        _thread.start_new_thread(self._serve, ())
        ftype, payload = self.next_frame(10.0)
        if ftype == protocol.ERROR:
            raise Failure("the agent failed: %s" % payload.decode())
        eq(ftype, protocol.READY, "first frame")
        self.ready = json.loads(payload.decode())

    def _serve(self):
        self.agent_ident = _thread.get_ident()
        try:
            agent.serve(self.a, tracer, self.config)
        finally:
            self.agent_done.release()

    def next_frame(self, timeout):
        deadline = time.monotonic() + timeout
        while not self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failure("no frame from the agent in %s s" % timeout)
            self.b.settimeout(min(remaining, 0.2))
            try:
                data = self.b.recv(self.chunk)
            except socket.timeout:
                continue
            if not data:
                return None, b""
            self.pending.extend(self.frames.feed(data))
        return self.pending.pop(0)

    def _handle(self, ftype, payload):
        if ftype == protocol.RECORDS:
            self.trace.add_records(payload, self.keep)
        elif ftype == protocol.BYE:
            self.trace.bye = json.loads(payload.decode())
        elif ftype == protocol.ERROR:
            self.trace.error = json.loads(payload.decode())
        else:
            self.trace.problems.append("unexpected frame type %d" % ftype)

    def start_reader(self, delay=0.0, chunk=1 << 16):
        self.delay = delay
        self.chunk = chunk
        self.reading = True
        self.reader_done.acquire()
        started = _thread.allocate_lock()
        started.acquire()
        _thread.start_new_thread(self._read_loop, (started,))
        # The reader's first event (its THREAD record) is behind it once it runs: from then on
        # it never touches the tracer's buffer, so tests that want one producer have one.
        started.acquire()
        time.sleep(0.05)

    def _read_loop(self, started):
        started.release()
        try:
            while self.reading:
                if self.delay:
                    time.sleep(self.delay)
                try:
                    ftype, payload = self.next_frame(0.2)
                except Failure:
                    continue
                if ftype is None:
                    return
                self._handle(ftype, payload)
                if ftype in (protocol.BYE, protocol.ERROR):
                    return
        except BaseException as exc:
            self.trace.problems.append("reader: %s: %s" % (type(exc).__name__, exc))
        finally:
            self.reader_done.release()

    def stop(self, timeout=20.0):
        """STOP, then read everything up to BYE; wait for the agent to finish."""
        self.b.settimeout(5.0)
        self.b.sendall(protocol.encode_frame(protocol.STOP))
        if self.reading:
            self.delay = 0.0
            if not self.reader_done.acquire(True, timeout):
                raise Failure("no BYE within %s s" % timeout)
            self.reading = False
            self.reader_done.release()
        else:
            deadline = time.monotonic() + timeout
            while self.trace.bye is None and self.trace.error is None:
                ftype, payload = self.next_frame(max(0.01, deadline - time.monotonic()))
                if ftype is None:
                    break
                self._handle(ftype, payload)
        self.wait_agent(timeout)
        self.b.close()
        check(not self.trace.problems, "stream problems", self.trace.problems[:5])
        check(self.trace.error is None, "the agent reported an error", self.trace.error)
        check(self.trace.bye is not None, "no BYE")
        return self.trace

    def abandon(self, timeout=20.0):
        """Close our end without STOP (the CLI died)."""
        self.reading = False
        self.b.close()
        self.wait_agent(timeout)

    def wait_agent(self, timeout):
        if not self.agent_done.acquire(True, timeout):
            raise Failure("agent.serve did not return within %s s" % timeout)
        self.agent_done.release()


def workload_query(*extra):
    """module == ha_workload, and any extra conditions."""
    args = [{"op": "cmp", "field": "module", "cmp": "eq", "value": WORKLOAD_MODULE}]
    args.extend(extra)
    return {"op": "and", "args": args} if len(args) > 1 else args[0]


def cmp(field, op, value):
    return {"op": "cmp", "field": field, "cmp": op, "value": value}


# ---- the oracle ----------------------------------------------------------------------------------

def oracle(job, tree):
    """The events ``job`` produces under sys.settrace, with matched=True where the tracer must
    emit them for ``tree``. Runs in a fresh _thread thread, like Worker jobs."""
    flt = filters.Filter(tree)
    out = []
    state = {"depth": 0, "calls": 0}
    kinds = {"call": 0, "line": 1, "return": 2, "exception": 3}

    def tracefunc(frame, event, arg):
        kind = kinds.get(event)
        if kind is None:
            return tracefunc
        if kind == protocol.RETURN and state["depth"] > 0:
            state["depth"] -= 1
        depth, calls = state["depth"], state["calls"]
        code = frame.f_code
        module = frame.f_globals.get("__name__", "")
        decision = flt.decide(code, str(module), frame.f_globals.get("__file__"))
        matched = False
        if not decision.never and decision.kinds >> kind & 1:
            if decision.program is None:
                matched = True
            else:
                ident = _thread.get_ident()
                matched = filters.run_program(
                    decision.program, kind, depth, frame.f_lineno, calls,
                    -1 if ident == main_ident else ident,
                    lambda i: flt.pypred(i, frame, kind, arg, depth, calls))
        if module == WORKLOAD_MODULE:
            out.append({"kind": protocol.KINDS[kind], "function": code.co_name,
                        "lineno": frame.f_lineno, "depth": depth, "calls": calls,
                        "matched": bool(matched)})
        if kind == protocol.CALL:
            state["depth"] += 1
            state["calls"] += 1
        return tracefunc

    result = {}
    done = _thread.allocate_lock()
    done.acquire()

    def run():
        sys.settrace(tracefunc)
        try:
            result["value"] = job()
        finally:
            sys.settrace(None)
            done.release()

    _thread.start_new_thread(run, ())
    check(done.acquire(True, 60), "the oracle's workload did not finish")
    return out


def shape(events, with_depth=True):
    """(kind, function, lineno, depth) tuples, for comparing sequences."""
    return [(e["kind"], e["function"], e["lineno"]) + ((e["depth"],) if with_depth else ())
            for e in events]


def matched(events):
    return [e for e in events if e["matched"]]


def session(config, job, worker, **client_kw):
    """One session around ``worker.run(job)``; returns (trace, client, job result)."""
    client = Client(config, **client_kw)
    try:
        client.start_reader()
        result = worker.run(job)
        trace = client.stop()
    except BaseException:
        try:
            client.abandon(5.0)
        except BaseException:
            pass
        raise
    return trace, client, result


def base_config(tree, **over):
    config = {"query": tree, "repr_limit": 1024, "buffer_size": 1 << 20, "drop": False,
              "block_timeout": 10.0}
    config.update(over)
    return config


def check_bye(trace, dropped=0):
    bye = trace.bye
    eq(sorted(bye), ["codes", "dead", "dropped", "seen", "sent"], "BYE keys")
    eq(bye["seen"], bye["sent"] + bye["dropped"], "seen == sent + dropped")
    eq(len(trace.events), bye["sent"], "EVENT records received == BYE sent")
    eq(sum(c for c, _ in trace.drops), bye["dropped"], "DROP records total == BYE dropped")
    if dropped == 0:
        eq(bye["dropped"], 0, "dropped")
        eq(trace.drops, [], "DROP records")
    eq(bye["dead"], 0, "dead")


# ---- the tests -----------------------------------------------------------------------------------

TESTS = []


def test(func):
    TESTS.append(func)
    return func


@test
def sequence(ctx):
    """The exact events of a small workload: kinds, functions, lines, depths, reprs."""
    tree = workload_query()
    expected = oracle(wl.main, tree)
    trace, client, result = session(base_config(tree), wl.main, ctx.worker)
    got = trace.of_thread(ctx.worker.ident)
    eq(shape(got), shape(matched(expected)), "events vs the settrace oracle")
    eq(result, 5, "workload result")
    L = line_of
    call, line, ret, exc = "call", "line", "return", "exception"
    hand = [
        (call, "main", L("def main():"), 0),
        (line, "main", L("total = add(1, 2)"), 1),
        (call, "add", L("def add(a, b):"), 1),
        (line, "add", L("c = a + b"), 2),
        (line, "add", L("return c"), 2),
        (ret, "add", L("return c"), 1),
        (line, "main", L("try:"), 1),
        (line, "main", L('fail("boom")'), 1),
        (call, "fail", L("def fail(x):"), 1),
        (line, "fail", L("raise ValueError(x)"), 2),
        (exc, "fail", L("raise ValueError(x)"), 2),
        (ret, "fail", L("raise ValueError(x)"), 1),
        (exc, "main", L('fail("boom")'), 1),
    ]
    head = shape(got)[:len(hand)]
    if sys.version_info >= (3, 10) or head != hand:
        eq(head, hand, "the first events, written out")
    # returns carry the value's repr, calls the JSON arguments, exceptions the tuple
    by = {(e["kind"], e["function"]): e for e in got}
    eq(by[(ret, "add")]["arg"], "3", "return value of add")
    eq(by[(ret, "main")]["arg"], "5", "return value of main")
    eq(by[(ret, "fail")]["arg"], "None", "return value of a frame left by an exception")
    eq(json.loads(by[(call, "add")]["arg"]), [["a", "1"], ["b", "2"]], "call arguments")
    check(by[(exc, "fail")]["arg"].startswith("(<class 'ValueError'>, ValueError('boom'), "),
          "exception argument", by[(exc, "fail")]["arg"])
    check(all(e["arg"] is None for e in got if e["kind"] == line), "line events carry no arg")
    # depth rules, stated directly
    for prev, cur in zip(got, got[1:]):
        if prev["kind"] == call:
            eq(cur["depth"], prev["depth"] + 1, "first event after a call is one deeper")
        if cur["kind"] == ret:
            check(cur["depth"] <= prev["depth"], "a return is not deeper than what precedes it")
    ts = [e["ts"] for e in got]
    eq(ts, sorted(ts), "timestamps are monotonic")
    code = trace.codes[got[0]["code"]]
    eq((code["function"], code["module"], code["firstlineno"]),
       ("main", WORKLOAD_MODULE, L("def main():")), "CODE record")
    eq(code["lines"][str(L("total = add(1, 2)"))].strip(), "total = add(1, 2)", "CODE lines")
    check_bye(trace)
    return {"events": len(got), "backend": client.ready["backend"]}


@test
def two_sessions(ctx):
    """A second session in the same process sees the same events (state reset per session)."""
    tree = workload_query()
    first, _, _ = session(base_config(tree), wl.mixed, ctx.worker)
    second, _, _ = session(base_config(tree), wl.mixed, ctx.worker)
    a = shape(first.of_thread(ctx.worker.ident))
    b = shape(second.of_thread(ctx.worker.ident))
    eq(b, a, "second session vs first")
    eq(a, shape(matched(oracle(wl.mixed, tree))), "events vs the oracle")
    eq(sorted(c["function"] for c in second.codes.values()),
       sorted(c["function"] for c in first.codes.values()), "CODE records sent again")


@test
def threads(ctx):
    """Threads started before and after attach, and the main thread: names, idents, events."""
    tree = workload_query()
    expected = shape(matched(oracle(wl.main, tree)), with_depth=False)
    before_go = threading.Event()
    results = {}

    end = threading.Barrier(2, timeout=30)  # both alive at once: their idents differ

    def entry(name, wait):
        if wait is not None:
            wait.wait(30)
        results[name] = wl.main()
        end.wait()

    before = threading.Thread(target=entry, args=("before", before_go), name="before-attach")
    before.start()
    client = Client(base_config(tree))
    try:
        client.start_reader()
        if tracer.BACKEND == "settrace":
            eq(sys.gettrace(), MARKER, "sys.gettrace() while tracing")
        before_go.set()
        after = threading.Thread(target=entry, args=("after", None), name="after-attach")
        after.start()
        after.join(30)
        before.join(30)
        main_result = wl.main()
        trace = client.stop()
    except BaseException:
        client.abandon(5.0)
        raise
    eq(sorted(results.items()), [("after", 5), ("before", 5)], "thread results")
    eq(main_result, 5, "main thread result")
    by_ident = {t["ident"]: t for t in trace.threads.values()}
    for thread, name in ((before, "before-attach"), (after, "after-attach")):
        info = by_ident.get(thread.ident)
        check(info is not None, "no THREAD record for " + name)
        eq((info["name"], info["main"]), (name, False), "THREAD record of " + name)
        eq(shape(trace.of_thread(thread.ident), with_depth=False), expected,
                    "events of " + name)
    main = by_ident.get(threading.main_thread().ident)
    check(main is not None, "no THREAD record for the main thread")
    eq((main["name"], main["main"]), ("MainThread", True), "THREAD record of the main thread")
    eq(shape(trace.of_thread(main["ident"]), with_depth=False), expected,
                "main thread events")
    check(client.agent_ident not in by_ident, "the agent's thread is not traced")
    for ident in (before.ident, after.ident, main["ident"]):
        evs = trace.of_thread(ident)
        base = evs[0]["depth"]
        eq([e["depth"] - base for e in evs], [e[3] for e in shape(matched(oracle(wl.main, tree)))],
           "relative depths of thread %d" % ident)
    eq(len({t["id"] for t in trace.threads.values()}), len(trace.threads), "thread ids unique")
    check_bye(trace)
    return {"threads": sorted(t["name"] for t in trace.threads.values())}


@test
def code_cache(ctx):
    """decide() runs once per code object; BYE's "codes" counts them; CODE records once each."""
    counts = {}
    answers = {}
    original = agent.Session.decide

    def counting(self, code, frame):
        counts[code] = counts.get(code, 0) + 1
        answer = original(self, code, frame)
        answers[code] = answer
        return answer

    agent.Session.decide = counting
    try:
        def job():
            for _ in range(20):
                wl.mixed()
        trace, _, _ = session(base_config(workload_query()), job, ctx.worker)
    finally:
        agent.Session.decide = original
    repeated = {c.co_name: n for c, n in counts.items() if n != 1}
    eq(repeated, {}, "codes decided more than once")
    eq(trace.bye["codes"], len(counts), "BYE codes == decide() calls")
    sent = sorted(a[0] for a in answers.values() if a is not None)
    eq(sorted(trace.codes), sent, "CODE records == ids decide() handed out")
    names = sorted(trace.codes[e["code"]]["function"] for e in trace.of_thread(ctx.worker.ident)
                   if e["kind"] == "call")
    eq(sorted(set(names)), ["add", "fail", "gen", "main", "many", "mixed", "pad", "rec"],
       "workload functions seen")
    workload_codes = [c for c in counts if c.co_filename == wl.__file__]
    eq(len(workload_codes), 8, "workload code objects decided")
    check_bye(trace)
    return {"codes": len(counts)}


@test
def drop_mode(ctx):
    """Tiny buffer, drop=True, slow reader: DROP records; seen == sent + dropped exactly."""
    config = base_config(workload_query(), buffer_size=4096, drop=True)
    client = Client(config, sockbuf=4096, keep_payloads=True)
    try:
        client.start_reader(delay=0.02, chunk=4096)
        ctx.worker.run(lambda: wl.many(3000))
        client.delay = 0.0
        time.sleep(0.3)
        # one more event after the reader caught up: carries the last pending DROP count
        ctx.worker.run(lambda: wl.pad(0, ""))
        trace = client.stop()
    except BaseException:
        client.abandon(5.0)
        raise
    bye = trace.bye
    check(bye["dropped"] > 0, "nothing was dropped", bye)
    check(len(trace.drops) > 0, "no DROP records")
    check_bye(trace, dropped=bye["dropped"])
    eq(shape(trace.events[-3:], with_depth=False),
       [("call", "pad", line_of("def pad(a, s):")), ("line", "pad", line_of("return a")),
        ("return", "pad", line_of("return a"))],
       "the last events arrive after the reader caught up")
    return {"seen": bye["seen"], "sent": bye["sent"], "dropped": bye["dropped"],
            "drop_records": len(trace.drops),
            "payloads": [base64.b64encode(p).decode() for p in client.trace.payloads]}


@test
def lossless_mode(ctx):
    """Tiny buffer, drop=False, slow reader: nothing lost; the workload waits for the reader."""
    baseline_started = time.monotonic()
    wl.many(1000)
    baseline = time.monotonic() - baseline_started
    config = base_config(workload_query(), buffer_size=4096, drop=False)
    delay, chunk = 0.01, 4096
    client = Client(config, sockbuf=4096)
    try:
        client.start_reader(delay=delay, chunk=chunk)
        ctx.worker.run(lambda: wl.many(1000))
        elapsed = ctx.worker.elapsed
        trace = client.stop()
    except BaseException:
        client.abandon(5.0)
        raise
    check_bye(trace)
    eq(shape(trace.of_thread(ctx.worker.ident)),
                shape(matched(oracle(lambda: wl.many(1000), workload_query()))),
                "every event of many(1000)")
    total = sum(len(e["arg"] or "") + 28 + (4 if e["arg"] is not None else 0)
                for e in trace.events)
    # The reader takes at most `chunk` bytes per `delay`; buffers and the socket can absorb
    # a little. The workload cannot finish before the reader has taken the rest.
    slack = 2 * 4096 + 64 * 1024
    floor = max(0.0, (total - slack) / (chunk / delay)) * 0.5
    check(elapsed >= floor, "the workload did not wait for the reader",
          {"elapsed": elapsed, "floor": floor, "bytes": total})
    check(elapsed > 3 * baseline, "the workload was not slowed down",
          {"elapsed": elapsed, "baseline": baseline})
    return {"elapsed": round(elapsed, 3), "baseline": round(baseline, 4), "bytes": total}


@test
def lossless_threads(ctx):
    """Lossless mode with three threads producing at once and a slow reader: no loss, and no
    deadlock (a producer waiting for space must not hold the buffer lock while it takes the
    GIL back, or another thread holding the GIL blocks on that lock for good)."""
    config = base_config(workload_query(), buffer_size=4096, drop=False)
    client = Client(config, sockbuf=4096)
    done = []
    lock = _thread.allocate_lock()

    # All alive at once: contention, and distinct idents (a finished thread's is reused).
    start, end = threading.Barrier(3, timeout=30), threading.Barrier(3, timeout=30)

    def producer():
        try:
            start.wait()
            wl.many(300)
            end.wait()
        finally:
            with lock:
                done.append(_thread.get_ident())

    try:
        client.start_reader(delay=0.002, chunk=4096)
        for _ in range(3):
            threading.Thread(target=producer).start()
        ctx.worker.run(lambda: wl.many(300))
        deadline = time.monotonic() + 20
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        eq(len(done), 3, "producers finished")
        trace = client.stop()
    except BaseException:
        client.abandon(5.0)
        raise
    check_bye(trace)
    per_thread = [len(trace.of_thread(ident)) for ident in done + [ctx.worker.ident]]
    check(len(set(per_thread)) == 1 and per_thread[0] > 0, "every producer's events arrived",
          per_thread)


@test
def block_timeout(ctx):
    """The reader never reads: after block_timeout the session is dead, the workload goes on."""
    config = base_config(workload_query(), buffer_size=4096, drop=False, block_timeout=0.3)
    client = Client(config, sockbuf=4096)
    try:
        ctx.worker.run(lambda: wl.many(2000))
        first = ctx.worker.elapsed
        stats = tracer.stats()
        ctx.worker.run(lambda: wl.many(2000))
        second = ctx.worker.elapsed
        stats2 = tracer.stats()
    finally:
        client.abandon(15.0)
    eq(stats["dead"], 1, "dead after block_timeout")
    check(stats["dropped"] > 0, "events dropped once dead", stats)
    eq(stats["seen"], stats["sent"] + stats["dropped"], "seen == sent + dropped")
    eq(stats2["seen"], stats2["sent"] + stats2["dropped"], "seen == sent + dropped, later")
    # Once dead, a producer never waits: what fits in the buffers (the pump may still swap
    # the one it was sending) is kept, the rest is dropped.
    check(stats2["sent"] - stats["sent"] <= 2 * 4096 // protocol.EVENT.size,
          "at most two buffers more once dead", stats, stats2)
    check(stats2["dropped"] > stats["dropped"], "the second run's events are dropped", stats2)
    check(0.25 <= first < 5.0, "first run blocked about block_timeout", first)
    check(second < max(1.0, first), "no more waiting once dead", {"first": first,
                                                                   "second": second})
    check_clean(ctx)
    return {"first": round(first, 3), "second": round(second, 3), "stats": stats}


def check_clean(ctx, trace_hook=None, profile_hook=None, main_trace=None):
    eq(sys.gettrace(), main_trace, "sys.gettrace() on the main thread after the session")
    eq(sys.getprofile(), None, "sys.getprofile() on the main thread after the session")
    eq(ctx.worker.run(lambda: (sys.gettrace(), sys.getprofile())), (None, None),
       "gettrace/getprofile on the worker after the session")
    check(threading._trace_hook is trace_hook, "threading._trace_hook restored",
          threading._trace_hook)
    check(threading._profile_hook is profile_hook, "threading._profile_hook restored",
          threading._profile_hook)
    if hasattr(sys, "monitoring"):
        tools = [sys.monitoring.get_tool(i) for i in range(6)]
        eq(tools, ctx.tools_before, "sys.monitoring tools after the session")
        eq([sys.monitoring.get_events(i) for i in range(6)], [0] * 6, "monitoring events")


@test
def stop_and_cleanup(ctx):
    """STOP -> BYE; afterwards no tracer anywhere and the previous hooks are back."""

    def prev_trace(frame, event, arg):
        return None

    def prev_hook(frame, event, arg):
        return None

    def prev_profile_hook(frame, event, arg):
        return None

    threading.settrace(prev_hook)
    threading.setprofile(prev_profile_hook)
    sys.settrace(prev_trace)
    try:
        for tree in (workload_query(), workload_query(cmp("kind", "eq", "call"))):
            client = Client(base_config(tree))
            try:
                client.start_reader()
                if tracer.BACKEND == "settrace":
                    if client.ready["backend"] == "settrace":
                        eq(sys.gettrace(), MARKER, "sys.gettrace() while tracing")
                    else:
                        eq(sys.getprofile(), MARKER, "sys.getprofile() while profiling")
                else:
                    check("hunter-attach" in [sys.monitoring.get_tool(i) for i in range(6)],
                          "our monitoring tool while tracing")
                ctx.worker.run(wl.main)
                trace = client.stop()
            except BaseException:
                client.abandon(5.0)
                raise
            check_bye(trace)
            check(len(trace.events) > 0, "events")
            check_clean(ctx, prev_hook, prev_profile_hook, prev_trace)
    finally:
        sys.settrace(None)
        threading.settrace(None)
        threading.setprofile(None)
    check_clean(ctx)


@test
def failed_install(ctx):
    """The backend fails half-way through install (after the agent took a sys.monitoring tool
    id, or set threading's hook): the agent reports ERROR and leaves nothing behind."""

    class Broken:
        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            if name.startswith("mon_") or name == "install":
                raise RuntimeError("broken tracer: " + name)
            return getattr(self._real, name)

    a, b = socket.socketpair()
    done = _thread.allocate_lock()
    done.acquire()

    def serve():
        try:
            agent.serve(a, Broken(tracer), base_config(workload_query()))
        finally:
            done.release()

    _thread.start_new_thread(serve, ())
    reader = protocol.FrameReader()
    frames = []
    b.settimeout(10)
    while not frames:
        data = b.recv(65536)
        check(bool(data), "the agent closed the socket without a word")
        frames = reader.feed(data)
    check(done.acquire(True, 10), "agent.serve did not return")
    b.close()
    eq(frames[0][0], protocol.ERROR, "frame type")
    check("broken tracer" in json.loads(frames[0][1].decode())["message"], "ERROR message",
          frames[0][1])
    ctx.worker.run(wl.main)
    check_clean(ctx)


@test
def abandoned_session(ctx):
    """The CLI closes the socket without STOP: the agent detaches and cleans up."""
    client = Client(base_config(workload_query()))
    ctx.worker.run(wl.main)
    client.abandon(15.0)
    check_clean(ctx)
    ctx.worker.run(wl.main)


@test
def profile_backend(ctx):
    """Queries that need no line or exception events: the profile backend where the agent
    picks it (3.8-3.10: calls only; 3.11: calls and returns), same events as the oracle."""
    for kinds in (["call"], ["call", "return"]):
        tree = workload_query(cmp("kind", "in", kinds))
        expected = matched(oracle(wl.mixed, tree))
        trace, client, _ = session(base_config(tree), wl.mixed, ctx.worker)
        if tracer.BACKEND == "monitoring":
            backend = "monitoring"
        elif kinds == ["call"] or sys.version_info >= (3, 11):
            backend = "profile"
        else:
            backend = "settrace"
        eq(client.ready["backend"], backend, "backend for kinds %s" % kinds)
        eq(shape(trace.of_thread(ctx.worker.ident)), shape(expected),
                    "events vs the oracle, kinds %s" % kinds)
        check_bye(trace)


@test
def return_line_after_loop(ctx):
    """The return event of a function whose ``for`` loop ran out carries the line sys.settrace
    (and so hunter) reports: the ``for`` line (3.8-3.10 compute it differently from f_lasti)."""
    def job():
        return list(wl.gen(2))
    for tree in (workload_query(), workload_query(cmp("kind", "in", ["call", "return"]))):
        expected = [e for e in shape(matched(oracle(job, tree))) if e[0] == "return"]
        trace, _, _ = session(base_config(tree), job, ctx.worker)
        got = [e for e in shape(trace.of_thread(ctx.worker.ident)) if e[0] == "return"]
        eq(got, expected, "return events")
        eq(expected[-1][2], line_of("for i in range(n):"), "the oracle's last return line")


PROGRAM_TREE = workload_query(
    {"op": "or", "args": [
        {"op": "and", "args": [cmp("depth", "lt", 2), cmp("kind", "in", ["call", "return"])]},
        cmp("lineno", "in", [line_of("c = a + b"), line_of("total += v"), 10**30]),
        {"op": "and", "args": [cmp("kind", "eq", "exception"),
                               {"op": "not", "arg": cmp("threadid", "eq", None)}]},
        {"op": "and", "args": [cmp("calls", "gte", 9), cmp("depth", "gte", 4),
                               cmp("kind", "eq", "line")]},
    ]},
    cmp("threadname", "startswith", "Thread-"),
)


@test
def program(ctx):
    """A residual program (depth_lt, kind, lineno_in, threadid, calls) and a PY predicate
    (threadname): the C evaluator against filters.run_program, event by event.

    The C calls pypred (the one PY op) for every event of a code object with a program, with
    its own depth and calls: recorded here with the program and the PY op's answer. Each such
    event must be the oracle's event at the same position (same kind, function, depth, calls),
    and it must have been emitted exactly when run_program, on those inputs and the oracle's
    line number, says so."""
    tree = PROGRAM_TREE
    seen = []
    original = filters.Filter.pypred

    def recording(self, index, frame, kind, arg, depth, calls):
        answer = original(self, index, frame, kind, arg, depth, calls)
        if _thread.get_ident() == ctx.worker.ident:
            module = frame.f_globals.get("__name__")
            decision = self.decide(frame.f_code, module, frame.f_globals.get("__file__"))
            seen.append({"kind": kind, "function": frame.f_code.co_name, "depth": depth,
                         "calls": calls, "module": module, "program": decision.program,
                         "py": {index: bool(answer)}})
        return answer

    expected = [e for e in oracle(wl.mixed, tree)]
    filters.Filter.pypred = recording
    try:
        trace, _, _ = session(base_config(tree), wl.mixed, ctx.worker)
    finally:
        filters.Filter.pypred = original
    got = shape(trace.of_thread(ctx.worker.ident))
    evaluated = [e for e in seen if e["module"] == WORKLOAD_MODULE]
    eq([(protocol.KINDS[e["kind"]], e["function"], e["depth"], e["calls"]) for e in evaluated],
       [(e["kind"], e["function"], e["depth"], e["calls"]) for e in expected],
       "the C's inputs (kind, depth, calls) for every event vs the oracle")
    ident = ctx.worker.ident
    decided = []
    for c_event, o_event in zip(evaluated, expected):
        check(c_event["program"] is not None and len(c_event["py"]) == 1, "one PY op", c_event)
        answer = filters.run_program(
            c_event["program"], c_event["kind"], c_event["depth"], o_event["lineno"],
            c_event["calls"], -1 if ident == main_ident else ident, c_event["py"].__getitem__)
        if answer:
            decided.append(o_event)
    eq(got, shape(decided), "emitted vs run_program on the C's own inputs")
    eq(got, shape(matched(expected)), "emitted vs the settrace oracle")
    check(0 < len(got) < len(expected), "the program selects some events", len(got))
    check_bye(trace)
    return {"evaluated": len(evaluated), "emitted": len(got)}


@test
def malformed_programs(ctx):
    """Programs the compiler never makes evaluate to False in C, and do not crash it."""
    bad = [
        [], [2], [3], [4], [5], [6, 0, 0], [7, 0, 5, 1], [7, 0, -1], [99], [8],
        [0, 0], [1] * 65, [6, 7, 0, 0], [6, 0, 9, 0],
    ]
    import array
    original = filters.Filter.decide
    state = {"i": 0}

    def decide(self, code, module_name, module_file=None):
        decision = original(self, code, module_name, module_file)
        if module_name == WORKLOAD_MODULE and not decision.never:
            prog = bad[state["i"] % len(bad)]
            state["i"] += 1
            return filters.Decision(False, array.array("q", prog), 0b1111)
        return decision

    filters.Filter.decide = decide
    try:
        trace, _, _ = session(base_config(workload_query()), wl.mixed, ctx.worker)
    finally:
        filters.Filter.decide = original
    eq(trace.of_thread(ctx.worker.ident), [], "events emitted by malformed programs")
    check(state["i"] >= 8, "malformed programs installed", state["i"])


# ---- driver --------------------------------------------------------------------------------------

class Context:
    pass


main_ident = None


def main(argv):
    global pkg, agent, protocol, filters, tracer, wl, main_ident
    if "--list" in argv:
        print(json.dumps([t.__name__ for t in TESTS]))
        return 0
    tracer_path, src_dir = argv[0], argv[1]
    only = skip = ()
    if "--only" in argv:
        only = set(argv[argv.index("--only") + 1].split(","))
    if "--skip" in argv:
        skip = set(argv[argv.index("--skip") + 1].split(","))
    main_ident = threading.main_thread().ident
    modules = MODULES
    if "--modules" in argv:
        modules = tuple(argv[argv.index("--modules") + 1].split(","))
    pkg = load_package(src_dir, tracer_path, modules)
    agent, protocol, filters, tracer = pkg.agent, pkg.protocol, pkg.filters, pkg._tracer
    wl = load_workload()
    ctx = Context()
    ctx.worker = Worker()
    ctx.tools_before = ([sys.monitoring.get_tool(i) for i in range(6)]
                        if hasattr(sys, "monitoring") else None)
    print(json.dumps({"python": list(sys.version_info[:3]), "backend": tracer.BACKEND}),
          flush=True)
    for func in TESTS:
        if (only and func.__name__ not in only) or func.__name__ in skip:
            continue
        started = time.monotonic()
        # A hang prints every thread's stack to stderr and ends the process.
        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
        record = {"test": func.__name__, "ok": True, "error": None, "data": None}
        try:
            record["data"] = func(ctx)
        except BaseException:
            record["ok"] = False
            record["error"] = traceback.format_exc()
        faulthandler.cancel_dump_traceback_later()
        record["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(record), flush=True)
    ctx.worker.close()
    print(json.dumps({"done": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
