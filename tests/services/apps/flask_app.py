"""Flask, served by gunicorn's sync workers in the tests."""

import common
from flask import Flask, request

app = Flask(__name__)


@app.route("/work")
def work_view():
    return common.work_body(int(request.args.get("n", "1")))


@app.route("/probe")
def probe_view():
    return common.probe_body()
