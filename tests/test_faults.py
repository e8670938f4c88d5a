"""Fault injection: try to break the safety guarantees with real processes and the real CLI.

1. Loss is explicit: a flood target read through a deliberately slow reader loses nothing in
   lossless mode (the target is slowed down instead, and its memory stays bounded), and every
   loss in --drop mode is accounted for exactly.
2. Faults: the CLI killed or signalled, the target exiting, being killed, exec'ing or forking,
   two CLIs at once, repeated sessions, many attach/detach cycles. After each: the target is
   untraced, its threads and descriptors are back, and the CLIs left nothing in their TMPDIR.

Each of the tests for a slow, stalled or signalled consumer, and for fork, once found a real bug
(lossless mode giving up on a slow but live CLI, a 2 s final flush, unmarked tail drops, SIGTERM
ignored while stdout was blocked, output cut by a signal, a forked child keeping the agent's
socket, lock and hooks).
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from typing import Any, Dict, List, NamedTuple, Sequence

import pytest
from fault_support import (
    FLOOD,
    FORKER,
    SERVICE,
    App,
    Drain,
    StreamCheck,
    TmpGuard,
    cli_popen_bytes,
    finish,
    interrupt,
    is_clean,
    pid_alive,
    read_stderr,
    read_until,
    rss_kb,
    tracer_stats,
    wait_manhole,
    wait_until,
    workers_clean_since,
)
from support import cli, cli_popen, interpreters, json_events, wait_for_line

PYTHONS = interpreters()
NEWEST = max(PYTHONS, key=lambda v: tuple(map(int, v.split("."))))


def python(version: str) -> str:
    if version not in PYTHONS:
        pytest.skip("CPython %s is not installed" % version)
    return PYTHONS[version]


def mode_args(mode: str) -> List[str]:
    return ["--gdb"] if mode == "gdb" else []


def same_resources(before: Dict[str, Any], after: Dict[str, Any]) -> None:
    assert after["threads"] == before["threads"]
    assert after["native_threads"] == before["native_threads"]
    assert after["fds"] == before["fds"]


def settled(target: App, before: Dict[str, Any], timeout: float = 3.0) -> Dict[str, Any]:
    """The target's status once its threads and descriptors are back to `before` (a manhole
    connection thread of ours may take a moment to finish); asserts they get there."""
    end = time.monotonic() + timeout
    while True:
        status = target.status()
        keys = ("threads", "native_threads", "fds")
        if all(status[k] == before[k] for k in keys) or time.monotonic() > end:
            same_resources(before, status)
            return status
        time.sleep(0.05)


def assert_progress(target: App, pause: float = 0.3) -> None:
    """flood.py: every worker thread is running (its loop counter moves)."""
    first = target.status()["workers"]
    time.sleep(pause)
    second = target.status()["workers"]
    stuck = [name for name in first if second[name]["count"] <= first[name]["count"]]
    assert not stuck, "workers not making progress: %s" % stuck


# ---- 1. loss is explicit ----------------------------------------------------------------------

# A reader this slow (at most 8 MB/s of JSON, well below what the CLI can write) keeps the CLI
# blocked on its stdout, so it stops reading its socket and the agent's buffer fills: the test
# checks that the pipe was full at nearly every read. (Much slower readers, below ~1 MB of
# records per 10 s, hit the bug in test_lossless_survives_a_very_slow_consumer.)
SLOW_CHUNK = 16384
SLOW_PAUSE = 0.002
TRACE_SECONDS = 10.0
RSS_GROWTH_LIMIT_KB = 50 * 1024


class FloodRun(NamedTuple):
    check: StreamCheck
    returncode: int
    stderr: str
    rss_before: int
    rss: List[int]
    traced_for: float
    saturated: float  # the share of slow reads that found a full chunk waiting: CLI blocked


def flood_session(target: App, extra: Sequence[str], query: Sequence[str],
                  stop: str = "duration", pause_at_detach: float = 0.0,
                  seconds: float = TRACE_SECONDS, chunk: int = SLOW_CHUNK,
                  pause: float = SLOW_PAUSE) -> FloodRun:
    """Trace `target` with --json through a slow reader for `seconds`, then end the session
    and read the rest at full speed.

    stop="duration": the CLI stops by itself (-d), just after the reader has become fast.
    stop="sigint": the test sends SIGINT while the reader is still slow (so the CLI is blocked
    in a write to its stdout), reads slowly for 0.3 s more, then fast.
    With `pause_at_detach` (and -d), the reader stays slow until the target is untraced (the
    agent has processed STOP and is flushing what is left), then reads nothing for that long,
    then drains: a consumer that is slow while the agent finishes, like a paused terminal."""
    rss_before = rss_kb(target.pid)
    duration = seconds + (1.0 if not pause_at_detach else 0.0)
    args = list(extra) + (["-d", str(duration)] if stop == "duration" else [])
    proc = cli_popen_bytes("-p", str(target.pid), "--json", *args, *query)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    check = StreamCheck()
    rss: List[int] = []
    start = time.monotonic()
    first = fast_from = None
    last_sample = 0.0
    slow_reads = full_reads = 0
    untraced = threading.Event()
    watcher = None
    try:
        while True:
            now = time.monotonic()
            assert now - start < 150, "the CLI did not finish"
            if now - last_sample >= 0.25:
                rss.append(rss_kb(target.pid))
                last_sample = now
            if first is not None and fast_from is None and now - first >= seconds:
                if stop == "sigint":
                    proc.send_signal(signal.SIGINT)
                    fast_from = now + 0.3
                elif not pause_at_detach:
                    fast_from = now
                elif watcher is None:
                    # watched on a thread: `status` can be slow while the workers contend
                    watcher = threading.Thread(target=lambda: wait_until(
                        lambda: is_clean(target.status()), 60, 0.05, "untraced") and
                        untraced.set(), daemon=True)
                    watcher.start()
                elif untraced.is_set():
                    time.sleep(pause_at_detach)
                    fast_from = now
            slow = fast_from is None or now < fast_from
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            data = os.read(fd, chunk if slow else 1 << 20)
            if not data:
                break
            if first is None:
                first = time.monotonic()
            elif slow:
                slow_reads += 1
                full_reads += len(data) == chunk
            check.feed(data)
            if slow:
                time.sleep(pause)
        proc.wait(30)
    finally:
        finish(proc)
    traced_for = (fast_from or time.monotonic()) - (first or start)
    return FloodRun(check, proc.returncode, read_stderr(proc), rss_before, rss, traced_for,
                    full_reads / max(slow_reads, 1))


def flood_target(version: str) -> App:
    target = App(FLOOD, python(version), "--manhole", "--handler", "exec")
    wait_manhole(target.pid)
    return target


@pytest.mark.parametrize("version", ["3.11", NEWEST])
def test_lossless_slow_reader_loses_nothing(version: str, tmp_path) -> None:
    """Default (lossless) mode: the slow reader slows the target down; not one event is lost,
    the target's memory stays bounded, and its threads run on at full speed after detach."""
    with flood_target(version) as target:
        before = target.status()
        guard = TmpGuard()
        run = flood_session(target, [], ["module=__main__"])
        assert run.traced_for >= TRACE_SECONDS
        assert run.saturated > 0.9, "the reader was not the bottleneck: %.2f" % run.saturated
        check = run.check
        stats = tracer_stats(target.pid, str(tmp_path))
        info = (run.stderr, stats, check.events, check.drops[:5], check.errors[:5])
        assert run.returncode == 0, info
        assert "process %d detached" % target.pid in run.stderr
        assert "dropped" not in run.stderr and "Traceback" not in run.stderr, info
        assert check.errors == [] and check.drops == []  # seq is 0, 1, 2, ... without a gap
        assert check.events > 10000, check.events
        assert {"tiny", "pair"} <= check.functions
        assert len(check.threads) == 4, check.threads
        growth = max(run.rss) - run.rss_before
        assert growth < RSS_GROWTH_LIMIT_KB, "target RSS grew by %d kB" % growth
        # the tracer in the target counted exactly what the CLI printed
        assert stats["dropped"] == 0 and not stats["dead"], stats
        assert stats["seen"] == stats["sent"] == check.events, (stats, check.events)
        after = settled(target, before)
        assert is_clean(after), after
        assert workers_clean_since(after, time.monotonic() - 1.0)
        assert_progress(target)
        assert guard.wait_clean([target.pid], [target.pid]) == []


