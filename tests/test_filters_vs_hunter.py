"""filters.py against hunter 3.9, event by event.

A varied workload runs under one ``sys.settrace`` function that mirrors hunter's pure-Python
Tracer (hunter/tracer.py: depth and calls are per tracer, decremented before a return event,
incremented after a call event). For every event and every query it asks:

- hunter's pure-Python predicates (hunter/predicates.py) on a hunter Event (hunter/event.py),
- our ``Filter.match_event``,
- our ``Filter.decide`` + ``run_program`` + ``pypred``, the way the C tracer uses them (a ``never``
  code or a kind outside ``Decision.kinds`` counts as no match),

and requires the three answers to agree. The queries go through our parser and through hunter's
helpers from the same text.

Deliberate differences (see filters.py and docs/internals.md), handled here:

- ``<frozen ...>`` files are stdlib for us, and a finished thread's last events keep its name
  (hunter creates a ``Dummy-N`` thread there): the reference Event below does the same.
- an event where hunter's predicate raises is not compared (we answer False; hunter would stop).
- From state is per thread for us: the comparison uses ``per_thread_state=False``; a separate
  test covers the per-thread behaviour.
- hunter's default Cython build differs from its pure-Python build (``_in`` on ints and
  ``_contains`` on dicts raise there); the pure-Python build is the reference.
"""

from __future__ import annotations

import _thread
import functools
import json
import os
import subprocess
import sys
import threading
import types
from typing import Any, Dict, List, Tuple

import hunter.event
import hunter.predicates as hp
import hunter.util
import pytest

from hunter_attach import filters
from hunter_attach.filters import Filter, run_program
from hunter_attach.query import parse_query

# --- the workload --------------------------------------------------------------------------------


def passthrough(func: Any) -> Any:
    return func


def wrapping(func: Any) -> Any:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


class Widget:
    @passthrough
    @passthrough
    def multi_line(
        self,
        x: int,
        y: int = 2,
    ) -> int:
        total = x + y
        return total

    @wrapping
    def decorated(self, value: int) -> int:
        return value * 2

    @property
    def prop(self) -> int:
        return 42


def work_inner(x: int) -> int:
    y = x + 1
    return y


def work_gen(n: int) -> Any:
    for i in range(n):  # noqa: UP028 (the loop is there for its line events)
        yield i


def work_raise() -> None:
    raise ValueError("boom")


def work_outer(n: int) -> str:
    total = 0
    for v in work_gen(n):
        total += work_inner(v)
    try:
        work_raise()
    except ValueError:
        total += 1
    w = Widget()
    total += w.multi_line(1)
    total += w.decorated(3)
    total += w.prop
    json.dumps({"a": [1, 2], "b": "hello"}, indent=1)
    os.path.join("a", "b")
    total += (lambda q: q + 1)(2)
    return "hello"


def thread_body() -> None:
    work_outer(2)


def workload() -> None:
    work_outer(3)
    for i in range(2):  # one after another, so the shared depth stays meaningful
        thread = threading.Thread(target=thread_body, name=f"worker-{i + 1}")
        thread.start()
        thread.join()
    work_inner(41)


# --- hunter's side: pure-Python predicates and helpers ------------------------------------------


THIS_THREAD = threading.local()  # .name: the name while threading knew the thread


class RefEvent(hunter.event.Event):
    """hunter's Event, with our deliberate changes to ``stdlib`` and ``threadname``."""

    @hunter.util.cached_property
    def stdlib(self) -> bool:
        if self.filename.startswith("<frozen "):
            return True
        return bool(hunter.event.Event.stdlib.func(self))

    @hunter.util.cached_property
    def _thread(self) -> Any:
        # hunter calls current_thread(), which makes a Dummy-N thread for a thread that has
        # already left threading's registry (its last events). Its threadid and threadname
        # both come from here.
        ident = threading.get_ident()
        thread = threading._active.get(ident)  # type: ignore[attr-defined]
        if thread is None:
            return types.SimpleNamespace(ident=ident, name=THIS_THREAD.name)
        THIS_THREAD.name = thread.name
        return thread

    def clone(self) -> RefEvent:  # hunter's clone makes a plain Event
        event = RefEvent.__new__(RefEvent)
        event.__dict__ = dict(self.__dict__)
        return event


