"""The CLI's own checks, with real CLI processes and a real manhole target: options that cannot
work are refused before anything touches the target (exit 2, one line, one hint), every error has
its hint, an early Ctrl-C is a clean exit, and a reader that left is noticed without events."""

from __future__ import annotations

import importlib.metadata
import os
import select
import signal
import subprocess
import sys
import time
from typing import Callable, Iterator, List

import pytest
import tomllib  # the tests run on the venv's Python, 3.11
from fault_support import cli_env, finish, is_clean, wait_until
from support import ROOT, Target, cli, cli_popen, interpreters, newest

import hunter_attach
from hunter_attach import errors
from hunter_attach.query import parse_query

PYTHON = interpreters()[newest(interpreters())]
# Matches nothing the target runs: the CLI attaches and then writes nothing at all.
NOTHING = "function=no_such_function_anywhere"


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    """One manhole service for the whole module: each test leaves it untraced."""
    with Target(PYTHON, "--manhole") as service:
        yield service


def untouched(target: Target) -> None:
    """Nothing was ever sent: no agent module was loaded, no tracer is installed."""
    status = target.status()
    assert status["modules"] == [], status["modules"]
    assert is_clean(status), status


def released(target: Target) -> None:
    """Whatever a session did is undone (the agent answers BYE once it has uninstalled; the
    bound only keeps a broken agent from hanging the test)."""
    wait_until(lambda: is_clean(target.status()), 10, what="the target untraced")


def refused(result: subprocess.CompletedProcess, *fragments: str) -> List[str]:
    """An option error: exit 2, one line that says what is wrong, one hint line, no output."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("hunter-trace: ")
    assert not lines[0].startswith("hunter-trace: hint:")
    assert lines[1].startswith("hunter-trace: hint: ")
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert result.stdout == ""
    return lines


def wait_attached(proc: subprocess.Popen, timeout: float = 30) -> str:
    """Read the CLI's stderr until it says it attached; returns what it read."""
    assert proc.stderr is not None
    text = ""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stderr], [], [], 0.1)
        if ready:
            line = proc.stderr.readline()
            if not line:
                break
            text += line
            if " attached " in line:
                return text
    raise AssertionError("the CLI did not attach within %.0f s: %r" % (timeout, text))


# Each, if it were accepted, would attach (or fail later, or hang): "-d" ends such a run.
BAD_OPTIONS: List[tuple] = [
    (lambda pid: ["-p", pid, "-t", "0"], ["'-t'", "positive"], "hunter-trace -h"),
    (lambda pid: ["-p", pid, "-t", "-1"], ["'-t'", "positive"], "hunter-trace -h"),
    (lambda pid: ["-p", pid, "-t", "nan"], ["'-t'", "positive"], "hunter-trace -h"),
    (lambda pid: ["-p", pid, "-t", "inf"], ["'-t'", "positive"], "hunter-trace -h"),
    (lambda pid: ["-p", "0"], ["'-p'", "0"], "hunter-trace -h"),
    (lambda pid: ["-p", "-1"], ["'-p'", "-1"], "hunter-trace -h"),
    (lambda pid: ["-p", pid, "-p", pid], ["-p was given 2 times"], "its own hunter-trace"),
    (lambda pid: ["-p", pid, "--perfetto", "/no-such-directory/trace.json"],
     ["--perfetto /no-such-directory/trace.json", "No such file or directory"],
     "existing directory"),
    (lambda pid: ["-p", pid, "-s", "USR1", "--gdb"], ["-s SIGNAL is for manhole mode"],
     "Drop -s to inject with gdb"),
    (lambda pid: ["-p", pid, "--printer", "bogus"], ["'--printer'", "bogus"], "hunter-trace -h"),
    (lambda pid: ["-p", pid, "--no-such-option"], ["--no-such-option"], "hunter-trace -h"),
    (lambda pid: ["--json"], ["Missing option '-p'"], "hunter-trace -h"),
    (lambda pid: ["-p", pid, "modul=x"], ["unknown field 'modul'"], "Did you mean 'module'?"),
    (lambda pid: ["-p", pid, "function_startwith=get"], ["unknown operator 'startwith'"],
     "Did you mean 'function_startswith'?"),
]


