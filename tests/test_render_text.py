"""Golden tests: our text renderers against hunter 3.9's CallPrinter and CodePrinter.

Real sample code runs in-process under hunter's pure-Python tracer. One handler feeds every
matching event both to hunter's printers and to a capture that builds our ``Event`` objects the
way the agent does (per-thread depth counted like hunter's tracer, arguments as ``[name, repr]``
pairs in hunter's ``get_arguments`` order, reprs by hunter's ``safe_repr`` cut to repr_limit).
Rendering the captured events must give hunter's text, line for line, with and without colors.
The deliberate differences (see hunter_attach/render/text.py) have their own tests.

The same events also go through the CLI's fast pipeline (hunter_attach.fastpath): encoded as the
agent's RECORDS stream, decoded and rendered from templates by the pure-Python sink and by the C
extension, they must give hunter's text too.
"""

from __future__ import annotations

import io
import json
import linecache
import os
import sys
import threading
import time
from collections import defaultdict
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import hunter
import pytest
from hunter.actions import CallPrinter, CodePrinter
from hunter.tracer import Tracer as PyTracer
from hunter.util import MISSING, get_arguments, safe_repr

from hunter_attach import fastpath, protocol
from hunter_attach.events import CodeInfo, Event, ThreadInfo
from hunter_attach.render import RenderOptions, make_renderers
from hunter_attach.render.text import CallTextRenderer, CodeTextRenderer
from hunter_attach.session import Session

REPR_LIMIT = 1024

SAMPLE = '''\
import functools


def deco(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)
    return wrapper


@deco
def decorated(a,
              b=2,
              *rest, c, **kw):
    return a + b + c


def gen(n):
    for i in range(n):
        yield i * 2


class Thing:
    def __init__(self, name):
        self.name = name

    def method(self, x, *, key="k"):
        return {"x": x, "key": key, "name": self.name}


def boom(what):
    raise ValueError(what)


def catcher():
    try:
        boom("bad value")
    except ValueError as exc:
        return repr(exc)


def nested(depth):
    if depth:
        return nested(depth - 1) + 1
    return 0


def make_class():
    class Inner:
        attr = 1
    return Inner


def big(data):
    return len(data)


def main():
    total = decorated(1, c=3)
    squares = list(gen(3))
    thing = Thing("t")
    thing.method([1, 2], key=None)
    text = catcher()
    lam = (lambda v: v + 1)(1)
    make_class()
    return total, squares, text, nested(3), lam


def main_big():
    return big(list(range(400)))


def worker_body(n):
    return nested(n)
'''

LONG_FILENAME = ("/srv/a/rather/deeply/nested/directory/for/hunter_attach/golden/tests/"
                 "long_module_name.py")
LONG_SAMPLE = '''\
from golden_sample import main_big, nested


def long_entry(x):
    y = x + 1
    return nested(y)


def long_main():
    long_entry(1)
    return main_big()
'''

THREAD_SAMPLE = '''\
import threading

from golden_sample import worker_body


class Worker(threading.Thread):
    def run(self):
        self.result = worker_body(2)


def threaded(name):
    w = Worker(name=name)
    w.start()
    w.join()
    return w.result
'''


def load(name: str, filename: str, source: str) -> Dict[str, Any]:
    """Exec ``source`` as module ``name`` whose code objects say ``filename``; the source is
    registered in linecache (mtime None: checkcache leaves it alone), as for a real file."""
    lines = source.splitlines(True)
    linecache.cache[filename] = (len(source), None, lines, filename)
    module = type(os)(name)
    module.__dict__["__file__"] = filename
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module.__dict__


@pytest.fixture(scope="module")
def modules() -> Iterator[Dict[str, Dict[str, Any]]]:
    specs = [("sample", "golden_sample", "sample.py", SAMPLE),
             ("long", "golden_long", LONG_FILENAME, LONG_SAMPLE),
             ("threads", "golden_threads", "thread_sample.py", THREAD_SAMPLE)]
    yield {key: load(name, filename, source) for key, name, filename, source in specs}
    for _, name, filename, _ in specs:
        sys.modules.pop(name, None)
        linecache.cache.pop(filename, None)


