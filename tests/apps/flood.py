"""A flood target: N threads (default 4) call tiny functions as fast as they can.

Prints "ready <pid>" once every worker runs, then answers commands on stdin:

  status   one JSON line: service.status() (the main thread's view: trace/profile functions,
           monitoring tools, threads, fds) plus "workers": per worker thread, how many loop
           iterations it has done, what sys.gettrace()/sys.getprofile() return *on that thread*,
           and when (time.monotonic(), comparable across processes) it last recorded that
  quit     exit 0
Options: --manhole [--signal USR1] [--handler exec|repl], --threads N.
"""

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service  # noqa: E402

# worker name -> [iterations, repr(gettrace), repr(getprofile), monotonic time of the record]
progress = {}


def tiny(x):
    return x + 1


def pair(x):
    return tiny(x) * 2


def worker(name):
    record = progress[name]
    n = 0
    while True:
        pair(n)
        n += 1
        if not n & 63:
            # Each thread reports its own trace state: sys.gettrace() is per thread on every
            # version (on 3.12+ the sys.monitoring tools in "tools" are process-wide).
            record[0] = n
            record[1] = repr(sys.gettrace())
            record[2] = repr(sys.getprofile())
            record[3] = time.monotonic()


def status():
    result = service.status()
    result["workers"] = {name: {"count": r[0], "gettrace": r[1], "getprofile": r[2], "at": r[3]}
                         for name, r in sorted(progress.items())}
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--manhole", action="store_true")
    p.add_argument("--signal", default=None)
    p.add_argument("--handler", default="repl")
    p.add_argument("--threads", type=int, default=4)
    args = p.parse_args()
    if args.manhole:
        import manhole

        manhole.install(activate_on=args.signal, connection_handler=args.handler,
                        daemon_connection=True, redirect_stderr=False)
    for n in range(args.threads):
        name = "flood-%d" % n
        progress[name] = [0, "?", "?", 0.0]
        threading.Thread(target=worker, args=(name,), name=name, daemon=True).start()
    while any(r[0] == 0 for r in progress.values()):
        time.sleep(0.001)
    print("ready %d" % os.getpid(), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "status":
            print(json.dumps(status()), flush=True)
        elif cmd == "quit":
            return


if __name__ == "__main__":
    main()
