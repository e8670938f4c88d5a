"""JSON lines, Perfetto and summary renderers, fed with events of real code (a small
sys.settrace tracer that builds our ``Event`` objects the way the agent does) and with generated
streams (hypothesis) that lose returns, calls and whole stretches, as filters and drops do."""

from __future__ import annotations

import io
import json
import linecache
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from hunter.util import safe_repr
from hypothesis import given, settings
from hypothesis import strategies as st

from hunter_attach.events import CodeInfo, Event, ThreadInfo
from hunter_attach.render import (
    DROP_SCHEMA,
    EVENT_SCHEMA,
    JsonRenderer,
    PerfettoRenderer,
    Renderer,
    RenderOptions,
    SummaryRenderer,
    make_renderers,
)
from hunter_attach.render.text import CallTextRenderer

# -- a tiny JSON-Schema subset validator --------------------------------------------------------

_TYPES: Dict[str, Any] = {
    "object": dict, "array": list, "string": str, "null": type(None), "boolean": bool,
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(value: Any, schema: Dict[str, Any], path: str = "$") -> List[str]:
    """Errors of ``value`` against ``schema``: type, enum, const, minimum, properties, required,
    additionalProperties (false), items, minItems, maxItems, allOf, if/then."""
    errors: List[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            return [f"{path}: {value!r} is not of type {types}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} != {schema['const']!r}")
    if "minimum" in schema and _is_type(value, "number") and value < schema["minimum"]:
        errors.append(f"{path}: {value!r} < {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing {key!r}")
        for key, item in value.items():
            if key in props:
                errors += validate(item, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {key!r}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += validate(item, schema["items"], f"{path}[{i}]")
    for sub in schema.get("allOf", []):
        if "if" in sub:
            if not validate(value, sub["if"], path):
                errors += validate(value, sub.get("then", {}), path)
        else:
            errors += validate(value, sub, path)
    return errors


def test_validator_rejects() -> None:
    good = {"kind": "line", "filename": "f", "function": "g", "qualname": "g", "module": "m",
            "lineno": 1, "source": "", "depth": 0, "threadid": None, "threadname": "t",
            "arg": None, "ts": 0.5, "pid": 1, "seq": 0}
    assert validate(good, EVENT_SCHEMA) == []
    assert validate(dict(good, arg="x"), EVENT_SCHEMA)  # a line has no arg
    assert validate(dict(good, kind="call", arg="x"), EVENT_SCHEMA)  # a call's is a list
    assert validate(dict(good, kind="call", arg=[["a"]]), EVENT_SCHEMA)
    assert validate(dict(good, lineno="1"), EVENT_SCHEMA)
    assert validate(dict(good, extra=1), EVENT_SCHEMA)
    assert validate({k: v for k, v in good.items() if k != "seq"}, EVENT_SCHEMA)
    assert validate(dict(good, kind="return", arg="None"), EVENT_SCHEMA) == []


# -- events of real code ------------------------------------------------------------------------


class MiniAgent:
    """sys.settrace tracer producing our Events: per-thread depth as hunter counts it, arguments
    as [name, safe_repr] pairs, interned CodeInfo/ThreadInfo."""

    def __init__(self, only: str) -> None:
        self.only = only
        self.events: List[Event] = []
        self.codes: Dict[Any, CodeInfo] = {}
        self.threads: Dict[threading.Thread, ThreadInfo] = {}
        self.depth: Dict[int, int] = {}
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def trace(self, frame: Any, kind: str, arg: Any) -> Any:
        ident = threading.get_ident()
        depth = self.depth.get(ident, 0)
        if kind == "return" and depth > 0:
            depth -= 1
        self.depth[ident] = depth + 1 if kind == "call" else depth
        code = frame.f_code
        if code.co_filename == self.only:
            with self.lock:
                self.events.append(self.make(frame, kind, arg, depth, ident))
        return self.trace

    def make(self, frame: Any, kind: str, arg: Any, depth: int, ident: int) -> Event:
        code = frame.f_code
        info = self.codes.get(code)
        if info is None:
            numbers = {n for _, _, n in code.co_lines() if n}
            info = self.codes[code] = CodeInfo(
                id=len(self.codes), filename=code.co_filename,
                module=frame.f_globals.get("__name__", "?"), function=code.co_name,
                qualname=code.co_qualname, firstlineno=code.co_firstlineno, stdlib=False,
                lines={n: linecache.getline(code.co_filename, n) for n in numbers})
        # Keyed by the thread, not its ident: a finished thread's ident is soon reused.
        current = threading.current_thread()
        thread = self.threads.get(current)
        if thread is None:
            thread = self.threads[current] = ThreadInfo(
                id=len(self.threads), ident=ident, name=current.name,
                main=current is threading.main_thread())
        text: Optional[str] = None
        if kind == "call":
            names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
            text = json.dumps([[n, safe_repr(frame.f_locals.get(n))] for n in names])
        elif kind in ("return", "exception"):
            text = safe_repr(arg)
        return Event(kind=kind, code=info, thread=thread, lineno=frame.f_lineno, depth=depth,
                     ts=time.monotonic() - self.t0, arg=text, seq=len(self.events),
                     pid=os.getpid())


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def fails(n: int) -> int:
    try:
        raise KeyError(n)
    except KeyError:
        return -n


def count(n: int) -> Any:
    for i in range(n):
        yield fails(i)


def job(n: int) -> int:
    return fib(n) + sum(count(3))


def workload() -> None:
    threads = [threading.Thread(target=job, args=(k,), name=f"job-{k}") for k in (5, 6)]
    for t in threads:
        t.start()
    job(4)
    for t in threads:
        t.join()


def real_events() -> List[Event]:
    agent = MiniAgent(__file__)
    sys.settrace(agent.trace)
    threading.settrace(agent.trace)
    try:
        workload()
    finally:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
    return agent.events


def feed(renderer: Any, events: List[Event]) -> None:
    for ev in events:
        renderer.event(ev)
    renderer.close()


# -- JSON lines ---------------------------------------------------------------------------------


def test_json_lines_validate_and_round_trip() -> None:
    events = real_events()
    out = io.StringIO()
    feed(JsonRenderer(out), events)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(events)
    kinds = set()
    for line, ev in zip(lines, events):
        obj = json.loads(line)
        assert validate(obj, EVENT_SCHEMA) == [], line
        kinds.add(obj["kind"])
        assert (obj["kind"], obj["lineno"], obj["depth"], obj["seq"], obj["pid"]) == \
            (ev.kind, ev.lineno, ev.depth, ev.seq, ev.pid)
        assert obj["threadid"] == ev.threadid and obj["threadname"] == ev.threadname
        assert obj["source"] == ev.source.rstrip("\n")
        assert obj["qualname"] == ev.code.qualname
        if ev.kind == "call":
            assert [tuple(p) for p in obj["arg"]] == ev.args
        else:
            assert obj["arg"] == ev.arg
        assert obj["ts"] == ev.ts
    assert kinds == {"call", "line", "return", "exception"}
    assert any(json.loads(line)["threadid"] is None for line in lines)
    assert any(json.loads(line)["threadid"] is not None for line in lines)


def test_json_odd_values() -> None:
    code = CodeInfo(id=1, filename='we"ird\\path\n.py', module="m", function="f",
                    qualname="f", firstlineno=1, stdlib=False, lines={1: "x = 'ü€'\n"})
    thread = ThreadInfo(id=1, ident=2 ** 63, name='na"me', main=False)
    out = io.StringIO()
    r = JsonRenderer(out)
    r.event(Event("call", code, thread, 1, 0, 1e-9, None, 0, 1))
    r.event(Event("call", code, thread, 1, 0, 2.5, "not json", 1, 1))
    r.event(Event("return", code, thread, 1, 0, 3.0, "'\u2028\x00'", 2, 1))
    r.event(Event("line", code, thread, 7, 0, 3.5, None, 3, 1))
    r.close()
    objs = [json.loads(line) for line in out.getvalue().splitlines()]
    for obj in objs:
        assert validate(obj, EVENT_SCHEMA) == []
    assert objs[0]["arg"] == [] and objs[0]["filename"] == 'we"ird\\path\n.py'
    assert objs[1]["arg"] == [["?", "not json"]]
    assert objs[2]["arg"] == "'\u2028\x00'" and objs[2]["threadid"] == 2 ** 63
    assert objs[3]["source"].startswith("??? NO SOURCE")
    assert out.getvalue().isascii()  # safe for any stdout encoding


def test_drop_markers_in_json_and_text() -> None:
    events = real_events()[:20]
    jout, tout = io.StringIO(), io.StringIO()
    renderers: List[Renderer] = [JsonRenderer(jout), CallTextRenderer(tout)]
    for i, ev in enumerate(events):
        if i == 10:
            for r in renderers:
                r.drop(123, 4560)
        for r in renderers:
            r.event(ev)
    renderers[0].drop(5, 9999, pid=42)
    for r in renderers:
        r.close()
    jlines = jout.getvalue().splitlines()
    assert json.loads(jlines[10]) == {"kind": "drop", "count": 123, "seq": 4560}
    assert validate(json.loads(jlines[10]), DROP_SCHEMA) == []
    assert json.loads(jlines[-1]) == {"kind": "drop", "count": 5, "seq": 9999, "pid": 42}
    assert all(validate(json.loads(line), EVENT_SCHEMA) == []
               for i, line in enumerate(jlines) if i not in (10, len(jlines) - 1))
    tlines = tout.getvalue().splitlines()
    assert "123 events dropped" in tlines[10] and tlines[10].startswith("hunter-trace: ")


# -- Perfetto -----------------------------------------------------------------------------------


def ns(value: Any) -> int:
    """Microsecond text (with ns decimals) as integer nanoseconds, without float error."""
    whole, _, frac = str(value).partition(".")
    return int(whole) * 1000 + int((frac + "000")[:3])


def load_perfetto(path: str) -> Dict[str, Any]:
    with open(path) as f:
        text = f.read()
    # Timestamps must stay exact: parse numbers as text.
    return json.loads(text, parse_float=str, parse_int=str)


def check_nesting(trace: Dict[str, Any]) -> Dict[Tuple[str, str], List[Tuple[int, int]]]:
    slices: Dict[Tuple[str, str], List[Tuple[int, int]]] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            start, dur = ns(e["ts"]), ns(e["dur"])
            assert dur >= 0
            slices.setdefault((e["pid"], e["tid"]), []).append((start, start + dur))
    for spans in slices.values():
        # In file order per track (parents before children), every slice either nests inside
        # the enclosing open one or starts after it ended.
        stack: List[Tuple[int, int]] = []
        for start, end in spans:
            while stack and start >= stack[-1][1] and not (start == end == stack[-1][1]):
                stack.pop()
            if stack:
                assert stack[-1][0] <= start and end <= stack[-1][1], (stack[-1], start, end)
            stack.append((start, end))
        # And pairwise, as the definition says: nested or disjoint.
        for i, (s1, e1) in enumerate(spans):
            for s2, e2 in spans[i + 1:]:
                assert (s1 <= s2 and e2 <= e1) or (s2 <= s1 and e1 <= e2) \
                    or e1 <= s2 or e2 <= s1, ((s1, e1), (s2, e2))
    return slices


def test_perfetto_real_code(tmp_path: Any) -> None:
    events = real_events()
    path = str(tmp_path / "trace.json")
    feed(PerfettoRenderer(path), events)
    trace = load_perfetto(path)
    assert trace["displayTimeUnit"] == "ms"
    slices = check_nesting(trace)
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(names.values()) == ["MainThread", "job-5", "job-6"]
    assert set(slices) == set(names)  # one track per thread, every slice on a named track
    pid = str(os.getpid())
    assert names[(pid, pid)] == "MainThread"
    assert all(int(tid) < 2 ** 32 for _, tid in names)
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == sum(ev.kind == "call" for ev in events)
    fib_slice = next(e for e in xs if e["name"] == "fib")
    assert fib_slice["args"]["module"] == __name__
    assert fib_slice["args"]["filename"] == __file__
    assert fib_slice["cat"] == "python"
    instants = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    assert len(instants) == sum(ev.kind == "exception" for ev in events) > 0
    assert all(e["name"].startswith("exception in ") and "KeyError" in e["args"]["exception"]
               for e in instants)


def test_perfetto_closes_open_calls_and_leaves_no_temp(tmp_path: Any) -> None:
    events = real_events()
    cut = next(i for i, ev in enumerate(events) if ev.kind == "call" and ev.depth >= 3)
    path = tmp_path / "trace.json"
    path.write_text("previous")
    r = PerfettoRenderer(str(path))
    feed(r, events[:cut + 5])
    trace = load_perfetto(str(path))
    check_nesting(trace)
    last = max(ns(f"{ev.ts * 1e6:.3f}") for ev in events[:cut + 5])
    ends = [ns(e["ts"]) + ns(e["dur"]) for e in trace["traceEvents"] if e["ph"] == "X"]
    assert max(ends) == last
    assert sorted(os.listdir(tmp_path)) == ["trace.json"]
    r.close()  # idempotent
    assert load_perfetto(str(path)) == trace


# -- synthetic streams --------------------------------------------------------------------------

MAIN = ThreadInfo(id=0, ident=140000000000001, name="MainThread", main=True)
OTHER = ThreadInfo(id=1, ident=140000000000002, name="Thread-1", main=False)
CODES = [CodeInfo(id=i, filename=f"/app/m{i % 2}.py", module=f"m{i % 2}", function=f"f{i}",
                  qualname=f"C.f{i}", firstlineno=10 * i, stdlib=False) for i in range(4)]


def synthetic(ops: List[Tuple[int, int, int]], pid: int = 500) -> List[Event]:
    """Turn (thread, op, code) choices into a consistent stream: op 0 calls code, op 1 returns
    from the innermost call, op 2 raises in it. Per-thread depth as hunter counts it."""
    events: List[Event] = []
    stacks: Dict[int, List[CodeInfo]] = {0: [], 1: []}
    ts = 0.0
    for which, op, ci in ops:
        thread = (MAIN, OTHER)[which]
        stack = stacks[which]
        ts += 0.000_001 * (1 + ci)
        if op == 0 or not stack:
            code = CODES[ci]
            events.append(Event("call", code, thread, code.firstlineno, len(stack), ts,
                                json.dumps([["x", str(ci)]]), len(events), pid))
            stack.append(code)
        elif op == 1:
            code = stack.pop()
            events.append(Event("return", code, thread, code.firstlineno + 1, len(stack), ts,
                                "None", len(events), pid))
        else:
            code = stack[-1]
            events.append(Event("exception", code, thread, code.firstlineno + 2, len(stack), ts,
                                "(KeyError, KeyError(1), None)", len(events), pid))
    return events


ops_strategy = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2), st.integers(0, 3)),
                        max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy, keep=st.lists(st.booleans(), min_size=80, max_size=80))
