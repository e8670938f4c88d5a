"""The bootstrap: the only Python text the CLI ever injects into the target.

It is a fixed template. The CLI passes exactly two values as its globals, the socket path and a
one-time token, both of our own making and checked here, so no user text can reach the target as
code. The query and everything else travel as data over the authenticated socket afterwards.

In the target, the bootstrap only starts a thread and returns, so the thread that runs it (the
main thread for a pending call, manhole's thread, or our helper thread) is held for microseconds.
That thread connects to the CLI, says HELLO, receives LOAD (the agent's sources unless the same
ones are already loaded, the compiled tracer's path, the session config), builds the package
``_hunter_attach`` and hands over to ``agent.serve``. Nothing escapes: every failure is reported
to the CLI as an ERROR frame or swallowed.
"""

from __future__ import annotations

import re

from .protocol import BOOT_MARKER, BOOT_MODULE

# Runs on CPython 3.8+. Kept free of f-strings and of anything that could fail at compile time.
# Its first line is BOOT_MARKER (see protocol.py).
_TEMPLATE = BOOT_MARKER + r'''
import _thread
def _boot(path, token, delivered_by):
    import json, os, struct, sys, types
    import _socket as socket  # the C socket: gevent and eventlet patch socket.socket only
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    def send(ftype, obj):
        data = json.dumps(obj).encode()
        s.sendall(struct.pack('<IB', len(data), ftype) + data)
    def recv(n):
        data = b''
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise EOFError('the CLI closed the connection')
            data += chunk
        return data
    try:
        s.settimeout(10.0)
        s.connect(path)
        # Only root or our own user may be listening (the token authenticates us to it).
        peer_uid = struct.unpack('3i', s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if peer_uid not in (0, os.geteuid()):
            raise PermissionError('the listening socket belongs to uid %d' % peer_uid)
        import importlib.machinery, importlib.util
        pkg = sys.modules.get('_hunter_attach')
        tracer = getattr(pkg, '_tracer', None)
        send(1, {'token': token, 'pid': os.getpid(), 'version': list(sys.version_info[:3]),
                 'ext_suffix': importlib.machinery.EXTENSION_SUFFIXES[0],
                 'executable': sys.executable,
                 'package_hash': getattr(pkg, '__hunter_attach_hash__', None),
                 'tracer_hash': getattr(tracer, '__hunter_attach_hash__', None)})
        length, ftype = struct.unpack('<IB', recv(5))
        if ftype != 2 or length > 64 * 1024 * 1024:
            raise ValueError('unexpected frame %d from the CLI' % ftype)
        load = json.loads(recv(length).decode())
        if load['package_hash'] != getattr(pkg, '__hunter_attach_hash__', None):
            for name in [n for n in sys.modules if n.split('.')[0] == '_hunter_attach']:
                del sys.modules[name]
            pkg = types.ModuleType('_hunter_attach')
            pkg.__path__ = []
            pkg.__package__ = '_hunter_attach'
            sys.modules['_hunter_attach'] = pkg
            for name, source in load['modules']:
                mod = types.ModuleType('_hunter_attach.' + name)
                mod.__package__ = '_hunter_attach'
                sys.modules[mod.__name__] = mod
                setattr(pkg, name, mod)
                exec(compile(source, '<hunter_attach/%s.py>' % name, 'exec'), mod.__dict__)
            pkg.__hunter_attach_hash__ = load['package_hash']
        have = getattr(tracer, '__hunter_attach_hash__', None)
        if load['tracer'] and have != load['tracer_hash']:
            spec = importlib.util.spec_from_file_location('_hunter_attach._tracer', load['tracer'])
            tracer = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(tracer)
            tracer.__hunter_attach_hash__ = load['tracer_hash']
        if not load['tracer']:
            tracer = getattr(pkg, 'pytracer', None)  # the pure-Python twin
        pkg._tracer = tracer
        sys.modules['_hunter_attach._tracer'] = tracer
        load['config']['delivered_by'] = delivered_by
        pkg.agent.serve(s, tracer, load['config'])
    except BaseException as exc:
        try:
            send(5, {'message': 'bootstrap failed: %s: %s' % (type(exc).__name__, exc)})
        except BaseException:
            pass
        try:
            s.close()
        except BaseException:
            pass
try:
    # A second delivery (gdb queues a pending call that may run much later) finds the socket
    # gone, because the first connection consumed it, and does nothing. Only builtins are
    # called here: this may run on a traced thread, and no Python-level function that a query
    # could match (posixpath.exists, say) may run on our behalf.
    __import__('posix').stat(PATH)
    # The real OS thread and ident, even after gevent or eventlet monkey patching (which makes
    # start_new_thread spawn a greenlet on this very thread): a builtin as it is, else the
    # original the green library keeps (eventlet: __original_module__thread; gevent:
    # gevent.monkey.saved), read as data. The same lookup as green.py's, for the agent.
    _fns = [_thread.start_new_thread, _thread.get_ident]
    if type(_fns[0]) is not type(len) or type(_fns[1]) is not type(len):
        _mods = __import__('sys').modules
        _orig = _mods.get('__original_module__thread')
        _orig = vars(_orig) if _orig is not None else {}
        _gm = _mods.get('gevent.monkey')
        _saved = vars(_gm).get('saved') if _gm is not None else None
        _saved = _saved.get('_thread') if type(_saved) is dict else None
        _saved = _saved if type(_saved) is dict else {}
        for _i, _name in enumerate(('start_new_thread', 'get_ident')):
            for _fn in (_orig.get(_name), _saved.get(_name)):
                if type(_fn) is type(len):
                    _fns[_i] = _fn
                    break
    _fns[0](_boot, (PATH, TOKEN, _fns[1]()))
except BaseException:
    pass
'''

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./-]{1,200}$")
_SAFE_TOKEN = re.compile(r"^[0-9a-f]{32,64}$")


def render(socket_path: str, token: str) -> str:
    """One line of Python that runs the constant template with these two values as its globals.

    The values are validated against a narrow alphabet on top of being embedded with repr(), so
    even a bug elsewhere cannot turn them into code."""
    if not _SAFE_PATH.match(socket_path) or not _SAFE_TOKEN.match(token):
        raise ValueError("unsafe bootstrap parameters")
    return "exec(%r, {'__name__': %r, 'PATH': %r, 'TOKEN': %r})" % (
        _TEMPLATE, BOOT_MODULE, socket_path, token)
