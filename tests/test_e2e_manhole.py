"""End to end through a real manhole: real target processes, the real CLI, no mocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from support import (
    Target,
    cli,
    cli_popen,
    interpreters,
    json_events,
    newest,
    stop,
    tmp_leftovers,
    wait_for_line,
)

PYTHONS = interpreters()


def clean(status: dict) -> bool:
    return (status["gettrace"] == "None" and status["getprofile"] == "None"
            and status["tools"] == {} and status["thread_trace"] == "None"
            and status["thread_profile"] == "None")


def same_resources(before: dict, after: dict) -> None:
    assert after["threads"] == before["threads"]
    assert after["native_threads"] == before["native_threads"]
    assert after["fds"] == before["fds"]


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_manhole_trace_module_every_python(version: str) -> None:
    """A module query on every interpreter: events arrive, then nothing is left behind."""
    with Target(PYTHONS[version], "--manhole", "--handler", "exec") as target:
        before = target.status()
        leftovers = tmp_leftovers()
        result = cli("-p", str(target.pid), "--json", "-d", "1", "module=workload")
        assert result.returncode == 0, result.stderr
        assert "process %d attached" % target.pid in result.stderr
        assert "process %d detached" % target.pid in result.stderr
        events = json_events(result.stdout)
        assert events and {e["module"] for e in events} == {"workload"}
        assert {"call", "line", "return", "exception"} <= {e["kind"] for e in events}
        assert "worker-0" in {e["threadname"] for e in events}  # existed before attach
        calls = [e for e in events if e["kind"] == "call" and e["function"] == "fib"]
        assert calls and all(e["filename"].endswith("workload.py") for e in calls)
        after = target.status()
        assert clean(after), after
        same_resources(before, after)
        assert tmp_leftovers() == leftovers


@pytest.mark.parametrize("handler", ["repl", "exec"])
def test_manhole_activated_by_signal(handler: str) -> None:
    with Target(PYTHONS[newest(PYTHONS)], "--manhole", "--signal", "USR1", "--handler",
                handler) as target:
        result = cli("-p", str(target.pid), "-s", "SIGUSR1", "-d", "1", "--color=never",
                     "module=workload", "function=fib")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert any("=> fib(n=" in line for line in lines), result.stdout[:2000]
        assert any("<= fib: " in line for line in lines)
        assert all("workload.py:" in line for line in lines)
        assert clean(target.status())


def test_ctrl_c_detaches_and_target_runs_on() -> None:
    with Target(PYTHONS[newest(PYTHONS)], "--manhole") as target:
        before = target.status()
        proc = cli_popen("-p", str(target.pid), "--json", "module=workload")
        try:
            wait_for_line(proc, '"kind"')
            start = time.monotonic()
            stopped = stop(proc, signal.SIGINT)
            detach_time = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0
        assert "process %d detached" % target.pid in stopped.err
        # what was in flight at the signal is all there: whole lines, consecutive seq
        seqs = [e["seq"] for e in json_events(stopped.out)]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert detach_time < 2
        after = target.status()
        assert clean(after), after
        same_resources(before, after)
        assert target.alive()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_detach_cleanly(sig: int) -> None:
    with Target(PYTHONS[newest(PYTHONS)], "--manhole") as target:
        proc = cli_popen("-p", str(target.pid), "--json", "module=workload")
        wait_for_line(proc, '"kind"')
        stop(proc, sig)
        assert proc.returncode == 0
        assert clean(target.status())


@pytest.mark.parametrize("version", ["3.8", "3.11", "3.13"])
def test_cli_killed_agent_removes_itself_within_1s(version: str) -> None:
    if version not in PYTHONS:
        pytest.skip("CPython %s is not installed" % version)
    with Target(PYTHONS[version], "--manhole") as target:
        leftovers = tmp_leftovers()
        proc = cli_popen("-p", str(target.pid), "--json", "module=workload")
        wait_for_line(proc, '"kind"')
        assert not clean(target.status())  # tracing is on
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        while not clean(target.status()):
            assert time.monotonic() - killed < 1.0, "tracer still installed after 1 s"
            time.sleep(0.02)
        assert target.alive()
        # the agent removed the dead CLI's private directory too
        while tmp_leftovers() != leftovers:
            assert time.monotonic() - killed < 1.0, tmp_leftovers()
            time.sleep(0.02)


def test_target_exits_mid_trace() -> None:
    with Target(PYTHONS[newest(PYTHONS)], "--manhole") as target:
        proc = cli_popen("-p", str(target.pid), "--json", "module=workload")
        wait_for_line(proc, '"kind"')
        target.proc.kill()
        target.proc.wait()
        exited = time.monotonic()
        proc.wait(5)
        assert time.monotonic() - exited < 2
        assert proc.returncode == 8
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "exited" in err and "Traceback" not in err


def test_reattach_sessions_are_independent() -> None:
    with Target(PYTHONS[newest(PYTHONS)], "--manhole") as target:
        outputs = []
        for _ in range(3):
            result = cli("-p", str(target.pid), "--json", "--max-events", "50",
                         "module=workload", "function=fib")
            assert result.returncode == 0, result.stderr
            events = json_events(result.stdout)
            assert len(events) == 50
            # every session counts depth from its own start: the worker's loop (running before
            # attach) calls tick() at depth 0, which calls fib() at depth 1
            assert min(e["depth"] for e in events if e["kind"] == "call") == 1
            outputs.append(events)
        # code that a session's query could never match (and that sys.monitoring was told to
        # stop reporting) is traced again by the next session that asks for it
        for function in ("risky", "fib", "risky"):
            result = cli("-p", str(target.pid), "--json", "--max-events", "5",
                         "module=workload", "function=%s" % function, "kind=call")
            assert result.returncode == 0, result.stderr
            assert {e["function"] for e in json_events(result.stdout)} == {function}
        assert clean(target.status())


def test_no_manhole_socket() -> None:
    with Target(PYTHONS[newest(PYTHONS)]) as target:
        result = cli("-p", str(target.pid), "module=workload")
        assert result.returncode == 5
        assert "no manhole socket" in result.stderr
        assert "Traceback" not in result.stderr


HOSTILE = [
    "module=x\nimport os; os.system('touch {marker}')",
    "module=\"x'); __import__('os').system('touch {marker}'); ('\"",
    "__import__('os').system('touch {marker}')",
    "Q(module=__import__('os').system('touch {marker}'))",
    "module=x'''; open('{marker}', 'w')",
    "function_regex=(?P<x>",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_query_executes_nothing(template: str, tmp_path) -> None:
    marker = str(tmp_path / "pwned")
    with Target(PYTHONS[newest(PYTHONS)], "--manhole") as target:
        result = cli("-p", str(target.pid), "-d", "0.5", template.format(marker=marker))
        assert not os.path.exists(marker)
        if result.returncode == 0:
            # it parsed as data (a strange module name): it matched nothing and ran nothing
            assert result.stdout == ""
        else:
            assert result.returncode == 2, result.stderr
            assert "attached" not in result.stderr
            assert target.status()["modules"] == []  # nothing was ever sent
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("pid_kind", ["dead", "zombie", "not-python"])
def test_pid_errors(pid_kind: str) -> None:
    if pid_kind == "dead":
        p = subprocess.Popen(["true"])
        p.wait()
        pid, expected = p.pid, "no process"
    elif pid_kind == "zombie":
        p = subprocess.Popen(["true"])
        time.sleep(0.2)
        pid, expected = p.pid, "zombie"
    else:
        p = subprocess.Popen(["sleep", "30"])
        pid, expected = p.pid, "not a CPython"
    try:
        for extra in ([], ["--gdb"]):
            result = cli("-p", str(pid), *extra, "module=x")
            assert result.returncode == 3, result.stderr
            assert expected in result.stderr
            assert "Traceback" not in result.stderr
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def check_depths(events: list) -> int:
    """Replay each thread's events on a stack: a call carries its caller's depth, the events
    inside it one more, its return the call's depth. Returns how many events were checked."""
    checked = 0
    by_thread: dict = {}
    for e in events:
        by_thread.setdefault(e["threadname"], []).append(e)
    for thread_events in by_thread.values():
        stack: list = []
        started = False
        for e in thread_events:
            if not started:
                # start at a call of tick(), made by the worker's loop that predates attach
                if e["kind"] != "call" or e["function"] != "tick":
                    continue
                started = True
            if e["kind"] == "call":
                assert e["depth"] == len(stack), e
                stack.append(e["function"])
            elif e["kind"] == "return":
                assert stack and stack[-1] == e["function"], e
                stack.pop()
                assert e["depth"] == len(stack), e
            else:
                assert e["depth"] == len(stack), e
            checked += 1
    return checked


