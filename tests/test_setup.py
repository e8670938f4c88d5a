"""The project's venv, as `make` sets it up: its hunter-trace is ours, and hunter (the oracle the
tests compare against) is importable without having put its own hunter-trace in bin/."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)
PEERS = os.path.join(sys.prefix, "peers")  # the Makefile's PEERS, put on sys.path by conftest.py


def test_venv_hunter_trace_is_ours() -> None:
    script = os.path.join(BIN, "hunter-trace")
    if not os.path.exists(script):
        pytest.fail("%s is missing: run `make test` (it installs the project)" % script)
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # a phrase only our --help has (hunter's tool would print argparse's "usage: ... [-h]")
    assert "Inject with gdb (ptrace)" in result.stdout, result.stdout[:500]


def test_hunter_oracle_comes_from_peers() -> None:
    import hunter

    assert os.path.dirname(os.path.dirname(hunter.__file__)) == PEERS, hunter.__file__