# hunter/__init__.py's helper functions, bound to the pure-Python predicate classes.
def _flatten(cls: Any, predicate: Any, *predicates: Any) -> Any:
    if not predicates:
        return predicate
    everything: List[Any] = []
    for p in (predicate, *predicates):
        everything.extend(p.predicates if isinstance(p, cls) else [p])
    return cls(*everything)


def Q(*predicates: Any, **query: Any) -> Any:
    if predicates:
        if query:
            predicates += (hp.Query(**query),)
        return And(*predicates)
    return hp.Query(**query)


def And(*predicates: Any, **kwargs: Any) -> Any:
    if kwargs:
        predicates += (hp.Query(**kwargs),)
    return _flatten(hp.And, *predicates)


def Or(*predicates: Any, **kwargs: Any) -> Any:
    if kwargs:
        predicates += tuple(hp.Query(**{key: value}) for key, value in kwargs.items())
    return _flatten(hp.Or, *predicates)


def Not(*predicates: Any, **kwargs: Any) -> Any:
    if kwargs:
        predicates += (hp.Query(**kwargs),)
    if len(predicates) > 1:
        return hp.Not(_flatten(hp.And, *predicates))
    return hp.Not(*predicates)


def From(condition: Any = None, predicate: Any = None, watermark: int = 0, **kwargs: Any) -> Any:
    if predicate is None and condition is None:
        cond = {k: v for k, v in kwargs.items() if not k.startswith(("depth", "calls"))}
        pred = {k: v for k, v in kwargs.items() if k.startswith(("depth", "calls"))}
        return hp.From(Q(**cond), Q(**pred), watermark)
    assert not kwargs
    return hp.From(condition, predicate, watermark)


HUNTER_NAMES = {"Q": Q, "And": And, "Or": Or, "Not": Not, "From": From, "__builtins__": {}}

# --- the queries ---------------------------------------------------------------------------------

MOD = __name__
THIS = __file__
JSON_DIR = os.path.dirname(json.__file__)
INNER_LINE = work_inner.__code__.co_firstlineno
OUTER_LINE = work_outer.__code__.co_firstlineno
BIG = 2**63 + 5
PY38_CANDIDATES = ("/root/.pyenv/versions/3.8.18/bin/python", "/usr/bin/python3.8")
PY38 = next((p for p in PY38_CANDIDATES if os.path.exists(p)), "")

