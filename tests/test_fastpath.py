"""The fast pipeline (hunter_attach.fastpath: CSink over the C extension, PySink in Python) must
write exactly what the plain pipeline writes (Session._decode, then every renderer's event()):
the same text, colored or not, with the thread and pid columns switching on at the same event,
the same JSON lines and drop markers, the same Perfetto file and summary table, the same
sequence numbers, the same errors at the same record, and the same --max-events cut."""

from __future__ import annotations

import io
import json
import os
import random
import socket
import struct
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hunter_attach import cli, fastpath, protocol
from hunter_attach.errors import ProtocolError
from hunter_attach.events import Event
from hunter_attach.render import RenderOptions, make_renderers
from hunter_attach.session import Drop, Session

PID = 4321
PIPELINES = ["plain", "py", "c"]
needs_c = pytest.mark.skipif(not fastpath.available(), reason="hunter_attach._speedups not built")


def pipelines() -> List[Any]:
    return ["plain", "py", pytest.param("c", marks=needs_c)]


# ---- stream pieces ------------------------------------------------------------------------------

def meta(rtype: int, obj: Dict[str, Any]) -> bytes:
    return protocol.encode_meta(rtype, obj)


def code(cid: int, filename: str = "/srv/app/mod.py", function: str = "f",
         first: int = 10, lines: Optional[Dict[int, str]] = None, **over: Any) -> bytes:
    if lines is None:
        lines = {n: "    x = %d  # é\n" % n for n in range(first, first + 6)}
        lines[first] = "def %s(a, *args, **kw):\n" % function
    info = {"id": cid, "filename": filename, "module": "mod", "function": function,
            "qualname": "C." + function, "firstlineno": first, "stdlib": False,
            "lines": {str(k): v for k, v in lines.items()},
            "fullsource": "@deco\ndef %s(a,\n      b):\n" % function}
    info.update(over)
    return meta(protocol.REC_CODE, info)


def thread(tid: int, name: str = "MainThread", main: bool = True, ident: Optional[int] = None
           ) -> bytes:
    ident = 1000 + tid if ident is None else ident
    return meta(protocol.REC_THREAD, {"id": tid, "ident": ident, "name": name, "main": main})


def event(kind: int, tid: int = 1, cid: int = 1, lineno: int = 10, depth: int = 0,
          ts: int = 1_234_567_890, arg: Optional[bytes] = None, flags: Optional[int] = None
          ) -> bytes:
    if flags is None:
        flags = protocol.FLAG_ARG if arg is not None else 0
    out = protocol.EVENT.pack(protocol.REC_EVENT, kind, flags, tid, cid, lineno, depth, ts)
    if flags & protocol.FLAG_ARG:
        arg = arg or b""
        out += protocol.U32.pack(len(arg)) + arg
    return out


def drop(count: int) -> bytes:
    return protocol.DROP.pack(protocol.REC_DROP, count)


CALL, LINE, RETURN, EXC = protocol.CALL, protocol.LINE, protocol.RETURN, protocol.EXCEPTION

# Call arguments: the agent's form, and everything else json.loads accepts or refuses.
CALL_ARGS = [
    b'[["a","1"],["*args","(2, 3)"],["**kw","{\'k\': 4}"]]',
    b"[]",
    b"",
    None,
    b' [ [ "a" , "b" ] ,\n\t["c","d"] ] ',
    b'[["we\\"ird\\\\","\\n\\t\\r\\b\\f\\/"],["\\u00e9\\u20ac","\\ud83d\\ude00\\u0000\\u007f"]]',
    b'[["**\\u006bw","x"],["\\u002a","y"],["*","z"]]',
    b'[["del","\x7f"]]',
    b'[["raw","\xc3\xa9 non-ascii"]]',
    b'[["bad utf8","\xff\xfe"]]',
    b'[["lone","\\ud800"]]',
    b'[["lone low","\\udc00x"]]',
    b'[["ctl","a\tb"]]',
    b"not json",
    b'[["a","b","c"]]',
    b"[[1,2]]",
    b'{"ab":1}',
    b'["ab"]',
    b'[["a","b"]',
    b'[["a","b"]] x',
    b'[["a","\\x"]]',
    b'[["a","\\u12"]]',
    b"[[\"a\",\"b\"],]",
    b'[["a" "b"]]',
    b"[" + b",".join(b'["n%d","%s"]' % (i, b"v" * (i * 7)) for i in range(40)) + b"]",
    b"[" * 5000 + b"]" * 5000,  # json.loads: RecursionError
]
RETURN_ARGS = [b"None", b"", None, b"'quote\" back\\\\slash'", b"\x00\x01\x1f\x7f",
               b"caf\xc3\xa9 \xf0\x9f\x98\x80", b"bad \xff\xfe utf8 \xe2\x82", b"x" * 3000,
               b"(<class 'KeyError'>, KeyError('k'), <traceback object at 0x7f00>)"]
