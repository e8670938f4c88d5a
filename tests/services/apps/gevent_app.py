"""wsgi_app under gevent's WSGIServer, the whole process monkey-patched: gevent_app PORT."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import wsgi_app  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

if __name__ == "__main__":
    WSGIServer(("127.0.0.1", int(sys.argv[1])), wsgi_app.app, log=None).serve_forever()