FIELD_CASES = [
    # kind
    "Q(kind='call')", "Q(kind='line')", "Q(kind='return')", "Q(kind='exception')",
    "Q(kind_in=('call', 'exception'))", "Q(kind_in='call return')", "Q(kind_contains='e')",
    "Q(kind_has='ll')", "Q(kind_startswith='re')", "Q(kind_sw=('c', 'l'))",
    "Q(kind_endswith='n')", "Q(kind_ew=('e', 'l'))", "Q(kind_regex='^(call|line)$')",
    "Q(kind_rx='.*ion')", "Q(kind_lt='line')", "Q(kind_lte='exception')", "Q(kind_gt='line')",
    "Q(kind_gte='line')",
    # function
    "Q(function='work_inner')", "Q(function_in=['work_inner', 'work_gen', 'join'])",
    "Q(function_contains='inner')", "Q(function_has='gen')",
    "Q(function_startswith=('work_', 'dumps'))", "Q(function_sw='work_')",
    "Q(function_endswith='inner')", "Q(function_ew=('_gen', 'join'))",
    "Q(function_regex='^work_(in|ge)')", "Q(function_rx='<')", "Q(function_lt='m')",
    "Q(function_lte='work_gen')", "Q(function_gt='work')", "Q(function_gte='work_inner')",
    "Q(function_in='work_outer_and_more')",
    # module
    f"Q(module={MOD!r})", "Q(module='posixpath')", "Q(module='json.encoder')",
    f"Q(module_in=[{MOD!r}, 'json'])", "Q(module_contains='json')", "Q(module_has='thread')",
    "Q(module_startswith='json')", "Q(module_sw=('json', 'posix'))", "Q(module_endswith='encoder')",
    "Q(module_ew='ing')", "Q(module_regex='^js')", "Q(module_rx='.*path')", "Q(module_lt='k')",
    "Q(module_lte='json')", "Q(module_gt='json')", f"Q(module_gte={MOD!r})",
    # filename
    f"Q(filename={THIS!r})", f"Q(filename_in=[{THIS!r}])", "Q(filename_contains='json')",
    "Q(filename_has='frozen')", f"Q(filename_startswith={JSON_DIR!r})",
    "Q(filename_sw=('<', '/nonexistent'))", "Q(filename_endswith='.py')",
    "Q(filename_ew=('threading.py', '>'))", "Q(filename_regex='.*threading')",
    "Q(filename_rx='<frozen')", "Q(filename_lt='/s')", "Q(filename_lte='<')",
    "Q(filename_gt='/u')", "Q(filename_gte='/s')",
    # lineno
    f"Q(lineno={INNER_LINE + 1})", f"Q(lineno_in=[{INNER_LINE}, {OUTER_LINE + 3}, 1])",
    "Q(lineno_lt=100)", "Q(lineno_lte=50)", "Q(lineno_gt=200)", "Q(lineno_gte=1000)",
    # depth
    "Q(depth=1)", "Q(depth_in=[0, 2])", "Q(depth_lt=3)", "Q(depth_lte=2)", "Q(depth_gt=4)",
    "Q(depth_gte=5)", f"Q(depth_lt={BIG})", f"Q(depth_gt={-BIG})", f"Q(depth={BIG})",
    # calls
    "Q(calls=3)", "Q(calls_in=[1, 5, 30])", "Q(calls_lt=10)", "Q(calls_lte=20)",
    "Q(calls_gt=40)", "Q(calls_gte=50)",
    # stdlib, builtin
    "Q(stdlib=True)", "Q(stdlib=False)", "Q(stdlib_in=[True])", "~Q(stdlib=True)",
    "Q(builtin=False)", "Q(builtin=True)", "Q(builtin_in=[False, True])",
    # threadid: None is the main thread; ordering raises in hunter there
    "Q(threadid=None)", "Q(threadid_in=[None])", "Q(threadid_in=[None, 1])", "Q(threadid=5)",
    "Q(threadid_gt=0)", "Q(threadid_gte=1)", f"Q(threadid_lt={2**63 - 1})",
    f"Q(threadid_lte={2**62})", f"Q(threadid={BIG})", f"Q(threadid_in=[{BIG}, None])",
    # threadname
    "Q(threadname='MainThread')", "Q(threadname='worker-1')",
    "Q(threadname_in=['worker-1', 'worker-2'])", "Q(threadname_contains='worker')",
    "Q(threadname_has='-2')", "Q(threadname_startswith='Main')", "Q(threadname_sw=('w', 'x'))",
    "Q(threadname_endswith='2')", "Q(threadname_ew=('1', 'd'))", "Q(threadname_regex='w.*1')",
    "Q(threadname_rx='Main')", "Q(threadname_lt='N')", "Q(threadname_lte='MainThread')",
    "Q(threadname_gt='worker-1')", "Q(threadname_gte='worker-1')",
    # source
    "Q(source='        return func(*args, **kwargs)\\n')", "Q(source_contains='return')",
    "Q(source_has='yield')", "Q(source_startswith='    def')", "Q(source_sw=('    @', 'def'))",
    "Q(source_endswith=':\\n')", "Q(source_ew=(')\\n', ':\\n'))", "Q(source_regex='\\\\s+total')",
    "Q(source_rx='.*json')", "Q(source_in=['    y = x + 1\\n', '    return y\\n'])",
    "Q(source_lt='    e')", "Q(source_lte='    return')", "Q(source_gt='    s')",
    "Q(source_gte='def')",
    # fullsource (a call event gives decorators + the def line)
    "Q(fullsource_contains='@')", "Q(fullsource_has='@passthrough\\n')",
    "Q(fullsource_startswith='    @passthrough\\n    @passthrough\\n    def multi_line(\\n')",
    "Q(fullsource_sw='def ')", "Q(fullsource_endswith='(\\n')", "Q(fullsource_ew=':\\n')",
    "Q(fullsource_regex='(?s).*@wrapping.*def decorated')", "Q(fullsource_rx='.*lambda')",
    "Q(fullsource='def work_inner(x: int) -> int:\\n')", "Q(fullsource_in=['    return y\\n'])",
    "Q(fullsource_lt='    ')", "Q(fullsource_gt='    @')", "Q(fullsource_lte='def')",
    "Q(fullsource_gte='    @')",
    # arg: None for most events, the return value on returns, a tuple on exceptions
    "Q(arg=None)", "Q(arg=42)", "Q(arg='hello')", "Q(arg_in=[1, 2, 42])", "Q(arg_in='hello world')",
    "Q(arg_contains='ell')", "Q(arg_has=1)", "Q(arg_startswith='he')", "Q(arg_sw=('x', 'h'))",
    "Q(arg_endswith='lo')", "Q(arg_ew='o')", "Q(arg_regex='h.l')", "Q(arg_rx='.*')",
    "Q(arg_lt=10)", "Q(arg_lte=3)", "Q(arg_gt='a')", "Q(arg_gte=42)",
    # locals, globals
    "Q(locals_contains='x')", "Q(locals_has='self')", "Q(globals_contains='json')",
    "Q(globals_has='work_inner')",
]

