"""A test target. Prints "ready <pid>" once it runs, then answers commands on stdin:

  status   one JSON line: trace/profile functions, monitoring tools, threads, fds
  pool     run workload.tick() 4 times in a new concurrent.futures pool, print "done"
  scenario run workload.scenario() once, print "done"
  quit     exit 0
Options: --manhole [--signal USR1] [--handler exec|repl], --threads N (busy workers),
--idle (workers sleep between ticks; default), --busy (workers never sleep).
"""

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402


def status():
    tools = {}
    mon = getattr(sys, "monitoring", None)
    if mon is not None and "--hog-monitoring" in sys.argv:
        mon = None
    if mon is not None:
        tools = {i: mon.get_tool(i) for i in range(6) if mon.get_tool(i) is not None}
    threads = [t.name for t in threading.enumerate()]
    return {
        "gettrace": repr(sys.gettrace()),
        "getprofile": repr(sys.getprofile()),
        "thread_trace": repr(threading._trace_hook),
        "thread_profile": repr(threading._profile_hook),
        "tools": tools,
        "threads": sorted(threads),
        "native_threads": len(os.listdir("/proc/self/task")),
        "fds": fds(),
        "modules": sorted(m for m in sys.modules if m.startswith("_hunter")),
    }


def fds():
    """Open descriptors and what they point at (without the one listing them)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[name] = os.readlink("/proc/self/fd/" + name)
        except OSError:  # the directory handle used by listdir, closed by now
            pass
    return found


def worker(busy):
    i = 0
    while True:
        workload.tick(i)
        i += 1
        if not busy:
            time.sleep(0.01)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--manhole", action="store_true")
    p.add_argument("--signal", default=None)
    p.add_argument("--handler", default="repl")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--busy", action="store_true")
    p.add_argument("--hog-monitoring", action="store_true",
                   help="take every sys.monitoring tool id (3.12+), as if other tools did")
    args = p.parse_args()
    if args.hog_monitoring:
        for tool in range(6):
            if sys.monitoring.get_tool(tool) is None:
                sys.monitoring.use_tool_id(tool, "someone-else")
    if args.manhole:
        import manhole

        manhole.install(activate_on=args.signal, connection_handler=args.handler,
                        daemon_connection=True, redirect_stderr=False)
    for n in range(args.threads):
        threading.Thread(target=worker, args=(args.busy,), name="worker-%d" % n,
                         daemon=True).start()
    print("ready %d" % os.getpid(), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "status":
            # the main thread calls into workload too, so a query can see it
            workload.tick(0)
            print(json.dumps(status()), flush=True)
        elif cmd == "pool":
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                list(pool.map(workload.tick, range(4)))
            print("done", flush=True)
        elif cmd == "scenario":
            workload.scenario()
            print("done", flush=True)
        elif cmd == "quit":
            return


if __name__ == "__main__":
    main()
