"""Turn hunter-trace's query terms into the JSON query tree (docs/internals.md, "Query tree").

Terms are ANDed. Each is one of:

- ``field[_operator]=value``: ``module=os.path``, ``depth_lt=3``, ``stdlib=False``,
  ``function_sw=("get", "set")``. A value written as a Python literal (quoted string, int,
  True/False/None, tuple or list) is that literal; otherwise it is the text as typed, and for
  ``_in``/``_sw``/``_ew`` a comma-separated text is a list (``kind_in=call,return``).
  Regex values are always taken as typed unless quoted. ``~field=value`` negates.
- a bare boolean field, ``stdlib`` or ``~stdlib``;
- a hunter expression: ``Q(...)``, ``And``, ``Or``, ``Not``, ``From``, ``&``, ``|``, ``~`` and
  parentheses, with literal keyword values, e.g. ``Q(module="app") & ~Q(function_sw="_")``.

Expressions are read with :mod:`ast` and converted under a whitelist; nothing is evaluated.
"""

from __future__ import annotations

import ast
import difflib
import re
import warnings
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Set

from . import filters
from .errors import QueryError

Node = Dict[str, Any]

MAX_QUERY_CHARS = 10_000
MAX_DEPTH = 32
MAX_INT = 1 << 64

OPERATORS = {
    "in": "in", "contains": "contains", "has": "contains", "startswith": "startswith",
    "sw": "startswith", "endswith": "endswith", "ew": "endswith", "regex": "regex", "rx": "regex",
    "lt": "lt", "lte": "lte", "gt": "gt", "gte": "gte",
}
STRING_FIELDS = frozenset(
    ("kind", "function", "module", "filename", "threadname", "source", "fullsource")
)
INT_FIELDS = frozenset(("lineno", "depth", "calls"))
BOOL_FIELDS = frozenset(("stdlib", "builtin"))
DICT_FIELDS = frozenset(("locals", "globals"))
# hunter Event attributes a query may name in hunter, but not here.
UNSUPPORTED_FIELDS = frozenset(("code", "instruction", "detached", "threading_support"))
ORDERING = ("lt", "lte", "gt", "gte")
SEQUENCE_OPS = ("in", "startswith", "endswith")
CONSTRUCTORS = ("Q", "And", "Or", "Not", "From")

_KV_TERM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)(.*)\Z", re.DOTALL)
# `module=a & function=b` as one word: probably meant as two conditions.
_JOINED_TERMS = re.compile(r"\s[&|]\s*~?\s*[A-Za-z_]\w*\s*=")
_NOT_LITERAL = object()


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _fail(term: str, message: str, hint: Optional[str] = None) -> NoReturn:
    raise QueryError(f"bad query term {_short(term)}: {message}", hint)


def _did_you_mean(word: str, known: Sequence[str]) -> Optional[str]:
    """A hint naming the known word closest to a misspelt one, if any is close."""
    close = difflib.get_close_matches(word, list(known), n=1)
    if not close:
        return None
    return f"Did you mean {close[0]!r}? See 'Query language' in the README."


# --- public API ---------------------------------------------------------------------------------

def parse_query(terms: Sequence[str]) -> Node:
    """The query tree for the CLI's terms (ANDed; none means everything matches)."""
    for term in terms:
        if not isinstance(term, str):
            raise QueryError(f"query terms must be strings, got {term!r}")
    if sum(len(term) for term in terms) > MAX_QUERY_CHARS:
        raise QueryError(f"query is longer than {MAX_QUERY_CHARS} characters")
    trees = [_parse_term(term) for term in terms]
    tree = _combine("and", trees)
    try:
        filters.check_tree(tree)  # the target's own check; the parser should never trip it
    except ValueError as exc:
        raise QueryError(f"internal error: {exc}") from None
    return tree


def possible_kinds(tree: Node) -> Set[str]:
    """The kinds of events the tracer must deliver for ``tree``: those that can match, plus those
    a From needs to see to switch on and off. Without line and exception a profile hook will do."""
    mask = filters.kinds_mask(tree)
    return {name for i, name in enumerate(filters.KINDS) if mask & (1 << i)}


def describe(tree: Node) -> str:
    """One line in hunter's syntax; parse_query([describe(tree)]) gives ``tree`` back."""
    return _render(tree, 0)


# --- terms --------------------------------------------------------------------------------

