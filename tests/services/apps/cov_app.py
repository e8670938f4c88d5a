"""An HTTP service run under `coverage run`: cov_app PORT. /after runs code that only runs after
the tracer detached (coverage must record it), /quit ends the process cleanly so coverage saves."""

import sys

import common


def work_view(query):
    return common.work_body(int(query.get("n", ["1"])[0]))


def probe_view(query):
    return common.probe_body()


def after_view(query):
    marker = "ran after detach"
    return marker


def quit_view(query):
    raise SystemExit(0)


if __name__ == "__main__":
    common.serve(int(sys.argv[1]), {"/work": work_view, "/probe": probe_view,
                                    "/after": after_view, "/quit": quit_view})
