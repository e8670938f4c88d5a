"""`make demo`: start the demo service, trace it with gdb for a few seconds, stop it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    target = subprocess.Popen([sys.executable, os.path.join(HERE, "demo_target.py")],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = target.stdout.readline() if target.stdout else ""
        if not line.startswith("ready"):
            print("the demo target did not start", file=sys.stderr)
            return 1
        # The demo's functions run as __main__; os.path is an alias that hunter-trace resolves.
        cmd = [sys.executable, "-m", "hunter_attach", "-p", str(target.pid), "--gdb", "-d", "3",
               "Q(module_in=['__main__', 'os.path']) & ~Q(kind='line')"]
        print("$ hunter-trace " + " ".join(shlex.quote(a) for a in cmd[3:]), file=sys.stderr,
              flush=True)
        return subprocess.call(cmd)
    finally:
        target.send_signal(signal.SIGINT)
        try:
            target.wait(5)
        except subprocess.TimeoutExpired:
            target.kill()
            target.wait()


if __name__ == "__main__":
    sys.exit(main())
