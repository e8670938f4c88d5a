"""The gdb injector against real processes: every pyenv CPython 3.8-3.13, a main thread that is
busy or blocked in sleep, select, accept, lock.acquire, input() or join, and a busy 4-thread
process. The injected code appends "x" to a marker file named after the thread that ran it, so
each mechanism must leave exactly one "x" in its own file."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from hunter_attach.errors import (
    AttachTimeout,
    InjectionFailed,
    PermissionDenied,
    TargetExited,
    ToolMissing,
)
from hunter_attach.inject import gdb as gdbinject

sys.path.insert(0, os.path.dirname(__file__))
from support import interpreters  # noqa: E402

PYTHONS = interpreters()
VERSIONS = sorted(PYTHONS, key=lambda v: tuple(int(x) for x in v.split(".")))

# The targets. Each prints "ready ..." once set up, then blocks or spins in the main thread.
TARGET = r'''
import os, select, socket, sys, threading, time

def spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass

def heartbeat_forever():
    n, nxt = 0, time.monotonic()
    while True:
        n += 1
        if n % 1000 == 0 and time.monotonic() >= nxt:
            print("hb", flush=True)
            nxt += 0.1

def finish(line):
    print(line, flush=True)
    spin(0.3)  # Python runs again: a queued pending call gets its turn
    print("done", flush=True)

mode = sys.argv[1]
if mode == "busy":
    print("ready", flush=True)
    heartbeat_forever()
elif mode == "busy4":
    def work():
        x = {}
        while True:
            x[len(x) % 100] = [1] * 10  # allocates: threads come and go through malloc
    for _ in range(4):
        threading.Thread(target=work, daemon=True).start()
    print("ready", flush=True)
    heartbeat_forever()
elif mode == "sleep":
    t0 = time.monotonic()
    print("ready", flush=True)
    time.sleep(2.5)
    finish("woke %.3f" % (time.monotonic() - t0))
elif mode == "select":
    print("ready", flush=True)
    r, _, _ = select.select([sys.stdin], [], [])
    finish("selected %s" % sys.stdin.readline().strip())
elif mode == "accept":
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print("ready %d" % srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    finish("accepted")
elif mode == "lock":
    lock = threading.Lock()
    lock.acquire()
    def release():
        sys.stdin.readline()
        lock.release()
    threading.Thread(target=release, daemon=True).start()
    print("ready", flush=True)
    lock.acquire()
    finish("acquired")
elif mode == "input":
    print("ready", flush=True)
    finish("got %s" % input())
elif mode == "join":
    t = threading.Thread(target=sys.stdin.readline)
    t.start()
    print("ready", flush=True)
    t.join()
    finish("joined")
'''

BUSY = ("busy", "busy4")
BLOCKED = ("sleep", "select", "accept", "lock", "input", "join")


def marker_code(directory: Path) -> str:
    # Quotes, backslashes, newlines and non-ASCII on purpose: the code travels as raw bytes.
    return (
        "import _thread, os\n"
        "who = 'main' if _thread.get_native_id() == os.getpid() else 'thread'\n"
        f"path = os.path.join({str(directory)!r}, '%d-%s' % (os.getpid(), who))\n"
        "assert '\\\\ \" \u00e9\u20ac\\n' == \"\\\\ \\\" \\u00e9\\u20ac\\n\"\n"
        "with open(path, 'a') as f:\n"
        "    f.write('x')\n"
    )


class Target:
    """A running TARGET; output read line by line without blocking past a deadline."""

    def __init__(self, python: str, mode: str) -> None:
        self.mode = mode
        self.proc = subprocess.Popen([python, "-u", "-c", TARGET, mode], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self._buf = b""
        line = self.readline(20)
        assert line is not None and line.startswith("ready"), (line, self.stderr())
        self.ready = line

    def readline(self, timeout: float) -> Optional[str]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def expect(self, prefix: str, timeout: float = 5.0) -> str:
        end = time.monotonic() + timeout
        seen: List[str] = []
        while time.monotonic() < end:
            line = self.readline(end - time.monotonic())
            if line is None:
                break
            if line.startswith(prefix):
                return line
            seen.append(line)
        raise AssertionError(f"no {prefix!r} line from {self.mode}; saw {seen[-5:]}; "
                             f"alive={self.proc.poll() is None}; stderr={self.stderr()!r}")

    def quiet(self, seconds: float) -> None:
        """Assert that the target prints nothing (a blocked call did not return early)."""
        line = self.readline(seconds)
        assert line is None, f"{self.mode}: unexpected output {line!r} ({self.stderr()!r})"
        assert self.proc.poll() is None, f"{self.mode} died: {self.stderr()!r}"

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def targets() -> Iterator[List[Target]]:
    started: List[Target] = []
    yield started
    for t in started:
        t.close()


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> str:
    return gdbinject.build_helper(str(tmp_path_factory.mktemp("helper")))


def start(targets: List[Target], version: str, mode: str) -> Target:
    t = Target(PYTHONS[version], mode)
    targets.append(t)
    return t


def markers(directory: Path, pid: int) -> Dict[str, str]:
    found = {}
    for who in ("main", "thread"):
        path = directory / f"{pid}-{who}"
        if path.exists():
            found[who] = path.read_text()
    return found


def wait_marker(directory: Path, pid: int, who: str, timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if markers(directory, pid).get(who):  # created and written
            return
        time.sleep(0.01)
    raise AssertionError(f"the {who} marker of {pid} did not appear within {timeout} s")


def do_inject(pid: int, code: str, helper_lib: Optional[str], **kw: object) -> str:
    lines: List[str] = []
    try:
        return gdbinject.inject(pid, code, helper_lib=helper_lib, log=lines.append,
                                **kw)  # type: ignore[arg-type]
    except Exception:
        print("\n".join(lines[-60:]))
        raise


def unblock(t: Target) -> str:
    """Make the blocked main thread return; the line it prints then."""
    if t.mode == "sleep":
        line = t.expect("woke", 5)
        assert float(line.split()[1]) >= 2.4, f"the sleep was cut short: {line}"
        return line
    if t.mode == "accept":
        with socket.create_connection(("127.0.0.1", int(t.ready.split()[1])), timeout=5):
            return t.expect("accepted")
    t.send("go\n")
    return t.expect({"select": "selected go", "lock": "acquired", "input": "got go",
                     "join": "joined"}[t.mode])


@pytest.mark.gdb
@pytest.mark.parametrize("mode", BUSY + BLOCKED)
@pytest.mark.parametrize("version", VERSIONS)
def test_both_mechanisms(version: str, mode: str, helper: str, tmp_path: Path,
                         targets: List[Target]) -> None:
    t = start(targets, version, mode)
    how = do_inject(t.pid, marker_code(tmp_path), helper)
    assert "pending call + helper thread" in how, how
    wait_marker(tmp_path, t.pid, "thread")
    if mode in BUSY:
        wait_marker(tmp_path, t.pid, "main")
        for _ in range(3):  # still alive and running Python
            t.expect("hb", 2)
        time.sleep(0.2)
        t.proc.send_signal(signal.SIGTERM)
        assert t.proc.wait(5) == -signal.SIGTERM, t.stderr()
    else:
        # The main thread stays blocked: its call was restarted, not cut short.
        t.quiet(0.3 if mode != "sleep" else 0.1)
        assert "main" not in markers(tmp_path, t.pid)
        unblock(t)
        wait_marker(tmp_path, t.pid, "main")  # the queued pending call ran once Python did
        t.expect("done")
        assert t.proc.wait(5) == 0, t.stderr()
    assert markers(tmp_path, t.pid) == {"main": "x", "thread": "x"}


@pytest.mark.gdb
@pytest.mark.parametrize("version", [VERSIONS[0], VERSIONS[-1]])
def test_pending_call_only(version: str, helper: str, tmp_path: Path,
                           targets: List[Target]) -> None:
    t = start(targets, version, "busy")
    assert "pending call via" in do_inject(t.pid, marker_code(tmp_path), helper,
                                           mechanism="pending-call")
    wait_marker(tmp_path, t.pid, "main")
    t.expect("hb", 2)
    assert markers(tmp_path, t.pid) == {"main": "x"}


@pytest.mark.gdb
def test_pending_call_without_helper_library(tmp_path: Path, targets: List[Target]) -> None:
    # Py_AddPendingCall(PyRun_SimpleString, copy) with no library loaded at all.
    t = start(targets, VERSIONS[-1], "busy4")
    assert "pending call via" in do_inject(t.pid, marker_code(tmp_path), None,
                                           mechanism="pending-call")
    wait_marker(tmp_path, t.pid, "main")
    t.expect("hb", 2)
    assert markers(tmp_path, t.pid) == {"main": "x"}


@pytest.mark.gdb
@pytest.mark.parametrize("mode", ["sleep", "lock"])
@pytest.mark.parametrize("version", [VERSIONS[0], VERSIONS[-1]])
def test_helper_thread_only(version: str, mode: str, helper: str, tmp_path: Path,
                            targets: List[Target]) -> None:
    t = start(targets, version, mode)
    assert "helper thread via" in do_inject(t.pid, marker_code(tmp_path), helper,
                                            mechanism="helper-thread")
    wait_marker(tmp_path, t.pid, "thread")
    unblock(t)
    t.expect("done")
    assert t.proc.wait(5) == 0, t.stderr()
    assert markers(tmp_path, t.pid) == {"thread": "x"}


@pytest.mark.gdb
def test_twice_into_the_same_process(helper: str, tmp_path: Path,
                                     targets: List[Target]) -> None:
    t = start(targets, VERSIONS[-1], "busy4")
    for _ in range(2):
        do_inject(t.pid, marker_code(tmp_path), helper)
    end = time.monotonic() + 2
    while markers(tmp_path, t.pid) != {"main": "xx", "thread": "xx"}:
        assert time.monotonic() < end, markers(tmp_path, t.pid)
        time.sleep(0.01)
    t.expect("hb", 2)


@pytest.fixture(scope="module")
def infcalls_unusable() -> Optional[str]:
    """gdb's own inferior calls fail on some CPU/kernel/gdb combinations (AMX with gdb < 14)."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        gdb = gdbinject.find_gdb()
        out = subprocess.run([gdb, "-nx", "-q", "-batch", "-ex", f"attach {child.pid}",
                              "-ex", "print (int)getpid()", "-ex", "detach"],
                             capture_output=True, text=True, timeout=60)
    finally:
        child.kill()
        child.wait()
    if f"= {child.pid}" not in out.stdout:
        lines = (out.stdout + out.stderr).strip().splitlines() or ["?"]
        return "gdb's inferior calls do not work here: " + lines[-1]
    return None