COMPOSITE_CASES = [
    f"Q(module={MOD!r}, kind='call')",
    f"Q(module={MOD!r}) & ~Q(function_startswith='work_g')",
    "Q(kind='call') | Q(kind='return')",
    "(Q(kind='call') | Q(kind='exception')) & ~Q(stdlib=True)",
    "And(Q(depth_lt=3), Q(kind='line'), function='work_inner')",
    "Or(module='json', function='work_inner')",
    f"Not(Q(kind='line'), module={MOD!r})",
    "Not(Q(kind='line'))",
    "~~Q(kind='line')",
    f"Q(Q(kind='call'), module={MOD!r})",
    "Q(source_contains='yield') | Q(fullsource_contains='@')",
    f"Q(kind='line', lineno_gt={INNER_LINE}) | Q(threadid=None, depth=2)",
    "~(Q(kind='line') | Q(stdlib=True)) & Q(threadname_sw='w')",
    "Q(kind_in=('call', 'return'), depth_lt=3, calls_gte=2)",
    "~Q(kind='line') & Q(depth_gt=1) & Q(threadid_gt=0)",
    "Q()",
    # From: stateful, evaluated in hunter's short-circuit order
    "From(Q(function='work_outer'))",
    "From(Q(function='work_outer'), Q(depth_lt=2))",
    "From(function='work_inner', depth_lt=1)",
    "From(function='work_gen', kind='call', calls_lt=3)",
    "From(Q(function='work_gen', kind='call'), Q(kind='call'), watermark=1)",
    "From(Q(function='work_gen', kind='call'), Q(kind='call'))",
    "From(Q(function='dumps'), Q(calls_lt=5))",
    "From(Q(function='work_outer'), watermark=-1)",
    "From(Q(kind='line', function='work_inner'), Q(kind='return'))",
    "From(Q(kind='line', function='work_inner'), Q(kind='line'), watermark=1)",
    "From(Q(kind='call', function='work_outer'), Q(kind='line', depth_lt=3), watermark=1)",
    f"Q(module={MOD!r}) & From(Q(function='work_inner'))",
    f"From(Q(function='work_inner')) & Q(module={MOD!r})",
    "Q(depth_lt=4) & From(Q(kind='exception'), Q(kind='return'))",
    "~From(Q(function='work_raise'))",
    "From(Q(function='work_outer'), From(Q(function='work_inner'), Q(kind='line')))",
    "From(Q(function='work_inner')) | From(Q(function='work_inner'))",
    "Q(stdlib=True) | From(Q(threadname='worker-2'), Q(depth_lte=1))",
    "From(Q(source_contains='json.dumps'), Q(module_sw='json'))",
    "Q(kind='call') & From(Q(function='work_inner'), Q(depth=0))",
    "From(Q(locals_has='total'), ~Q(stdlib=True))",
]

# (our terms, hunter's expression) where the CLI spelling differs.
SPELLING_CASES = [
    (["~stdlib"], "~Q(stdlib=True)"),
    (["stdlib"], "Q(stdlib=True)"),
    (["kind=call", f"module={MOD}"], f"Q(kind='call') & Q(module={MOD!r})"),
    (["function_in=work_inner,work_gen"], "Q(function_in=('work_inner', 'work_gen'))"),
    (["depth_lt=3", "~stdlib", "kind_in=call,return"],
     "Q(depth_lt=3) & ~Q(stdlib=True) & Q(kind_in=('call', 'return'))"),
    (["function_rx=^work_(in|ou)"], "Q(function_regex='^work_(in|ou)')"),
]

CASES: List[Tuple[List[str], str]] = (
    [([text], text) for text in FIELD_CASES + COMPOSITE_CASES] + SPELLING_CASES
)