@pytest.mark.parametrize("version", ["3.11", pytest.param(NEWEST, marks=pytest.mark.slow)])
def test_lossless_survives_a_very_slow_consumer(version: str, tmp_path) -> None:
    with flood_target(version) as target:
        run = flood_session(target, [], ["module=__main__"], seconds=13.0, chunk=256,
                            pause=0.01)
        stats = tracer_stats(target.pid, str(tmp_path))
        assert is_clean(target.status())
        check = run.check
        assert check.errors == [], check.errors[:3]
        assert not stats["dead"] and stats["dropped"] == 0, stats
        assert check.events == stats["seen"], (check.events, stats)
        assert run.returncode == 0, run.stderr


@pytest.fixture(scope="module")
def drop_run(tmp_path_factory) -> Dict[str, Any]:
    """One --drop session on a flood target through the slow reader, shared by the tests below.
    The target is untouched while the reader is slow: --drop never makes it wait."""
    scratch = str(tmp_path_factory.mktemp("drop"))
    with flood_target(NEWEST) as target:
        guard = TmpGuard()
        run = flood_session(target, ["--drop"], ["module=__main__"])
        stats = tracer_stats(target.pid, scratch)
        status = target.status()
        assert_progress(target)
        leftovers = guard.wait_clean([target.pid], [target.pid])
    return {"run": run, "stats": stats, "status": status, "leftovers": leftovers}