TS = [0, 1, 99_999, 100_000, 100_001, 123_456_789, 1_000_000_000, 1_500_000_000_123,
      999_999_999_999_999, 10 ** 15, 10 ** 15 + 1, 2 ** 53 + 1, 2 ** 64 - 1]


def tricky_stream() -> List[bytes]:
    """Frames with every shape the fast pipeline treats apart."""
    long_file = "/srv/a/rather/deeply/nested/directory/for/the/tests/module_name.py"
    frames = [
        thread(1) + code(1) + code(2, filename="?", lines={}) + code(3, filename=long_file)
        + code(4, filename="/srv/caf\u00e9/\udcff.py", function="g\u00e9n")
        + code(5, lines={10: ""}) + code(6, first=1, function="<module>")
        + event(CALL, cid=1, depth=0, arg=CALL_ARGS[0]) + event(LINE, cid=1, lineno=11, depth=1)
        + event(LINE, cid=1, lineno=99, depth=1)  # no source for that line
        + event(LINE, cid=2, lineno=1, depth=127) + event(LINE, cid=3, lineno=12, depth=128)
        + event(LINE, cid=4, lineno=13, depth=200) + event(LINE, cid=5, lineno=10, depth=3)
        + event(LINE, cid=6, lineno=1, depth=0, arg=b"line with an arg")
        + event(CALL, cid=6, lineno=1, depth=0, arg=b"[]")
        + event(EXC, cid=1, lineno=12, depth=0, arg=RETURN_ARGS[-1])
        + event(EXC, cid=1, lineno=12, depth=5, arg=None)
        + event(RETURN, cid=1, lineno=15, depth=0, arg=b"42"),
        b"".join(event(CALL, cid=1 + i % 4, depth=i % 3, arg=a, ts=TS[i % len(TS)])
                 for i, a in enumerate(CALL_ARGS)),
        b"".join(event(RETURN, cid=1 + i % 4, lineno=11, depth=i % 2, arg=a,
                       ts=TS[(i + 3) % len(TS)]) for i, a in enumerate(RETURN_ARGS)),
        b"".join(event(EXC, cid=3, lineno=11, depth=1, arg=a) for a in RETURN_ARGS)
        + b"".join(event(LINE, lineno=11, depth=1, ts=t) for t in TS),
        drop(1) + event(LINE, lineno=12, depth=1) + drop(5) + drop(0),
        # A second thread: the thread column appears from its first event on, a long name.
        thread(2, "ThreadPoolExecutor-0_0", False) + event(CALL, tid=2, arg=CALL_ARGS[0])
        + event(LINE, tid=2, lineno=11, depth=1) + event(LINE, tid=1, lineno=11, depth=1)
        + thread(3, "w", False) + event(LINE, tid=3, lineno=12, depth=1)
        # A reused ident under a new id: no new column, the new name.
        + thread(4, "w-again", False, ident=1003) + event(LINE, tid=4, lineno=12, depth=1),
        # Redefinitions: a code id and a thread id with new contents.
        code(1, filename="/srv/app/redefined.py", function="h")
        + event(LINE, cid=1, lineno=11, depth=1) + event(CALL, cid=1, arg=CALL_ARGS[0])
        + thread(2, "renamed", False) + event(LINE, tid=2, cid=1, lineno=11, depth=1),
        drop(2 ** 64 - 1) + event(LINE, lineno=11, depth=1) + drop(7)
        + event(RETURN, arg=b"after a huge drop"),
    ]
    return frames


# ---- running a pipeline -----------------------------------------------------------------------

