"""Starts an ipykernel and drives it with jupyter_client (run by the service venv's python).

Prints {"pid": KERNEL_PID} once the kernel answers, then reads commands on stdin, one JSON line
of answer each:
  start N  execute `kernel_work(i)` cells in a background thread, at most N of them
  count    how many cells ran so far: {"ok": .., "failed": .., "errors": [...]}
  stop     stop executing cells; answer the counts
  probe    the kernel's trace state (common.trace_state() run as a cell)
  quit     shut the kernel down and exit
"""

import json
import os
import sys
import threading

from jupyter_client.manager import KernelManager

CELL_TIMEOUT = 30
SETUP = """
import sys
sys.path.insert(0, %r)
import common

def kernel_work(n):
    return common.work(n)
""" % os.path.dirname(os.path.abspath(__file__))


def execute(client, code):
    """Run a cell; (status, stdout text)."""
    out = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = client.execute_interactive(code, timeout=CELL_TIMEOUT, output_hook=hook)
    return reply["content"]["status"], "".join(out)


def main():
    km = KernelManager(kernel_name="python3")
    km.start_kernel(stdout=sys.stderr, stderr=sys.stderr)
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        status, _ = execute(client, SETUP)
        assert status == "ok", status
        print(json.dumps({"pid": km.provisioner.process.pid}), flush=True)
        counts = {"ok": 0, "failed": 0, "errors": []}
        stopping = threading.Event()
        runner = None

        def run(limit):
            for i in range(limit):
                if stopping.is_set():
                    break
                try:
                    status, out = execute(client, "print(kernel_work(%d))" % i)
                    good = status == "ok" and out.strip().isdigit()
                except Exception as exc:  # a timeout or a dead channel: a failed request
                    good, out = False, repr(exc)
                counts["ok" if good else "failed"] += 1
                if not good and len(counts["errors"]) < 5:
                    counts["errors"].append(out[-500:])

        for line in sys.stdin:
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "start":
                counts.update(ok=0, failed=0, errors=[])
                stopping.clear()
                runner = threading.Thread(target=run, args=(int(cmd[1]),), daemon=True)
                runner.start()
                answer = {"started": True}
            elif cmd[0] == "count":
                answer = dict(counts)
            elif cmd[0] == "stop":
                stopping.set()
                if runner is not None:
                    runner.join(CELL_TIMEOUT + 5)
                answer = dict(counts, running=runner is not None and runner.is_alive())
            elif cmd[0] == "probe":
                status, out = execute(client, "print(common.probe_body())")
                answer = json.loads(out) if status == "ok" else {"error": status}
            elif cmd[0] == "quit":
                break
            else:
                answer = {"error": "unknown command %r" % cmd[0]}
            print(json.dumps(answer), flush=True)
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
