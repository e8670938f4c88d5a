"""The contract between the text and JSON renderers and the fast pipeline (hunter_attach.fastpath).

``renderer.template(kind, code, thread, lineno, pid)`` returns
``(pre, post, tail, arg_mode, depth_mode, generation)``: the text of every event with these
fields is ``pre + D + post + A + tail``, where D is the event's depth as ``depth_mode`` says and
A its argument as ``arg_mode`` says (``renderer.format_arg(arg_mode, arg)`` is the reference; the
fast pipeline may do the same in C). JSON lines then end with
``,"ts":<repr of ts>,"pid":<pid>,"seq":<seq>}`` and a line break. ``generation`` changes when the
templates made before are stale (a thread or pid column appeared).
"""

from __future__ import annotations

from typing import Callable, Optional, TextIO

# The argument: nothing; as is (None: nothing); a call's arguments as text ("" when there are
# none); a call's arguments as a JSON list of pairs; a JSON string ('""' for None).
ARG_NONE, ARG_RAW, ARG_CALL, ARG_JSON_CALL, ARG_JSON_STR = range(5)

# The depth: nothing; hunter's indentation of depth ("   " * depth); of depth - 1 (exceptions);
# the number.
DEPTH_NONE, DEPTH_INDENT, DEPTH_INDENT_PARENT, DEPTH_NUMBER = range(4)


def depth_text(mode: int, depth: int) -> str:
    if mode == DEPTH_INDENT:
        return "   " * depth
    if mode == DEPTH_INDENT_PARENT:
        return "   " * (depth - 1)
    if mode == DEPTH_NUMBER:
        return str(depth)
    return ""


class StreamRenderer:
    """What the text and JSON renderers share: a stream, drop markers, flush and close.
    Subclasses provide ``drop_text``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._write: Callable[[str], object] = stream.write
        self._closed = False

    def drop_text(self, count: int, seq: int, pid: Optional[int] = None) -> str:
        raise NotImplementedError

    def drop(self, count: int, seq: int, pid: Optional[int] = None) -> None:
        self._write(self.drop_text(count, seq, pid))

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.stream.flush()