@pytest.mark.gdb
@pytest.mark.parametrize("mode", ["busy4", "sleep"])
def test_infcall_style(mode: str, helper: str, tmp_path: Path, targets: List[Target],
                       infcalls_unusable: Optional[str]) -> None:
    if infcalls_unusable:
        pytest.skip(infcalls_unusable)
    t = start(targets, VERSIONS[-1], mode)
    assert do_inject(t.pid, marker_code(tmp_path), helper, call_style="infcall").startswith(
        "gdb infcall:")
    wait_marker(tmp_path, t.pid, "thread")
    if mode == "sleep":
        unblock(t)
        t.expect("done")
    else:
        t.expect("hb", 2)
    wait_marker(tmp_path, t.pid, "main")


@pytest.mark.gdb
def test_inject_is_fast(helper: str, tmp_path: Path, targets: List[Target]) -> None:
    t = start(targets, VERSIONS[-1], "sleep")
    t0 = time.monotonic()
    do_inject(t.pid, marker_code(tmp_path), helper)
    # The goal is 0.4 s on an idle machine; leave room for a loaded CI box.
    assert time.monotonic() - t0 < 2.0


def test_no_such_process(helper: str) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(TargetExited):
        gdbinject.inject(proc.pid, "pass", helper_lib=helper)


