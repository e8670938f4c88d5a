"""query.py under random and hostile input: it parses or raises QueryError, and never runs code.

While the parser runs, ``eval``, ``exec`` and ``__import__`` are replaced by functions that record
the call, and ``compile`` only lets through AST-only compilation (which is what ``ast.parse`` does).
A hostile term that got executed would also create a sentinel file.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import json
import os
import sys
import tempfile
from typing import Any, Dict, Iterator, List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hunter_attach import filters
from hunter_attach.errors import QueryError
from hunter_attach.query import MAX_QUERY_CHARS, describe, parse_query

SENTINEL = os.path.join(tempfile.gettempdir(), f"hunter_attach_fuzz_sentinel_{os.getpid()}")
TOUCH = f"open({SENTINEL!r}, 'w')"

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def no_code_execution() -> Iterator[List[str]]:
    """Yields the list of forbidden calls made inside the block."""
    calls: List[str] = []
    real_compile = builtins.compile
    saved = {name: getattr(builtins, name) for name in ("eval", "exec", "compile", "__import__")}

    def forbidden(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called")
        return call

    def ast_only_compile(source: Any, filename: Any, mode: str, flags: int = 0, *args: Any,
                         **kwargs: Any) -> Any:
        if not flags & ast.PyCF_ONLY_AST:
            calls.append("compile")
            raise AssertionError("compile to code")
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    def guarded_import(name: str, *args: Any, **kwargs: Any) -> Any:
        # CPython's tokenizer imports unicodedata itself to decode "\N{...}" escapes.
        if name == "unicodedata":
            return saved["__import__"](name, *args, **kwargs)
        return forbidden("__import__")(name, *args, **kwargs)

    builtins.eval = forbidden("eval")
    builtins.exec = forbidden("exec")
    builtins.__import__ = guarded_import
    builtins.compile = ast_only_compile
    try:
        yield calls
    finally:
        for name, value in saved.items():
            setattr(builtins, name, value)


def check(terms: List[str]) -> Optional[Dict[str, Any]]:
    """Parse under guard; whatever parses must be a tree the target accepts."""
    with no_code_execution() as calls:
        try:
            tree: Optional[Dict[str, Any]] = parse_query(terms)
        except QueryError as exc:
            assert str(exc).startswith(("bad query term", "query is longer", "empty query"))
            tree = None
    assert not calls, calls
    assert not os.path.exists(SENTINEL)
    if tree is not None:
        filters.check_tree(tree)
        json.dumps(tree)
        text = describe(tree)
        if len(text) <= MAX_QUERY_CHARS:
            assert parse_query([text]) == tree
        flt = filters.Filter(tree)
        decision = flt.decide(check.__code__, __name__)
        frame = sys._getframe()
        flt.match_event(frame, "line", None, 1, 1)
        if decision.program is not None:
            filters.run_program(decision.program, 1, 1, frame.f_lineno, 1, -1,
                                lambda i: flt.pypred(i, frame, 1, None, 1, 1))
    return tree


def test_the_guard_works() -> None:
    with no_code_execution() as calls:
        with pytest.raises(AssertionError):
            eval("1")
        ast.parse("1")
    assert calls == ["eval"]


HOSTILE = [
    f"__import__('os').system('touch {SENTINEL}')",
    f"Q(module=__import__('os').system('touch {SENTINEL}'))",
    f"module=__import__('os').system('touch {SENTINEL}')",
    f"module={TOUCH}",
    f"Q(module={TOUCH})",
    f"Q({TOUCH})",
    f"Q(module=f'{{{TOUCH}}}')",
    f"Q(module='x') & {TOUCH}",
    f"From({TOUCH})",
    f"Q(*[{TOUCH}])",
    f"Q(**{{'module': {TOUCH}}})",
    f"(lambda: {TOUCH})()",
    f"[{TOUCH} for x in 'a']",
    f"(x := {TOUCH})",
    f"Q(module='a') if {TOUCH} else Q()",
    "().__class__.__bases__[0].__subclasses__()",
    "Q.__init__.__globals__['__builtins__']['eval']('1')",
    "Q().__class__",
    "Q(module='x').__or__(Q())",
    "getattr(Q, '__class__')",
    "breakpoint()",
    "exec('import os')",
    "eval('1')",
    "compile('1', '', 'exec')",
    "globals()",
    "Q(module='x');import os",
    "Q(module='x')\nimport os",
    "import os",
    "Q(module='\\N{LATIN SMALL LETTER A}')",
    "Q(module='x' * 10**9)",
    "Q(depth=10**10**10)",
    "Q(depth=" + "9" * 5000 + ")",
    "depth=" + "9" * 5000,
    "depth=0x" + "f" * 3000,
    "Q(module=" + "'x'" * 3000 + ")",
    "await Q()",
    "yield Q()",
    "Q(module=...)",
    "Q(module=1j)",
    "Q(module={'a': 1})",
    "Q(module={1, 2})",
    "module={1, 2}",
    "Q(module=[[1]])",
    "Q(module=-'x')",
    "Q(module=not 1)",
    "Q(module='x', module='y')",
    "Q(module)",
    "\\",
    "'",
    '"""',
    "Q(module='''\nx''')",
    "\x00Q()",
    "Q()\x00",
    "module=\x00",
    "\ufeffQ()",
    "Q(module='x')  # comment",
    "~" * 5000 + "Q()",
    "(" * 5000 + "Q()" + ")" * 5000,
    "Not(" * 1000 + "Q()" + ")" * 1000,
    "Q()" + " & Q()" * 1600,
    "Q()" + " | ~Q()" * 1200,
    "[" * 3000,
    "module=" + "(" * 3000,
    "x" * (MAX_QUERY_CHARS + 1),
    "Q(" + "a=1, " * 2000 + ")",
]


