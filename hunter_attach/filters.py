"""Evaluate a query tree (docs/internals.md, "Query tree") inside the target process.

Shipped into the target as source: standard library only, CPython 3.8+.

The reference semantics are hunter 3.9's pure-Python build (hunter/predicates.py, hunter/event.py);
tests/test_filters_vs_hunter.py compares us with it event by event. Deliberate differences:

- A comparison that raises is False here (e.g. ``threadid_lt=5`` on the main thread, where threadid
  is None, or ``arg_startswith`` on an int). hunter lets the exception stop its tracer.
- A value the target owns is compared only when it is plain (saferepr.is_plain); anything else is
  False, and none of its methods runs. hunter calls them, and iterates returned generators.
- ``stdlib`` is also True for filenames starting with ``<frozen `` (3.11+ freezes os, posixpath,
  codecs...; hunter only lists three frozen importlib names, so os.path.join is not stdlib there).
  Site-packages directories come from ``site`` rather than sysconfig (see
  _site_packages_paths), and hunter's own install directory is not one of them.
- ``threadname`` never creates dummy thread objects in the target: the last events of a finished
  thread keep its name (hunter reports a new ``Dummy-N`` there), and a thread that threading
  never knew is ``Thread-<ident>`` (hunter: ``Dummy-N``), as the agent names it.
- ``From`` keeps its state per thread (hunter has one state per predicate, and one depth per
  tracer, shared by all threads). ``Filter(per_thread_state=False)`` restores hunter's behaviour.
- ``module`` values compared with eq/in are resolved through sys.modules (``os.path`` ->
  ``posixpath``, recorded in ``Filter.aliases``) unless ``resolve_modules=False``.
- hunter's default Cython build raises TypeError for ``_in`` on non-string fields and for
  ``_contains`` on locals/globals/arg; we follow the pure-Python build, where they work.
- Only Python-level events: ``builtin`` is always False.
"""

from __future__ import annotations

import _thread
import array
import collections
import linecache
import os
import re
import site
import stat
import sys
import types
from functools import partial
from os.path import basename, exists, splitext
from tokenize import TokenError, generate_tokens
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

from .saferepr import is_plain, plain_str, thread_name

Node = Dict[str, Any]

KINDS = ("call", "line", "return", "exception")
KIND_INDEX = {name: i for i, name in enumerate(KINDS)}
ALL_KINDS = 0b1111
RETURN_BIT = 1 << KIND_INDEX["return"]

FIELDS = (
    "kind", "function", "module", "filename", "lineno", "depth", "calls", "stdlib", "threadid",
    "threadname", "source", "fullsource", "builtin", "arg", "locals", "globals",
)
CMPS = ("eq", "in", "contains", "startswith", "endswith", "regex", "lt", "lte", "gt", "gte")
# Known once per code object, so decide() folds them into constants.
STATIC_FIELDS = frozenset(("module", "function", "filename", "stdlib", "builtin"))

# The postfix program (docs/internals.md, "Per-code decisions and the C program").
OP_TRUE, OP_FALSE, OP_AND, OP_OR, OP_NOT, OP_KIND, OP_CMP, OP_IN, OP_PY = range(9)
C_FIELDS = {"depth": 0, "lineno": 1, "calls": 2, "threadid": 3}
C_CMPS = {"eq": 0, "lt": 2, "lte": 3, "gt": 4, "gte": 5}
CMP_NE = 1
MAX_STACK = 64
MAIN_THREADID = -1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_TREE_DEPTH = 100
_CACHE_LIMIT = 10000  # entries per cache; caches hold code objects, so they must not grow forever

# What a static field holds when the target's value may not be touched: compares False.
_OPAQUE = object()

TRUE: Node = {"op": "true"}
FALSE: Node = {"op": "false"}


# --- hunter's Event fields, computed the way hunter/event.py does -------------------------------

def _site_packages_paths() -> Tuple[str, ...]:
    # hunter/const.py asks sysconfig for every install scheme, but on 3.12+ importing sysconfig
    # imports threading (see main_thread_ident). On POSIX, site's answer is the same set less the
    # Windows and macOS-framework scheme paths, plus Debian's dist-packages, which hunter misses.
    paths: Set[str] = set()
    for name in ("getsitepackages", "getusersitepackages"):
        try:
            found = getattr(site, name)()
        except Exception:  # old virtualenvs ship a site.py without these
            continue
        paths.update([found] if isinstance(found, str) else found)
    # An empty prefix would make every file "site-packages".
    return tuple(p for p in paths if p)