def test_drop_mode_marks_every_loss_in_the_stream(drop_run: Dict[str, Any]) -> None:
    """--drop: the target never waits; losses are marked in the stream, and the seq after a
    marker is the marker's seq + count (the CLI counts every event, shown or not)."""
    run, stats = drop_run["run"], drop_run["stats"]
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    check = run.check
    assert check.errors == [], check.errors[:5]
    assert check.drops, "a flood through a slow reader dropped nothing?"
    assert all(expected == seq for expected, seq in check.after_drop), check.after_drop[:5]
    assert stats["sent"] == check.events, (stats, check.events)  # every kept event is shown
    assert stats["seen"] == stats["sent"] + stats["dropped"]
    growth = max(run.rss) - run.rss_before
    assert growth < RSS_GROWTH_LIMIT_KB, "target RSS grew by %d kB" % growth
    assert is_clean(drop_run["status"])
    assert drop_run["leftovers"] == []


def test_drop_mode_markers_add_up_to_the_total(drop_run: Dict[str, Any]) -> None:
    run, stats = drop_run["run"], drop_run["stats"]
    check = run.check
    assert "%d events dropped" % stats["dropped"] in run.stderr, run.stderr
    assert check.dropped == stats["dropped"], (check.dropped, stats)


@pytest.mark.parametrize("drop", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["lossless", "drop"])
def test_slow_consumer_during_detach_loses_nothing_silently(drop: bool, tmp_path) -> None:
    with flood_target(NEWEST) as target:
        # the query leaves the main thread alone, so `status` answers while the workers block
        run = flood_session(target, ["--drop"] if drop else [], ["function_in=tiny,pair"],
                            pause_at_detach=3.0, seconds=4.0)
        stats = tracer_stats(target.pid, str(tmp_path))
        assert is_clean(target.status())  # whatever happens, the target is fine
        check = run.check
        assert check.errors == [], check.errors[:3]
        # ... but every event the tracer counted must be shown or marked as dropped
        assert check.events + check.dropped == stats["seen"], (stats, check.events)
        assert run.returncode == 0, run.stderr
        assert "process %d detached" % target.pid in run.stderr


def test_ctrl_c_with_slow_reader_keeps_output_intact(tmp_path) -> None:
    with flood_target(NEWEST) as target:
        run = flood_session(target, [], ["function_in=tiny,pair"], stop="sigint", seconds=4.0)
        check = run.check
        assert check.corrupt == 0 and check.errors == [], check.errors[:3]
        assert run.returncode == 0, run.stderr
        stats = tracer_stats(target.pid, str(tmp_path))
        assert check.events == stats["sent"] == stats["seen"], (stats, check.events)
        assert is_clean(target.status())


