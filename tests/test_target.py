"""Tests for hunter_attach.target against real processes: no /proc or psutil is faked.

Targets print their version and then sleep; reading that line is the readiness signal, so no test
sleeps for a guessed time. Every process a test starts is killed and reaped by the ``spawn``
fixture.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import psutil  # type: ignore[import-untyped, unused-ignore]
import pytest

from hunter_attach import target
from hunter_attach.errors import PermissionDenied, TargetError, ToolMissing

REPO = Path(__file__).resolve().parent.parent
PYENV = "/root/.pyenv/versions"
SYSTEM_PYTHON = "/usr/bin/python3"
# Python 2 compatible: the 2.7 target must get as far as sleeping.
READY = (
    "import sys, time; sys.stdout.write('%d.%d.%d\\n' % tuple(sys.version_info[:3])); "
    "sys.stdout.flush(); time.sleep(60)"
)
NOBODY = 65534
OTHER_UID = 12345  # not nobody: nobody is also the kernel's overflow uid, which hides things


def pyenv_python(prefix: str) -> str | None:
    found = sorted(glob.glob(f"{PYENV}/{prefix}.*/bin/python"))
    return found[-1] if found else None


SUPPORTED = [p for v in range(8, 14) if (p := pyenv_python(f"3.{v}"))]

Spawn = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], ready: bool = True, **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdout", subprocess.PIPE if ready else None)
        proc = subprocess.Popen(argv, **kwargs)
        started.append(proc)
        if ready:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, f"{argv} died before it was ready"
            proc.ready_line = line.decode().strip()  # type: ignore[attr-defined]
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def ready_version(proc: subprocess.Popen[bytes]) -> tuple[int, int, int]:
    major, minor, micro = proc.ready_line.split(".")  # type: ignore[attr-defined]
    return int(major), int(minor), int(micro)


# ------------------------------------------------------------------------------------------------
# resolve(): good targets


@pytest.mark.parametrize("python", SUPPORTED, ids=lambda p: p.split("/")[-3])
def test_resolves_every_supported_pyenv_python(spawn: Spawn, python: str) -> None:
    proc = spawn([python, "-c", READY])
    t = target.resolve(proc.pid)
    version = ready_version(proc)
    assert t.version == version
    assert t.pid == proc.pid
    # `python` is a symlink; the target's exe is the real file.
    assert t.exe == os.path.realpath(python)
    lib = f"lib/libpython{version[0]}.{version[1]}.so.1.0"
    assert t.libpython == f"{Path(python).parent.parent}/{lib}"
    assert os.path.exists(t.host_path(t.libpython))
    assert (t.uid, t.root, t.same_mount_ns, t.embedded) == (0, "/", True, False)
    target.check_ptrace(t)


def test_isolated_mode_python(spawn: Spawn) -> None:
    proc = spawn([SUPPORTED[-1], "-I", "-c", READY])
    assert target.resolve(proc.pid).version == ready_version(proc)


def test_static_python_reads_py_version(spawn: Spawn) -> None:
    """Debian's /usr/bin/python3 links libpython statically: Py_Version tells the version."""
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("no system python")
    proc = spawn([SYSTEM_PYTHON, "-c", READY])
    if "libpython" in Path(f"/proc/{proc.pid}/maps").read_text():
        pytest.skip("the system python is a shared build")
    t = target.resolve(proc.pid)
    assert (t.version, t.libpython, t.embedded) == (ready_version(proc), None, False)


