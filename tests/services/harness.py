"""Real services for the service tier: start one from its pinned venv, send it bounded loopback
traffic, attach/trace/detach with the real CLI several times, and check that it never noticed.

Each test module starts its service and calls :func:`cycles`, which asserts, for every cycle:
the CLI exits 0, attached and detached, with the compiled tracer; the events are the app's (its
view function shows up as a call), or in the last cycle, which traces every call, none is the
tool's own; then, with the traffic stopped, the target's thread count, descriptors and trace state
(what the app's /probe route reports: sys.gettrace/getprofile, threading's hooks, sys.monitoring
tools) are those from before the first attach; and no request failed, during or after tracing.
Every service's numbers go into RESULTS, which conftest.py prints as a table at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import psutil
from support import CLI_TMP, ROOT, scratch_dir

HERE = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(HERE, "apps")
sys.path.insert(0, APPS)
import common  # noqa: E402  (the apps' work function: what a correct answer is)

_spec = importlib.util.spec_from_file_location(
    "service_venvs", os.path.join(ROOT, "scripts", "service_venvs.py"))
assert _spec is not None and _spec.loader is not None
service_venvs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(service_venvs)

# Each attach is followed by this many successful requests before the traffic stops: requests
# served after the detach, by the code that was traced.
AFTER_DETACH = 10
REQUEST_TIMEOUT = 30.0  # gdb stops the target while it injects: long, but bounded
SETTLE_TIMEOUT = 20.0  # for the last connection's thread and descriptor to go away
# Three ways to end a trace: by time, by event count (with a time cap), by time again; then
# every call in the process (EVERYTHING), where nothing of the tool's own may show up.
CYCLES: List[List[str]] = [["-d", "1"], ["--max-events", "40", "-d", "10"], ["-d", "1"],
                           ["--max-events", "400", "-d", "3"]]
EVERYTHING = ["kind=call"]


_scratch: List[str] = []


def scratch() -> str:
    """This session's directory for service logs and event files (support removes it)."""
    if not _scratch:
        _scratch.append(scratch_dir("services"))
    return _scratch[0]


def venv_python(version: str) -> str:
    """The service venv's python for "3.X" (built now if `make services` has not)."""
    return str(service_venvs.ensure(version))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = REQUEST_TIMEOUT) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        if resp.status != 200:
            raise RuntimeError("HTTP %d from %s" % (resp.status, url))
        return str(resp.read().decode())