def _sys_prefix_paths() -> Tuple[str, ...]:
    paths = {"<frozen ", sys.prefix, sys.exec_prefix}
    for module in (os, stat, collections):
        file = getattr(module, "__file__", None)
        if file:
            paths.add(os.path.dirname(file))
    for prop in ("real_prefix", "real_exec_prefix", "base_prefix", "base_exec_prefix"):
        if hasattr(sys, prop):
            paths.add(getattr(sys, prop))
    return tuple(sorted((p for p in paths if p), key=len, reverse=True))


SITE_PACKAGES_PATHS = _site_packages_paths()
SYS_PREFIX_PATHS = _sys_prefix_paths()
_CYTHON_SUFFIX_RE = re.compile(r"([.].+)?[.](so|pyd)$", re.IGNORECASE)
_LEADING_WHITESPACE_RE = re.compile("(^[ \t]*)(?:[^ \t\n])", re.MULTILINE)


def event_filename(co_filename: str, module_file: Any = None) -> str:
    """hunter's Event.filename: co_filename, else the module's ``__file__``, else '?'."""
    filename = co_filename or module_file
    if not filename:
        return "?"
    if filename.endswith((".pyc", ".pyo")):
        return filename[:-1]
    if filename.endswith("$py.class"):
        return filename[:-9] + ".py"
    if filename.endswith((".so", ".pyd")):
        base = _CYTHON_SUFFIX_RE.sub("", filename)
        for ext in (".pyx", ".py"):
            if exists(base + ext):
                return base + ext
    return filename


def event_stdlib(module: str, filename: str) -> bool:
    """hunter's Event.stdlib (plus ``<frozen ...>`` names, see the module docstring)."""
    if "pkg_resources" in module.split("."):
        return True  # hunter: "skip this over-vendored module"
    if filename == "<string>" and (module.startswith("namedtuple_") or module == "site"):
        return True
    if filename.startswith(SITE_PACKAGES_PATHS):
        return False
    return filename.startswith(SYS_PREFIX_PATHS)


# The loaders whose get_source linecache may call for a file that is not on disk (zipimport,
# frozen modules): the standard library's own. Another loader's is the target's code.
_STDLIB_LOADERS = ("_frozen_importlib", "_frozen_importlib_external", "importlib._bootstrap",
                   "importlib._bootstrap_external", "zipimport")


def loader_globals(module_globals: Any) -> Any:
    """``module_globals`` for linecache, when the source it would fetch through them comes from
    a standard-library loader; else None (linecache then reads only the file)."""
    if type(module_globals) is not dict:
        return None
    for key in ("__loader__", "__spec__"):
        value = module_globals.get(key)
        if value is None:
            continue
        # A loader may be a class (BuiltinImporter, FrozenImporter) or an instance.
        owner = value if issubclass(type(value), type) else type(value)
        if owner.__dict__.get("__module__") not in _STDLIB_LOADERS:
            return None
    return module_globals


def _yield_lines(
    filename: str, module_globals: Any, start: int, collector: Callable[[str], Any], limit: int = 10
) -> Iterator[str]:
    # hunter.event.yield_lines: the dedented lines of one definition, at most `limit` of them.
    dedent = None
    amount = 0
    for line in linecache.getlines(filename, module_globals)[start:start + limit]:
        if dedent is None:
            found = _LEADING_WHITESPACE_RE.findall(line)
            dedent = found[0] if found else ""
            amount = len(dedent)
        elif not line.startswith(dedent):
            break
        collector(line)
        yield line[amount:]


def event_fullsource(filename: str, frame: Any, lineno: int, kind: str) -> str:
    """hunter's Event.fullsource: for a call, the decorators up to the ``def``/``class`` line."""
    try:
        if kind == "call" and frame.f_code.co_name != "<module>":
            lines: List[str] = []
            try:
                readline = partial(
                    next, _yield_lines(filename, loader_globals(frame.f_globals), lineno - 1,
                                 lines.append)
                )
                for _, token, _, _, _ in generate_tokens(readline):
                    if token in ("def", "class", "lambda"):
                        return "".join(lines)
            except TokenError:
                pass
        return linecache.getline(filename, lineno, loader_globals(frame.f_globals))
    except Exception as exc:
        return f"??? NO SOURCE: {exc!r}"