def test_embedded_libpython_is_accepted(spawn: Spawn) -> None:
    """gdb on Debian links libpython; such a program is a CPython target, marked embedded."""
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("no gdb")
    proc = spawn([gdb, "-nx", "-q"], ready=False, stdin=subprocess.PIPE,
                 stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while "libpython" not in Path(f"/proc/{proc.pid}/maps").read_text():
        if time.monotonic() > deadline:
            pytest.skip("gdb does not link libpython here")
        time.sleep(0.02)
    t = target.resolve(proc.pid)
    assert t.embedded
    assert t.exe == os.path.realpath(gdb)
    assert t.libpython is not None and "/libpython3." in t.libpython


def test_other_mount_namespace(spawn: Spawn, tmp_path: Path) -> None:
    """A file that only exists in the target's mount namespace is reachable via host_path()."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    script = (
        f"mount -t tmpfs hunter-test {tmp_path} && echo hi > {tmp_path}/only-there && "
        f"exec {SUPPORTED[-1]} -c \"{READY}\""
    )
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot unshare the mount namespace: {proc.stderr.decode().strip()}")
    proc2 = spawn(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    t = target.resolve(proc2.pid)
    assert not t.same_mount_ns
    assert t.root == f"/proc/{proc2.pid}/root"
    assert t.version == ready_version(proc2)
    only_there = f"{tmp_path}/only-there"
    assert not os.path.exists(only_there)
    assert Path(t.host_path(only_there)).read_text() == "hi\n"
    assert t.libpython is not None and os.path.exists(t.host_path(t.libpython))
    with pytest.raises(ValueError):
        t.host_path("relative/path")


# ------------------------------------------------------------------------------------------------
# resolve(): bad targets


def test_dead_pid() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    if psutil.pid_exists(proc.pid):
        pytest.skip("the pid was reused already")
    with pytest.raises(TargetError, match=f"^no process with pid {proc.pid}$") as info:
        target.resolve(proc.pid)
    assert "pgrep" in info.value.hint
    assert info.value.exit_code == 3


@pytest.mark.parametrize("pid", [0, -1])
def test_impossible_pid(pid: int) -> None:
    with pytest.raises(TargetError, match="no process with pid"):
        target.resolve(pid)


def test_zombie() -> None:
    proc = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        with pytest.raises(TargetError, match="is a zombie") as info:
            target.resolve(proc.pid)
        assert f"process {os.getpid()}" in info.value.hint
        assert "reap" in info.value.hint
    finally:
        proc.wait()


def test_not_python(spawn: Spawn) -> None:
    proc = spawn(["sleep", "60"], ready=False)
    with pytest.raises(TargetError, match=r"is not a CPython process: it runs sleep") as info:
        target.resolve(proc.pid)
    assert "3.8–3.13" in info.value.hint


def test_shell_is_not_python(spawn: Spawn) -> None:
    proc = spawn(["bash", "-c", "echo; read x"], stdin=subprocess.PIPE)
    with pytest.raises(TargetError, match="is not a CPython process: it runs bash"):
        target.resolve(proc.pid)


@pytest.mark.parametrize("prefix", ["2.7", "3.6", "3.7"])
def test_too_old_python(spawn: Spawn, prefix: str) -> None:
    python = pyenv_python(prefix)
    if python is None:
        pytest.skip(f"no pyenv python {prefix}")
    proc = spawn([python, "-c", READY])
    version = ".".join(map(str, ready_version(proc)))
    with pytest.raises(TargetError, match=f"runs CPython {version}, which is too old") as info:
        target.resolve(proc.pid)
    assert "3.8–3.13" in info.value.hint


def test_thread_id_is_not_a_process(spawn: Spawn) -> None:
    code = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start()\n"
    code += READY
    proc = spawn([SUPPORTED[-1], "-c", code])
    deadline = time.monotonic() + 10
    while len(os.listdir(f"/proc/{proc.pid}/task")) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    tid = next(int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid)
    with pytest.raises(TargetError, match=f"is a thread of process {proc.pid}") as info:
        target.resolve(tid)
    assert f"-p {proc.pid}" in info.value.hint


def test_already_traced(spawn: Spawn) -> None:
    """A process has one tracer at most: say who holds it instead of letting gdb fail."""
    proc = spawn([SUPPORTED[-1], "-c", READY])
    # PTRACE_SEIZE attaches without stopping the target; the tracer's death detaches it.
    seize = (
        "import ctypes, sys, time; libc = ctypes.CDLL(None, use_errno=True); "
        f"r = libc.ptrace(0x4206, {proc.pid}, None, None); "
        "print(r, ctypes.get_errno(), flush=True); time.sleep(60)"
    )
    tracer = spawn([sys.executable, "-c", seize])
    assert tracer.ready_line == "0 0"  # type: ignore[attr-defined]
    t = target.resolve(proc.pid)
    with pytest.raises(PermissionDenied, match=f"already being traced by process {tracer.pid}"):
        target.check_ptrace(t)
    tracer.kill()
    tracer.wait()
    deadline = time.monotonic() + 10
    while "TracerPid:\t0\n" not in Path(f"/proc/{proc.pid}/status").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    target.check_ptrace(t)
    assert proc.poll() is None


# ------------------------------------------------------------------------------------------------
# Other users: run the checks for real as an unprivileged uid.

CHECKER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from hunter_attach import target
from hunter_attach.errors import HunterAttachError
pid, what = int(sys.argv[2]), sys.argv[3]
try:
    if what == "resolve":
        t = target.resolve(pid)
    else:
        # A Target as resolve() would have made it when we were allowed to look.
        t = target.Target(pid=pid, exe="?", version=(3, 11, 0), libpython=None, uid=0,
                          root="/", same_mount_ns=True)
    target.check_ptrace(t)
    print(json.dumps({"ok": True, "version": t.version}))
except HunterAttachError as e:
    print(json.dumps({"error": type(e).__name__, "message": e.message, "hint": e.hint,
                      "exit_code": e.exit_code}))
"""


@pytest.fixture(scope="module")
def unprivileged_tree() -> Iterator[str]:
    """A world-readable copy of the package and psutil: /root and the venv are not for nobody."""
    if not os.path.exists(SYSTEM_PYTHON) or shutil.which("setpriv") is None:
        pytest.skip("needs /usr/bin/python3 and setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    tree = tempfile.mkdtemp(prefix="hunter-target-test-")
    try:
        # Only what the checks need: the rest of the package may want the venv's packages.
        os.mkdir(f"{tree}/hunter_attach")
        Path(f"{tree}/hunter_attach/__init__.py").write_text("")
        for name in ("errors.py", "target.py"):
            shutil.copy(REPO / "hunter_attach" / name, f"{tree}/hunter_attach/{name}")
        shutil.copytree(os.path.dirname(psutil.__file__), f"{tree}/psutil",
                        ignore=shutil.ignore_patterns("__pycache__"))
        Path(f"{tree}/checker.py").write_text(CHECKER)
        for dirpath, _dirs, files in os.walk(tree):
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        probe = subprocess.run(
            as_user(NOBODY, [SYSTEM_PYTHON, "-c", f"import sys; sys.path.insert(0, {tree!r}); "
                             "import psutil, hunter_attach.target"]),
            capture_output=True, env=clean_env(),
        )
        if probe.returncode != 0:
            pytest.skip(f"the system python cannot import our copy: {probe.stderr.decode()}")
        yield tree
    finally:
        shutil.rmtree(tree)


def as_user(uid: int, argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


def clean_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def run_checker(tree: str, uid: int, pid: int, what: str) -> dict[str, Any]:
    out = subprocess.run(
        as_user(uid, [SYSTEM_PYTHON, f"{tree}/checker.py", tree, str(pid), what]),
        capture_output=True, env=clean_env(), timeout=30,
    )
    assert out.returncode == 0, out.stderr.decode()
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("what", ["resolve", "check_ptrace"])
def test_other_users_process_as_nobody(spawn: Spawn, unprivileged_tree: str, what: str) -> None:
    proc = spawn([SUPPORTED[-1], "-c", READY])
    result = run_checker(unprivileged_tree, NOBODY, proc.pid, what)
    assert result["error"] == "PermissionDenied", result
    assert result["exit_code"] == 4
    assert f"process {proc.pid}" in result["message"]
    assert "belongs to root (uid 0)" in result["message"]
    assert "you are nobody (uid 65534)" in result["message"]
    assert "as root" in result["hint"] and "sudo -u root" in result["hint"]
    assert "SYS_PTRACE" in result["hint"]


def test_same_user_process_is_fine(spawn: Spawn, unprivileged_tree: str) -> None:
    proc = spawn(as_user(OTHER_UID, [SYSTEM_PYTHON, "-c", READY]), env=clean_env())
    # setpriv execs python, so proc.pid is the python process.
    result = run_checker(unprivileged_tree, OTHER_UID, proc.pid, "resolve")
    assert result == {"ok": True, "version": list(ready_version(proc))}


def test_non_dumpable_process(spawn: Spawn, unprivileged_tree: str) -> None:
    code = "import ctypes; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); " + READY  # PR_SET_DUMPABLE
    proc = spawn(as_user(OTHER_UID, [SYSTEM_PYTHON, "-c", code]), env=clean_env())
    for what in ("resolve", "check_ptrace"):
        result = run_checker(unprivileged_tree, OTHER_UID, proc.pid, what)
        assert result["error"] == "PermissionDenied", result
        assert "is not dumpable" in result["message"]
        assert "root" in result["hint"]
    # Root, which has CAP_SYS_PTRACE, still may.
    target.check_ptrace(target.resolve(proc.pid))


# ------------------------------------------------------------------------------------------------
# The ptrace decision for settings this machine does not have (no Yama here). The facts are
# built by hand; gathering them is covered by the real-process tests above.


def facts(**changes: Any) -> target.PtraceFacts:
    base = target.PtraceFacts(
        pid=42, name="python3", scope=None, cap_sys_ptrace=False, uid=1000, gid=1000,
        target_uids=(1000, 1000, 1000), target_gids=(1000, 1000, 1000), dumpable=True,
        tracer_pid=0, our_descendant=False,
    )
    return target.PtraceFacts(**{**base.__dict__, **changes})


def test_ptrace_facts_of_a_real_process(spawn: Spawn) -> None:
    proc = spawn([SUPPORTED[-1], "-c", READY])
    f = target.ptrace_facts(proc.pid)
    assert f.target_uids == (0, 0, 0) and f.dumpable and f.tracer_pid == 0
    assert f.our_descendant
    assert f.cap_sys_ptrace == target.has_cap_sys_ptrace()
    assert f.scope == target.yama_ptrace_scope()


def test_ptrace_decision_same_user_classic() -> None:
    assert target.ptrace_refusal(facts(scope=0), probe_ok=True) is None
    assert target.ptrace_refusal(facts(scope=None), probe_ok=True) is None


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"scope": 3}, "ptrace_scope is 3 (disabled"),
        ({"scope": 3, "cap_sys_ptrace": True}, "ptrace_scope is 3"),
        ({"scope": 2}, "ptrace_scope is 2 (admin-only"),
        ({"scope": 1, "our_descendant": True}, "ptrace_scope is 1 (restricted"),
        ({"scope": 1, "probe": False}, "ptrace_scope is 1 (restricted"),
        ({"target_uids": (0, 0, 0)}, "belongs to root (uid 0)"),
        ({"target_uids": (1000, 0, 0)}, "uids 1000/0/0"),
        ({"target_gids": (1000, 5, 5)}, "gids 1000/5/5"),
        ({"dumpable": False}, "not dumpable"),
        ({"tracer_pid": 1}, "already being traced by process 1"),
        ({"probe": False}, "although the uids match"),
    ],
)
def test_ptrace_decision_refusals(changes: dict[str, Any], expected: str) -> None:
    probe = changes.pop("probe", True)
    refusal = target.ptrace_refusal(facts(**changes), probe_ok=probe)
    assert refusal is not None
    assert isinstance(refusal, PermissionDenied)
    assert expected in refusal.message
    assert refusal.hint