def test_generated_streams(tmp_path_factory: Any, ops: List[Tuple[int, int, int]],
                           keep: List[bool]) -> None:
    # Losing arbitrary events (filters, drops) must never break nesting or the counts.
    events = [ev for ev, k in zip(synthetic(ops), keep + [True] * len(ops)) if k]
    path = str(tmp_path_factory.mktemp("p") / "t.json")
    feed(PerfettoRenderer(path), events)
    trace = load_perfetto(path)
    check_nesting(trace)
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    calls = [ev for ev in events if ev.kind == "call"]
    assert len(xs) == len(calls)
    summary = SummaryRenderer(io.StringIO())
    feed(summary, events)
    assert sum(r[1] for r in summary.rows()) == len(calls)
    for key, _, total, own in summary.rows():
        assert total >= -1e-12 and own >= -1e-12, key
    jout = io.StringIO()
    feed(JsonRenderer(jout), events)
    assert all(validate(json.loads(line), EVENT_SCHEMA) == []
               for line in jout.getvalue().splitlines())


# -- summary ------------------------------------------------------------------------------------


def ev(kind: str, code: CodeInfo, depth: int, ts: float, thread: ThreadInfo = MAIN) -> Event:
    return Event(kind, code, thread, code.firstlineno, depth, ts,
                 "[]" if kind == "call" else "None", 0, 1)


