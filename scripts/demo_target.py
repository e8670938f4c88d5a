"""A small service to trace: a worker thread and the main thread keep calling a few functions.

Prints "ready <pid>" on stdout once it runs. Installs manhole when --manhole is given (optionally
activated by a signal: --manhole-signal USR1).
"""

from __future__ import annotations

import argparse
import json
import os.path
import sys
import threading
import time


def normalize(path: str) -> str:
    return os.path.normpath(os.path.join("/srv", path))


def handle(request: dict) -> str:
    path = normalize(request["path"])
    body = {"path": path, "size": len(path)}
    return json.dumps(body)


def work(n: int) -> int:
    total = 0
    for i in range(n):
        total += len(handle({"path": "a/../b%d" % i}))
    return total


def worker(stop: threading.Event) -> None:
    while not stop.is_set():
        work(3)
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manhole", action="store_true")
    parser.add_argument("--manhole-signal", default=None)
    parser.add_argument("--handler", default="repl", choices=["repl", "exec"])
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args()
    if args.manhole:
        import manhole

        manhole.install(activate_on=args.manhole_signal, connection_handler=args.handler,
                        daemon_connection=True)
    stop = threading.Event()
    threading.Thread(target=worker, args=(stop,), name="worker", daemon=True).start()
    print("ready %d" % os.getpid(), flush=True)
    try:
        while True:
            work(2)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        stop.set()
        sys.exit(0)


if __name__ == "__main__":
    main()
