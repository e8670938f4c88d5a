"""Renderers: what the CLI does with decoded events.

Every renderer has the same small interface (:class:`Renderer`); the CLI builds the ones its
options ask for with :func:`make_renderers` and feeds each of them every event, in stream order::

    renderers = make_renderers(RenderOptions(printer="call", color="auto"), sys.stdout)
    for ev in events:
        for r in renderers:
            r.event(ev)
    ...
    for r in renderers:
        r.close()

- text.py: hunter's CallPrinter / CodePrinter (``--printer call|code``), colors as hunter's.
- jsonl.py: ``--json``, one object per line (schema in ``jsonl.EVENT_SCHEMA``).
- perfetto.py: ``--perfetto FILE``, Chrome trace-event JSON, written at close.
- summary.py: ``--summary``, a ``strace -c`` like table, printed at close.

Text and JSON renderers also describe their lines as templates (template.py), which the CLI's
fast pipeline (hunter_attach.fastpath) caches and fills in, in C when it can.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Protocol, TextIO, runtime_checkable

from ..events import Event
from .color import MODES as COLOR_MODES
from .color import use_color
from .jsonl import DROP_SCHEMA, EVENT_SCHEMA, JsonRenderer
from .perfetto import PerfettoRenderer
from .summary import SummaryRenderer
from .text import CallTextRenderer, CodeTextRenderer, text_renderer

__all__ = [
    "COLOR_MODES", "DROP_SCHEMA", "EVENT_SCHEMA", "PRINTERS", "CallTextRenderer",
    "CodeTextRenderer", "JsonRenderer", "PerfettoRenderer", "RenderOptions", "Renderer",
    "SummaryRenderer", "make_renderers", "text_renderer", "use_color",
]

PRINTERS = ("call", "code")


@runtime_checkable
class Renderer(Protocol):
    def event(self, ev: Event) -> None:
        """One event, in stream order."""

    def drop(self, count: int, seq: int, pid: Optional[int] = None) -> None:
        """``count`` events were lost here (``--drop`` mode); ``seq`` is the sequence number of
        the first lost one, ``pid`` the process they came from when known."""

    def flush(self) -> None:
        """Push buffered output to the stream (the CLI calls it after each batch of records, so
        that ``| grep`` sees events promptly). A no-op for file/summary renderers."""

    def close(self) -> None:
        """Finish: flush text and JSON, write the Perfetto file, print the summary. Idempotent.
        Streams passed in are flushed, never closed."""


@dataclass(frozen=True)
class RenderOptions:
    """What the CLI's options ask for.

    - printer: ``"call"`` (hunter's CallPrinter) or ``"code"`` (CodePrinter).
    - json: JSON lines on the stream instead of text.
    - perfetto: also write a Chrome trace-event file there at close.
    - summary: also print a ``strace -c`` like table at close, to ``summary_stream``
      (default: sys.stderr at the time make_renderers runs).
    - color: ``"always"``, ``"never"`` or ``"auto"`` (the stream is a tty and NO_COLOR is unset
      or empty). Only text output is ever colored.
    - pid_prefix: always show the ``[pid]`` column; multi_process: more than one process is
      traced (shows it too). Text shows it anyway once a second pid appears.
    - quiet: nothing per event on the stream (for ``--summary`` or ``--perfetto`` alone,
      like ``strace -c``).
    """

    printer: str = "call"
    json: bool = False
    perfetto: Optional[str] = None
    summary: bool = False
    color: str = "auto"
    pid_prefix: bool = False
    multi_process: bool = False
    quiet: bool = False
    summary_stream: Optional[TextIO] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.printer not in PRINTERS:
            raise ValueError(f"printer must be one of {', '.join(PRINTERS)}, "
                             f"not {self.printer!r}")
        if self.color not in COLOR_MODES:
            raise ValueError(f"color must be one of {', '.join(COLOR_MODES)}, "
                             f"not {self.color!r}")


def make_renderers(options: RenderOptions, stream: TextIO,
                   env: Optional[Mapping[str, str]] = None) -> List[Renderer]:
    """The renderers for ``options``, per-event output going to ``stream``. ``env`` (default
    os.environ) is where NO_COLOR is looked up."""
    renderers: List[Renderer] = []
    if not options.quiet:
        if options.json:
            renderers.append(JsonRenderer(stream))
        else:
            renderers.append(text_renderer(
                stream, options.printer, color=use_color(options.color, stream, env),
                pid_prefix=options.pid_prefix or options.multi_process))
    if options.perfetto:
        renderers.append(PerfettoRenderer(options.perfetto))
    if options.summary:
        renderers.append(SummaryRenderer(options.summary_stream or sys.stderr))
    return renderers
