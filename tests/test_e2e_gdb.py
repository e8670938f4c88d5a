"""End to end with --gdb: real targets that did nothing to prepare, real gdb, the real CLI."""

from __future__ import annotations

import os
import signal
import sys

import pytest
from support import (
    Target,
    cli,
    cli_popen,
    interpreters,
    json_events,
    newest,
    scratch_dir,
    stop,
    tmp_leftovers,
    wait_for_line,
)
from test_e2e_manhole import clean, same_resources

PYTHONS = interpreters()
pytestmark = pytest.mark.gdb


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_gdb_attach_every_python(version: str) -> None:
    """The main thread is blocked reading stdin, a worker existed before attach."""
    with Target(PYTHONS[version]) as target:
        before = target.status()
        leftovers = tmp_leftovers()
        result = cli("-p", str(target.pid), "--gdb", "--json", "-d", "1", "module=workload",
                     "kind_in=call,return,exception")
        assert result.returncode == 0, result.stderr
        assert "process %d attached" % target.pid in result.stderr
        events = json_events(result.stdout)
        assert {e["kind"] for e in events} == {"call", "return", "exception"}
        assert {e["threadname"] for e in events} == {"worker-0"}
        # a call carries its caller's depth and its return the same one
        fib = [e for e in events if e["function"] == "fib"]
        assert fib and all(e["depth"] >= 1 for e in fib)
        after = target.status()
        assert clean(after), after
        same_resources(before, after)
        assert tmp_leftovers() == leftovers
        assert "Traceback" not in result.stderr


def test_gdb_isolated_target_without_our_package() -> None:
    """`python -I` from an interpreter with nothing of ours installed."""
    python = PYTHONS.get("3.10") or PYTHONS[min(PYTHONS)]
    with Target(python, isolated=True) as target:
        result = cli("-p", str(target.pid), "--gdb", "--json", "--max-events", "20",
                     "module=workload")
        assert result.returncode == 0, result.stderr
        assert len(json_events(result.stdout)) == 20
        status = target.status()
        assert clean(status)
        # the agent lives in its own private package, not on sys.path
        assert status["modules"] and all(m.startswith("_hunter_attach") for m in status["modules"])


def test_gdb_ctrl_c() -> None:
    with Target(PYTHONS[newest(PYTHONS)]) as target:
        proc = cli_popen("-p", str(target.pid), "--gdb", "--json", "module=workload")
        wait_for_line(proc, '"kind"')
        stop(proc, signal.SIGINT)
        assert proc.returncode == 0
        assert clean(target.status())


def test_gdb_missing(tmp_path) -> None:
    with Target(PYTHONS[newest(PYTHONS)]) as target:
        env = {"PATH": str(tmp_path)}
        result = cli("-p", str(target.pid), "--gdb", "module=workload", env=env)
        assert result.returncode == 5, result.stderr
        assert "gdb" in result.stderr and "install" in result.stderr
        assert "Traceback" not in result.stderr
        assert target.alive()


def test_pipe_closed_by_head() -> None:
    """`hunter-trace ... | head -5`: exits cleanly and leaves the target untraced."""
    import subprocess

    with Target(PYTHONS[newest(PYTHONS)], "--threads", "2") as target:
        cmd = "%s -m hunter_attach -p %d --gdb | head -5" % (sys.executable, target.pid)
        result = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True,
                                text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(
                                    os.path.abspath(__file__))))
        assert len(result.stdout.splitlines()) == 5
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
        assert result.returncode == 0, result.stderr
        assert clean(target.status())


def _unshare_works() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="cannot create a mount namespace here")
def test_gdb_target_in_another_mount_namespace() -> None:
    """Like a container: the target has its own /tmp, which the CLI reaches through
    /proc/PID/root; the agent, the tracer and the helper go there, and nothing stays."""
    import shutil
    import subprocess

    python = PYTHONS[newest(PYTHONS)]
    # The new /tmp hides everything under /tmp, possibly this checkout: run a copy of the app.
    apps = scratch_dir("apps", "/var/tmp")
    shutil.copytree(os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps"),
                    os.path.join(apps, "apps"))
    script = "mount -t tmpfs tmpfs /tmp && exec %s %s" % (
        python, os.path.join(apps, "apps", "service.py"))
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        pid = int(line.split()[1])
        assert os.stat("/proc/self/ns/mnt").st_ino != os.stat("/proc/%d/ns/mnt" % pid).st_ino
        result = cli("-p", str(pid), "--gdb", "--json", "--max-events", "20", "module=workload")
        assert result.returncode == 0, result.stderr
        assert len(json_events(result.stdout)) == 20
        assert os.listdir("/proc/%d/root/tmp" % pid) == []
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(apps)


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="no system Python here")
def test_gdb_system_python() -> None:
    """The distribution's interpreter (Debian's is statically linked: no libpython to map)."""
    with Target(SYSTEM_PYTHON) as target:
        result = cli("-p", str(target.pid), "--gdb", "--json", "--max-events", "20",
                     "module=workload")
        assert result.returncode == 0, result.stderr
        assert len(json_events(result.stdout)) == 20
        assert clean(target.status())