def test_summary_numbers() -> None:
    a, b, c = CODES[0], CODES[1], CODES[2]
    events = [
        ev("call", a, 0, 0.0),
        ev("call", b, 1, 1.0),
        ev("call", b, 2, 2.0),  # recursion: counted once in b's total
        ev("return", b, 2, 3.0),
        ev("return", b, 1, 5.0),
        ev("call", c, 1, 6.0),
        # c's return is lost; the next call at the same depth ends it
        ev("call", c, 1, 7.0),
        ev("return", c, 1, 7.5),
        ev("return", a, 0, 10.0),
        ev("call", c, 0, 10.0, OTHER),  # still open at close: ends at the last timestamp
        ev("line", c, 1, 12.0, OTHER),
    ]
    out = io.StringIO()
    s = SummaryRenderer(out)
    feed(s, events)
    rows = {key: (calls, total, own) for key, calls, total, own in s.rows()}
    assert rows == {
        "m0.C.f0": (1, 10.0, 10.0 - 4.0 - 1.0 - 0.5),
        "m1.C.f1": (2, 4.0, 4.0),
        "m0.C.f2": (3, 1.0 + 0.5 + 2.0, 3.5),
    }
    assert [r[0] for r in s.rows()] == ["m0.C.f0", "m1.C.f1", "m0.C.f2"]
    table = out.getvalue().splitlines()
    assert table[0].split() == ["%", "own", "total", "s", "own", "s", "usecs/call", "calls",
                                "function"]
    assert table[2].split() == ["37.50", "10.000000", "4.500000", "10000000.0", "1", "m0.C.f0"]
    assert table[-1].split() == ["100.00", "12.000000", "6", "total"]
    # Aligned: the function column starts at the same place on every line.
    assert len({line.rindex(word) for line, word in zip(
        table, ["function", "--------", "m0.C.f0", "m1.C.f1", "m0.C.f2", "--------", "total"])}) \
        == 1


