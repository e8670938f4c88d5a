"""A service under `coverage run`: CTracer (sys.settrace) on 3.10, sys.monitoring on 3.12.
Tracing it must not cost coverage a line: what runs after the detach is still recorded."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from harness import (
    APPS,
    HttpTraffic,
    Result,
    Service,
    cycles,
    free_port,
    http_get,
    interpreter_name,
    trace,
    venv_python,
)

pytestmark = [pytest.mark.services, pytest.mark.gdb, pytest.mark.timeout(600)]


def lines_of(function: str) -> list:
    """The body lines of a function in apps/cov_app.py (after its def line)."""
    with open(os.path.join(APPS, "cov_app.py")) as f:
        source = f.read().splitlines()
    start = source.index("def %s(query):" % function) + 1
    body = []
    for number, line in enumerate(source[start:], start + 1):
        if not line.startswith("    "):
            break
        body.append(number)
    return body


@pytest.mark.parametrize("version, core", [("3.10", "ctrace"), ("3.12", "sysmon")])
def test_coverage_run(version: str, core: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    python = venv_python(version)
    data = str(tmp_path / "coverage.data")
    port = free_port()
    base = "http://127.0.0.1:%d" % port
    result = Result("coverage run (%s)" % core, interpreter_name(python))
    with Service("coverage-" + core, [python, "-m", "coverage", "run", "cov_app.py", str(port)],
                 env={"COVERAGE_CORE": core, "COVERAGE_FILE": data}) as svc:
        svc.wait_http(base + "/probe")
        state = json.loads(http_get(base + "/probe"))
        # coverage is measuring: its tracer or its sys.monitoring tool is in place
        assert "CTracer" in state["gettrace"] if core == "ctrace" else state["tools"], state
        cycles(result, svc.pid, ["module=__main__", "kind=call"], "work_view",
               lambda: HttpTraffic(base), lambda: dict(json.loads(http_get(base + "/probe"))),
               module="__main__")
        # A query with line events takes sys.settrace on 3.10: the attach line says whose
        # tracer it sets aside until the detach (sysmon is a tool of its own: nothing is).
        run = trace(svc.pid, ["module=__main__"], bounds=("-d", "0.3"))
        assert run.returncode == 0, run.stderr
        assert ("suspends coverage.CTracer until detach" in run.stderr) == (core == "ctrace"), \
            run.stderr
        assert http_get(base + "/after") == "ran after detach"
        try:
            http_get(base + "/quit", timeout=10)
        except OSError:  # the process exits instead of answering
            pass
        assert svc.proc.wait(30) == 0, svc.output()
    report = str(tmp_path / "coverage.json")
    subprocess.run([python, "-m", "coverage", "json", "--data-file", data, "-o", report],
                   cwd=APPS, check=True, capture_output=True, timeout=60)
    with open(report) as f:
        executed = set(json.load(f)["files"]["cov_app.py"]["executed_lines"])
    assert set(lines_of("work_view")) <= executed
    assert set(lines_of("after_view")) <= executed, "lines run after the detach are missing"
