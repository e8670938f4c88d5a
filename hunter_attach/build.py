"""Find or build the C tracer for the target's Python.

The tracer is a CPython extension, so it must match the target's ABI, which need not be the CLI's.
The package ships one built for the CLI's own Python (``pip install .``); for any other version we
compile ``_tracer.c`` against the target interpreter's headers once and cache the result under
``~/.cache/hunter_attach``. When that is impossible (no compiler, no headers) the caller falls back
to the pure-Python backend and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

SOURCE = Path(__file__).with_name("_tracer.c")
_PROBE = ("import sys, sysconfig, importlib.machinery as m; print(__import__('json').dumps("
          "{'include': sysconfig.get_paths()['include'], 'suffix': m.EXTENSION_SUFFIXES[0], "
          "'version': list(sys.version_info[:3])}))")


@dataclass(frozen=True)
class Tracer:
    path: str  # the compiled module, as the CLI sees it
    digest: str  # sha256 of its bytes, so the target can tell whether it already has it


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hunter_attach"


def _source_key() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def _installed() -> Optional[Path]:
    """The tracer built by ``pip install`` for the CLI's own interpreter."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    candidate = Path(__file__).with_name("_tracer" + suffix)
    return candidate if candidate.exists() else None


def probe_interpreter(exe: str) -> dict:
    """Ask an interpreter for its include dir and extension suffix (cached per executable)."""
    st = os.stat(exe)
    key = hashlib.sha256(("%s:%s:%s" % (exe, st.st_mtime_ns, st.st_size)).encode()).hexdigest()
    memo = cache_dir() / "probes" / (key[:24] + ".json")
    try:
        return dict(json.loads(memo.read_text()))
    except (OSError, ValueError):
        pass
    out = subprocess.run([exe, "-I", "-S", "-c", _PROBE], capture_output=True, text=True,
                         timeout=20, check=True).stdout
    info = dict(json.loads(out))
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps(info))
    return info


def tracer_for(version: tuple, exe: str, log: Callable[[str], None]) -> Optional[Tracer]:
    """The tracer for a target running ``exe`` (a path the CLI can read) at ``version``.

    Returns None when no tracer can be had; ``log`` says why."""
    installed = _installed()
    same_minor = tuple(version[:2]) == sys.version_info[:2]
    if installed is not None and same_minor and exe == sys.executable:
        return Tracer(str(installed), _digest(installed))
    try:
        info = probe_interpreter(exe)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log("cannot ask %s for its headers: %s" % (exe, exc))
        if installed is not None and tuple(version[:2]) == sys.version_info[:2]:
            return Tracer(str(installed), _digest(installed))
        return None
    if installed is not None and info["suffix"] == sysconfig.get_config_var("EXT_SUFFIX"):
        return Tracer(str(installed), _digest(installed))
    target = cache_dir() / _source_key() / ("_tracer" + info["suffix"])
    if not target.exists():
        built = build(info["include"], target, log)
        if not built:
            return None
    return Tracer(str(target), _digest(target))


def build(include: str, target: Path, log: Callable[[str], None]) -> bool:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log("no C compiler to build the tracer")
        return False
    if not os.path.exists(os.path.join(include, "Python.h")):
        log("no Python headers in %s" % include)
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".%d.tmp" % os.getpid())
    cmd = [cc, "-shared", "-fPIC", "-O2", "-I", include, str(SOURCE), "-o", str(tmp), "-lpthread"]
    log("building the tracer: " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        log("tracer build failed:\n" + proc.stderr)
        tmp.unlink(missing_ok=True)
        return False
    os.replace(tmp, target)  # atomic: concurrent CLIs never load a half-written file
    return True
