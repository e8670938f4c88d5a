"""Text output: hunter 3.9's ``CallPrinter`` (``--printer call``) and ``CodePrinter``
(``--printer code``), byte for byte, colors included.

The layout is hunter's: an optional ``[pid]`` column (9 wide), an optional thread name column (12
wide), the filename right-aligned in 40 columns (longer names become ``[...]`` plus their last 35
characters), ``:lineno`` left-aligned in 5, the kind left-aligned in 9, then the body. The golden
tests in tests/test_render_text.py run real code under hunter and compare both outputs.

Differences from hunter's printers, all deliberate (also listed in docs/internals.md):

- Indentation comes from ``Event.depth`` (call, line and return events are indented by their
  depth, exception events by depth - 1, as hunter's tracer counts depth), not from a stack of the
  calls the printer has seen. hunter's stack drifts when returns are filtered out or when tracing
  starts mid-stack (hunter issue #123); ours cannot. When hunter's stack and the real depth agree
  (every call and return of the traced frames is printed, tracing starts at the top) the output is
  identical.
- The thread column appears once more than one thread of a process has been seen, as in hunter's
  ``threading_support=None`` mode, and shows the name the target reported for the event's thread
  (hunter asks ``threading.current_thread()`` at print time, which is the same thread). A name of
  12 characters or more is followed by one space; hunter glues it to the filename column.
- The ``[pid]`` column appears with ``pid_prefix``, with ``multi_process``, or once a second pid has
  been seen (hunter shows it after a fork, which is the same situation).
- Reprs are made and cut to ``repr_limit`` in the target, so the `` [...] `` marker of a cut repr is
  not colored (hunter colors it with CONT). Without colors the text is the same.
- A ``CodePrinter`` call event shows ``CodeInfo.fullsource`` (the definition header with its
  decorators) only when the event is at the code's first line; a generator resumed at a ``yield``
  shows that line. hunter tokenizes from the resume line and may show more lines when a ``def``,
  ``class`` or ``lambda`` follows the ``yield`` within ten lines of the same block.
- Builtin (``c_call``) events are not rendered: the agent does not produce them.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Set, TextIO, Tuple

from ..events import CodeInfo, Event, ThreadInfo
from .color import CALL_COLORS, CODE_COLORS, NO_COLORS, NO_EVENT_COLORS, OTHER_COLORS
from .template import (
    ARG_CALL,
    ARG_NONE,
    ARG_RAW,
    DEPTH_INDENT,
    DEPTH_INDENT_PARENT,
    DEPTH_NONE,
    StreamRenderer,
)

Template = Tuple[str, str, str, int, int, int]

_INDENTS = ["   " * i for i in range(128)]
_NO_SOURCE = "??? NO SOURCE: "
_loads = json.loads


def _indent(depth: int) -> str:
    if 0 <= depth < 128:
        return _INDENTS[depth]
    return "   " * depth  # negative depths give ""


def _kind_col(r: _TextRenderer, kind: str) -> str:
    """The colored kind column: hunter's ``{KIND}{:9} ``."""
    return r.colors["KIND"] + f"{kind:9} "


class _CodeFmt:
    """Strings that only depend on one code object (and a line of it), built once."""

    __slots__ = ("code", "fname", "locs", "lines", "blocks", "call_head", "call_mid", "call_tail",
                 "ret_head", "ret_mid", "exc_head", "exc_mid")

    def __init__(self, code: CodeInfo, r: _TextRenderer) -> None:
        c = r.colors
        e = r.event_colors
        self.code = code  # keeps the object alive, so id(code) cannot be reused by another
        filename = code.filename
        if filename == "?":
            filename = c["SOURCE-FAILURE"] + "?"
        align = r.filename_alignment
        if len(filename) > align:
            filename = "[...]" + filename[5 - align:]
        self.fname = "{:>{}}".format(filename, align)
        self.locs: Dict[int, str] = {}
        self.lines: Dict[int, Tuple[str, str]] = {}
        self.blocks: Dict[Tuple[str, int], Tuple[str, ...]] = {}
        function = code.function
        kind_color = c["KIND"]
        normal = c["NORMAL"]
        reset = c["RESET"]
        self.call_head = kind_color + "call      "
        self.call_mid = e["call"] + "=>" + normal + " " + function + "("
        self.call_tail = e["call"] + normal + ")" + reset + "\n"
        self.ret_head = kind_color + "return    "
        self.ret_mid = e["return"] + "<=" + normal + " " + function + ": " + reset
        self.exc_head = kind_color + "exception "
        self.exc_mid = e["exception"] + " !" + normal + " " + function + ": " + reset


