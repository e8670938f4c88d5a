"""An interpreter embedded in another program (uwsgi, gdb, vim) cannot be asked for its headers
with `-c`: Target.interpreter is the pythonX.Y installed beside the libpython it maps. The live
case (a uwsgi process) is tests/services/test_svc_wsgi.py::test_uwsgi_embedded_interpreter."""

from __future__ import annotations

import os
from pathlib import Path

from hunter_attach.target import _python_beside


def _install(prefix: Path, libdir: str, mode: int) -> str:
    lib = prefix / libdir / "libpython3.10.so.1.0"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    python = prefix / "bin" / "python3.10"
    python.parent.mkdir()
    python.write_bytes(b"")
    os.chmod(python, mode)
    return str(lib)


def test_prefix_lib_layout(tmp_path: Path) -> None:
    """pyenv, python.org builds: <prefix>/lib/libpythonX.Y.so beside <prefix>/bin/pythonX.Y."""
    lib = _install(tmp_path, "lib", 0o755)
    assert _python_beside(lib, (3, 10, 13), str) == str(tmp_path / "bin" / "python3.10")


def test_multiarch_layout(tmp_path: Path) -> None:
    """Debian: /usr/lib/x86_64-linux-gnu/libpythonX.Y.so beside /usr/bin/pythonX.Y."""
    lib = _install(tmp_path, "lib/x86_64-linux-gnu", 0o755)
    assert _python_beside(lib, (3, 10, 1), str) == str(tmp_path / "bin" / "python3.10")


def test_no_python_or_one_others_may_replace(tmp_path: Path) -> None:
    """It will be run (as root, perhaps): one that others may write is not used."""
    lib = _install(tmp_path, "lib", 0o777)
    assert _python_beside(lib, (3, 10, 13), str) is None
    assert _python_beside(lib, (3, 11, 0), str) is None  # another version: not there
