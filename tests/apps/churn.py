"""A test target for long sessions. Prints "ready <pid>", then answers commands on stdin:

  nap N S GAP   call nap(S) (which sleeps S seconds) N times, sleeping GAP seconds (untraced
                time) after each; print "done"
  spawn N       start N threads that call work() three times each, all alive at once (a
                barrier), then end; print "done" once they are joined
  quit          exit 0

``--churn P`` keeps starting short-lived threads in the background, P at a time: each is
named "churn-<n>" (n counting up), calls ``work(i)`` three times and ends.
"""

import argparse
import os
import sys
import threading
import time


def work(i):
    return i * 2


def body():
    for i in range(3):
        work(i)


def nap(seconds):
    time.sleep(seconds)


def together(barrier):
    body()
    barrier.wait(30)


def churn(parallel):
    n = 0
    while True:
        batch = []
        for _ in range(parallel):
            n += 1
            t = threading.Thread(target=body, name="churn-%d" % n)
            t.start()
            batch.append(t)
        for t in batch:
            t.join()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--churn", type=int, default=0)
    args = p.parse_args()
    if args.churn:
        threading.Thread(target=churn, args=(args.churn,), name="churner", daemon=True).start()
    print("ready %d" % os.getpid(), flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["nap"]:
            count, seconds, gap = int(words[1]), float(words[2]), float(words[3])
            for _ in range(count):
                nap(seconds)
                time.sleep(gap)
            print("done", flush=True)
        elif words[:1] == ["spawn"]:
            count = int(words[1])
            barrier = threading.Barrier(count)
            spawned = [threading.Thread(target=together, args=(barrier,), name="spawned-%d" % i)
                       for i in range(count)]
            for t in spawned:
                t.start()
            for t in spawned:
                t.join()
            print("done", flush=True)
        elif words[:1] == ["quit"]:
            return


if __name__ == "__main__":
    main()
