"""WSGI servers: gunicorn's sync worker serving Flask, uWSGI (Python embedded in the uwsgi
executable) and gevent's WSGIServer in a monkey-patched process."""

from __future__ import annotations

import os

import pytest
from harness import Service, http_service, one_thread, only_child, venv_python

from hunter_attach.target import resolve

pytestmark = [pytest.mark.services, pytest.mark.gdb, pytest.mark.timeout(600)]


def test_gunicorn_sync_worker_flask() -> None:
    """Trace the worker (the master only forks and watches)."""
    python = venv_python("3.12")
    gunicorn = os.path.join(os.path.dirname(python), "gunicorn")
    http_service("gunicorn sync + Flask", python,
                 [python, gunicorn, "-w", "1", "-k", "sync", "-b", "127.0.0.1:{port}",
                  "flask_app:app"],
                 ["module=flask_app", "kind=call"], "work_view", module="flask_app",
                 target=lambda svc: only_child(svc.pid))


def test_uwsgi_embedded_interpreter() -> None:
    """The process runs the uwsgi executable with libpython linked in: no `python` anywhere."""
    python = venv_python("3.10")
    venv = os.path.dirname(os.path.dirname(python))
    uwsgi = os.path.join(venv, "bin", "uwsgi")
    http_service("uWSGI (embedded)", python,
                 [uwsgi, "--http-socket", "127.0.0.1:{port}", "--module", "wsgi_app:app",
                  "--home", venv, "--enable-threads", "--processes", "1", "--disable-logging"],
                 ["module=wsgi_app", "kind=call"], "work_view", module="wsgi_app",
                 target=embedded)


def embedded(svc: Service) -> int:
    """uwsgi is resolved as an embedded CPython whose headers come from the python beside its
    libpython (so it gets the compiled tracer: cycles() checks the CLI did not fall back)."""
    found = resolve(svc.pid)
    assert found.embedded and os.path.basename(found.exe) == "uwsgi", found
    assert found.interpreter == os.path.join(
        os.path.dirname(os.path.dirname(found.libpython or "")), "bin", "python3.10"), found
    return svc.pid


def test_gevent_wsgiserver_monkey_patched() -> None:
    python = venv_python("3.10")
    http_service("gevent WSGIServer", python, [python, "gevent_app.py", "{port}"],
                 ["module=wsgi_app", "kind=call"], "work_view", module="wsgi_app",
                 target=resolver_idle)


def resolver_idle(svc: Service) -> int:
    """gevent resolves the listening address in its thread pool, whose worker exits after some
    idle seconds: the baseline is the process without it."""
    one_thread(svc.pid)
    return svc.pid