class Service:
    """A service process started from tests/services/apps, its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None
                 ) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=name.replace(" ", "-") + "-",
                                               suffix=".log", dir=scratch(), delete=False)
        full_env = dict(os.environ, PYTHONPATH=APPS, PYTHONUNBUFFERED="1")
        for var in ("VIRTUAL_ENV", "COVERAGE_PROCESS_START", "PYTHONHOME"):
            full_env.pop(var, None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(list(argv), cwd=APPS, env=full_env, stdin=subprocess.PIPE,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-4000:]

    def wait_http(self, url: str, timeout: float = 60) -> None:
        """Until url answers 200 (the service is up), or fail with the service's output."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError("%s exited with %s:\n%s" % (self.name, self.proc.returncode,
                                                                 self.output()))
            try:
                http_get(url, timeout=5)
                return
            except (OSError, RuntimeError):
                time.sleep(0.2)
        raise AssertionError("%s did not answer %s in %.0f s:\n%s"
                             % (self.name, url, timeout, self.output()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.log.close()
        os.unlink(self.log.name)
        # a terminated service with a manhole cannot always remove its socket
        if os.path.exists("/tmp/manhole-%d" % self.pid):
            os.unlink("/tmp/manhole-%d" % self.pid)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def only_child(pid: int, timeout: float = 30) -> int:
    """The one child process of pid (a gunicorn worker, a pool worker), once it exists."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        children = psutil.Process(pid).children()
        if len(children) == 1:
            return int(children[0].pid)
        time.sleep(0.2)
    raise AssertionError("process %d has no single child: %r" % (pid, children))


def one_thread(pid: int, timeout: float = 60) -> None:
    """Until the process has a single thread (bounded)."""
    end = time.monotonic() + timeout
    while len(os.listdir("/proc/%d/task" % pid)) != 1:
        assert time.monotonic() < end, "process %d keeps %d threads" % (
            pid, len(os.listdir("/proc/%d/task" % pid)))
        time.sleep(0.2)


# ---- traffic --------------------------------------------------------------------------------

class Traffic:
    """Requests sent to a service by a background thread, each one checked, at most `limit` of
    them. Subclasses say what one request is."""

    def __init__(self, limit: int = 5000, pause: float = 0.01) -> None:
        self.limit = limit
        self.pause = pause
        self.ok = 0
        self.failed = 0
        self.errors: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def one(self, i: int) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        for i in range(self.limit):
            if self._stop.is_set():
                return
            try:
                self.one(i)
                self.ok += 1
            except Exception as exc:  # any failure of a request counts; the test reports it
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append("request %d: %r" % (i, exc))
            time.sleep(self.pause)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def wait_ok(self, count: int, timeout: float = 60) -> None:
        """Until `count` more requests succeeded (bounded)."""
        target = self.ok + count
        end = time.monotonic() + timeout
        while self.ok < target and time.monotonic() < end and self._thread.is_alive():
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT + 10)
        assert not self._thread.is_alive(), "a request is still hanging"


class HttpTraffic(Traffic):
    def __init__(self, base: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base = base

    def one(self, i: int) -> None:
        body = json.loads(http_get("%s/work?n=%d" % (self.base, i)))
        if body != {"n": i, "result": common.work(i)}:
            raise AssertionError("wrong answer %r" % body)


# ---- the target's resources ---------------------------------------------------------------

def resources(pid: int) -> Dict[str, Any]:
    """Threads and descriptors (with what they point at), read from /proc."""
    fds = {}
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            fds[fd] = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            pass
    return {"threads": len(os.listdir("/proc/%d/task" % pid)), "fds": fds}


def settled(pid: int, expected: Dict[str, Any]) -> Dict[str, Any]:
    """The target's resources once they equal `expected`, or what they are after the timeout
    (a connection that just closed may still hold a thread or descriptor for a moment)."""
    end = time.monotonic() + SETTLE_TIMEOUT
    now = resources(pid)
    while now != expected and time.monotonic() < end:
        time.sleep(0.2)
        now = resources(pid)
    return now


def quiet(pid: int, timeout: float = SETTLE_TIMEOUT, still: float = 1.0) -> Dict[str, Any]:
    """The target's resources once they stayed the same for `still` seconds (the baseline:
    a service that just started may still be opening things)."""
    end = time.monotonic() + timeout
    last = resources(pid)
    since = time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.2)
        now = resources(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= still:
            break
    return last


# ---- tracing --------------------------------------------------------------------------------

@dataclass
class TraceRun:
    returncode: int
    stderr: str
    events: List[Dict[str, Any]]
    attach_s: Optional[float]  # CLI start to its "attached" line


def trace(pid: int, query: Sequence[str], how: Sequence[str] = ("--gdb",),
          bounds: Sequence[str] = ("-d", "1"), timeout: float = 90) -> TraceRun:
    """One real `python -m hunter_attach` run, events as JSON into a file, stderr read as it
    comes to time the "attached" line."""
    out = tempfile.NamedTemporaryFile(prefix="events-", suffix=".json", dir=scratch(),
                                      delete=False)
    out.close()
    argv = ([sys.executable, "-m", "hunter_attach", "-p", str(pid), *how, "--json",
             "-o", out.name, *bounds, *query])
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, TMPDIR=CLI_TMP))
    assert proc.stderr is not None
    lines: List[str] = []
    attach_s = None
    end = started + timeout
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([proc.stderr], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if attach_s is None and " attached (" in line:
                attach_s = time.monotonic() - started
        proc.wait(max(1.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        lines.append("(killed after %.0f s)\n" % timeout)
    proc.stderr.close()
    with open(out.name) as f:
        events = [json.loads(line) for line in f if line.strip()]
    os.unlink(out.name)
    return TraceRun(proc.returncode, "".join(lines), events, attach_s)


# ---- one service's run ---------------------------------------------------------------------

@dataclass
class Result:
    service: str
    interpreter: str
    attach_s: List[float] = field(default_factory=list)
    events: List[int] = field(default_factory=list)
    ok: int = 0
    failed: int = 0


RESULTS: List[Result] = []


def interpreter_name(python: str) -> str:
    version = subprocess.run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    ldd = subprocess.run(["ldd", os.path.realpath(python)], capture_output=True, text=True,
                         timeout=30).stdout
    where = "Debian" if python.startswith("/usr/bin") else "pyenv"
    return "%s %s (%s)" % (where, version, "shared" if "libpython" in ldd else "static")


def cycles(result: Result, pid: int, query: Sequence[str], view: str,
           traffic: Callable[[], Traffic], probe: Callable[[], Dict[str, Any]],
           how: Sequence[str] = ("--gdb",), module: Optional[str] = None,
           woke_manhole: Optional[Callable[[int, Dict[str, Any]], Dict[str, Any]]] = None
           ) -> None:
    """Attach, trace and detach len(CYCLES) times while `traffic` runs; assert what the module
    docstring says. `view` is the function that must show up as a call; `module`, when given,
    the module every event must come from; `woke_manhole`, the baseline after the first cycle."""
    RESULTS.append(result)
    before_state = probe()
    before = quiet(pid)
    for bounds in CYCLES:
        load = traffic().start()
        try:
            load.wait_ok(3)  # requests flow before the attach
            everything = bounds is CYCLES[-1]
            run = trace(pid, EVERYTHING if everything else query, how=how, bounds=bounds)
            load.wait_ok(AFTER_DETACH)
        finally:
            load.stop()
            result.ok += load.ok
            result.failed += load.failed
        result.events.append(len(run.events))
        if run.attach_s is not None:
            result.attach_s.append(run.attach_s)
        assert run.returncode == 0, run.stderr
        assert " attached (" in run.stderr and " detached" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        # every service interpreter has headers and a compiler around: the C tracer is used
        assert "no compiled tracer" not in run.stderr, run.stderr
        if everything:
            assert run.events, run.stderr
            ours = [e for e in run.events if is_ours(e)]
            assert not ours, "the tool traced itself: %r" % ours[:5]
        else:
            calls = [e for e in run.events if e["kind"] == "call" and e["function"] == view]
            assert calls, "no call to %s in %d events: %r; stderr: %s" % (
                view, len(run.events), run.events[:5], run.stderr)
        if module is not None and not everything:
            strays = [e for e in run.events if e["module"] != module]
            assert not strays, "events from outside %s: %r" % (module, strays[:5])
        assert load.failed == 0, load.errors
        assert load.ok >= AFTER_DETACH, "only %d requests served" % load.ok
        if woke_manhole is not None and bounds is CYCLES[0]:
            before = woke_manhole(pid, before)
        after = settled(pid, before)
        assert after["threads"] == before["threads"], (before, after)
        assert after["fds"] == before["fds"], (before, after)
        assert probe() == before_state


def is_ours(event: Dict[str, Any]) -> bool:
    """An event from the agent (package _hunter_attach), the project's sources, or the bootstrap
    (run by PyRun_SimpleString as "<string>": none of these services runs code from a string)."""
    return (event["module"].split(".")[0] in ("_hunter_attach", "hunter_attach")
            or event["filename"].startswith(os.path.join(ROOT, "hunter_attach") + os.sep)
            or (event["filename"], event["module"]) == ("<string>", "__main__"))


def manhole_awake(pid: int, asleep: Dict[str, Any]) -> Dict[str, Any]:
    """The first `-s SIG` woke the service's manhole, which from then on keeps a thread and its
    listening socket, as manhole does by design; anything more is ours. Returns the new baseline.
    """
    path = "/tmp/manhole-%d" % pid
    with open("/proc/net/unix") as f:  # Num RefCount Protocol Flags Type St Inode [Path]
        listening = {"socket:[%s]" % line.split()[6] for line in f if line.split()[-1] == path}

    def mine(now: Dict[str, Any]) -> Dict[str, str]:
        return {fd: link for fd, link in now["fds"].items()
                if fd not in asleep["fds"] and link not in listening}

    end = time.monotonic() + SETTLE_TIMEOUT
    now = resources(pid)
    while (mine(now) or now["threads"] != asleep["threads"] + 1) and time.monotonic() < end:
        time.sleep(0.2)
        now = resources(pid)
    assert listening and not mine(now), "besides manhole's socket %s: %r" % (path, mine(now))
    assert now["threads"] == asleep["threads"] + 1, (asleep, now)
    return now


def http_service(name: str, python: str, argv: Sequence[str], query: Sequence[str], view: str,
                 module: Optional[str] = None, target: Callable[[Service], int] = lambda s: s.pid,
                 how: Sequence[str] = ("--gdb",), env: Optional[Dict[str, str]] = None,
                 port: Optional[int] = None,
                 woke_manhole: Optional[Callable[[int, Dict[str, Any]], Dict[str, Any]]] = None
                 ) -> None:
    """The whole test of an HTTP service: argv (with "{port}" filled in) serves /work and /probe
    on 127.0.0.1; `target` picks the process to trace (default: the one started)."""
    port = port or free_port()
    base = "http://127.0.0.1:%d" % port
    result = Result(name, interpreter_name(python))
    with Service(name, [a.replace("{port}", str(port)) for a in argv], env=env) as svc:
        svc.wait_http(base + "/probe")
        cycles(result, target(svc), query, view, lambda: HttpTraffic(base),
               lambda: dict(json.loads(http_get(base + "/probe"))), how=how, module=module,
               woke_manhole=woke_manhole)
