"""ANSI colors of hunter's printers, without colorama.

hunter 3.9 builds its palettes (``hunter.util.OTHER_COLORS``, ``CALL_COLORS``, ``CODE_COLORS``)
from colorama's ``Style``/``Fore``/``Back``; on a POSIX terminal colorama passes the codes through
unchanged, so the same escape strings reproduce hunter's output byte for byte.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, TextIO

CSI = "\033["

BRIGHT = CSI + "1m"
DIM = CSI + "2m"
NORMAL = CSI + "22m"
RESET_ALL = CSI + "0m"

FORE_BLACK = CSI + "30m"
FORE_RED = CSI + "31m"
FORE_GREEN = CSI + "32m"
FORE_YELLOW = CSI + "33m"
FORE_BLUE = CSI + "34m"
FORE_MAGENTA = CSI + "35m"
FORE_CYAN = CSI + "36m"
FORE_WHITE = CSI + "37m"
FORE_RESET = CSI + "39m"

BACK_RED = CSI + "41m"
BACK_YELLOW = CSI + "43m"

# The subset of hunter.util.OTHER_COLORS that the printers use, plus DROP (ours).
OTHER_COLORS: Dict[str, str] = {
    "COLON": BRIGHT + FORE_BLACK,
    "LINENO": RESET_ALL,
    "KIND": FORE_CYAN,
    "CONT": BRIGHT + FORE_BLACK,
    "VARS": BRIGHT + FORE_MAGENTA,
    "VARS-NAME": NORMAL + FORE_MAGENTA,
    "INTERNAL-FAILURE": BRIGHT + BACK_RED + FORE_RED,
    "INTERNAL-DETAIL": FORE_WHITE,
    "SOURCE-FAILURE": BRIGHT + BACK_YELLOW + FORE_YELLOW,
    "SOURCE-DETAIL": FORE_WHITE,
    "BUILTIN": NORMAL + FORE_MAGENTA,
    "RESET": RESET_ALL,
    "NORMAL": NORMAL,
    "DROP": BRIGHT + FORE_YELLOW,
}

CALL_COLORS: Dict[str, str] = {
    "call": BRIGHT + FORE_BLUE,
    "line": FORE_RESET,
    "return": BRIGHT + FORE_GREEN,
    "exception": BRIGHT + FORE_RED,
}

CODE_COLORS: Dict[str, str] = {
    "call": FORE_RESET + BRIGHT,
    "line": FORE_RESET,
    "return": FORE_YELLOW,
    "exception": FORE_RED,
}

NO_COLORS: Dict[str, str] = dict.fromkeys(OTHER_COLORS, "")
NO_EVENT_COLORS: Dict[str, str] = dict.fromkeys(CALL_COLORS, "")

MODES = ("always", "never", "auto")


def use_color(mode: str, stream: Optional[TextIO],
              env: Optional[Mapping[str, str]] = None) -> bool:
    """Resolve ``--color``. NO_COLOR (https://no-color.org, any non-empty value) only overrides
    ``auto``: an explicit ``always`` is the user's latest word."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    if mode != "auto":
        raise ValueError(f"color mode must be one of {', '.join(MODES)}, not {mode!r}")
    if env is None:
        env = os.environ
    if env.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    if isatty is None:
        return False
    try:
        return bool(isatty())
    except (ValueError, OSError):  # closed or detached stream
        return False
