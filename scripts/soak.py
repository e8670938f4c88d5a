"""Soak test: trace a realistic multi-threaded service in attach/detach cycles for N minutes.

    .venv/bin/python scripts/soak.py [--minutes 5] [--python /path/to/python3.X] [--trace 1]

The target (this file run with --serve, by the chosen interpreter) is a small web service: an
http.server on 127.0.0.1 whose handler hands the work to a ThreadPoolExecutor, and a client
thread that sends it requests over loopback as fast as it answers and checks every response.
It also installs manhole, so both injection modes work on it.

Each cycle attaches (alternating --gdb and manhole), traces for --trace seconds with a changing
query, and detaches; then the target must be untraced. At the end the report says whether every
request was served correctly, the target's RSS, thread and descriptor counts at the start and at
the end, how many attaches failed (the goal is 0) and the median attach time. Exit status 0 when
all is well, 1 otherwise. Only loopback traffic; every wait is bounded; it stops by itself.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Queries the cycles go through: the service's own code, the stdlib pieces it runs on, filters.
QUERIES = [
    ["module=__main__"],
    ["module=http.server", "kind_in=call,return"],
    ["module=concurrent.futures.thread"],
    ["module=__main__", "function=compute", "kind=call"],
    ["module=json", "kind=call"],
    ["~stdlib", "depth_lt=6"],
    ["module=socketserver", "kind_in=call,exception"],
    ["module=__main__", "kind=line", "threadname_startswith=ThreadPoolExecutor"],
]


# ---- the target (runs with --serve, on any CPython 3.8+) ----------------------------------------

def compute(n: int) -> Dict[str, Any]:
    """Deterministic work with a few calls, a loop, an exception handled, json round trip."""
    import hashlib

    total = 0
    for i in range(n % 50 + 10):
        total += i * i
    try:
        if n % 7 == 0:
            raise ValueError(n)
    except ValueError:
        total += 1
    digest = hashlib.sha256(("item-%d" % n).encode()).hexdigest()[:16]
    return json.loads(json.dumps({"n": n, "total": total, "digest": digest}))


def serve() -> None:
    import http.client
    import http.server
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import manhole

    manhole.install(connection_handler="exec", daemon_connection=True, redirect_stderr=False)
    pool = ThreadPoolExecutor(max_workers=4)
    counts = {"ok": 0, "failed": 0}
    errors: List[str] = []
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stalls

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            n = int(self.path.rsplit("/", 1)[-1])
            # fan out to the pool: two pieces of work, joined here
            parts = [pool.submit(compute, n), pool.submit(compute, n + 1)]
            body = json.dumps([p.result(timeout=30) for p in parts]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, args=(0.2,), name="http-server",
                     daemon=True).start()

    def client() -> None:
        conn: Optional[http.client.HTTPConnection] = None
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/work/%d" % n)
                response = conn.getresponse()
                data = json.loads(response.read())
                if response.status == 200 and data == [compute(n), compute(n + 1)]:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    errors.append("request %d: status %d, %r" % (n, response.status, data))
            except Exception as exc:  # a failed request is counted, and the client goes on
                counts["failed"] += 1
                errors.append("request %d: %s: %s" % (n, type(exc).__name__, exc))
                if conn is not None:
                    conn.close()
                conn = None
            del errors[:-20]
            time.sleep(0.002)
        if conn is not None:
            conn.close()

    client_thread = threading.Thread(target=client, name="http-client", daemon=True)
    client_thread.start()
    print("ready %d" % os.getpid(), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "status":
            mon = getattr(sys, "monitoring", None)
            tools = {}
            if mon is not None:
                tools = {i: mon.get_tool(i) for i in range(6) if mon.get_tool(i) is not None}
            print(json.dumps({
                "ok": counts["ok"], "failed": counts["failed"], "errors": errors[-5:],
                "gettrace": repr(sys.gettrace()), "getprofile": repr(sys.getprofile()),
                "thread_trace": repr(getattr(threading, "_trace_hook", None)),
                "thread_profile": repr(getattr(threading, "_profile_hook", None)),
                "tools": tools, "threads": sorted(t.name for t in threading.enumerate()),
            }), flush=True)
        elif cmd == "quit":
            break
    stop.set()
    client_thread.join(30)
    server.shutdown()
    pool.shutdown(wait=True)
    print(json.dumps({"ok": counts["ok"], "failed": counts["failed"], "errors": errors[-5:]}),
          flush=True)


# ---- the driver ---------------------------------------------------------------------------------

def newest_python() -> str:
    found = []
    for path in glob.glob("/root/.pyenv/versions/3.*/bin/python"):
        version = tuple(int(x) for x in path.split("/")[-3].split(".")[:2])
        if (3, 8) <= version <= (3, 13):
            found.append((version, path))
    return max(found)[1] if found else sys.executable


def proc_counts(pid: int) -> Dict[str, int]:
    rss = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {"rss_kb": rss, "threads": len(os.listdir("/proc/%d/task" % pid)),
            "fds": len(os.listdir("/proc/%d/fd" % pid))}


class Target:
    def __init__(self, python: str, manhole_dir: str, log: str) -> None:
        env = dict(os.environ, PYTHONPATH=manhole_dir)
        # manhole logs every connection (with the line it runs) to stderr: a file, never a pipe
        # nobody reads, which would fill up and block manhole's thread after a few sessions
        self.log = open(log, "w+")
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        line = self.readline(20)
        if not line.startswith("ready"):
            self.proc.kill()
            self.proc.wait(10)
            self.log.seek(0)
            raise SystemExit("soak: the target did not start: %r %s" % (line, self.log.read()))
        self.pid = self.proc.pid

    def readline(self, timeout: float) -> str:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else ""

    def command(self, cmd: str, timeout: float = 30) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.readline(timeout)
        if not line:
            raise RuntimeError("the target did not answer %r" % cmd)
        return dict(json.loads(line))

    def stop(self) -> Dict[str, Any]:
        try:
            return self.command("quit", 60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.log.close()


def clean(status: Dict[str, Any]) -> bool:
    return (status["gettrace"] == "None" and status["getprofile"] == "None"
            and status["tools"] == {} and status["thread_trace"] == "None"
            and status["thread_profile"] == "None")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--trace", type=float, default=1.0, help="seconds traced per cycle")
    parser.add_argument("--python", default=None, help="the target's interpreter "
                        "(default: the newest CPython 3.8-3.13 under pyenv)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return 0

    import manhole

    python = args.python or newest_python()
    work = tempfile.mkdtemp(prefix="ha-soak-")
    cli_tmp = os.path.join(work, "tmp")
    os.mkdir(cli_tmp)
    manhole_dir = os.path.join(work, "pkgs")
    shutil.copytree(os.path.dirname(manhole.__file__), os.path.join(manhole_dir, "manhole"))
    env = dict(os.environ, TMPDIR=cli_tmp)
    target = Target(python, manhole_dir, os.path.join(work, "target.log"))
    failures: List[str] = []  # failed attaches (or sessions)
    problems: List[str] = []  # anything else: the target traced after detach, or dead
    attach_ms: Dict[str, List[float]] = {"gdb": [], "manhole": []}
    events: List[int] = []
    unclean = 0
    cycles = 0
    try:
        # warm up: the pool's threads exist and requests flow
        end = time.monotonic() + 30
        while target.command("status")["ok"] < 50 and time.monotonic() < end:
            time.sleep(0.1)
        first = target.command("status")
        start_counts = proc_counts(target.pid)
        print("soak: target pid %d (%s), %d threads, %d fds, RSS %.1f MB; %.1f min of %.1f s "
              "cycles" % (target.pid, python, start_counts["threads"], start_counts["fds"],
                          start_counts["rss_kb"] / 1024, args.minutes, args.trace), flush=True)
        deadline = time.monotonic() + args.minutes * 60
        while time.monotonic() < deadline:
            mode = "gdb" if cycles % 2 == 0 else "manhole"
            query = QUERIES[cycles % len(QUERIES)]
            cycles += 1
            argv = [sys.executable, "-m", "hunter_attach", "-p", str(target.pid), "--json",
                    "-d", str(args.trace)] + (["--gdb"] if mode == "gdb" else []) + query
            try:
                result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                        timeout=60)
            except subprocess.TimeoutExpired:
                failures.append("cycle %d (%s): the CLI did not finish in 60 s" % (cycles, mode))
                continue
            found = re.search(r"attached \(backend \w+, \d+ threads, (\d+) ms\)", result.stderr)
            if result.returncode != 0 or not found:
                failures.append("cycle %d (%s, %s): exit %d: %s" % (
                    cycles, mode, " ".join(query), result.returncode,
                    result.stderr.strip().splitlines()[-1:] or ""))
            else:
                attach_ms[mode].append(float(found.group(1)))
                events.append(len(result.stdout.splitlines()))
            if target.proc.poll() is not None:
                problems.append("the target died (exit %s)" % target.proc.returncode)
                break
            status = target.command("status")
            if not clean(status):
                unclean += 1
                problems.append("cycle %d (%s): still traced after detach: %s" % (
                    cycles, mode, {k: status[k] for k in ("gettrace", "getprofile", "tools")}))
            if cycles % 20 == 0:
                counts = proc_counts(target.pid)
                print("soak: %d cycles, %d requests ok, %d failed, RSS %.1f MB, %d threads, "
                      "%d fds" % (cycles, status["ok"], status["failed"],
                                  counts["rss_kb"] / 1024, counts["threads"], counts["fds"]),
                      flush=True)
        time.sleep(0.5)  # let the last agent thread finish
        last = target.command("status")
        end_counts = proc_counts(target.pid)
    finally:
        final: Dict[str, Any] = (target.stop() if target.proc.poll() is None
                                 else {"ok": 0, "failed": 0})
        leftovers = os.listdir(cli_tmp)
        shutil.rmtree(work, ignore_errors=True)

    all_ms = sorted(attach_ms["gdb"] + attach_ms["manhole"])
    failed_requests = final.get("failed", last["failed"])
    ok_requests = final.get("ok", last["ok"])

    def median(values: List[float]) -> str:
        return "%.0f ms" % statistics.median(values) if values else "-"

    print()
    print("soak report: %d cycles in %.1f min (%d gdb, %d manhole), target %s" % (
        cycles, args.minutes, (cycles + 1) // 2, cycles // 2, python))
    print("  requests:          %d ok, %d failed%s" % (
        ok_requests, failed_requests, "" if not final.get("errors") else
        " (last: %s)" % final["errors"][-1]))
    print("  failed attaches:   %d" % len(failures))
    print("  median attach:     %s (gdb %s, manhole %s), slowest %s" % (
        median(all_ms), median(attach_ms["gdb"]), median(attach_ms["manhole"]),
        "%.0f ms" % all_ms[-1] if all_ms else "-"))
    print("  events per cycle:  median %s" % (statistics.median(events) if events else "-"))
    print("  traced after detach: %d cycles" % unclean)
    print("  target at start:   RSS %.1f MB, %d threads, %d fds" % (
        start_counts["rss_kb"] / 1024, start_counts["threads"], start_counts["fds"]))
    print("  target at end:     RSS %.1f MB, %d threads, %d fds" % (
        end_counts["rss_kb"] / 1024, end_counts["threads"], end_counts["fds"]))
    print("  left in TMPDIR:    %s" % (", ".join(leftovers) or "nothing"))
    for failure in (failures + problems)[:10]:
        print("  ! " + failure)
    good = (not failures and not problems and failed_requests == 0 and ok_requests > first["ok"]
            and end_counts["threads"] == start_counts["threads"]
            and end_counts["fds"] == start_counts["fds"] and not leftovers
            and last["threads"] == first["threads"])
    print("soak: %s" % ("OK" if good else "FAILED"))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