@pytest.mark.parametrize("term", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_terms(term: str) -> None:
    check([term])


def test_hostile_terms_together() -> None:
    check(HOSTILE[:10])
    check(["module=a"] * 2000)


@FUZZ
@given(st.lists(st.text(max_size=120), max_size=4))
def test_random_text(terms: List[str]) -> None:
    check(terms)


FRAGMENTS = [
    "Q(", "And(", "Or(", "Not(", "From(", "When(", ")", "(", ",", "~", "&", "|", "=", "==", "'",
    '"', "\n", " ", "\\", "module", "function_sw", "depth_lt", "kind", "stdlib", "threadid",
    "arg", "locals_has", "source_rx", "=3", "='x'", "=None", "=True", "=(1,'a')", "=[", "]",
    "_", "__import__", "('os')", ".system", "__class__", "__subclasses__()", "lambda:", "*", "**",
    ":=", "f'{", "}'", "[x for x in y]", "if", "else", "not", "and", "or", "watermark=1",
    "condition=", "predicate=", "call", "line", "-", "0x", "1e3", "\x00", "é", "#", ";",
]


@FUZZ
@given(st.lists(st.lists(st.sampled_from(FRAGMENTS), max_size=16).map("".join), max_size=3))
def test_fragment_soup(terms: List[str]) -> None:
    check(terms)


# A grammar that mostly produces valid queries, so the semantic checks get exercised too.
FIELDS = list(filters.FIELDS) + ["modul", "instruction", "code"]
SUFFIXES = ["", "_in", "_contains", "_has", "_sw", "_startswith", "_ew", "_endswith", "_rx",
            "_regex", "_lt", "_lte", "_gt", "_gte", "_eq", "_x"]
VALUES = ["1", "-2", "'x'", "'call'", "None", "True", "False", "('a', 'b')", "[1, 2]", "['call']",
          "'^a(b'", "'[a-z]+'", "2**70", "1.5", "b'x'", "x", "x.y", "''", "'\\n'", "(None, 3)"]

keyword = st.builds(lambda f, s, v: f"{f}{s}={v}", st.sampled_from(FIELDS),
                    st.sampled_from(SUFFIXES), st.sampled_from(VALUES))
leaf = st.one_of(
    st.lists(keyword, max_size=3).map(lambda kws: f"Q({', '.join(kws)})"),
    st.sampled_from(["stdlib", "builtin", "~stdlib", "module", "Q()"]),
)


def _extend(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, children).map(lambda ab: f"({ab[0]} & {ab[1]})"),
        st.tuples(children, children).map(lambda ab: f"{ab[0]} | {ab[1]}"),
        children.map(lambda a: f"~{a}"),
        st.tuples(st.sampled_from(["And", "Or", "Not"]), st.lists(children, max_size=3),
                  st.lists(keyword, max_size=2)).map(
            lambda t: f"{t[0]}({', '.join(t[1] + t[2])})"),
        st.tuples(children, st.one_of(st.none(), children), st.sampled_from(["", ", 1", ", -1"]))
        .map(lambda t: f"From({t[0]}, {t[1]}{t[2]})"),
        st.lists(keyword, max_size=3).map(lambda kws: f"From({', '.join(kws)})"),
    )