FORMATS = {
    "text": dict(color="never"),
    "color": dict(color="always"),
    "code": dict(printer="code", color="never"),
    "code-color": dict(printer="code", color="always"),
    "pid": dict(color="never", pid_prefix=True),
    "json": dict(json=True),
}


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    s = Session(pid=PID, uid=os.getuid(), root="/", config={}, tracer=None, log=lambda _m: None)
    try:
        yield s
    finally:
        s.close()


def fresh(s: Session) -> Session:
    s.codes.clear()
    s.threads.clear()
    s.seq = 0
    s.bye = None
    return s


def make_sink(s: Session, renderers: List[Any], pipeline: str) -> Optional[fastpath.Sink]:
    if pipeline == "plain":
        return None
    return fastpath.make_sink(s, renderers, use_c=pipeline == "c")


def run(s: Session, frames: List[bytes], pipeline: str, fmt: str = "text", extra: Any = None,
        limit: int = -1) -> Tuple[str, Optional[str], int, Optional[str]]:
    """(output, error message, final seq, summary) of the frames through one pipeline, as
    cli._stream feeds renderers (the sink renders at most ``limit`` events)."""
    fresh(s)
    out, err = io.StringIO(), io.StringIO()
    options = RenderOptions(**FORMATS[fmt], summary=extra == "summary", summary_stream=err,
                            perfetto=extra if extra not in (None, "summary") else None)
    renderers = make_renderers(options, out)
    sink = make_sink(s, renderers, pipeline)
    error = None
    seen = 0
    try:
        for frame in frames:
            if sink is not None:
                sink.limit = -1 if limit < 0 else max(limit - seen, 0)
            for item in s._handle(protocol.RECORDS, frame, sink):
                if isinstance(item, fastpath.Batch):
                    assert sink is not None
                    seen += item.events
                    sink.emit(item)
                elif isinstance(item, Event):
                    seen += 1
                    if limit < 0 or seen <= limit:
                        for r in renderers:
                            r.event(item)
                else:
                    assert isinstance(item, Drop)
                    if limit < 0 or seen < limit:
                        for r in renderers:
                            r.drop(item.count, item.seq)
    except ProtocolError as exc:
        error = str(exc)
    for r in renderers:
        r.close()
    return out.getvalue(), error, s.seq, err.getvalue() if extra == "summary" else None


def check_same(s: Session, frames: List[bytes], fmt: str, extra: Any = None,
               limit: int = -1) -> str:
    expected = run(s, frames, "plain", fmt, extra, limit)
    for pipeline in ["py", "c"] if fastpath.available() else ["py"]:
        got = run(s, frames, pipeline, fmt, extra, limit)
        assert got[0].splitlines() == expected[0].splitlines(), (pipeline, fmt)
        assert got == expected, (pipeline, fmt)
    return expected[0]


# ---- the tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_tricky_stream(session: Session, fmt: str) -> None:
    out = check_same(session, tricky_stream(), fmt)
    if fmt == "json":
        objs = [json.loads(line) for line in out.splitlines()]
        assert out.isascii()
        drops = [o for o in objs if o["kind"] == "drop"]
        assert [d["count"] for d in drops] == [1, 5, 0, 2 ** 64 - 1, 7]
        assert objs[-1]["seq"] == objs[-3]["seq"] + 1 + 7 and objs[-1]["seq"] > 2 ** 64
        assert {o["threadname"] for o in objs if "threadname" in o} >= {"renamed", "w-again"}
    else:
        lines = out.splitlines()
        assert any("dropped at seq" in line for line in lines)
        # Line events only: an argument can hold line breaks.
        lines = [line for line in lines if "line      " in line]
        if fmt == "pid":
            prefix = f"[{PID}]".ljust(9)
            assert all(line.startswith(prefix) for line in lines)
            lines = [line[9:] for line in lines]
        second = next(i for i, line in enumerate(lines) if line.startswith("ThreadPool"))
        assert not any(line.startswith("MainThread") for line in lines[:second])
        names = ("ThreadPoolExecutor-0_0 ", "MainThread  ", "w           ", "w-again     ",
                 "renamed     ")
        assert all(line.startswith(names) for line in lines[second:])
        assert any(line.startswith("MainThread  ") for line in lines[second:])


