"""`make bench`: what tracing with hunter-trace costs, side by side with hunter's own hunter-trace.

    python scripts/bench.py [--quick] [--pythons 3.11,3.12] [--out docs/bench.md] [--ours TREE]

Progress goes to stderr; the markdown report goes to stdout and to docs/bench.md. This is a
report, not a test: nothing here asserts a time. The machine is shared and noisy, so every number
is a ratio of measurements taken side by side in one run, or a median with its min-max.

1. Overhead. A target (scripts/bench_workload.py) runs a mixed pure-Python workload in chunks of
   ~0.15 s and reports each chunk's time per unit of work. The bench takes untraced chunks, runs a
   CLI until it has traced chunks, stops it with SIGINT, takes untraced chunks again, and so on,
   alternating hunter_attach and hunter's hunter-trace on the same process with the same filter.
   A round's ratio is median(traced) / median(the untraced chunks just before and after); the
   report shows the median over rounds (one fresh target process per round) and the min-max.
   The target tells, per chunk, whether a tracer was set at its start and end, so chunks that
   straddle an attach or a detach are dropped. Both CLIs use manhole mode and write to /dev/null.
2. Ours / hunter: the quotient of the two ratios, per round.
3. Delivered events per second: everything matches, the CLI's stdout is a pipe that the bench
   reads and counts lines from, over a fixed window after the first event.
4. Latency: command start -> first event line on stdout, and SIGINT -> the CLI's exit, in --gdb
   and manhole modes, against a mostly idle target.
5. Target RSS (VmRSS) before attaching, while traced, and after detaching.

hunter's hunter-trace evaluates its options in the target, so the target runs in a virtualenv per
interpreter, /tmp/bench-hunter-3.X, with hunter and manhole installed (created on first use:
hunter 3.9.0, or 3.7.0 on 3.8, which 3.9.0 does not support). Without it the hunter cells
say – and the target runs on the bare interpreter with a copy of manhole on its PYTHONPATH.
In manhole mode hunter's tracer reaches the thread that runs the manhole connection and threads
started afterwards (threading.settrace), never a thread that already runs: that is why the target
runs each chunk on a new thread.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKLOAD = os.path.join(HERE, "bench_workload.py")
DEFAULT_OUT = os.path.join(ROOT, "docs", "bench.md")
VERSIONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
# An event in text output (hunter's CallPrinter layout, which both tools use); JSON events are
# the lines that start with '{"'.
EVENT_LINE = re.compile(r":\d+\s+(call|line|return|exception)\s")
# What marks the line that explains a failure, most telling first (gdb writes to hunter-trace's
# stdout, and warns about things that do not matter).
ERROR_WORDS = ("Couldn't write", "Cannot access memory", "No symbol", "denied", "Error", "error")


# The hunter_attach to measure: the installed one (run from the repository), or with --ours the
# package in another source tree, e.g. a `git worktree` of another commit.
OURS_TREE = ROOT


def ours_python() -> str:
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def log(text: str) -> None:
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), text))
    sys.stderr.flush()


# --------------------------------------------------------------------------- configuration


@dataclass
class Settings:
    rounds: int  # target processes per interpreter for the overhead table
    chunks: int  # chunks per untraced or traced phase
    chunk_seconds: float
    rate_reps: int  # throughput runs per tool and output
    rate_warmup: float
    rate_window: float
    latency_runs: int
    rss_traced_seconds: float

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(rounds=1, chunks=4, chunk_seconds=0.12, rate_reps=1, rate_warmup=0.4,
                       rate_window=1.0, latency_runs=3, rss_traced_seconds=1.0)
        return cls(rounds=4, chunks=6, chunk_seconds=0.15, rate_reps=3, rate_warmup=0.5,
                   rate_window=2.0, latency_runs=10, rss_traced_seconds=1.5)


@dataclass
class Case:
    key: str
    label: str
    ours: List[str]  # hunter_attach query terms and options
    hunter: Optional[List[str]]  # hunter-trace options (evaluated as hunter.trace(...)), or n/a


CASES = [
    Case("none", "filter matches nothing", ["module=nonexistent_module"],
         ['module="nonexistent_module"']),
    Case("posixpath", "`module=posixpath` (~4% of events)", ["module=posixpath"],
         ['module="posixpath"']),
    Case("all-text", "everything, text to /dev/null", [], []),
    Case("all-json", "everything, `--json` to /dev/null", ["--json"], None),
    # not asked for, but it tells the tracer's own cost from the CLI's rendering speed
    Case("all-drop", "everything, text, `--drop`", ["--drop"], None),
]


@dataclass
class Interp:
    version: str  # "3.12"
    python: str  # the pyenv interpreter
    venv_python: Optional[str]  # /tmp/bench-hunter-3.12/bin/python, with hunter and manhole
    hunter_version: Optional[str]

    @property
    def target_python(self) -> str:
        return self.venv_python or self.python

    def hunter_cmd(self, pid: int, options: Sequence[str], gdb: bool = False) -> List[str]:
        assert self.venv_python is not None
        script = os.path.join(os.path.dirname(self.venv_python), "hunter-trace")
        return ([self.venv_python, script, "-p", str(pid)] + (["--gdb"] if gdb else [])
                + list(options))


def ours_cmd(pid: int, args: Sequence[str], gdb: bool = False) -> List[str]:
    return ([ours_python(), "-m", "hunter_attach", "-p", str(pid)] + (["--gdb"] if gdb else [])
            + list(args))


def find_pythons(wanted: Optional[Sequence[str]]) -> Dict[str, str]:
    found: Dict[str, str] = {}
    for path in sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python")):
        version = ".".join(path.split("/")[-3].split(".")[:2])
        if version in VERSIONS:
            found[version] = path
    if wanted:
        missing = [v for v in wanted if v not in found]
        if missing:
            raise SystemExit("bench: no pyenv interpreter for %s (have %s)"
                             % (", ".join(missing), ", ".join(found)))
        found = {v: found[v] for v in wanted}
    return dict(sorted(found.items(), key=lambda kv: tuple(map(int, kv[0].split(".")))))


def hunter_venv(version: str, python: str) -> Tuple[Optional[str], Optional[str]]:
    """The virtualenv with hunter and manhole for this interpreter, made if missing.
    Returns (its python, hunter's version), or (None, None) when it cannot be made."""
    venv = "/tmp/bench-hunter-%s" % version
    vpy = os.path.join(venv, "bin", "python")
    pin = "hunter==3.7.0" if version == "3.8" else "hunter==3.9.0"
    probe = [vpy, "-c", "import hunter, manhole; print(hunter.__version__)"]

    def installed() -> Optional[str]:
        if not os.path.exists(vpy):
            return None
        res = subprocess.run(probe, capture_output=True, text=True)
        have = res.stdout.strip()
        return have if res.returncode == 0 and have == pin.split("==")[1] else None

    have = installed()
    if have:
        return vpy, have
    log("creating %s (%s, manhole)" % (venv, pin))
    try:
        subprocess.run([python, "-m", "venv", venv], check=True, capture_output=True)
        subprocess.run([vpy, "-m", "pip", "install", "-q", pin, "manhole"], check=True,
                       capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        log("cannot make %s (%s): the hunter columns for %s will say n/a" % (venv, exc, version))
        return None, None
    have = installed()
    return (vpy, have) if have else (None, None)


_manhole_dir: Optional[str] = None


def manhole_path() -> str:
    """A directory that holds only the manhole package (for a target without the venv)."""
    global _manhole_dir
    if _manhole_dir is None:
        import manhole

        _manhole_dir = tempfile.mkdtemp(prefix="bench-manhole-")
        shutil.copytree(os.path.dirname(manhole.__file__),
                        os.path.join(_manhole_dir, "manhole"))
    return _manhole_dir


# --------------------------------------------------------------------------- processes

_children: List[subprocess.Popen] = []


def spawn(cmd: List[str], **kwargs: Any) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, **kwargs)
    _children.append(proc)
    return proc


def reap_children() -> None:
    """Kill whatever this bench started and is still running (by pid, ours only)."""
    for proc in _children:
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


@dataclass
class Chunk:
    t_end: float  # bench clock (time.monotonic) when the line arrived
    seconds: float
    units: int
    before: bool  # traced at the chunk's start
    after: bool  # traced at its end

    @property
    def t_start(self) -> float:
        return self.t_end - self.seconds

    @property
    def per_unit(self) -> float:
        return self.seconds / self.units


class TargetDied(Exception):
    pass


class Target:
    """A running bench_workload.py, with manhole installed."""

    def __init__(self, interp: Interp, chunk_seconds: float, pause: float = 0.0) -> None:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHUNTER", None)
        env["PYTHONFAULTHANDLER"] = "1"  # a crash leaves the threads' stacks in stderr
        if interp.venv_python is None:
            env["PYTHONPATH"] = manhole_path()
        cmd = [interp.target_python, WORKLOAD, "--manhole", "--chunk", str(chunk_seconds)]
        if pause:
            cmd += ["--pause", str(pause)]
        self.stderr_file = tempfile.TemporaryFile()
        self.proc = spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=self.stderr_file, env=env)
        self.pid = self.proc.pid
        self.chunks: List[Chunk] = []
        self.lock = threading.Lock()
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("ready"):
            self.close()
            raise TargetDied("the target did not start: %r %s" % (line, self.stderr_tail()))
        # manhole's socket appears right after install(), before "ready"
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            parts = raw.split()
            if len(parts) == 5 and parts[0] == b"chunk":
                chunk = Chunk(time.monotonic(), float(parts[1]), int(parts[2]),
                              parts[3] == b"1", parts[4] == b"1")
                with self.lock:
                    self.chunks.append(chunk)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_chunks(self, since: float, n: int, traced: bool, timeout: float,
                    abort: Optional[Callable[[], Optional[str]]] = None) -> List[Chunk]:
        """The first n chunks that started after `since`, traced (or not) from start to end."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                got = [c for c in self.chunks if c.t_start >= since
                       and c.before == traced and c.after == traced]
            if len(got) >= n:
                return got[:n]
            if not self.alive():
                raise TargetDied(self.death())
            reason = abort() if abort else None
            if reason:
                raise PhaseFailed(reason)
            if time.monotonic() > deadline:
                raise PhaseFailed("no %d %s chunks within %.0f s (got %d)" % (
                    n, "traced" if traced else "untraced", timeout, len(got)))
            time.sleep(0.02)

    def rss_kb(self) -> int:
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def death(self) -> str:
        """How the target ended: its exit status, and with a crash the frames of the crash
        that are in hunter or hunter_attach (from faulthandler's dump)."""
        rc = self.proc.returncode
        how = ("killed by %s" % signal.Signals(-rc).name if rc is not None and rc < 0
               else "exit status %s" % rc)
        self.stderr_file.seek(0)
        text = self.stderr_file.read().decode(errors="replace")
        if "Fatal Python error" not in text:
            return "the target died (%s): %s" % (how, self.stderr_tail())
        frames = [x.strip() for x in text.splitlines() if x.strip().startswith("File ")
                  and ("/hunter/" in x or "hunter_attach" in x)]
        return "the target crashed (%s); tracer frames on its stacks: %s" % (
            how, " / ".join(frames[:3]) or "none")

    def stderr_tail(self, lines: int = 5) -> str:
        self.stderr_file.seek(0)
        text = self.stderr_file.read().decode(errors="replace")
        keep = [x for x in text.splitlines() if not x.startswith("Manhole[")]
        return " | ".join(keep[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr_file.close()


class PhaseFailed(Exception):
    pass


class Cli:
    """A running hunter-trace (ours or hunter's). stdout goes to /dev/null, or into a pipe that
    is read and counted here; stderr is collected with arrival times."""

    def __init__(self, cmd: List[str], count_stdout: bool = False) -> None:
        self.cmd = cmd
        self.t_start = time.monotonic()
        self.proc = spawn(cmd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE if count_stdout else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, cwd=OURS_TREE)
        self.stderr_lines: List[Tuple[float, str]] = []
        self.lines = 0  # stdout lines so far
        self.t_first_byte: Optional[float] = None
        self.t_first_event: Optional[float] = None
        self.head = b""  # the start of stdout, for error messages
        self.t_exit: Optional[float] = None
        self.t_sigint: Optional[float] = None
        self.threads = [threading.Thread(target=self._read_stderr, daemon=True)]
        if count_stdout:
            self.threads.append(threading.Thread(target=self._read_stdout, daemon=True))
        for t in self.threads:
            t.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr_lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        partial = b""
        while True:
            data = os.read(fd, 1 << 16)
            if not data:
                break
            now = time.monotonic()
            if self.t_first_byte is None:
                self.t_first_byte = now
            self.lines += data.count(b"\n")
            if self.t_first_event is None:
                if len(self.head) < 65536:
                    self.head += data
                partial += data
                for line in partial.split(b"\n")[:-1]:
                    if line.startswith(b'{"') or EVENT_LINE.search(line.decode(errors="replace")):
                        self.t_first_event = now
                        break
                partial = partial.rsplit(b"\n", 1)[-1]

    def stderr_has(self, needle: str) -> Optional[float]:
        for t, line in list(self.stderr_lines):
            if needle in line:
                return t
        return None

    def exited(self) -> Optional[str]:
        """None while running; else a one-line reason (for PhaseFailed)."""
        if self.proc.poll() is None:
            return None
        return "the CLI exited with %s: %s" % (self.proc.returncode, self.stderr_tail())

    def first_error(self) -> str:
        """The first line of stdout (where gdb writes, for hunter-trace) or stderr that reads
        like an error, else the end of stderr."""
        lines = self.head.decode(errors="replace").splitlines()
        lines += [x for _, x in self.stderr_lines]
        for word in ERROR_WORDS:
            for line in lines:
                if word in line and not line.lstrip().startswith("File "):
                    return line.strip()
        return self.stderr_tail()

    def stderr_tail(self, lines: int = 3) -> str:
        keep = [x for _, x in self.stderr_lines if x.strip()]
        return " | ".join(keep[-lines:]) or "(no stderr)"

    def interrupt(self, timeout: float = 15.0) -> Tuple[Optional[int], float]:
        """SIGINT, then wait for the exit. Returns (exit code or None if it hung, seconds)."""
        self.t_sigint = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def wait(self, timeout: float) -> Tuple[Optional[int], float]:
        start = self.t_sigint or time.monotonic()
        try:
            rc: Optional[int] = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
            self.proc.kill()
            self.proc.wait(5)
        self.t_exit = time.monotonic()
        # hunter's hunter-trace leaves its socket behind when it fails before accepting
        leftover = "/tmp/hunter-%d" % self.proc.pid
        if "hunter-trace" in " ".join(self.cmd) and os.path.exists(leftover):
            os.unlink(leftover)
        for t in self.threads:
            t.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return rc, self.t_exit - start


# --------------------------------------------------------------------------- measurements


class Report:
    """Everything measured, and problems seen on the way."""

    def __init__(self) -> None:
        # (case, tool, version) -> per-round ratios; tool is "ours", "hunter" or "quotient"
        self.ratios: Dict[Tuple[str, str, str], List[float]] = {}
        self.untraced_us: Dict[str, List[float]] = {}  # version -> untraced us per unit
        self.rates: Dict[Tuple[str, str], List[float]] = {}  # (tool/output, version) -> ev/s
        self.latency: Dict[Tuple[str, str], List[Tuple[float, float]]] = {}
        self.latency_version = ""
        self.latency_notes: Dict[Tuple[str, str], str] = {}
        self.rss: Dict[Tuple[str, str], Tuple[int, int, int]] = {}  # (what, version) -> kB
        self.problems: List[str] = []
        self.interps: Dict[str, Interp] = {}

    def problem(self, text: str) -> None:
        log("PROBLEM: " + text)
        self.problems.append(text)


def traced_phase(target: Target, cmd: List[str], settings: Settings, what: str
                 ) -> Tuple[List[Chunk], Cli]:
    """Run a CLI until the target has reported enough traced chunks, then SIGINT it."""
    cli = Cli(cmd)
    try:
        chunks = target.wait_chunks(cli.t_start, settings.chunks, True, timeout=90,
                                    abort=cli.exited)
    except PhaseFailed as exc:
        cli.interrupt()
        raise PhaseFailed("%s: %s" % (what, exc)) from None
    except TargetDied:
        cli.interrupt()
        raise
    rc, took = cli.interrupt()
    if rc is None:
        raise PhaseFailed("%s: still running %.0f s after SIGINT (killed)" % (what, took))
    return chunks, cli


def overhead_round(interp: Interp, settings: Settings, report: Report, round_no: int) -> None:
    v = interp.version
    target = Target(interp, settings.chunk_seconds)
    try:
        untraced = target.wait_chunks(time.monotonic(), settings.chunks, False, timeout=60)
        report.untraced_us.setdefault(v, []).append(
            statistics.median(c.per_unit for c in untraced) * 1e6)
        for case in CASES:
            tools = ["ours"] + (["hunter"] if interp.venv_python and case.hunter is not None
                                else [])
            ratios: Dict[str, float] = {}
            for tool in tools:
                if not target.alive():  # a crash in an earlier phase: go on with a new process
                    target.close()
                    target = Target(interp, settings.chunk_seconds)
                    untraced = target.wait_chunks(time.monotonic(), settings.chunks, False,
                                                  timeout=60)
                if tool == "ours":
                    what, cmd = "hunter_attach", ours_cmd(target.pid, case.ours)
                else:
                    assert case.hunter is not None
                    what, cmd = "hunter-trace", interp.hunter_cmd(target.pid, case.hunter)
                what = "%s round %d, %s, %s" % (v, round_no, case.key, what)
                try:
                    traced, cli = traced_phase(target, cmd, settings, what)
                    assert cli.t_exit is not None
                    after = target.wait_chunks(cli.t_exit, settings.chunks, False, timeout=60)
                except TargetDied as exc:
                    report.problem("%s: %s" % (what, exc))
                    continue
                except PhaseFailed as exc:
                    report.problem(str(exc))
                    untraced = target.wait_chunks(time.monotonic(), settings.chunks, False,
                                                  timeout=60)
                    continue
                base = statistics.median(c.per_unit for c in untraced + after)
                ratio = statistics.median(c.per_unit for c in traced) / base
                ratios[tool] = ratio
                report.ratios.setdefault((case.key, tool, v), []).append(ratio)
                log("%s: traced/untraced = %.3g (%d traced chunks, %d units)" % (
                    what, ratio, len(traced), sum(c.units for c in traced)))
                untraced = after
            if "ours" in ratios and "hunter" in ratios:
                report.ratios.setdefault((case.key, "quotient", v), []).append(
                    ratios["ours"] / ratios["hunter"])
    finally:
        target.close()


def rate_run(target: Target, cmd: List[str], settings: Settings, what: str,
             report: Report) -> Optional[float]:
    """Events per second delivered on stdout, over a window after the first event."""
    cli = Cli(cmd, count_stdout=True)
    try:
        deadline = time.monotonic() + 30
        while cli.t_first_event is None:
            reason = cli.exited()
            if reason or time.monotonic() > deadline:
                report.problem("%s: no event (%s)" % (what, reason or "30 s"))
                return None
            time.sleep(0.01)
        start_at = cli.t_first_event + settings.rate_warmup
        time.sleep(max(0.0, start_at - time.monotonic()))
        t0, n0 = time.monotonic(), cli.lines
        time.sleep(settings.rate_window)
        t1, n1 = time.monotonic(), cli.lines
        if cli.exited():
            report.problem("%s: the CLI exited during the window: %s" % (what, cli.exited()))
            return None
        return (n1 - n0) / (t1 - t0)
    finally:
        rc, took = cli.interrupt()
        if rc is None:
            report.problem("%s: still running %.0f s after SIGINT (killed)" % (what, took))


def rates(interp: Interp, settings: Settings, report: Report) -> None:
    v = interp.version
    target = Target(interp, settings.chunk_seconds)
    try:
        runs: List[Tuple[str, Callable[[int], List[str]]]] = [
            ("ours-text", lambda pid: ours_cmd(pid, [])),
            ("ours-json", lambda pid: ours_cmd(pid, ["--json"])),
        ]
        if interp.venv_python:
            runs.append(("hunter-text", lambda pid: interp.hunter_cmd(pid, [])))
        for rep in range(settings.rate_reps):
            for key, make in runs:
                rate = rate_run(target, make(target.pid), settings, "%s events/s %s" % (v, key),
                                report)
                if rate is not None:
                    report.rates.setdefault((key, v), []).append(rate)
                    log("%s events/s %s run %d: %.0f" % (v, key, rep + 1, rate))
                # let the target settle (and a detached agent finish) before the next CLI
                time.sleep(0.3)
                if not target.alive():
                    report.problem("%s events/s %s: %s; started another" % (v, key,
                                                                            target.death()))
                    target.close()
                    target = Target(interp, settings.chunk_seconds)
    finally:
        target.close()


def latency(interp: Interp, settings: Settings, report: Report) -> None:
    """Start -> first event, SIGINT -> exit; everything matches, against an idle target."""
    v = interp.version
    report.latency_version = v
    modes: List[Tuple[str, str, Callable[[int], List[str]]]] = [
        ("hunter_attach", "manhole", lambda pid: ours_cmd(pid, [])),
        ("hunter_attach", "--gdb", lambda pid: ours_cmd(pid, [], gdb=True)),
    ]
    if interp.venv_python:
        modes += [
            ("hunter-trace", "manhole", lambda pid: interp.hunter_cmd(pid, [])),
            ("hunter-trace", "--gdb", lambda pid: interp.hunter_cmd(pid, [], gdb=True)),
        ]
    target = Target(interp, settings.chunk_seconds, pause=0.01)
    try:
        for tool, mode, make in modes:
            key = (tool, mode)
            for run in range(settings.latency_runs):
                if not target.alive():
                    report.problem("latency %s %s: %s; started another" % (
                        tool, mode, target.death()))
                    target.close()
                    target = Target(interp, settings.chunk_seconds, pause=0.01)
                cli = Cli(make(target.pid), count_stdout=True)
                deadline = time.monotonic() + 30
                while cli.t_first_event is None and cli.exited() is None \
                        and time.monotonic() < deadline:
                    time.sleep(0.002)
                first = cli.t_first_event
                if first is None:
                    rc, _ = cli.interrupt()
                    note = "no event (exit %s): %s" % (rc, cli.first_error())
                    report.latency_notes[key] = note
                    report.problem("latency %s %s run %d: %s" % (tool, mode, run + 1, note))
                    break  # a failure repeats; do not hammer the target with it
                time.sleep(0.2)
                rc, stop_s = cli.interrupt()
                if rc is None:
                    report.problem("latency %s %s: no exit %.0f s after SIGINT" % (
                        tool, mode, stop_s))
                    break
                if tool == "hunter_attach" and rc != 0:
                    report.problem("latency %s %s: exit %s after SIGINT: %s" % (
                        tool, mode, rc, cli.stderr_tail()))
                report.latency.setdefault(key, []).append((first - cli.t_start, stop_s))
                log("%s latency %s %s run %d: first event %.0f ms, exit %.0f ms after SIGINT "
                    "(rc %s)" % (v, tool, mode, run + 1, (first - cli.t_start) * 1e3,
                                 stop_s * 1e3, rc))
                time.sleep(0.2)
    finally:
        target.close()


def rss(interp: Interp, settings: Settings, report: Report) -> None:
    """VmRSS of a fresh target before attaching, while traced, after detaching."""
    v = interp.version
    runs: List[Tuple[str, Callable[[int], List[str]]]] = [
        ("ours-none", lambda pid: ours_cmd(pid, ["module=nonexistent_module"])),
        ("ours-json", lambda pid: ours_cmd(pid, ["--json"])),
    ]
    if interp.venv_python:
        runs.append(("hunter-text", lambda pid: interp.hunter_cmd(pid, [])))
    for key, make in runs:
        target = Target(interp, settings.chunk_seconds)
        try:
            target.wait_chunks(time.monotonic(), 3, False, timeout=30)
            before = target.rss_kb()
            cli = Cli(make(target.pid))
            target.wait_chunks(cli.t_start, 1, True, timeout=60, abort=cli.exited)
            time.sleep(settings.rss_traced_seconds)
            during = target.rss_kb()
            rc, took = cli.interrupt()
            assert cli.t_exit is not None
            target.wait_chunks(cli.t_exit, 3, False, timeout=60)
            after = target.rss_kb()
            report.rss[(key, v)] = (before, during, after)
            log("%s RSS %s: %d kB before, %+d while traced, %+d after" % (
                v, key, before, during - before, after - before))
        except (PhaseFailed, TargetDied) as exc:
            report.problem("%s RSS %s: %s" % (v, key, exc))
        finally:
            target.close()


def warm_up(interp: Interp, settings: Settings, report: Report) -> None:
    """Attach once, so that a tracer build for this interpreter is not timed anywhere."""
    target = Target(interp, settings.chunk_seconds)
    try:
        cmd = ours_cmd(target.pid, ["-d", "0.3", "module=nonexistent_module"])
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=OURS_TREE)
        if res.returncode != 0:
            report.problem("%s warm-up attach failed (exit %d): %s" % (
                interp.version, res.returncode, res.stderr.strip().replace("\n", " | ")))
    finally:
        target.close()


# --------------------------------------------------------------------------- the report


def fmt(x: float) -> str:
    if x >= 100:
        return "%.0f" % x
    if x >= 10:
        return "%.1f" % x
    return "%.2f" % x


def summary(values: Optional[List[float]], scale: float = 1.0) -> str:
    if not values:
        return "–"
    vals = [x * scale for x in values]
    med = fmt(statistics.median(vals))
    if len(vals) == 1:
        return med
    return "%s (%s–%s)" % (med, fmt(min(vals)), fmt(max(vals)))


def ours_version() -> str:
    """Which hunter_attach was measured: a commit, and whether its package had local changes."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", OURS_TREE] + list(args), capture_output=True,
                             text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    where = "" if OURS_TREE == ROOT else " in %s" % OURS_TREE
    if not commit:
        return "the tree%s (not a git checkout)" % where
    dirty = git("status", "--porcelain", "--", "hunter_attach", "setup.py")
    return "commit %s%s%s" % (commit, where, " with uncommitted changes in hunter_attach"
                              if dirty else "")


def machine() -> Dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        gdb = subprocess.run(["gdb", "--version"], capture_output=True, text=True
                             ).stdout.splitlines()[0]
    except (OSError, IndexError):
        gdb = "none"
    return {
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "cpu": model,
        "kernel": platform.release(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load": "%.2f %.2f %.2f" % os.getloadavg(),
        "gdb": gdb,
        "ours": ours_version(),
    }


def render(report: Report, settings: Settings, quick: bool, argv: Sequence[str],
           info: Dict[str, str], load_end: str, minutes: float) -> str:
    versions = list(report.interps)
    out: List[str] = []
    w = out.append
    w("# Benchmarks")
    w("")
    w("Written by `python scripts/bench.py%s` (`make bench`)%s. Machine: %s cores (`nproc`), "
      "%s, kernel %s, %s; load average %s at the start and %s at the end; the run took %.1f "
      "minutes. The machine is shared, so read ratios, not times." % (
          "".join(" " + a for a in argv), " — **quick run: one round, few samples**"
          if quick else "", info["nproc"], info["cpu"], info["kernel"], info["date"],
          info["load"], load_end, minutes))
    w("")
    hunters = ", ".join("%s: hunter %s" % (v, i.hunter_version or "n/a")
                        for v, i in report.interps.items())
    w("hunter_attach measured: %s." % info["ours"])
    w("")
    w("hunter's own `hunter-trace` runs from a virtualenv per interpreter (%s; hunter 3.9.0 "
      "needs Python ≥ 3.9, so 3.8 runs hunter 3.7.0). %s." % (hunters, info["gdb"]))
    w("")
    columns = [v if (i.hunter_version or "3.9.0") == "3.9.0" else "%s (hunter %s)" % (
        v, i.hunter_version) for v, i in report.interps.items()]
    head = "| | " + " | ".join(columns) + " |"
    rule = "|---|" + "---:|" * len(versions)

    w("## 1–2. Overhead: traced ÷ untraced, and hunter_attach ÷ hunter")
    w("")
    w("Same target process, same filter, alternating: untraced, hunter_attach, untraced, "
      "hunter-trace, untraced. A ratio is the median time per unit of work of the traced chunks "
      "over that of the untraced chunks just before and after (%d chunks of ~%.2f s each); a "
      "cell is the median over %d round(s) (one target process each) and the min–max. Both "
      "CLIs attach in manhole mode and write to /dev/null; the target runs each chunk on a new "
      "thread, because hunter-trace's manhole mode never reaches a thread that is already "
      "running. One unit of work is about 16,900 trace events (3,230 calls, 10,200 lines, "
      "3,230 returns, 200 exceptions), 4%% of them in posixpath." % (
          settings.chunks, settings.chunk_seconds, settings.rounds))
    w("")
    w("| filter | tool | " + " | ".join(columns) + " |")
    w("|---|---|" + "---:|" * len(versions))
    w("| no tracer | µs per unit of work, untraced | " + " | ".join(
        summary(report.untraced_us.get(v)) for v in versions) + " |")
    names = {"ours": "hunter_attach", "hunter": "hunter-trace",
             "quotient": "**hunter_attach ÷ hunter-trace**"}
    for case in CASES:
        label = case.label
        for tool in ("ours", "hunter", "quotient"):
            if case.hunter is None and tool != "ours":
                continue
            w("| %s | %s | " % (label, names[tool]) + " | ".join(
                summary(report.ratios.get((case.key, tool, v))) for v in versions) + " |")
            label = ""
    w("")
    w("hunter has no JSON output and no way to drop events, so those rows have no hunter-trace "
      "line. Without `--drop` neither tool loses events: when events are made faster than the "
      "CLI renders them, the target waits for the CLI, so the `module=posixpath` and "
      "everything rows measure the CLI's rendering as much as the tracer. The `--drop` row "
      "(everything matches, events the CLI cannot take are dropped) is the cost in the target "
      "alone. A target process that dies during a round is replaced by a new one and the round "
      "goes on (see the problems at the end).")
    w("")

    w("## 3. Delivered events per second (everything matches)")
    w("")
    w("Target → socket → CLI → rendered; the CLI's stdout is a pipe the bench counts lines from "
      "(one line per event), over %.1f s starting %.1f s after the first event; median of %d "
      "run(s) and min–max, in thousands of events per second." % (
          settings.rate_window, settings.rate_warmup, settings.rate_reps))
    w("")
    w(head)
    w(rule)
    for key, label in (("ours-text", "hunter_attach, text"), ("ours-json", "hunter_attach, "
                                                                           "`--json`"),
                       ("hunter-text", "hunter-trace, text (CallPrinter)")):
        w("| %s | " % label + " | ".join(summary(report.rates.get((key, v)), 1e-3)
                                         for v in versions) + " |")
    quotients = []
    for v in versions:
        ours, theirs = report.rates.get(("ours-text", v)), report.rates.get(("hunter-text", v))
        quotients.append(fmt(statistics.median(ours) / statistics.median(theirs))
                         if ours and theirs else "–")
    w("| **hunter_attach text ÷ hunter-trace** | " + " | ".join(quotients) + " |")
    w("")

    w("## 4. Latency (CPython %s, everything matches, ms)" % (report.latency_version or "–"))
    w("")
    w("A mostly idle target (one unit of work, then 10 ms of sleep, on its main thread). "
      "\"First event\" is from starting the command to the first event line on its stdout; "
      "\"exit\" is from SIGINT to the CLI's exit. Median of %d and min–max. hunter-trace's first "
      "events in manhole mode come from the manhole connection thread, the only running thread "
      "it traces." % settings.latency_runs)
    w("")
    w("| tool | mode | start → first event | SIGINT → exit |")
    w("|---|---|---:|---:|")
    for tool in ("hunter_attach", "hunter-trace"):
        for mode in ("manhole", "--gdb"):
            runs = report.latency.get((tool, mode))
            note = report.latency_notes.get((tool, mode))
            if runs:
                w("| %s | %s | %s | %s |" % (tool, mode, summary([r[0] for r in runs], 1e3),
                                             summary([r[1] for r in runs], 1e3)))
            elif note:
                w("| %s | %s | fails: %s | – |" % (tool, mode, note.replace("|", "/")))
            elif (tool, mode) in report.latency_notes or report.latency_version:
                w("| %s | %s | – | – |" % (tool, mode))
    w("")

    w("## 5. Target RSS (MB)")
    w("")
    w("VmRSS of a fresh target before attaching, then the change while traced (after %.1f s) and "
      "after detaching. The agent and tracer stay loaded after a detach (a second attach reuses "
      "them), as does hunter once imported." % settings.rss_traced_seconds)
    w("")
    w(head)
    w(rule)
    w("| before attaching | " + " | ".join(
        "%.1f" % (report.rss[("ours-none", v)][0] / 1024) if ("ours-none", v) in report.rss
        else "–" for v in versions) + " |")
    for key, label in (("ours-none", "hunter_attach, filter matches nothing"),
                       ("ours-json", "hunter_attach, everything, `--json`"),
                       ("hunter-text", "hunter-trace, everything")):
        cells = []
        for v in versions:
            got = report.rss.get((key, v))
            cells.append("–" if got is None else "+%.1f while, +%.1f after" % (
                (got[1] - got[0]) / 1024, (got[2] - got[0]) / 1024))
        w("| %s | " % label + " | ".join(cells) + " |")
    w("")

    w("## Problems seen in this run")
    w("")
    if report.problems:
        for p in report.problems:
            w("- " + p.replace("\n", " "))
    else:
        w("None.")
    w("")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def guarded(what: str, report: Report, step: Callable[..., None], *args: Any) -> None:
    """Run one step; a failure is noted in the report and the run goes on (each step starts
    its own target processes)."""
    try:
        step(*args)
    except (TargetDied, PhaseFailed, OSError, subprocess.SubprocessError) as exc:
        report.problem("%s: %s: %s" % (what, type(exc).__name__, exc))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one round and few samples (a couple of minutes)")
    parser.add_argument("--pythons", default=None,
                        help="comma-separated versions, e.g. 3.11,3.12 (default: all 3.8-3.13 "
                             "found; with --quick: the oldest and the newest)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write")
    parser.add_argument("--ours", default=None, metavar="TREE",
                        help="measure the hunter_attach package in this source tree (e.g. a git "
                             "worktree of another commit) instead of this repository's")
    args = parser.parse_args(argv)
    if args.ours:
        global OURS_TREE
        OURS_TREE = os.path.abspath(args.ours)
        if not os.path.exists(os.path.join(OURS_TREE, "hunter_attach", "__main__.py")):
            raise SystemExit("bench: no hunter_attach package in %s" % OURS_TREE)
    # A bench started in the background inherits SIGINT ignored, and so would every CLI it
    # starts; a handled SIGINT is reset to the default in children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    settings = Settings.make(args.quick)
    wanted = args.pythons.split(",") if args.pythons else None
    found = find_pythons(wanted)
    if args.quick and not wanted:
        # the oldest and the newest: both tracer backends (settrace, sys.monitoring)
        ends = sorted({list(found)[0], list(found)[-1]}, key=lambda v: int(v.split(".")[1]))
        found = {v: found[v] for v in ends}
    info = machine()
    started = time.monotonic()
    report = Report()
    log("interpreters: %s; %s" % (", ".join(found), "quick" if args.quick else "full run"))
    try:
        for v, python in found.items():
            vpy, hver = hunter_venv(v, python)
            report.interps[v] = Interp(v, python, vpy, hver)
        for v, interp in report.interps.items():
            log("%s: warm-up" % v)
            guarded("%s warm-up" % v, report, warm_up, interp, settings, report)
            for r in range(settings.rounds):
                guarded("%s round %d" % (v, r + 1), report, overhead_round, interp, settings,
                        report, r + 1)
            guarded("%s events/s" % v, report, rates, interp, settings, report)
            guarded("%s RSS" % v, report, rss, interp, settings, report)
        newest = report.interps[list(report.interps)[-1]]
        guarded("latency", report, latency, newest, settings, report)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
        report.problems.append("the run was interrupted; some cells are missing")
    finally:
        reap_children()
    text = render(report, settings, args.quick, argv if argv is not None else sys.argv[1:],
                  info, "%.2f %.2f %.2f" % os.getloadavg(), (time.monotonic() - started) / 60)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    log("wrote %s in %.1f minutes" % (args.out, (time.monotonic() - started) / 60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
