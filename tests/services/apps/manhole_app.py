"""An HTTP service that opens a manhole only when sent SIGUSR1: manhole_app PORT."""

import sys

import common
import manhole


def work_view(query):
    return common.work_body(int(query.get("n", ["1"])[0]))


def probe_view(query):
    return common.probe_body()


if __name__ == "__main__":
    manhole.install(activate_on="USR1")
    common.serve(int(sys.argv[1]), {"/work": work_view, "/probe": probe_view})
