"""The CLI's fast pipeline: a RECORDS payload in, its rendered text out in a few big writes.

The plain pipeline (Session._decode, then every renderer's ``event()``) builds an :class:`Event`
per event and writes a line at a time. Here a *sink* takes a whole RECORDS payload and returns a
:class:`Batch`: the text of every event and drop marker of the frame in a few big strings,
counts, and (only when some renderer needs them, i.e. perfetto or summary) the Event and Drop
objects.

The text of an event depends on its record only through (kind, thread, code, lineno), its depth
and, for events with an argument, that argument (JSON adds ts and seq). The text and JSON
renderers say so with ``template()`` (render/template.py): ``pre + depth + post + argument +
tail``. The sink caches templates per key (the record's first 16 bytes), so the renderer's
Python code runs once per distinct key and an event costs a lookup and a few copies.
The renderers stay the single source of the formats: the templates are their own strings, and
tests check that both sinks and the plain pipeline write the same bytes. When a renderer turns
on its thread or pid column its ``generation`` changes and the cached templates are dropped.

Two sinks with the same behaviour: :class:`CSink` drives ``hunter_attach._speedups`` (built by
setup.py for the CLI's interpreter), :class:`PySink` is the pure-Python fallback for when the
extension is missing. ``HUNTER_ATTACH_FASTPATH=0`` turns the fast pipeline off (the plain one
runs), ``=py`` forces PySink.

Errors are those of the plain pipeline, at the same record: Batch.error holds the exception
(FrameError, KeyError for an unknown id, or what metadata decoding raised) and the batch holds
what came before it.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import protocol
from .events import CodeInfo, Event, ThreadInfo
from .render.jsonl import JsonRenderer
from .render.template import (
    ARG_JSON_STR,
    ARG_NONE,
    ARG_RAW,
    DEPTH_INDENT,
    DEPTH_INDENT_PARENT,
    DEPTH_NONE,
    DEPTH_NUMBER,
    depth_text,
)
from .render.text import CallTextRenderer, CodeTextRenderer

try:
    from . import _speedups  # type: ignore[attr-defined]
except ImportError:  # not built (no compiler at install time): PySink does the same, slower
    _speedups = None  # type: ignore[assignment]

FAST_TYPES = (CallTextRenderer, CodeTextRenderer, JsonRenderer)
MODE_NONE, MODE_TEXT, MODE_JSON = 0, 1, 2
# Templates kept at most; past that the cache starts over (a pathological variety of depths or
# threads must not grow memory without bound).
MAX_TEMPLATES = 1 << 16
# Ended threads whose templates are swept from the cache together (one pass over the cache).
SWEEP_AFTER = 64


class Batch:
    """What one RECORDS payload gave.

    - chunks: the text of the rendered events and drop markers, strings to write to the fast
      renderer's stream in order (None when there is no fast renderer or nothing to write);
    - events: events decoded (rendered or not), rendered: events rendered (the first ``limit``),
      dropped: the sum of the DROP counts;
    - items: Event and Drop objects for the other renderers (None when there are none);
    - error: the exception that stopped decoding (what came before it is in the batch).
    """

    __slots__ = ("chunks", "events", "rendered", "dropped", "items", "error")

    def __init__(self, chunks: Optional[List[str]], events: int, rendered: int, dropped: int,
                 items: Optional[List[Any]], error: Optional[BaseException]) -> None:
        self.chunks = chunks
        self.events = events
        self.rendered = rendered
        self.dropped = dropped
        self.items = items
        self.error = error


class Sink:
    """Shared by both sinks: which renderer is fast, the others, the counters, emit()."""

    def __init__(self, session: Any, renderers: List[Any]) -> None:
        from .session import Drop, ThreadEnd

        self.session = session
        self.pid: int = session.pid
        self.codes: Dict[int, CodeInfo] = session.codes
        self.threads: Dict[int, ThreadInfo] = session.threads
        fast = [r for r in renderers if type(r) in FAST_TYPES]
        self.renderer: Any = fast[0] if fast else None
        self.slow: List[Any] = [r for r in renderers if r is not self.renderer]
        self.mode = (MODE_NONE if self.renderer is None
                     else MODE_JSON if isinstance(self.renderer, JsonRenderer) else MODE_TEXT)
        self.drop_cls = Drop
        self.end_cls = ThreadEnd
        self.wants_items = bool(self.slow)

    # The sequence number of the next event (Session keeps its ``seq`` in step), and the number
    # of events that may still be rendered (-1: no limit). Events past the limit are decoded
    # (sequence numbers, metadata and errors count) but neither rendered nor returned.
    seq: int
    limit: int

    def meta(self, rtype: int, body: bytes) -> Any:
        """A record the sink does not decode itself. CODE or THREAD: registered with the
        session; True when it redefines an id (cached templates may show the old one).
        THREAD_END (body: the thread id): the session and the stream renderer forget the
        thread; the ThreadEnd for the other renderers' items, or None. A hidden EVENT (body:
        its 28 bytes): the Event for the other renderers' items (only asked for when there
        are such renderers)."""
        if rtype == _REC_THREAD_END:
            thread = self.session.forget_thread(_I.unpack(body)[0])
            if thread is None:
                return None
            forget = getattr(self.renderer, "forget_thread", None)
            if forget is not None:
                forget(thread, self.pid)
            return self.end_cls(thread, self.pid) if self.wants_items else None
        if rtype == _REC_EVENT:
            return self.session.hidden_event(body)
        return bool(self.session._register(rtype, protocol.decode_json(body)))

    def template(self, kind: str, code: CodeInfo, thread: ThreadInfo, lineno: int
                 ) -> Tuple[str, str, str, int, int, int]:
        return self.renderer.template(kind, code, thread, lineno, self.pid)  # type: ignore

    def format_arg(self, mode: int, arg: str) -> str:
        return str(self.renderer.format_arg(mode, arg))

    def drop_text(self, count: int, seq: int) -> str:
        return str(self.renderer.drop_text(count, seq))

    def feed(self, payload: bytes) -> Batch:
        raise NotImplementedError

    def emit(self, batch: Batch) -> None:
        """Write the batch's text (a few big writes), then feed the other renderers."""
        if batch.chunks:
            write = self.renderer._write
            for chunk in batch.chunks:
                write(chunk)
        if batch.items:
            drop_cls = self.drop_cls
            end_cls = self.end_cls
            for r in self.slow:
                event = r.event
                forget = getattr(r, "forget_thread", None)
                for item in batch.items:
                    if type(item) is drop_cls:
                        r.drop(item.count, item.seq)
                    elif type(item) is end_cls:
                        if forget is not None:
                            forget(item.thread, item.pid)
                    else:
                        event(item)