def event_source(filename: str, frame: Any, lineno: int) -> str:
    """hunter's Event.source (the pure-Python one; the Cython one forgets its ``else``)."""
    if filename.endswith((".so", ".pyd")):
        return f"??? NO SOURCE: not reading binary {splitext(basename(filename))[1]} file"
    try:
        return linecache.getline(filename, lineno, loader_globals(frame.f_globals))
    except Exception as exc:
        return f"??? NO SOURCE: {exc!r}"


# The agent imports this module from a _thread thread. Importing threading there would make that
# thread threading's "main thread" for the rest of the process, so threading is only ever looked
# up in sys.modules, and current_thread() is never called (it registers dummy thread objects).
_main_ident_cache: List[Any] = [None, None]  # [pid, ident]
# Per thread, not per ident: idents are reused as soon as a thread is gone.
_this_thread = _thread._local()


def main_thread_ident() -> Optional[int]:
    threading = sys.modules.get("threading")
    if threading is not None:
        return threading.main_thread().ident  # type: ignore[no-any-return]
    pid = os.getpid()
    if _main_ident_cache[0] != pid:
        # sys._current_frames() lists thread states newest first: the oldest is the main thread.
        idents = list(sys._current_frames())
        _main_ident_cache[:] = [pid, idents[-1] if idents else None]
    return _main_ident_cache[1]  # type: ignore[no-any-return]


def current_threadid() -> Optional[int]:
    """hunter's Event.threadid: the thread's ident, None for the main thread."""
    ident = _thread.get_ident()
    return None if ident == main_thread_ident() else ident


def current_threadname() -> str:
    """hunter's Event.threadname (the threading name), without creating dummy thread objects:
    a thread that has already left threading's registry (its last few events) keeps the name it
    had; a thread threading never knew is "Thread-<ident>", as the agent names it."""
    ident = _thread.get_ident()
    threading = sys.modules.get("threading")
    thread = threading._active.get(ident) if threading is not None else None  # type: ignore
    name = thread_name(thread) if thread is not None else None
    if name is not None:
        _this_thread.name = name
        return name
    known: Optional[str] = getattr(_this_thread, "name", None)
    if known is not None:
        return known
    return "MainThread" if ident == main_thread_ident() else f"Thread-{ident}"


# --- modules, read without asking them anything ---------------------------------------------------

def _module_dict(module: Any) -> Optional[Dict[str, Any]]:
    """A module's namespace, or None for anything in sys.modules that is not a module (reading
    attributes of such an object, or of a module subclass, could run its code)."""
    if type(module) is not types.ModuleType:
        return None
    namespace = object.__getattribute__(module, "__dict__")
    return namespace if type(namespace) is dict else None


def _loaded_from_file(name: str) -> List[str]:
    """The loaded modules whose source file is the one ``name`` would be imported from, under
    whatever name they were loaded: ``__main__`` for ``python -m http.server``, uWSGI's
    ``uwsgi_file_app`` for ``--wsgi-file app.py``."""
    path = name.replace(".", "/")
    endings = ("/" + path + ".py", "/" + path + "/__init__.py")
    found = []
    for loaded, module in list(sys.modules.items()):
        namespace = _module_dict(module)
        if namespace is None:
            continue
        filename = plain_str(namespace.get("__file__"))
        if filename is not None and ("/" + filename).endswith(endings):
            found.append(plain_str(namespace.get("__name__")) or str(loaded))
    return sorted(set(found))


# --- comparisons --------------------------------------------------------------------------------

def prepare_value(cmp: str, value: Any) -> Any:
    """The form of a JSON value that compare() wants (regexes compiled, tuples for startswith)."""
    if cmp == "regex":
        return re.compile(value)
    if cmp in ("startswith", "endswith") and isinstance(value, list):
        return tuple(value)
    return value


def compare(cmp: str, evalue: Any, value: Any) -> bool:
    """hunter's Query.__call__ for one entry; ``value`` as returned by prepare_value().

    ``evalue`` comes from the target: unless it is plain (saferepr.is_plain), the answer is
    False without touching it. For ``contains`` on a dict (``locals_contains=name``) only the
    keys take part, so only they need to be plain."""
    if cmp == "contains" and type(evalue) is dict:
        if not is_plain(*evalue):
            return False
    elif not is_plain(evalue):
        return False
    if cmp == "eq":
        return not (evalue != value)
    if cmp == "in":
        return evalue in value
    if cmp == "contains":
        return value in evalue
    if cmp == "startswith":
        return bool(evalue.startswith(value))
    if cmp == "endswith":
        return bool(evalue.endswith(value))
    if cmp == "regex":
        return value.match(evalue) is not None
    if cmp == "lt":
        return bool(evalue < value)
    if cmp == "lte":
        return bool(evalue <= value)
    if cmp == "gt":
        return bool(evalue > value)
    if cmp == "gte":
        return bool(evalue >= value)
    raise ValueError(f"unknown cmp {cmp!r}")


