"""uvicorn serving a starlette app, and Django's development server."""

from __future__ import annotations

import pytest
from harness import HttpTraffic, Service, free_port, http_service, only_child, trace, venv_python

pytestmark = [pytest.mark.services, pytest.mark.gdb, pytest.mark.timeout(600)]


def test_uvicorn_starlette() -> None:
    python = venv_python("3.12")
    http_service("uvicorn + starlette", python,
                 [python, "-m", "uvicorn", "asgi_app:app", "--host", "127.0.0.1", "--port",
                  "{port}", "--no-access-log"],
                 ["module=asgi_app", "kind=call"], "work_view", module="asgi_app")


def test_django_runserver() -> None:
    """--noreload: the process started is the one serving (a thread per request)."""
    python = venv_python("3.12")
    http_service("Django runserver", python,
                 [python, "-m", "django", "runserver", "--settings", "django_app", "--noreload",
                  "127.0.0.1:{port}"],
                 ["module=django_app", "kind=call"], "work_view", module="django_app")


def test_django_autoreloader_points_at_its_child() -> None:
    """With the autoreloader, the process started only watches files: its child serves. Traced,
    the parent shows nothing, and the CLI says that the work may be in that child."""
    python = venv_python("3.12")
    port = free_port()
    base = "http://127.0.0.1:%d" % port
    with Service("Django autoreload", [python, "-m", "django", "runserver", "--settings",
                                       "django_app", "127.0.0.1:%d" % port]) as svc:
        svc.wait_http(base + "/probe")
        child = only_child(svc.pid)
        traffic = HttpTraffic(base, limit=400).start()
        try:
            parent = trace(svc.pid, ["module=django_app", "kind=call"], bounds=("-d", "1"))
            assert parent.returncode == 0, parent.stderr
            assert parent.events == []
            assert ("no event matched in process %d, which has Python child processes: %d"
                    % (svc.pid, child)) in parent.stderr, parent.stderr
            served = trace(child, ["module=django_app", "kind=call"], bounds=("-d", "1"))
            assert served.returncode == 0, served.stderr
            assert "work_view" in {e["function"] for e in served.events}
            assert "child processes" not in served.stderr
        finally:
            traffic.stop()
        assert traffic.failed == 0, traffic.errors