def test_sigterm_detaches_even_when_stdout_is_blocked() -> None:
    with flood_target(NEWEST) as target:
        # the query leaves the main thread alone, so `status` answers while the workers block
        proc = cli_popen_bytes("-p", str(target.pid), "--json", "function_in=tiny,pair")
        check = StreamCheck()
        try:
            check.feed(read_until(proc, b'"kind"'))
            time.sleep(1.0)  # nobody reads: the CLI's stdout pipe is full by now
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            released = None
            while time.monotonic() - signalled < 5:
                status = target.status()
                if is_clean(status) and workers_clean_since(status, signalled):
                    released = time.monotonic() - signalled
                    break
                time.sleep(0.05)
            assert proc.stdout is not None
            while True:
                data = os.read(proc.stdout.fileno(), 1 << 20)
                if not data:
                    break
                check.feed(data)
            proc.wait(10)
        finally:
            finish(proc)
        assert released is not None and released < 3.0, "target released after %s s" % released
        assert check.errors == [], check.errors[:3]
        assert proc.returncode == 0, read_stderr(proc)


# ---- 2. faults ----------------------------------------------------------------------------------


@pytest.mark.gdb
@pytest.mark.parametrize("version", ["3.8", "3.11", NEWEST])
def test_gdb_cli_sigkill_untraces_every_thread_within_1s(version: str) -> None:
    """SIGKILL to the CLI in gdb mode: the agent sees the socket close and removes the tracer
    from every thread (each worker reports its own sys.gettrace()), and the dead CLI's private
    directory, within 1 s."""
    with App(FLOOD, python(version)) as target:
        before = target.status()
        guard = TmpGuard()
        proc = cli_popen("-p", str(target.pid), "--gdb", "--json", "function=tiny")
        try:
            Drain(proc, wait_for_line(proc, '"kind"'))
            assert not is_clean(target.status())
            if version < "3.12":
                # settrace backend: every worker thread has the tracer (as it says itself)
                wait_until(lambda: all(w["gettrace"] != "None" for w in
                                       target.status()["workers"].values()), 5,
                           what="every worker traced")
        finally:
            proc.kill()
            proc.wait()
        killed = time.monotonic()
        while True:
            status = target.status()
            if is_clean(status) and workers_clean_since(status, killed):
                break
            assert time.monotonic() - killed < 1.0, "tracer still installed after 1 s: %s" % (
                status)
            time.sleep(0.02)
        assert guard.wait_clean([target.pid], timeout=1.0) == []
        assert_progress(target)
        settled(target, before)


@pytest.mark.gdb
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_gdb_sigterm_sighup_detach_cleanly(sig: int) -> None:
    with App(SERVICE, PYTHONS[NEWEST], "--threads", "2") as target:
        before = target.status()
        guard = TmpGuard()
        proc = cli_popen("-p", str(target.pid), "--gdb", "--json", "module=workload")
        try:
            drain = Drain(proc, wait_for_line(proc, '"kind"'))
            took = interrupt(proc, sig)
            drain.join()
        finally:
            finish(proc)
        assert proc.returncode == 0
        err = read_stderr(proc)
        assert "process %d detached" % target.pid in err and "Traceback" not in err
        assert took < 3
        seqs = [e["seq"] for e in drain.events()]
        assert seqs == list(range(len(seqs)))
        after = settled(target, before)
        assert is_clean(after), after
        assert guard.wait_clean([target.pid]) == []


EXITS = [
    ("quit", "gdb"), ("quit", "manhole"), ("kill", "gdb"),
    ("exec-sleep", "gdb"), ("exec-sleep", "manhole"),
    ("exec-python", "gdb"), ("exec-python", "manhole"),
]


