"""An ipykernel, driven by jupyter_client executing bounded cells (apps/kernel_driver.py runs
both in the service venv and speaks JSON lines to the test)."""

from __future__ import annotations

import json
import select
import subprocess
import tempfile
import time
from typing import Any, Dict

import pytest
from harness import APPS, REQUEST_TIMEOUT, Result, Traffic, cycles, interpreter_name, venv_python

pytestmark = [pytest.mark.services, pytest.mark.gdb, pytest.mark.timeout(600)]


class Driver:
    def __init__(self, python: str) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, "kernel_driver.py"], cwd=APPS, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log)
        self.pid = int(self.answer(120)["pid"])

    def answer(self, timeout: float = REQUEST_TIMEOUT + 10) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.log.seek(0)
            raise AssertionError("kernel driver: no answer; its log:\n%s" % self.log.read()[-3000:])
        return dict(json.loads(line))

    def ask(self, command: str) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


class CellTraffic(Traffic):
    """Cells executed by the driver, counted there."""

    def __init__(self, driver: Driver) -> None:
        super().__init__()
        self.driver = driver

    def start(self) -> CellTraffic:
        self.driver.ask("start %d" % self.limit)
        return self

    def wait_ok(self, count: int, timeout: float = 60) -> None:
        target = self.ok + count
        end = time.monotonic() + timeout
        while self.ok < target and time.monotonic() < end:
            self._take(self.driver.ask("count"))
            time.sleep(0.1)

    def stop(self) -> None:
        answer = self.driver.ask("stop")
        self._take(answer)
        assert not answer["running"], "a cell is still hanging"

    def _take(self, counts: Dict[str, Any]) -> None:
        self.ok, self.failed, self.errors = counts["ok"], counts["failed"], counts["errors"]


def test_ipykernel_executing_cells() -> None:
    python = venv_python("3.12")
    driver = Driver(python)
    try:
        result = Result("ipykernel + jupyter_client", interpreter_name(python))
        cycles(result, driver.pid, ["module=__main__", "kind=call"], "kernel_work",
               lambda: CellTraffic(driver), lambda: driver.ask("probe"), module="__main__")
    finally:
        driver.close()
