"""Run a Python source string inside a live CPython process, through gdb.

Two mechanisms, normally both in one gdb session (the bootstrap accepts only the first connection
that carries its token, so running it twice is harmless):

- pending call: ``Py_AddPendingCall`` queues the code for the main thread's next eval-breaker
  check. It runs while the main thread executes Python, and never while the main thread is blocked
  in C (sleep, select, accept, lock.acquire, input, join).
- helper thread: gdb ``dlopen``s ``_helper.c`` (built as a small shared library that does not
  link libpython) and calls its entry point, which starts a detached thread that takes the GIL
  with ``PyGILState_Ensure`` and runs the code. It runs whatever the main thread is doing.

Nothing Python-level ever runs on a thread that gdb stopped: that deadlocks busy targets (the
stopped thread may sit in ``take_gil``). gdb only calls short C functions (``dlopen``, ``dlsym``,
the helper's entry points, ``Py_AddPendingCall``), on a thread chosen because it is not inside
the allocator or the dynamic loader, with every other thread running (scheduler-locking off).

How gdb makes those calls ("call styles"):

- ``trampoline`` (x86-64, the default there): gdb writes a 28-byte stub over the program's entry
  point (``_start`` runs once, at startup), points the thread's registers at it and resumes. The
  stub saves the full FPU/vector state with ``xsave``, calls the function, restores the state and
  traps; gdb then puts back the registers and the entry point bytes. gdb writes general-purpose
  registers only. gdb's own inferior calls also write the extended (xsave) register set, and gdb
  < 14 sizes that buffer for at most AVX-512: on CPUs with AMX (Sapphire Rapids and later, Linux
  >= 5.16) the kernel refuses it with EFAULT ("Couldn't write extended state status: Bad
  address") after gdb has already changed the registers, and the target dies of it.
- ``infcall``: gdb's own inferior function calls (``set unwindonsignal on``). Portable, used on
  other architectures; on x86-64 only when asked for.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import re
import select
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Literal, Optional, Tuple

from pygdbmi import gdbmiparser

from ..errors import (
    AttachTimeout,
    HunterAttachError,
    InjectionFailed,
    PermissionDenied,
    TargetExited,
    ToolMissing,
)

Mechanism = Literal["both", "pending-call", "helper-thread"]
CallStyle = Literal["auto", "trampoline", "infcall"]
Log = Callable[[str], None]

HELPER_NAME = "libhunter_attach_helper.so"
GDB_ENV = "HUNTER_ATTACH_GDB"
GDB_HINT = "Install gdb (apt-get install gdb, or dnf install gdb), or set HUNTER_ATTACH_GDB."

# After a failure or a timeout we still owe the target an orderly exit: stop it if it runs, put
# its registers and code back, detach. Each of these steps gets its own short grace period.
_CLEANUP_GRACE = 2.0

# The helper's error codes (see _helper.c).
_HELPER_ERRORS = {
    -1: "a CPython C-API function was not found",
    -2: "out of memory",
    -3: "pthread_create failed",
    -4: "Py_AddPendingCall refused the call (its queue is full)",
}

_RTLD_NOW = 0x2
_RTLD_DLOPEN = 0x80000000  # __libc_dlopen_mode needs it to behave like dlopen

# x86-64 stub; gdb sets rax = -1 (the xsave mask), rbx = 64-byte aligned save area, r11 = the
# function, r12 = its third argument (rdx is needed for the mask), and the other arguments.
#   mov %rax,%rdx; xsave64 (%rbx); mov %r12,%rdx; call *%r11; mov %rax,%r12
#   or $-1,%rax; mov %rax,%rdx; xrstor64 (%rbx); int3
_STUB_XSAVE = bytes.fromhex("4889c2" "480fae23" "4c89e2" "41ffd3" "4989c4" "4883c8ff" "4889c2"
                            "480fae2b" "cc")
# Same with fxsave64/fxrstor64 for CPUs without XSAVE (the mask registers are then unused).
_STUB_FXSAVE = bytes.fromhex("4889c2" "480fae03" "4c89e2" "41ffd3" "4989c4" "4883c8ff" "4889c2"
                             "480fae0b" "cc")
_STUB_TRAP_PC = len(_STUB_XSAVE)  # the pc gdb reports after the final int3
_SAVED_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
               "r12", "r13", "r14", "r15", "rip", "eflags", "orig_rax")
_RED_ZONE = 128
_AT_ENTRY = 9
_AT_MINSIGSTKSZ = 51  # x86 kernels >= 5.14: signal frame size, which covers the xsave size
_DEFAULT_XSAVE_SIZE = 16384  # more than any CPU needs today (AMX: 11008)
_CALL_STACK = 64 * 1024  # what dlopen and friends may use below our data on a fixed-size stack

# Thread choice. Only frame 0 is trusted: gdb runs with --readnever (no DWARF, no CFI, ten times
# faster), so unwinding past the first frame is guesswork.
_WAITING = frozenset({
    "__futex_abstimed_wait_common", "__futex_abstimed_wait_common64", "futex_wait",
    "do_futex_wait", "__futex_abstimed_wait_cancelable64",
    "__GI___futex_abstimed_wait_cancelable64",
    "clock_nanosleep", "__clock_nanosleep", "__GI___clock_nanosleep", "nanosleep", "__nanosleep",
    "select", "__select", "pselect", "__pselect", "pselect64", "poll", "__poll", "ppoll", "__ppoll",
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "accept", "__libc_accept", "accept4", "read",
    "__libc_read", "__read", "__read_nocancel", "recv", "__libc_recv", "recvfrom",
    "__libc_recvfrom", "recvmsg", "__libc_recvmsg", "wait4", "__wait4", "waitpid", "__waitpid",
    "waitid", "pause", "sigsuspend", "sigtimedwait", "__sigtimedwait", "sigwaitinfo", "connect",
    "__libc_connect", "sem_wait", "sem_timedwait", "sem_clockwait", "pthread_cond_wait",
    "pthread_cond_timedwait", "pthread_cond_clockwait", "pthread_join", "__pthread_clockjoin_ex",
    "__lll_lock_wait", "syscall",
})
# In libc, ld.so or any other library (allocators such as jemalloc included): a thread there may
# hold a lock that our calls need, and calling on it would deadlock on itself.
_UNSAFE_C = re.compile(
    r"malloc|free|calloc|realloc|memalign|valloc|_int_|arena|tcache|sysmalloc|systrim|consolidate"
    r"|chunk|_dl_|^dl|dlopen|dlclose|dlsym|dlmopen|tls_get_addr|fork|clone|pthread_create"
    r"|allocate_stack|exit|start_thread|mmap|munmap|mprotect|madvise|brk|mremap|lll_lock_wait_private"
    r"|signal handler",
    re.IGNORECASE,
)
# In libpython: our pending call takes the pending-calls lock.
_UNSAFE_PY = re.compile(r"PendingCall|pending_call|signal handler", re.IGNORECASE)
_RESAMPLES = 3


def find_gdb(gdb: Optional[str] = None) -> str:
    """The gdb executable to use: ``gdb``, else $HUNTER_ATTACH_GDB, else gdb on PATH."""
    name = gdb or os.environ.get(GDB_ENV) or "gdb"
    found = shutil.which(name)
    if found is None:
        raise ToolMissing(f"gdb was not found ({name!r} is not on PATH)", hint=GDB_HINT)
    return found


def build_helper(dest_dir: str) -> str:
    """Path of the helper library: a prebuilt one next to this module, else compile _helper.c
    into ``dest_dir`` (reused while it is newer than the source).

    The target opens it by path, as the target's user and in the target's mount namespace, so
    ``dest_dir`` must be reachable and readable from there.
    """
    here = Path(__file__).resolve().parent
    prebuilt = here / HELPER_NAME
    if prebuilt.is_file():
        return str(prebuilt)
    source = here / "_helper.c"
    dest = Path(dest_dir) / HELPER_NAME
    if dest.is_file() and dest.stat().st_mtime >= source.stat().st_mtime:
        return str(dest)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise ToolMissing("no C compiler (cc) to build the injection helper",
                          hint="Install one (apt-get install gcc, or dnf install gcc).")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".helper-", suffix=".so", dir=str(dest.parent))
    os.close(fd)
    try:
        argv = [*cc.split(), "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-o", tmp,
                str(source), "-ldl", "-lpthread"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise AttachTimeout("compiling the injection helper took over 120 s") from None
        if proc.returncode != 0:
            raise InjectionFailed(f"could not compile the injection helper: {proc.stderr.strip()}")
        os.chmod(tmp, 0o755)
        # Atomic, so a target that has the old file mapped keeps its inode.
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(dest)


def default_helper_dir() -> str:
    """A per-user directory for the helper: readable by every user (the target may run as another
    one), writable only by us, or we refuse it, because its library is loaded into processes that
    may run as root."""
    path = os.path.join(tempfile.gettempdir(), f"hunter_attach_helper.{os.getuid()}")
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise InjectionFailed(f"{path} is not a directory owned by us and writable only by us",
                              hint="Remove it, or pass the helper library explicitly.")
    return path


def inject(
    pid: int,
    code: str,
    *,
    timeout: float = 5.0,
    helper_lib: Optional[str] = "auto",
    log: Log = lambda s: None,
    mechanism: Mechanism = "both",
    gdb: Optional[str] = None,
    call_style: CallStyle = "auto",
) -> str:
    """Run the Python source ``code`` in process ``pid``; return a short description of how.

    ``helper_lib`` is the helper library's path (see :func:`build_helper`); ``"auto"`` builds or
    reuses one in a per-user directory under the temp dir; with None only the pending call is
    possible, and it calls ``PyRun_SimpleString`` directly (so the code must not raise).

    ``mechanism``: "both" (default), "pending-call" or "helper-thread" (see the module doc).
    ``gdb``: the gdb to run (default $HUNTER_ATTACH_GDB, else gdb on PATH). ``call_style``: how
    gdb calls functions in the target; "auto" is "trampoline" on x86-64, else "infcall".

    Every step has a deadline, and the whole call takes at most ``timeout`` seconds plus a few
    seconds of cleanup. gdb's output goes to ``log``, line by line, and nowhere else.
    """
    if mechanism not in ("both", "pending-call", "helper-thread"):
        raise ValueError(f"unknown mechanism {mechanism!r}")
    if call_style not in ("auto", "trampoline", "infcall"):
        raise ValueError(f"unknown call style {call_style!r}")
    if mechanism == "helper-thread" and helper_lib is None:
        raise ValueError("the helper-thread mechanism needs helper_lib")
    payload = code.encode("utf-8")
    if b"\0" in payload:
        raise ValueError("code must not contain NUL characters")
    gdb_path = find_gdb(gdb)
    _check_alive(pid)
    if helper_lib == "auto":
        helper_lib = build_helper(default_helper_dir())
    if helper_lib is not None and mechanism != "pending-call":
        # The path is the target's: in another mount namespace it resolves under its root.
        if not os.path.isfile(f"/proc/{pid}/root{helper_lib}"):
            raise InjectionFailed(f"the injection helper {helper_lib} does not exist")
    style = call_style
    if style == "auto":
        style = "trampoline" if _trampoline_possible(pid) else "infcall"
    elif style == "trampoline" and not _trampoline_possible(pid):
        raise InjectionFailed("the trampoline call style needs an x86-64 host and target")

    session = _Session(gdb_path, pid, timeout, log)
    try:
        return session.run(payload, helper_lib, mechanism, style)
    except _GdbError as exc:
        raise InjectionFailed(f"gdb refused a step of the injection: {exc}") from None
    finally:
        session.close()


def _check_alive(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        raise TargetExited(f"no process with pid {pid}") from None
    except OSError as exc:
        raise TargetExited(f"cannot read /proc/{pid}/stat: {exc}") from None
    # The state follows the parenthesised command name, which may itself contain ")".
    state = stat[stat.rfind(b")") + 2:][:1]
    if state in (b"Z", b"X"):
        raise TargetExited(f"process {pid} has exited (it is a zombie)")
    # ptrace allows one tracer; gdb would only say "Operation not permitted", which reads like a
    # permission problem.
    try:
        with open(f"/proc/{pid}/status") as f:
            tracer = next((int(line.split()[1]) for line in f if line.startswith("TracerPid:")), 0)
    except (OSError, ValueError):
        tracer = 0
    if tracer:
        raise InjectionFailed(f"process {pid} is already being traced by process {tracer}",
                              hint="Detach the other debugger (gdb, strace, py-spy) first.")


def _trampoline_possible(pid: int) -> bool:
    if platform.machine() not in ("x86_64", "AMD64", "amd64"):
        return False
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            ident = f.read(20)
    except OSError:
        return True  # gdb will tell us more; assume the common case
    # 64-bit little-endian ELF for x86-64 (e_machine 62); 32-bit targets use gdb's calls.
    machine = struct.unpack_from("<H", ident, 18)[0] if len(ident) >= 20 else 0
    return ident[:4] == b"\x7fELF" and ident[4] == 2 and machine == 62


class _GdbError(Exception):
    """gdb answered a command with ^error."""


class _GdbDied(Exception):
    """gdb's output ended."""


