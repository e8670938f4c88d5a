"""Helpers for the fault-injection tests (tests/test_faults.py) and scripts/soak.py: more target
apps than support.Target's service.py, a CLI whose stdout the test reads as slowly as it likes,
/proc sampling, and a check that nothing is left in the temp directories."""

from __future__ import annotations

import glob
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

from support import CLI_TMP, ROOT, Target, manhole_path

HERE = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(HERE, "apps")
FLOOD = os.path.join(APPS, "flood.py")
FORKER = os.path.join(APPS, "forker.py")
SERVICE = os.path.join(APPS, "service.py")


class App(Target):
    """support.Target for any app in tests/apps that speaks the same protocol ("ready <pid>",
    then commands on stdin, "status" answering one JSON line)."""

    def __init__(self, script: str, python: str = sys.executable, *args: str,
                 env: Optional[Dict[str, str]] = None) -> None:
        cmd = [python, script] + list(args)
        full_env = dict(os.environ)
        full_env.pop("PYTHONPATH", None)
        if "--manhole" in args:
            full_env["PYTHONPATH"] = manhole_path()
        full_env.update(env or {})
        # stderr goes to a file: manhole logs every connection there (with the whole line it
        # runs), and a pipe nobody reads would fill up and block manhole after a few sessions
        self.log = self.stderr_file = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=full_env)
        line = self._readline(20)
        if not line.startswith("ready"):
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError("target did not start: %r %s" % (line, self.stderr()))
        self.pid = self.proc.pid

    def stderr(self) -> str:
        """What the target wrote to stderr so far."""
        self.log.seek(0)
        return str(self.log.read())

    def kill(self) -> None:
        super().kill()
        self.log.close()

    def command(self, text: str, timeout: float = 10) -> str:
        """Send one command line; return the one line it answers."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        line = self._readline(timeout)
        if not line:
            raise RuntimeError("target did not answer %r: %s" % (text, self.stderr()))
        return line.strip()

    def send(self, text: str) -> None:
        """Send one command line that gets no answer (quit, exec)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()


def cli_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    return dict(os.environ, TMPDIR=CLI_TMP, **(extra or {}))


def cli_popen_bytes(*args: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """hunter-trace with binary pipes, stdout unread until the caller reads it (os.read on
    proc.stdout.fileno()): a reader as slow as the caller wants."""
    return subprocess.Popen([sys.executable, "-m", "hunter_attach"] + list(args), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(env),
                            bufsize=0)


def is_clean(status: Dict[str, Any]) -> bool:
    """No trace of ours in what the target's main thread sees, nor (flood.py) in any worker's
    own record of its sys.gettrace()/sys.getprofile()."""
    main = (status["gettrace"] == "None" and status["getprofile"] == "None"
            and status["tools"] == {} and status["thread_trace"] == "None"
            and status["thread_profile"] == "None")
    workers = status.get("workers", {})
    return main and all(w["gettrace"] == "None" and w["getprofile"] == "None"
                        for w in workers.values())


def workers_clean_since(status: Dict[str, Any], since: float) -> bool:
    """flood.py: every worker recorded its state after `since` (monotonic) and it was clean."""
    return all(w["at"] > since and w["gettrace"] == "None" and w["getprofile"] == "None"
               for w in status["workers"].values())


def traced_workers(status: Dict[str, Any]) -> List[str]:
    return sorted(name for name, w in status.get("workers", {}).items()
                  if w["gettrace"] != "None" or w["getprofile"] != "None")


def proc_status(pid: int) -> Dict[str, str]:
    """/proc/PID/status as a dict (empty when the process is gone)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def rss_kb(pid: int) -> int:
    value = proc_status(pid).get("VmRSS", "0 kB").split()[0]
    return int(value)


def thread_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/task" % pid))


def fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def pid_alive(pid: int) -> bool:
    state = proc_status(pid).get("State", "")
    return bool(state) and not state.startswith(("Z", "X"))


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02,
               what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError("%s not reached within %.1f s" % (what, timeout))
        time.sleep(interval)


def read_stderr(proc: subprocess.Popen) -> str:
    assert proc.stderr is not None
    data = proc.stderr.read()
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def finish(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Make sure a CLI we started is gone (kill only that pid)."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def interrupt(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 10) -> float:
    """Signal the CLI and wait for it; returns how long it took to exit."""
    start = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout)
    return time.monotonic() - start


def read_until(proc: subprocess.Popen, needle: bytes, timeout: float = 20) -> bytes:
    """Binary-stdout CLI: read until needle shows up; returns what was read."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
            if needle in data:
                return data
    raise AssertionError("no %r in %.0f s; stderr so far unknown, got %r"
                         % (needle, timeout, data[-300:]))


class StreamCheck:
    """Incremental checks over a --json stream: seq accounting, drop markers, kinds seen."""

    def __init__(self) -> None:
        self.partial = b""
        self.events = 0
        self.drops: List[Dict[str, Any]] = []
        self.dropped = 0
        self.next_seq = 0
        self.errors: List[str] = []
        self.after_drop: List[tuple] = []  # (marker seq + count, seq of the next event)
        self.functions: Set[str] = set()
        self.threads: Set[str] = set()
        self.bytes = 0
        self.corrupt = 0
        self._pending_marker: Optional[Dict[str, Any]] = None

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    self.corrupt += 1
                    self.error("corrupt line after seq %d: %r" % (self.next_seq - 1, line[:160]))
                    continue
                self.line(obj)

    def line(self, obj: Dict[str, Any]) -> None:
        if obj["kind"] == "drop":
            if obj["seq"] != self.next_seq:
                self.error("drop marker at seq %d, expected %d" % (obj["seq"], self.next_seq))
            self.drops.append(obj)
            self.dropped += obj["count"]
            self.next_seq = obj["seq"] + obj["count"]
            self._pending_marker = obj
            return
        if self._pending_marker is not None:
            m = self._pending_marker
            self.after_drop.append((m["seq"] + m["count"], obj["seq"]))
            self._pending_marker = None
        if obj["seq"] != self.next_seq:
            self.error("event seq %d, expected %d" % (obj["seq"], self.next_seq))
        self.next_seq = obj["seq"] + 1
        self.events += 1
        self.functions.add(obj["function"])
        self.threads.add(obj["threadname"])

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)


