"""The wire protocol between the CLI and the agent. Stdlib only: this module is shipped into the
target as source and must run on CPython 3.8+.

A frame is ``<u32 length><u8 type><payload>``, little-endian, where length counts the payload only.
Control frames carry JSON; RECORDS frames carry the tracer's binary records back to back.

Records (all little-endian):

- EVENT  ``<B kind B flags H pad I thread I code I lineno I depth Q ts_ns>`` (28 bytes), followed,
  when ``flags & FLAG_ARG``, by ``<I len>`` and that many bytes of UTF-8 (the safe repr of the
  call's arguments, the return value or the exception).
- CODE   ``<B I len>`` + JSON: an interned code object (id, filename, module, function, lines...).
  Always precedes the first EVENT that names its id.
- THREAD ``<B I len>`` + JSON: an interned thread (id, ident, name, main). Precedes its events.
- DROP   ``<B Q count>``: ``count`` events were dropped here (``--drop`` mode only).
- THREAD_END ``<B I thread>``: that thread ended. No event names its id again (ids are never
  reused, even when a new thread gets the ended one's ident), so the CLI forgets it.

An EVENT with ``flags & FLAG_HIDDEN`` does not match the query: it is a return the tracer sends
only for ``--summary`` (config ``"summary": true``), so that a call's time is measured from its
real return when the query shows only calls. It has no argument, no sequence number, and is
never shown, counted or dropped-and-marked; only the summary sees it.

Every event has a sequence number: its position in the stream, counting dropped events, so
``seq`` of the next event after a DROP of n jumps by n. The BYE frame carries the agent's total.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Dict, Iterator, List, Optional, Tuple

# What the tool runs in the target carries these names, so that the agent can keep it out of the
# stream: the package built from the agent's sources (its modules are PACKAGE.name), the
# bootstrap template's __name__ (BOOT_MODULE) and the template's first line (BOOT_MARKER), which
# the injected line that runs it holds among its constants.
PACKAGE = "_hunter_attach"
BOOT_MODULE = PACKAGE + "_boot"
BOOT_MARKER = "# hunter_attach bootstrap"

# Frame types.
HELLO = 1  # agent -> CLI, JSON: token, pid, python version, soabi
LOAD = 2  # CLI -> agent, JSON: agent sources, tracer path, config (query, options)
READY = 3  # agent -> CLI, JSON: backend, threads traced; tracing is on
RECORDS = 4  # agent -> CLI, binary records
ERROR = 5  # agent -> CLI, JSON: message, detail
STOP = 6  # CLI -> agent, empty
BYE = 7  # agent -> CLI, JSON: counters; the agent has uninstalled itself
KEEPALIVE = 8  # CLI -> agent, empty, every second: slow to read maybe, but alive

FRAME_NAMES = {HELLO: "HELLO", LOAD: "LOAD", READY: "READY", RECORDS: "RECORDS",
               ERROR: "ERROR", STOP: "STOP", BYE: "BYE", KEEPALIVE: "KEEPALIVE"}

FRAME_HEADER = struct.Struct("<IB")
# Larger than any legitimate frame (the agent's RECORDS batches are at most 1 MiB, LOAD carries
# a few hundred KiB of source), small enough that a corrupt length cannot make us allocate much.
MAX_FRAME = 16 * 1024 * 1024

# Record types.
REC_EVENT = 1
REC_CODE = 2
REC_THREAD = 3
REC_DROP = 4
REC_THREAD_END = 5
# Not on the wire: what iter_records() yields for an EVENT with FLAG_HIDDEN.
REC_HIDDEN = 0x100 | REC_EVENT

EVENT = struct.Struct("<BBHIIIIQ")  # rtype, kind, flags, thread, code, lineno, depth, ts_ns
assert EVENT.size == 28
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
META_HEADER = struct.Struct("<BI")  # rtype, length
DROP = struct.Struct("<BQ")
THREAD_END = struct.Struct("<BI")  # rtype, thread id
FLAG_ARG = 1
FLAG_HIDDEN = 2
MAX_META = 4 * 1024 * 1024

# Event kinds, in the order the tracer numbers them.
CALL, LINE, RETURN, EXCEPTION = 0, 1, 2, 3
KINDS = ("call", "line", "return", "exception")
# A bit of the kinds mask decide() gives the tracer, past the four kinds: a return of this code
# that does not match is sent with FLAG_HIDDEN (the agent sets it for --summary).
HIDDEN_RETURNS = 4


class FrameError(Exception):
    """A malformed frame or record. The CLI maps it to errors.ProtocolError."""


def encode_frame(ftype: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(len(payload), ftype) + payload


def encode_json(ftype: int, obj: Any) -> bytes:
    return encode_frame(ftype, json.dumps(obj, separators=(",", ":")).encode())


def decode_json(payload: bytes) -> Dict[str, Any]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError("invalid JSON payload: %s" % type(exc).__name__) from None
    if not isinstance(obj, dict):
        raise FrameError("JSON payload is not an object")
    return obj


class FrameReader:
    """Incremental frame parser: feed() bytes, iterate complete frames. Bounded by MAX_FRAME."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> List[Tuple[int, bytes]]:
        self._buf += data
        frames = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= FRAME_HEADER.size:
            length, ftype = FRAME_HEADER.unpack_from(buf, pos)
            if length > self._max:
                raise FrameError("frame of %d bytes exceeds the %d byte limit"
                                 % (length, self._max))
            if ftype not in FRAME_NAMES:
                raise FrameError("unknown frame type %d" % ftype)
            end = pos + FRAME_HEADER.size + length
            if end > len(buf):
                break
            frames.append((ftype, bytes(buf[pos + FRAME_HEADER.size:end])))
            pos = end
        del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