def test_gdb_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     targets: List[Target]) -> None:
    t = start(targets, VERSIONS[-1], "busy")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(gdbinject.GDB_ENV, raising=False)
    with pytest.raises(ToolMissing) as info:
        gdbinject.inject(t.pid, "pass", helper_lib=None, mechanism="pending-call")
    assert "apt-get install gdb" in info.value.hint


@pytest.mark.gdb
def test_not_python(helper: str) -> None:
    proc = subprocess.Popen(["sleep", "100"])
    try:
        with pytest.raises(InjectionFailed, match="does not look like CPython"):
            gdbinject.inject(proc.pid, "pass", helper_lib=helper)
        time.sleep(0.1)
        assert proc.poll() is None  # detached and left as it was
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.gdb
def test_timeout_leaves_the_target_alone(helper: str, targets: List[Target]) -> None:
    t = start(targets, VERSIONS[-1], "busy")
    with pytest.raises(AttachTimeout):
        gdbinject.inject(t.pid, "pass", helper_lib=helper, timeout=0.001)
    t.expect("hb", 2)


@pytest.mark.gdb
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run gdb as another user")
def test_permission_denied(tmp_path: Path, targets: List[Target]) -> None:
    t = start(targets, VERSIONS[-1], "busy")
    # gdb as nobody, against a root process: ptrace refuses.
    wrapper = tmp_path / "gdb-as-nobody"
    wrapper.write_text("#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups "
                       f"{gdbinject.find_gdb()} \"$@\"\n")
    wrapper.chmod(0o755)
    with pytest.raises(PermissionDenied) as info:
        gdbinject.inject(t.pid, "pass", helper_lib=None, mechanism="pending-call",
                         gdb=str(wrapper))
    assert info.value.hint == PermissionDenied.default_hint
    t.expect("hb", 2)