def safe_compare(cmp: str, evalue: Any, value: Any) -> bool:
    try:
        return compare(cmp, evalue, value)
    except Exception:
        return False


# --- tree checks and kind analysis ---------------------------------------------------------------

def check_tree(tree: Any, _depth: int = 0) -> None:
    """Raise ValueError unless ``tree`` is a well-formed query tree."""
    if _depth > MAX_TREE_DEPTH:
        raise ValueError("query tree nests too deeply")
    if not isinstance(tree, dict):
        raise ValueError(f"query node must be an object, got {tree!r}")
    op = tree.get("op")
    if op in ("true", "false"):
        return
    if op in ("and", "or"):
        args = tree.get("args")
        if not isinstance(args, list):
            raise ValueError(f"{op} node needs a list of args")
        for arg in args:
            check_tree(arg, _depth + 1)
    elif op == "not":
        check_tree(tree.get("arg"), _depth + 1)
    elif op == "from":
        check_tree(tree.get("condition"), _depth + 1)
        check_tree(tree.get("predicate"), _depth + 1)
        watermark = tree.get("watermark", 0)
        if not isinstance(watermark, int) or isinstance(watermark, bool):
            raise ValueError("from watermark must be an integer")
    elif op == "cmp":
        field, cmp, value = tree.get("field"), tree.get("cmp"), tree.get("value")
        if field not in FIELDS:
            raise ValueError(f"unknown field {field!r}")
        if cmp not in CMPS:
            raise ValueError(f"unknown cmp {cmp!r}")
        scalars = (str, int, float, type(None))
        if isinstance(value, list):
            if not all(isinstance(v, scalars) for v in value):
                raise ValueError(f"list values must hold scalars: {value!r}")
        elif not isinstance(value, scalars):
            raise ValueError(f"bad value {value!r}")
        if cmp == "regex":
            if not isinstance(value, str):
                raise ValueError("regex needs a string")
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad regex {value!r}: {exc}") from None
    else:
        raise ValueError(f"unknown op {op!r}")


def _kind_leaf_mask(node: Node) -> int:
    value = node["pv"] if "pv" in node else prepare_value(node["cmp"], node["value"])
    mask = 0
    for i, name in enumerate(KINDS):
        if safe_compare(node["cmp"], name, value):
            mask |= 1 << i
    return mask


def _match_mask(node: Node) -> int:
    """Kinds of events that can make ``node`` true (an over-approximation)."""
    op = node["op"]
    if op == "true":
        return ALL_KINDS
    if op == "false":
        return 0
    if op == "cmp":
        return _kind_leaf_mask(node) if node["field"] == "kind" else ALL_KINDS
    if op == "and":
        mask = ALL_KINDS
        for arg in node["args"]:
            mask &= _match_mask(arg)
        return mask
    if op == "or":
        mask = 0
        for arg in node["args"]:
            mask |= _match_mask(arg)
        return mask
    if op == "not":
        return ALL_KINDS & ~_sure_mask(node["arg"])
    # from: whatever it matches, its predicate matched too.
    return _match_mask(node["predicate"])


def _sure_mask(node: Node) -> int:
    """Kinds of events for which ``node`` is certainly true (an under-approximation)."""
    op = node["op"]
    if op == "true":
        return ALL_KINDS
    if op == "cmp":
        return _kind_leaf_mask(node) if node["field"] == "kind" else 0
    if op == "and":
        mask = ALL_KINDS
        for arg in node["args"]:
            mask &= _sure_mask(arg)
        return mask
    if op == "or":
        mask = 0
        for arg in node["args"]:
            mask |= _sure_mask(arg)
        return mask
    if op == "not":
        return ALL_KINDS & ~_match_mask(node["arg"])
    return 0