@pytest.mark.parametrize("version", sorted(PYTHONS))
@pytest.mark.parametrize("counting", [False, True], ids=["plain", "calls-counted"])
def test_depth_is_exact(version: str, counting: bool) -> None:
    """On 3.12+ a plain query lets sys.monitoring skip unmatched code and computes depth from
    the stack; a query on `calls` counts every call instead. Both must give hunter's depth."""
    query = ["module=workload"] + (["calls_gte=0"] if counting else [])
    with Target(PYTHONS[version], "--manhole", "--threads", "2") as target:
        result = cli("-p", str(target.pid), "--json", "--max-events", "3000", *query)
        assert result.returncode == 0, result.stderr
        assert check_depths(json_events(result.stdout)) > 1000


def test_pool_threads_started_after_attach_are_traced() -> None:
    for version in sorted({"3.8", "3.11", "3.12"} & set(PYTHONS)):
        with Target(PYTHONS[version], "--manhole", "--threads", "0") as target:
            proc = cli_popen("-p", str(target.pid), "--json", "module=workload", "kind=call")
            try:
                assert proc.stderr is not None
                assert "attached" in proc.stderr.readline()
                assert target.proc.stdin is not None
                target.proc.stdin.write("pool\n")
                target.proc.stdin.flush()
                assert target._readline(20).strip() == "done"
            finally:
                out = stop(proc).out
            names = {e["threadname"] for e in json_events(out)}
            assert any(n.startswith("ThreadPoolExecutor-") for n in names), (version, names)
            ticks = [e for e in json_events(out) if e["function"] == "tick"]
            assert len(ticks) == 4 and all(e["threadid"] is not None for e in ticks)
            assert clean(target.status())


