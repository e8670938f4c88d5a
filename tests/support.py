"""Real target processes and real CLI runs for the integration tests."""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import manhole

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SERVICE = os.path.join(HERE, "apps", "service.py")

# Every directory the tests make in /tmp or /var/tmp is named ha-test-<pid of the test run>-...:
# the leftover check in conftest.py tells this run's from those of a run going on at the same time.
SCRATCH_PREFIX = "ha-test-%d-" % os.getpid()
_scratch: List[str] = []


def scratch_dir(kind: str, parent: Optional[str] = None) -> str:
    """A new directory, removed by remove_scratch() (at the end of the test session, or at exit)
    unless the caller removes it first."""
    path = tempfile.mkdtemp(prefix=SCRATCH_PREFIX + kind + "-", dir=parent)
    _scratch.append(path)
    return path


def remove_scratch() -> None:
    """Remove every directory scratch_dir() made."""
    while _scratch:
        shutil.rmtree(_scratch.pop(), ignore_errors=True)


atexit.register(remove_scratch)


def interpreters() -> Dict[str, str]:
    """pyenv CPython 3.8-3.13 found on this machine, by "3.X"."""
    found = {}
    for path in sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python")):
        version = path.split("/")[-3]
        short = ".".join(version.split(".")[:2])
        if short in ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13"):
            found[short] = path
    # in version order, so that max() and sorted() mean oldest/newest, not string order
    found = dict(sorted(found.items(), key=lambda item: tuple(map(int, item[0].split(".")))))
    if not found:
        found["%d.%d" % sys.version_info[:2]] = sys.executable
    return found


def newest(pythons: Dict[str, str]) -> str:
    return list(pythons)[-1]


_manhole_dir: Optional[str] = None


def manhole_path() -> str:
    """A directory holding only the manhole package, for targets on other interpreters."""
    global _manhole_dir
    if _manhole_dir is None:
        _manhole_dir = scratch_dir("manhole")
        shutil.copytree(os.path.dirname(manhole.__file__),
                        os.path.join(_manhole_dir, "manhole"))
    return _manhole_dir


class Target:
    """A running tests/apps/service.py."""

    def __init__(self, python: str = sys.executable, *args: str, isolated: bool = False,
                 env: Optional[Dict[str, str]] = None, script: str = SERVICE) -> None:
        cmd = [python] + (["-I"] if isolated else []) + [script] + list(args)
        full_env = dict(os.environ)
        full_env.pop("PYTHONPATH", None)
        if "--manhole" in args:
            full_env["PYTHONPATH"] = manhole_path()
        full_env.update(env or {})
        # stderr to a file: nobody reads a pipe, and manhole logs enough to fill one
        self.stderr_file = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr_file, text=True, env=full_env)
        line = self._readline(15)
        if not line.startswith("ready"):
            self.kill()
            raise RuntimeError("target did not start: %r %s" % (line, self.stderr()))
        self.pid = self.proc.pid

    def _readline(self, timeout: float) -> str:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else ""

    def status(self, timeout: float = 10) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("status\n")
        self.proc.stdin.flush()
        line = self._readline(timeout)
        if not line:
            raise RuntimeError("target did not answer: %s" % self.stderr())
        return dict(json.loads(line))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        # a killed manhole cannot remove its socket, and a later process may get the same pid
        try:
            os.unlink("/tmp/manhole-%d" % self.proc.pid)
        except OSError:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.stderr_file.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()


def cli(*args: str, timeout: float = 60, env: Optional[Dict[str, str]] = None
        ) -> subprocess.CompletedProcess:
    """Run hunter-trace to completion."""
    full_env = dict(os.environ, TMPDIR=CLI_TMP, **(env or {}))
    return subprocess.run([sys.executable, "-m", "hunter_attach"] + list(args), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def cli_popen(*args: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    full_env = dict(os.environ, TMPDIR=CLI_TMP, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "hunter_attach"] + list(args), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 20) -> List[str]:
    """Read proc's stdout until a line containing needle; returns the lines read."""
    import select

    assert proc.stdout is not None
    lines: List[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if needle in line:
                return lines
    raise AssertionError("no line with %r in %.0fs; got %r" % (needle, timeout, lines[-5:]))


def json_events(stdout: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# The CLIs run by the tests keep their session directories here (TMPDIR), so that what a test
# leaves behind is not confused with another test run's on the same machine.
CLI_TMP = scratch_dir("tmp")


def tmp_leftovers() -> List[str]:
    """Whatever the CLIs left in their temp directory."""
    return sorted(os.listdir(CLI_TMP))


class Stopped:
    def __init__(self, out: str, err: str) -> None:
        self.out = out
        self.err = err


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 10) -> Stopped:
    """Signal the CLI and collect the rest of its output (it finishes writing the events in
    flight before it exits, so somebody has to read them)."""
    import threading

    proc.send_signal(sig)
    got = {}

    def drain(name: str) -> None:
        # through the same file objects that earlier readline() calls buffered in
        stream = getattr(proc, name)
        got[name] = stream.read() if stream is not None else ""

    readers = [threading.Thread(target=drain, args=(n,), daemon=True)
               for n in ("stdout", "stderr")]
    for reader in readers:
        reader.start()
    proc.wait(timeout)
    for reader in readers:
        reader.join(timeout)
    return Stopped(got.get("stdout", ""), got.get("stderr", ""))