class _TextRenderer(StreamRenderer):
    """Shared state of both printers: output columns, caches, the pid and thread prefixes."""

    event_palette: Dict[str, str] = CALL_COLORS

    def __init__(self, stream: TextIO, *, color: bool = False, pid_prefix: bool = False,
                 filename_alignment: int = 40, thread_alignment: int = 12,
                 pid_alignment: int = 9) -> None:
        super().__init__(stream)
        self.color = color
        self.colors = OTHER_COLORS if color else NO_COLORS
        self.event_colors = self.event_palette if color else NO_EVENT_COLORS
        self.filename_alignment = filename_alignment
        self.thread_alignment = thread_alignment
        self.pid_alignment = pid_alignment
        self.blank = " " * filename_alignment + "       "
        self._force_pid = pid_prefix
        self._show_pid = pid_prefix
        self._show_threads = False
        self._pids: Set[int] = set()
        self._threads: Dict[int, Set[int]] = {}
        self._codes: Dict[int, _CodeFmt] = {}
        # The prefix of the previous event, reused while the thread does not change.
        self._lthread: object = None
        self._lpid = -1
        self._lname: Optional[str] = None
        self._lead = ""
        # Bumped whenever the pid or thread column appears: leads made before are stale.
        self.generation = 0

    # -- prefixes -------------------------------------------------------------------------------

    def _pid_part(self, pid: Optional[int]) -> str:
        if not self._show_pid or pid is None:
            return ""
        return "{:{}}".format(f"[{pid}]", self.pid_alignment)

    def _update_lead(self, ev: Event) -> str:
        return self._lead_of(ev.thread, ev.pid)

    def _lead_of(self, thread: ThreadInfo, pid: int) -> str:
        """The pid and thread columns for an event of ``thread`` in ``pid`` (registering both,
        which can turn a column on: then ``generation`` changes)."""
        if thread is self._lthread and pid == self._lpid and thread.name is self._lname:
            return self._lead
        if pid not in self._pids:
            self._pids.add(pid)
            if len(self._pids) > 1 and not self._show_pid:
                self._show_pid = True
                self.generation += 1
        # Only needed until the column is on (then the set stops growing): see whether a
        # second thread shows up.
        idents = self._threads.setdefault(pid, set())
        if not self._show_threads and thread.ident not in idents:
            idents.add(thread.ident)
            if len(idents) > 1 and not self._show_threads:
                self._show_threads = True
                self.generation += 1
        lead = self._pid_part(pid)
        if self._show_threads:
            name = thread.name
            lead += "{:{}}".format(name, self.thread_alignment)
            if len(name) >= self.thread_alignment:
                lead += " "
        self._lthread = thread
        self._lpid = pid
        self._lname = thread.name
        self._lead = lead
        return lead

    def _lead_for(self, ev: Event) -> str:
        return self._lead_of(ev.thread, ev.pid)

    # -- per-code strings -----------------------------------------------------------------------

    def _fmt(self, code: CodeInfo) -> _CodeFmt:
        cf = self._codes.get(id(code))
        if cf is None or cf.code is not code:
            cf = self._codes[id(code)] = _CodeFmt(code, self)
        return cf

    def _loc(self, cf: _CodeFmt, lineno: int) -> str:
        loc = cf.locs.get(lineno)
        if loc is None:
            c = self.colors
            loc = cf.locs[lineno] = "{}{}:{}{:<5} ".format(cf.fname, c["COLON"], c["LINENO"],
                                                           lineno)
        return loc

    def _try_source(self, code: CodeInfo, text: str) -> str:
        """hunter's ``ColorStreamAction.try_source``."""
        c = self.colors
        if text.startswith(_NO_SOURCE):
            return c["SOURCE-FAILURE"] + _NO_SOURCE + c["SOURCE-DETAIL"] + text[15:]
        if text:
            return text
        return "{}{}{}Source code string for {!r} is empty.".format(
            c["SOURCE-FAILURE"], _NO_SOURCE, c["SOURCE-DETAIL"], code.filename)

    # -- Renderer -------------------------------------------------------------------------------

    def event(self, ev: Event) -> None:
        raise NotImplementedError

    def template(self, kind: str, code: CodeInfo, thread: ThreadInfo, lineno: int,
                 pid: int) -> Template:
        """For the fast path: see render/template.py. Registers the thread and pid, as
        event() does."""
        raise NotImplementedError

    def format_arg(self, mode: int, arg: Optional[str]) -> str:
        """The argument's part of an event's text, for a template's ``mode``."""
        if mode == ARG_CALL:
            return self._format_args(arg) if arg else ""
        if mode == ARG_RAW:
            return arg if arg is not None else ""
        return ""

    def _format_args(self, arg: str) -> str:
        return arg

    def drop_text(self, count: int, seq: int, pid: Optional[int] = None) -> str:
        c = self.colors
        return "{}{}hunter-trace: ... {} event{} dropped at seq {} ...{}\n".format(
            self._pid_part(pid), c["DROP"], count, "" if count == 1 else "s", seq, c["RESET"])


    def _lead_and_code(self, ev: Event) -> Tuple[str, _CodeFmt]:
        """The pid/thread prefix (reused while the thread does not change) and the code's
        cached formats."""
        thread = ev.thread
        if thread is self._lthread and ev.pid == self._lpid and thread.name is self._lname:
            lead = self._lead
        else:
            lead = self._update_lead(ev)
        code = ev.code
        cf = self._codes.get(id(code))
        if cf is None or cf.code is not code:
            cf = self._fmt(code)
        return lead, cf