def _parse_term(term: str) -> Node:
    if not term.strip():
        raise QueryError("empty query term")
    match = _KV_TERM.match(term)
    if match:
        key, raw = match.group(1), match.group(2).strip()
        return _make_cmp(term, key, _bare_value(term, key, raw), bare=True, raw=raw)
    rest = term.lstrip()[1:]
    if term.lstrip().startswith("~") and _KV_TERM.match(rest.lstrip("~")):
        return _negate(_parse_term(rest))  # `~kind=line`, the CLI spelling of ~Q(kind='line')
    return _Converter(term).convert()


def _bare_value(term: str, key: str, raw: str) -> Any:
    """The value of a ``key=raw`` term: a Python literal if it is written as one, else the text."""
    if not raw:
        _fail(term, f"missing value after '='; write {key}='' for an empty string")
    field, op = _split_key(term, key)
    quoted = raw[0] in "'\""
    if quoted or (op != "regex" and raw[0] in "(["):
        value = _text_literal(term, raw, strict=True)
        if value is _NOT_LITERAL:
            _fail(term, f"{_short(raw)} is not a valid Python string, tuple or list")
        return value
    if op == "regex":
        return raw
    if _JOINED_TERMS.search(raw):
        _fail(term, "this looks like several conditions in one term; pass them as separate "
                    "terms, or write Q(...) & Q(...)")
    # `function=1.5` is the text "1.5", but `depth=1.5` is an error worth explaining.
    value = _text_literal(term, raw, strict=field not in STRING_FIELDS)
    if value is _NOT_LITERAL:
        if op in SEQUENCE_OPS and "," in raw:
            return [part.strip() for part in raw.split(",")]
        return raw
    return value


def _parse(text: str) -> ast.Expression:
    # Quoted regexes like '\d+' make the parser warn about escapes; that is noise on our stderr.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(text, mode="eval")


def _text_literal(term: str, raw: str, strict: bool) -> Any:
    """The literal ``raw`` spells, or _NOT_LITERAL. With ``strict``, a literal of a type we do
    not support (float, bytes, a huge int) is an error rather than not-a-literal."""
    try:
        node = _parse(raw).body
    except Exception:  # SyntaxError, ValueError (NUL bytes), RecursionError, MemoryError
        return _NOT_LITERAL
    try:
        return _literal(term, node, raw, source=raw)
    except QueryError:
        looks_literal = isinstance(node, (ast.Constant, ast.UnaryOp)) and not isinstance(
            getattr(node, "operand", node), (ast.Name, ast.Call))
        if strict and looks_literal:
            raise
        return _NOT_LITERAL


