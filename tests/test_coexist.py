"""Issue 10, item 10: other tracers keep working. On 3.8-3.11 CPython has one trace and one
profile function per thread: while attached we set aside the one our backend needs (the attach
line says whose), and detach puts it back. On 3.12+ sys.monitoring gives every tool its own id,
so cProfile (a sys.monitoring tool there) keeps counting even while we trace.
coverage.py, the other tracer people run in production, is driven in tests/services/."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any, Dict

import pytest
from support import cli, cli_popen, interpreters, wait_for_line

PYTHONS = interpreters()
pytestmark = pytest.mark.gdb

APP = """
import cProfile, json, sys, threading, time
counts = [0]
def tracer(frame, event, arg):
    counts[0] += 1          # call events only: returns None, so no line events
prof = cProfile.Profile()
if sys.argv[1] == "profile":
    prof.enable()
else:
    sys.settrace(tracer)
def work():
    return 1
def commands():
    for line in sys.stdin:
        calls = [e.callcount for e in prof.getstats()
                 if getattr(e.code, "co_name", "") == "work"]
        print(json.dumps({"traced": counts[0], "profiled": sum(calls)}), flush=True)
threading.Thread(target=commands, daemon=True).start()
print("ready", flush=True)
while True:
    work()
    time.sleep(0.005)
"""


class App:
    def __init__(self, python: str, mode: str) -> None:
        self.proc = subprocess.Popen([python, "-c", APP, mode], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def counters(self) -> Dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("status\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def grows(self, key: str) -> bool:
        first = self.counters()[key]
        time.sleep(0.3)
        return bool(self.counters()[key] > first)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


SETTRACE = [v for v in ("3.8", "3.10", "3.11") if v in PYTHONS]
MONITORING = [v for v in ("3.12", "3.13") if v in PYTHONS]


@pytest.mark.parametrize("version", SETTRACE)
@pytest.mark.parametrize("mode,query,suspended", [
    ("profile", "kind=call", "cProfile.Profile"),   # a call-only query takes the profile hook
    ("trace", "kind_in=call,line", "a Python sys.settrace function"),
])
def test_other_tracer_suspended_then_restored(version: str, mode: str, query: str,
                                              suspended: str) -> None:
    key = "profiled" if mode == "profile" else "traced"
    app = App(PYTHONS[version], mode)
    try:
        assert app.grows(key)
        result = cli("-p", str(app.proc.pid), "--gdb", "-d", "0.5", "function=work", query)
        assert result.returncode == 0, result.stderr
        assert "=> work()" in result.stdout
        attached = [line for line in result.stderr.splitlines() if " attached (" in line]
        assert attached and ("suspends %s until detach" % suspended) in attached[0], \
            result.stderr
        assert app.grows(key), "the other tracer was not put back"
    finally:
        app.close()


@pytest.mark.parametrize("version", MONITORING)
def test_cprofile_keeps_counting_while_attached(version: str) -> None:
    app = App(PYTHONS[version], "profile")
    try:
        proc = cli_popen("-p", str(app.proc.pid), "--gdb", "-d", "3", "function=work")
        wait_for_line(proc, "=> work()")
        assert app.grows("profiled")
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "=> work()" in out and "suspends" not in err
        assert app.grows("profiled")
    finally:
        app.close()