def _hexint(text: str) -> int:
    return int(text, 0)


class _MI:
    """A gdb/MI conversation with tokens: each command waits exactly for its own ^result, and
    async records (*stopped, *running) are queued for whoever waits for them. pygdbmi only
    parses; its GdbController would wait ~0.2 s after every command for more output."""

    def __init__(self, argv: List[str], log: Log) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items()
               # gdb embeds Python: our interpreter's PYTHONHOME/PYTHONPATH would break its
               # startup. C locale keeps gdb's messages in the English we match on.
               if not k.startswith("PYTHON") and k not in ("DEBUGINFOD_URLS", "LANGUAGE")}
        env["LC_ALL"] = "C"
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env,
                # Not in our process group: a Ctrl-C at the terminal must reach us only, so that
                # we stop the target cleanly before gdb goes away.
                start_new_session=True,
            )
        except OSError as exc:
            raise ToolMissing(f"cannot run {argv[0]}: {exc}", hint=GDB_HINT) from None
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._out = self.proc.stdout.fileno()
        self._err = self.proc.stderr.fileno()
        for fd in (self._out, self._err):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self._bufs: Dict[int, bytes] = {self._out: b"", self._err: b""}
        self._results: Dict[int, Dict[str, Any]] = {}
        self.stops: Deque[Dict[str, Any]] = deque()
        self._token = 0
        self.dead = False

    def _pump(self, deadline: float) -> bool:
        """Read what gdb has written, waiting until ``deadline`` for something. False on timeout."""
        fds = [fd for fd in (self._out, self._err) if fd >= 0]
        if not fds:
            raise _GdbDied()
        wait = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select(fds, [], [], wait)
        if not ready:
            return False
        for fd in ready:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                if fd == self._out:
                    self._out = -1
                    self.dead = True
                    raise _GdbDied()
                self._err = -1
                continue
            data = self._bufs[fd] + chunk
            *lines, self._bufs[fd] = data.split(b"\n")
            for raw in lines:
                self._line(raw.decode("utf-8", "replace").rstrip("\r"), fd == self._err)
        return True

    def _line(self, line: str, stderr: bool) -> None:
        if not line or line.strip() == "(gdb)":
            return
        self.log(f"gdb{'!' if stderr else ':'} {line}")
        if stderr:
            return
        try:
            rec = gdbmiparser.parse_response(line)
        except Exception:  # a line that is not MI (gdb prints some before MI starts)
            return
        if rec.get("type") == "result" and rec.get("token") is not None:
            self._results[int(rec["token"])] = rec
        elif rec.get("type") == "notify" and rec.get("message") == "stopped":
            self.stops.append(rec.get("payload") or {})

    def send(self, command: str) -> int:
        self._token += 1
        line = f"{self._token}{command}\n"
        self.log(f"gdb< {self._token}{command}")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            self.dead = True
            raise _GdbDied() from None
        return self._token

    def result(self, token: int, deadline: float) -> Optional[Dict[str, Any]]:
        """The ^result record of ``token``, or None when ``deadline`` passes first."""
        while token not in self._results:
            if not self._pump(deadline) and time.monotonic() >= deadline:
                return None
        return self._results.pop(token)

    def command(self, command: str, deadline: float) -> Optional[Dict[str, Any]]:
        """Send ``command`` and return its ^done/^running payload (None on timeout).
        Raises _GdbError on ^error."""
        rec = self.result(self.send(command), deadline)
        if rec is None:
            return None
        payload: Dict[str, Any] = rec.get("payload") or {}
        if rec.get("message") == "error":
            raise _GdbError(str(payload.get("msg", "unknown gdb error")))
        return payload

    def stopped(self, deadline: float) -> Optional[Dict[str, Any]]:
        """The next *stopped record, or None when ``deadline`` passes first."""
        while not self.stops:
            if not self._pump(deadline) and time.monotonic() >= deadline:
                return None
        return self.stops.popleft()


