"""Issue 10, item 4: when the user will get nothing, stderr says so. A module name that the target
has not imported is named, with the modules its file is loaded as; a trace that saw nothing in a
process whose Python children do the work says where they are."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
from support import Target, cli, interpreters, newest

PYTHONS = interpreters()
pytestmark = pytest.mark.gdb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    end = time.monotonic() + 20
    while time.monotonic() < end and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the server did not listen")


def test_module_run_as_main_is_named() -> None:
    """`python -m http.server` runs the module as __main__: module=http.server matches nothing,
    and the notice says which loaded module has its file."""
    port = _free_port()
    proc = subprocess.Popen([PYTHONS[newest(PYTHONS)], "-m", "http.server", str(port), "--bind",
                             "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        result = cli("-p", str(proc.pid), "--gdb", "-d", "0.3", "module=http.server")
        assert result.returncode == 0, result.stderr
        assert ("module http.server is not loaded in process %d" % proc.pid) in result.stderr
        assert "its file is loaded as __main__ (try module=__main__)" in result.stderr
        result = cli("-p", str(proc.pid), "--gdb", "-d", "0.3", "module=no_such_module")
        assert "module no_such_module is not loaded" in result.stderr
        assert "its file" not in result.stderr
    finally:
        proc.kill()
        proc.wait()


def test_loaded_module_gets_no_notice() -> None:
    with Target(PYTHONS[newest(PYTHONS)]) as target:
        result = cli("-p", str(target.pid), "--gdb", "--max-events", "3", "module=workload")
        assert result.returncode == 0, result.stderr
        assert "not loaded" not in result.stderr
        assert "child processes" not in result.stderr


PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time\\ndef work():\\n    return 1\\n"
                          "while True:\\n    work()\\n    time.sleep(0.01)"])
print(child.pid, flush=True)
def wait():
    return time.sleep(0.05)
while True:
    wait()
"""


def test_work_in_a_child_is_pointed_at() -> None:
    proc = subprocess.Popen([PYTHONS[newest(PYTHONS)], "-c", PARENT], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        result = cli("-p", str(proc.pid), "--gdb", "-d", "0.5", "function=work")
        assert result.returncode == 0, result.stderr
        assert ("no event matched in process %d, which has Python child processes: %d"
                % (proc.pid, child)) in result.stderr
        # the child is where the events are
        result = cli("-p", str(child), "--gdb", "--max-events", "2", "function=work")
        assert result.returncode == 0 and "=> work()" in result.stdout, result.stderr
        # a trace that saw something in the parent says nothing about its children
        result = cli("-p", str(proc.pid), "--gdb", "--max-events", "2", "function=wait")
        assert "child processes" not in result.stderr
    finally:
        proc.kill()
        proc.wait()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
