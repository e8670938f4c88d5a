"""Issue 10, items 1 and 3, on real processes: a query never runs the target's code, and the tool
never shows its own code in the stream.

The target (tests/apps/owned.py) returns objects whose every dunder counts its calls, a tuple
holding one, a str subclass with its own __eq__, and a generator that is consumed after the
return; it says how many of those methods ran and whether a generator came back short.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Dict, List

import pytest
from support import HERE, Target, cli, interpreters, json_events

PYTHONS = interpreters()
OWNED = os.path.join(HERE, "apps", "owned.py")
# One settrace and one sys.monitoring interpreter, where both exist.
VERSIONS = sorted({v for v in ("3.10", "3.12") if v in PYTHONS} or {max(PYTHONS)})

# Each of these used to ask the returned objects (__eq__, __contains__, __lt__, iteration).
ARG_QUERIES = [
    "arg=5",
    "arg_contains=42",
    "arg_in=[1,2,5]",
    "arg_lt=3",
    "arg_gte=3",
    "arg_startswith=x",
    "arg_regex=x",
    'arg="x"',
    "locals_contains=local_thing",
]


def _status(target: Target) -> Dict[str, Any]:
    return target.status()


def _trace(target: Target, *args: str) -> List[Dict[str, Any]]:
    result = cli("-p", str(target.pid), "--json", *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json_events(result.stdout)


@pytest.mark.gdb
@pytest.mark.parametrize("version,backend", [(v, "c") for v in VERSIONS]
                         + [(VERSIONS[-1], "python")])
def test_comparisons_never_call_target_methods(version: str, backend: str) -> None:
    with Target(PYTHONS[version], script=OWNED) as target:
        for query in ARG_QUERIES:
            events = _trace(target, "--gdb", "--backend", backend, "-d", "0.5",
                            "kind_in=return,call", query)
            status = _status(target)
            assert status["user_calls"] == [], (query, status)
            assert status["short"] == 0, (query, status)
            # (the generators' yields are returns with plain values: they match too)
            functions = {e["function"] for e in events} - {"numbers", "<genexpr>"}
            # plain values are still compared, and match as in hunter
            if query == "arg=5":
                assert functions == {"five"}, events
            if query == "arg_in=[1,2,5]":
                # and (5, Hostile()) is the target's own: not compared
                assert functions == {"five", "with_locals"}, events
            if query == "arg_contains=42":
                assert functions == {"plain_list"}, events
            if query == "locals_contains=local_thing":
                # only the names take part: the frame's values may be anything
                assert "with_locals" in functions, events
        assert target.alive()


INVISIBLE = ('Q(filename="<string>") | Q(module_startswith="_hunter") | '
             'Q(module_startswith="json") | Q(module="posixpath") | '
             'Q(module_startswith="manhole") | Q(function="five")')


@pytest.mark.gdb
@pytest.mark.parametrize("version,backend", [(v, "c") for v in sorted(PYTHONS)]
                         + [(v, "python") for v in VERSIONS])
def test_gdb_attach_never_shows_itself(version: str, backend: str) -> None:
    """The main thread naps in C, so gdb's pending call runs its copy of the bootstrap after our
    helper thread's copy has started tracing; the re-attaches find the agent loaded. Only the
    target's own `five` may appear (it proves the trace was on)."""
    with Target(PYTHONS[version], script=OWNED) as target:
        for attempt in range(2):
            events = _trace(target, "--gdb", "--backend", backend, "-d", "1", INVISIBLE)
            assert events, "attempt %d saw nothing at all" % attempt
            assert {e["function"] for e in events} == {"five"}, events
            assert {e["threadname"] for e in events} == {"MainThread"}, events


@pytest.mark.parametrize("version", VERSIONS)
def test_manhole_attach_never_shows_itself(version: str, tmp_path: Any) -> None:
    """manhole's connection thread runs the bootstrap and stays busy on our behalf: none of its
    code (manhole, json, the bootstrap) is shown, on the first attach or a later one."""
    from support import manhole_path

    env = {"PYTHONPATH": manhole_path()}
    with Target(PYTHONS[version], "--manhole", script=OWNED, env=env) as target:
        for attempt in range(2):
            events = _trace(target, "-s", "USR1", "-d", "1", INVISIBLE)
            assert {e["function"] for e in events} == {"five"}, (attempt, events)
        assert target.alive()
        target.proc.send_signal(signal.SIGTERM)