class _Thread:
    def __init__(self, info: Dict[str, Any], pid: int) -> None:
        self.id = str(info.get("id", ""))
        target = str(info.get("target-id", ""))
        lwp = re.search(r"LWP (\d+)", target) or re.search(r"process (\d+)", target)
        self.lwp = int(lwp.group(1)) if lwp else -1
        self.main = self.lwp == pid
        frame = info.get("frame") or {}
        self.func = str(frame.get("func") or "??")
        self.lib = str(frame.get("from") or "")
        self.pc = _hexint(str(frame.get("addr") or "0"))
        self.rank = self._rank()

    def _rank(self) -> int:
        """0: waiting in a syscall; 1: in the interpreter; 2: unknown; 3: never."""
        # The dynamic loader has syscall wrappers of its own; a thread in them is mid-dlopen.
        if "ld-linux" in self.lib or "/ld-" in self.lib or "ld.so" in self.lib:
            return 3
        if self.func in _WAITING:
            return 0
        # gdb names no library for the executable itself: a statically linked python.
        if "libpython" in self.lib or (not self.lib and self.func.lstrip("_").startswith("Py")):
            return 3 if _UNSAFE_PY.search(self.func) else 1
        if _UNSAFE_C.search(self.func):
            return 3
        return 2

    def describe(self) -> str:
        where = f"{self.func} in {os.path.basename(self.lib)}" if self.lib else self.func
        return f"thread {self.id} (LWP {self.lwp}{', main' if self.main else ''}) at {where}"


