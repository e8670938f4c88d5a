"""A monkey-patched greenlet web service for tests/test_greenlets.py.

    python green_service.py gevent|eventlet [--no-settrace]

Patches everything, installs a greenlet trace function of its own (a profiler would), serves
HTTP on 127.0.0.1 and prints ``ready PORT``. ``GET /work?n=N`` runs handle -> level1 -> level2,
where two requests wait for each other (so their greenlets interleave); ``GET /status``
answers with what detaching must restore. ``--no-settrace`` removes greenlet.settrace, as an
old or unusual greenlet would lack it.
"""

import sys

LIBRARY = sys.argv[1]
if LIBRARY == "gevent":
    from gevent import monkey

    monkey.patch_all()
    import gevent

    pause = gevent.sleep
else:
    import eventlet

    eventlet.monkey_patch()
    pause = eventlet.sleep

import json  # noqa: E402
import os  # noqa: E402

import greenlet  # noqa: E402

switches = [0]


def user_trace(event, args):
    switches[0] += 1


# /retrace: a second trace function goes on over whatever is there and calls it, as a profiler
# started later would do
retraced = [None, 0]


def second_trace(event, args):
    retraced[1] += 1
    if retraced[0] is not None:
        retraced[0](event, args)


if "--no-settrace" in sys.argv:
    import greenlet._greenlet  # noqa: E402

    for module in (greenlet, greenlet._greenlet):
        vars(module).pop("settrace", None)
else:
    greenlet.settrace(user_trace)

arrived = [0]


def level2(n):
    # Requests come in pairs: each waits in the hub until its partner got here too, so the
    # two greenlets are inside level2 at the same time. Bounded: a lone one goes on after 2 s.
    arrived[0] += 1
    partner = arrived[0] + arrived[0] % 2
    for _ in range(400):
        if arrived[0] >= partner:
            break
        pause(0.005)
    pause(0.01)
    return n * 2


def level1(n):
    return level2(n) + 1


def handle(n):
    return level1(n)


def tick():
    return switches[0]


def ticker():
    # started before attach: its frames are on its stack at attach, so tick() is at depth 0
    while True:
        pause(0.02)
        tick()


def status():
    monitoring = getattr(sys, "monitoring", None)
    return {
        "greenlet_trace_is_ours": greenlet.gettrace() is user_trace,
        "greenlet_trace": repr(greenlet.gettrace()),
        "switches": switches[0],
        "second_trace_is_on": greenlet.gettrace() is second_trace,
        "second_switches": retraced[1],
        "gettrace": repr(sys.gettrace()),
        "getprofile": repr(sys.getprofile()),
        "tools": [] if monitoring is None else
        [t for t in range(6) if monitoring.get_tool(t) is not None],
        "threads": len(sys._current_frames()),
        "fds": sorted(os.listdir("/proc/self/fd")),
    }


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/work":
        n = int(environ.get("QUERY_STRING", "n=1").split("=")[1])
        body = str(handle(n)).encode()
    elif path == "/retrace":
        retraced[0] = greenlet.settrace(second_trace)
        body = repr(retraced[0]).encode()
    elif path == "/status":
        body = json.dumps(status()).encode()
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b""]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def main():
    if LIBRARY == "gevent":
        gevent.spawn(ticker)
    else:
        eventlet.spawn(ticker)
    if LIBRARY == "gevent":
        from gevent.pywsgi import WSGIServer

        server = WSGIServer(("127.0.0.1", 0), app, log=None)
        server.start()
        print("ready %d" % server.server_port, flush=True)
        server.serve_forever()
    else:
        from eventlet import wsgi

        sock = eventlet.listen(("127.0.0.1", 0))
        print("ready %d" % sock.getsockname()[1], flush=True)
        wsgi.server(sock, app, log_output=False)


if __name__ == "__main__":
    main()
