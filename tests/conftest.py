"""Shared fixtures. Tests marked ``gdb`` are skipped only when a probe, run once per session,
shows that gdb cannot attach to a process of ours on this machine (no gdb, ptrace refused)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Iterator, List, Optional, Set

import pytest

# hunter, the tests' oracle, is installed in the venv's peers directory rather than site-packages
# (the Makefile's PEERS: its hunter-trace script would replace ours); appended, so it shadows
# nothing.
PEERS = os.path.join(sys.prefix, "peers")
if os.path.isdir(PEERS) and PEERS not in sys.path:
    sys.path.append(PEERS)

# Where the tests make their scratch directories (support.scratch_dir), and what was there before
# this run: whatever is new at the end and not another run's is a leftover.
SCRATCH_GLOBS = ("/tmp/ha-test-*", "/var/tmp/ha-test-*")
_before: Set[str] = set()


def _scratch_now() -> Set[str]:
    return {path for pattern in SCRATCH_GLOBS for path in glob.glob(pattern)}


def scratch_leftovers(before: Set[str]) -> List[str]:
    """New ha-test-* entries that are this run's: named with our pid, or with no pid at all
    (made without support.scratch_dir). Those named with another pid are another run's."""
    left = []
    for path in sorted(_scratch_now() - before):
        tag = re.match(r"ha-test-(\d+)-", os.path.basename(path))
        if tag is None or int(tag.group(1)) == os.getpid():
            left.append(path)
    return left


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(_scratch_now())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The session's scratch directories are removed, and nothing else of ours is left in /tmp:
    a leftover fails the run."""
    support = sys.modules.get("support")
    if support is not None:
        support.remove_scratch()
    left = scratch_leftovers(_before)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "tests left these in the temp directories: %s" % ", ".join(left)
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line("ERROR: " + message, red=True)
        else:
            print(message, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
