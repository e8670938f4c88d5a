"""Unit tests of the rule that makes comparisons safe (saferepr.is_plain, filters.compare): a
value the target owns is compared only when it is made of builtin scalars and containers, and
nothing of anything else is ever called. The same rule end to end: tests/test_never_harm.py."""

from __future__ import annotations

from typing import Any, List

import pytest

from hunter_attach.filters import CMPS, compare, prepare_value
from hunter_attach.saferepr import MAX_PLAIN_ITEMS, is_plain, thread_name

CALLS: List[str] = []


class Meta(type):
    def __hash__(cls) -> int:
        CALLS.append("Meta.__hash__")
        return 0

    def __eq__(cls, other: Any) -> bool:
        CALLS.append("Meta.__eq__")
        return False


class Hostile(metaclass=Meta):
    def __getattribute__(self, name: str) -> Any:
        CALLS.append("getattr " + name)
        return object.__getattribute__(self, name)

    def __eq__(self, other: Any) -> bool:
        CALLS.append("__eq__")
        return True

    __hash__ = object.__hash__


class MyInt(int):
    def __eq__(self, other: Any) -> bool:
        CALLS.append("MyInt.__eq__")
        return True

    __hash__ = int.__hash__


def numbers() -> Any:
    yield 1
    yield 2


@pytest.fixture(autouse=True)
def _no_calls() -> Any:
    CALLS.clear()
    yield
    assert CALLS == []


@pytest.mark.parametrize("value", [None, True, 1, 2.5, 1j, "s", b"b", (1, "a"), [1, [2, (3,)]],
                                   {"a": [1]}, {1, 2}, frozenset({"x"}), ()])
def test_plain(value: Any) -> None:
    assert is_plain(value)


@pytest.mark.parametrize("value", [Hostile(), MyInt(5), (1, Hostile()), [[Hostile()]],
                                   {"k": Hostile()}, {Hostile(): 1}, numbers(), iter([1]),
                                   bytearray(b"x"), object()])
def test_not_plain(value: Any) -> None:
    assert not is_plain(value)


def test_budget_bounds_the_walk() -> None:
    assert is_plain(list(range(MAX_PLAIN_ITEMS)))
    assert not is_plain(list(range(MAX_PLAIN_ITEMS + 1)))
    loop: List[Any] = []
    loop.append(loop)
    assert not is_plain(loop)  # a cycle runs out of budget instead of forever


@pytest.mark.parametrize("cmp", CMPS)
@pytest.mark.parametrize("evalue", [Hostile(), MyInt(5), (5, Hostile()), [Hostile()]])
def test_compare_never_asks_the_value(cmp: str, evalue: Any) -> None:
    value = {"in": [5], "regex": "x", "startswith": "x", "endswith": "x"}.get(cmp, 5)
    assert compare(cmp, evalue, prepare_value(cmp, value)) is False


def test_generator_is_not_advanced() -> None:
    gen = numbers()
    assert compare("contains", gen, 1) is False
    assert compare("eq", gen, 1) is False
    assert list(gen) == [1, 2]


def test_plain_values_still_compare_as_in_hunter() -> None:
    assert compare("contains", [42, 5], 42)
    assert compare("in", 5, [1, 5])
    assert compare("lt", 2, 3)
    assert compare("eq", (1, "a"), (1, "a"))
    assert compare("startswith", "abc", "ab")


def test_dict_contains_needs_only_plain_keys() -> None:
    assert compare("contains", {"name": Hostile()}, "name")
    assert not compare("contains", {Hostile(): 1}, "name")


def test_thread_name_reads_the_stored_name() -> None:
    import threading

    class Named(threading.Thread):
        @property  # type: ignore[override]
        def name(self) -> str:
            CALLS.append("name")
            return "property"

    thread = Named.__new__(Named)
    thread.__dict__["_name"] = "stored"
    assert thread_name(thread) == "stored"
    assert thread_name(object()) is None