class _Session:
    """One gdb attached to one target. ``close`` always leaves the target as it found it."""

    def __init__(self, gdb_path: str, pid: int, timeout: float, log: Log) -> None:
        self.gdb_path = gdb_path
        self.pid = pid
        self.timeout = timeout
        self.end = time.monotonic() + timeout
        self.log = log
        self.mi: Optional[_MI] = None
        self.attached = False
        self.running = False  # the target runs (a call or a resample is in progress)
        self.thread: Optional[_Thread] = None
        self.saved_regs: Dict[str, str] = {}
        self.stub_at = 0
        self.stub_original = b""
        self.discard_signal = ""
        self.to_free: List[int] = []
        self.raw_malloc = 0
        self.raw_free = 0
        self.infcall_token = 0
        self.style = "trampoline"
        self.scratch_top = 0
        self.area = 0
        self.area_size = 0
        self.budget = 0
        self.xsave = True
        self.auxv: Dict[int, int] = {}

    # -- plumbing -------------------------------------------------------------------------------

    def _deadline(self) -> float:
        return min(time.monotonic() + self.timeout, self.end)

    def _cmd(self, command: str, what: str) -> Dict[str, Any]:
        assert self.mi is not None
        try:
            payload = self.mi.command(command, self._deadline())
        except _GdbDied:
            raise self._gdb_died(what) from None
        if payload is None:
            raise AttachTimeout(f"gdb did not finish {what} within {self.timeout:g} s")
        return payload

    def _try(self, command: str, what: str) -> Optional[Dict[str, Any]]:
        try:
            return self._cmd(command, what)
        except _GdbError as exc:
            self.log(f"hunter-attach: {what}: {exc}")
            return None

    def _gdb_died(self, what: str) -> HunterAttachError:
        if not os.path.exists(f"/proc/{self.pid}"):
            return TargetExited(f"process {self.pid} exited while gdb was {what}")
        assert self.mi is not None
        rc = self.mi.proc.poll()
        return InjectionFailed(f"gdb exited unexpectedly while {what} (exit status {rc})")

    def _wait_stopped(self, what: str) -> Dict[str, Any]:
        assert self.mi is not None
        try:
            stop = self.mi.stopped(self._deadline())
        except _GdbDied:
            raise self._gdb_died(what) from None
        if stop is None:
            raise AttachTimeout(f"the target did not stop within {self.timeout:g} s while {what}")
        self.running = False
        reason = str(stop.get("reason", ""))
        if reason.startswith("exited"):
            self.attached = False
            raise TargetExited(f"process {self.pid} exited while gdb was {what}")
        if reason == "exec":
            raise TargetExited(f"process {self.pid} ran exec() while gdb was {what}")
        return stop

    def _eval(self, expr: str, what: str, thread: bool = True) -> str:
        opt = f"--thread {self.thread.id} " if thread and self.thread else ""
        payload = self._cmd(f'-data-evaluate-expression {opt}"{expr}"', what)
        return str(payload.get("value", ""))

    def _symbol(self, name: str) -> int:
        """Address of ``name`` in the target, 0 when gdb does not know it."""
        try:
            value = self._eval(f"(long)&{name}", f"looking up {name}", thread=False)
        except _GdbError:
            return 0
        try:
            return int(value.split()[0], 0)
        except (ValueError, IndexError):
            return 0

    def _read(self, addr: int, size: int, what: str) -> bytes:
        payload = self._cmd(f"-data-read-memory-bytes {addr:#x} {size}", what)
        memory = payload.get("memory") or [{}]
        return bytes.fromhex(str(memory[0].get("contents", "")))

    def _write(self, addr: int, data: bytes, what: str) -> None:
        self._cmd(f"-data-write-memory-bytes {addr:#x} {data.hex()}", what)

    def _set_regs(self, values: List[Tuple[str, int]], what: str) -> None:
        # One comma expression, one round trip; evaluated left to right.
        expr = ", ".join(f"${name} = {value & (2**64 - 1):#x}" for name, value in values)
        self._eval(expr, what)

    # -- the session ----------------------------------------------------------------------------

    def run(self, code: bytes, helper_lib: Optional[str], mechanism: Mechanism,
            style: str) -> str:
        self.style = style
        if style == "trampoline":
            self.auxv = _read_auxv(self.pid)
            self.xsave = _has_xsave()
            size = self.auxv.get(_AT_MINSIGSTKSZ, 0)
            size = max(size, _DEFAULT_XSAVE_SIZE) if self.xsave else 512
            self.area_size = (size + 63) & ~63
            # What gdb itself writes below the thread's stack pointer: it cannot grow a stack.
            self.budget = (_RED_ZONE + 64 + self.area_size + len(code) + len(helper_lib or "")
                           + 1024)
        self._start_gdb()
        self._attach()
        syms = self._load_symbols()
        self._choose_thread()
        assert self.thread is not None
        if style == "trampoline":
            self._setup_trampoline()
        return self._arm(code, helper_lib, mechanism, syms)

    def _start_gdb(self) -> None:
        settings = [
            "set mi-async on",  # without it gdb stops answering -exec-interrupt
            "set pagination off", "set confirm off", "set width 0",
            "set auto-solib-add off",  # load only the libraries we name
            "set auto-load off", "set debuginfod enabled off",
            "set unwindonsignal on", "set unwind-on-terminating-exception on",
            "set print thread-events off", "set print inferior-events off",
            # Signals the application gets while we hold it go straight through; faults still
            # stop, so that one in our own call is noticed (and never delivered).
            "handle all nostop noprint pass",
            "handle SIGSEGV SIGBUS SIGILL SIGFPE SIGABRT SIGSYS SIGSTOP stop print",
        ]
        argv = [self.gdb_path, "-nx", "-q", "--readnever", "--interpreter=mi3"]
        for setting in settings:
            argv += ["-iex", setting]
        self.mi = _MI(argv, self.log)
        # A cheap command whose answer means the -iex lines ran and MI is up.
        self._cmd("-gdb-version", "starting")

    def _attach(self) -> None:
        try:
            self._cmd(f"-target-attach {self.pid}", "attaching")
        except _GdbError as exc:
            msg = str(exc)
            if "Operation not permitted" in msg or "EPERM" in msg:
                raise PermissionDenied(f"gdb may not attach to process {self.pid}: {msg}") from None
            if "No such process" in msg:
                raise TargetExited(f"process {self.pid} is gone ({msg})") from None
            raise InjectionFailed(f"gdb could not attach to process {self.pid}: {msg}") from None
        self.attached = True
        self._wait_stopped("attaching")
        self._try("-gdb-set scheduler-locking off", "setting scheduler-locking")

    def _load_symbols(self) -> Dict[str, int]:
        # A statically linked python has the C API in the executable, whose symbols gdb reads at
        # attach; a shared one has it in libpython.
        self._try('-interpreter-exec console "sharedlibrary libpython"', "loading libpython")
        self._try('-interpreter-exec console "sharedlibrary libc.so"', "loading libc")
        names = ["Py_AddPendingCall", "PyRun_SimpleString", "PyGILState_Ensure",
                 "PyGILState_Release", "Py_IsInitialized", "PyMem_RawMalloc", "PyMem_RawFree",
                 "dlopen", "dlsym", "dlerror"]
        syms = {name: self._symbol(name) for name in names}
        if not syms["Py_AddPendingCall"] or not syms["PyRun_SimpleString"]:
            raise InjectionFailed(
                f"process {self.pid} does not look like CPython: neither its executable nor a "
                "loaded libpython has Py_AddPendingCall/PyRun_SimpleString",
                hint="Check the pid; CPython built without exported symbols cannot be attached.")
        if not syms["dlopen"]:
            # glibc < 2.34 keeps dlopen in libdl, or only has the private __libc_ variants.
            self._try('-interpreter-exec console "sharedlibrary libdl"', "loading libdl")
            syms["dlopen"] = self._symbol("dlopen")
            syms["dlsym"] = self._symbol("dlsym")
            syms["dlerror"] = self._symbol("dlerror")
            if not syms["dlopen"]:
                syms["__libc_dlopen_mode"] = self._symbol("__libc_dlopen_mode")
                syms["__libc_dlsym"] = self._symbol("__libc_dlsym")
        return syms

    def _threads(self) -> List[_Thread]:
        payload = self._cmd("-thread-info", "listing threads")
        return [_Thread(t, self.pid) for t in payload.get("threads") or []]

    def _choose_thread(self) -> None:
        maps = _read_maps(self.pid)
        for attempt in range(_RESAMPLES + 1):
            threads = sorted(self._threads(), key=lambda t: (t.rank, not t.main))
            for t in threads:
                self.log(f"hunter-attach: {t.describe()}: rank {t.rank}")
            last = attempt == _RESAMPLES
            for t in threads:
                if t.rank > (2 if last else 1):
                    break
                if self._stack_ok(t, maps):
                    self.thread = t
                    self.log(f"hunter-attach: calling on {t.describe()}")
                    return
            if last:
                break
            # Every thread is somewhere we must not call from (inside malloc, the loader...).
            # Let the target run a moment and look again.
            self._resample()
        raise InjectionFailed(
            f"no thread of process {self.pid} is stopped at a point where gdb may call functions "
            "(all were inside the allocator, the dynamic loader or thread creation)",
            hint="Try again; a target that is always inside malloc cannot be attached with gdb.")

    def _resample(self) -> None:
        self._cmd("-exec-continue", "resuming the target")
        self.running = True
        time.sleep(0.02)
        self._cmd("-exec-interrupt", "interrupting the target")
        self._wait_stopped("interrupting the target")

    def _stack_ok(self, t: _Thread, maps: List[Tuple[int, int, str]]) -> bool:
        if self.style != "trampoline":
            return True  # gdb's own calls manage their stack
        value = self._cmd(f'-data-evaluate-expression --thread {t.id} "(long)$rsp"',
                          "reading the stack pointer").get("value", "0")
        sp = int(str(value), 0)
        for start, end, path in maps:
            if start <= sp < end:
                # gdb writes our data just below the red zone; the callee's own stack below that
                # grows by itself on the main stack, not on a thread's.
                need = self.budget + (0 if path == "[stack]" else _CALL_STACK)
                if sp - start >= need:
                    return True
                self.log(f"hunter-attach: {t.describe()}: only {sp - start} bytes of stack")
                return False
        return False

    # -- calls ----------------------------------------------------------------------------------

    def _setup_trampoline(self) -> None:
        assert self.thread is not None
        names = self._cmd("-data-list-register-names", "listing registers")["register-names"]
        numbers = {name: i for i, name in enumerate(names) if name}
        missing = [r for r in _SAVED_REGS if r not in numbers]
        if missing:
            raise InjectionFailed(f"gdb does not show the registers {missing} of this target")
        nums = " ".join(str(numbers[r]) for r in _SAVED_REGS)
        values = self._cmd(f"-data-list-register-values --thread {self.thread.id} x {nums}",
                           "saving registers")["register-values"]
        by_number = {int(v["number"]): str(v["value"]) for v in values}
        self.saved_regs = {r: by_number[numbers[r]] for r in _SAVED_REGS}

        entry = self.auxv.get(_AT_ENTRY, 0)
        if not entry:
            raise InjectionFailed(f"cannot find the entry point of process {self.pid}")
        stub = _STUB_XSAVE if self.xsave else _STUB_FXSAVE
        threads = self._threads()
        if any(entry <= t.pc < entry + len(stub) + 1 for t in threads):
            raise InjectionFailed(f"a thread of process {self.pid} is at its entry point")
        sp = int(self.saved_regs["rsp"], 0)
        self.area = (sp - _RED_ZONE - 64 - self.area_size) & ~63
        self.scratch_top = self.area
        if stub is _STUB_XSAVE:
            # XRSTOR faults unless the header past XSTATE_BV is zero; XSAVE only writes
            # XSTATE_BV.
            self._write(self.area + 512, bytes(64), "preparing the register save area")
        self.stub_original = self._read(entry, len(stub), "reading the entry point")
        self._write(entry, stub, "writing the call stub")
        self.stub_at = entry

    def _scratch(self, data: bytes, what: str) -> int:
        """Put ``data`` where the current call can read it; valid until the session ends."""
        if self.style == "trampoline":
            self.scratch_top = (self.scratch_top - len(data)) & ~15
            self._write(self.scratch_top, data, what)
            return self.scratch_top
        addr = self._persistent(data, what)
        self.to_free.append(addr)
        return addr

    def _persistent(self, data: bytes, what: str) -> int:
        """Copy ``data`` into memory that outlives the session (PyMem_RawMalloc, never freed)."""
        if not self.raw_malloc:
            raise InjectionFailed("PyMem_RawMalloc was not found in the target")
        addr = self._call(self.raw_malloc, [len(data)], f"allocating memory for {what}")
        if not addr:
            raise InjectionFailed(f"the target is out of memory ({what})")
        self._write(addr, data, what)
        return addr

    def _call(self, func: int, args: List[int], what: str) -> int:
        """Call ``func(*args)`` (at most five integer arguments) on the chosen thread and return
        its 64-bit result."""
        assert self.thread is not None and len(args) <= 5
        if self.style == "infcall":
            return self._infcall(func, args, what)
        a = [*args, 0, 0, 0, 0, 0][:5]
        sp = (self.scratch_top - 256) & ~15
        flags = int(self.saved_regs["eflags"], 0) & ~0x500  # the ABI wants DF clear; no TF
        self._set_regs([("rip", self.stub_at), ("rsp", sp), ("rax", -1), ("rbx", self.area),
                        ("r11", func), ("rdi", a[0]), ("rsi", a[1]), ("r12", a[2]),
                        ("rcx", a[3]), ("r8", a[4]), ("eflags", flags),
                        # Not "in a syscall": the kernel must not restart the one we interrupted
                        # at our stub's address.
                        ("orig_rax", -1)], f"preparing the call for {what}")
        self._cmd("-exec-continue", what)
        self.running = True
        while True:
            stop = self._wait_stopped(what)
            tid = str(stop.get("thread-id", ""))
            frame = stop.get("frame") or {}
            pc = _hexint(str(frame.get("addr") or "0"))
            sig = str(stop.get("signal-name", ""))
            if tid == self.thread.id:
                if sig == "SIGTRAP" and pc == self.stub_at + _STUB_TRAP_PC:
                    value = self._eval("(long)$r12", f"reading the result of {what}")
                    return int(value, 0)
                self.discard_signal = sig
                raise InjectionFailed(
                    f"{what} stopped with {sig or stop.get('reason')} at {pc:#x} "
                    f"({frame.get('func', '??')}); the call was abandoned")
            # Another thread stopped (a fault of its own): let it have its signal and go on.
            self.log(f"hunter-attach: thread {tid} stopped with {sig}; resuming")
            self._cmd("-exec-continue", what)
            self.running = True

    def _infcall(self, func: int, args: List[int], what: str) -> int:
        assert self.mi is not None
        proto = ", ".join(["long"] * len(args)) or "void"
        argtext = ", ".join(str(a) for a in args)
        expr = f"((long (*)({proto})){func:#x})({argtext})"
        opt = f"--thread {self.thread.id} " if self.thread else ""
        try:
            token = self.mi.send(f'-data-evaluate-expression {opt}"{expr}"')
            self.running = True
            self.infcall_token = token
            rec = self.mi.result(token, self._deadline())
            if rec is None:
                raise AttachTimeout(f"{what} did not return within {self.timeout:g} s")
        except _GdbDied:
            raise self._gdb_died(what) from None
        self.running = False
        self.infcall_token = 0
        payload = rec.get("payload") or {}
        if rec.get("message") == "error":
            msg = str(payload.get("msg", ""))
            if "extended state" in msg:
                raise InjectionFailed(
                    f"this gdb cannot call functions on this CPU ({msg.strip()})",
                    hint="Use the trampoline call style (the default on x86-64) or gdb >= 14.")
            raise InjectionFailed(f"{what} failed in gdb: {msg.strip()}")
        return int(str(payload.get("value", "0")).split()[0], 0)

    def _arm(self, code: bytes, helper_lib: Optional[str], mechanism: Mechanism,
             syms: Dict[str, int]) -> str:
        self.raw_malloc = syms.get("PyMem_RawMalloc", 0)
        self.raw_free = syms.get("PyMem_RawFree", 0)
        want_pending = mechanism in ("both", "pending-call")
        want_thread = mechanism in ("both", "helper-thread")
        lib_entries: Dict[str, int] = {}
        notes: List[str] = []
        if helper_lib is not None and (want_thread or mechanism == "pending-call"):
            try:
                lib_entries = self._load_helper(helper_lib, syms)
            except InjectionFailed as exc:
                if mechanism != "both":
                    raise
                self.log(f"hunter-attach: {exc}")
                notes.append(f"no helper thread: {exc}")
        done: List[str] = []
        failures: List[str] = []
        code_z = code + b"\0"
        code_at = 0
        if lib_entries:
            code_at = self._scratch(code_z, "the code")
        if want_pending:
            if lib_entries:
                rc = _c_int(self._call(lib_entries["pending"],
                                       [code_at, syms["Py_AddPendingCall"],
                                        syms["PyRun_SimpleString"]], "queueing the pending call"))
            else:
                # PyRun_SimpleString itself as the pending call: its -1 (the code raised)
                # becomes a SystemError in the main thread, hence the helper's wrapper above.
                buf = self._persistent(code_z, "the code")
                rc = _c_int(self._call(syms["Py_AddPendingCall"],
                                       [syms["PyRun_SimpleString"], buf],
                                       "Py_AddPendingCall"))
                rc = -4 if rc != 0 else 0
            if rc == 0:
                done.append("pending call")
            else:
                failures.append(f"pending call: {_HELPER_ERRORS.get(rc, f'error {rc}')}")
        if want_thread and lib_entries:
            rc = _c_int(self._call(lib_entries["spawn"],
                                   [code_at, syms["Py_IsInitialized"], syms["PyGILState_Ensure"],
                                    syms["PyGILState_Release"], syms["PyRun_SimpleString"]],
                                   "starting the helper thread"))
            if rc == 0:
                done.append("helper thread")
            else:
                failures.append(f"helper thread: {_HELPER_ERRORS.get(rc, f'error {rc}')}")
        for failure in failures:
            self.log(f"hunter-attach: {failure}")
        if not done:
            raise InjectionFailed("; ".join(failures + notes) or "nothing was injected")
        assert self.thread is not None
        text = f"gdb {self.style}: {' + '.join(done)} via {self.thread.describe()}"
        return "; ".join([text, *failures, *notes])

    def _load_helper(self, path: str, syms: Dict[str, int]) -> Dict[str, int]:
        path_at = self._scratch(os.fsencode(path) + b"\0", "the helper path")
        if syms.get("dlopen"):
            handle = self._call(syms["dlopen"], [path_at, _RTLD_NOW], "dlopen")
        elif syms.get("__libc_dlopen_mode"):
            handle = self._call(syms["__libc_dlopen_mode"], [path_at, _RTLD_NOW | _RTLD_DLOPEN],
                                "__libc_dlopen_mode")
        else:
            raise InjectionFailed("the target has no dlopen (neither libc nor libdl provide it)")
        if not handle:
            reason = "unknown error"
            if syms.get("dlerror"):
                err = self._call(syms["dlerror"], [], "dlerror")
                if err:
                    reason = self._read(err, 512, "reading dlerror").split(b"\0")[0].decode(
                        "utf-8", "replace")
            raise InjectionFailed(
                f"the target could not load the injection helper {path}: {reason}",
                hint="The helper must be readable by the target's user, inside its mount "
                     "namespace (containers).")
        dlsym = syms.get("dlsym") or syms.get("__libc_dlsym") or 0
        if not dlsym:
            raise InjectionFailed("the target has no dlsym")
        entries = {}
        for key, name in (("spawn", b"hunter_attach_spawn"), ("pending", b"hunter_attach_pending")):
            name_at = self._scratch(name + b"\0", "a symbol name")
            entries[key] = self._call(dlsym, [handle, name_at], f"dlsym({name.decode()})")
            if not entries[key]:
                raise InjectionFailed(f"{path} has no {name.decode()}: not our helper library?")
        return entries

    # -- cleanup --------------------------------------------------------------------------------

    def close(self) -> None:
        mi = self.mi
        if mi is None:
            return
        try:
            if self.attached and not mi.dead:
                self._restore()
        except Exception as exc:  # cleanup must go on; the primary error is already raised
            self.log(f"hunter-attach: cleanup failed: {exc!r}")
        finally:
            self._quit_gdb()

    def _restore(self) -> None:
        assert self.mi is not None
        grace = _CLEANUP_GRACE
        self.end = max(self.end, time.monotonic() + 4 * grace)
        self.timeout = grace
        if self.running:
            # Never detach or quit while the target runs one of our calls: interrupt first.
            self._try("-exec-interrupt", "interrupting the target")
            try:
                self._wait_stopped("interrupting the target")
            except TargetExited:
                return
            if self.infcall_token:
                # gdb answers the interrupted call with ^error once it has unwound it.
                self.mi.result(self.infcall_token, time.monotonic() + grace)
        if self.saved_regs and self.thread is not None:
            regs = [(name, int(self.saved_regs[name], 0)) for name in _SAVED_REGS
                    if name not in ("rip", "orig_rax")]
            # rip before orig_rax: some gdbs reset orig_rax when the pc is written.
            regs += [("rip", int(self.saved_regs["rip"], 0)),
                     ("orig_rax", int(self.saved_regs["orig_rax"], 0))]
            self._set_regs(regs, "restoring registers")
            self.saved_regs = {}
        if self.stub_at:
            self._write(self.stub_at, self.stub_original, "restoring the entry point")
            self.stub_at = 0
        for addr in self.to_free:
            if self.raw_free and self.style == "infcall":
                self._try_call_free(addr)
        if self.discard_signal:
            # The fault came from our own call; the restored thread must not receive it.
            self._try(f'-interpreter-exec console "handle {self.discard_signal} nopass"',
                      "discarding the signal")
        self._try("-target-detach", "detaching")
        self.attached = False

    def _try_call_free(self, addr: int) -> None:
        try:
            self._call(self.raw_free, [addr], "freeing memory")
        except HunterAttachError as exc:
            self.log(f"hunter-attach: could not free {addr:#x}: {exc}")

    def _quit_gdb(self) -> None:
        assert self.mi is not None
        proc = self.mi.proc
        if proc.poll() is None and not self.mi.dead:
            try:
                self.mi.send("-gdb-exit")
            except _GdbDied:
                pass
        try:
            proc.wait(timeout=_CLEANUP_GRACE)
        except subprocess.TimeoutExpired:
            if self.running:
                self.log("hunter-attach: gdb is stuck while the target runs one of our calls; "
                         "killing gdb may crash the target")
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _c_int(value: int) -> int:
    """The C ``int`` in the low 32 bits of a 64-bit register."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _read_maps(pid: int) -> List[Tuple[int, int, str]]:
    maps = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in parts[0].split("-"))
                maps.append((start, end, parts[5].strip() if len(parts) > 5 else ""))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise TargetExited(f"process {pid} exited") from None
        raise InjectionFailed(f"cannot read /proc/{pid}/maps: {exc}") from None
    return maps


def _read_auxv(pid: int) -> Dict[int, int]:
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InjectionFailed(f"cannot read /proc/{pid}/auxv: {exc}") from None
    auxv: Dict[int, int] = {}
    for key, value in struct.iter_unpack("<QQ", data[: len(data) // 16 * 16]):
        if key == 0:
            break
        auxv[key] = value
    return auxv


def _has_xsave() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "xsave" in line.split()
    except OSError:
        pass
    return True