def _need_mask(node: Node) -> int:
    """Kinds of events that ``from`` nodes must see to keep their state right."""
    op = node["op"]
    if op in ("and", "or"):
        mask = 0
        for arg in node["args"]:
            mask |= _need_mask(arg)
        return mask
    if op == "not":
        return _need_mask(node["arg"])
    if op != "from":
        return 0
    cond, pred = node["condition"], node["predicate"]
    mask = _match_mask(cond) | _match_mask(pred) | _need_mask(cond) | _need_mask(pred)
    # Depth only drops on return events, so with watermark <= 0 a From switches off on a return.
    # A positive watermark can switch it off on any event.
    mask |= RETURN_BIT if node.get("watermark", 0) <= 0 else ALL_KINDS
    return mask


def kinds_mask(tree: Node) -> int:
    """Bitmask of the kinds of events a tracer must deliver: those that can match ``tree``, plus
    those its ``from`` nodes need to see."""
    return _match_mask(tree) | _need_mask(tree)


def has_from(node: Node) -> bool:
    op = node["op"]
    if op == "from":
        return True
    if op in ("and", "or"):
        return any(has_from(arg) for arg in node["args"])
    if op == "not":
        return has_from(node["arg"])
    return False


# --- the program ---------------------------------------------------------------------------------

_C_CMP_FUNCS: Tuple[Callable[[int, int], bool], ...] = (
    lambda a, b: a == b,
    lambda a, b: a != b,
    lambda a, b: a < b,
    lambda a, b: a <= b,
    lambda a, b: a > b,
    lambda a, b: a >= b,
)


def run_program(
    program: Any,
    kind: int,
    depth: int,
    lineno: int,
    calls: int,
    threadid: int,
    pypred: Callable[[int], Any],
) -> bool:
    """Evaluate a postfix program the way the C tracer does. ``threadid`` is -1 for the main
    thread; ``pypred(index)`` answers the PY ops."""
    fields = (depth, lineno, calls, threadid)
    stack: List[bool] = []
    i, end = 0, len(program)
    while i < end:
        op = program[i]
        if op == OP_TRUE:
            stack.append(True)
            i += 1
        elif op == OP_FALSE:
            stack.append(False)
            i += 1
        elif op in (OP_AND, OP_OR):
            b, a = stack.pop(), stack.pop()
            stack.append((a and b) if op == OP_AND else (a or b))
            i += 1
        elif op == OP_NOT:
            stack.append(not stack.pop())
            i += 1
        elif op == OP_KIND:
            stack.append(bool((1 << kind) & program[i + 1]))
            i += 2
        elif op == OP_CMP:
            field, cmp, value = program[i + 1], program[i + 2], program[i + 3]
            stack.append(_C_CMP_FUNCS[cmp](fields[field], value))
            i += 4
        elif op == OP_IN:
            field, count = program[i + 1], program[i + 2]
            stack.append(fields[field] in program[i + 3:i + 3 + count])
            i += 3 + count
        elif op == OP_PY:
            stack.append(bool(pypred(program[i + 1])))
            i += 2
        else:
            raise ValueError(f"bad opcode {op} at {i}")
        if len(stack) > MAX_STACK:
            raise ValueError("program stack overflow")
    if len(stack) != 1:
        raise ValueError(f"program left {len(stack)} values on the stack")
    return stack[0]


def _c_int(field: str, value: Any) -> Optional[int]:
    """``value`` as the C tracer sees that field, or None if no event can have it. Raises
    TypeError for values whose Python comparison C cannot reproduce."""
    if value is None:
        if field == "threadid":
            return MAIN_THREADID
        return None  # an int field never equals None
    if not isinstance(value, int):
        raise TypeError(value)
    if field == "threadid":
        # Idents are unsigned longs; C sees them cast to int64.
        if not 0 <= value < 1 << 64:
            return None
        return value - (1 << 64) if value > INT64_MAX else value
    return value if INT64_MIN <= value <= INT64_MAX else None