# --- the harness ---------------------------------------------------------------------------------


def _signed_threadid() -> int:
    ident = threading.get_ident()
    if ident == threading.main_thread().ident:
        return filters.MAIN_THREADID
    return ident - 2**64 if ident >= 2**63 else ident


class Case:
    def __init__(self, terms: List[str], hunter_expr: str) -> None:
        self.id = " ".join(terms)
        self.tree = parse_query(terms)
        self.reference = eval(hunter_expr, HUNTER_NAMES)  # test-owned text
        self.matcher = Filter(self.tree, resolve_modules=False, per_thread_state=False)
        self.compiled = Filter(self.tree, resolve_modules=False, per_thread_state=False)
        self.decisions: Dict[Any, filters.Decision] = {}
        self.mismatches: List[str] = []
        self.compared = self.matched = self.hunter_raised = 0

    def check(self, event: RefEvent, frame: Any, kind: str, arg: Any) -> None:
        depth, calls, k = event.depth, event.calls, filters.KIND_INDEX[kind]
        try:
            expected = bool(self.reference(event))
            raised = None
        except Exception as exc:
            raised = exc
        got_match = self.matcher.match_event(frame, kind, arg, depth, calls)
        got_program = self.run_compiled(frame, k, arg, depth, calls)
        if raised is not None:
            self.hunter_raised += 1
            return
        self.compared += 1
        self.matched += expected
        if not expected == got_match == got_program and len(self.mismatches) < 10:
            self.mismatches.append(
                f"{kind} {event.function} {event.module}:{event.lineno} depth={depth} "
                f"calls={calls} thread={event.threadname}: hunter={expected} "
                f"match_event={got_match} program={got_program} "
                f"decision={self.decisions.get(frame.f_code)}"
            )

    def run_compiled(self, frame: Any, kind: int, arg: Any, depth: int, calls: int) -> bool:
        decision = self.decisions.get(frame.f_code)
        if decision is None:
            code = frame.f_code
            module = frame.f_globals.get("__name__", "")
            module_file = None if code.co_filename else frame.f_globals.get("__file__")
            decision = self.decisions[code] = self.compiled.decide(code, module, module_file)
        # What the C tracer does with a decision:
        if decision.never or not decision.kinds & (1 << kind):
            return False
        if decision.program is None:
            return True
        return run_program(
            decision.program, kind, depth, frame.f_lineno, calls, _signed_threadid(),
            lambda index: self.compiled.pypred(index, frame, kind, arg, depth, calls),
        )


class Harness:
    """hunter.tracer.Tracer.__call__, feeding every event to every case."""

    def __init__(self, cases: List[Case]) -> None:
        self.cases = cases
        self.depth = 0
        self.calls = 0
        self.lock = threading.Lock()  # one event at a time, as with the GIL in hunter's handler
        self.kinds: Dict[Tuple[str, str], int] = {}

    def __call__(self, frame: Any, kind: str, arg: Any) -> Harness:
        with self.lock:
            if kind == "return" and self.depth > 0:
                self.depth -= 1
            event = RefEvent(frame, kind, arg, self.depth, self.calls, True)
            key = (kind, event.threadname)
            self.kinds[key] = self.kinds.get(key, 0) + 1
            for case in self.cases:
                case.check(event, frame, kind, arg)
            if kind == "call":
                self.depth += 1
                self.calls += 1
        return self


@pytest.fixture(scope="module")
def traced() -> Tuple[Harness, Dict[str, Case]]:
    cases = {case.id: case for case in (Case(terms, expr) for terms, expr in CASES)}
    harness = Harness(list(cases.values()))
    threading.settrace(harness)
    sys.settrace(harness)
    try:
        workload()
    finally:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
    return harness, cases


@pytest.mark.parametrize("case_id", [" ".join(terms) for terms, _ in CASES])
def test_agrees_with_hunter(traced: Tuple[Harness, Dict[str, Case]], case_id: str) -> None:
    case = traced[1][case_id]
    assert case.compared > 0
    assert not case.mismatches, "\n".join(case.mismatches)


