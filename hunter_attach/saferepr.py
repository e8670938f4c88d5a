"""Safe, bounded reprs and the test that makes comparisons safe, inside the target. Shipped into
the target: stdlib only, 3.8+.

Only exact builtin types get their real ``repr``; anything else gets ``object.__repr__`` so that
no user code (``__repr__``, properties, metaclass hooks) runs in the traced process. The rules are
hunter's ``safe_repr``, so the text matches what hunter users know.

Comparisons follow a stricter rule (:func:`is_plain`): a value the target owns is compared only
when every part of it is a builtin scalar or a builtin container of them. Comparing anything else
could call its ``__eq__``, ``__lt__``, ``__contains__``, ``__hash__`` or ``__iter__`` (directly,
or reflected from ours), or consume a generator.
"""

from __future__ import annotations

import builtins
import json
import re
import types
from collections import Counter, OrderedDict, defaultdict, deque
from datetime import date, datetime, time, timedelta
from itertools import islice
from typing import Any, Iterator, List, Tuple

CO_VARARGS = 0x04
CO_VARKEYWORDS = 0x08
_SAFE_MODULES = (builtins.__name__, "io", "socket", "_socket", "zoneinfo", "decimal")
_Pattern = type(re.compile(""))
# Containers longer than this are shown with their first items and "...": hunter walks them whole,
# which costs the target O(n) per event for a repr that is cut to repr_limit anyway.
MAX_ITEMS = 512


# Exact types only: a subclass of int or str may override any method. Held as ids, because
# hashing a type object could run its metaclass's __hash__.
_PLAIN_SCALARS = frozenset(map(id, (type(None), bool, int, float, complex, str, bytes)))
_PLAIN_CONTAINERS = frozenset(map(id, (tuple, list, dict, set, frozenset)))
# Walking a value costs the target O(items) per event: past this many, it is not compared.
MAX_PLAIN_ITEMS = 10000


def is_plain(*roots: Any) -> bool:
    """Is every part of every root a builtin scalar or a builtin container of them? Decided
    by exact types alone, without calling a method of any object (iterating an exact list,
    tuple, dict, set or frozenset runs no user code), within MAX_PLAIN_ITEMS items."""
    stack = list(roots)
    budget = MAX_PLAIN_ITEMS
    while stack:
        obj = stack.pop()
        tid = id(type(obj))
        if tid in _PLAIN_SCALARS:
            continue
        if tid not in _PLAIN_CONTAINERS:
            return False
        budget -= len(obj)
        if budget < 0:
            return False
        if tid == id(dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        else:
            stack.extend(obj)
    return True


def plain_str(obj: Any) -> Any:
    """obj when it is an exact str, else None: for names the target gives us (``__name__``,
    ``__file__``, a thread's name) that we hash, compare or format."""
    return obj if type(obj) is str else None


def thread_name(thread: Any) -> Any:
    """A threading.Thread's name as stored, or None: the ``name`` property is not called, as a
    subclass may override it (or __getattribute__)."""
    try:
        return plain_str(object.__getattribute__(thread, "__dict__").get("_name"))
    except Exception:
        return None


def _items(obj: Any, maxdepth: int) -> str:
    text = ", ".join("%s: %s" % (safe_repr(k, maxdepth), safe_repr(v, maxdepth - 1))
                     for k, v in islice(obj.items(), MAX_ITEMS))
    return text + ", ..." if len(obj) > MAX_ITEMS else text


def _seq(obj: Any, maxdepth: int) -> str:
    text = ", ".join(safe_repr(i, maxdepth - 1) for i in islice(obj, MAX_ITEMS))
    return text + ", ..." if len(obj) > MAX_ITEMS else text


def _tz(obj: Any) -> str:
    fold = ", fold=%s" % safe_repr(obj.fold) if hasattr(obj, "fold") else ""
    return "tzinfo=%s%s)" % (safe_repr(obj.tzinfo), fold)


def safe_repr(obj: Any, maxdepth: int = 5) -> str:
    if not maxdepth:
        return "..."
    t = type(obj)
    if t is dict:
        return "{%s}" % _items(obj, maxdepth)
    if t is list:
        return "[%s]" % _seq(obj, maxdepth)
    if t is tuple:
        return "(%s%s)" % (_seq(obj, maxdepth), "," if len(obj) == 1 else "")
    if t is set:
        return "{%s}" % _seq(obj, maxdepth)
    if t is frozenset:
        return "frozenset({%s})" % _seq(obj, maxdepth)
    if t is deque:
        return "deque([%s])" % _seq(obj, maxdepth)
    if t in (Counter, OrderedDict, defaultdict):
        return "%s({%s})" % (t.__name__, _items(obj, maxdepth))
    if t is _Pattern:
        if obj.flags:
            return "re.compile(%s, flags=%s)" % (safe_repr(obj.pattern), re.RegexFlag(obj.flags))
        return "re.compile(%s)" % safe_repr(obj.pattern)
    if t in (date, timedelta):
        return repr(obj)
    if t is datetime:
        return "datetime(%d, %d, %d, %d, %d, %d, %d, %s" % (
            obj.year, obj.month, obj.day, obj.hour, obj.minute, obj.second, obj.microsecond,
            _tz(obj))
    if t is time:
        return "time(%d, %d, %d, %d, %s" % (obj.hour, obj.minute, obj.second, obj.microsecond,
                                             _tz(obj))
    if t is types.MethodType:
        owner = obj.__self__
        name = getattr(obj, "__qualname__", None) or obj.__name__
        return "<%sbound method %s of %s>" % ("un" if owner is None else "", name,
                                              safe_repr(owner, maxdepth - 1))
    if type(t) is type and BaseException in t.__mro__:
        return "%s(%s)" % (t.__name__, _seq(obj.args, maxdepth))
    if type(t) is type and t.__module__ in _SAFE_MODULES:
        return repr(obj)
    return object.__repr__(obj)


def trimmed(obj: Any, limit: int) -> str:
    """hunter's try_repr without colors: one line, the middle cut out past ``limit``."""
    try:
        if type(obj) in (str, bytes) and len(obj) > limit * 2:
            # Only the ends survive the cut: repr just those (same text unless the quote
            # character repr picks depends on the middle).
            obj = obj[:limit] + obj[-limit:]
        s = safe_repr(obj).replace("\n", r"\n")
    except Exception as exc:  # a broken __eq__/__hash__ inside a container, etc.
        return "!!! FAILED REPR: %s" % object.__repr__(exc)
    if len(s) > limit:
        cutoff = limit // 2
        return "%s [...] %s" % (s[:cutoff], s[-cutoff:])
    return s


def arguments(code: types.CodeType) -> Iterator[Tuple[str, str]]:
    """(prefix + display name, variable) for each parameter, in hunter's order."""
    names = code.co_varnames
    count = code.co_argcount
    kwonly = names[count:count + code.co_kwonlyargcount]
    for name in names[:count]:
        yield name, name
    count += code.co_kwonlyargcount
    if code.co_flags & CO_VARARGS:
        yield "*" + names[count], names[count]
        count += 1
    for name in kwonly:
        yield name, name
    if code.co_flags & CO_VARKEYWORDS:
        yield "**" + names[count], names[count]


def call_arguments(frame: types.FrameType, limit: int) -> str:
    """The JSON list of [name, repr] pairs that a CALL event carries."""
    f_locals = frame.f_locals
    pairs: List[Tuple[str, str]] = []
    for display, var in arguments(frame.f_code):
        pairs.append((display, trimmed(f_locals[var], limit) if var in f_locals else "?"))
    return json.dumps(pairs, separators=(",", ":"))