class CSink(Sink):
    """The sink of the C extension (``hunter_attach._speedups.Decoder``)."""

    def __init__(self, session: Any, renderers: List[Any]) -> None:
        super().__init__(session, renderers)
        assert _speedups is not None
        colors = None
        r = self.renderer
        if isinstance(r, CallTextRenderer) and r.color:
            c = r.colors
            colors = (c["VARS"], c["VARS-NAME"], c["RESET"])
        self._dec = _speedups.Decoder(
            self.codes, self.threads, self.pid, self.mode,
            self.template if r is not None else None,
            self.format_arg if r is not None else None,
            self.drop_text if r is not None else None,
            self.meta, Event if self.slow else None, self.drop_cls, colors,
            protocol.FrameError, MAX_TEMPLATES)

    @property  # type: ignore[override]
    def seq(self) -> int:
        return int(self._dec.seq)

    @seq.setter
    def seq(self, value: int) -> None:
        self._dec.seq = value

    @property  # type: ignore[override]
    def limit(self) -> int:
        return int(self._dec.limit)

    @limit.setter
    def limit(self, value: int) -> None:
        self._dec.limit = value

    def feed(self, payload: bytes) -> Batch:
        return Batch(*self._dec.feed(payload))


_Q = struct.Struct("<Q")
_I = struct.Struct("<I")
_II = struct.Struct("<II")
_KINDS = protocol.KINDS
_REC_EVENT, _REC_CODE, _REC_THREAD, _REC_DROP = (protocol.REC_EVENT, protocol.REC_CODE,
                                                 protocol.REC_THREAD, protocol.REC_DROP)
_REC_THREAD_END = protocol.REC_THREAD_END
_FrameError = protocol.FrameError


_INDENTS = ["   " * i for i in range(128)]
# The depth's text for depths below 128, per DEPTH_* mode.
_DEPTH_TABLES = {
    DEPTH_NONE: [""] * 128,
    DEPTH_INDENT: _INDENTS,
    DEPTH_INDENT_PARENT: [""] + _INDENTS[:-1],
    DEPTH_NUMBER: [str(i) for i in range(128)],
}
# pre, post, tail, depth texts, depth mode, argument formatter or None, code, thread
Entry = Tuple[str, str, str, List[str], int, Optional[Callable[[Optional[str]], str]], CodeInfo,
              ThreadInfo]
