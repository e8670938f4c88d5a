"""Greenlet services: monkey-patched gevent and eventlet web servers, real gdb, the real CLI.

gevent's and eventlet's monkey patching turn _thread.start_new_thread into "spawn a greenlet",
and greenlets share one OS thread: the agent must still get a real thread, and each greenlet
shows as a pseudo-thread of its own with exact depths (see _tracer.c, green.py). The libraries
are pinned and pip-installed once per interpreter into a cache (``pip install --target``).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import urllib.request
from typing import Any, Dict, List

import pytest
from support import HERE, cli_popen, interpreters, json_events, stop
from test_cli_options import wait_attached

PYTHONS = interpreters()
APP = os.path.join(HERE, "apps", "green_service.py")
PINS = {"gevent": ["gevent==26.9.0", "greenlet==3.5.6"],
        "eventlet": ["eventlet==0.41.3", "greenlet==3.5.6"]}
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "hunter_attach", "test-peers")
# Both sides of the 3.12 line: settrace/profile below it, sys.monitoring from it on.
VERSIONS = [v for v in ("3.10", "3.12") if v in PYTHONS]
WORK = ("handle", "level1", "level2")


def peer_dir(version: str, library: str) -> str:
    """A directory holding the pinned library for this interpreter (installed on first use)."""
    path = os.path.join(CACHE, "%s-%s" % (library, version), "-".join(PINS[library]))
    if os.path.isdir(path):
        return path
    partial = path + ".partial-%d" % os.getpid()
    subprocess.run([PYTHONS[version], "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--target", partial] + PINS[library], check=True, timeout=600,
                   capture_output=True)
    try:
        os.rename(partial, path)  # atomic: a concurrent run installs its own and loses the race
    except OSError:
        subprocess.run(["rm", "-rf", partial], check=False)
    return path


class GreenService:
    """A running tests/apps/green_service.py."""

    def __init__(self, version: str, library: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=peer_dir(version, library), PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([PYTHONS[version], APP, library] + list(args),
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("ready"):
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError("the service did not start: %r" % line)
        self.port = int(line.split()[1])
        self.pid = self.proc.pid

    def get(self, path: str) -> str:
        url = "http://127.0.0.1:%d%s" % (self.port, path)
        with urllib.request.urlopen(url, timeout=20) as response:
            return str(response.read().decode())

    def status(self) -> Dict[str, Any]:
        return dict(json.loads(self.get("/status")))

    def work_in_parallel(self, ns: List[int]) -> List[str]:
        """Concurrent /work requests (the service makes each wait for the other inside
        level2, so their greenlets interleave); the answers, in the order of ns."""
        answers: List[str] = [""] * len(ns)

        def one(i: int) -> None:
            try:
                answers[i] = self.get("/work?n=%d" % ns[i])
            except Exception as exc:  # counted as a failed request below
                answers[i] = "failed: %r" % exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return answers

    def __enter__(self) -> GreenService:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def trace_requests(service: GreenService, *query: str) -> tuple:
    """Attach, make two concurrent requests, detach: (events, CLI stderr, answers)."""
    proc = cli_popen("-p", str(service.pid), "--gdb", "--json", *query)
    try:
        attached = wait_attached(proc)
        answers = service.work_in_parallel([1, 2])
    finally:
        stopped = stop(proc)
    assert proc.returncode == 0, stopped.err
    return json_events(stopped.out), attached + stopped.err, answers


def assert_restored(before: Dict[str, Any], after: Dict[str, Any]) -> None:
    assert after["greenlet_trace_is_ours"], after["greenlet_trace"]  # its own, put back
    assert after["switches"] > before["switches"]  # and called all along
    assert (after["gettrace"], after["getprofile"], after["tools"]) == ("None", "None", [])
    assert after["threads"] == before["threads"]
    assert after["fds"] == before["fds"]


def check_per_greenlet(events: List[Dict[str, Any]], prefix: str) -> None:
    """Two greenlets ran handle -> level1 -> level2 interleaved: each has its own name and the
    exact depths of its own stack, as if it had been a thread of its own."""
    work = [e for e in events if e["function"] in WORK and e["module"] == "__main__"]
    names = sorted({e["threadname"] for e in work})
    assert len(names) == 2, names
    assert all(name.startswith(prefix) for name in names), names
    shapes = []
    for name in names:
        mine = [(e["kind"], e["function"], e["depth"]) for e in work if e["threadname"] == name]
        base = mine[0][2]
        assert mine == [("call", "handle", base), ("call", "level1", base + 1),
                        ("call", "level2", base + 2), ("return", "level2", base + 2),
                        ("return", "level1", base + 1), ("return", "handle", base)], mine
        shapes.append(base)
    assert shapes[0] == shapes[1]
    # they did interleave: the second entered level2 before the first left it
    order = [(e["threadname"], e["kind"], e["function"]) for e in work]
    first = order[0][0]
    other = [n for n in names if n != first][0]
    assert order.index((other, "call", "level2")) < order.index((first, "return", "level2"))


@pytest.mark.parametrize("backend", ["c", "python"])
@pytest.mark.parametrize("version", VERSIONS)
def test_gevent_greenlets_are_pseudo_threads(version: str, backend: str) -> None:
    with GreenService(version, "gevent") as service:
        before = service.status()
        events, err, answers = trace_requests(
            service, "--backend", backend, "kind_in=call,return", "module=__main__")
        assert answers == ["3", "5"]  # no failed request
        assert " 0 threads" not in err and "notice" not in err, err
        check_per_greenlet(events, "Greenlet-0x")
        after = service.status()
        assert_restored(before, after)


@pytest.mark.parametrize("version", VERSIONS)
def test_gevent_kind_call(version: str) -> None:
    """The report: kind=call on a patched gevent server gave nothing at all."""
    with GreenService(version, "gevent") as service:
        events, err, answers = trace_requests(service, "kind=call")
        assert answers == ["3", "5"]
        calls = [e for e in events if e["function"] == "level2" and e["module"] == "__main__"]
        assert len(calls) == 2 and all(e["kind"] == "call" for e in calls)
        assert len({e["threadname"] for e in calls}) == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_trace_function_set_over_ours_is_kept(version: str) -> None:
    """The service puts a trace function of its own over ours while we trace, chaining to ours:
    greenlets are still told apart, and detaching leaves that function in place (ours, now only
    passing through, stays in its chain)."""
    with GreenService(version, "gevent") as service:
        proc = cli_popen("-p", str(service.pid), "--gdb", "--json", "kind=call", "function=level2")
        try:
            wait_attached(proc)
            chained = service.get("/retrace")
            answers = service.work_in_parallel([1, 2])
        finally:
            stopped = stop(proc)
        assert proc.returncode == 0, stopped.err
        assert "greenlet_switch" in chained  # what it went on over: ours
        assert answers == ["3", "5"]
        events = json_events(stopped.out)
        assert len(events) == 2 and len({e["threadname"] for e in events}) == 2, events
        first = service.status()
        second = service.status()
        assert first["second_trace_is_on"] and second["second_trace_is_on"]
        assert second["second_switches"] > first["second_switches"]
        assert second["switches"] > first["switches"]  # the original one, through ours


@pytest.mark.parametrize("query", [["function=tick"], ["function=tick", "calls_gte=0"]],
                         ids=["walk", "count"])
@pytest.mark.parametrize("version", VERSIONS)
def test_greenlet_suspended_at_attach_depth(version: str, query: List[str]) -> None:
    """The ticker greenlet sat in gevent.sleep at attach: calls it makes afterwards are at depth
    0, whether depth is counted or, on 3.12+, walked from the frame."""
    with GreenService(version, "gevent") as service:
        proc = cli_popen("-p", str(service.pid), "--gdb", "--json", "--max-events", "10",
                         "kind_in=call,return", "module=__main__", *query)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        events = json_events(out)
        assert len(events) == 10
        assert {(e["function"], e["depth"]) for e in events} == {("tick", 0)}
        assert len({e["threadname"] for e in events}) == 1


@pytest.mark.skipif("3.12" not in PYTHONS, reason="needs CPython 3.12")
def test_eventlet_greenthreads() -> None:
    with GreenService("3.12", "eventlet") as service:
        before = service.status()
        events, err, answers = trace_requests(service, "kind_in=call,return", "module=__main__")
        assert answers == ["3", "5"]
        check_per_greenlet(events, "GreenThread-0x")
        assert_restored(before, service.status())


@pytest.mark.skipif("3.12" not in PYTHONS, reason="needs CPython 3.12")
def test_greenlet_without_settrace_is_said() -> None:
    """A greenlet module without settrace: traced, but the user is told greenlets mix."""
    with GreenService("3.12", "gevent", "--no-settrace") as service:
        events, err, answers = trace_requests(service, "kind=call", "function=level2")
        assert answers == ["3", "5"]
        assert "notice: greenlets are not told apart" in err, err
        assert len(events) == 2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
