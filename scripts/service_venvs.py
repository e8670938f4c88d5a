"""Build (once) the virtualenvs that the real-service tests (tests/services) run their targets in.

    .venv/bin/python scripts/service_venvs.py [3.12 3.10 ...]

One venv per interpreter, from tests/services/requirements-<version>.txt (every package pinned),
cached under ~/.cache/hunter_attach/service-venvs/<version>-<hash> where the hash covers the
requirements and the interpreter, so a changed pin or a rebuilt interpreter gets a new venv and
an unchanged one costs nothing. `make test` runs this before pytest; the tests call ensure() too,
so `pytest tests/services` works on its own. The venvs are built in parallel; a lock file keeps
two builders of the same venv (make and a test run) from racing.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS_DIR = os.path.join(ROOT, "tests", "services")
VERSIONS = ("3.12", "3.10")
# pip builds uWSGI (no wheels on PyPI) through setup.py; with `wheel` present it builds a wheel
# and caches it, so that the next venv (a changed pin) does not compile it again.
BUILD_TOOLS = ["wheel==0.45.1"]
# uWSGI with its Python plugin only (the tests need nothing else): a third less to compile.
BUILD_ENV = {"UWSGI_PROFILE": "pyonly"}
MARKER = ".complete"
PIP_TIMEOUT = 900


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hunter_attach", "service-venvs")


def interpreter(version: str) -> str:
    """The pyenv CPython for "3.X" (a shared-libpython build, which uWSGI links against)."""
    found = sorted(glob.glob("/root/.pyenv/versions/%s.*/bin/python" % version))
    if not found:
        raise SystemExit("service_venvs: no pyenv CPython %s under /root/.pyenv/versions"
                         % version)
    return found[-1]


def requirements(version: str) -> str:
    return os.path.join(REQUIREMENTS_DIR, "requirements-%s.txt" % version)


def venv_dir(version: str) -> str:
    python = interpreter(version)
    with open(requirements(version), "rb") as f:
        key = hashlib.sha256(f.read())
    key.update(os.path.realpath(python).encode())
    key.update(str(os.stat(os.path.realpath(python)).st_mtime_ns).encode())
    key.update(repr((BUILD_TOOLS, sorted(BUILD_ENV.items()))).encode())
    return os.path.join(cache_root(), "%s-%s" % (version, key.hexdigest()[:16]))


def _run(argv: List[str], log_file: str) -> None:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **BUILD_ENV)
    env.pop("PYTHONPATH", None)
    with open(log_file, "a") as log:
        log.write("$ %s\n" % " ".join(argv))
        log.flush()
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=PIP_TIMEOUT)
    if proc.returncode != 0:
        with open(log_file) as log:
            tail = log.read()[-3000:]
        raise RuntimeError("%s failed (exit %d):\n%s" % (argv[:4], proc.returncode, tail))


def ensure(version: str) -> str:
    """The python of the venv for "3.X", built first when missing. Safe to call concurrently."""
    path = venv_dir(version)
    python = os.path.join(path, "bin", "python")
    if os.path.exists(os.path.join(path, MARKER)):
        return python
    os.makedirs(cache_root(), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other builder finishes, then we find its venv
        if os.path.exists(os.path.join(path, MARKER)):
            return python
        shutil.rmtree(path, ignore_errors=True)  # a build that died half way
        log_file = path + ".log"
        open(log_file, "w").close()
        started = time.monotonic()
        _run([interpreter(version), "-m", "venv", path], log_file)
        _run([python, "-m", "pip", "install", "-q"] + BUILD_TOOLS, log_file)
        # no .pyc for all of Django and IPython now: the services compile what they import
        _run([python, "-m", "pip", "install", "-q", "--no-compile", "-r", requirements(version)],
             log_file)
        with open(os.path.join(path, MARKER), "w") as f:
            f.write("%.1f s\n" % (time.monotonic() - started))
        print("service_venvs: built %s in %.0f s" % (path, time.monotonic() - started),
              flush=True)
    return python


def main(argv: List[str]) -> int:
    versions = argv or list(VERSIONS)
    errors: Dict[str, Optional[BaseException]] = {}

    def build(version: str) -> None:
        try:
            ensure(version)
            errors[version] = None
        except (RuntimeError, OSError, subprocess.SubprocessError, SystemExit) as exc:
            errors[version] = exc

    threads = [threading.Thread(target=build, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = {v: e for v, e in errors.items() if e is not None}
    for version, exc in failed.items():
        print("service_venvs: cannot build the %s venv: %s" % (version, exc), file=sys.stderr)
    for version in versions:
        if version not in failed:
            print("service_venvs: %s ready: %s" % (version, venv_dir(version)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