class TmpGuard:
    """What the CLIs leave behind: anything new in their TMPDIR (support.CLI_TMP: session
    directories, sockets, tracer copies), and /tmp/manhole-PID sockets of processes we know of
    (their own manhole socket is allowed for the targets named in `allowed`)."""

    def __init__(self) -> None:
        self.cli_tmp = self._cli_tmp()
        self.manholes = set(glob.glob("/tmp/manhole-*"))

    @staticmethod
    def _cli_tmp() -> Set[str]:
        try:
            return set(os.listdir(CLI_TMP))
        except FileNotFoundError:  # someone cleaned /tmp under us: nothing of ours is there
            return set()

    def leftovers(self, ours: Iterable[int] = (), allowed: Iterable[int] = ()) -> List[str]:
        found = ["%s/%s" % (CLI_TMP, n) for n in sorted(self._cli_tmp() - self.cli_tmp)]
        watched = {"/tmp/manhole-%d" % pid for pid in ours} - {
            "/tmp/manhole-%d" % pid for pid in allowed}
        found += sorted((set(glob.glob("/tmp/manhole-*")) - self.manholes) & watched)
        return found

    def wait_clean(self, ours: Iterable[int] = (), allowed: Iterable[int] = (),
                   timeout: float = 2.0) -> List[str]:
        """Leftovers still there after `timeout` (the agent removes a killed CLI's directory
        asynchronously)."""
        end = time.monotonic() + timeout
        ours, allowed = list(ours), list(allowed)
        while True:
            found = self.leftovers(ours, allowed)
            if not found or time.monotonic() > end:
                return found
            time.sleep(0.05)


def manhole_exec(pid: int, code: str, timeout: float = 10) -> None:
    """Run one line of Python in a target that installed manhole with the `exec` handler, and
    wait until it ran (the handler closes the connection after our EOF)."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect("/tmp/manhole-%d" % pid)
        s.sendall(code.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    finally:
        s.close()


def tracer_stats(pid: int, scratch: str) -> Dict[str, Any]:
    """The C tracer's own counters for the last session (seen, sent, dropped, dead), read in the
    target through its manhole (`exec` handler). They stay readable until the next session."""
    path = os.path.join(scratch, "tracer-stats-%d.json" % pid)
    if os.path.exists(path):
        os.unlink(path)
    manhole_exec(pid, "import sys, json; open(%r, 'w').write(json.dumps("
                      "sys.modules['_hunter_attach._tracer'].stats()))" % path)
    wait_until(lambda: os.path.exists(path) and os.path.getsize(path), 10, what="tracer stats")
    with open(path) as f:
        return dict(json.load(f))


class Drain:
    """Read a text-mode CLI's stdout on a thread, so that it never blocks on a full pipe."""

    def __init__(self, proc: subprocess.Popen, first: Iterable[str] = ()) -> None:
        import threading

        self.lines: List[str] = list(first)
        self.proc = proc
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def join(self, timeout: float = 10) -> List[str]:
        self.thread.join(timeout)
        return self.lines

    def events(self) -> List[Dict[str, Any]]:
        return [json.loads(line) for line in list(self.lines) if line.strip()]


def wait_manhole(pid: int, timeout: float = 10) -> None:
    """manhole.install() opens its socket on a thread: wait until it is there."""
    wait_until(lambda: os.path.exists("/tmp/manhole-%d" % pid), timeout,
               what="/tmp/manhole-%d" % pid)