@pytest.mark.parametrize("args, fragments, hint", BAD_OPTIONS,
                         ids=[" ".join(a("PID")) for a, _, _ in BAD_OPTIONS])
def test_bad_options_are_refused_before_the_target_is_touched(
        target: Target, args: Callable[[str], List[str]], fragments: List[str], hint: str
) -> None:
    result = cli(*args(str(target.pid)), "-d", "0.5", "module=workload")
    lines = refused(result, *fragments)
    assert hint in lines[1], lines
    assert "attached" not in result.stderr
    assert "Traceback" not in result.stderr
    untouched(target)
    assert not os.path.exists("/no-such-directory")


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    version = importlib.metadata.version("hunter_attach")
    assert version == hunter_attach.__version__
    assert result.stdout == "hunter-trace %s\n" % version


def test_every_error_has_a_hint() -> None:
    """A raise that gives no hint of its own still prints a hint line: each kind has one, but
    TargetExited, which is news (the target exited, or exec'd) told in one line."""
    kinds = [errors.QueryError, errors.OptionError, errors.TargetError,
             errors.PermissionDenied, errors.ToolMissing, errors.AttachTimeout,
             errors.InjectionFailed, errors.ProtocolError, errors.OutputFailed]
    assert set(kinds) | {errors.TargetExited} == set(_subclasses(errors.HunterAttachError))
    for kind in kinds:
        assert kind("x").hint, kind


def _subclasses(cls: type) -> List[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub] + _subclasses(sub)
    return found


def test_second_session_is_refused_with_a_hint(target: Target) -> None:
    first = cli_popen("-p", str(target.pid), NOTHING)
    try:
        wait_attached(first)
        second = cli("-p", str(target.pid), "-d", "1", NOTHING)
        assert second.returncode == 7, second.stderr
        lines = second.stderr.splitlines()
        assert len(lines) == 2, lines
        assert "another hunter-trace session is already tracing this process" in lines[0]
        assert lines[1].startswith("hunter-trace: hint: One hunter-trace session per process")
        assert first.poll() is None  # the first session goes on
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=20)
        assert first.returncode == 0, err
        assert "process %d detached" % target.pid in err
    finally:
        finish(first)
    released(target)


@pytest.mark.parametrize("where", ["stdout", "fifo"])
def test_reader_that_left_is_noticed_without_events(target: Target, where: str,
                                                    tmp_path) -> None:
    """`hunter-trace ... | head -5` where nothing matches: once head is gone the CLI detaches
    (exit 0, as for a closed pipe), although it never writes anything that could fail."""
    args = ["-p", str(target.pid), NOTHING]
    reader = None
    if where == "fifo":
        fifo = str(tmp_path / "events")
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that the CLI's open succeeds
        args += ["-o", fifo]
    proc = cli_popen(*args)
    try:
        wait_attached(proc)
        assert not is_clean(target.status())  # tracing is on
        if reader is not None:
            os.close(reader)
            reader = None
        else:
            assert proc.stdout is not None
            proc.stdout.close()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the CLI is still attached 20 s after its reader left")
    finally:
        if reader is not None:
            os.close(reader)
        finish(proc)
    assert proc.returncode == 0, err
    assert "process %d detached" % target.pid in err
    assert "Traceback" not in err
    released(target)


def importing_the_cli(pid: int) -> bool:
    """The CLI maps its first extension module (hunter_attach._speedups, imported by cli.py):
    the interpreter has started and runs our code. Before that, a Ctrl-C falls in CPython's own
    start-up (site, and the test venv's hunter.pth which imports hunter), out of our reach."""
    try:
        with open("/proc/%d/maps" % pid) as maps:
            return "_speedups" in maps.read()
    except OSError:
        return False