@pytest.mark.parametrize("how,mode", EXITS, ids=["-".join(e) for e in EXITS])
def test_target_goes_away_cli_reports_it(how: str, mode: str, request) -> None:
    """The target exits, is killed or exec()s another program (same pid, the agent's socket
    closed by O_CLOEXEC): the CLI says so in one line and exits 8 promptly."""
    if mode == "gdb":
        request.applymarker(pytest.mark.gdb)
        if request.getfixturevalue("gdb_unusable"):
            pytest.skip(request.getfixturevalue("gdb_unusable"))
    args = ["--manhole"] if mode == "manhole" else []
    with App(FORKER, PYTHONS[NEWEST], *args) as target:
        if mode == "manhole":
            wait_manhole(target.pid)
        guard = TmpGuard()
        proc = cli_popen("-p", str(target.pid), *mode_args(mode), "--json", "module=workload")
        try:
            drain = Drain(proc, wait_for_line(proc, '"kind"'))
            if how == "quit":
                target.send("quit")
            elif how == "kill":
                target.proc.kill()
            else:
                target.send("exec " + how.split("-")[1])
            gone = time.monotonic()
            proc.wait(10)
            took = time.monotonic() - gone
            drain.join()
        finally:
            finish(proc)
        err = read_stderr(proc)
        assert proc.returncode == 8, err
        assert took < 2.0, took
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert lines[0].startswith("hunter-trace: process %d attached" % target.pid)
        assert len(lines) == 2, lines  # attached, then one line saying what happened
        if how.startswith("exec"):
            assert pid_alive(target.pid)  # same pid, another program
            assert "process %d" % target.pid in lines[1], lines[1]
        else:
            assert "process %d exited" % target.pid in lines[1], lines[1]
        seqs = [e["seq"] for e in drain.events()]
        assert seqs == list(range(len(seqs)))
        assert guard.wait_clean([target.pid], [target.pid]) == []


def fork_child(target: App, report: str, seconds: float) -> int:
    answer = target.command("fork %s %s" % (report, seconds))
    assert answer.startswith("forked "), answer
    return int(answer.split()[1])


def read_report(path: str, final: bool = False) -> Dict[str, Any]:
    import json

    def ready() -> Any:
        if not os.path.exists(path):
            return None
        with open(path) as f:
            report = json.load(f)
        return report if report["final"] or not final else None

    return dict(wait_until(ready, 15, 0.05, "the child's report"))


def kill_pid(pid: Any) -> None:
    """A forked child of our target is ours too: don't leave it running."""
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def agent_sockets(before: Dict[str, Any], during: Dict[str, Any]) -> List[str]:
    """The descriptors that appeared in the target while it is traced: the agent's socket."""
    return sorted(link for fd, link in during["fds"].items()
                  if link.startswith("socket:") and before["fds"].get(fd) != link)


@pytest.mark.gdb
@pytest.mark.parametrize("version", sorted({"3.11", NEWEST} & set(PYTHONS)))
def test_fork_child_does_not_trace_parent_keeps_tracing(version: str, tmp_path) -> None:
    """os.fork() while traced: nothing the child runs reaches the CLI (child_work() is only
    called in the child), the child's own sys.gettrace() is None, and the parent's threads keep
    being traced until Ctrl-C."""
    report = str(tmp_path / "child.json")
    with App(FORKER, PYTHONS[version], "--threads", "2") as target:
        guard = TmpGuard()
        proc = cli_popen("-p", str(target.pid), "--gdb", "--json", "module=workload")
        try:
            drain = Drain(proc, wait_for_line(proc, '"kind"'))
            child = fork_child(target, report, 2.0)
            forked_at = len(drain.lines)
            early = read_report(report)
            final = read_report(report, final=True)
            assert not is_clean(target.status())  # the parent is still traced
            wait_until(lambda: len(drain.lines) > forked_at + 100, 10, what="events after fork")
            took = interrupt(proc)
            drain.join()
        finally:
            finish(proc)
        assert proc.returncode == 0, read_stderr(proc)
        assert took < 3
        events = drain.events()
        assert "child_work" not in {e["function"] for e in events}
        assert [e["seq"] for e in events] == list(range(len(events)))
        assert {"worker-0", "worker-1"} <= {e["threadname"] for e in events[forked_at:]}
        for state in (early, final):
            assert state["pid"] == child and state["ticks"] > 0
            assert state["gettrace"] == "None" and state["getprofile"] == "None", state
        assert is_clean(target.status())
        assert guard.wait_clean([target.pid, child]) == []


