"""query.py: every field x operator, aliases, quoting, compositions, errors, kinds, describe."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

import pytest

from hunter_attach import filters
from hunter_attach.errors import QueryError
from hunter_attach.query import (
    MAX_QUERY_CHARS,
    OPERATORS,
    describe,
    parse_query,
    possible_kinds,
)


def cmp(field: str, op: str, value: Any) -> Dict[str, Any]:
    return {"op": "cmp", "field": field, "cmp": op, "value": value}


def and_(*args: Any) -> Dict[str, Any]:
    return {"op": "and", "args": list(args)}


def or_(*args: Any) -> Dict[str, Any]:
    return {"op": "or", "args": list(args)}


def not_(arg: Any) -> Dict[str, Any]:
    return {"op": "not", "arg": arg}


TRUE = {"op": "true"}


def from_(condition: Any, predicate: Any = TRUE, watermark: int = 0) -> Dict[str, Any]:
    tree = {"op": "from", "condition": condition, "predicate": predicate}
    if watermark:
        tree["watermark"] = watermark
    return tree


def fails(terms: List[str], *fragments: str) -> str:
    with pytest.raises(QueryError) as info:
        parse_query(terms)
    message = str(info.value)
    assert info.value.exit_code == 2
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- every field x operator ----------------------------------------------------------------------

# For each kind of field: canonical operator -> (bare value text, parsed value).
TEXT_VALUES = {
    "eq": ("abc", "abc"), "in": ("a,b", ["a", "b"]), "contains": ("x", "x"),
    "startswith": ("('a','b')", ["a", "b"]), "endswith": ("z", "z"), "regex": ("^a.*", "^a.*"),
    "lt": ("m", "m"), "lte": ("m", "m"), "gt": ("m", "m"), "gte": ("m", "m"),
}
KIND_VALUES = dict(TEXT_VALUES, eq=("call", "call"), **{"in": ("call,line", ["call", "line"])})
INT_VALUES = {
    "eq": ("3", 3), "in": ("[1, 2]", [1, 2]), "lt": ("3", 3), "lte": ("-1", -1),
    "gt": ("0", 0), "gte": ("+7", 7),
}
THREADID_VALUES = dict(INT_VALUES, eq=("None", None), **{"in": ("(None, 5)", [None, 5])})
BOOL_VALUES = {"eq": ("False", False), "in": ("[True]", [True])}
ARG_VALUES = {
    "eq": ("1", 1), "in": ("[1, 'x', None]", [1, "x", None]), "contains": ("'x'", "x"),
    "startswith": ("a", "a"), "endswith": ("('a', 'b')", ["a", "b"]), "regex": ("^a", "^a"),
    "lt": ("3", 3), "lte": ("'q'", "q"), "gt": ("-2", -2), "gte": ("x", "x"),
}
DICT_VALUES = {"contains": ("x", "x")}

FIELD_VALUES: Dict[str, Dict[str, Tuple[str, Any]]] = {
    "kind": KIND_VALUES, "function": TEXT_VALUES, "module": TEXT_VALUES, "filename": TEXT_VALUES,
    "threadname": TEXT_VALUES, "source": TEXT_VALUES, "fullsource": TEXT_VALUES,
    "lineno": INT_VALUES, "depth": INT_VALUES, "calls": INT_VALUES, "threadid": THREADID_VALUES,
    "stdlib": BOOL_VALUES, "builtin": BOOL_VALUES, "arg": ARG_VALUES, "locals": DICT_VALUES,
    "globals": DICT_VALUES,
}
SUFFIXES = [("", "eq")] + sorted(OPERATORS.items())


def test_every_field_is_covered() -> None:
    assert set(FIELD_VALUES) == set(filters.FIELDS)
    assert {alias for alias, _ in SUFFIXES} - {""} == {
        "in", "contains", "has", "startswith", "sw", "endswith", "ew", "regex", "rx",
        "lt", "lte", "gt", "gte",
    }


MATRIX = [(field, suffix, op) for field in filters.FIELDS for suffix, op in SUFFIXES]


@pytest.mark.parametrize("field,suffix,op", MATRIX)
def test_field_operator_matrix(field: str, suffix: str, op: str) -> None:
    key = f"{field}_{suffix}" if suffix else field
    values = FIELD_VALUES[field]
    if op in values:
        text, value = values[op]
        assert parse_query([f"{key}={text}"]) == cmp(field, op, value)
        # The same in hunter's keyword form.
        literal = repr(value) if not isinstance(value, list) else repr(tuple(value))
        assert parse_query([f"Q({key}={literal})"]) == cmp(field, op, value)
    else:
        sample = next(iter(values.values()))[0] if op == "eq" else "'x'"
        term = f"{key}={sample}"
        fails([term], repr(term), key)


# --- bare and quoted values ----------------------------------------------------------------------

@pytest.mark.parametrize("term,value", [
    ("module=os.path", "os.path"),
    ('module="os.path"', "os.path"),
    ("module='x'", "x"),
    ("module = spaced ", "spaced"),
    ("module=''", ""),
    ('module="a" "b"', "ab"),
    ("function=None", "None"),  # text fields take the text
    ("function=True", "True"),
    ("threadname=1", "1"),
    ("function=__init__", "__init__"),
    ("filename=/tmp/x.py", "/tmp/x.py"),
    ("filename=C:\\x.py", "C:\\x.py"),
    ("source_contains='a = 1'", "a = 1"),
    ("source_contains=\"it's\"", "it's"),
    ("source_contains='line\\n'", "line\n"),
    ("module=ünïcode", "ünïcode"),
    ("module_in=os,sys", ["os", "sys"]),
    ("module_in= os , sys ", ["os", "sys"]),
    ("module_in=('os',)", ["os"]),
    ("module_in=['os', 'sys']", ["os", "sys"]),
    ("module_in='os.path'", "os.path"),  # hunter: substring of the string
    ("function_sw=get,set", ["get", "set"]),
    ("function_startswith=('get','set')", ["get", "set"]),
    ("function_rx=^(get|set)_", "^(get|set)_"),
    ("function_rx=a{1,2}", "a{1,2}"),
    ("function_rx='^x'", "^x"),
    ("depth_lt=3", 3),
    ("depth_lt=0x10", 16),
    ("depth_in=1,2", [1, 2]),
    ("depth_gt=-1", -1),
    ("lineno=1_000", 1000),
    ("stdlib=True", True),
    ("threadid=None", None),
    ("threadid=139871", 139871),
    ("arg=1", 1),
    ("arg=None", None),
    ("arg=foo", "foo"),
    ("arg='1'", "1"),
    ("arg_in=(1, 2)", [1, 2]),
    ("kind_in=call,return", ["call", "return"]),
    ("kind_in=('call',)", ["call"]),
])
def test_values(term: str, value: Any) -> None:
    tree = parse_query([term])
    assert tree["op"] == "cmp" and tree["value"] == value


def test_aliases_are_canonical() -> None:
    assert parse_query(["function_has=x", "function_sw=a", "function_ew=b", "function_rx=c"]) == \
        and_(cmp("function", "contains", "x"), cmp("function", "startswith", "a"),
             cmp("function", "endswith", "b"), cmp("function", "regex", "c"))


def test_keys_split_like_hunter() -> None:
    # hunter drops empty parts: module__sw is module_sw.
    assert parse_query(["module__sw=x"]) == cmp("module", "startswith", "x")
    assert parse_query(["Q(_depth_lt=2)"]) == cmp("depth", "lt", 2)


# --- compositions --------------------------------------------------------------------------------

A = cmp("module", "eq", "app")
B = cmp("function", "startswith", "_")
C = cmp("kind", "eq", "call")
STDLIB = cmp("stdlib", "eq", True)


@pytest.mark.parametrize("terms,tree", [
    ([], TRUE),
    (["module=app"], A),
    (["module=app", "function_sw=_"], and_(A, B)),
    (['Q(module="app") & ~Q(function_startswith="_")'], and_(A, not_(B))),
    (["Q(module='app', function_sw='_')"], and_(A, B)),
    (["Q()"], TRUE),
    (["Q(Q(module='app'), kind='call')"], and_(A, C)),
    (["~stdlib"], not_(STDLIB)),
    (["stdlib"], STDLIB),
    (["~~stdlib"], STDLIB),
    (["~kind=call"], not_(C)),
    (["~ module=app"], not_(A)),
    (["builtin"], cmp("builtin", "eq", True)),
    (["And(Q(module='app'), function_sw='_')"], and_(A, B)),
    (["And(module='app', function_sw='_')"], and_(A, B)),
    # hunter's Or splits its keywords into separate queries
    (["Or(module='app', function_sw='_')"], or_(A, B)),
    (["Or(Q(module='app'), Q(kind='call'), function_sw='_')"], or_(A, C, B)),
    (["Not(Q(module='app'))"], not_(A)),
    (["Not(module='app', kind='call')"], not_(and_(A, C))),
    (["Not(Q(module='app'), Q(kind='call'))"], not_(and_(A, C))),
    (["Q(module='app') | Q(kind='call') | ~stdlib"], or_(A, C, not_(STDLIB))),
    (["Q(module='app') & Q(kind='call') & ~stdlib"], and_(A, C, not_(STDLIB))),
    (["(Q(module='app') | Q(kind='call')) & ~stdlib"], and_(or_(A, C), not_(STDLIB))),
    (["Q(module='app') | Q(kind='call') & ~stdlib"], or_(A, and_(C, not_(STDLIB)))),
    (["~(Q(module='app') | stdlib)"], not_(or_(A, STDLIB))),
    (["(((Q(module='app'))))"], A),
    (["  Q(module='app')  "], A),
    (["Q(module='app')", "Q(kind='call') | stdlib"], and_(A, or_(C, STDLIB))),
    (["Q(module='app') & (\nQ(kind='call'))"], and_(A, C)),
    # From
    (["From(Q(module='app'))"], from_(A)),
    (["From(Q(module='app'), Q(kind='call'))"], from_(A, C)),
    (["From(Q(module='app'), None)"], from_(A)),
    (["From(condition=Q(module='app'), predicate=Q(kind='call'))"], from_(A, C)),
    (["From(Q(module='app'), Q(kind='call'), 2)"], from_(A, C, 2)),
    (["From(Q(module='app'), watermark=-1)"], from_(A, TRUE, -1)),
    (["From(module='app', depth_lt=2, calls_gte=1, kind='call')"],
     from_(and_(A, C), and_(cmp("depth", "lt", 2), cmp("calls", "gte", 1)))),
    (["From(module='app')"], from_(A, TRUE)),
    (["From()"], from_(TRUE, TRUE)),
    (["From(Q(module='app')) & ~stdlib"], and_(from_(A), not_(STDLIB))),
    (["~From(stdlib)"], not_(from_(STDLIB))),
])
def test_compositions(terms: List[str], tree: Dict[str, Any]) -> None:
    assert parse_query(terms) == tree


# --- errors name the term and the culprit --------------------------------------------------------

@pytest.mark.parametrize("term,fragments", [
    ("lineno=abc", ["lineno", "integer", "'abc'"]),
    ("depth_startswith=1", ["depth_startswith", "number"]),
    ("depth_regex=1", ["depth_regex"]),
    ("depth_lt=True", ["depth_lt", "integer"]),
    ("depth_lt=2.5", ["float"]),
    ("calls_in=a", ["calls_in", "list of integers"]),
    ("kind=calls", ["'calls'", "call, line, return, exception"]),
    ("kind_in=call,lines", ["'lines'"]),
    ("stdlib=yes", ["stdlib", "True or False"]),
    ("stdlib_sw=x", ["stdlib_sw"]),
    ("stdlib=1", ["stdlib"]),
    ("locals=x", ["locals_contains"]),
    ("locals_sw=x", ["locals_contains"]),
    ("globals_has=1", ["globals_contains"]),
    ("function_rx=(", ["bad regex", "missing )"]),
    ("function_rx='[a-'", ["bad regex"]),
    ("function=[1]", ["expects a string"]),
    ("function_in=[1, 2]", ["list of strings"]),
    ("arg_sw=1", ["arg_sw"]),
    ("arg=[1, 2]", ["single value"]),
    ("arg_lt=None", ["arg_lt"]),
    ("modul=x", ["unknown field 'modul'", "module"]),
    ("instruction=1", ["cannot filter on 'instruction'"]),
    ("code=1", ["cannot filter on 'code'"]),
    ("module_eq=x", ["unknown operator 'eq'", "no suffix"]),
    ("module_like=x", ["unknown operator 'like'"]),
    ("module_sw_x=y", ["not field or field_operator"]),
    ("_=x", ["not field or field_operator"]),
    ("module=", ["missing value"]),
    ("module='abc", ["not a valid Python string"]),
    ('module="a" + "b"', ["not a valid Python string"]),
    ("module=(a, b)", ["not a valid Python"]),
    ("depth_in=[[1]]", ["not a valid Python"]),
    ("depth=99999999999999999999999", ["out of range"]),
    ("module=a & function=b", ["separate terms"]),
    ("Q(module=os.path)", ["'os.path' is not a literal", "quote"]),
    ("Q(module=app)", ["'app' is not a literal"]),
    ("Q(depth_lt=x+1)", ["'x+1' is not a literal"]),
    ("Q(module=f'x')", ["not a literal"]),
    ("Q(module=b'x')", ["bytes"]),
    ("Q(depth=1.5)", ["float"]),
    ("Q(module='a', module_eq='b')", ["unknown operator 'eq'"]),
    ("Q(module_sw='a', module_startswith='b')", ["same condition twice"]),
    ("Q(module='a', action=1)", ["action"]),
    ("Q(*x)", ["*args"]),
    ("Q(**x)", ["**kwargs"]),
    ("Q(1)", ["'1' is a constant"]),
    ("Q('module')", ["constant"]),
    ("module", ["not a predicate on its own", "module=VALUE"]),
    ("Q", ["must be called"]),
    ("foo", ["'foo' is not a known name"]),
    ("__import__('os').system('true')", ["__import__('os').system", "only Q, And, Or, Not"]),
    ("os.system('true')", ["'os.system' is called"]),
    ("eval('1')", ["'eval' is called"]),
    ("Q.__class__", ["Attribute"]),
    ("Q()[0]", ["Subscript"]),
    ("lambda: 1", ["Lambda"]),
    ("[Q()]", ["List"]),
    ("Q() and Q()", ["& and |"]),
    ("not Q()", ["write ~"]),
    ("-Q()", ["not a predicate"]),
    ("Q() + Q()", ["&, | and ~"]),
    ("Q() == Q()", ["comparison"]),
    ("stdlib == True", ["comparison"]),
    ("(x := Q())", ["NamedExpr"]),
    ("Q() if 1 else Q()", ["IfExp"]),
    ("When(Q(module='a'), CallPrinter)", ["When", "not supported"]),
    ("Backlog(Q(module='a'))", ["Backlog", "not supported"]),
    ("And()", ["at least one"]),
    ("Or()", ["at least one"]),
    ("Not()", ["at least one"]),
    ("From(Q(module='a'), depth_lt=2)", ["From(Q(...), Q(depth_lt=...))"]),
    ("From(None, Q(kind='call'))", ["needs a condition"]),
    ("From(Q(), Q(), 1, 2)", ["at most 3"]),
    ("From(Q(), condition=Q())", ["condition twice"]),
    ("From(Q(), watermark='1')", ["integer watermark"]),
    ("Q(module='a'", ["hunter expression"]),  # the SyntaxError wording varies
    ("Q(module='a')) ", ["hunter expression"]),
    ("module:app", ["not a field=value term nor a hunter expression"]),
    ("Q(module='a') &\nQ()", ["hunter expression"]),
    ("\x00", ["null bytes"]),
])
def test_errors(term: str, fragments: List[str]) -> None:
    # Every message starts by naming the term.
    fails([term], f"bad query term {term!r}"[:40], *fragments)


def test_error_names_the_bad_term_among_several() -> None:
    message = fails(["module=app", "depth_sw=1", "kind=call"], "'depth_sw=1'")
    assert "module=app" not in message


def test_empty_and_non_string_terms() -> None:
    fails([""], "empty")
    fails(["  "], "empty")
    fails([1], "must be strings")  # type: ignore[list-item]


def test_limits() -> None:
    fails(["module=" + "x" * MAX_QUERY_CHARS], "longer than")
    fails(["module=a"] * (MAX_QUERY_CHARS // 8 + 1), "longer than")
    fails(["(" * 200 + "Q()" + ")" * 200], "bad query term")
    fails(["~" * 100 + "Q()"], "nests more than")
    fails(["Not(" * 40 + "Q()" + ")" * 40], "nests more than")
    # Long flat chains are fine: they do not nest.
    assert parse_query([" & ".join(["Q(depth_lt=3)"] * 500)])["op"] == "and"
    long_message = fails(["Q(modul=1) & " + "Q() & " * 100 + "Q()"], "...")
    assert len(long_message) < 400


# --- possible_kinds ------------------------------------------------------------------------------

ALL = {"call", "line", "return", "exception"}


@pytest.mark.parametrize("terms,kinds", [
    ([], ALL),
    (["module=app"], ALL),
    (["kind=call"], {"call"}),
    (["kind_in=call,return"], {"call", "return"}),
    (["~kind=line"], {"call", "return", "exception"}),
    (["kind=call", "kind=return"], set()),
    (["Q(kind='call') | Q(kind='return')", "depth_lt=3"], {"call", "return"}),
    (["Q(kind='call') | Q(depth_lt=3)"], ALL),
    (["~(Q(kind='line') | Q(kind='exception'))"], {"call", "return"}),
    (["~(Q(kind='line') & Q(depth=1))"], ALL),
    (["kind_sw=c"], {"call"}),
    (["kind_rx=^(line|exception)$"], {"line", "exception"}),
    (["kind_gt=exception"], {"line", "return"}),
    # From must also see what switches it on (its condition) and off (returns).
    (["From(Q(function='f'), Q(kind='call'))"], ALL),
    (["From(Q(function='f', kind='call'), Q(kind='call'))"], {"call", "return"}),
    (["From(Q(kind='call', function='f'), Q(kind='call'), watermark=1)"], ALL),
    (["kind=call", "From(Q(kind='call', function='f'), Q(kind='call'))"], {"call", "return"}),
    (["~From(Q(kind='call', function='f'), Q(kind='call'))"], ALL),
])
def test_possible_kinds(terms: List[str], kinds: set) -> None:
    assert possible_kinds(parse_query(terms)) == kinds


# --- describe ------------------------------------------------------------------------------------

@pytest.mark.parametrize("terms,text", [
    ([], "Q()"),
    (["module=app"], "Q(module='app')"),
    (["module=app", "~function_sw=_"], "Q(module='app') & ~Q(function_startswith='_')"),
    (["(Q(kind='call') | Q(kind='return')) & ~stdlib"],
     "(Q(kind='call') | Q(kind='return')) & ~Q(stdlib=True)"),
    (["Q(kind='call') | Q(kind='return') & ~stdlib"],
     "Q(kind='call') | Q(kind='return') & ~Q(stdlib=True)"),
    (["~(Q(kind='call') & stdlib)"], "~(Q(kind='call') & Q(stdlib=True))"),
    (["function_in=a,b"], "Q(function_in=['a', 'b'])"),
    (["From(module='a', depth_lt=2)"], "From(Q(module='a'), Q(depth_lt=2))"),
    (["From(Q(module='a'), watermark=1)"], "From(Q(module='a'), Q(), watermark=1)"),
    (["threadid=None", "arg='x\\ny'"], "Q(threadid=None) & Q(arg='x\\ny')"),
])
def test_describe(terms: List[str], text: str) -> None:
    tree = parse_query(terms)
    assert describe(tree) == text
    assert parse_query([text]) == tree


def test_describe_handles_any_tree() -> None:
    assert describe({"op": "false"}) == "~Q()"
    assert describe(and_(or_(A, B), and_(A, C))) == "(Q(module='app') | " \
        "Q(function_startswith='_')) & (Q(module='app') & Q(kind='call'))"


# --- the tree is what the target accepts ---------------------------------------------------------

ROUND_TRIP: List[Tuple[str, ...]] = [
    ("module=os.path", "depth_lt=3"),
    ("From(Q(function='f'), Q(depth_lt=2) | Q(kind='return'), watermark=1)",),
    ("Or(module='a', function_rx='^_')", "~stdlib"),
]


@pytest.mark.parametrize("terms", ROUND_TRIP)
def test_trees_are_valid_for_filters(terms: Tuple[str, ...]) -> None:
    tree = parse_query(list(terms))
    filters.check_tree(tree)
    flt = filters.Filter(tree)
    assert isinstance(flt.decide(test_trees_are_valid_for_filters.__code__, __name__),
                      filters.Decision)
    assert re.match(r"^[^\n]*$", describe(tree))
