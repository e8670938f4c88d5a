"""An HTTP front end that hands every request to a multiprocessing pool of one worker: the
tests attach to the worker. `python -c "import pool_app; pool_app.main()" PORT`."""

import json
import multiprocessing
import os
import sys

import common


def pool_work(n):
    return common.work_body(n)


def worker_pid():
    return os.getpid()


def main():
    with multiprocessing.Pool(1) as pool:
        routes = {
            "/work": lambda q: pool.apply(pool_work, (int(q.get("n", ["1"])[0]),)),
            # the worker's own trace state, read in the worker
            "/probe": lambda q: pool.apply(common.probe_body),
            "/worker": lambda q: json.dumps(pool.apply(worker_pid)),
        }
        common.serve(int(sys.argv[1]), routes)