def _c_leaf(node: Node) -> Optional[Tuple[List[int], int]]:
    """(code, stack use) for a cmp node C can evaluate, else None (it becomes a PY op)."""
    field, cmp, value = node["field"], node["cmp"], node["value"]
    if field == "kind":
        return [OP_KIND, node["km"]], 1
    if field not in C_FIELDS:
        return None
    code = C_FIELDS[field]
    try:
        if cmp == "eq":
            v = _c_int(field, value)
            return ([OP_FALSE], 1) if v is None else ([OP_CMP, code, C_CMPS["eq"], v], 1)
        if cmp == "in" and isinstance(value, list):
            values = [_c_int(field, item) for item in value]
            found = sorted(set(v for v in values if v is not None))
            return [OP_IN, code, len(found)] + found, 1
    except TypeError:
        return None
    if cmp in ("lt", "lte", "gt", "gte") and type(value) is int:
        if field == "threadid":
            # None (main thread) does not compare with ints: the predicate is False there.
            if not 0 <= value <= INT64_MAX:
                return None
            return [OP_CMP, code, CMP_NE, MAIN_THREADID,
                    OP_CMP, code, C_CMPS[cmp], value, OP_AND], 2
        if value > INT64_MAX:
            return ([OP_TRUE] if cmp in ("lt", "lte") else [OP_FALSE]), 1
        if value < INT64_MIN:
            return ([OP_FALSE] if cmp in ("lt", "lte") else [OP_TRUE]), 1
        return [OP_CMP, code, C_CMPS[cmp], value], 1
    return None


# --- the filter ----------------------------------------------------------------------------------

class Decision:
    """What the tracer caches per code object; see docs/internals.md."""

    __slots__ = ("never", "program", "kinds")

    def __init__(self, never: bool, program: Optional[array.array[int]], kinds: int) -> None:
        self.never = never
        self.program = program
        self.kinds = kinds

    def __repr__(self) -> str:
        program = None if self.program is None else list(self.program)
        return f"Decision(never={self.never}, program={program}, kinds={self.kinds:#06b})"


class _Event:
    __slots__ = ("frame", "kind", "arg", "depth", "calls")

    def __init__(self, frame: Any, kind: int, arg: Any, depth: int, calls: int) -> None:
        self.frame = frame
        self.kind = kind
        self.arg = arg
        self.depth = depth
        self.calls = calls