@pytest.mark.parametrize("fmt", ["text", "color", "json"])
def test_big_frames(session: Session, fmt: str) -> None:
    """Frames whose text is many times the C decoder's output chunk (256 KiB)."""
    rng = random.Random(3)
    body = [thread(1), code(1), thread(2, "worker", False)]
    for i in range(6000):
        kind = rng.choice([CALL, LINE, LINE, RETURN])
        arg = (rng.choice(CALL_ARGS[:8]) if kind == CALL
               else rng.choice(RETURN_ARGS) if kind == RETURN else None)
        body.append(event(kind, tid=1 + (i // 500) % 2, lineno=10 + i % 6, depth=i % 40,
                          ts=1_000_000 + 917 * i, arg=arg))
        if i % 1000 == 999:
            body.append(drop(i))
    frames = [b"".join(body[:3000]), b"".join(body[3000:])]
    assert len(check_same(session, frames, fmt)) > 1_000_000


@pytest.mark.parametrize("extra", ["summary", "perfetto"])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_with_other_renderers(session: Session, tmp_path: Any, fmt: str, extra: str) -> None:
    """Perfetto and the summary get Event and Drop objects from the fast pipeline: the same
    files and tables."""
    frames = tricky_stream()
    if extra == "summary":
        check_same(session, frames, fmt, "summary")
        return
    outputs = {}
    for pipeline in ["plain", "py"] + (["c"] if fastpath.available() else []):
        path = str(tmp_path / f"{pipeline}.json")
        outputs[pipeline] = run(session, frames, pipeline, fmt, path)
        with open(path) as f:
            outputs[pipeline] += (f.read(),)
    assert outputs["py"] == outputs["plain"]
    assert outputs.get("c", outputs["plain"]) == outputs["plain"]


@pytest.mark.parametrize("pipeline", pipelines())
def test_events_for_other_renderers_are_the_plain_ones(session: Session, pipeline: str) -> None:
    frames = tricky_stream()
    fresh(session)
    expected = [item for frame in frames
                for item in session._handle(protocol.RECORDS, frame)]
    if pipeline == "plain":
        return
    fresh(session)

    class Collect:
        def __init__(self) -> None:
            self.items: List[Any] = []

        def event(self, ev: Event) -> None:
            self.items.append(ev)

        def drop(self, count: int, seq: int, pid: Optional[int] = None) -> None:
            self.items.append(("drop", count, seq))

    collect = Collect()
    sink = make_sink(session, [collect], pipeline)
    assert sink is not None and sink.mode == fastpath.MODE_NONE
    for frame in frames:
        for batch in session._handle(protocol.RECORDS, frame, sink):
            assert batch.chunks is None
            sink.emit(batch)
    assert len(collect.items) == len(expected)
    for got, want in zip(collect.items, expected):
        if isinstance(want, Drop):
            assert got == ("drop", want.count, want.seq)
        else:
            assert got == want  # the CodeInfo and ThreadInfo compare by value


@pytest.mark.parametrize("limit", [0, 1, 5, 17, 40, 10 ** 6])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_limit(session: Session, fmt: str, limit: int) -> None:
    """--max-events: the first ``limit`` events are rendered, with the drop markers before the
    limit is reached; decoding (seq, metadata) goes on."""
    check_same(session, tricky_stream(), fmt, limit=limit)
    check_same(session, tricky_stream(), fmt, extra="summary", limit=limit)


CORRUPT = [
    (event(LINE, lineno=11)[:20], "truncated event record"),
    (event(LINE, lineno=11, flags=1)[:29], "truncated event argument"),
    (event(RETURN, arg=b"abc")[:33], "truncated event argument"),
    (event(7, lineno=11), "unknown event kind 7"),
    (event(LINE, cid=99), "99"),
    (event(LINE, tid=99), "99"),
    (meta(protocol.REC_CODE, {"id": 9})[:3], "truncated metadata record"),
    (struct.pack("<BI", protocol.REC_THREAD, 50) + b"{}", "does not fit"),
    (struct.pack("<BI", protocol.REC_CODE, 2) + b"{]", "invalid JSON"),
    (meta(protocol.REC_CODE, {"id": 9, "bogus": 1}), "metadata field"),
    (drop(3)[:5], "truncated drop record"),
    (b"\x09", "unknown record type 9"),
]


@pytest.mark.parametrize("bad,message", CORRUPT)
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_corrupt_records(session: Session, fmt: str, bad: bytes, message: str) -> None:
    """Events before the corrupt record are rendered, then the same ProtocolError."""
    good = thread(1) + code(1) + event(CALL, arg=CALL_ARGS[0]) + drop(2) + event(LINE, lineno=11)
    frames = [good, event(LINE, lineno=12) + bad, event(LINE, lineno=13)]
    expected = run(session, frames, "plain", fmt)
    assert expected[1] is not None and message in expected[1]
    assert "x = 12" in expected[0] or '"lineno":12' in expected[0]
    check_same(session, frames, fmt)


@pytest.mark.parametrize("pipeline", pipelines())
def test_renderer_failure(session: Session, monkeypatch: pytest.MonkeyPatch,
                          pipeline: str) -> None:
    """An exception of the renderer's own code (not a corrupt record) propagates as is, after
    the events before it and without half of the failing event's line."""
    from hunter_attach.render.text import CallTextRenderer

    def boom(self: Any, arg: str) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(CallTextRenderer, "_format_args", boom)
    frames = [thread(1) + code(1) + event(LINE, lineno=11, depth=1)
              + event(CALL, arg=b"not json") + event(LINE, lineno=12, depth=1)]
    fresh(session)
    out = io.StringIO()
    renderers = make_renderers(RenderOptions(color="never"), out)
    sink = make_sink(session, renderers, pipeline)
    with pytest.raises(RuntimeError, match="boom"):
        for item in session._handle(protocol.RECORDS, frames[0], sink):
            if isinstance(item, fastpath.Batch):
                assert sink is not None
                sink.emit(item)
            else:
                for r in renderers:
                    r.event(item)
    assert out.getvalue() == "%40s:%-5d %-9s %s%s\n" % ("/srv/app/mod.py", 11, "line", "   ",
                                                        "x = 11  # \u00e9")


@needs_c
def test_format_ts_is_float_repr() -> None:
    from hunter_attach import _speedups

    rng = random.Random(5)
    values = list(TS)
    for digits in range(1, 21):
        values += [rng.randrange(10 ** (digits - 1), min(10 ** digits, 2 ** 64))
                   for _ in range(300)]
    values += [10 ** k + d for k in range(20) for d in (-1, 0, 1) if 0 <= 10 ** k + d < 2 ** 64]
    for ns in values:
        assert _speedups.format_ts(ns) == repr(ns / 1e9), ns


# ---- generated streams --------------------------------------------------------------------------

@st.composite
def streams(draw: Any) -> List[bytes]:
    """Consistent streams of random shapes: threads and codes announced before use (some
    redefined), events of every kind with the arguments above at random depths, drops."""
    frames: List[bytes] = []
    cur = [thread(1), code(1)]
    threads, codes = [1], [1]
    for _ in range(draw(st.integers(1, 60))):
        what = draw(st.sampled_from(["event"] * 6 + ["thread", "code", "drop", "frame"]))
        if what == "thread":
            tid = draw(st.integers(1, len(threads) + 1))
            cur.append(thread(tid, draw(st.sampled_from(["w", "worker-%d" % tid, "x" * 14])),
                              tid == 1, ident=draw(st.sampled_from([None, 1001]))))
            if tid not in threads:
                threads.append(tid)
        elif what == "code":
            cid = draw(st.integers(1, len(codes) + 1))
            cur.append(code(cid, filename=draw(st.sampled_from(["/a.py", "?", "/b/\u00e9.py"])),
                            first=draw(st.integers(1, 20))))
            if cid not in codes:
                codes.append(cid)
        elif what == "drop":
            cur.append(drop(draw(st.integers(0, 3))))
        elif what == "frame":
            frames.append(b"".join(cur))
            cur = []
        else:
            kind = draw(st.integers(0, 3))
            args = CALL_ARGS if kind == CALL else RETURN_ARGS if kind != LINE else [None]
            cur.append(event(kind, tid=draw(st.sampled_from(threads)),
                             cid=draw(st.sampled_from(codes)), lineno=draw(st.integers(1, 30)),
                             depth=draw(st.integers(0, 140)), ts=draw(st.sampled_from(TS)),
                             arg=draw(st.sampled_from(args))))
    frames.append(b"".join(cur))
    return frames


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=streams(), fmt=st.sampled_from(sorted(FORMATS)),
       limit=st.sampled_from([-1, -1, 0, 3, 20]))