class CallTextRenderer(_TextRenderer):
    """hunter's ``CallPrinter``."""

    event_palette = CALL_COLORS

    def _format_args(self, arg: str) -> str:
        try:
            pairs = _loads(arg)
            if not self.color:
                return ", ".join([f"{n}={v}" for n, v in pairs])
            c = self.colors
            vars_, vars_name, reset = c["VARS"], c["VARS-NAME"], c["RESET"]
            parts = []
            for name, value in pairs:
                name = str(name)
                if name.startswith("**"):
                    prefix, name = "**", name[2:]
                elif name.startswith("*"):
                    prefix, name = "*", name[1:]
                else:
                    prefix = ""
                parts.append(f"{vars_}{prefix}{vars_name}{name}{vars_}={reset}{value}")
            return ", ".join(parts)
        except (ValueError, TypeError, RecursionError):
            # Not the agent's JSON list of pairs: show what came rather than nothing.
            return arg

    def event(self, ev: Event) -> None:
        lead, cf = self._lead_and_code(ev)
        kind = ev.kind
        lineno = ev.lineno
        depth = ev.depth
        if kind == "line":
            pair = cf.lines.get(lineno)
            if pair is None:
                pair = self._line_pair(cf, lineno)
            self._write(lead + pair[0] + (_INDENTS[depth] if 0 <= depth < 128 else _indent(depth))
                        + pair[1])
            return
        loc = cf.locs.get(lineno)
        if loc is None:
            loc = self._loc(cf, lineno)
        arg = ev.arg
        if kind == "call":
            self._write(lead + loc + cf.call_head + _indent(depth) + cf.call_mid
                        + (self._format_args(arg) if arg else "") + cf.call_tail)
        elif kind == "return":
            self._write(lead + loc + cf.ret_head + _indent(depth) + cf.ret_mid
                        + (arg if arg is not None else "") + "\n")
        elif kind == "exception":
            self._write(lead + loc + cf.exc_head + _indent(depth - 1) + cf.exc_mid
                        + (arg if arg is not None else "") + "\n")

    def _line_pair(self, cf: _CodeFmt, lineno: int) -> Tuple[str, str]:
        code = cf.code
        pair = cf.lines[lineno] = (
            self._loc(cf, lineno) + _kind_col(self, "line") + self.colors["RESET"],
            self._try_source(code, code.source(lineno)).strip() + self.colors["RESET"] + "\n",
        )
        return pair

    def template(self, kind: str, code: CodeInfo, thread: ThreadInfo, lineno: int,
                 pid: int) -> Template:
        # The strings event() puts together, split at the indentation and the argument.
        lead = self._lead_of(thread, pid)
        cf = self._fmt(code)
        gen = self.generation
        if kind == "line":
            pair = cf.lines.get(lineno)
            if pair is None:
                pair = self._line_pair(cf, lineno)
            return lead + pair[0], pair[1], "", ARG_NONE, DEPTH_INDENT, gen
        loc = self._loc(cf, lineno)
        if kind == "call":
            return lead + loc + cf.call_head, cf.call_mid, cf.call_tail, ARG_CALL, DEPTH_INDENT, gen
        if kind == "return":
            return lead + loc + cf.ret_head, cf.ret_mid, "\n", ARG_RAW, DEPTH_INDENT, gen
        if kind == "exception":
            return lead + loc + cf.exc_head, cf.exc_mid, "\n", ARG_RAW, DEPTH_INDENT_PARENT, gen
        return "", "", "", ARG_NONE, DEPTH_NONE, gen