@pytest.mark.gdb
@pytest.mark.parametrize("version", sorted({"3.11", NEWEST} & set(PYTHONS)))
def test_fork_child_holds_no_agent_state(version: str, tmp_path) -> None:
    report = str(tmp_path / "child.json")
    with App(FORKER, PYTHONS[version], "--threads", "2") as target:
        before = target.status()
        proc = cli_popen("-p", str(target.pid), "--gdb", "--json", "module=workload")
        try:
            drain = Drain(proc, wait_for_line(proc, '"kind"'))
            agent = agent_sockets(before, target.status())
            assert len(agent) == 1, agent
            fork_child(target, report, 1.0)
            state = read_report(report)
            interrupt(proc)
            drain.join()
        finally:
            finish(proc)
        assert agent[0] not in state["fds"].values(), state["fds"]
        assert not [p for p in state["socket_peers"].values() if "hunter-attach-" in p]
        assert is_clean(state), state


@pytest.mark.gdb
@pytest.mark.parametrize("backend", ["c", "python"])
def test_fork_child_can_be_traced_itself(tmp_path, backend: str) -> None:
    """The parent forks while traced, events flowing: the child's copy of the tracer's locks
    and conditions (held or waited on by the parent's other threads) must not hang its own
    session, which once took the CLI's 5 s detach deadline or more."""
    report = str(tmp_path / "child.json")
    with App(FORKER, PYTHONS[NEWEST], "--threads", "1") as target:
        proc = cli_popen("-p", str(target.pid), "--gdb", "--backend", backend, "--json",
                         "module=workload")
        try:
            drain = Drain(proc, wait_for_line(proc, '"kind"'))
            child = fork_child(target, report, 8.0)
            read_report(report)
            interrupt(proc)
            drain.join()
            result = cli("-p", str(child), "--gdb", "--backend", backend, "--json",
                         "--max-events", "20", "function=child_work", timeout=30)
        finally:
            finish(proc)
            kill_pid(locals().get("child"))
        assert result.returncode == 0, result.stderr
        assert "did not confirm the detach" not in result.stderr
        assert len(json_events(result.stdout)) == 20


@pytest.mark.gdb
def test_parent_killed_while_forked_child_lives_cli_exits_promptly(tmp_path) -> None:
    report = str(tmp_path / "child.json")
    with App(FORKER, PYTHONS[NEWEST], "--threads", "1") as target:
        proc = cli_popen("-p", str(target.pid), "--gdb", "--json", "module=workload")
        try:
            drain = Drain(proc, wait_for_line(proc, '"kind"'))
            child = fork_child(target, report, 6.0)
            read_report(report)
            target.proc.kill()
            target.proc.wait()
            killed = time.monotonic()
            try:
                proc.wait(4)
            except Exception:
                pass
            took = time.monotonic() - killed
            drain.join(1)
        finally:
            finish(proc)
            kill_pid(locals().get("child"))
        assert took < 2.0, "the CLI exited %.1f s after the target died" % took
        assert proc.returncode == 8


@pytest.mark.parametrize("first,second", [("manhole", "manhole"), ("gdb", "gdb"),
                                          ("gdb", "manhole")])
def test_two_clis_at_once(first: str, second: str, request) -> None:
    """A second CLI gets a clear refusal (exit 7) and the first keeps streaming untouched."""
    if "gdb" in (first, second) and request.getfixturevalue("gdb_unusable"):
        pytest.skip(request.getfixturevalue("gdb_unusable"))
    with App(SERVICE, PYTHONS[NEWEST], "--manhole", "--handler", "exec",
             "--threads", "2") as target:
        wait_manhole(target.pid)
        before = target.status()
        guard = TmpGuard()
        proc = cli_popen("-p", str(target.pid), *mode_args(first), "--json", "module=workload")
        try:
            drain = Drain(proc, wait_for_line(proc, '"kind"'))
            started = time.monotonic()
            result = cli("-p", str(target.pid), *mode_args(second), "--json", "-d", "1",
                         "module=workload")
            assert time.monotonic() - started < 10
            seen = len(drain.lines)
            wait_until(lambda: len(drain.lines) > seen + 50, 5, what="the first CLI's events")
            assert proc.poll() is None
            interrupt(proc)
            drain.join()
        finally:
            finish(proc)
        assert result.returncode == 7, result.stderr
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert lines and "another hunter-trace session is already tracing" in lines[0], lines
        assert "Traceback" not in result.stderr
        assert proc.returncode == 0
        err = read_stderr(proc)
        assert "process %d detached" % target.pid in err
        events = drain.events()
        assert [e["seq"] for e in events] == list(range(len(events)))
        after = settled(target, before)
        assert is_clean(after), after
        assert guard.wait_clean([target.pid]) == []