@pytest.mark.skipif("3.12" not in PYTHONS, reason="needs CPython 3.12")
def test_agent_failure_is_reported_and_harmless() -> None:
    """Every sys.monitoring tool id is taken: the agent cannot start, says why, and leaves."""
    with Target(PYTHONS["3.12"], "--manhole", "--hog-monitoring") as target:
        before = target.status()
        result = cli("-p", str(target.pid), "module=workload")
        assert result.returncode == 7, result.stderr
        assert "tool ids are in use" in result.stderr
        assert "Traceback" not in result.stderr
        after = target.status()
        assert after["gettrace"] == "None"
        same_resources(before, after)


def test_output_file_perfetto_and_summary(tmp_path) -> None:
    out, trace = tmp_path / "events.jsonl", tmp_path / "trace.json"
    with Target(PYTHONS[newest(PYTHONS)], "--manhole", "--threads", "2") as target:
        result = cli("-p", str(target.pid), "--json", "-o", str(out), "--perfetto", str(trace),
                     "-c", "-d", "1", "module=workload")
        assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    events = json_events(out.read_text())
    calls = {}
    for e in events:
        if e["kind"] == "call":
            calls[e["function"]] = calls.get(e["function"], 0) + 1
    # the summary table (stderr) counts the same calls as the JSON
    for function, count in calls.items():
        row = [line for line in result.stderr.splitlines() if line.rstrip().endswith(
            "workload." + function) or (" workload." + function + " ") in line]
        assert row, (function, result.stderr)
        assert str(count) in row[0].split(), (function, count, row[0])
    doc = json.loads(trace.read_text())
    slices = [e for e in doc["traceEvents"] if e.get("ph") == "X"]
    assert slices and len({e["tid"] for e in slices}) == 2
    for tid in {e["tid"] for e in slices}:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in slices if e["tid"] == tid)
        stack: list = []
        for start, end in spans:  # each slice nests in the enclosing one or follows it
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-3
            stack.append(end)


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_line_only_query(version: str) -> None:
    with Target(PYTHONS[version], "--manhole") as target:
        result = cli("-p", str(target.pid), "--json", "--max-events", "50", "module=workload",
                     "kind=line")
        assert result.returncode == 0, result.stderr
        events = json_events(result.stdout)
        assert len(events) == 50 and {e["kind"] for e in events} == {"line"}


@pytest.mark.parametrize("version", ["3.8", "3.11", "3.13"])
def test_pure_python_backend(version: str) -> None:
    """--backend python: the twin tracer, shipped as source, gives the same events."""
    if version not in PYTHONS:
        pytest.skip("CPython %s is not installed" % version)
    with Target(PYTHONS[version], "--manhole", "--threads", "2") as target:
        result = cli("-p", str(target.pid), "--backend", "python", "--json", "--max-events",
                     "2000", "module=workload")
        assert result.returncode == 0, result.stderr
        assert "backend python-" in result.stderr
        assert check_depths(json_events(result.stdout)) > 500
        assert clean(target.status())
