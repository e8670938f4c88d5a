"""Green-thread libraries in the target (gevent, eventlet): real primitives, greenlet names.

Shipped into the target with the agent (stdlib only, CPython 3.8+).

Their monkey patching replaces ``_thread``'s functions (a new "thread" is a greenlet in the
calling thread, ``get_ident`` names the greenlet, locks wait on the hub), ``socket.socket``,
``select`` and ``time.sleep``. The agent needs the real ones: its own OS thread, blocking waits
that hold no hub, the real thread idents that the C tracer sees. They are recovered by reading
data only, never by calling a function of the green library: a builtin is taken as it is,
otherwise the copy the library keeps of the original (gevent: ``gevent.monkey.saved``;
eventlet: ``sys.modules['__original_module_<name>']``). The bootstrap template repeats the
lookup for ``start_new_thread`` and ``get_ident``, as it runs before this module exists.
Sockets need nothing: ``_socket.socket``, the C type, is never patched.
"""

from __future__ import annotations

import _thread
import sys
from typing import Any, Optional, Tuple

_BUILTIN = type(len)


def _module_dict(name: str) -> dict:
    module = sys.modules.get(name)
    try:
        return dict(vars(module)) if module is not None else {}
    except TypeError:
        return {}


def _is_real(value: Any, module: str) -> bool:
    """Made by CPython's C code: a builtin function, or a type of that C module."""
    if type(value) is _BUILTIN:
        return True
    return isinstance(value, type) and type(value) is type and \
        type.__dict__["__module__"].__get__(value) == module


def original(module: str, name: str) -> Any:
    """module.name as CPython made it, even after gevent or eventlet patched it; None if it
    cannot be found."""
    candidates = [_module_dict(module).get(name),
                  _module_dict("__original_module_" + module).get(name)]  # eventlet's copy
    saved = _module_dict("gevent.monkey").get("saved")
    if isinstance(saved, dict):
        patched = saved.get(module)
        if isinstance(patched, dict):
            candidates.append(patched.get(name))
    for value in candidates:
        if value is not None and _is_real(value, module):
            return value
    return None


def _thread_function(name: str) -> Any:
    value = original("_thread", name)
    # Unknown patching (no copy of the original anywhere): what is there is all there is.
    return value if value is not None else getattr(_thread, name)


get_ident = _thread_function("get_ident")
allocate_lock = _thread_function("allocate_lock")
start_new_thread = _thread_function("start_new_thread")
local = original("_thread", "_local") or _thread._local  # type: ignore[attr-defined]


def greenlet_functions() -> Optional[Tuple[Any, Any, Any]]:
    """greenlet's (getcurrent, settrace, gettrace) when the target uses greenlets and they are
    C functions (no Python code of theirs runs per switch); None otherwise."""
    functions = _greenlet_functions()
    return functions if functions and all(type(f) is _BUILTIN for f in functions) else None


def _greenlet_functions() -> Optional[Tuple[Any, Any, Any]]:
    for name in ("greenlet._greenlet", "greenlet"):
        names = _module_dict(name)
        getcurrent = names.get("getcurrent")
        if getcurrent is not None:
            return getcurrent, names.get("settrace"), names.get("gettrace")
    return None


def hub_library_loaded() -> bool:
    """gevent or eventlet: greenlets as green threads, on any thread."""
    return any(name in sys.modules for name in ("gevent.hub", "eventlet.hubs"))


def greenlets_in_use() -> bool:
    return _greenlet_functions() is not None


def greenlet_type() -> Any:
    """greenlet.greenlet, the base of every greenlet, or None."""
    value = _module_dict("greenlet").get("greenlet") or \
        _module_dict("greenlet._greenlet").get("greenlet")
    return value if isinstance(value, type) else None


def greenlet_info(g: Any) -> Tuple[bool, str]:
    """(is it its thread's main greenlet, its name), read without running any Python code of
    the greenlet's class: through greenlet's own C descriptors and the instance dict.

    A name assigned to it (gevent's ``Greenlet.name = ...``) is used; gevent generates its
    ``Greenlet-N`` names lazily, with side effects, so an unnamed one is shown as its class and
    address, like gevent's repr; a hub (one per thread) by its class name."""
    base = greenlet_type()
    cls = type(g)
    if base is None or not isinstance(g, base):
        return True, ""
    descriptors = vars(base)
    try:
        if descriptors["parent"].__get__(g, base) is None:
            return True, ""
        instance = descriptors["__dict__"].__get__(g, base)
    except Exception:
        instance = None
    name = instance.get("name") if type(instance) is dict else None
    class_name = type.__dict__["__name__"].__get__(cls)
    if type(name) is str and name:
        return False, name
    if class_name.endswith("Hub"):
        return False, class_name
    return False, "%s-0x%x" % (class_name, id(g))
