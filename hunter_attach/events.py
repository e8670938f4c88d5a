"""Decoded events, as the CLI's renderers see them.

The agent interns code objects and threads (CODE and THREAD records); an :class:`Event` points at
those shared objects, so decoding an event is one struct unpack and two dict lookups.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass
class CodeInfo:
    """One code object of the target, sent once per session."""

    id: int
    filename: str
    module: str
    function: str  # co_name
    qualname: str
    firstlineno: int
    stdlib: bool
    # Source lines of the code object, keyed by line number (as linecache saw them in the target).
    lines: Dict[int, str] = field(default_factory=dict)
    # The definition header with its decorators, as hunter's ``fullsource`` of a call event.
    fullsource: str = ""

    def source(self, lineno: int) -> str:
        """The text of one line, with its newline, or hunter's placeholder when unknown."""
        line = self.lines.get(lineno)
        if line is None:
            return "??? NO SOURCE: not reading file {}\n".format(self.filename)
        return line


@dataclass
class ThreadInfo:
    id: int
    ident: int
    name: str
    main: bool


@dataclass
class Event:
    kind: str  # "call", "line", "return" or "exception"
    code: CodeInfo
    thread: ThreadInfo
    lineno: int
    depth: int
    ts: float  # seconds since attach (monotonic clock of the target)
    # Safe reprs made in the target. For a call: a JSON list of [name, repr] pairs, where name
    # carries hunter's "*"/"**" prefix for varargs/varkw (see ``args``). For a return: the value.
    # For an exception: the (type, value, traceback) tuple. None for lines.
    arg: Optional[str]
    seq: int  # position in the stream, counting dropped events
    pid: int
    # A return that does not match the query, sent only for --summary (protocol.FLAG_HIDDEN):
    # never shown or counted, and its seq is -1.
    hidden: bool = False

    @property
    def filename(self) -> str:
        return self.code.filename

    @property
    def module(self) -> str:
        return self.code.module

    @property
    def function(self) -> str:
        return self.code.function

    @property
    def threadname(self) -> str:
        return self.thread.name

    @property
    def threadid(self) -> Optional[int]:
        """None for the main thread, as in hunter."""
        return None if self.thread.main else self.thread.ident

    @property
    def source(self) -> str:
        return self.code.source(self.lineno)

    @property
    def args(self) -> List[Tuple[str, str]]:
        """The call's arguments as (name, safe repr) pairs; empty for other kinds."""
        if self.kind != "call" or not self.arg:
            return []
        return [(str(name), str(value)) for name, value in json.loads(self.arg)]
