"""``--json``: one JSON object per line per event, for jq and scripts.

An event line has every key of :data:`EVENT_SCHEMA`, always (null when it does not apply)::

    {"kind":"call","filename":"/app/x.py","function":"f","qualname":"C.f","module":"x",
     "lineno":12,"source":"    def f(self, a):","depth":3,"threadid":null,
     "threadname":"MainThread","arg":[["self","<x.C object at 0x7f...>"],["a","1"]],
     "ts":0.0123,"pid":4242,"seq":17}

- ``arg`` depends on ``kind``: for ``call`` a list of ``[name, repr]`` pairs in the order of the
  signature (a list rather than an object to keep that order; ``name`` carries hunter's ``*`` or
  ``**`` prefix for varargs and varkw); for ``return`` the repr of the value; for ``exception``
  the repr of the ``(type, value, traceback)`` tuple; null for ``line``. Reprs are hunter's
  ``safe_repr``, made and cut to ``--repr-limit`` in the target.
- ``source`` is the event's source line without its line break (or hunter's
  ``??? NO SOURCE: ...`` text); ``threadid`` is null for the main thread, as in hunter.
- ``ts`` is seconds since attach (float); ``seq`` the event's position in the stream, counting
  dropped events, so a gap in ``seq`` is where events were lost.

Where events were dropped (``--drop`` mode) a line of :data:`DROP_SCHEMA` is written instead:
``{"kind":"drop","count":123,"seq":4560}`` (plus ``"pid"`` when known).
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any, Dict, Optional, TextIO, Tuple

from ..events import CodeInfo, Event, ThreadInfo
from .template import ARG_JSON_CALL, ARG_JSON_STR, ARG_NONE, DEPTH_NUMBER, StreamRenderer

_REPR_PAIR: Dict[str, Any] = {
    "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "string"},
}

EVENT_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["kind", "filename", "function", "qualname", "module", "lineno", "source",
                 "depth", "threadid", "threadname", "arg", "ts", "pid", "seq"],
    "properties": {
        "kind": {"enum": ["call", "line", "return", "exception"]},
        "filename": {"type": "string"},
        "function": {"type": "string"},
        "qualname": {"type": "string"},
        "module": {"type": "string"},
        "lineno": {"type": "integer", "minimum": 0},
        "source": {"type": "string"},
        "depth": {"type": "integer"},
        "threadid": {"type": ["integer", "null"]},
        "threadname": {"type": "string"},
        "arg": {"type": ["array", "string", "null"], "items": _REPR_PAIR},
        "ts": {"type": "number"},
        "pid": {"type": "integer", "minimum": 0},
        "seq": {"type": "integer", "minimum": 0},
    },
    "allOf": [
        {"if": {"properties": {"kind": {"const": "call"}}},
         "then": {"properties": {"arg": {"type": "array"}}}},
        {"if": {"properties": {"kind": {"enum": ["return", "exception"]}}},
         "then": {"properties": {"arg": {"type": "string"}}}},
        {"if": {"properties": {"kind": {"const": "line"}}},
         "then": {"properties": {"arg": {"type": "null"}}}},
    ],
}

DROP_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["kind", "count", "seq"],
    "properties": {
        "kind": {"const": "drop"},
        "count": {"type": "integer", "minimum": 1},
        "seq": {"type": "integer", "minimum": 0},
        "pid": {"type": "integer", "minimum": 0},
    },
}

_dumps = json.dumps
_loads = json.loads
# The C string encoder behind json.dumps(str), without the JSONEncoder machinery around it.
_str = encode_basestring_ascii
_KIND_HEAD = {kind: f'{{"kind":"{kind}",' for kind in ("call", "line", "return", "exception")}


# Thread fragments kept at most, for when thread ends are not reported.
MAX_THREADS = 4096


class JsonRenderer(StreamRenderer):
    """Writes :data:`EVENT_SCHEMA` lines. The per-code and per-thread parts of a line are
    serialized once and concatenated, which is several times faster than ``json.dumps`` of a
    dict per event."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        # id(code) -> (code, {lineno: fragment}); the reference keeps the id from being reused.
        self._codes: Dict[int, Tuple[CodeInfo, Dict[int, str]]] = {}
        self._threads: Dict[int, Tuple[ThreadInfo, str, str]] = {}

    def _code_line(self, code: CodeInfo, lineno: int) -> str:
        entry = self._codes.get(id(code))
        if entry is None or entry[0] is not code:
            entry = self._codes[id(code)] = (code, {})
        frag = entry[1].get(lineno)
        if frag is None:
            source = code.source(lineno)
            if source.endswith("\n"):
                source = source[:-1]
            frag = entry[1][lineno] = (
                f'"filename":{_dumps(code.filename)},"function":{_dumps(code.function)},'
                f'"qualname":{_dumps(code.qualname)},"module":{_dumps(code.module)},'
                f'"lineno":{lineno:d},"source":{_dumps(source)},"depth":')
        return frag

    def forget_thread(self, thread: ThreadInfo, pid: int) -> None:
        """The thread ended: its fragment is not needed again."""
        entry = self._threads.get(id(thread))
        if entry is not None and entry[0] is thread:
            del self._threads[id(thread)]

    def _thread(self, thread: ThreadInfo) -> str:
        entry = self._threads.get(id(thread))
        if entry is None or entry[0] is not thread or entry[1] is not thread.name:
            threadid = "null" if thread.main else str(int(thread.ident))
            frag = f',"threadid":{threadid},"threadname":{_dumps(thread.name)},"arg":'
            if len(self._threads) >= MAX_THREADS:  # ends not reported (plain pipeline)
                self._threads.clear()
            entry = self._threads[id(thread)] = (thread, thread.name, frag)
        return entry[2]

    @staticmethod
    def _call_arg(arg: Optional[str]) -> str:
        if not arg:
            return "[]"
        try:
            # Parsed and re-encoded rather than passed through: one malformed text from the
            # target must not make the whole output unparsable.
            return "[" + ",".join(["[" + _str(str(name)) + "," + _str(str(value)) + "]"
                                   for name, value in _loads(arg)]) + "]"
        except (ValueError, TypeError, RecursionError):
            # Keep the schema (a list of pairs) even when the agent sent something else.
            return '[["?",' + _str(arg) + "]]"

    def template(self, kind: str, code: CodeInfo, thread: ThreadInfo, lineno: int,
                 pid: int) -> Tuple[str, str, str, int, int, int]:
        """For the fast path: see render/template.py (the generation never changes)."""
        pre = _KIND_HEAD[kind] + self._code_line(code, lineno)
        post = self._thread(thread)
        if kind == "line":
            return pre, post + "null", "", ARG_NONE, DEPTH_NUMBER, 0
        return pre, post, "", ARG_JSON_CALL if kind == "call" else ARG_JSON_STR, DEPTH_NUMBER, 0

    def format_arg(self, mode: int, arg: Optional[str]) -> str:
        if mode == ARG_JSON_CALL:
            return self._call_arg(arg)
        if mode == ARG_JSON_STR:
            return '""' if arg is None else _str(arg)
        return ""

    def event(self, ev: Event) -> None:
        kind = ev.kind
        arg = ev.arg
        if kind == "line":
            arg_text = "null"
        elif kind == "call":
            arg_text = self._call_arg(arg)
        else:
            arg_text = '""' if arg is None else _str(arg)
        code = ev.code
        lineno = ev.lineno
        entry = self._codes.get(id(code))
        frag = entry[1].get(lineno) if entry is not None and entry[0] is code else None
        if frag is None:
            frag = self._code_line(code, lineno)
        thread = ev.thread
        tentry = self._threads.get(id(thread))
        if tentry is not None and tentry[0] is thread and tentry[1] is thread.name:
            tfrag = tentry[2]
        else:
            tfrag = self._thread(thread)
        self._write(f'{_KIND_HEAD[kind]}{frag}{ev.depth}{tfrag}{arg_text},'
                    f'"ts":{float(ev.ts)!r},"pid":{ev.pid},"seq":{ev.seq}}}\n')

    def drop_text(self, count: int, seq: int, pid: Optional[int] = None) -> str:
        obj: Dict[str, Any] = {"kind": "drop", "count": count, "seq": seq}
        if pid is not None:
            obj["pid"] = pid
        return _dumps(obj, separators=(",", ":")) + "\n"