def target_repr(obj: object) -> str:
    """What the agent sends for a value: hunter's ``try_repr`` without colors."""
    try:
        s = safe_repr(obj).replace("\n", r"\n")
        if len(s) > REPR_LIMIT:
            cutoff = REPR_LIMIT // 2
            s = f"{s[:cutoff]} [...] {s[-cutoff:]}"
        return s
    except Exception as exc:  # same fallback text as hunter
        return f"!!! FAILED REPR: {exc!r}"


class Capture:
    """The handler for every event of hunter's pure-Python tracer."""

    def __init__(self, filenames: List[str], printers: List[Callable[[Any], None]],
                 accept: Callable[[Any], bool] = lambda ev: True) -> None:
        self.filenames = set(filenames)
        self.printers = printers
        self.accept = accept
        self.events: List[Event] = []
        self.codes: Dict[Any, CodeInfo] = {}
        self.threads: Dict[int, ThreadInfo] = {}
        self.depths: Dict[int, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.pid = os.getpid()

    def __call__(self, event: Any) -> None:
        ident = threading.get_ident()
        depth = self.depths[ident]
        # hunter's Tracer: a return is one level up from the frame's lines; calls count after.
        if event.kind == "return" and depth > 0:
            depth -= 1
        self.depths[ident] = depth + 1 if event.kind == "call" else depth
        if event.filename not in self.filenames or not self.accept(event):
            return
        with self.lock:  # printers and capture must see the same order across threads
            for printer in self.printers:
                printer(event)
            self.events.append(self.convert(event, depth))

    def code_info(self, event: Any) -> CodeInfo:
        code = event.code
        info = self.codes.get(code)
        if info is None:
            numbers = {n for _, _, n in code.co_lines() if n} | {code.co_firstlineno}
            info = self.codes[code] = CodeInfo(
                id=len(self.codes), filename=event.filename, module=event.module,
                function=event.function, qualname=code.co_qualname,
                firstlineno=code.co_firstlineno, stdlib=event.stdlib,
                lines={n: linecache.getline(code.co_filename, n) for n in numbers})
        if event.kind == "call" and event.lineno == code.co_firstlineno:
            info.fullsource = event.fullsource
        info.lines.setdefault(event.lineno, event.source)
        return info

    def thread_info(self) -> ThreadInfo:
        ident = threading.get_ident()
        info = self.threads.get(ident)
        if info is None:
            current = threading.current_thread()
            info = self.threads[ident] = ThreadInfo(
                id=len(self.threads), ident=ident, name=current.name,
                main=current is threading.main_thread())
        return info

    def convert(self, event: Any, depth: int) -> Event:
        kind = event.kind
        arg: Optional[str]
        if kind == "call":
            arg = json.dumps([[prefix + name, target_repr(event.locals.get(name, MISSING))]
                              for prefix, name, _ in get_arguments(event.code)])
        elif kind in ("return", "exception"):
            arg = target_repr(event.arg)
        else:
            arg = None
        return Event(kind=kind, code=self.code_info(event), thread=self.thread_info(),
                     lineno=event.lineno, depth=depth, ts=time.monotonic() - self.t0, arg=arg,
                     seq=len(self.events), pid=self.pid)


def fresh(printer_class: type) -> type:
    """CallPrinter keeps its call stacks in a class attribute shared by all instances; give each
    printer its own."""
    return type(printer_class.__name__, (printer_class,), {"locals": defaultdict(list)})


def run_traced(func: Callable[[], Any], filenames: List[str], *,
               accept: Callable[[Any], bool] = lambda ev: True,
               **printer_options: Any) -> Tuple[Dict[str, str], List[Event]]:
    """Run ``func`` (a function of the samples, or a partial of one: an extra Python frame would
    shift the depth) under hunter; returns hunter's outputs ("call", "call-color", "code",
    "code-color") and our captured events."""
    streams = {name: io.StringIO() for name in ("call", "call-color", "code", "code-color")}
    printers = [
        fresh(CallPrinter)(stream=streams["call"], force_colors=False, **printer_options),
        fresh(CallPrinter)(stream=streams["call-color"], force_colors=True, **printer_options),
        CodePrinter(stream=streams["code"], force_colors=False, **printer_options),
        CodePrinter(stream=streams["code-color"], force_colors=True, **printer_options),
    ]
    capture = Capture(filenames, printers, accept)
    tracer = PyTracer(threading_support=None)
    tracer.trace(capture)
    try:
        func()
    finally:
        tracer.stop()
    return {name: s.getvalue() for name, s in streams.items()}, capture.events


def render(events: List[Event], printer: str, color: bool, **options: Any) -> str:
    out = io.StringIO()
    cls = CallTextRenderer if printer == "call" else CodeTextRenderer
    r = cls(out, color=color, **options)
    for ev in events:
        r.event(ev)
    r.close()
    return out.getvalue()


# hunter colors the " [...] " of a cut repr; ours is cut in the target, uncolored (documented).
HUNTER_CUT = "\x1b[1m\x1b[30m[...]\x1b[0m"


def assert_same(ours: str, theirs: str) -> None:
    theirs = theirs.replace(HUNTER_CUT, "[...]")
    assert ours.splitlines() == theirs.splitlines()
    assert ours == theirs


def encode(events: List[Event]) -> bytes:
    """The RECORDS payload the agent would have sent for these events (one process)."""
    out: List[bytes] = []
    codes: Dict[int, CodeInfo] = {}
    threads: Dict[int, ThreadInfo] = {}
    for ev in events:
        if ev.thread.id not in threads:
            threads[ev.thread.id] = ev.thread
            t = ev.thread
            out.append(protocol.encode_meta(protocol.REC_THREAD, {
                "id": t.id, "ident": t.ident, "name": t.name, "main": t.main}))
        if ev.code.id not in codes:
            codes[ev.code.id] = c = ev.code
            out.append(protocol.encode_meta(protocol.REC_CODE, {
                "id": c.id, "filename": c.filename, "module": c.module, "function": c.function,
                "qualname": c.qualname, "firstlineno": c.firstlineno, "stdlib": c.stdlib,
                "lines": {str(k): v for k, v in c.lines.items()}, "fullsource": c.fullsource}))
        arg = ev.arg.encode() if ev.arg is not None else None
        out.append(protocol.EVENT.pack(
            protocol.REC_EVENT, protocol.KINDS.index(ev.kind),
            protocol.FLAG_ARG if arg is not None else 0, ev.thread.id, ev.code.id, ev.lineno,
            ev.depth, int(ev.ts * 1e9)))
        if arg is not None:
            out.append(protocol.U32.pack(len(arg)) + arg)
    return b"".join(out)


FAST_PIPELINES = ["py", "c"] if fastpath.available() else ["py"]


def render_fast(events: List[Event], printer: str, color: bool, use_c: bool,
                **options: Any) -> str:
    """``render`` through the fast pipeline: the events as a stream, decoded by a sink."""
    session = Session(pid=events[0].pid, uid=os.getuid(), root="/", config={}, tracer=None,
                      log=lambda _msg: None)
    try:
        out = io.StringIO()
        cls = CallTextRenderer if printer == "call" else CodeTextRenderer
        r = cls(out, color=color, **options)
        sink = fastpath.make_sink(session, [r], use_c=use_c)
        assert sink is not None and sink.renderer is r
        for batch in session._handle(protocol.RECORDS, encode(events), sink):
            assert isinstance(batch, fastpath.Batch) and batch.error is None
            sink.emit(batch)
        r.close()
        return out.getvalue()
    finally:
        session.close()


def check_all(outputs: Dict[str, str], events: List[Event], **options: Any) -> None:
    assert events, "nothing was captured"
    for name, theirs in outputs.items():
        printer, _, color = name.partition("-")
        assert_same(render(events, printer, bool(color), **options), theirs)
        for pipeline in FAST_PIPELINES:
            assert_same(render_fast(events, printer, bool(color), pipeline == "c", **options),
                        theirs)


def test_call_and_code_printers(modules: Dict[str, Dict[str, Any]]) -> None:
    outputs, events = run_traced(modules["sample"]["main"], ["sample.py"])
    check_all(outputs, events)
    plain = outputs["call"]
    # The features the sample is there for, so that a change of it cannot hollow the test out.
    assert "=> decorated(a=1, b=2, *rest=(), c=3, **kw={})" in plain
    assert "<= decorated: 6" in plain
    assert " ! boom: (<class 'ValueError'>, ValueError('bad value'), <traceback" in plain
    assert "=> gen(n=3)" in plain and "<= gen: 4" in plain
    assert "=> method(self=<golden_sample.Thing object at" in plain
    assert "=> <lambda>(v=1)" in plain
    code = outputs["code"]
    assert "call      @deco\n" in code
    assert "   *      def decorated(a,\n" in code
    assert "...       return value: 6\n" in code
    assert "...       exception value: (<class 'ValueError'>" in code
    assert "\x1b[" in outputs["call-color"] and "\x1b[" not in plain


def test_long_filename_and_cut_repr(modules: Dict[str, Dict[str, Any]]) -> None:
    outputs, events = run_traced(modules["long"]["long_main"], ["sample.py", LONG_FILENAME])
    check_all(outputs, events)
    expected = "[...]" + LONG_FILENAME[-35:] + ":4     call         => long_entry(x=1)"
    assert expected in outputs["call"]
    assert "=> big(data=[0, 1, 2, " in outputs["call"]
    assert " [...] " in outputs["call"]


def test_threads(modules: Dict[str, Dict[str, Any]]) -> None:
    outputs, events = run_traced(partial(modules["threads"]["threaded"], "worker"),
                                 ["sample.py", "thread_sample.py"])
    check_all(outputs, events)
    lines = outputs["call"].splitlines()
    # No thread column until the second thread shows up, then on every line.
    assert lines[0].startswith(" ")
    first_worker = next(i for i, line in enumerate(lines) if line.startswith("worker"))
    assert all(not line.startswith(("worker", "MainThread")) for line in lines[:first_worker])
    assert all(line.startswith(("worker      ", "MainThread  "))
               for line in lines[first_worker:])
    assert lines[-1].startswith("MainThread  ")


def test_pid_prefix(modules: Dict[str, Dict[str, Any]]) -> None:
    outputs, events = run_traced(modules["sample"]["catcher"], ["sample.py"], force_pid=True)
    check_all(outputs, events, pid_prefix=True)
    assert outputs["call"].startswith(f"[{os.getpid()}]")


def test_unknown_filename_and_missing_source() -> None:
    # No co_filename and no __file__: hunter says "?" and finds no source.
    namespace: Dict[str, Any] = {"__name__": "nofile"}
    exec(compile("def f(a):\n    return a\n", "", "exec"), namespace)
    outputs, events = run_traced(partial(namespace["f"], 1), ["?"])
    check_all(outputs, events)
    assert "??? NO SOURCE: Source code string for '?' is empty." in outputs["call"]
    assert "\x1b[1m\x1b[43m\x1b[33m?" in outputs["call-color"]


def test_agent_placeholder_for_unknown_source() -> None:
    code = CodeInfo(id=1, filename="/gone.py", module="gone", function="f", qualname="f",
                    firstlineno=1, stdlib=False)
    thread = ThreadInfo(id=1, ident=1, name="MainThread", main=True)
    ev = Event("line", code, thread, lineno=2, depth=1, ts=0.0, arg=None, seq=0, pid=1)
    out = render([ev], "call", False)
    assert out == " " * 32 + "/gone.py:2     line         ??? NO SOURCE: not reading file " \
                              "/gone.py\n"
    colored = render([ev], "code", True)
    assert "\x1b[1m\x1b[43m\x1b[33m??? NO SOURCE: \x1b[37mnot reading file /gone.py" in colored


def test_indentation_follows_depth_when_returns_are_filtered(
        modules: Dict[str, Dict[str, Any]]) -> None:
    # hunter issue #123: CallPrinter only pops its stack on a printed return, so without returns
    # every call is indented one level deeper than the previous one.
    outputs, events = run_traced(modules["sample"]["main"], ["sample.py"],
                                 accept=lambda ev: ev.kind == "call")
    ours = render(events, "call", False).splitlines()
    # 40 + ":" + 5 + " " + 9 + " " = 57 columns before the indentation.
    assert [line.index("=>") for line in ours] == [57 + 3 * ev.depth for ev in events]
    assert [ev.depth for ev in events][:3] == [0, 1, 2]  # main, wrapper, decorated
    assert events[3].depth == 1  # gen, after decorated and wrapper returned unseen
    theirs = outputs["call"].splitlines()
    assert theirs[3].index("=>") == 57 + 3 * 3  # hunter: one level deeper per call
    assert [line.split("=>")[1] for line in ours] == [line.split("=>")[1] for line in theirs]


def test_indentation_starts_mid_stack(modules: Dict[str, Dict[str, Any]]) -> None:
    # Attaching inside a call: its return comes at depth 0 and must not indent negatively.
    outputs, events = run_traced(partial(modules["sample"]["nested"], 2), ["sample.py"])
    first_call = next(i for i, ev in enumerate(events) if ev.kind == "line")
    tail = events[first_call + 1:]
    for ev in tail:
        ev.depth = max(ev.depth - 1, 0)
    out = render(tail, "call", False)
    assert all(line[47:57].strip() in ("call", "line", "return") for line in out.splitlines())
    assert "<= nested: 2" in out


def test_long_thread_name_is_separated() -> None:
    code = CodeInfo(id=1, filename="/" + "x" * 60 + ".py", module="m", function="f",
                    qualname="f", firstlineno=1, stdlib=False, lines={1: "def f():\n"})
    main = ThreadInfo(id=1, ident=1, name="MainThread", main=True)
    other = ThreadInfo(id=2, ident=2, name="ThreadPoolExecutor-0_0", main=False)
    events = [Event("call", code, t, lineno=1, depth=0, ts=0.0, arg="[]", seq=i, pid=7)
              for i, t in enumerate([main, other, main])]
    lines = render(events, "call", False).splitlines()
    assert not lines[0].startswith("MainThread")
    assert lines[1].startswith("ThreadPoolExecutor-0_0 [...]")
    assert lines[2].startswith("MainThread  [...]")


def test_second_pid_turns_on_pid_column() -> None:
    code = CodeInfo(id=1, filename="m.py", module="m", function="f", qualname="f",
                    firstlineno=1, stdlib=False, lines={1: "def f():\n"})
    thread = ThreadInfo(id=1, ident=1, name="MainThread", main=True)
    events = [Event("call", code, thread, lineno=1, depth=0, ts=0.0, arg="[]", seq=0, pid=pid)
              for pid in (100, 200)]
    lines = render(events, "call", False).splitlines()
    assert lines[0].startswith(" ")
    assert lines[1].startswith("[200]    ")


def test_drop_marker() -> None:
    out = io.StringIO()
    r = CallTextRenderer(out)
    r.drop(123, 4560)
    r.drop(1, 4700)
    assert out.getvalue() == ("hunter-trace: ... 123 events dropped at seq 4560 ...\n"
                              "hunter-trace: ... 1 event dropped at seq 4700 ...\n")


def test_make_renderers_color_resolution() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    def colored(color: str, stream: io.StringIO, env: Dict[str, str]) -> bool:
        (r,) = make_renderers(RenderOptions(color=color), stream, env=env)
        assert isinstance(r, CallTextRenderer)
        return r.color

    assert colored("auto", Tty(), {}) is True
    assert colored("auto", io.StringIO(), {}) is False
    assert colored("auto", Tty(), {"NO_COLOR": "1"}) is False
    assert colored("auto", Tty(), {"NO_COLOR": ""}) is True
    assert colored("always", io.StringIO(), {"NO_COLOR": "1"}) is True
    assert colored("never", Tty(), {}) is False
    (code,) = make_renderers(RenderOptions(printer="code", color="never"), io.StringIO())
    assert isinstance(code, CodeTextRenderer)
    with pytest.raises(ValueError):
        RenderOptions(printer="stack")
    with pytest.raises(ValueError):
        RenderOptions(color="sometimes")


def test_hunter_is_the_version_we_match() -> None:
    assert hunter.__version__.startswith("3.9.")
