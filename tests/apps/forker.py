"""A target that forks or execs on command. Prints "ready <pid>", then answers on stdin:

  status              one JSON line, as tests/apps/service.py
  fork PATH SECONDS   os.fork() from the main thread. The parent prints "forked <child pid>" and
                      goes on. The child runs child_work() (a function only the child calls) in a
                      loop for SECONDS, and every 0.1 s atomically rewrites PATH with a JSON report
                      of its own state: sys.gettrace()/getprofile(), threading's hooks,
                      sys.monitoring tools, its descriptors, and for each socket descriptor the
                      address of its peer (the agent's socket is connected to the CLI's
                      .../hunter-attach-*/s). The last report has "final": true; then os._exit(0).
  exec sleep          os.execv into `sleep 30` (same pid, no Python any more)
  exec python         os.execv into this interpreter running `time.sleep(30)`
  quit                exit 0
Options: --threads N (idle workers, as service.py), --busy, --manhole [--handler exec|repl].
"""

import argparse
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import service  # noqa: E402
import workload  # noqa: E402


def child_work(i):
    return workload.tick(i)


def socket_peers():
    """fd -> the peer address of each socket descriptor (or an error text)."""
    peers = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + name)
        except OSError:
            continue
        if not target.startswith("socket:"):
            continue
        try:
            s = socket.socket(fileno=os.dup(int(name)))
        except OSError as exc:
            peers[name] = "error: %s" % exc
            continue
        try:
            peer = s.getpeername()
            peers[name] = peer.decode() if isinstance(peer, bytes) else str(peer)
        except OSError as exc:
            peers[name] = "error: %s" % exc
        finally:
            s.close()
    return peers


def child_report(path, ticks, final):
    report = service.status()
    report.update(pid=os.getpid(), ppid=os.getppid(), ticks=ticks, final=final,
                  socket_peers=socket_peers())
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, path)


def child(path, seconds):
    try:
        end = time.monotonic() + seconds
        ticks = 0
        next_report = 0.0
        while time.monotonic() < end:
            child_work(ticks)
            ticks += 1
            if time.monotonic() >= next_report:
                child_report(path, ticks, False)
                next_report = time.monotonic() + 0.1
            time.sleep(0.001)
        child_report(path, ticks, True)
    finally:
        os._exit(0)


def reap():
    """Collect forked children that have exited (no zombies left behind)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--busy", action="store_true")
    p.add_argument("--manhole", action="store_true")
    p.add_argument("--handler", default="exec")
    args = p.parse_args()
    if args.manhole:
        import manhole

        # patch_fork=False: a forked child does not open a manhole of its own
        manhole.install(connection_handler=args.handler, daemon_connection=True,
                        redirect_stderr=False, patch_fork=False)
    for n in range(args.threads):
        threading.Thread(target=service.worker, args=(args.busy,), name="worker-%d" % n,
                         daemon=True).start()
    print("ready %d" % os.getpid(), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "status":
            reap()
            workload.tick(0)
            print(json.dumps(service.status()), flush=True)
        elif cmd[0] == "fork":
            pid = os.fork()
            if pid == 0:
                child(cmd[1], float(cmd[2]))
            print("forked %d" % pid, flush=True)
        elif cmd[0] == "exec":
            sys.stdout.flush()
            if cmd[1] == "sleep":
                os.execv("/bin/sleep", ["sleep", "30"])
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)"])
        elif cmd[0] == "quit":
            return


if __name__ == "__main__":
    main()
