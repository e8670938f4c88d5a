"""``--summary``: a per-function table like ``strace -c``, printed at close.

For each function (``module.qualname``): the number of call events, the total time (inclusive:
from call to return, counting only the outermost activation of a recursive function so that
recursion is not counted twice), the own time (total minus the time spent in traced callees,
per activation) and the average total time per call. Sorted by total time, descending; the
total line sums calls and own time (the time covered by the traced calls).

A resumed generator is a new call, as in hunter's events. Calls still open at close, or when
their thread ends, end at the last timestamp seen. With ``--summary`` the agent also sends the
returns the query does not show (hidden events, protocol.FLAG_HIDDEN), so that a call ends at
its real return even for ``kind=call``. The call/return matching is :class:`CallStacks`,
shared with perfetto.py (whose slices then end at those returns too).
"""

from __future__ import annotations

from typing import Dict, List, Optional, TextIO, Tuple

from ..events import CodeInfo, Event, ThreadInfo

# (pid, ThreadInfo.id): the agent's id of a thread, unlike its ident, is not reused when the
# thread ends and another starts.
ThreadKey = Tuple[int, int]


class Frame:
    """An open call."""

    __slots__ = ("code", "depth", "start", "lineno", "children", "key")

    def __init__(self, code: CodeInfo, depth: int, start: float, lineno: int) -> None:
        self.code = code
        self.depth = depth
        self.start = start
        self.lineno = lineno
        self.children = 0.0  # total time of the direct callees that ended
        self.key = ""  # set by users that need a per-function key


class CallStacks:
    """Per-thread stacks of open calls, matching returns to calls.

    Events can be missing (filtered by the query, dropped, or from before the attach), so:

    - a call at depth d ends the open calls of its thread at depth >= d (their returns were not
      seen; they end now, which is an upper bound);
    - a return ends the innermost open call of the same code, and the calls above it;
    - a return with no open call of its code (it began before the attach, or its call was
      filtered out) is ignored; so is a hidden return (``--summary``'s, see protocol.py) with
      no open call of its code at its depth.

    Subclasses override :meth:`started` and :meth:`ended`.
    """

    def __init__(self) -> None:
        self.stacks: Dict[ThreadKey, List[Frame]] = {}
        self.last_ts: Optional[float] = None

    def started(self, tkey: ThreadKey, frame: Frame, ev: Event) -> None:
        pass

    def ended(self, tkey: ThreadKey, frame: Frame, end: float) -> None:
        pass

    def _pop(self, tkey: ThreadKey, stack: List[Frame], end: float) -> None:
        frame = stack.pop()
        if end < frame.start:
            end = frame.start
        self.ended(tkey, frame, end)
        if stack:
            stack[-1].children += end - frame.start

    def track(self, ev: Event) -> None:
        ts = ev.ts
        if self.last_ts is None or ts > self.last_ts:
            self.last_ts = ts
        kind = ev.kind
        if kind == "call":
            tkey = (ev.pid, ev.thread.id)
            stack = self.stacks.get(tkey)
            if stack is None:
                stack = self.stacks[tkey] = []
            depth = ev.depth
            while stack and stack[-1].depth >= depth:
                self._pop(tkey, stack, ts)
            frame = Frame(ev.code, depth, ts, ev.lineno)
            stack.append(frame)
            self.started(tkey, frame, ev)
        elif kind == "return":
            tkey = (ev.pid, ev.thread.id)
            stack = self.stacks.get(tkey)
            if not stack:
                return
            code = ev.code
            i = len(stack) - 1
            if ev.hidden:
                # A hidden return ends only its own call, which was shown if it is open at the
                # same depth; else it is the return of a call the query did not show (a deeper
                # activation of a recursive function, say), which must not end anything.
                depth = ev.depth
                while i >= 0 and stack[i].depth > depth:
                    i -= 1
                if i < 0 or stack[i].depth != depth or stack[i].code is not code:
                    return
            while i >= 0 and stack[i].code is not code:
                i -= 1
            if i < 0:
                return
            while len(stack) > i:
                self._pop(tkey, stack, ts)

    def forget_thread(self, thread: ThreadInfo, pid: int) -> None:
        """The thread ended (a THREAD_END record): its open calls end now, its stack goes."""
        tkey = (pid, thread.id)
        stack = self.stacks.pop(tkey, None)
        end = self.last_ts if self.last_ts is not None else 0.0
        while stack:
            self._pop(tkey, stack, end)

    def finish(self) -> None:
        """End every open call at the last timestamp seen."""
        end = self.last_ts if self.last_ts is not None else 0.0
        for tkey, stack in self.stacks.items():
            while stack:
                self._pop(tkey, stack, end)


