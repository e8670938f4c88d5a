"""``python -m hunter_attach`` and the ``hunter-trace`` console script.

A Ctrl-C before the CLI has done anything (while Python imports click and the CLI, or click
parses the options) must be a quiet exit 130, not a KeyboardInterrupt traceback: the handler is
installed before anything else is imported, and cli.main replaces it once it takes over.
"""

import os
import signal


def _interrupted(signum: int, frame: object) -> None:
    os.write(2, b"hunter-trace: interrupted before attaching\n")
    os._exit(130)  # nothing to flush or undo yet


signal.signal(signal.SIGINT, _interrupted)


def entry() -> None:
    """The console script."""
    from .cli import main

    main(prog_name="hunter-trace")


if __name__ == "__main__":
    entry()
