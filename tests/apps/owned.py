"""A test target whose functions return objects that must never be asked anything.

Its main thread sleeps in short naps between steps (so that a pending call from gdb runs late,
after tracing started), and each step calls functions that return: an object whose every
dunder counts its calls, a tuple holding one, a generator (consumed after the return, so a
tracer that iterated it leaves it short), and plain values that queries can match. Prints
"ready <pid>"; on stdin, "status" prints one JSON line, "quit" exits.

Options: --manhole (install manhole, exec handler, activated by SIGUSR1).
"""

import json
import os
import sys
import threading
import time

USER_CALLS = []  # (method name) each time one of Hostile's methods ran
SHORT = [0]  # generators that came back with fewer items than they were made with
STEPS = [0]


class Hostile:
    def _note(name):
        def method(self, *args):
            USER_CALLS.append(name)
            return NotImplemented if name in ("__eq__", "__ne__", "__lt__") else 0
        return method

    __eq__ = _note("__eq__")
    __ne__ = _note("__ne__")
    __lt__ = _note("__lt__")
    __le__ = _note("__le__")
    __gt__ = _note("__gt__")
    __ge__ = _note("__ge__")
    __hash__ = _note("__hash__")
    __len__ = _note("__len__")
    __contains__ = _note("__contains__")
    __repr__ = lambda self: USER_CALLS.append("__repr__") or "Hostile()"  # noqa: E731

    def __iter__(self):
        USER_CALLS.append("__iter__")
        return iter(())

    def startswith(self, *args):
        USER_CALLS.append("startswith")
        return False


class HostileStr(str):
    def __eq__(self, other):
        USER_CALLS.append("str.__eq__")
        return True

    def __ne__(self, other):
        USER_CALLS.append("str.__ne__")
        return False

    __hash__ = str.__hash__


def make_hostile():
    return Hostile()


def make_tuple():
    return (5, Hostile())


def make_hostile_str():
    return HostileStr("x")


def numbers(n):
    yield from range(n)


def make_gen():
    return numbers(5)


def plain_list():
    return [42, 5]


def five():
    return 5


def with_locals(secret=1, other="x"):
    local_thing = Hostile()  # noqa: F841 (a query looks for its name)
    return secret


def step():
    make_hostile()
    make_tuple()
    make_hostile_str()
    if sum(1 for _ in make_gen()) != 5:
        SHORT[0] += 1
    plain_list()
    five()
    with_locals()
    STEPS[0] += 1


def main():
    if "--manhole" in sys.argv:
        import manhole

        manhole.install(activate_on="USR1", connection_handler="exec", redirect_stderr=False)

    def commands():
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "status":
                print(json.dumps({"user_calls": USER_CALLS, "short": SHORT[0],
                                  "steps": STEPS[0]}), flush=True)
            elif cmd == "quit":
                os._exit(0)

    threading.Thread(target=commands, name="commands", daemon=True).start()
    print("ready %d" % os.getpid(), flush=True)
    while True:
        time.sleep(0.2)
        step()


if __name__ == "__main__":
    main()
