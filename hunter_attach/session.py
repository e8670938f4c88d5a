"""One trace session, CLI side: the private socket, the handshake with the agent, the event stream.

Security: the socket lives in a fresh 0700 directory (owned by the target's user when we are root
and it is not, so that only it and root can connect), the agent must present the one-time token
and its SO_PEERCRED pid must be the target's, and the first accepted connection consumes the
token: the listener is closed at once, so a second activation of the bootstrap (gdb mode runs two
mechanisms) finds nobody to talk to.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from . import bootstrap, protocol
from .build import Tracer
from .errors import BUSY_HINT, AttachTimeout, InjectionFailed, ProtocolError, TargetExited
from .events import CodeInfo, Event, ThreadInfo

if TYPE_CHECKING:
    from .fastpath import Batch, Sink

# Shipped into the target in this order (each imports only those before it).
AGENT_MODULES = ("protocol", "green", "saferepr", "filters", "agent", "pytracer")
_PKG_DIR = Path(__file__).parent


def agent_sources() -> Tuple[List[Tuple[str, str]], str]:
    modules = [(name, (_PKG_DIR / (name + ".py")).read_text()) for name in AGENT_MODULES]
    digest = hashlib.sha256(json.dumps(modules).encode()).hexdigest()
    return modules, digest


class Drop:
    """``count`` events were lost before the event with sequence number ``seq``."""

    def __init__(self, count: int, seq: int) -> None:
        self.count = count
        self.seq = seq


class ThreadEnd:
    """The thread ``thread`` (a ThreadInfo) of process ``pid`` ended: renderers may forget it.
    In a Batch's items after the thread's last event."""

    __slots__ = ("thread", "pid")

    def __init__(self, thread: ThreadInfo, pid: int) -> None:
        self.thread = thread
        self.pid = pid


# None is a tick: the end of a batch, or a poll interval without data. The CLI flushes its
# output and checks its timers on ticks. With a sink (hunter_attach.fastpath), a RECORDS frame
# gives one fastpath.Batch instead of its events and drops.
Item = Union[Event, Drop, "Batch", None]


def _world_readable(path: str) -> bool:
    """Can any user open path (every directory on the way searchable)?"""
    import stat

    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:i]) or "/").st_mode
        needed = stat.S_IROTH if i == len(parts) else stat.S_IXOTH
        if not mode & needed:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited as far as we are concerned
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _exits_soon(pid: int, wait: float = 0.5) -> bool:
    """A dying process closes its sockets before it becomes a zombie: give it a moment."""
    end = time.monotonic() + wait
    while _pid_alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _control(payload: bytes) -> Dict[str, Any]:
    try:
        return protocol.decode_json(payload)
    except protocol.FrameError as exc:
        raise ProtocolError("corrupt control frame from the agent: %s" % exc) from None


def _field(rec: Dict[str, Any], name: str, kind: type, bits: int = 32) -> Any:
    value: Any = rec.get(name)
    # bool is an int subclass: an id of True, or a stdlib of 1, is still a type error
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise protocol.FrameError("metadata field %r is not a %s" % (name, kind.__name__))
    if isinstance(value, int) and kind is int and not 0 <= value < 1 << bits:
        raise protocol.FrameError("metadata field %r is out of range" % name)
    return value


def _int_key(key: str) -> int:
    if not key.isdigit() or len(key) > 9:
        raise protocol.FrameError("bad line number %r in a CODE record" % key[:20])
    return int(key)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise protocol.FrameError("a source line is not a string")
    return value


class Session:
    def __init__(self, pid: int, uid: int, root: str, config: Dict[str, Any],
                 tracer: Optional[Tracer], log: Callable[[str], None]) -> None:
        self.pid = pid
        self.tracer = tracer
        self.log = log
        self.token = secrets.token_hex(16)
        # Created inside the target's root, so that a target in another mount namespace (a
        # container) sees the same directory at the path without the /proc/PID/root prefix.
        tmp_root = os.path.join(root, "tmp") if root != "/" else tempfile.gettempdir()
        self.dir = tempfile.mkdtemp(prefix="hunter-attach-", dir=tmp_root)
        self.target_dir = self.dir[len(root):] if root != "/" else self.dir
        self.config = dict(config, session_dir=self.target_dir)
        self.listener: Optional[socket.socket] = None
        self.conn: Optional[socket.socket] = None
        self.reader = protocol.FrameReader()
        self.codes: Dict[int, CodeInfo] = {}
        self.threads: Dict[int, ThreadInfo] = {}
        self.seq = 0
        self.ready: Dict[str, Any] = {}
        self.bye: Optional[Dict[str, Any]] = None
        self.stopping = False
        self._early: List[Tuple[int, bytes]] = []
        self._send_lock = threading.RLock()
        self._closed = threading.Event()
        try:
            if os.geteuid() == 0 and uid != 0:
                os.chown(self.dir, uid, -1)
            path = os.path.join(self.dir, "s")
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            if os.geteuid() == 0 and uid != 0:
                os.chown(path, uid, -1)
            self.listener.listen(4)
        except BaseException:
            self.close()
            raise

    def helper_library(self, uid: int, same_mount_ns: bool) -> str:
        """The injection helper's path as the target sees it. The installed one when the target
        can open it (loading the same path again reuses the mapping); else a copy in the
        session directory, which is the target's own and gone at the end."""
        found = sorted(_PKG_DIR.joinpath("inject").glob("_helper*.so"))
        if not found:
            from .inject import gdb

            return gdb.build_helper(self.dir)
        if same_mount_ns and (uid == os.geteuid() or _world_readable(str(found[0]))):
            return str(found[0])
        shutil.copyfile(found[0], os.path.join(self.dir, "_helper.so"))
        return os.path.join(self.target_dir, "_helper.so")

    @property
    def bootstrap_code(self) -> str:
        return bootstrap.render(os.path.join(self.target_dir, "s"), self.token)

    # ---- handshake ----------------------------------------------------------------------
    def accept(self, deadline: float) -> Dict[str, Any]:
        """Wait for the agent's authenticated HELLO; return it."""
        assert self.listener is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not _pid_alive(self.pid):
                    raise TargetExited("process %d exited before the agent connected" % self.pid)
                raise AttachTimeout(
                    "the agent in process %d did not connect back in time" % self.pid,
                    "The bootstrap was delivered but did not run. In manhole mode the service "
                    "may not be reading its socket; in gdb mode try a larger -t.")
            self.listener.settimeout(min(remaining, 0.2))
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                if not _pid_alive(self.pid):
                    raise TargetExited("process %d exited before the agent connected" % self.pid)
                continue
            hello = self._authenticate(conn, deadline)
            if hello is not None:
                self.conn = conn
                # The token is spent: nobody else may connect for this session.
                self.listener.close()
                self.listener = None
                os.unlink(os.path.join(self.dir, "s"))
                return hello

    def _authenticate(self, conn: socket.socket, deadline: float) -> Optional[Dict[str, Any]]:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer_pid, _, _ = struct.unpack("3i", creds)
        if peer_pid != self.pid:
            self.log("rejected a connection from pid %d" % peer_pid)
            conn.close()
            return None
        try:
            ftype, payload = self._read_frame(conn, deadline)
            hello = protocol.decode_json(payload) if ftype == protocol.HELLO else {}
        except (ProtocolError, protocol.FrameError, OSError, AttachTimeout):
            conn.close()
            return None
        if not hmac.compare_digest(str(hello.get("token", "")), self.token):
            self.log("rejected a connection with a wrong token")
            conn.close()
            return None
        return hello

    def _read_frame(self, conn: socket.socket, deadline: float) -> Tuple[int, bytes]:
        reader = protocol.FrameReader()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AttachTimeout("the agent stopped answering during the handshake")
            conn.settimeout(remaining)
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise ProtocolError("the agent closed the connection during the handshake")
            frames = reader.feed(data)
            if frames:
                if reader.pending:
                    self.reader.feed(bytes(reader._buf))  # hand early records to the main reader
                return frames[0]

    def start(self, hello: Dict[str, Any], deadline: float) -> Dict[str, Any]:
        """Send LOAD, wait for READY. Returns READY's content."""
        assert self.conn is not None
        modules, digest = agent_sources()
        tracer_path = None
        tracer_digest = None
        if self.tracer is not None:
            tracer_digest = self.tracer.digest
            tracer_path = os.path.join(self.target_dir, "_tracer" + str(hello.get("ext_suffix")))
            if hello.get("tracer_hash") != tracer_digest:
                # A copy in the session directory: the target's user can read it, and it is gone
                # when the session ends (the mapping stays valid after unlink).
                shutil.copyfile(self.tracer.path, os.path.join(self.dir, os.path.basename(
                    tracer_path)))
        load = {
            "package_hash": digest,
            "modules": modules if hello.get("package_hash") != digest else [],
            "tracer": tracer_path,
            "tracer_hash": tracer_digest,
            "config": self.config,
        }
        self.conn.settimeout(5.0)
        self.conn.sendall(protocol.encode_json(protocol.LOAD, load))
        ftype, payload = self._next_control(deadline)
        if ftype == protocol.ERROR:
            message = str(protocol.decode_json(payload).get("message", "?"))
            raise InjectionFailed("the agent failed to start: %s" % message,
                                  BUSY_HINT if "already tracing" in message else None)
        if ftype != protocol.READY:
            raise ProtocolError("expected READY, got frame type %d" % ftype)
        self.ready = protocol.decode_json(payload)
        threading.Thread(target=self._keepalive, name="hunter-trace-keepalive",
                         daemon=True).start()
        return self.ready

    def _next_control(self, deadline: float) -> Tuple[int, bytes]:
        assert self.conn is not None
        pending: List[Tuple[int, bytes]] = []
        while not pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AttachTimeout("the agent did not confirm that tracing is on")
            self.conn.settimeout(remaining)
            try:
                data = self.conn.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                if not _pid_alive(self.pid):
                    raise TargetExited("process %d exited while attaching" % self.pid)
                raise InjectionFailed("the agent closed the connection while starting")
            pending = self.reader.feed(data)
        ftype, payload = pending[0]
        self._early = pending[1:]
        return ftype, payload

    # ---- streaming ----------------------------------------------------------------------
    def items(self, poll: float = 0.2, sink: Optional[Sink] = None) -> Iterator[Item]:
        """Events, drop markers and ticks (None) until the agent says BYE or the connection
        ends; with a ``sink``, a Batch per RECORDS frame instead of its events and drops.

        Raises TargetExited when the target went away, ProtocolError on a corrupt stream."""
        assert self.conn is not None
        for ftype, payload in self._early:
            yield from self._handle(ftype, payload, sink)
        self._early = []
        while self.bye is None:
            self.conn.settimeout(poll)
            try:
                data = self.conn.recv(1 << 20)
            except socket.timeout:
                yield None
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                if _exits_soon(self.pid):
                    raise TargetExited("process %d exited" % self.pid)
                raise TargetExited("the agent in process %d closed the connection" % self.pid)
            try:
                frames = self.reader.feed(data)
            except protocol.FrameError as exc:
                raise ProtocolError("corrupt stream from the agent: %s" % exc) from None
            for ftype, payload in frames:
                yield from self._handle(ftype, payload, sink)
            yield None

    def _handle(self, ftype: int, payload: bytes, sink: Optional[Sink] = None
                ) -> Iterator[Item]:
        if ftype == protocol.RECORDS:
            if sink is not None:
                yield from self._feed(sink, payload)
                return
            try:
                yield from self._decode(payload)
            except (protocol.FrameError, KeyError, TypeError, ValueError) as exc:
                raise ProtocolError("corrupt record from the agent: %s" % exc) from None
        elif ftype == protocol.BYE:
            self.bye = _control(payload)
        elif ftype == protocol.ERROR:
            message = _control(payload).get("message", "?")
            raise InjectionFailed("the agent stopped: %s" % message)
        else:
            raise ProtocolError("unexpected frame type %d" % ftype)

    def _feed(self, sink: Sink, payload: bytes) -> Iterator[Item]:
        """The fast pipeline: the whole payload through the sink, one Batch. Events before a
        corrupt record are delivered, then the error is raised, as _decode does."""
        sink.seq = self.seq
        batch = sink.feed(payload)
        self.seq = sink.seq
        exc = batch.error
        batch.error = None
        if batch.events or batch.dropped or batch.chunks or batch.items:
            yield batch
        if exc is not None:
            if isinstance(exc, (protocol.FrameError, KeyError, TypeError, ValueError)):
                raise ProtocolError("corrupt record from the agent: %s" % exc) from None
            raise exc

    def _register(self, rtype: int, rec: Any) -> bool:
        """A decoded CODE or THREAD record. True when it replaces an id already known.
        Raises FrameError when a field has the wrong type: the agent is not trusted."""
        if rtype == protocol.REC_CODE:
            lines = _field(rec, "lines", dict)
            code = CodeInfo(
                id=_field(rec, "id", int), filename=_field(rec, "filename", str),
                module=_field(rec, "module", str), function=_field(rec, "function", str),
                qualname=_field(rec, "qualname", str),
                firstlineno=_field(rec, "firstlineno", int), stdlib=_field(rec, "stdlib", bool),
                lines={_int_key(k): _text(v) for k, v in lines.items()},
                fullsource=_field(rec, "fullsource", str))
            known = code.id in self.codes
            self.codes[code.id] = code
            return known
        thread = ThreadInfo(id=_field(rec, "id", int), ident=_field(rec, "ident", int, 64),
                            name=_field(rec, "name", str), main=_field(rec, "main", bool))
        known = thread.id in self.threads
        self.threads[thread.id] = thread
        return known

    def forget_thread(self, thread_id: int) -> Optional[ThreadInfo]:
        """A THREAD_END record: the thread is forgotten (its id is never used again). Returns
        it, or None when it was not known (an ended thread can be reported twice)."""
        return self.threads.pop(thread_id, None)

    def hidden_event(self, rec: bytes) -> Event:
        """An EVENT record with FLAG_HIDDEN (28 bytes): only the summary sees it. It has no
        sequence number (-1)."""
        _, kind, _, thread, code, lineno, depth, ts = protocol.EVENT.unpack_from(rec)
        return Event(protocol.KINDS[kind], self.codes[code], self.threads[thread], lineno, depth,
                     ts / 1e9, None, -1, self.pid, True)

    def _decode(self, payload: bytes) -> Iterator[Item]:
        # The plain pipeline (HUNTER_ATTACH_FASTPATH=0, for debugging) has no place for hidden
        # events and thread ends in the CLI's loop: it skips the first and only forgets the
        # thread here. The sinks (fastpath.py) hand both to the renderers.
        kinds = protocol.KINDS
        codes = self.codes
        threads = self.threads
        pid = self.pid
        for rtype, rec in protocol.iter_records(payload):
            if rtype == protocol.REC_EVENT:
                kind, thread, code, lineno, depth, ts, arg = rec
                yield Event(kinds[kind], codes[code], threads[thread], lineno, depth, ts / 1e9,
                            arg, self.seq, pid)
                self.seq += 1
            elif rtype == protocol.REC_CODE or rtype == protocol.REC_THREAD:
                self._register(rtype, rec)
            elif rtype == protocol.REC_DROP:
                yield Drop(int(rec), self.seq)
                self.seq += int(rec)
            elif rtype == protocol.REC_THREAD_END:
                self.forget_thread(rec)

    def _send_control(self, ftype: int) -> bool:
        """A 5-byte control frame, without blocking: it is called from a signal handler and
        from the keepalive thread while the main thread may be blocked writing our stdout."""
        with self._send_lock:
            conn = self.conn
            try:
                return conn is not None and conn.send(
                    protocol.encode_frame(ftype), socket.MSG_DONTWAIT) == 5
            except OSError:
                return False

    def _keepalive(self) -> None:
        # A CLI blocked on a slow stdout reads its socket late: saying it is alive keeps the
        # agent from taking it for dead (lossless mode then slows the target, as it should).
        while not self._closed.wait(1.0):
            self._send_control(protocol.KEEPALIVE)

    def request_stop(self) -> None:
        """Ask the agent to detach; items() then drains what is in flight and ends at BYE.
        Safe in a signal handler: the agent stops tracing even if we cannot read for a while."""
        if self.conn is None or self.stopping:
            return
        self.stopping = True
        for _ in range(50):
            if self._send_control(protocol.STOP):
                return
            time.sleep(0.01)

    def close(self) -> None:
        if not self._closed.is_set():
            self.log("at the end: %d threads and %d code objects known" % (len(self.threads),
                                                                            len(self.codes)))
        self._closed.set()
        with self._send_lock:
            for sock in (self.conn, self.listener):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
            self.conn = self.listener = None
        shutil.rmtree(self.dir, ignore_errors=True)