MAX_MEMO = 4096


class PySink(Sink):
    """The same as CSink, in Python: the fallback, and the reference the C code follows."""

    def __init__(self, session: Any, renderers: List[Any]) -> None:
        super().__init__(session, renderers)
        self.seq = 0
        self.limit = -1
        # key (the record's first 16 bytes: all but depth and ts) -> template and objects
        self._cache: Dict[bytes, Entry] = {}
        self._generation = 0
        self._json_end = ',"pid":%d,"seq":' % self.pid
        # Formatted call arguments, by their JSON text (the same values recur in loops).
        self._memo: Dict[Tuple[int, str], str] = {}
        self._arg_fmts: Dict[int, Optional[Callable[[Optional[str]], str]]] = {}
        # Ended threads (their ids as in a key, bytes 4-8) whose templates are still cached.
        self._ended: set = set()

    def _forget(self, thread_key: bytes) -> None:
        """An ended thread's templates leave the cache, SWEEP_AFTER threads at a time."""
        if not self._cache:
            return
        self._ended.add(thread_key)
        if len(self._ended) >= SWEEP_AFTER:
            ended = self._ended
            for key in [key for key in self._cache if key[4:8] in ended]:
                del self._cache[key]
            ended.clear()

    def _arg_formatter(self, mode: int) -> Optional[Callable[[Optional[str]], str]]:
        fmt = self._arg_fmts.get(mode)
        if fmt is not None or mode == ARG_NONE:
            return fmt
        if mode == ARG_RAW:
            def fmt(arg: Optional[str]) -> str:
                return arg if arg is not None else ""
        elif mode == ARG_JSON_STR:
            from json.encoder import encode_basestring_ascii as encode

            def fmt(arg: Optional[str]) -> str:
                return '""' if arg is None else encode(arg)
        else:
            format_arg = self.renderer.format_arg
            memo = self._memo

            def fmt(arg: Optional[str]) -> str:
                text = memo.get((mode, arg))  # type: ignore[arg-type]
                if text is None:
                    text = format_arg(mode, arg)
                    if len(memo) >= MAX_MEMO:
                        memo.clear()
                    memo[(mode, arg)] = text  # type: ignore[index]
                return text  # type: ignore[no-any-return]
        self._arg_fmts[mode] = fmt
        return fmt

    def _lookup(self, key: bytes, kind: int, rendering: bool) -> Entry:
        thread_id, code_id, lineno = struct.unpack_from("<III", key, 4)
        code = self.codes[code_id]
        thread = self.threads[thread_id]
        pre, post, tail, arg_mode, depth_mode = "", "", "", ARG_NONE, DEPTH_NONE
        if rendering and self.renderer is not None:
            pre, post, tail, arg_mode, depth_mode, generation = self.template(
                _KINDS[kind], code, thread, lineno)
            if generation != self._generation:
                self._generation = generation
                self._cache.clear()
        entry = (pre, post, tail, _DEPTH_TABLES[depth_mode], depth_mode,
                 self._arg_formatter(arg_mode), code, thread)
        if rendering:
            if len(self._cache) >= MAX_TEMPLATES:
                self._cache.clear()
            self._cache[key] = entry
        return entry

    def feed(self, payload: bytes) -> Batch:
        out: List[str] = []
        append = out.append
        items: Optional[List[Any]] = [] if self.slow else None
        cache = self._cache
        ended = self._ended
        mode_all = self.mode
        json_mode = mode_all == MODE_JSON
        json_end = self._json_end
        pid = self.pid
        seq = self.seq
        limit = self.limit
        events = rendered = dropped = 0
        error: Optional[BaseException] = None
        n = len(payload)
        pos = 0
        unpack_q = _Q.unpack_from
        unpack_i = _I.unpack_from
        unpack_ii = _II.unpack_from
        try:
            while pos < n:
                rtype = payload[pos]
                if rtype == _REC_EVENT:
                    end = pos + 28
                    if end > n:
                        raise _FrameError("truncated event record")
                    if payload[pos + 2] & 2:  # FLAG_HIDDEN: for the other renderers only
                        if payload[pos + 2] & 1:
                            if end + 4 > n:
                                raise _FrameError("truncated event argument")
                            end += 4 + unpack_i(payload, end)[0]
                            if end > n:
                                raise _FrameError("truncated event argument")
                        if payload[pos + 1] >= 4:
                            raise _FrameError("unknown event kind %d" % payload[pos + 1])
                        if items is not None and limit != 0:
                            items.append(self.meta(rtype, payload[pos:pos + 28]))
                        pos = end
                        continue
                    arg: Optional[str] = None
                    if payload[pos + 2] & 1:
                        if end + 4 > n:
                            raise _FrameError("truncated event argument")
                        (alen,) = unpack_i(payload, end)
                        end += 4
                        if end + alen > n:
                            raise _FrameError("truncated event argument")
                        arg = payload[end:end + alen].decode("utf-8", "replace")
                        end += alen
                    kind = payload[pos + 1]
                    if kind >= 4:
                        raise _FrameError("unknown event kind %d" % kind)
                    key = payload[pos:pos + 16]
                    entry = cache.get(key)
                    if ended and key[4:8] in ended:
                        # an ended thread, its templates not swept yet: the plain pipeline's error
                        self._lookup(key, kind, False)
                    if limit == 0:
                        if entry is None:
                            self._lookup(key, kind, False)  # unknown ids are errors all the same
                    else:
                        if entry is None:
                            entry = self._lookup(key, kind, True)
                        if mode_all:
                            pre, post, tail, depths, depth_mode, fmt = entry[:6]
                            (depth,) = unpack_i(payload, pos + 16)
                            d = depths[depth] if depth < 128 else depth_text(depth_mode, depth)
                            if json_mode:
                                ts = unpack_q(payload, pos + 20)[0] / 1e9
                                append(f'{pre}{d}{post}{fmt(arg) if fmt else ""}{tail},'
                                       f'"ts":{ts!r}{json_end}{seq}}}\n')
                            elif fmt is None:
                                append(f"{pre}{d}{post}{tail}")
                            else:
                                append(f"{pre}{d}{post}{fmt(arg)}{tail}")
                        if items is not None:
                            lineno, depth = unpack_ii(payload, pos + 12)
                            items.append(Event(_KINDS[kind], entry[6], entry[7], lineno, depth,
                                               unpack_q(payload, pos + 20)[0] / 1e9, arg, seq,
                                               pid))
                        rendered += 1
                        if limit > 0:
                            limit -= 1
                    seq += 1
                    events += 1
                    pos = end
                elif rtype == _REC_CODE or rtype == _REC_THREAD:
                    if pos + 5 > n:
                        raise _FrameError("truncated metadata record")
                    (mlen,) = unpack_i(payload, pos + 1)
                    pos += 5
                    if mlen > protocol.MAX_META or pos + mlen > n:
                        raise _FrameError("metadata record of %d bytes does not fit" % mlen)
                    if self.meta(rtype, payload[pos:pos + mlen]):
                        cache.clear()
                    pos += mlen
                elif rtype == _REC_DROP:
                    if pos + 9 > n:
                        raise _FrameError("truncated drop record")
                    (count,) = unpack_q(payload, pos + 1)
                    pos += 9
                    if limit != 0:
                        if mode_all != MODE_NONE:
                            append(self.drop_text(count, seq))
                        if items is not None:
                            items.append(self.drop_cls(count, seq))
                    dropped += count
                    seq += count
                elif rtype == _REC_THREAD_END:
                    if pos + 5 > n:
                        raise _FrameError("truncated thread end record")
                    end_item = self.meta(rtype, payload[pos + 1:pos + 5])
                    if end_item is not None and items is not None:
                        items.append(end_item)
                    self._forget(payload[pos + 1:pos + 5])
                    pos += 5
                else:
                    raise _FrameError("unknown record type %d at offset %d" % (rtype, pos))
        except Exception as exc:
            error = exc
        self.seq = seq
        self.limit = limit
        return Batch(["".join(out)] if out else None, events, rendered, dropped, items, error)


def available() -> bool:
    """Is the C extension built?"""
    return _speedups is not None


def make_sink(session: Any, renderers: List[Any], use_c: Optional[bool] = None
              ) -> Optional[Sink]:
    """The sink for these renderers, or None for the plain pipeline (HUNTER_ATTACH_FASTPATH=0).
    ``use_c``: None picks CSink when the extension is built (HUNTER_ATTACH_FASTPATH=py: never)."""
    setting = os.environ.get("HUNTER_ATTACH_FASTPATH", "").strip().lower()
    if setting in ("0", "off", "no"):
        return None
    if use_c is None:
        use_c = _speedups is not None and setting != "py"
    if use_c:
        if _speedups is None:
            raise RuntimeError("hunter_attach._speedups is not built")
        return CSink(session, renderers)
    return PySink(session, renderers)