def iter_records(data: bytes) -> Iterator[Tuple[int, Any]]:
    """Split a RECORDS payload. Yields (REC_EVENT, (kind, thread, code, lineno, depth, ts_ns, arg)),
    the same with REC_HIDDEN for a hidden event, (REC_CODE, dict), (REC_THREAD, dict),
    (REC_DROP, count) or (REC_THREAD_END, thread id). Raises FrameError on corruption."""
    pos = 0
    n = len(data)
    unpack_event = EVENT.unpack_from
    while pos < n:
        rtype = data[pos]
        if rtype == REC_EVENT:
            if pos + EVENT.size > n:
                raise FrameError("truncated event record")
            _, kind, flags, thread, code, lineno, depth, ts = unpack_event(data, pos)
            pos += EVENT.size
            arg: Optional[str] = None
            if flags & FLAG_ARG:
                if pos + 4 > n:
                    raise FrameError("truncated event argument")
                (alen,) = U32.unpack_from(data, pos)
                pos += 4
                if pos + alen > n:
                    raise FrameError("truncated event argument")
                arg = data[pos:pos + alen].decode("utf-8", "replace")
                pos += alen
            if kind >= len(KINDS):
                raise FrameError("unknown event kind %d" % kind)
            yield (REC_HIDDEN if flags & FLAG_HIDDEN else REC_EVENT,
                   (kind, thread, code, lineno, depth, ts, arg))
        elif rtype in (REC_CODE, REC_THREAD):
            if pos + META_HEADER.size > n:
                raise FrameError("truncated metadata record")
            _, mlen = META_HEADER.unpack_from(data, pos)
            pos += META_HEADER.size
            if mlen > MAX_META or pos + mlen > n:
                raise FrameError("metadata record of %d bytes does not fit" % mlen)
            yield rtype, decode_json(data[pos:pos + mlen])
            pos += mlen
        elif rtype == REC_DROP:
            if pos + DROP.size > n:
                raise FrameError("truncated drop record")
            _, count = DROP.unpack_from(data, pos)
            pos += DROP.size
            yield REC_DROP, count
        elif rtype == REC_THREAD_END:
            if pos + THREAD_END.size > n:
                raise FrameError("truncated thread end record")
            _, thread_id = THREAD_END.unpack_from(data, pos)
            pos += THREAD_END.size
            yield REC_THREAD_END, thread_id
        else:
            raise FrameError("unknown record type %d at offset %d" % (rtype, pos))


def encode_meta(rtype: int, obj: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return META_HEADER.pack(rtype, len(body)) + body
