"""A plain WSGI app, served by uWSGI and by gevent's WSGIServer in the tests."""

from urllib.parse import parse_qs

import common


def work_view(query):
    return common.work_body(int(query.get("n", ["1"])[0]))


def probe_view(query):
    return common.probe_body()


ROUTES = {"/work": work_view, "/probe": probe_view}


def app(environ, start_response):
    view = ROUTES.get(environ.get("PATH_INFO", ""))
    if view is None:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    body = view(parse_qs(environ.get("QUERY_STRING", ""))).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
