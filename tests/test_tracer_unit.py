"""The C tracer's unit suite: tests/tracer_harness.py under every CPython 3.8-3.13 found here,
with the tracer compiled for that interpreter (build.tracer_for, which compiles and caches).

One harness process per interpreter runs the harness tests; tests that can hang the process
(ISOLATED) get a process of their own, so that a hang costs only that test. All the processes
start together the first time a test needs them, and each pytest item reports one harness test
on one interpreter.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
from support import interpreters

from hunter_attach import build, protocol
from hunter_attach.build import tracer_for
from hunter_attach.session import AGENT_MODULES, Drop, Session

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "tracer_harness.py")
PACKAGE_DIR = os.path.join(os.path.dirname(HERE), "hunter_attach")
HARNESS_TIMEOUT = 120  # one harness process
TEST_TIMEOUT = 10  # one harness test (faulthandler then dumps the stacks and exits)

INTERPRETERS = interpreters()
VERSIONS = sorted(INTERPRETERS, key=lambda v: tuple(map(int, v.split("."))))
TESTS: List[str] = json.loads(subprocess.run(
    [sys.executable, HARNESS, "--list"], capture_output=True, text=True, check=True).stdout)
ISOLATED = ("lossless_threads", "failed_install")

# Known tracer bugs, pinned: (harness test, versions or None for all) -> reason.
KNOWN: Dict[Tuple[str, Optional[Tuple[str, ...]]], str] = {}


def known_bug(name: str, python: str) -> Optional[str]:
    for (test, versions), reason in KNOWN.items():
        if test == name and (versions is None or python in versions):
            return reason
    return None


def fresh_tracer(path: str, exe: str, log: List[str]) -> Optional[str]:
    """``path``, unless it is older than _tracer.c, as the in-tree build (pip install -e) that
    tracer_for picks for the CLI's own Python is after an edit without reinstalling: then a
    build of the current source, in tracer_for's cache. The suite must test the source."""
    if os.path.getmtime(path) >= os.path.getmtime(build.SOURCE):
        return path
    info = build.probe_interpreter(exe)
    target = build.cache_dir() / build._source_key() / ("_tracer" + info["suffix"])
    if not target.exists() and not build.build(info["include"], target, log.append):
        return None
    return str(target)


class Run:
    """One harness process: started at once, its JSON lines read on demand."""

    def __init__(self, exe: str, only: Sequence[str] = (), skip: Sequence[str] = ()) -> None:
        self.error: Optional[str] = None
        self.results: Optional[Dict[str, Dict[str, Any]]] = None
        self.proc: Optional[subprocess.Popen[str]] = None
        self.stderr = ""
        log: List[str] = []
        version = subprocess.run([exe, "-c", "import sys; print(*sys.version_info[:3])"],
                                 capture_output=True, text=True, check=True).stdout.split()
        tracer = tracer_for(tuple(map(int, version)), exe, log.append)
        if tracer is None:
            self.error = "no tracer for %s: %s" % (exe, "; ".join(log))
            return
        path = fresh_tracer(tracer.path, exe, log)
        if path is None:
            self.error = "cannot rebuild the stale %s: %s" % (tracer.path, "; ".join(log))
            return
        cmd = [exe, HARNESS, path, PACKAGE_DIR, "--modules", ",".join(AGENT_MODULES)]
        if only:
            cmd += ["--only", ",".join(only)]
        if skip:
            cmd += ["--skip", ",".join(skip)]
        env = dict(os.environ, HA_HARNESS_TEST_TIMEOUT=str(TEST_TIMEOUT))
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=HERE, env=env)

    def collect(self) -> Dict[str, Dict[str, Any]]:
        if self.results is None:
            self.results = {}
            if self.proc is not None:
                try:
                    out, self.stderr = self.proc.communicate(timeout=HARNESS_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    out, self.stderr = self.proc.communicate()
                    self.error = "the harness timed out after %d s" % HARNESS_TIMEOUT
                for line in out.splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if "test" in record:
                        self.results[record["test"]] = record
                if self.proc.returncode != 0 and self.error is None:
                    self.error = "the harness exited with %d" % self.proc.returncode
        return self.results


_runs: Dict[Tuple[str, str], Run] = {}


@pytest.fixture(scope="module")
def runs() -> Dict[Tuple[str, str], Run]:
    if not _runs:
        for python in VERSIONS:
            exe = INTERPRETERS[python]
            _runs[(python, "")] = Run(exe, skip=ISOLATED)
            for name in ISOLATED:
                _runs[(python, name)] = Run(exe, only=[name])
    return _runs


def result(runs: Dict[Tuple[str, str], Run], python: str, name: str) -> Dict[str, Any]:
    run = runs[(python, name if name in ISOLATED else "")]
    record = run.collect().get(name)
    if record is None:
        pytest.fail("no result for %s on %s: %s\n%s" % (name, python, run.error,
                                                         run.stderr[-4000:]))
    return record


def _params() -> List[Any]:
    params = []
    for python in VERSIONS:
        for name in TESTS:
            reason = known_bug(name, python)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(python, name, marks=marks, id="%s-%s" % (python, name)))
    return params


@pytest.mark.timeout(HARNESS_TIMEOUT + 60)
@pytest.mark.parametrize("python,name", _params())
def test_tracer(runs: Dict[Tuple[str, str], Run], python: str, name: str) -> None:
    record = result(runs, python, name)
    assert record["ok"], "%s on Python %s:\n%s" % (name, python, record["error"])


@pytest.mark.timeout(HARNESS_TIMEOUT + 60)
@pytest.mark.parametrize("python", VERSIONS)
def test_drop_stream_through_session(runs: Dict[Tuple[str, str], Run], python: str) -> None:
    """The drop-mode stream the real tracer wrote, decoded by the CLI's Session: Drop items
    carry every lost event, and sequence numbers count them."""
    record = result(runs, python, "drop_mode")
    if not record["ok"]:
        pytest.skip("drop_mode failed on %s" % python)
    data = record["data"]
    session = Session(pid=os.getpid(), uid=os.getuid(), root="/", config={}, tracer=None,
                      log=lambda _msg: None)
    try:
        items = []
        for payload in data["payloads"]:
            items.extend(session._handle(protocol.RECORDS, base64.b64decode(payload)))
    finally:
        session.close()
    drops = [i for i in items if isinstance(i, Drop)]
    events = [i for i in items if not isinstance(i, Drop)]
    assert len(drops) == data["drop_records"] > 0
    assert sum(d.count for d in drops) == data["dropped"]
    assert len(events) == data["sent"]
    assert session.seq == data["seen"]
    for prev, item in zip(items, items[1:]):
        assert item.seq == prev.seq + (prev.count if isinstance(prev, Drop) else 1)
