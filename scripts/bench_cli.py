"""CLI-side throughput: decode + render of a synthetic RECORDS stream, in events per second.

The stream is what the agent sends for an everything-matches query on a busy process: CODE and
THREAD records before first use, then EVENT records in RECORDS frames of about 1 MiB. Two mixes:

- ``line``: a line-heavy program (about 85% line events, 28-byte records without argument);
- ``call``: a call/return-heavy one (calls with two to four ``[name, repr]`` arguments, returns
  with a repr, a few lines and exceptions).

Each (mix, format, pipeline) is measured ``--repeat`` times and the median is reported:

- format ``text`` (hunter's CallPrinter, no colors), ``color`` (the same, colored), ``code``
  (CodePrinter) or ``json``, always written to /dev/null through a TextIOWrapper;
- pipeline ``python`` (Session._decode builds an Event per event, every renderer's ``event()``),
  ``fast`` (hunter_attach.fastpath with the C extension), ``fast-py`` (fastpath without it);
- ``direct``: the decoder is fed the payloads in a loop; ``session``: the real path, a writer
  thread pushes the frames through a socketpair into Session.items() and cli._stream.

    python scripts/bench_cli.py                      # everything, 1M events per mix
    python scripts/bench_cli.py --mix line --format json --pipeline fast -n 3000000

Wall-clock time is what users see, but on a shared machine it mostly measures the neighbours:
``--clock cpu`` divides by this process's CPU time instead (the writer thread's included).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hunter_attach import protocol  # noqa: E402
from hunter_attach.render import RenderOptions, make_renderers  # noqa: E402
from hunter_attach.session import Session  # noqa: E402

try:
    from hunter_attach import fastpath
except ImportError:  # before the fast path existed
    fastpath = None  # type: ignore[assignment]

PID = 4242
FRAME_BYTES = 1 << 20

FILES = [
    "/usr/lib/python3.11/json/encoder.py",
    "/usr/lib/python3.11/json/decoder.py",
    "/usr/lib/python3.11/posixpath.py",
    "/srv/app/venv/lib/python3.11/site-packages/requests/models.py",
    "/srv/app/venv/lib/python3.11/site-packages/sqlalchemy/orm/session.py",
    "/srv/app/service/handlers.py",
    "/srv/app/service/models.py",
    "/srv/app/service/util.py",
]
NAMES = ["get", "set", "encode", "decode", "join", "normpath", "handle_request", "to_dict",
         "validate", "_iterencode", "raw_decode", "query", "commit", "flush", "__init__",
         "__eq__", "_compute", "render", "dispatch", "wrapper"]
VALUES = ["None", "1", "42", "'user:1234'", "True", "[1, 2, 3]", "{'a': 1, 'b': [2, 3]}",
          "<app.models.User object at 0x7f3a2c1b9e50>", "b'\\x00\\x01'", "3.25",
          "'/srv/app/static/index.html'", "('GET', '/api/v1/items')", "frozenset({1, 2})"]
ARGNAMES = ["self", "key", "value", "path", "request", "default", "*args", "**kwargs", "obj"]
EXC = "(<class 'KeyError'>, KeyError('missing'), <traceback object at 0x7f3a2c0e1d40>)"


def _code_records(rng: random.Random, count: int) -> List[Dict[str, Any]]:
    codes = []
    for i in range(count):
        filename = FILES[i % len(FILES)]
        function = NAMES[i % len(NAMES)]
        first = 10 + 37 * i
        nlines = rng.randint(4, 25)
        lines = {str(first): "    def %s(self, key, value=None):\n" % function}
        for n in range(first + 1, first + nlines):
            lines[str(n)] = "        %s = compute_%d(key, value)  # line %d\n" % (
                "x" * rng.randint(1, 8), n % 7, n)
        codes.append({"id": i + 1, "filename": filename,
                      "module": filename.rsplit("/", 1)[1][:-3], "function": function,
                      "qualname": "Thing%d.%s" % (i % 5, function), "firstlineno": first,
                      "stdlib": filename.startswith("/usr/lib"), "lines": lines,
                      "fullsource": lines[str(first)]})
    return codes


def build_stream(mix: str, n: int, seed: int = 1) -> List[bytes]:
    """RECORDS payloads (about FRAME_BYTES each) holding ``n`` events of the given mix."""
    rng = random.Random(seed)
    codes = _code_records(rng, 60)
    hot = codes[:12]  # most calls go to a few functions, as in real programs
    threads = [{"id": 1, "ident": 140230000000001, "name": "MainThread", "main": True},
               {"id": 2, "ident": 140230000000002, "name": "worker-1", "main": False},
               {"id": 3, "ident": 140230000000003, "name": "ThreadPoolExecutor-0_0",
                "main": False}]
    if mix == "line":
        p_line, p_call, p_exc = 0.86, 0.07, 0.002
    elif mix == "call":
        p_line, p_call, p_exc = 0.10, 0.44, 0.01
    else:
        raise ValueError(mix)
    sent_codes = set()
    sent_threads = set()
    stacks: Dict[int, List[Tuple[Dict[str, Any], int]]] = {t["id"]: [] for t in threads}
    pack = protocol.EVENT.pack
    u32 = protocol.U32.pack
    payloads: List[bytes] = []
    cur: List[bytes] = []
    size = 0
    ts = 1_000_000
    thread = threads[0]
    active = 1
    for i in range(n):
        if i and i % rng.randint(40, 400) == 0:
            if i > n // 20:
                active = len(threads)  # the workers start a little later
            thread = threads[rng.randrange(active)]
        tid = thread["id"]
        if tid not in sent_threads:
            sent_threads.add(tid)
            rec = protocol.encode_meta(protocol.REC_THREAD, thread)
            cur.append(rec)
            size += len(rec)
        stack = stacks[tid]
        r = rng.random()
        ts += rng.randint(40, 900)
        if not stack or (len(stack) < 14 and r < p_call):
            code = rng.choice(hot) if rng.random() < 0.8 else rng.choice(codes)
            if code["id"] not in sent_codes:
                sent_codes.add(code["id"])
                rec = protocol.encode_meta(protocol.REC_CODE, code)
                cur.append(rec)
                size += len(rec)
            nargs = rng.randint(1, 4)
            arg = json.dumps([[rng.choice(ARGNAMES), rng.choice(VALUES)] for _ in range(nargs)],
                             separators=(",", ":")).encode()
            rec = pack(protocol.REC_EVENT, protocol.CALL, protocol.FLAG_ARG, tid, code["id"],
                       code["firstlineno"], len(stack), ts) + u32(len(arg)) + arg
            stack.append((code, code["firstlineno"]))
        elif r < p_call + p_line:
            code, lineno = stack[-1]
            nlines = len(code["lines"])
            lineno = code["firstlineno"] + 1 + (lineno - code["firstlineno"]) % max(nlines - 1, 1)
            stack[-1] = (code, lineno)
            rec = pack(protocol.REC_EVENT, protocol.LINE, 0, tid, code["id"], lineno, len(stack),
                       ts)
        elif r < p_call + p_line + p_exc:
            code, lineno = stack[-1]
            rec = pack(protocol.REC_EVENT, protocol.EXCEPTION, protocol.FLAG_ARG, tid,
                       code["id"], lineno, len(stack), ts) + u32(len(EXC)) + EXC.encode()
        else:
            code, lineno = stack.pop()
            arg = rng.choice(VALUES).encode()
            rec = pack(protocol.REC_EVENT, protocol.RETURN, protocol.FLAG_ARG, tid, code["id"],
                       lineno, len(stack), ts) + u32(len(arg)) + arg
        cur.append(rec)
        size += len(rec)
        if size >= FRAME_BYTES:
            payloads.append(b"".join(cur))
            cur, size = [], 0
    if cur:
        payloads.append(b"".join(cur))
    return payloads


# ---- pipelines ----------------------------------------------------------------------------------

FORMATS = {
    "text": RenderOptions(color="never"),
    "color": RenderOptions(color="always"),
    "code": RenderOptions(printer="code", color="never"),
    "json": RenderOptions(json=True),
}


def _session() -> Session:
    return Session(pid=PID, uid=os.getuid(), root="/", config={}, tracer=None,
                   log=lambda _msg: None)


def _devnull() -> io.TextIOWrapper:
    return open(os.devnull, "w", encoding="utf-8")


def _fast_sink(session: Session, renderers: List[Any], pipeline: str) -> Any:
    if pipeline == "python":
        return None
    if fastpath is None:
        raise SystemExit("hunter_attach.fastpath is not available")
    sink = fastpath.make_sink(session, renderers, use_c=(pipeline == "fast"))
    if sink is None:
        raise SystemExit("the fast path does not apply to these renderers")
    return sink


CLOCK: Callable[[], float] = time.perf_counter


def run_direct(payloads: List[bytes], fmt: str, pipeline: str) -> float:
    """Seconds to decode and render every payload, as cli._stream does, without the socket."""
    session = _session()
    out = _devnull()
    try:
        renderers = make_renderers(FORMATS[fmt], out)
        sink = _fast_sink(session, renderers, pipeline)
        t0 = CLOCK()
        if sink is None:
            handle = session._handle
            records = protocol.RECORDS
            from hunter_attach.events import Event
            for payload in payloads:
                for item in handle(records, payload):
                    if isinstance(item, Event):
                        for r in renderers:
                            r.event(item)
                    else:
                        for r in renderers:
                            r.drop(item.count, item.seq)
                for r in renderers:
                    r.flush()
        else:
            for payload in payloads:
                sink.emit(sink.feed(payload))
                for r in renderers:
                    r.flush()
        for r in renderers:
            r.close()
        return CLOCK() - t0
    finally:
        out.close()
        session.close()


def run_session(payloads: List[bytes], fmt: str, pipeline: str) -> float:
    """Seconds for cli._stream to take every frame from a socket (a writer thread pushes them,
    then BYE) and render it."""
    from hunter_attach import cli

    session = _session()
    out = _devnull()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    frames = [protocol.encode_frame(protocol.RECORDS, p) for p in payloads]
    frames.append(protocol.encode_json(protocol.BYE, {"events": 0, "dropped": 0}))

    def writer() -> None:
        for frame in frames:
            theirs.sendall(frame)

    try:
        session.conn = ours
        renderers = make_renderers(FORMATS[fmt], out)
        if fastpath is not None:  # what cli._stream picks: see fastpath.make_sink
            os.environ["HUNTER_ATTACH_FASTPATH"] = {"python": "0", "fast-py": "py",
                                                   "fast": "c"}[pipeline]
        t = threading.Thread(target=writer, daemon=True)
        t0 = CLOCK()
        t.start()
        saved = cli._say
        cli._say = lambda text: None  # type: ignore[assignment]
        try:
            code = cli._stream(session, renderers, cli.Status(False), 0, None, PID, [])
        finally:
            cli._say = saved  # type: ignore[assignment]
        t.join()
        elapsed = CLOCK() - t0
        assert code == 0 and session.bye is not None
        return elapsed
    finally:
        os.environ.pop("HUNTER_ATTACH_FASTPATH", None)
        theirs.close()
        out.close()
        session.close()


def count_events(payloads: List[bytes]) -> int:
    return sum(1 for p in payloads for rtype, _ in protocol.iter_records(p)
               if rtype == protocol.REC_EVENT)


def measure(fn: Callable[[], float], n: int, repeat: int) -> Tuple[float, List[float]]:
    rates = [n / fn() for _ in range(repeat)]
    return statistics.median(rates), rates


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--events", type=int, default=1_000_000)
    ap.add_argument("--mix", choices=["line", "call"], action="append")
    ap.add_argument("--format", choices=sorted(FORMATS), action="append")
    ap.add_argument("--pipeline", choices=["python", "fast", "fast-py"], action="append")
    ap.add_argument("--via", choices=["direct", "session"], action="append")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    mixes = args.mix or ["line", "call"]
    formats = args.format or ["text", "json"]
    pipelines = args.pipeline or (["python", "fast"] if fastpath is not None else ["python"])
    vias = args.via or ["direct", "session"]
    print(f"# {sys.implementation.name} {sys.version.split()[0]}, {args.events} events per mix, "
          f"median of {args.repeat}, {args.clock} clock", flush=True)
    print(f"{'mix':5} {'format':6} {'pipeline':8} {'via':8} {'events/s':>12}   runs (k/s)")
    for mix in mixes:
        payloads = build_stream(mix, args.events)
        n = count_events(payloads)
        for fmt in formats:
            for pipeline in pipelines:
                for via in vias:
                    run = run_direct if via == "direct" else run_session
                    med, rates = measure(partial(run, payloads, fmt, pipeline), n, args.repeat)
                    print(f"{mix:5} {fmt:6} {pipeline:8} {via:8} {med:12,.0f}   "
                          + " ".join(f"{r / 1e3:.0f}" for r in rates), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