class _Stat:
    __slots__ = ("calls", "total", "own")

    def __init__(self) -> None:
        self.calls = 0
        self.total = 0.0
        self.own = 0.0


class SummaryRenderer(CallStacks):
    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.stats: Dict[str, _Stat] = {}
        self.dropped = 0
        # Activations per (thread, function) on the stack, so that a recursive function's
        # inner activations do not add to its total a second time.
        self._active: Dict[Tuple[ThreadKey, str], int] = {}
        self._keys: Dict[int, Tuple[CodeInfo, str]] = {}
        self._closed = False

    def _key(self, code: CodeInfo) -> str:
        entry = self._keys.get(id(code))
        if entry is None or entry[0] is not code:
            name = code.qualname or code.function
            entry = self._keys[id(code)] = (code, code.module + "." + name if code.module
                                            else name)
        return entry[1]

    def started(self, tkey: ThreadKey, frame: Frame, ev: Event) -> None:
        key = frame.key = self._key(frame.code)
        stat = self.stats.get(key)
        if stat is None:
            stat = self.stats[key] = _Stat()
        stat.calls += 1
        akey = (tkey, key)
        self._active[akey] = self._active.get(akey, 0) + 1

    def ended(self, tkey: ThreadKey, frame: Frame, end: float) -> None:
        stat = self.stats[frame.key]
        dur = end - frame.start
        stat.own += dur - frame.children
        akey = (tkey, frame.key)
        left = self._active[akey] - 1
        if left:
            self._active[akey] = left
        else:
            del self._active[akey]
            stat.total += dur

    def event(self, ev: Event) -> None:
        if ev.kind == "call" or ev.kind == "return":
            self.track(ev)
        elif self.last_ts is None or ev.ts > self.last_ts:
            self.last_ts = ev.ts

    def drop(self, count: int, seq: int, pid: Optional[int] = None) -> None:
        self.dropped += count

    def flush(self) -> None:
        pass

    def rows(self) -> List[Tuple[str, int, float, float]]:
        """(function, calls, total seconds, own seconds), sorted as printed."""
        rows = [(key, s.calls, s.total, s.own) for key, s in self.stats.items()]
        rows.sort(key=lambda r: (-r[2], r[0]))
        return rows

    def table(self) -> str:
        rows = self.rows()
        own_sum = sum(r[3] for r in rows)
        calls_sum = sum(r[1] for r in rows)
        fmt = "{:>7} {:>12} {:>12} {:>12} {:>9}  {}\n"
        rule = fmt.format("-" * 7, "-" * 12, "-" * 12, "-" * 12, "-" * 9, "-" * 8)
        out = [fmt.format("% own", "total s", "own s", "usecs/call", "calls", "function"), rule]
        for key, calls, total, own in rows:
            share = 100.0 * own / own_sum if own_sum > 0 else 0.0
            avg = total * 1e6 / calls if calls else 0.0
            out.append(fmt.format(f"{share:.2f}", f"{total:.6f}", f"{own:.6f}", f"{avg:.1f}",
                                  calls, key))
        out.append(rule)
        out.append(fmt.format("100.00" if rows else "0.00", "", f"{own_sum:.6f}", "",
                              calls_sum, "total"))
        if self.dropped:
            out.append(f"({self.dropped} events were dropped; the numbers are incomplete)\n")
        return "".join(out)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.finish()
        self.stream.write(self.table())
        self.stream.flush()