def test_generated_streams(session: Session, frames: List[bytes], fmt: str, limit: int) -> None:
    check_same(session, frames, fmt, limit=limit)


# ---- the real loop: cli._stream over a socket -------------------------------------------------

def stream_through_cli(frames: List[bytes], setting: str, options: RenderOptions,
                       max_events: int = 0) -> Tuple[str, int, int]:
    """Output, exit code and shown events of cli._stream reading the frames (then BYE) from a
    socket, with HUNTER_ATTACH_FASTPATH=setting."""
    s = Session(pid=PID, uid=os.getuid(), root="/", config={}, tracer=None, log=lambda _m: None)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    data = b"".join(protocol.encode_frame(protocol.RECORDS, f) for f in frames)
    data += protocol.encode_json(protocol.BYE, {"events": 0, "dropped": 0})
    writer = threading.Thread(target=theirs.sendall, args=(data,), daemon=True)
    out = io.StringIO()
    old = os.environ.get("HUNTER_ATTACH_FASTPATH")
    os.environ["HUNTER_ATTACH_FASTPATH"] = setting
    try:
        s.conn = ours
        renderers = make_renderers(options, out)
        status = cli.Status(False)
        writer.start()
        code = cli._stream(s, renderers, status, max_events, None, PID, [])
        writer.join()
        return out.getvalue(), code, status.shown
    finally:
        if old is None:
            os.environ.pop("HUNTER_ATTACH_FASTPATH", None)
        else:
            os.environ["HUNTER_ATTACH_FASTPATH"] = old
        theirs.close()
        s.close()