def test_thread_ranks() -> None:
    def rank(func: str, lib: str = "/lib/x86_64-linux-gnu/libc.so.6") -> int:
        return gdbinject._Thread({"id": "1", "target-id": "Thread 0x1 (LWP 5)",
                                  "frame": {"func": func, "from": lib, "addr": "0x10"}}, 5).rank

    assert rank("__futex_abstimed_wait_common") == 0
    assert rank("clock_nanosleep") == 0
    assert rank("_PyEval_EvalFrameDefault", "/x/libpython3.12.so.1.0") == 1
    assert rank("_PyObject_Free", "/x/libpython3.12.so.1.0") == 1
    assert rank("_PyEval_EvalFrameDefault", "") == 1  # a statically linked python
    assert rank("_PyEval_AddPendingCall", "/x/libpython3.12.so.1.0") == 3
    assert rank("_int_malloc") == 3
    assert rank("__libc_free") == 3
    assert rank("__lll_lock_wait_private") == 3
    assert rank("_dl_map_object", "/lib64/ld-linux-x86-64.so.2") == 3
    assert rank("mmap64") == 3
    assert rank("je_malloc", "/usr/lib/libjemalloc.so.2") == 3
    assert rank("some_c_function", "/usr/lib/libfoo.so") == 2
    assert gdbinject._c_int(0xFFFFFFFF) == -1
    assert gdbinject._c_int(0x1_0000_0000) == 0


