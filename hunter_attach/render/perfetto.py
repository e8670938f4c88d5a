"""``--perfetto FILE``: a Chrome trace-event JSON file for ui.perfetto.dev or chrome://tracing.

The file is ``{"traceEvents": [...], "displayTimeUnit": "ms"}`` with:

- per process a ``process_name`` metadata event, per thread ``thread_name`` and
  ``thread_sort_index`` metadata events (``"ph": "M"``): one track per thread;
- per call/return pair a complete slice (``"ph": "X"``, ``ts`` and ``dur`` in microseconds since
  attach, with nanosecond decimals), named after the function's qualname, with args
  ``{module, filename, lineno}``; calls still open at close end at the last timestamp seen;
- per exception event an instant (``"ph": "i"``, thread scope) named ``exception in <qualname>``,
  with the exception repr in its args; dropped events become global instants.

Line events are not exported: a slice per call is what the timeline is good at.

``tid`` is not the thread's ident: Perfetto reads pid and tid as 32-bit unsigned integers and
``threading.get_ident()`` values (pthread_t addresses) do not fit, which would merge all threads
into one track. The main thread gets ``tid = pid`` (as on Linux); other threads get numbers from
2**22 + 1 up, above any Linux pid, unique in the file. The thread_name metadata carries the name.

Slices are kept until close and written sorted by (track, start, longest first), so that a
parent and a child starting at the same nanosecond still nest. The file is written to a
temporary name next to the target and renamed, so an interrupted run never leaves half a file
where a previous good one was.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Dict, List, Optional, Tuple

from ..events import CodeInfo, Event
from .summary import CallStacks, Frame, ThreadKey

_SYNTHETIC_TID_BASE = 1 << 22  # Linux's PID_MAX_LIMIT: no real pid is above it
_dumps = json.dumps


def _us(ns: int) -> str:
    """Integer nanoseconds as exact microseconds text, so a child can never end after its parent
    through float rounding."""
    if ns < 0:
        return "-" + _us(-ns)
    us, frac = divmod(ns, 1000)
    return f"{us}.{frac:03d}"


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


class PerfettoRenderer(CallStacks):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        # (pid, tid, start ns, -dur ns, code, lineno) for slices; instants are kept apart.
        self._slices: List[Tuple[int, int, int, int, CodeInfo, int]] = []
        self._instants: List[Tuple[int, int, int, str, str]] = []  # pid, tid, ts, name, args
        self._tids: Dict[ThreadKey, int] = {}
        self._thread_names: Dict[ThreadKey, str] = {}
        self._main: Dict[ThreadKey, bool] = {}
        self._pids: List[int] = []
        self._next_tid = _SYNTHETIC_TID_BASE + 1
        self._code_args: Dict[int, Tuple[CodeInfo, str, str]] = {}
        self._closed = False

    def _tid(self, ev: Event) -> int:
        thread = ev.thread
        tkey = (ev.pid, thread.id)
        tid = self._tids.get(tkey)
        if tid is None:
            if ev.pid not in self._pids:
                self._pids.append(ev.pid)
            if thread.main and ev.pid not in self._tids.values():
                tid = ev.pid
            else:
                tid = self._next_tid
                self._next_tid += 1
            self._tids[tkey] = tid
            self._main[tkey] = thread.main
        self._thread_names[tkey] = thread.name
        return tid

    def _names(self, code: CodeInfo) -> Tuple[str, str]:
        """The JSON of the slice name and of the code's args (without lineno)."""
        entry = self._code_args.get(id(code))
        if entry is None or entry[0] is not code:
            name = _dumps(code.qualname or code.function)
            args = f'"module":{_dumps(code.module)},"filename":{_dumps(code.filename)}'
            entry = self._code_args[id(code)] = (code, name, args)
        return entry[1], entry[2]

    def started(self, tkey: ThreadKey, frame: Frame, ev: Event) -> None:
        pass

    def ended(self, tkey: ThreadKey, frame: Frame, end: float) -> None:
        start = _ns(frame.start)
        self._slices.append((tkey[0], self._tids[tkey], start, start - _ns(end), frame.code,
                             frame.lineno))

    def event(self, ev: Event) -> None:
        kind = ev.kind
        if kind == "call":
            self._tid(ev)
            self.track(ev)
        elif kind == "return":
            self.track(ev)
        else:
            if self.last_ts is None or ev.ts > self.last_ts:
                self.last_ts = ev.ts
            if kind == "exception":
                code = ev.code
                name = "exception in " + (code.qualname or code.function)
                args = (f'"exception":{_dumps(ev.arg or "")},"module":{_dumps(code.module)},'
                        f'"filename":{_dumps(code.filename)},"lineno":{ev.lineno:d}')
                self._instants.append((ev.pid, self._tid(ev), _ns(ev.ts), name, args))

    def drop(self, count: int, seq: int, pid: Optional[int] = None) -> None:
        ts = _ns(self.last_ts) if self.last_ts is not None else 0
        if pid is None:
            pid = self._pids[0] if self._pids else 0
        self._instants.append((pid, -1, ts, f"{count} events dropped",
                               f'"count":{count:d},"seq":{seq:d}'))

    def flush(self) -> None:
        pass

    def _lines(self) -> List[str]:
        out: List[str] = []
        for pid in self._pids:
            out.append(f'{{"ph":"M","name":"process_name","pid":{pid},"tid":{pid},'
                       f'"args":{{"name":"python (pid {pid})"}}}}')
        for tkey, tid in self._tids.items():
            pid = tkey[0]
            out.append(f'{{"ph":"M","name":"thread_name","pid":{pid},"tid":{tid},'
                       f'"args":{{"name":{_dumps(self._thread_names[tkey])}}}}}')
            index = 0 if self._main[tkey] else tid
            out.append(f'{{"ph":"M","name":"thread_sort_index","pid":{pid},"tid":{tid},'
                       f'"args":{{"sort_index":{index}}}}}')
        self._slices.sort(key=lambda s: (s[0], s[1], s[2], s[3]))
        for pid, tid, start, neg_dur, code, lineno in self._slices:
            name, args = self._names(code)
            out.append(f'{{"ph":"X","name":{name},"cat":"python","pid":{pid},"tid":{tid},'
                       f'"ts":{_us(start)},"dur":{_us(-neg_dur)},'
                       f'"args":{{{args},"lineno":{lineno}}}}}')
        for pid, tid, ts, name, args in self._instants:
            if tid < 0:
                out.append(f'{{"ph":"i","s":"g","name":{_dumps(name)},"pid":{pid},"tid":0,'
                           f'"ts":{_us(ts)},"args":{{{args}}}}}')
            else:
                out.append(f'{{"ph":"i","s":"t","name":{_dumps(name)},"cat":"python",'
                           f'"pid":{pid},"tid":{tid},"ts":{_us(ts)},"args":{{{args}}}}}')
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.finish()
        fd, tmp = create_temp(self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write('{"displayTimeUnit":"ms","otherData":{"tool":"hunter-trace"},'
                        '"traceEvents":[\n')
                f.write(",\n".join(self._lines()))
                f.write("\n]}\n")
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def create_temp(path: str) -> Tuple[int, str]:
    """A new file next to ``path``. Not tempfile.mkstemp: that makes it 0600, and the trace
    should get the permissions any file the user writes gets (0666 minus the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}")