REATTACH_QUERIES = [
    ["module=workload", "function=fib"],
    ["module=workload", "function=risky", "kind=call"],
    ["module=workload", "kind=exception"],
    ["module=workload", "function=gen"],
    ["module=workload", "depth_lt=2"],
]


def test_reattach_10_times_sessions_are_independent(gdb_unusable) -> None:
    """Ten sessions in a row on one target, alternating gdb and manhole and changing the query:
    each sees exactly its own query's events, seq and ts start at 0, depth is counted from its
    own attach, and nothing piles up in the target."""
    with App(SERVICE, PYTHONS[NEWEST], "--manhole", "--handler", "exec",
             "--threads", "2") as target:
        wait_manhole(target.pid)
        before = target.status()
        guard = TmpGuard()
        modules = None
        for i in range(10):
            mode = "gdb" if i % 2 and not gdb_unusable else "manhole"
            query = REATTACH_QUERIES[i % len(REATTACH_QUERIES)]
            result = cli("-p", str(target.pid), *mode_args(mode), "--json", "--max-events",
                         "40", *query)
            assert result.returncode == 0, (i, mode, result.stderr)
            events = json_events(result.stdout)
            assert len(events) == 40, (i, mode, len(events))
            assert [e["seq"] for e in events] == list(range(40))
            assert events[0]["ts"] < 2.0
            assert {e["module"] for e in events} == {"workload"}
            if "function=fib" in query:
                assert {e["function"] for e in events} == {"fib"}
                # tick() was running before attach: fib's first frame is at depth 1
                assert min(e["depth"] for e in events if e["kind"] == "call") == 1
            elif "function=risky" in query:
                assert {(e["function"], e["kind"]) for e in events} == {("risky", "call")}
            elif "kind=exception" in query:
                assert {e["kind"] for e in events} == {"exception"}
            elif "function=gen" in query:
                assert {e["function"] for e in events} == {"gen"}
            else:
                assert max(e["depth"] for e in events) < 2
            status = settled(target, before)
            assert is_clean(status), (i, status)
            # the agent package is built once and reused, never duplicated
            assert modules is None or status["modules"] == modules
            modules = status["modules"]
        assert guard.wait_clean([target.pid]) == []


def attach_detach_cycles(cycles: int) -> Dict[str, float]:
    """`cycles` gdb sessions on a busy 4-thread target, checking after each one that the
    target's threads, descriptors and trace functions are back to what they were."""
    times: List[float] = []
    with App(SERVICE, PYTHONS[NEWEST], "--threads", "4", "--busy") as target:
        before = target.status()
        guard = TmpGuard()
        for i in range(cycles):
            started = time.monotonic()
            result = cli("-p", str(target.pid), "--gdb", "--json", "--max-events", "50",
                         "module=workload", timeout=60)
            times.append(time.monotonic() - started)
            assert result.returncode == 0, (i, result.stderr)
            events = json_events(result.stdout)
            assert [e["seq"] for e in events] == list(range(50)), i
            assert target.alive(), target.stderr()
            status = settled(target, before)
            assert is_clean(status), (i, status)
        assert guard.wait_clean([target.pid]) == []
    times.sort()
    summary = {"cycles": cycles, "total": sum(times), "median": times[len(times) // 2],
               "max": times[-1]}
    print("attach/detach cycles: %(cycles)d in %(total).1f s, median %(median).2f s, "
          "max %(max).2f s" % summary)
    return summary


@pytest.mark.gdb
@pytest.mark.timeout(600)
def test_attach_detach_100_cycles_gdb() -> None:
    """Issue 4's stress: 100 gdb sessions on a busy 4-thread target, never hung or crashed."""
    summary = attach_detach_cycles(100)
    assert summary["max"] < 30