expression = st.recursive(leaf, _extend, max_leaves=12)


@FUZZ
@given(st.lists(st.one_of(expression, keyword), min_size=1, max_size=3))
def test_grammar(terms: List[str]) -> None:
    check(terms)


def test_grammar_mostly_parses() -> None:
    # The grammar must reach the semantic checks, not just syntax errors.
    parsed = 0

    @settings(max_examples=200, deadline=None, database=None)
    @given(expression)
    def count(term: str) -> None:
        nonlocal parsed
        parsed += check([term]) is not None

    count()
    assert parsed >= 10


# --- describe() is parse_query()'s inverse ------------------------------------------------------

CMP_LEAVES = [
    {"op": "cmp", "field": f, "cmp": c, "value": v}
    for f, c, v in [
        ("module", "eq", "app"), ("module", "in", ["a", "b"]), ("function", "regex", "^(a|b)"),
        ("function", "startswith", ["get", "set"]), ("kind", "in", ["call", "line"]),
        ("kind", "eq", "return"), ("depth", "lt", 3), ("lineno", "in", [1, 2]),
        ("threadid", "eq", None), ("threadid", "in", [None, 7]), ("stdlib", "eq", True),
        ("arg", "eq", None), ("arg", "in", "xyz"), ("source", "contains", "it's \"q\"\n"),
        ("locals", "contains", "self"), ("calls", "gte", -1), ("threadname", "lt", "é"),
    ]
]


def _trees(children: st.SearchStrategy[Dict[str, Any]]) -> st.SearchStrategy[Dict[str, Any]]:
    return st.one_of(
        st.lists(children, min_size=2, max_size=3).map(lambda a: {"op": "and", "args": a}),
        st.lists(children, min_size=2, max_size=3).map(lambda a: {"op": "or", "args": a}),
        children.map(lambda a: {"op": "not", "arg": a}),
        st.tuples(children, children, st.sampled_from([0, 1, -2])).map(
            lambda t: dict({"op": "from", "condition": t[0], "predicate": t[1]},
                           **({"watermark": t[2]} if t[2] else {}))),
    )


trees = st.recursive(st.sampled_from(CMP_LEAVES + [{"op": "true"}]), _trees, max_leaves=10)


def normalize(tree: Dict[str, Any]) -> Dict[str, Any]:
    """The shape the parser gives: and/or flattened, double negation gone."""
    op = tree["op"]
    if op in ("and", "or"):
        args: List[Dict[str, Any]] = []
        for arg in map(normalize, tree["args"]):
            args.extend(arg["args"] if arg["op"] == op else [arg])
        return {"op": op, "args": args}
    if op == "not":
        arg = normalize(tree["arg"])
        return arg["arg"] if arg["op"] == "not" else {"op": "not", "arg": arg}
    if op == "from":
        return dict(tree, condition=normalize(tree["condition"]),
                    predicate=normalize(tree["predicate"]))
    return tree


@FUZZ
@given(trees)
def test_describe_round_trips(tree: Dict[str, Any]) -> None:
    expected = normalize(tree)
    text = describe(tree)
    assert "\n" not in text
    assert parse_query([text]) == expected