def test_ptrace_decision_yama_hints() -> None:
    r1 = target.ptrace_refusal(facts(scope=1, our_descendant=True), probe_ok=True)
    assert r1 is not None and "kernel.yama.ptrace_scope=0" in r1.hint
    assert "PR_SET_PTRACER" in r1.hint and "--cap-add=SYS_PTRACE" in r1.hint
    r2 = target.ptrace_refusal(facts(scope=2), probe_ok=True)
    assert r2 is not None and "ptrace_scope=1" in r2.hint and "securityContext" in r2.hint
    # Scope 1 lets a target that declared PR_SET_PTRACER_ANY be traced: the probe shows it.
    assert target.ptrace_refusal(facts(scope=1), probe_ok=True) is None


def test_ptrace_decision_with_capability() -> None:
    privileged = {"cap_sys_ptrace": True, "scope": 2, "target_uids": (0, 0, 0),
                  "dumpable": False, "our_descendant": True}
    assert target.ptrace_refusal(facts(**privileged), probe_ok=True) is None


# ------------------------------------------------------------------------------------------------
# check_gdb()


def test_check_gdb_found() -> None:
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("no gdb")
    assert target.check_gdb() == gdb


def test_check_gdb_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissing, match="gdb was not found on PATH") as info:
        target.check_gdb()
    assert "apt-get install gdb" in info.value.hint
    assert info.value.exit_code == 5
