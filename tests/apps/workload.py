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


def decorate(func):
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


class Shape:
    def __init__(self, sides):
        self.sides = sides

    @decorate
    def describe(self, prefix="shape", *extra, sep=": ", **more):
        return prefix + sep + str(self.sides)

    @property
    def even(self):
        return self.sides % 2 == 0


def _private(x):
    return x + 1


def scenario():
    """A fixed sequence of calls, for comparisons with hunter."""
    out = [Shape(n).describe("s", sep="=") for n in range(3)]
    out.append(str(Shape(4).even))
    out.append(tick(3))
    out.append(str(_private(1)))
    simple = ("x" * 3000 + "y", b"\n\x00", 1.5, None, True, -(2 ** 70), "tab\t\"q\" \u00e9")
    out.append(echo(*simple))
    out.append(echo(*simple, 1, k="v"))
    return out


def echo(text, data, number, nothing, flag, big, quoted, *rest, **named):
    return text[:5] + str(len(rest)) + data.decode() + quoted * 2 + str(named)