def test_workload_is_varied(traced: Tuple[Harness, Dict[str, Case]]) -> None:
    harness, cases = traced
    for kind in filters.KINDS:
        for thread in ("MainThread", "worker-1", "worker-2"):
            assert harness.kinds.get((kind, thread)), (kind, thread)
    # Most queries must both match and miss, or agreeing would prove little.
    informative = [c for c in cases.values() if 0 < c.matched < c.compared]
    assert len(informative) >= 0.85 * len(cases), sorted(
        (c.id, c.matched, c.compared) for c in cases.values() if c not in informative)
    # hunter raised where we expected it to (threadid ordering on the main thread, arg ops).
    assert cases["Q(threadid_gt=0)"].hunter_raised > 0
    assert cases["Q(function='work_inner')"].hunter_raised == 0


# --- deliberate differences and the per-thread From ----------------------------------------------


def _frame_of(func: Any, *args: Any) -> Any:
    """A live frame of ``func`` (it returns sys._getframe())."""
    return func(*args)


def test_frozen_modules_are_stdlib() -> None:
    frames: List[Any] = []

    def tracer(frame: Any, kind: str, arg: Any) -> None:
        if frame.f_code is os.path.join.__code__:
            frames.append(frame)

    sys.settrace(tracer)
    try:
        os.path.join("a", "b")
    finally:
        sys.settrace(None)
    frame = frames[0]
    ours = Filter(parse_query(["stdlib=True"]))
    assert ours.match_event(frame, "call", None, 0, 0)
    assert not ours.decide(frame.f_code, "posixpath").never
    theirs = hunter.event.Event(frame, "call", None, 0, 0, False).stdlib
    assert theirs is (not frame.f_code.co_filename.startswith("<frozen "))  # False on 3.11+


def test_module_aliases_resolve_through_sys_modules() -> None:
    flt = Filter(parse_query(["module=os.path"]))
    assert flt.aliases == {"os.path": os.path.__name__}
    assert not flt.decide(os.path.join.__code__, os.path.__name__).never
    assert Filter(parse_query(["module=os.path"]), resolve_modules=False).decide(
        os.path.join.__code__, os.path.__name__).never
    both = Filter(parse_query(["module_in=os.path,json"]))
    assert both.tree["value"] == ["os.path", "json", os.path.__name__]


def test_from_state_is_per_thread() -> None:
    tree = parse_query(["From(Q(function='starter'))"])
    frames: Dict[str, Any] = {}

    def starter() -> None:
        frames["starter"] = sys._getframe()

    def other() -> None:
        frames["other"] = sys._getframe()

    starter()
    other()
    per_thread = Filter(tree)
    shared = Filter(tree, per_thread_state=False)
    for flt in (per_thread, shared):
        assert flt.match_event(frames["starter"], "call", None, 3, 0)
        assert flt.match_event(frames["other"], "call", None, 4, 1)
    seen: Dict[str, bool] = {}

    def in_thread() -> None:
        seen["per_thread"] = per_thread.match_event(frames["other"], "call", None, 4, 1)
        seen["shared"] = shared.match_event(frames["other"], "call", None, 4, 1)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == {"per_thread": False, "shared": True}
    # Depth below the origin switches it off; the switching event does not match.
    assert not per_thread.match_event(frames["other"], "return", None, 2, 5)
    assert not per_thread.match_event(frames["other"], "call", None, 4, 6)


def test_hunter_cython_build_raises_where_pure_python_works() -> None:
    # Documents why the reference above is the pure-Python build.
    cython_query = hunter.Q(depth_in=[0, 1])
    if type(cython_query).__module__ != "hunter._predicates":
        pytest.skip("hunter's Cython build is not installed")
    events: List[Any] = []
    tracer = hunter.Tracer(threading_support=False)
    tracer.trace(events.append)
    work_inner(1)
    tracer.stop()
    with pytest.raises(TypeError):
        cython_query(events[0])
    with pytest.raises(TypeError):
        hunter.Q(locals_contains="x")(events[0])


def test_threads_unknown_to_threading() -> None:
    flt = Filter(parse_query(["threadname_sw=Thread-", "~threadid=None"]))
    frame = sys._getframe()
    assert not flt.match_event(frame, "line", None, 0, 0)  # the main thread
    done = threading.Event()
    seen: Dict[str, Any] = {}

    def body() -> None:
        seen["match"] = flt.match_event(sys._getframe(), "line", None, 0, 0)
        seen["name"] = filters.current_threadname()
        seen["ident"] = threading.get_ident()
        seen["registered"] = seen["ident"] in threading._active  # type: ignore[attr-defined]
        done.set()

    _thread.start_new_thread(body, ())
    assert done.wait(10)
    assert seen["match"] and not seen["registered"]  # no dummy thread was made
    assert seen["name"] == f"Thread-{seen['ident']}"