def _literal(
    term: str, node: ast.AST, where: str, source: Optional[str] = None, nested: bool = False
) -> Any:
    """A JSON value for a literal: str, int, bool, None, or a flat list of those. ``source`` is
    the text ``node`` was parsed from, if not ``term``."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (str, bool)):
            return value
        if isinstance(value, int):
            if not -MAX_INT < value < MAX_INT:
                _fail(term, f"{where} is out of range")
            return value
        _fail(term, f"{type(value).__name__} values are not supported (in {where})")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if isinstance(operand, ast.Constant) and type(operand.value) is int:
            value = -operand.value if isinstance(node.op, ast.USub) else operand.value
            if not -MAX_INT < value < MAX_INT:
                _fail(term, f"{where} is out of range")
            return value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and not nested:
        return [_literal(term, item, where, source, nested=True) for item in node.elts]
    segment = _segment(term if source is None else source, node)
    _fail(term, f"{_short(segment)} is not a literal value (in {where}); quote strings: '...'")


def _segment(term: str, node: ast.AST) -> str:
    try:
        text = ast.get_source_segment(term, node)
    except Exception:
        text = None
    return text if text is not None else type(node).__name__


def _split_key(term: str, key: str) -> tuple[str, str]:
    """(field, canonical operator) for ``key``, split the way hunter does (on '_')."""
    parts = [p for p in key.split("_") if p]
    if not parts or len(parts) > 2:
        keys = [f"{parts[0]}_{op}" for op in OPERATORS] if parts else []
        _fail(term, "{!r} is not field or field_operator; fields: {}".format(
            key, ", ".join(filters.FIELDS)), _did_you_mean(key, keys))
    field = parts[0]
    if field not in filters.FIELDS:
        if field in UNSUPPORTED_FIELDS:
            _fail(term, f"hunter-trace cannot filter on {field!r}")
        _fail(term, "unknown field {!r}; fields: {}".format(field, ", ".join(filters.FIELDS)),
              _did_you_mean(field, filters.FIELDS))
    if len(parts) == 1:
        return field, "eq"
    op = OPERATORS.get(parts[1])
    if op is None:
        hint = f" (equality has no suffix: {field}=...)" if parts[1] == "eq" else ""
        _fail(term, "unknown operator {!r} in {!r}{}; operators: {}".format(
            parts[1], key, hint, ", ".join(OPERATORS)),
            _did_you_mean(key, [f"{field}_{name}" for name in OPERATORS])
            if parts[1] != "eq" else None)
    return field, op


def _make_cmp(term: str, key: str, value: Any, bare: bool = False, raw: str = "") -> Node:
    field, op = _split_key(term, key)
    if bare and field in STRING_FIELDS and isinstance(value, (int, type(None))):
        value = raw  # `function=None` or `threadname=1`: the text is what was meant
    return {"op": "cmp", "field": field, "cmp": op, "value": _check_value(term, key, field, op,
                                                                          value)}


def _type_name(value: Any) -> str:
    return "a list" if isinstance(value, list) else repr(value)


def _check_value(term: str, key: str, field: str, op: str, value: Any) -> Any:
    """Reject values hunter would choke on or that can never match; return the value."""

    def bad(message: str) -> NoReturn:
        _fail(term, f"{key}: {message}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_str_list(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(item, str) for item in v)

    got = _type_name(value)
    if op == "regex":
        if not isinstance(value, str):
            bad(f"a regex must be a string, got {got}")
        try:
            re.compile(value)
        except re.error as exc:
            bad(f"bad regex {value!r}: {exc}")
        except (RecursionError, OverflowError, MemoryError):
            bad(f"regex {_short(value)} is too complex")
    if field in DICT_FIELDS:
        if op != "contains" or not isinstance(value, str):
            bad(f"{field} only supports {field}_contains (or {field}_has) with a variable name")
        return value
    if field in INT_FIELDS or field == "threadid":
        if op not in ("eq", "in") + ORDERING:
            bad(f"{field} is a number; _{op} needs a text field")
        if field == "threadid":
            def ok(v: Any) -> bool:
                return is_int(v) or v is None
            what = "an integer (a thread ident) or None (the main thread)"
        else:
            ok, what = is_int, "an integer"
        if op == "eq" and not ok(value):
            bad(f"expects {what}, got {got}")
        if op == "in" and not (isinstance(value, list) and all(ok(v) for v in value)):
            bad(f"expects a list of integers, got {got}")
        if op in ORDERING and not is_int(value):
            bad(f"expects an integer, got {got}")
        return value
    if field in BOOL_FIELDS:
        if op == "eq" and isinstance(value, bool):
            return value
        if op == "in" and isinstance(value, list) and all(isinstance(v, bool) for v in value):
            return value
        bad(f"{field} is True or False; write {field}=True, {field}=False or ~{field}")
    if field in STRING_FIELDS:
        if op in ("eq", "contains", "regex") + ORDERING and not isinstance(value, str):
            bad(f"expects a string, got {got}")
        if op in SEQUENCE_OPS and not (isinstance(value, str) or is_str_list(value)):
            bad(f"expects a string or a list of strings, got {got}")
        if field == "kind":
            kinds = [value] if op == "eq" else value if op == "in" and is_str_list(value) else []
            for kind in kinds:
                if kind not in filters.KINDS:
                    bad(f"kind {kind!r} is not one of {', '.join(filters.KINDS)}")
        return value
    # arg can be any object; only reject what can never work.
    if op in ("startswith", "endswith") and not (isinstance(value, str) or is_str_list(value)):
        bad(f"expects a string or a list of strings, got {got}")
    if op in ("eq", "contains") and isinstance(value, list):
        bad("compares with a single value, not a list")
    if op in ORDERING and not (is_int(value) or isinstance(value, str)):
        bad(f"expects a number or a string, got {got}")
    return value


# --- expressions ---------------------------------------------------------------------------------

def _combine(op: str, args: List[Node]) -> Node:
    """An and/or node, flattened; a single argument stands alone."""
    flat: List[Node] = []
    for arg in args:
        flat.extend(arg["args"] if arg["op"] == op else [arg])
    if len(flat) == 1:
        return flat[0]
    if not flat:
        return {"op": "true"} if op == "and" else {"op": "false"}
    return {"op": op, "args": flat}


def _negate(tree: Node) -> Node:
    return tree["arg"] if tree["op"] == "not" else {"op": "not", "arg": tree}


class _Converter:
    """A hunter expression, read from its AST under a whitelist."""

    def __init__(self, term: str) -> None:
        self.term = term
        self.source = term.strip()  # what the AST's offsets refer to

    def fail(self, node: ast.AST, message: str) -> NoReturn:
        _fail(self.term, f"{_short(_segment(self.source, node), 60)} {message}")

    def convert(self) -> Node:
        try:
            tree = _parse(self.source)
        except SyntaxError as exc:
            where = f" at column {exc.offset}" if exc.offset else ""
            _fail(self.term, f"not a field=value term nor a hunter expression ({exc.msg}{where})")
        except ValueError as exc:
            _fail(self.term, f"cannot be read: {exc}")
        except (RecursionError, MemoryError, OverflowError) as exc:
            _fail(self.term, f"cannot be read: {type(exc).__name__}")
        return self.predicate(tree.body, 0)

    def predicate(self, node: ast.AST, depth: int) -> Node:
        if depth > MAX_DEPTH:
            _fail(self.term, f"nests more than {MAX_DEPTH} levels deep")
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, (ast.BitAnd, ast.BitOr)):
                op = "and" if isinstance(node.op, ast.BitAnd) else "or"
                return _combine(op, [self.predicate(n, depth + 1)
                                     for n in self._chain(node, type(node.op))])
            self.fail(node, "uses an operator that is not allowed; combine predicates with "
                            "&, | and ~")
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Invert):
                return _negate(self.predicate(node.operand, depth + 1))
            if isinstance(node.op, ast.Not):
                self.fail(node, "uses 'not'; write ~ instead")
            self.fail(node, "is not a predicate")
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.BoolOp):
            self.fail(node, "uses and/or; write & and | instead")
        if isinstance(node, ast.Compare):
            self.fail(node, "is a comparison; write field=value or field_lt=value "
                            "(inside Q(...) when combining)")
        if isinstance(node, ast.Constant):
            self.fail(node, "is a constant, not a predicate")
        self.fail(node, f"is not allowed ({type(node).__name__}); only Q, And, Or, Not, From, "
                        "&, |, ~ and literals are")

    @staticmethod
    def _chain(node: ast.BinOp, optype: type) -> List[ast.AST]:
        # a & b & c is left-nested; walk it without recursing so long chains are fine.
        items: List[ast.AST] = []
        stack: List[ast.AST] = [node]
        while stack:
            item = stack.pop()
            if isinstance(item, ast.BinOp) and isinstance(item.op, optype):
                stack.append(item.right)
                stack.append(item.left)
            else:
                items.append(item)
        return items

    def name(self, node: ast.Name) -> Node:
        if node.id in BOOL_FIELDS:
            return {"op": "cmp", "field": node.id, "cmp": "eq", "value": True}
        if node.id in filters.FIELDS:
            self.fail(node, f"is not a predicate on its own; write {node.id}=VALUE")
        if node.id in CONSTRUCTORS:
            self.fail(node, f"must be called: {node.id}(...)")
        self.fail(node, "is not a known name; strings need quotes inside expressions")

    def call(self, node: ast.Call, depth: int) -> Node:
        func = node.func
        if not isinstance(func, ast.Name):
            self.fail(func, "is called, but only Q, And, Or, Not and From may be")
        name = func.id
        if name == "When":
            self.fail(node, "is not supported: When runs actions, and hunter-trace prints "
                            "events itself; use the condition alone as the query")
        if name == "Backlog":
            self.fail(node, "is not supported (Backlog buffers events for an action)")
        if name not in CONSTRUCTORS:
            self.fail(func, "is called, but only Q, And, Or, Not and From may be")
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                self.fail(arg, "is not allowed (no *args)")
        for keyword in node.keywords:
            if keyword.arg is None:
                self.fail(keyword.value, "is not allowed (no **kwargs)")
        if name == "From":
            return self.from_(node, depth)
        preds = [self.predicate(arg, depth + 1) for arg in node.args]
        keywords = list(node.keywords)
        for keyword in keywords:
            if keyword.arg in ("action", "actions"):
                self.fail(keyword.value, "is an action; hunter-trace does not run actions")
        cmps = self.keyword_cmps(keywords)
        if name == "Q":
            return _combine("and", preds + cmps)
        if not preds and not cmps:
            self.fail(node, "needs at least one predicate")
        if name == "And":
            return _combine("and", preds + cmps)
        if name == "Or":
            # hunter's Or(a=1, b=2) is Or(Q(a=1), Q(b=2)), unlike Q and And.
            return _combine("or", preds + cmps)
        return _negate(_combine("and", preds + cmps))  # Not

    def keyword_cmps(self, keywords: List[ast.keyword]) -> List[Node]:
        cmps: List[Node] = []
        seen: Dict[tuple[str, str], str] = {}
        for keyword in keywords:
            key = keyword.arg or ""
            value = _literal(self.term, keyword.value, key, source=self.source)
            cmp = _make_cmp(self.term, key, value)
            slot = (cmp["field"], cmp["cmp"])
            if slot in seen:
                # hunter keeps only the last of module_sw=... and module_startswith=...
                _fail(self.term, f"{seen[slot]} and {key} set the same condition twice")
            seen[slot] = key
            cmps.append(cmp)
        return cmps

    def from_(self, node: ast.Call, depth: int) -> Node:
        # hunter.From(condition=None, predicate=None, watermark=0, **kwargs)
        params: Dict[str, Optional[ast.AST]] = {"condition": None, "predicate": None,
                                                 "watermark": None}
        if len(node.args) > 3:
            self.fail(node, "takes at most 3 positional arguments (condition, predicate, "
                            "watermark)")
        for pname, arg in zip(params, node.args):
            params[pname] = arg
        query_keywords = []
        for keyword in node.keywords:
            if keyword.arg in params:
                if params[keyword.arg] is not None:
                    self.fail(node, f"gives {keyword.arg} twice")
                params[keyword.arg] = keyword.value
            else:
                query_keywords.append(keyword)

        def optional_predicate(arg: Optional[ast.AST]) -> Optional[Node]:
            if arg is None or (isinstance(arg, ast.Constant) and arg.value is None):
                return None
            return self.predicate(arg, depth + 1)

        condition = optional_predicate(params["condition"])
        predicate = optional_predicate(params["predicate"])
        watermark = 0
        if params["watermark"] is not None:
            watermark = _literal(self.term, params["watermark"], "watermark", self.source)
            if type(watermark) is not int:
                self.fail(params["watermark"], "is not an integer watermark")
        if condition is None and predicate is None:
            # hunter: depth*/calls* keywords limit the predicate, the rest make the condition.
            cmps = self.keyword_cmps(query_keywords)
            is_relative = [(k.arg or "").startswith(("depth", "calls")) for k in query_keywords]
            condition = _combine("and", [c for c, rel in zip(cmps, is_relative) if not rel])
            predicate = _combine("and", [c for c, rel in zip(cmps, is_relative) if rel])
        elif query_keywords:
            self.fail(node, "mixes a condition with keyword filters, which hunter rejects; "
                            "write From(Q(...), Q(depth_lt=...))")
        elif condition is None:
            self.fail(node, "needs a condition")
        tree: Node = {"op": "from", "condition": condition,
                      "predicate": predicate if predicate is not None else {"op": "true"}}
        if watermark:
            tree["watermark"] = watermark
        return tree


# --- rendering --------------------------------------------------------------------------------

_PRECEDENCE = {"or": 1, "and": 2, "not": 3}


def _render(tree: Node, parent: int) -> str:
    op = tree["op"]
    if op == "true":
        return "Q()"
    if op == "false":
        return "~Q()"
    if op == "cmp":
        key = tree["field"] if tree["cmp"] == "eq" else "{}_{}".format(tree["field"], tree["cmp"])
        return "Q({}={!r})".format(key, tree["value"])
    if op == "from":
        text = "From({}, {}".format(_render(tree["condition"], 0), _render(tree["predicate"], 0))
        if tree.get("watermark"):
            text += ", watermark={}".format(tree["watermark"])
        return text + ")"
    precedence = _PRECEDENCE[op]
    if op == "not":
        text = "~" + _render(tree["arg"], precedence)
    else:
        joiner = " & " if op == "and" else " | "
        text = joiner.join(_render(arg, precedence) for arg in tree["args"])
    return f"({text})" if precedence <= parent and op != "not" else text