@pytest.mark.parametrize("max_events", [0, 1, 25])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_cli_stream(fmt: str, max_events: int) -> None:
    frames = tricky_stream()
    options = RenderOptions(**FORMATS[fmt])
    expected = stream_through_cli(frames, "0", options, max_events)
    if max_events:
        assert expected[2] == max_events
        assert len(expected[0].splitlines()) <= max_events + 3  # drop markers before the cut
    for setting in ["py"] + (["c"] if fastpath.available() else []):
        assert stream_through_cli(frames, setting, options, max_events) == expected


def test_make_sink_choice(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    renderers = make_renderers(RenderOptions(color="never"), io.StringIO())
    monkeypatch.setenv("HUNTER_ATTACH_FASTPATH", "0")
    assert fastpath.make_sink(session, renderers) is None
    monkeypatch.setenv("HUNTER_ATTACH_FASTPATH", "py")
    assert type(fastpath.make_sink(session, renderers)) is fastpath.PySink
    monkeypatch.delenv("HUNTER_ATTACH_FASTPATH")
    expected = fastpath.CSink if fastpath.available() else fastpath.PySink
    assert type(fastpath.make_sink(session, renderers)) is expected
    # The text renderer is the fast one; perfetto and summary are fed objects.
    renderers = make_renderers(RenderOptions(json=True, summary=True), io.StringIO())
    sink = fastpath.make_sink(session, renderers)
    assert sink is not None and sink.renderer is renderers[0] and sink.slow == renderers[1:]


def test_without_the_extension(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler at install time: PySink, and the same output."""
    monkeypatch.setattr(fastpath, "_speedups", None)
    monkeypatch.delenv("HUNTER_ATTACH_FASTPATH", raising=False)
    assert not fastpath.available()
    renderers = make_renderers(RenderOptions(json=True), io.StringIO())
    assert type(fastpath.make_sink(session, renderers)) is fastpath.PySink
    with pytest.raises(RuntimeError):
        fastpath.make_sink(session, renderers, use_c=True)
    frames = tricky_stream()
    assert (stream_through_cli(frames, "", RenderOptions(json=True))
            == stream_through_cli(frames, "0", RenderOptions(json=True)))


@needs_c
def test_decoder_is_collected() -> None:
    """The decoder and its sink reference each other (callbacks are bound methods)."""
    import gc
    import weakref

    s = Session(pid=PID, uid=os.getuid(), root="/", config={}, tracer=None, log=lambda _m: None)
    try:
        sink = fastpath.make_sink(s, make_renderers(RenderOptions(color="never"), io.StringIO()),
                                  use_c=True)
        assert sink is not None
        sink.feed(b"".join(tricky_stream()[:2]))
        ref = weakref.ref(sink)
        del sink
        gc.collect()
        assert ref() is None
    finally:
        s.close()
