"""Issue 10, item 2: `-s SIGNAL` never hurts the target. A signal the process does not catch, or
one that stops or kills it, is refused before anything is sent (exit 2, with a hint); a manhole
that is already awake is not signalled again."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from support import Target, cli, interpreters, newest

PYTHONS = interpreters()


def _plain_target(*code: str) -> subprocess.Popen:
    """A Python process that catches nothing unless ``code`` says so, ready when it prints."""
    source = "\n".join(("import signal, sys, time",) + code + (
        "print('ready', flush=True)", "time.sleep(120)"))
    proc = subprocess.Popen([PYTHONS[newest(PYTHONS)], "-c", source], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _refused(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("hunter-trace: hint: "), result.stderr
    for word in words:
        assert word in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["USR2", "SIGUSR1", "10", "WINCH", "URG"])
def test_signal_the_target_does_not_catch_is_refused(name: str) -> None:
    proc = _plain_target()
    try:
        _refused(cli("-p", str(proc.pid), "-s", name, "module=x"), "does not catch")
        time.sleep(0.2)  # a signal, had one been sent, would have ended it by now
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("name", ["KILL", "STOP", "SIGTSTP", "TTIN", "TTOU", "9", "INT", "TERM",
                                  "HUP", "QUIT", "CHLD", "ALRM"])
def test_killing_and_stopping_signals_are_never_sent(name: str) -> None:
    # the target catches the catchable ones (Python itself catches INT): refused all the same
    proc = _plain_target(*("signal.signal(signal.%s, lambda *a: None)" % s
                           for s in ("SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGTERM", "SIGHUP",
                                     "SIGQUIT", "SIGCHLD", "SIGALRM")))
    try:
        _refused(cli("-p", str(proc.pid), "-s", name, "module=x"), "never sent")
        time.sleep(0.2)
        assert proc.poll() is None
        with open("/proc/%d/stat" % proc.pid) as f:
            assert f.read().split(") ")[1][0] in "SR"  # not stopped (T)
    finally:
        proc.kill()
        proc.wait()


def test_caught_signal_that_wakes_no_manhole_times_out() -> None:
    """A signal the process catches for something else: sent, no socket appears, exit 6."""
    proc = _plain_target("signal.signal(signal.SIGUSR2, lambda *a: None)")
    try:
        start = time.monotonic()
        result = cli("-p", str(proc.pid), "-s", "USR2", "-t", "0.5", "module=x")
        assert result.returncode == 6, result.stderr
        assert time.monotonic() - start < 10
        assert "Traceback" not in result.stderr
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_ignored_signal_is_refused() -> None:
    proc = _plain_target("signal.signal(signal.SIGUSR1, signal.SIG_IGN)")
    try:
        _refused(cli("-p", str(proc.pid), "-s", "USR1", "module=x"), "ignores")
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_awake_manhole_is_not_signalled_twice() -> None:
    """manhole 1.8 raises in the target's main thread when its signal comes a second time; the
    second -s USR1 must find the socket awake and not send it."""
    with Target(PYTHONS[newest(PYTHONS)], "--manhole", "--signal", "USR1", "--handler",
                "exec") as target:
        for attempt in range(3):
            result = cli("-p", str(target.pid), "-s", "USR1", "-v", "--max-events", "5",
                         "module=workload")
            assert result.returncode == 0, (attempt, result.stderr)
            assert ("sent signal" in result.stderr) == (attempt == 0), result.stderr
            assert target.alive(), target.stderr()
        assert target.status()["native_threads"] >= 1
        assert "RuntimeError" not in target.stderr()


def test_signal_check_needs_a_live_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    result = cli("-p", str(proc.pid), "-s", "USR1", "module=x")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists("/tmp/manhole-%d" % proc.pid)