# Loads filters.py (argv[1]) as f, in a package that holds only our shipped modules, as the
# bootstrap builds it in the target.
LOAD_FILTERS = r"""
import importlib.util, os, sys, types
pkg = types.ModuleType("pkg")
pkg.__path__ = [os.path.dirname(sys.argv[1])]
sys.modules["pkg"] = pkg
spec = importlib.util.spec_from_file_location("pkg.filters", sys.argv[1])
f = importlib.util.module_from_spec(spec)
spec.loader.exec_module(f)
"""

NO_THREADING_SCRIPT = r"""
import sys, _thread, time
assert "threading" not in sys.modules
""" + LOAD_FILTERS + r"""
flt = f.Filter({"op": "and", "args": [
    {"op": "cmp", "field": "threadid", "cmp": "eq", "value": None},
    {"op": "cmp", "field": "threadname", "cmp": "eq", "value": "MainThread"},
    {"op": "from", "condition": {"op": "true"}, "predicate": {"op": "true"}},
    {"op": "cmp", "field": "stdlib", "cmp": "eq", "value": False}]})
out = {"main": flt.match_event(sys._getframe(), "line", None, 0, 0)}
def other():
    out["other"] = flt.match_event(sys._getframe(), "line", None, 0, 0)
_thread.start_new_thread(other, ())
while "other" not in out:
    time.sleep(0.01)
print(out["main"], out["other"], "threading" in sys.modules)
"""


@pytest.mark.parametrize("python", [sys.executable, PY38_CANDIDATES[0]])
def test_filters_never_imports_threading(python: str, tmp_path: Any) -> None:
    # The agent imports filters from a _thread thread: importing threading there would make that
    # thread the "main thread" for the rest of the target's life. -S: no site, no .pth imports.
    if not os.path.exists(python):
        pytest.skip(f"no {python}")
    script = tmp_path / "nothreading.py"
    script.write_text(NO_THREADING_SCRIPT)
    result = subprocess.run([python, "-I", "-S", str(script), filters.__file__],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "False"]


def test_site_packages_cover_hunters() -> None:
    # hunter's list (hunter/const.py) less paths that do not exist (Windows, macOS schemes) and
    # less its own install directory, which it counts as one (the tests keep it in .venv/peers).
    import hunter.const

    own = os.path.dirname(os.path.dirname(hunter.const.__file__))
    theirs = {p for p in hunter.const.SITE_PACKAGES_PATHS if os.path.isdir(p) and p != own}
    assert theirs <= set(filters.SITE_PACKAGES_PATHS)


# --- the program, piece by piece -----------------------------------------------------------------


def _decide_here(terms: List[str]) -> filters.Decision:
    return Filter(parse_query(terms)).decide(work_inner.__code__, MOD)


def test_decisions() -> None:
    assert _decide_here(["function=work_inner"]).program is None
    assert _decide_here(["function=other"]).never
    assert _decide_here(["kind=call", "kind=line"]).never
    d = _decide_here(["kind_in=call,return", "depth_lt=3"])
    assert d.kinds == 0b0101 and not d.never
    assert list(d.program or []) == [filters.OP_KIND, 0b0101, filters.OP_CMP, 0, 2, 3,
                                      filters.OP_AND]
    # Static parts fold away; a From keeps everything before a decisive False.
    d = _decide_here(["From(Q(function='x')) & Q(module='nope')"])
    assert not d.never and list(d.program or [])[0] == filters.OP_PY
    assert _decide_here(["Q(module='nope') & From(Q(function='x'))"]).never


def test_c_values() -> None:
    def program(terms: List[str]) -> List[int]:
        return list(_decide_here(terms).program or [])

    assert program(["threadid=None"]) == [filters.OP_CMP, 3, 0, filters.MAIN_THREADID]
    assert program([f"threadid={2**63 + 1}"]) == [filters.OP_CMP, 3, 0, 2**63 + 1 - 2**64]
    assert program(["threadid=-3"]) == [filters.OP_FALSE]
    assert program(["threadid_gt=5"]) == [filters.OP_CMP, 3, filters.CMP_NE, -1,
                                          filters.OP_CMP, 3, 4, 5, filters.OP_AND]
    assert program([f"depth_lt={2**63 + 5}"]) == [filters.OP_TRUE]
    assert program([f"depth_gte={2**63 + 5}"]) == [filters.OP_FALSE]
    assert program(["lineno_in=[3, 1, 3]"]) == [filters.OP_IN, 1, 2, 1, 3]
    assert program(["~kind=line"]) == [filters.OP_KIND, 0b1101]
    assert program(["threadname=x"]) == [filters.OP_PY, 0]


