"""Shared fixtures. Tests marked ``gdb`` are skipped only when a probe, run once per session,
shows that gdb cannot attach to a process of ours on this machine (no gdb, ptrace refused)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Iterator, Optional

import pytest


def _probe_gdb() -> Optional[str]:
    """None when gdb can attach to our own child; else why not."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return "gdb is not installed"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc = subprocess.run(
            [gdb, "-nx", "-q", "-batch", "-ex", f"attach {child.pid}", "-ex", "detach"],
            capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "gdb did not attach within 60 s"
    finally:
        child.kill()
        child.wait()
    out = proc.stdout + proc.stderr
    if "ptrace:" in out or "Operation not permitted" in out:
        return "ptrace is refused here: " + out.strip().splitlines()[-1]
    return None


@pytest.fixture(scope="session")
def gdb_unusable() -> Optional[str]:
    """Why gdb cannot work on this machine, or None when it can (probed once per session)."""
    return _probe_gdb()


@pytest.fixture(autouse=True)
def _requires_gdb(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("gdb") is not None:
        reason = request.getfixturevalue("gdb_unusable")
        if reason:
            pytest.skip(reason)
    yield