class Filter:
    """A query tree ready to be evaluated: per code object (decide) and per event (pypred,
    match_event). Caches are plain dicts: single operations are atomic under the GIL, and a
    lost update only costs a recomputation."""

    def __init__(
        self, tree: Node, resolve_modules: bool = True, per_thread_state: bool = True
    ) -> None:
        check_tree(tree)
        #: {module name as typed: name its frames report}, e.g. {"os.path": "posixpath"}.
        self.aliases: Dict[str, str] = {}
        #: {module name as typed: loaded modules whose file has that name} for the names that
        #: are not in sys.modules, e.g. {"app": ["uwsgi_file_app"]}: nothing matches them yet.
        self.missing: Dict[str, List[str]] = {}
        self._resolve_modules = resolve_modules
        self.tree = self._prepare(tree)
        self._py_nodes: List[Node] = []
        self._py_index: Dict[int, int] = {}
        self._per_thread = per_thread_state
        self._local = _thread._local()
        self._shared_states: Dict[int, Tuple[int, int]] = {}
        self._statics_cache: Dict[Any, Dict[str, Any]] = {}
        self._source_cache: Dict[Any, str] = {}

    # Building -------------------------------------------------------------------------------

    def _prepare(self, node: Node) -> Node:
        """A private copy of the tree: every node a distinct object (From state is keyed by node
        identity), values in compare()'s form under "pv", kind masks under "km"."""
        op = node["op"]
        if op in ("and", "or"):
            args = [self._prepare(arg) for arg in node["args"]]
            if not args:
                return dict(TRUE if op == "and" else FALSE)
            return {"op": op, "args": args}
        if op == "not":
            return {"op": "not", "arg": self._prepare(node["arg"])}
        if op == "from":
            return {
                "op": "from",
                "condition": self._prepare(node["condition"]),
                "predicate": self._prepare(node["predicate"]),
                "watermark": node.get("watermark", 0),
            }
        if op != "cmp":
            return dict(node)
        value = node["value"]
        if node["field"] == "module" and self._resolve_modules:
            if node["cmp"] == "eq":
                value = self._resolve(value)
            elif node["cmp"] == "in" and isinstance(value, list):
                value = value + [m for m in map(self._resolve, value) if m not in value]
        new = {"op": "cmp", "field": node["field"], "cmp": node["cmp"], "value": value}
        new["pv"] = prepare_value(new["cmp"], value)
        if new["field"] == "kind":
            new["km"] = _kind_leaf_mask(new)
        return new

    def _resolve(self, name: Any) -> Any:
        # Frames report the module's __name__, which is not always the name it was imported as.
        if not isinstance(name, str):
            return name
        module = _module_dict(sys.modules.get(name))
        if module is None:
            self.missing[name] = _loaded_from_file(name)
            return name
        real = plain_str(module.get("__name__"))
        if real is not None and real != name:
            self.aliases[name] = real
            return real
        return name

    def _register(self, node: Node) -> int:
        index = self._py_index.get(id(node))
        if index is None:
            index = len(self._py_nodes)
            self._py_nodes.append(node)  # keeps the node alive, so its id stays unique
            self._py_index[id(node)] = index
        return index

    # Per code object -------------------------------------------------------------------------

    def _statics(self, code: Any, module: Any, module_file: Any = None) -> Dict[str, Any]:
        if module is None:
            module = "?"
        elif not is_plain(module):
            # A __name__ the target made of its own objects: hashing it for the cache or
            # comparing it could run its code. It stands for itself and never matches.
            module = _OPAQUE
        module_file = plain_str(module_file)
        key: Optional[Tuple[Any, Any, Any]] = (code, module, module_file)
        try:
            return self._statics_cache[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable __name__: don't cache
            key = None
        filename = event_filename(code.co_filename, module_file)
        try:
            stdlib = event_stdlib(module, filename)
        except Exception:
            stdlib = False
        statics = {
            "module": module, "function": code.co_name, "filename": filename,
            "stdlib": stdlib, "builtin": False,
        }
        if key is not None:
            if len(self._statics_cache) > _CACHE_LIMIT:
                self._statics_cache.clear()
            self._statics_cache[key] = statics
        return statics

    def _frame_statics(self, frame: Any) -> Dict[str, Any]:
        code = frame.f_code
        module = frame.f_globals.get("__name__", "")
        module_file = None if code.co_filename else frame.f_globals.get("__file__")
        return self._statics(code, module, module_file)

    def decide(self, code: Any, module_name: Optional[str], module_file: Any = None) -> Decision:
        """Fold the static fields of ``code`` into the tree. ``module_name`` is the frame's
        ``f_globals.get('__name__', '')``; ``module_file`` its ``__file__``, needed only when
        ``code.co_filename`` is empty."""
        residual = self._partial(self.tree, self._statics(code, module_name, module_file))
        kinds = kinds_mask(residual)
        if residual["op"] == "false" or kinds == 0:
            return Decision(True, None, 0)
        if residual["op"] == "true":
            return Decision(False, None, ALL_KINDS)
        return Decision(False, self._compile(residual), kinds)

    def _partial(self, node: Node, statics: Dict[str, Any]) -> Node:
        op = node["op"]
        if op == "cmp":
            field = node["field"]
            if field in STATIC_FIELDS:
                return TRUE if safe_compare(node["cmp"], statics[field], node["pv"]) else FALSE
            if field == "kind" and node["km"] in (0, ALL_KINDS):
                return TRUE if node["km"] else FALSE
            return node
        if op in ("and", "or"):
            decisive, neutral = ("false", "true") if op == "and" else ("true", "false")
            args: List[Node] = []
            for arg in node["args"]:
                folded = self._partial(arg, statics)
                if folded["op"] == neutral:
                    continue
                if folded["op"] == decisive:
                    # hunter short-circuits left to right: a From before this point still runs.
                    if not any(has_from(a) for a in args):
                        return folded
                    args.append(folded)
                    break
                args.append(folded)
            if not args:
                return TRUE if op == "and" else FALSE
            if len(args) == 1:
                return args[0]
            return {"op": op, "args": args}
        if op == "not":
            folded = self._partial(node["arg"], statics)
            if folded["op"] in ("true", "false"):
                return FALSE if folded["op"] == "true" else TRUE
            return {"op": "not", "arg": folded}
        return node  # true, false, from (stateful: evaluated whole, at run time)

    def _compile(self, residual: Node) -> array.array[int]:
        if not has_from(residual):
            code, stack = self._emit(residual)
            if stack <= MAX_STACK:
                return array.array("q", code)
        # From's state depends on hunter's short-circuit order, which the postfix program does
        # not have (it evaluates both sides of AND/OR): evaluate such trees in Python.
        return array.array("q", [OP_PY, self._register(residual)])

    def _emit(self, node: Node) -> Tuple[List[int], int]:
        op = node["op"]
        if op == "true":
            return [OP_TRUE], 1
        if op == "false":
            return [OP_FALSE], 1
        if op in ("and", "or"):
            opcode = OP_AND if op == "and" else OP_OR
            code, stack = self._emit(node["args"][0])
            for arg in node["args"][1:]:
                more, more_stack = self._emit(arg)
                code += more
                code.append(opcode)
                stack = max(stack, more_stack + 1)
            return code, stack
        if op == "not":
            arg = node["arg"]
            if arg["op"] == "cmp" and arg["field"] == "kind":
                return [OP_KIND, ALL_KINDS & ~arg["km"]], 1
            code, stack = self._emit(arg)
            return code + [OP_NOT], stack
        leaf = _c_leaf(node) if op == "cmp" else None
        if leaf is None:
            return [OP_PY, self._register(node)], 1
        return leaf

    # Per event --------------------------------------------------------------------------------

    def pypred(self, index: int, frame: Any, kind: int, arg: Any, depth: int, calls: int) -> bool:
        """Answer a PY op. Never raises."""
        try:
            return self._eval(self._py_nodes[index], _Event(frame, kind, arg, depth, calls))
        except Exception:
            return False

    def match_event(
        self, frame: Any, kind: Union[int, str], arg: Any, depth: int, calls: int
    ) -> bool:
        """Evaluate the whole tree on one event (kind as an index into KINDS or its name)."""
        try:
            if isinstance(kind, str):
                kind = KIND_INDEX[kind]
            return self._eval(self.tree, _Event(frame, kind, arg, depth, calls))
        except Exception:
            return False

    def _eval(self, node: Node, event: _Event) -> bool:
        op = node["op"]
        if op == "cmp":
            try:
                return compare(node["cmp"], self._field(node["field"], event), node["pv"])
            except Exception:
                return False
        if op == "and":
            for arg in node["args"]:
                if not self._eval(arg, event):
                    return False
            return True
        if op == "or":
            for arg in node["args"]:
                if self._eval(arg, event):
                    return True
            return False
        if op == "not":
            return not self._eval(node["arg"], event)
        if op == "from":
            return self._eval_from(node, event)
        return op == "true"

    def _from_states(self) -> Dict[int, Tuple[int, int]]:
        if not self._per_thread:
            return self._shared_states
        try:
            states: Dict[int, Tuple[int, int]] = self._local.states
        except AttributeError:
            states = self._local.states = {}
        return states

    def _eval_from(self, node: Node, event: _Event) -> bool:
        # hunter.predicates.From.__call__, with the state in a per-thread dict.
        states = self._from_states()
        origin = states.get(id(node))
        if origin is None:
            if not self._eval(node["condition"], event):
                return False
            states[id(node)] = (event.depth, event.calls)
            delta_depth = delta_calls = 0
        else:
            delta_depth = event.depth - origin[0]
            delta_calls = event.calls - origin[1]
            if delta_depth < node["watermark"]:
                del states[id(node)]
                return False
        predicate = node["predicate"]
        if predicate["op"] == "true":
            return True
        relative = _Event(event.frame, event.kind, event.arg, delta_depth, delta_calls)
        return self._eval(predicate, relative)

    def _field(self, name: str, event: _Event) -> Any:
        if name == "kind":
            return KINDS[event.kind]
        if name == "depth":
            return event.depth
        if name == "calls":
            return event.calls
        frame = event.frame
        if name in STATIC_FIELDS:
            return self._frame_statics(frame)[name]
        if name == "lineno":
            return frame.f_lineno
        if name == "threadid":
            return current_threadid()
        if name == "threadname":
            return current_threadname()
        if name == "arg":
            return event.arg
        if name == "locals":
            return frame.f_locals
        if name == "globals":
            return frame.f_globals
        if name in ("source", "fullsource"):
            return self._source(name, frame, KINDS[event.kind])
        raise KeyError(name)

    def _source(self, name: str, frame: Any, kind: str) -> str:
        code, lineno = frame.f_code, frame.f_lineno
        # fullsource only differs from source for call events.
        key = (name, code, lineno, name == "fullsource" and kind == "call")
        try:
            return self._source_cache[key]
        except KeyError:
            pass
        filename = self._frame_statics(frame)["filename"]
        if name == "source":
            text = event_source(filename, frame, lineno)
        else:
            text = event_fullsource(filename, frame, lineno, kind)
        if len(self._source_cache) > _CACHE_LIMIT:
            self._source_cache.clear()
        self._source_cache[key] = text
        return text
