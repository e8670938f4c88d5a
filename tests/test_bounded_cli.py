"""The CLI's memory stays flat however many threads the target starts and ends (issue 10).

The agent reports a traced thread's end (a THREAD_END record, when its OS thread is gone or a
new thread got its ident); the CLI then forgets it in every table and cache. The real-target test
watches the CLI's RSS and its tables through thousands of short-lived threads; the unit tests
hold the decoders (plain, PySink, CSink) to forgetting and to bounded template caches."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any, Dict, List, Optional

import pytest
from support import CLI_TMP, HERE, interpreters, newest
from test_fastpath import CALL, LINE, code, event, thread

from hunter_attach import fastpath, protocol
from hunter_attach.errors import ProtocolError
from hunter_attach.render import RenderOptions, make_renderers
from hunter_attach.render.summary import SummaryRenderer
from hunter_attach.session import Session

CHURN = os.path.join(HERE, "apps", "churn.py")
PID = 4322


def thread_end(tid: int) -> bytes:
    return protocol.THREAD_END.pack(protocol.REC_THREAD_END, tid)


def sink_pipelines() -> List[Any]:
    needs_c = pytest.mark.skipif(not fastpath.available(), reason="_speedups not built")
    return ["plain", "py", pytest.param("c", marks=needs_c)]


def new_session() -> Session:
    """A CLI session with no agent, to feed RECORDS payloads to."""
    return Session(pid=PID, uid=os.getuid(), root="/", config={}, tracer=None,
                   log=lambda _m: None)


@pytest.fixture
def session() -> Any:
    s = new_session()
    try:
        yield s
    finally:
        s.close()


def feed(s: Session, frames: List[bytes], pipeline: str, renderers: List[Any]
         ) -> Optional[fastpath.Sink]:
    """The frames through one pipeline, as cli._stream does."""
    sink = None if pipeline == "plain" else fastpath.make_sink(s, renderers, use_c=pipeline == "c")
    for frame in frames:
        for item in s._handle(protocol.RECORDS, frame, sink):
            if isinstance(item, fastpath.Batch):
                assert sink is not None
                sink.emit(item)
            elif item is not None and hasattr(item, "kind"):
                for r in renderers:
                    r.event(item)
    return sink


def cached_templates(sink: Optional[fastpath.Sink]) -> int:
    if isinstance(sink, fastpath.CSink):
        return int(sink._dec.cached)
    if isinstance(sink, fastpath.PySink):
        return len(sink._cache)
    return 0


# ---- decoders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pipeline", sink_pipelines())
def test_decoders_forget_ended_threads(session: Session, pipeline: str) -> None:
    """1000 threads, one after the other, all with the same ident (pthread idents are reused):
    each ends with THREAD_END. The session's thread table ends empty, the template cache holds
    at most the templates of the threads not yet swept, the summary has no stack left, and
    every line shows its own thread's name."""
    out, err = io.StringIO(), io.StringIO()
    renderers = make_renderers(RenderOptions(color="never", summary=True, summary_stream=err),
                               out)
    frames = [thread(1, "MainThread", True) + code(1) + event(CALL, tid=1)]
    for tid in range(2, 1002):
        frames.append(thread(tid, "worker-%d" % tid, False, ident=77)
                      + event(CALL, tid=tid, ts=tid * 1000) + event(LINE, tid=tid, lineno=11,
                                                                    depth=1, ts=tid * 1000 + 1)
                      + thread_end(tid))
    sink = feed(session, frames, pipeline, renderers)
    assert list(session.threads) == [1]
    assert cached_templates(sink) <= 2 * fastpath.SWEEP_AFTER + 1
    summary = [r for r in renderers if isinstance(r, SummaryRenderer)][0]
    if pipeline != "plain":  # the plain pipeline (a debugging aid) has no place for ends
        assert list(summary.stacks) == [(PID, 1)]
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + 2 * 1000
    for tid in range(2, 1002):
        for line in lines[1 + 2 * (tid - 2):3 + 2 * (tid - 2)]:
            assert line.startswith("worker-%d " % tid), line
    for r in renderers:
        r.close()
    assert "1001" in err.getvalue()  # the summary still counts every call


@pytest.mark.parametrize("pipeline", sink_pipelines())
def test_thread_end_of_unknown_thread_is_ignored(session: Session, pipeline: str) -> None:
    """An ended thread may be reported twice (by the ident check and by the reaper)."""
    out = io.StringIO()
    renderers = make_renderers(RenderOptions(color="never"), out)
    feed(session, [thread(1) + code(1) + thread_end(1) + thread_end(1) + thread_end(9)
                   + thread(2) + event(CALL, tid=2)], pipeline, renderers)
    assert list(session.threads) == [2]
    assert out.getvalue().count("=> f(") == 1


@pytest.mark.skipif(not fastpath.available(), reason="_speedups not built")
def test_c_templates_keep_only_their_text(session: Session) -> None:
    """A cached template holds its text, not the 64 KiB buffer it was made in (the CLI grew by
    hundreds of MB with a thread per request before)."""
    renderers = make_renderers(RenderOptions(color="never"), io.StringIO())
    frames = [code(1) + b"".join(thread(tid, "t-%d" % tid, False) + event(CALL, tid=tid)
                                 for tid in range(1, 3001))]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        sink = feed(session, frames, "c", renderers)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cached_templates(sink) >= 2990  # the thread column made them all once more
    assert grown < 3000 * 4096, grown  # was 3000 * 64 KiB