def test_summary_counts_match_json_calls() -> None:
    events = real_events()
    jout, sout = io.StringIO(), io.StringIO()
    summary = SummaryRenderer(sout)
    for r in (JsonRenderer(jout), summary):
        feed(r, events)
    objs = [json.loads(line) for line in jout.getvalue().splitlines()]
    per_function: Dict[str, int] = {}
    for obj in objs:
        if obj["kind"] == "call":
            key = obj["module"] + "." + obj["qualname"]
            per_function[key] = per_function.get(key, 0) + 1
    assert {key: calls for key, calls, _, _ in summary.rows()} == per_function
    assert sout.getvalue().splitlines()[-1].split()[-2:] == [
        str(sum(per_function.values())), "total"]
    assert per_function[__name__ + ".fib"] == 15 + 25 + 9


def test_summary_mentions_drops() -> None:
    out = io.StringIO()
    s = SummaryRenderer(out)
    s.drop(7, 100)
    s.close()
    assert "7 events were dropped" in out.getvalue()


# -- make_renderers -----------------------------------------------------------------------------


def test_make_renderers_combinations(tmp_path: Any) -> None:
    stream, err = io.StringIO(), io.StringIO()
    path = str(tmp_path / "p.json")
    opts = RenderOptions(json=True, perfetto=path, summary=True, summary_stream=err)
    renderers = make_renderers(opts, stream)
    assert [type(r) for r in renderers] == [JsonRenderer, PerfettoRenderer, SummaryRenderer]
    events = real_events()
    for e in events:
        for r in renderers:
            r.event(e)
    for r in renderers:
        r.flush()
        r.close()
    assert len(stream.getvalue().splitlines()) == len(events)
    assert "total" in err.getvalue()
    assert os.path.exists(path)
    quiet = make_renderers(RenderOptions(quiet=True, summary=True), stream)
    assert [type(r) for r in quiet] == [SummaryRenderer]
    (text,) = make_renderers(RenderOptions(multi_process=True, color="never"), stream)
    assert isinstance(text, CallTextRenderer)
    text.event(events[0])
    assert stream.getvalue().splitlines()[-1].startswith(f"[{os.getpid()}]")
