"""Only the process we injected into, holding the one-time token, gets to be the agent."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from hunter_attach.errors import AttachTimeout, TargetExited
from hunter_attach.session import Session

CONNECT = r"""
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
hello = json.dumps({"token": sys.argv[2], "pid": 0}).encode()
s.sendall(struct.pack("<IB", len(hello), 1) + hello)
print("sent", flush=True)
data = s.recv(100)  # LOAD if accepted, EOF if rejected
print("accepted" if data else "rejected", flush=True)
"""


def impostor(path: str, token: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CONNECT, path, token], stdout=subprocess.PIPE,
                            text=True)


@pytest.fixture
def session(tmp_path) -> Session:
    # The "target" is a child that sleeps until we let an impostor speak for it.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    s = Session(child.pid, os.getuid(), "/", {"query": {"op": "true"}}, None, lambda m: None)
    yield s
    s.close()
    child.kill()
    child.wait()


def test_private_directory_and_socket(session: Session) -> None:
    mode = os.stat(session.dir).st_mode
    assert stat.S_IMODE(mode) == 0o700
    assert stat.S_ISSOCK(os.stat(os.path.join(session.dir, "s")).st_mode)
    # the bootstrap carries nothing but the path and the token
    assert session.token in session.bootstrap_code
    assert os.path.join(session.dir, "s") in session.bootstrap_code


def test_right_token_from_another_pid_is_rejected(session: Session) -> None:
    """SO_PEERCRED: a process that is not the target cannot be the agent, token or not."""
    proc = impostor(os.path.join(session.dir, "s"), session.token)
    with pytest.raises(AttachTimeout):
        session.accept(time.monotonic() + 1.5)
    out, _ = proc.communicate(timeout=10)
    assert "accepted" not in out


TARGET = r"""
import os, sys, time
flag = sys.argv[1]
while not os.path.exists(flag):
    time.sleep(0.01)
path, token, times = open(flag).read().split()
for _ in range(int(times)):
    try:
""" + "".join("        " + line + "\n" for line in CONNECT.strip().splitlines()
              if not line.startswith("import")).replace("sys.argv[1]", "path").replace(
                  "sys.argv[2]", "token") + r"""
    except OSError as exc:
        print("refused", type(exc).__name__, flush=True)
time.sleep(2)
"""


def run_target(tmp_path, token_for, times: int):
    """A process that connects `times` times to its session's socket, as the target would."""
    flag = tmp_path / "go"
    target = subprocess.Popen([sys.executable, "-c", "import json, socket, struct\n" + TARGET,
                               str(flag)], stdout=subprocess.PIPE, text=True)
    session = Session(target.pid, os.getuid(), "/", {}, None, lambda m: None)
    (tmp_path / "go.tmp").write_text("%s %s %d" % (os.path.join(session.dir, "s"),
                                                  token_for(session), times))
    os.rename(tmp_path / "go.tmp", flag)
    return target, session


def test_wrong_token_from_the_target_pid_is_rejected(tmp_path) -> None:
    target, session = run_target(tmp_path, lambda s: "0" * 32, 1)
    try:
        with pytest.raises((AttachTimeout, TargetExited)):
            session.accept(time.monotonic() + 1.5)
        out, _ = target.communicate(timeout=10)
        assert out.split() == ["sent", "rejected"]
    finally:
        session.close()
        if target.poll() is None:
            target.kill()
            target.wait()


def test_the_token_is_spent_after_one_agent(tmp_path) -> None:
    """The first authenticated agent consumes the socket: a second delivery of the bootstrap
    (gdb mode runs two mechanisms) finds nothing to connect to."""
    target, session = run_target(tmp_path, lambda s: s.token, 2)
    try:
        hello = session.accept(time.monotonic() + 5)
        assert hello["token"] == session.token
        assert not os.path.exists(os.path.join(session.dir, "s"))
        session.close()  # the first connection ends; the target then tries again
        out, _ = target.communicate(timeout=10)
        assert out.split()[:2] == ["sent", "rejected"]  # closed without a LOAD
        assert out.split()[2:] == ["refused", "FileNotFoundError"]
    finally:
        session.close()
        if target.poll() is None:
            target.kill()
            target.wait()