def console_script(*args: str) -> subprocess.Popen:
    """hunter-trace as the installed console script runs it: pip's wrapper imports the entry
    point named in pyproject.toml and calls it."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        module, function = tomllib.load(f)["project"]["scripts"]["hunter-trace"].split(":")
    wrapper = "import sys; from %s import %s; sys.argv[0] = 'hunter-trace'; sys.exit(%s())" % (
        module, function, function)
    return subprocess.Popen([sys.executable, "-c", wrapper] + list(args), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())


@pytest.mark.parametrize("start", [cli_popen, console_script], ids=["-m", "script"])
@pytest.mark.parametrize("delay", [0.0, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.25, 0.4])
def test_early_ctrl_c_is_a_clean_exit(target: Target, delay: float,
                                      start: Callable[..., subprocess.Popen]) -> None:
    """Ctrl-C at any moment of starting (imports, option parsing, attaching): exit 130 with the
    target untouched, or, if it came after attaching, a clean detach; never a traceback."""
    proc = start("-p", str(target.pid), NOTHING)
    try:
        wait_until(lambda: importing_the_cli(proc.pid), 30, interval=0.001,
                   what="the CLI importing its modules")
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        finish(proc)
    assert "Traceback" not in err, err
    assert "KeyboardInterrupt" not in err, err
    if proc.returncode == 0:
        assert "process %d detached" % target.pid in err
    else:
        assert proc.returncode == 130, (proc.returncode, err)
        assert "interrupted" in err
    released(target)


def test_output_that_cannot_be_written_detaches_cleanly(target: Target) -> None:
    """-o on a full disk (/dev/full): one line and a hint, exit 1, the target released."""
    result = cli("-p", str(target.pid), "-o", "/dev/full", "-d", "5", "module=workload")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert "hunter-trace: could not write the output: [Errno 28] No space left on device" in lines
    assert lines[-1].startswith("hunter-trace: hint: ")
    assert "process %d detached" % target.pid in result.stderr
    assert "Traceback" not in result.stderr
    released(target)


def test_perfetto_directory_removed_while_tracing(target: Target, tmp_path) -> None:
    """The --perfetto file is written at detach: if that fails after all (its directory was
    removed meanwhile), it is one line and a hint, not a traceback, and the target is released."""
    directory = tmp_path / "traces"
    directory.mkdir()
    proc = cli_popen("-p", str(target.pid), "--perfetto", str(directory / "trace.json"),
                     "--json", "module=workload")
    try:
        wait_attached(proc)
        directory.rmdir()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        finish(proc)
    assert proc.returncode == 1, err
    lines = err.splitlines()
    assert any(line.startswith("hunter-trace: could not write the output: ") for line in lines)
    assert lines[-1].startswith("hunter-trace: hint: ")
    assert "Traceback" not in err
    released(target)


# --- did you mean (query.py) ---------------------------------------------------------------------

@pytest.mark.parametrize("term, suggestion", [
    ("modul=x", "'module'"),
    ("fnction=f", "'function'"),
    ("threadnam=main", "'threadname'"),
    ("function_startwith=get", "'function_startswith'"),
    ("kind_inn=call", "'kind_in'"),
    ("module_starts_with=a", "'module_startswith'"),
    ('Q(modul="x")', "'module'"),
])
def test_unknown_field_or_operator_suggests_the_closest(term: str, suggestion: str) -> None:
    with pytest.raises(errors.QueryError) as info:
        parse_query([term])
    assert info.value.exit_code == 2
    assert info.value.hint.startswith("Did you mean %s?" % suggestion), info.value.hint


@pytest.mark.parametrize("term", ["xyzzy=1", "module_eq=x"])
def test_no_suggestion_when_nothing_is_close(term: str) -> None:
    with pytest.raises(errors.QueryError) as info:
        parse_query([term])
    assert "Did you mean" not in info.value.hint
    assert "Query language" in info.value.hint
