"""Resolve a PID to a CPython :class:`Target`, and check before attaching that we may trace it.

Everything here only reads ``/proc`` and files on disk: nothing is injected and the target is never
stopped, so every check is safe to run before the user has committed to anything. The checks run
in the order in which users hit them (no such process, zombie, wrong owner, not CPython, wrong
version, ptrace refused) so that the first error reported is the one to fix first.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import pwd
import re
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, final

import psutil  # type: ignore[import-untyped, unused-ignore]

from .errors import (
    PID_HINT,
    VERSION_HINT,
    PermissionDenied,
    TargetError,
    TargetExited,
    ToolMissing,
)

SUPPORTED_VERSIONS = ((3, 8), (3, 13))
CONTAINER_HINT = (
    "In a container, ptrace needs CAP_SYS_PTRACE: docker run --cap-add=SYS_PTRACE "
    "(add --security-opt seccomp=unconfined on kernels before 4.8), or in Kubernetes "
    "securityContext: {capabilities: {add: [SYS_PTRACE]}}; run hunter-trace in the same "
    "container or pod as the target (shareProcessNamespace: true for a sidecar)."
)
MANHOLE_HINT = "Or let the service open a manhole socket and drop --gdb."
GDB_INSTALL_HINT = (
    "Install gdb: apt-get install gdb (Debian, Ubuntu), dnf install gdb (Fedora, RHEL), "
    "apk add gdb (Alpine), pacman -S gdb (Arch); or drop --gdb and use a manhole socket."
)
YAMA_SCOPE_PATH = "/proc/sys/kernel/yama/ptrace_scope"
YAMA_SCOPES = {
    0: "classic: any process of the same user may be traced",
    1: "restricted: only a parent may attach, unless the target allowed a tracer with "
    "prctl(PR_SET_PTRACER)",
    2: "admin-only: only a tracer with CAP_SYS_PTRACE may attach",
    3: "disabled: no process may attach, and the setting cannot be lowered until reboot",
}
CAP_SYS_PTRACE = 19

# libpython3.11.so.1.0, libpython3.6m.so.1.0, libpython3.11d.so, libpython3.13t.so, libpython2.7.so
_LIBPYTHON_RE = re.compile(r"/libpython(\d+)\.(\d+)([a-z]*)\.so(?:\.[0-9.]+)?$")
_LIBPYPY_RE = re.compile(r"/libpypy[\w.-]*\.so")
_EXE_NAME_RE = re.compile(r"^python(\d+)(?:\.(\d+))?[a-z]*$")
_DELETED = " (deleted)"
# A statically linked CPython exports its C API for extension modules; these two are also the
# functions that injection needs, so a binary that lacks them is useless to us anyway.
_STATIC_API = ("Py_AddPendingCall", "PyRun_SimpleString")
# What the `python` program's main() calls; a program that embeds Python calls Py_Initialize.
_PYTHON_MAIN = ("Py_BytesMain", "Py_Main")


@dataclass(frozen=True)
class Target:
    """A live CPython process that passed :func:`resolve`.

    Paths (``exe``, ``libpython``) are as the target sees them; :meth:`host_path` turns them into
    paths that this process can open when the target lives in another mount namespace.
    """

    pid: int
    exe: str
    version: tuple[int, int, int]
    libpython: str | None
    uid: int
    root: str
    same_mount_ns: bool
    # True when the interpreter is embedded in another program (gdb, vim, uwsgi): it is traced
    # like any other, but its main thread may not run Python code often (see prior-art notes).
    embedded: bool = False
    # The target's pid inside its own pid namespace (a container), when that differs from `pid`:
    # files the target names after its pid (/tmp/manhole-<pid>) use this one.
    ns_pid: int | None = None

    def host_path(self, path: str) -> str:
        """``path`` in the target's file system, as a path this process can open.

        Only correct for paths without symbolic links that point outside, such as the canonical
        paths that /proc/PID/maps and /proc/PID/exe report: an absolute link under
        /proc/PID/root is resolved against our root, not the target's.
        """
        if not path.startswith("/"):
            raise ValueError(f"not an absolute path: {path!r}")
        if self.same_mount_ns:
            return path
        return self.root + path

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def interpreter(self) -> str:
        """The program to ask for the target's headers and extension ABI (build.tracer_for): its
        own executable, or, for an interpreter embedded in another program (uwsgi), which cannot
        run `-c`, the pythonX.Y installed beside the libpython it maps, when there is one."""
        if not self.embedded or self.libpython is None:
            return self.exe
        return _python_beside(self.libpython, self.version, self.host_path) or self.exe


# ------------------------------------------------------------------------------------------------
# Small /proc and credential helpers


def _read_status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        fields = {}
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return fields


def signal_dispositions(pid: int) -> tuple[int, int]:
    """(caught, ignored): bit masks of the signals that process catches with a handler and
    that it ignores, as the kernel reports them (SigCgt, SigIgn; bit N-1 is signal N).
    Raises OSError when the process is gone."""
    status = _read_status(pid)
    return int(status.get("SigCgt", "0"), 16), int(status.get("SigIgn", "0"), 16)


def python_children(pid: int) -> list[int]:
    """The descendants of ``pid`` that run a CPython (an executable named python*, or one that
    maps a libpython: uWSGI, say), oldest first. Empty when they cannot be read."""
    found = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    for child in children:
        try:
            name = os.path.basename(os.readlink(f"/proc/{child.pid}/exe"))
            if name.startswith("python") or any(
                    os.path.basename(m.path).startswith("libpython")
                    for m in _mapped_files(child.pid)):
                found.append(child.pid)
        except OSError:
            continue  # gone, or not ours to read
    return sorted(found)


def _effective_caps() -> int:
    try:
        return int(_read_status("self").get("CapEff", "0"), 16)
    except (OSError, ValueError):
        return 0


def has_cap_sys_ptrace() -> bool:
    """Whether this process may trace processes of other users (and non-dumpable ones)."""
    return bool(_effective_caps() >> CAP_SYS_PTRACE & 1)


def yama_ptrace_scope() -> int | None:
    """The Yama ptrace_scope, or None when the kernel has no Yama LSM."""
    try:
        with open(YAMA_SCOPE_PATH) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def _ids(status: dict[str, str], key: str) -> tuple[int, int, int]:
    # "Uid:\treal\teffective\tsaved\tfilesystem"
    real, effective, saved = (int(v) for v in status[key].split()[:3])
    return real, effective, saved


def _describe(pid: int, name: str) -> str:
    return f"process {pid} ({name})" if name else f"process {pid}"


def _no_such_process(pid: int) -> TargetError:
    return TargetError(f"no process with pid {pid}", hint=PID_HINT)


# ------------------------------------------------------------------------------------------------
# A minimal ELF reader: dynamic symbols and the bytes behind them. Enough to read `Py_Version`
# without running the target's binary, and to tell a static CPython from any other program.

_SHT_NOBITS = 8
_SHT_DYNSYM = 11
_MAX_SECTION = 256 << 20


class _NotElf(Exception):
    pass


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    addr: int
    offset: int
    size: int
    link: int


@dataclass(frozen=True)
class _Symbol:
    value: int
    size: int
    shndx: int

    @property
    def defined(self) -> bool:
        return self.shndx != 0


@final
class _Elf:
    def __init__(self, path: str) -> None:
        # Held open across calls, closed by __exit__ (or here when the header is bad).
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115
        try:
            self._parse_header()
        except (struct.error, IndexError, ValueError) as e:
            self._file.close()
            raise _NotElf(str(e)) from e
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> _Elf:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def _read(self, offset: int, size: int) -> bytes:
        if size > _MAX_SECTION:
            raise _NotElf("section too large")
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise _NotElf("truncated file")
        return data

    def _parse_header(self) -> None:
        ident = self._file.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2):
            raise _NotElf("not an ELF file")
        if ident[5] not in (1, 2):
            raise _NotElf("bad ELF data encoding")
        self.endian = "<" if ident[5] == 1 else ">"
        self.is64 = ident[4] == 2
        header = self.endian + ("HHIQQQIHHHHHH" if self.is64 else "HHIIIIIHHHHHH")
        fields = struct.unpack(header, self._read(16, struct.calcsize(header)))
        shoff, shentsize, shnum, shstrndx = fields[5], fields[10], fields[11], fields[12]
        section = self.endian + ("IIQQQQIIQQ" if self.is64 else "IIIIIIIIII")
        raw = []
        for i in range(shnum):
            raw.append(struct.unpack(section, self._read(shoff + i * shentsize,
                                                         struct.calcsize(section))))
        names = b""
        if raw and shstrndx < len(raw):
            names = self._read(raw[shstrndx][4], raw[shstrndx][5])
        self.sections = [
            _Section(
                name=names[s[0]:names.find(b"\0", s[0])].decode("ascii", "replace"),
                type=s[1], addr=s[3], offset=s[4], size=s[5], link=s[6],
            )
            for s in raw
        ]

    def section_data(self, name: str) -> bytes:
        for s in self.sections:
            if s.name == name and s.type != _SHT_NOBITS:
                return self._read(s.offset, s.size)
        return b""

    def dynamic_symbols(self, wanted: Iterable[str]) -> dict[str, _Symbol]:
        want = {w.encode() for w in wanted}
        found: dict[str, _Symbol] = {}
        for dynsym in self.sections:
            if dynsym.type != _SHT_DYNSYM or dynsym.link >= len(self.sections):
                continue
            strtab = self.sections[dynsym.link]
            names = self._read(strtab.offset, strtab.size)
            data = self._read(dynsym.offset, dynsym.size)
            for name_off, value, size, shndx in self._symbols(data):
                name = names[name_off:names.find(b"\0", name_off)]
                if name in want:
                    sym = _Symbol(value, size, shndx)
                    # Keep a definition over an undefined reference of the same name.
                    if name.decode() not in found or sym.defined:
                        found[name.decode()] = sym
        return found

    def _symbols(self, data: bytes) -> Iterator[tuple[int, int, int, int]]:
        if self.is64:
            for name, _info, _other, shndx, value, size in struct.iter_unpack(
                self.endian + "IBBHQQ", data[: len(data) // 24 * 24]
            ):
                yield name, value, size, shndx
        else:
            for name, value, size, _info, _other, shndx in struct.iter_unpack(
                self.endian + "IIIBBH", data[: len(data) // 16 * 16]
            ):
                yield name, value, size, shndx

    def symbol_bytes(self, sym: _Symbol) -> bytes | None:
        """The initial contents of a defined data symbol, or None for .bss and absolute ones."""
        if not 0 < sym.shndx < len(self.sections) or not 0 < sym.size <= 64:
            return None
        s = self.sections[sym.shndx]
        if s.type == _SHT_NOBITS or not s.addr <= sym.value < s.addr + s.size:
            return None
        return self._read(s.offset + sym.value - s.addr, sym.size)

    def int_from(self, data: bytes) -> int:
        return int.from_bytes(data, "little" if self.endian == "<" else "big")


def _py_version_symbol(elf: _Elf) -> tuple[int, int, int] | None:
    """Read `Py_Version` (PY_VERSION_HEX, exported since 3.11) from the file."""
    sym = elf.dynamic_symbols(["Py_Version"]).get("Py_Version")
    data = elf.symbol_bytes(sym) if sym is not None and sym.defined else None
    if not data:
        return None
    hexversion = elf.int_from(data)
    version = (hexversion >> 24 & 0xFF, hexversion >> 16 & 0xFF, hexversion >> 8 & 0xFF)
    return version if version[0] in (2, 3) else None


def _scan_micro(elf: _Elf, major: int, minor: int) -> int | None:
    """Find the micro version in the PY_VERSION string ("3.10.13") in .rodata.

    Before 3.11 there is no symbol holding the version, but the string is there, although the
    linker may have merged it into the tail of another string (the install prefix
    ".../versions/3.10.13"), hence no anchor at its start. Other strings of the same form are
    rare in libpython; take the commonest.
    """
    pattern = re.compile(rb"(?<![0-9.])%d\.%d\.(\d{1,3})(?:(?:a|b|rc)\d+)?\+?\x00" % (major, minor))
    counts = collections.Counter(
        int(m.group(1)) for m in pattern.finditer(elf.section_data(".rodata"))
    )
    return counts.most_common(1)[0][0] if counts else None


# ------------------------------------------------------------------------------------------------
# resolve()


@dataclass
class _Mapping:
    path: str  # as the target sees it, without " (deleted)"
    deleted: bool
    address_range: str  # "start-end", the name of the file in /proc/PID/map_files


def _strip_deleted(path: str) -> str:
    # str.removesuffix() is 3.9+; the CLI may run on 3.8.
    return path[: -len(_DELETED)] if path.endswith(_DELETED) else path  # noqa: FURB188


def _mapped_files(pid: int) -> list[_Mapping]:
    result: list[_Mapping] = []
    seen = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.rstrip("\n").split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            path = parts[5]
            deleted = path.endswith(_DELETED)
            path = _strip_deleted(path)
            if path not in seen:
                seen.add(path)
                result.append(_Mapping(path, deleted, parts[0]))
    return result


def _same_mount_ns(pid: int) -> bool:
    mine = os.stat("/proc/self/ns/mnt")
    theirs = os.stat(f"/proc/{pid}/ns/mnt")
    return (mine.st_ino, mine.st_dev) == (theirs.st_ino, theirs.st_dev)


def _ns_pid(status: dict[str, str], pid: int) -> int | None:
    # "NSpid:\t<pid in our ns>\t...\t<pid in the innermost ns>"
    values = status.get("NSpid", "").split()
    if values and values[-1].isdigit() and int(values[-1]) != pid:
        return int(values[-1])
    return None


def _access_refusal(pid: int, name: str, status: dict[str, str]) -> PermissionDenied | None:
    """Why the kernel will refuse us even a look at the target's memory map, if it will.

    These are the rules of ptrace_may_access(): without CAP_SYS_PTRACE the target's real,
    effective and saved uids and gids must all be ours, and it must be dumpable.
    """
    if has_cap_sys_ptrace():
        return None
    uids, gids = _ids(status, "Uid"), _ids(status, "Gid")
    me, my_gid = os.getuid(), os.getgid()
    owner = uids[1]
    who = _describe(pid, name)
    lacking = (
        " and lack CAP_SYS_PTRACE (containers drop it by default)" if me == 0 else ""
    )
    if len(set(uids)) > 1 and me in uids:
        return PermissionDenied(
            f"{who} runs with mixed uids (real {uids[0]}, effective {uids[1]}, saved "
            f"{uids[2]}; a setuid program), and you are {_user(me)}{lacking}: only a tracer "
            "with CAP_SYS_PTRACE may attach to it",
            hint=f"Run hunter-trace as root. {CONTAINER_HINT}",
        )
    if any(u != me for u in uids):
        return PermissionDenied(
            f"{who} belongs to {_user(owner)}, and you are {_user(me)}{lacking}",
            hint=(
                f"Run hunter-trace as that user (sudo -u {_user_name(owner)} hunter-trace ...) "
                f"or as root. {CONTAINER_HINT}"
            ),
        )
    if any(g != my_gid for g in gids):
        return PermissionDenied(
            f"{who} runs with gids real {gids[0]}, effective {gids[1]}, saved {gids[2]} "
            f"(a setgid program), and your gid is {my_gid}: only a tracer with CAP_SYS_PTRACE "
            "may attach to it",
            hint=f"Run hunter-trace as root. {CONTAINER_HINT}",
        )
    # A non-dumpable process has its /proc files handed to root; its /proc/PID directory keeps
    # the owner, so the owner of a file inside is what tells.
    try:
        dumpable = os.stat(f"/proc/{pid}/status").st_uid == owner
    except OSError:
        dumpable = True
    if not dumpable:
        return PermissionDenied(
            f"{who} is not dumpable (it called prctl(PR_SET_DUMPABLE, 0) or changed its "
            "credentials), so only a tracer with CAP_SYS_PTRACE may look at it",
            hint=f"Run hunter-trace as root. {CONTAINER_HINT}",
        )
    return None


def _run_for_version(target_root: str, exe: str) -> tuple[int, int, int] | None:
    """Ask the interpreter binary itself: the last resort, as it runs the target's program.

    Only binaries that root or we own and nobody else may write are run, so that pointing
    hunter-trace (as root) at a user's process never runs that user's code with our rights.
    """
    same_root = target_root == "/"
    path = exe if same_root else target_root + exe
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        return None
    code = "import sys; print('%d.%d.%d' % tuple(sys.version_info[:3]))"
    argv = [exe, "-E", "-S", "-c", code]
    if not same_root:
        chroot = shutil.which("chroot")
        if chroot is None or os.geteuid() != 0:
            return None
        argv = [chroot, target_root, *argv]
    try:
        out = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.fullmatch(rb"(\d+)\.(\d+)\.(\d+)\s*", out)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def _python_beside(libpython: str, version: tuple[int, int, int],
                   host_path: Callable[[str], str]) -> str | None:
    """<prefix>/bin/pythonX.Y for <prefix>/lib/libpythonX.Y.so (or <prefix>/lib/<multiarch>/),
    as the target sees it; only one that root or we own and nobody else may write, as it will
    be run (see _run_for_version)."""
    libdir = os.path.dirname(libpython)
    name = "python%d.%d" % version[:2]
    for prefix in (os.path.dirname(libdir), os.path.dirname(os.path.dirname(libdir))):
        candidate = os.path.join(prefix, "bin", name)
        try:
            st = os.stat(host_path(candidate))
        except OSError:
            continue
        if st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022 and st.st_mode & 0o111:
            return candidate
    return None


def _open_elf(*paths: str) -> _Elf | None:
    for path in paths:
        try:
            return _Elf(path)
        except (OSError, _NotElf):
            continue
    return None


@dataclass
class _Detected:
    version: tuple[int, int, int]
    libpython: str | None
    embedded: bool


def _detect_cpython(pid: int, name: str, exe: str, root: str) -> _Detected:
    """Tell whether the process runs CPython and which version, without touching the process."""

    def on_host(path: str) -> str:
        return path if root == "/" else root + path

    maps = _mapped_files(pid)
    exe_base = os.path.basename(exe)
    with contextlib.ExitStack() as stack:
        # /proc/PID/exe opens the very inode the process runs, even if replaced on disk since.
        exe_elf = _open_elf(f"/proc/{pid}/exe", on_host(exe))
        if exe_elf is not None:
            stack.enter_context(exe_elf)
        exe_syms = (
            exe_elf.dynamic_symbols(_STATIC_API + _PYTHON_MAIN) if exe_elf is not None else {}
        )
        is_python_program = exe_base.startswith("python") or any(
            s in exe_syms for s in _PYTHON_MAIN
        )
        libs = [m for m in maps if _LIBPYTHON_RE.search(m.path)]
        # Prefer a Python 3 library when a process somehow maps two.
        libs.sort(key=lambda m: "/libpython3." not in m.path)
        if libs:
            lib = libs[0]
            match = _LIBPYTHON_RE.search(lib.path)
            assert match is not None
            major, minor = int(match.group(1)), int(match.group(2))
            micro = None
            # map_files holds the mapped inode itself (root only): the way to a replaced library.
            lib_paths = [on_host(lib.path), f"/proc/{pid}/map_files/{lib.address_range}"]
            lib_elf = _open_elf(*(reversed(lib_paths) if lib.deleted else lib_paths))
            if lib_elf is not None:
                with lib_elf:
                    full = _py_version_symbol(lib_elf)
                    if full is not None and full[:2] == (major, minor):
                        micro = full[2]
                    else:
                        micro = _scan_micro(lib_elf, major, minor)
            if micro is None and is_python_program:
                ran = _run_for_version(root, exe)
                if ran is not None and ran[:2] == (major, minor):
                    micro = ran[2]
            # The micro version is informational only; major.minor decide everything.
            return _Detected((major, minor, micro or 0), lib.path, not is_python_program)

        static = exe_elf is not None and all(
            s in exe_syms and exe_syms[s].defined for s in _STATIC_API
        )
        name_match = _EXE_NAME_RE.match(exe_base)
        if static:
            assert exe_elf is not None
            full = _py_version_symbol(exe_elf)
            if full is not None:
                return _Detected(full, None, not is_python_program)
            if name_match and name_match.group(2):
                major, minor = int(name_match.group(1)), int(name_match.group(2))
                micro = _scan_micro(exe_elf, major, minor)
                if micro is not None:
                    return _Detected((major, minor, micro), None, not is_python_program)
        if static or name_match:
            ran = _run_for_version(root, exe)
            if ran is not None:
                return _Detected(ran, None, not is_python_program)
            if name_match and name_match.group(2):
                return _Detected(
                    (int(name_match.group(1)), int(name_match.group(2)), 0), None, False
                )
            raise TargetError(
                f"{_describe(pid, name)} looks like CPython ({exe}), but its version could not "
                "be read: no libpython is mapped, the binary has no Py_Version symbol and it "
                "could not be run",
                hint=f"{VERSION_HINT} Builds with --enable-shared are the easiest to inspect.",
            )

    what = f"{exe_base} ({exe})"
    if _LIBPYPY_RE.search(" ".join(m.path for m in maps)) or "pypy" in exe_base:
        raise TargetError(
            f"{_describe(pid, name)} runs PyPy ({exe}), not CPython",
            hint=f"{VERSION_HINT} PyPy is not supported.",
        )
    raise TargetError(
        f"{_describe(pid, name)} is not a CPython process: it runs {what}, and no libpython is "
        "mapped into it",
        hint=f"{VERSION_HINT} {PID_HINT}",
    )


def resolve(pid: int) -> Target:
    """Check that ``pid`` is a live CPython 3.8–3.13 process that we may inspect.

    Raises TargetError (no such process, a thread id, a zombie, not CPython, an unsupported
    version) or PermissionDenied (another user's process, a non-dumpable one).
    """
    if pid <= 0:
        raise _no_such_process(pid)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            state = proc.status()
            name = proc.name()
            ppid = proc.ppid()
        status = _read_status(pid)
    except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
        raise _no_such_process(pid) from None
    except (psutil.AccessDenied, PermissionError) as e:
        raise PermissionDenied(f"cannot read the status of process {pid}: {e}") from None

    tgid = int(status.get("Tgid", pid))
    if tgid != pid:
        raise TargetError(
            f"{pid} is a thread of {_describe(tgid, _safe_name(tgid))}, not a process",
            hint=f"Give the process id: hunter-trace -p {tgid} (all its threads are traced).",
        )
    if state in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        parent = _describe(ppid, _safe_name(ppid)) if ppid else "its parent"
        raise TargetError(
            f"{_describe(pid, name)} is a zombie: it has exited, and only its exit status is "
            "left, so there is nothing to trace",
            hint=(
                f"Its parent, {parent}, must reap it (wait() for it); the zombie goes away "
                "when the parent does that or exits."
            ),
        )

    refusal = _access_refusal(pid, name, status)
    if refusal is not None:
        raise refusal

    try:
        exe = _strip_deleted(os.readlink(f"/proc/{pid}/exe"))
        same_ns = _same_mount_ns(pid)
        root = "/" if same_ns else f"/proc/{pid}/root"
        detected = _detect_cpython(pid, name, exe, root)
    except (FileNotFoundError, ProcessLookupError):
        if psutil.pid_exists(pid) and not os.path.exists(f"/proc/{pid}/exe"):
            raise TargetError(
                f"{_describe(pid, name)} has no executable: it is a kernel thread, not CPython",
                hint=f"{VERSION_HINT} {PID_HINT}",
            ) from None
        raise TargetError(
            f"no process with pid {pid} (it exited while being inspected)", hint=PID_HINT
        ) from None
    except PermissionError as e:
        # Our uid/capability checks passed, so something else refused: an LSM (AppArmor,
        # SELinux) or a target in a user namespace we hold no capabilities in.
        raise PermissionDenied(
            f"cannot inspect {_describe(pid, name)}: {e.strerror} on {e.filename}",
            hint=(
                "Same user and CAP_SYS_PTRACE are not enough here: an LSM policy (AppArmor, "
                f"SELinux) or a user namespace is in the way. {CONTAINER_HINT}"
            ),
        ) from None

    low, high = SUPPORTED_VERSIONS
    version_text = ".".join(map(str, detected.version))
    if detected.version[:2] < low:
        raise TargetError(
            f"{_describe(pid, name)} runs CPython {version_text}, which is too old",
            hint=VERSION_HINT,
        )
    if detected.version[:2] > high:
        raise TargetError(
            f"{_describe(pid, name)} runs CPython {version_text}, which is newer than "
            "hunter-trace supports",
            hint=f"{VERSION_HINT} Look for a newer hunter-attach.",
        )
    return Target(
        pid=pid,
        exe=exe,
        version=detected.version,
        libpython=detected.libpython,
        uid=_ids(status, "Uid")[1],
        root=root,
        same_mount_ns=same_ns,
        embedded=detected.embedded,
        ns_pid=_ns_pid(status, pid),
    )


def _safe_name(pid: int) -> str:
    try:
        return str(psutil.Process(pid).name())
    except psutil.Error:
        return ""


# ------------------------------------------------------------------------------------------------
# check_ptrace()


@dataclass(frozen=True)
class PtraceFacts:
    """What decides whether gdb (a child of ours) may PTRACE_ATTACH to the target."""

    pid: int
    name: str
    scope: int | None  # Yama ptrace_scope; None without Yama
    cap_sys_ptrace: bool
    uid: int  # our real uid: what ptrace(2) compares
    gid: int
    target_uids: tuple[int, int, int]  # real, effective, saved
    target_gids: tuple[int, int, int]
    dumpable: bool
    tracer_pid: int  # who traces the target now, 0 for nobody
    our_descendant: bool  # the target is our child, grandchild...


def ptrace_facts(pid: int) -> PtraceFacts:
    status = _read_status(pid)
    uids = _ids(status, "Uid")
    try:
        dumpable = os.stat(f"/proc/{pid}/status").st_uid == uids[1]
    except OSError:
        dumpable = True
    return PtraceFacts(
        pid=pid,
        name=status.get("Name", ""),
        scope=yama_ptrace_scope(),
        cap_sys_ptrace=has_cap_sys_ptrace(),
        uid=os.getuid(),
        gid=os.getgid(),
        target_uids=uids,
        target_gids=_ids(status, "Gid"),
        dumpable=dumpable,
        tracer_pid=int(status.get("TracerPid", "0")),
        our_descendant=_is_descendant(pid, os.getpid()),
    )


def _is_descendant(pid: int, ancestor: int) -> bool:
    try:
        return any(p.pid == ancestor for p in psutil.Process(pid).parents())
    except psutil.Error:
        return False


def _scope_text(scope: int) -> str:
    meaning = YAMA_SCOPES.get(scope, "unknown")
    return f"kernel.yama.ptrace_scope is {scope} ({meaning})"


def ptrace_refusal(facts: PtraceFacts, probe_ok: bool | None = None) -> PermissionDenied | None:
    """The reason the kernel will refuse gdb's PTRACE_ATTACH, from ``facts``; None if it won't.

    ``probe_ok`` is the outcome of opening /proc/PID/mem ourselves (None when not tried): the
    kernel applies the same PTRACE_MODE_ATTACH rules to it, LSMs and Yama included.
    """
    who = _describe(facts.pid, facts.name)
    me = _user(facts.uid)
    if facts.tracer_pid:
        return PermissionDenied(
            f"{who} is already being traced by "
            f"{_describe(facts.tracer_pid, _safe_name(facts.tracer_pid))} (a debugger, strace "
            "or a profiler), and a process can have only one tracer",
            hint="Detach or stop that tool first, then run hunter-trace again.",
        )
    if facts.scope == 3:
        return PermissionDenied(
            f"{who} cannot be traced: {_scope_text(3)}",
            hint=(
                "Nothing short of a reboot lowers it. Let the service open a manhole socket "
                "and drop --gdb."
            ),
        )
    yama_fix = "sysctl kernel.yama.ptrace_scope=1 (or 0) as root"
    if facts.cap_sys_ptrace:
        return None
    lacking = f"you are {me} without CAP_SYS_PTRACE"
    if facts.scope == 2:
        return PermissionDenied(
            f"{who} cannot be traced: {_scope_text(2)}, and {lacking}",
            hint=f"Run hunter-trace as root, or {yama_fix}. {CONTAINER_HINT} {MANHOLE_HINT}",
        )
    if any(u != facts.uid for u in facts.target_uids):
        owner = facts.target_uids[1]
        return PermissionDenied(
            f"{who} belongs to {_user(owner)} (uids {'/'.join(map(str, facts.target_uids))}), "
            f"and {lacking}",
            hint=(
                f"Run hunter-trace as {_user_name(owner)} (sudo -u {_user_name(owner)} "
                f"hunter-trace ...) or as root. {CONTAINER_HINT} {MANHOLE_HINT}"
            ),
        )
    if any(g != facts.gid for g in facts.target_gids):
        return PermissionDenied(
            f"{who} runs with gids {'/'.join(map(str, facts.target_gids))} (setgid), your gid "
            f"is {facts.gid}, and {lacking}",
            hint=f"Run hunter-trace as root. {CONTAINER_HINT} {MANHOLE_HINT}",
        )
    if not facts.dumpable:
        return PermissionDenied(
            f"{who} is not dumpable (prctl(PR_SET_DUMPABLE, 0), or it changed credentials), "
            f"and {lacking}",
            hint=f"Run hunter-trace as root. {CONTAINER_HINT} {MANHOLE_HINT}",
        )
    if facts.scope == 1 and (facts.our_descendant or probe_ok is False):
        # gdb is our child, so it is never an ancestor of the target; our own probe succeeds
        # for our descendants, so it proves nothing for them.
        return PermissionDenied(
            f"{who} cannot be traced by gdb: {_scope_text(1)}, gdb is not its parent, and "
            f"{lacking}",
            hint=(
                f"Run hunter-trace with sudo, or {yama_fix.replace('1 (or 0)', '0')}, or have "
                "the target call prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY). "
                f"{CONTAINER_HINT} {MANHOLE_HINT}"
            ),
        )
    if probe_ok is False:
        scope = f"; {_scope_text(facts.scope)}" if facts.scope is not None else ""
        return PermissionDenied(
            f"the kernel refuses to let {me} trace {who}, although the uids match{scope}",
            hint=(
                "An LSM policy (AppArmor, SELinux) or a user namespace is in the way; "
                f"run hunter-trace as root. {CONTAINER_HINT} {MANHOLE_HINT}"
            ),
        )
    return None


def _probe_mem(pid: int) -> bool:
    """Open /proc/PID/mem for reading: allowed only with ptrace-attach rights. Reads nothing."""
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            return False
        raise
    return True


def check_ptrace(target: Target) -> None:
    """Check, before gdb runs, that it will be allowed to PTRACE_ATTACH to the target.

    Raises PermissionDenied with the precise reason and how to fix it, or TargetExited.
    """
    try:
        facts = ptrace_facts(target.pid)
        refusal = ptrace_refusal(facts)
        if refusal is None:
            refusal = ptrace_refusal(facts, probe_ok=_probe_mem(target.pid))
    except (FileNotFoundError, ProcessLookupError):
        raise TargetExited(f"process {target.pid} exited before gdb could attach") from None
    if refusal is not None:
        raise refusal


def check_gdb() -> str:
    """The path of gdb on PATH, or ToolMissing with how to install it."""
    path: str | None = shutil.which("gdb")
    if path is None:
        raise ToolMissing(
            "gdb was not found on PATH, and --gdb attaches through it", hint=GDB_INSTALL_HINT
        )
    return path