@pytest.mark.gdb
@pytest.mark.slow
@pytest.mark.parametrize("version", [VERSIONS[0], VERSIONS[-1]])
def test_stress_repeated_injection(version: str, helper: str, tmp_path: Path,
                                   targets: List[Target]) -> None:
    t = start(targets, version, "busy4")
    times = []
    for _ in range(50):
        t0 = time.monotonic()
        do_inject(t.pid, marker_code(tmp_path), helper, timeout=10)
        times.append(time.monotonic() - t0)
        assert t.proc.poll() is None, t.stderr()
    end = time.monotonic() + 5
    while markers(tmp_path, t.pid) != {"main": "x" * 50, "thread": "x" * 50}:
        assert time.monotonic() < end, markers(tmp_path, t.pid)
        time.sleep(0.05)
    t.expect("hb", 2)
    times.sort()
    print(f"{version}: median {times[25]:.3f} s, max {times[-1]:.3f} s")


# Stand-ins for the helper library whose entry points misbehave, to check that gdb leaves the
# target as it found it when a call hangs or crashes.
FAKE_HELPER = r'''
#include <unistd.h>
int hunter_attach_spawn(const char *c, void *a, void *b, void *d, void *e) { return 0; }
int hunter_attach_pending(const char *c, void *a, void *b) {
#ifdef HANG
    sleep(30);
#else
    *(volatile int *)0 = 1;
#endif
    return 0;
}
'''


def fake_helper(tmp_path: Path, hang: bool) -> str:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "fake.c"
    src.write_text(FAKE_HELPER)
    out = tmp_path / ("hang.so" if hang else "crash.so")
    subprocess.run([cc, "-shared", "-fPIC", *(["-DHANG"] if hang else []), "-o", str(out),
                    str(src)], check=True)
    return str(out)


@pytest.mark.gdb
@pytest.mark.parametrize("mode", ["busy4", "sleep"])
def test_a_hanging_call_is_interrupted(mode: str, tmp_path: Path,
                                       targets: List[Target]) -> None:
    t = start(targets, VERSIONS[-1], mode)
    t0 = time.monotonic()
    with pytest.raises(AttachTimeout):
        gdbinject.inject(t.pid, "pass", helper_lib=fake_helper(tmp_path, True), timeout=1.0,
                         mechanism="pending-call")
    assert time.monotonic() - t0 < 5
    if mode == "sleep":
        unblock(t)
        t.expect("done")
    else:
        t.expect("hb", 2)


@pytest.mark.gdb
@pytest.mark.parametrize("mode", ["busy4", "sleep"])
def test_a_crashing_call_is_undone(mode: str, tmp_path: Path, targets: List[Target]) -> None:
    t = start(targets, VERSIONS[-1], mode)
    with pytest.raises(InjectionFailed, match="SIGSEGV"):
        gdbinject.inject(t.pid, "pass", helper_lib=fake_helper(tmp_path, False),
                         mechanism="pending-call")
    if mode == "sleep":
        unblock(t)
        t.expect("done")
    else:
        t.expect("hb", 2)


@pytest.mark.gdb
def test_threads_are_looked_at_again_when_none_is_safe(
        helper: str, tmp_path: Path, targets: List[Target],
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = start(targets, VERSIONS[-1], "busy")
    real = gdbinject._Thread._rank
    verdicts = iter([3, 3])  # the first two looks find only unsafe threads

    def rank(self: gdbinject._Thread) -> int:
        return next(verdicts, None) or real(self)

    monkeypatch.setattr(gdbinject._Thread, "_rank", rank)
    do_inject(t.pid, marker_code(tmp_path), helper)
    wait_marker(tmp_path, t.pid, "thread")
    wait_marker(tmp_path, t.pid, "main")
    monkeypatch.setattr(gdbinject._Thread, "_rank", lambda self: 3)
    with pytest.raises(InjectionFailed, match="no thread"):
        gdbinject.inject(t.pid, "pass", helper_lib=helper)
    t.expect("hb", 2)


@pytest.mark.gdb
def test_auto_helper(tmp_path: Path, targets: List[Target]) -> None:
    t = start(targets, VERSIONS[-1], "sleep")
    gdbinject.inject(t.pid, marker_code(tmp_path))  # helper_lib="auto"
    wait_marker(tmp_path, t.pid, "thread")