def test_deep_trees_fall_back_to_python() -> None:
    leaf = {"op": "cmp", "field": "depth", "cmp": "gte", "value": 0}
    tree: Dict[str, Any] = leaf
    for _ in range(70):  # right-nested: the stack would need 71 slots
        tree = {"op": "and", "args": [leaf, tree]}
    flt = Filter(tree)
    decision = flt.decide(work_inner.__code__, MOD)
    assert list(decision.program or []) == [filters.OP_PY, 0]
    frame = _frame_of(lambda: sys._getframe())
    assert run_program(decision.program, 0, 1, 1, 0, -1,
                       lambda i: flt.pypred(i, frame, 0, None, 1, 0))


def test_run_program_rejects_bad_programs() -> None:
    with pytest.raises(ValueError):
        run_program([99], 0, 0, 0, 0, -1, lambda i: True)
    with pytest.raises(ValueError):
        run_program([filters.OP_TRUE, filters.OP_TRUE], 0, 0, 0, 0, -1, lambda i: True)


def test_pypred_never_raises() -> None:
    flt = Filter(parse_query(["source_contains=x", "arg_sw=a", "locals_has=q"]))
    decision = flt.decide(work_inner.__code__, MOD)
    assert decision.program is not None
    for index in range(3):
        assert flt.pypred(index, None, 0, object(), 0, 0) is False
        assert flt.pypred(index + 100, None, 0, None, 0, 0) is False
    assert flt.match_event(None, "call", None, 0, 0) is False


def test_empty_co_filename_uses_module_file() -> None:
    code = compile("def f(): pass", "", "exec").co_consts[0]
    flt = Filter(parse_query(["filename_endswith=mod.pyc"]))
    assert flt.decide(code, "m").never
    assert not Filter(parse_query(["filename=/x/mod.py"])).decide(code, "m", "/x/mod.pyc").never


@pytest.mark.parametrize("bad", [
    [], {"op": "nope"}, {"op": "and", "args": 3}, {"op": "cmp", "field": "x", "cmp": "eq"},
    {"op": "cmp", "field": "depth", "cmp": "is", "value": 1},
    {"op": "cmp", "field": "module", "cmp": "regex", "value": "("},
    {"op": "cmp", "field": "module", "cmp": "eq", "value": {"a": 1}},
    {"op": "from", "condition": {"op": "true"}, "predicate": {"op": "true"}, "watermark": "1"},
])
def test_check_tree_rejects_malformed_trees(bad: Any) -> None:
    with pytest.raises(ValueError):
        Filter(bad)



PY38_SCRIPT = LOAD_FILTERS + r"""
import json
tree = json.loads(sys.argv[2])
flt = f.Filter(tree)
def g(x):
    return sys._getframe()
frame = g(1)
d = flt.decide(g.__code__, __name__)
assert d.program is not None, d
got = f.run_program(d.program, 1, 2, frame.f_lineno, 0, -1,
                    lambda i: flt.pypred(i, frame, 1, None, 2, 0))
assert got == flt.match_event(frame, "line", None, 2, 0)
print(got, flt.aliases, flt.decide(os.path.join.__code__, "posixpath"))
"""


@pytest.mark.skipif(not PY38, reason="no CPython 3.8 here")
def test_filters_runs_on_python38(tmp_path: Any) -> None:
    tree = parse_query([
        "Q(module='os.path') | Q(function_regex='^g$')", "depth_lt=3", "~kind=call",
        "locals_has=x", "source_contains=sys", "From(function='g', depth_lt=5)", "threadid=None",
    ])
    script = tmp_path / "check38.py"  # a real file, so that source_contains has a line to read
    script.write_text(PY38_SCRIPT)
    result = subprocess.run(
        [PY38, "-I", str(script), filters.__file__, json.dumps(tree)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("True {'os.path': 'posixpath'}"), result.stdout