class CodeTextRenderer(_TextRenderer):
    """hunter's ``CodePrinter``."""

    event_palette = CODE_COLORS

    def _block(self, cf: _CodeFmt, kind: str, lineno: int) -> List[str]:
        code = cf.code
        if (kind == "call" and lineno == code.firstlineno and code.fullsource
                and code.function != "<module>"):
            text = code.fullsource
        else:
            text = code.source(lineno)
        lines = self._try_source(code, text).splitlines() or [""]
        c = self.colors
        color = self.event_colors.get(kind, "")
        reset = c["RESET"]
        out = [self._loc(cf, lineno) + _kind_col(self, kind) + color + lines[0] + reset + "\n"]
        if len(lines) > 1:
            for line in lines[1:-1]:
                out.append(self.blank + _kind_col(self, "   |") + color + line + reset + "\n")
            out.append(self.blank + _kind_col(self, "   *") + color + lines[-1] + reset + "\n")
        return out

    def event(self, ev: Event) -> None:
        lead, cf = self._lead_and_code(ev)
        kind = ev.kind
        key = (kind, ev.lineno)
        block = cf.blocks.get(key)
        if block is None:
            block = cf.blocks[key] = tuple(self._block(cf, kind, ev.lineno))
        # Only the lead (pid and thread columns) varies per event.
        if len(block) == 1:
            out = lead + block[0]
        else:
            out = "".join([lead + part for part in block])
        if kind == "return" or kind == "exception":
            c = self.colors
            arg = ev.arg
            out += "{}{}{}...       {}{} value: {}{}{}\n".format(
                lead, self.blank, c["CONT"], self.event_colors.get(kind, ""), kind, c["NORMAL"],
                arg if arg is not None else "", c["RESET"])
        self._write(out)

    def template(self, kind: str, code: CodeInfo, thread: ThreadInfo, lineno: int,
                 pid: int) -> Template:
        lead = self._lead_of(thread, pid)
        cf = self._fmt(code)
        key = (kind, lineno)
        block = cf.blocks.get(key)
        if block is None:
            block = cf.blocks[key] = tuple(self._block(cf, kind, lineno))
        out = "".join([lead + part for part in block])
        if kind == "return" or kind == "exception":
            c = self.colors
            head = "{}{}{}{}...       {}{} value: {}".format(
                out, lead, self.blank, c["CONT"], self.event_colors.get(kind, ""), kind,
                c["NORMAL"])
            return head, "", c["RESET"] + "\n", ARG_RAW, DEPTH_NONE, self.generation
        return out, "", "", ARG_NONE, DEPTH_NONE, self.generation


def text_renderer(stream: TextIO, printer: str = "call", *, color: bool = False,
                  pid_prefix: bool = False) -> _TextRenderer:
    """A text renderer for ``--printer call`` or ``--printer code``."""
    if printer == "call":
        return CallTextRenderer(stream, color=color, pid_prefix=pid_prefix)
    if printer == "code":
        return CodeTextRenderer(stream, color=color, pid_prefix=pid_prefix)
    raise ValueError(f"printer must be 'call' or 'code', not {printer!r}")
