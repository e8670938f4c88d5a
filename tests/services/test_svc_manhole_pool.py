"""A service that opens its manhole only on SIGUSR1 (traced with -s USR1, no gdb), and a
multiprocessing pool's worker (Debian's statically linked python3)."""

from __future__ import annotations

import json

import pytest
from harness import Service, free_port, http_get, http_service, manhole_awake, venv_python

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]


def test_manhole_activated_by_signal() -> None:
    python = venv_python("3.12")
    http_service("manhole on SIGUSR1", python, [python, "manhole_app.py", "{port}"],
                 ["module=__main__", "kind=call"], "work_view", module="__main__",
                 how=("-s", "USR1"), woke_manhole=manhole_awake)


@pytest.mark.gdb
def test_multiprocessing_pool_worker() -> None:
    """The front end hands each request to the pool's one worker, which is traced."""
    python = "/usr/bin/python3"
    port = free_port()

    def worker(svc: Service) -> int:
        return int(json.loads(http_get("http://127.0.0.1:%d/worker" % port)))

    http_service("multiprocessing pool worker", python,
                 [python, "-c", "import pool_app; pool_app.main()", "{port}"],
                 ["module=pool_app", "kind=call"], "pool_work", module="pool_app",
                 target=worker, port=port)
