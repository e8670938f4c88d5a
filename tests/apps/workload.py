"""The code that test targets run: small, varied, deterministic."""

import json
import os.path


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def risky(x):
    if x % 3 == 0:
        raise ValueError("bad %d" % x)
    return x


def guarded(x):
    try:
        return risky(x)
    except ValueError:
        return -1


def gen(n):
    for i in range(n):
        yield i * 2


def tick(i=0):
    path = os.path.join("/srv", "item%d" % (i % 5))
    total = fib(4) + sum(gen(3)) + guarded(i)
    return json.dumps({"path": path, "total": total})
