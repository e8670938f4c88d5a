"""Shared by the service apps: the work a request does, and what the app reports about tracing.

Runs inside the targets (any CPython 3.8+, the standard library only)."""

import json
import sys
import threading


def work(n):
    """Deterministic work behind every request: a loop, a call, a handled exception."""
    total = 0
    for i in range(n % 20 + 5):
        total += i * i
    try:
        if n % 5 == 0:
            raise ValueError(n)
    except ValueError:
        total += 1
    return total


def trace_state():
    """What a tracer could have left behind, as reprs, from the thread serving the probe:
    compared before and after tracing, so the same coverage tracer object counts as intact."""
    mon = getattr(sys, "monitoring", None)
    tools = {}
    if mon is not None:
        tools = {str(i): mon.get_tool(i) for i in range(6) if mon.get_tool(i) is not None}
    return {
        "gettrace": repr(sys.gettrace()),
        "getprofile": repr(sys.getprofile()),
        "thread_trace": repr(getattr(threading, "_trace_hook", None)),
        "thread_profile": repr(getattr(threading, "_profile_hook", None)),
        "tools": tools,
    }


def work_body(n):
    return json.dumps({"n": n, "result": work(n)})


def probe_body():
    return json.dumps(trace_state())


def serve(port, routes):
    """Serve routes ({path: view(query) -> body}) on 127.0.0.1:port, one request at a time,
    until a view raises SystemExit (a clean exit: atexit handlers such as coverage's run)."""
    import http.server
    from urllib.parse import parse_qs, urlsplit

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            view = routes.get(url.path)
            if view is None:
                self.send_error(404)
                return
            body = view(parse_qs(url.query)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    try:
        server.serve_forever()
    except SystemExit:
        pass
    finally:
        server.server_close()
