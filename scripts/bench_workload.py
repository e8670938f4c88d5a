"""The benchmark target (scripts/bench.py starts it): a mixed pure-Python workload in a loop.

Runs on any CPython 3.8+ with the standard library only (plus manhole with ``--manhole``).

One unit of work is recursion, loops with small calls, a class, try/except that raises, a
generator, a few os.path calls, json.dumps and sorted with a key. Units run in chunks of
about ``--chunk`` seconds, each chunk on a new thread, timed with time.perf_counter; the main
thread prints one line per chunk:

    chunk <seconds> <units> <traced at start: 0|1> <traced at end: 0|1>

"traced" means that the chunk's thread has a trace or profile function, or that a sys.monitoring
tool is registered, so the bench can drop chunks that straddle an attach or a detach.
``--pause S`` runs units on the main thread with S seconds of sleep after each, and reports no
chunks (a mostly idle service, for the latency runs).
Prints ``ready <pid>`` first. Ends on SIGINT, SIGTERM, or when stdout is closed.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path
import signal
import sys
import threading
import time
from typing import Any, Dict, Iterator, List


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def add(a: int, b: int) -> int:
    return a + b


def loop(n: int) -> int:
    total = 0
    for i in range(n):
        x = i * 3
        if x % 2:
            total += x
        else:
            total -= 1
    return total


def small_calls(n: int) -> int:
    total = 0
    for i in range(n):
        total = add(total, i)
    return total


class Account:
    def __init__(self, owner: str, balance: int) -> None:
        self.owner = owner
        self.balance = balance

    def deposit(self, amount: int) -> int:
        self.balance += amount
        return self.balance

    def describe(self) -> Dict[str, Any]:
        return {"owner": self.owner, "balance": self.balance}


def risky(x: int) -> int:
    if x % 3 == 0:
        raise ValueError("bad %d" % x)
    return x


def guarded(x: int) -> int:
    try:
        return risky(x)
    except ValueError:
        return -1


def squares(n: int) -> Iterator[int]:
    for i in range(n):
        yield i * i


def paths(n: int) -> List[str]:
    out = []
    for i in range(n):
        out.append(os.path.basename(os.path.join("/srv/data", "item%d.txt" % i)))
    return out


def sort_key(account: Account) -> int:
    return -account.balance


def unit() -> int:
    """One unit of work."""
    total = fib(14)
    total += small_calls(600)
    total += loop(1000)
    accounts = [Account("user%d" % i, i * 7 % 13) for i in range(60)]
    for i, account in enumerate(accounts):
        account.deposit(i)
    total += sum(guarded(i) for i in range(300))
    total += sum(squares(200))
    total += len(paths(25))
    ranked = sorted(accounts, key=sort_key)
    total += len(json.dumps([a.describe() for a in ranked[:20]]))
    return total


def traced() -> int:
    """Is a tracer active on this thread (settrace, setprofile or sys.monitoring)?"""
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return 1
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is not None:
        # 0-5 are the tool ids anyone may take (6 and 7 are reserved)
        for tool in range(6):
            if monitoring.get_tool(tool) is not None:
                return 1
    return 0


def chunk(seconds: float, result: List[Any]) -> None:
    """Run units for about ``seconds``; append (elapsed, units, traced before, traced after)."""
    clock = time.perf_counter
    before = traced()
    units = 0
    start = clock()
    while True:
        unit()
        units += 1
        elapsed = clock() - start
        if elapsed >= seconds:
            break
    result.append((elapsed, units, before, traced()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunk", type=float, default=0.15, help="seconds of work per chunk")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="sleep this long after every unit (main thread) and report no chunks")
    parser.add_argument("--manhole", action="store_true", help="install manhole (exec handler)")
    args = parser.parse_args()
    if args.manhole:
        import manhole

        manhole.install(connection_handler="exec", daemon_connection=True,
                        redirect_stderr=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    out = sys.stdout
    out.write("ready %d\n" % os.getpid())
    out.flush()
    try:
        if args.pause:
            while True:
                unit()
                time.sleep(args.pause)
        # Each chunk runs on a new thread: tracers that only reach threads started after they
        # were installed (hunter's hunter-trace in manhole mode traces the manhole thread and
        # threading.settrace's new threads, never a running main thread) see the same work.
        while True:
            result: List[Any] = []
            worker = threading.Thread(target=chunk, args=(args.chunk, result), name="chunk")
            worker.start()
            worker.join()
            elapsed, units, before, after = result[0]
            out.write("chunk %.6f %d %d %d\n" % (elapsed, units, before, after))
            out.flush()
    except (KeyboardInterrupt, BrokenPipeError):
        pass


if __name__ == "__main__":
    main()
