"""Attach to a real process with composed queries and get exactly the events hunter reports for
the same code: hunter runs the same scenario in its own process (its pure-Python build, the
reference semantics), our CLI traces a live target running it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess

import hunter
import pytest
from support import HERE, Target, cli_popen, interpreters, json_events, scratch_dir

PYTHONS = interpreters()
QUERIES = [
    'Q(module="workload") & ~Q(function_startswith="_")',
    "Q(module='workload', kind_in=('call', 'return'), depth_lt=3)",
    'Q(module="workload", kind="call") | Q(function="fib", kind="return")',
    'Q(module="workload") & ~Q(kind="line") & ~Q(function="fib")',
    'Q(module="workload") & From(Q(function="describe"), Q(kind="call"))',
    'Q(module="workload", function_in=["tick", "guarded", "risky"])'
    ' & Q(kind_in=["call", "exception"])',
]
# Only the main thread runs the scenario; the target's worker thread must not count.
MAIN = 'Q(threadname="MainThread")'

HUNTER_SIDE = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
import hunter
from hunter import Q, And, Or, Not, From
import workload
events = []
printer = hunter.CallPrinter(force_colors=False, repr_limit=1024)  # its try_repr cuts values
def arg(ev):
    if ev.kind == "call":
        return [[prefix + name, printer.try_repr(ev.locals.get(var))]
                for prefix, var, name in hunter.util.get_arguments(ev.code)]
    return printer.try_repr(ev.arg) if ev.kind == "return" else None
def keep(ev):
    events.append([ev.kind, ev.function, ev.lineno, ev.depth, arg(ev)])
hunter.trace(eval(sys.argv[1]), action=keep)
workload.scenario()
hunter.stop()
print(json.dumps(events))
"""


@pytest.fixture(scope="module")
def hunter_path() -> str:
    """hunter's pure-Python package alone, for interpreters other than the venv's."""
    path = scratch_dir("hunter")
    shutil.copytree(os.path.dirname(hunter.__file__), os.path.join(path, "hunter"))
    yield path
    shutil.rmtree(path)


def hunter_events(python: str, query: str, hunter_path: str) -> list:
    env = dict(os.environ, PUREPYTHONHUNTER="1", PYTHONPATH=hunter_path)
    out = subprocess.run([python, "-c", HUNTER_SIDE, "%s & (%s)" % (MAIN, query),
                          os.path.join(HERE, "apps")], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout
    return json.loads(out)


def our_events(python: str, query: str) -> list:
    with Target(python, "--manhole") as target:
        proc = cli_popen("-p", str(target.pid), "--json", "%s & (%s)" % (MAIN, query))
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert "attached" in line, line + proc.stderr.read()
            assert target.proc.stdin is not None
            target.proc.stdin.write("scenario\n")
            target.proc.stdin.flush()
            assert target._readline(20).strip() == "done"
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    return [[e["kind"], e["function"], e["lineno"], e["depth"],
             e["arg"] if e["kind"] in ("call", "return") else None] for e in json_events(out)]


def no_addresses(events: list) -> list:
    """Object addresses differ between the two processes."""
    return json.loads(re.sub(r" at 0x[0-9a-f]+", " at 0x?", json.dumps(events)))


@pytest.mark.parametrize("version", sorted(set(PYTHONS) & {"3.9", "3.11", "3.12", "3.13"}))
@pytest.mark.parametrize("query", QUERIES)
def test_same_events_as_hunter(version: str, query: str, hunter_path: str) -> None:
    python = PYTHONS[version]
    expected = hunter_events(python, query, hunter_path)
    assert expected, "the scenario should produce events for %s" % query
    assert no_addresses(our_events(python, query)) == no_addresses(expected)