# ---- a real target -------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def _versions() -> List[str]:
    found = interpreters()
    picked = [v for v in ("3.10",) if v in found] + [newest(found)]
    return sorted(set(picked))


@pytest.mark.parametrize("version", _versions())
def test_thread_churn_keeps_the_cli_flat(version: str) -> None:
    """A target starting thousands of short-lived threads, traced until 2000 of them have been
    shown: every line names its own thread, the CLI's tables hold a handful of threads at the
    end, and its RSS does not grow after the first seconds."""
    python = interpreters()[version]
    target = subprocess.Popen([python, CHURN, "--churn", "4"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    err_file = tempfile.TemporaryFile(mode="w+")
    proc: Optional[subprocess.Popen] = None
    try:
        assert target.stdout is not None
        pid = int(target.stdout.readline().split()[1])
        proc = subprocess.Popen(
            [sys.executable, "-m", "hunter_attach", "-p", str(pid), "--gdb", "-v", "--json",
             "function=work"], cwd=os.path.dirname(HERE), stdout=subprocess.PIPE,
            stderr=err_file, text=True, env=cli_env())
        assert proc.stdout is not None
        names: Dict[str, int] = {}
        samples: List[int] = []
        first: Optional[int] = None
        last_sample = 0.0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the CLI ended early: " + read_all(err_file)
            ev = json.loads(line)
            name = ev["threadname"]
            assert re.fullmatch(r"churn-\d+", name), ev
            names[name] = names.get(name, 0) + 1
            number = int(name.split("-")[1])
            first = number if first is None else first
            if time.monotonic() - last_sample >= 0.2:
                last_sample = time.monotonic()
                samples.append(rss_kib(proc.pid))
            if number - first >= 3000 and len(samples) >= 20:  # and 4 s at least
                break
        else:
            raise AssertionError("3000 threads were not shown in 120 s")
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, read_all(err_file)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        target.kill()
        target.wait(10)
    log = read_all(err_file)
    # Every thread shown whole (3 x call, line, return), but the first and last few, which
    # the attach and the detach cut.
    numbers = sorted(int(n.split("-")[1]) for n in names)
    middle = numbers[10:-10]
    assert middle and all(names["churn-%d" % n] == 9 for n in middle), \
        [(n, names["churn-%d" % n]) for n in middle if names["churn-%d" % n] != 9][:5]
    known = re.search(r"at the end: (\d+) threads", log)
    assert known is not None, log[-2000:]
    # At most the threads alive at the end plus those that ended in the last second or two;
    # 3000 went through.
    assert int(known.group(1)) <= 200, known.group(0)
    warm = samples[len(samples) // 4]
    top = max(samples[len(samples) // 2:])
    assert top <= warm + 24 * 1024, samples  # KiB


def cli_env() -> Dict[str, str]:
    # as support.cli_popen, but -v writes a lot: stderr goes to a file, not a pipe
    return dict(os.environ, TMPDIR=CLI_TMP)


def read_all(f: Any) -> str:
    f.seek(0)
    return str(f.read())


@pytest.mark.parametrize("version", _versions())
def test_threads_that_end_together_are_forgotten(version: str) -> None:
    """200 threads alive at once, then all gone: no new thread reuses their idents, so only the
    agent's look at the live OS threads (it also runs at STOP) tells the CLI they ended."""
    python = interpreters()[version]
    target = subprocess.Popen([python, CHURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    err_file = tempfile.TemporaryFile(mode="w+")
    proc: Optional[subprocess.Popen] = None
    try:
        assert target.stdout is not None and target.stdin is not None
        pid = int(target.stdout.readline().split()[1])
        baseline = len(os.listdir("/proc/%d/task" % pid))
        proc = subprocess.Popen(
            [sys.executable, "-m", "hunter_attach", "-p", str(pid), "--gdb", "-v", "--json",
             "function=work"], cwd=os.path.dirname(HERE), stdout=subprocess.PIPE,
            stderr=err_file, text=True, env=cli_env())
        deadline = time.monotonic() + 60
        while " attached " not in read_all(err_file):
            assert time.monotonic() < deadline and proc.poll() is None, read_all(err_file)
            time.sleep(0.1)
        target.stdin.write("spawn 200\n")
        target.stdin.flush()
        assert select.select([target.stdout], [], [], 60)[0]
        assert target.stdout.readline().strip() == "done"
        # joined is not gone: wait until the OS threads have left (the agent's own is extra)
        while len(os.listdir("/proc/%d/task" % pid)) > baseline + 1:
            assert time.monotonic() < deadline, os.listdir("/proc/%d/task" % pid)
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, read_all(err_file)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        target.kill()
        target.wait(10)
    names = {json.loads(line)["threadname"] for line in out.splitlines()}
    assert names == {"spawned-%d" % i for i in range(200)}
    known = re.search(r"at the end: (\d+) threads", read_all(err_file))
    assert known is not None and int(known.group(1)) <= 2, known


@pytest.mark.parametrize("pipeline", sink_pipelines())
def test_event_of_an_ended_thread_is_an_error(session: Session, pipeline: str) -> None:
    """The agent never names an ended thread again; if a stream does, every pipeline says so at
    the same record (the sinks, although the thread's templates are still cached)."""
    out = io.StringIO()
    renderers = make_renderers(RenderOptions(color="never"), out)
    with pytest.raises(ProtocolError, match="corrupt record.*7"):
        feed(session, [thread(7, "gone", False) + code(1) + event(CALL, tid=7) + thread_end(7)
                       + event(CALL, tid=7)], pipeline, renderers)
