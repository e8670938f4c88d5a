"""``hunter-trace``: attach to a running CPython process and stream matching events.

This module only orchestrates: options -> query -> target -> tracer -> session -> injection ->
renderers. Every failure is a HunterAttachError with an exit code and a hint; nothing else is
allowed to end the program with a traceback.
"""

from __future__ import annotations

import math
import os
import select
import signal
import stat
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

import click

from . import __version__, build, fastpath
from . import query as query_mod
from . import target as target_mod
from .errors import HunterAttachError, InjectionFailed, OptionError, OutputFailed
from .events import Event
from .fastpath import Batch
from .render import RenderOptions, make_renderers
from .render.perfetto import create_temp
from .session import Drop, Session

PROG = "hunter-trace"


class Detach(Exception):
    """SIGINT, SIGTERM or SIGHUP while attaching: give up cleanly."""


def _raise_detach(signum: int, frame: Any) -> None:
    raise Detach(signum)


def _say(text: str) -> None:
    click.echo("%s: %s" % (PROG, text), err=True)


class Output:
    """Event text to a file descriptor. Every byte is written, or an error is raised: a
    TextIOWrapper can silently drop the rest of a large write that a signal interrupts, and
    signals are how the user detaches."""

    def __init__(self, fd: int, encoding: str, owned: bool) -> None:
        self.fd = fd
        self.encoding = encoding
        self.owned = owned
        self._parts: List[str] = []
        self._size = 0

    def write(self, text: str) -> int:
        self._parts.append(text)
        self._size += len(text)
        if self._size >= 1 << 16:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if not self._parts:
            return
        data = memoryview("".join(self._parts).encode(self.encoding, "backslashreplace"))
        self._parts.clear()
        self._size = 0
        while data:
            data = data[os.write(self.fd, data):]

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self.owned:
                os.close(self.fd)


class ReaderWatch:
    """Notices that the reader of a pipe or socket has gone (``| head -5`` exited) although
    nothing is being written: a write would fail with EPIPE, but a query that matches nothing
    writes nothing, and the CLI would stay attached for ever. Files and terminals never hang up."""

    INTERVAL = 0.2  # seconds between two looks

    def __init__(self, fd: int) -> None:
        self.poller: Optional[Any] = None
        self.next = 0.0
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            self.poller = select.poll()
            self.poller.register(fd, 0)  # POLLERR and POLLHUP are always reported

    def gone(self) -> bool:
        if self.poller is None:
            return False
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.INTERVAL
        return any(events & (select.POLLERR | select.POLLHUP)
                   for _, events in self.poller.poll(0))


class Status:
    """The live status line on stderr (only when stderr is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = 0.0
        self.shown = 0
        self.dropped = 0

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.5):
            return
        self.last = now
        sys.stderr.write("\r\x1b[K%s: %d events, %d dropped" % (PROG, self.shown, self.dropped))
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled and self.last:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _inject(target: target_mod.Target, session: Session, use_gdb: bool, sig: Optional[int],
            timeout: float, log: Callable[[str], None]) -> Callable[[], None]:
    """Deliver the bootstrap. Returns what to call once the agent has connected."""
    if use_gdb:
        from .inject import gdb

        how = gdb.inject(target.pid, session.bootstrap_code, timeout=timeout, log=log,
                         helper_lib=session.helper_library(target.uid, target.same_mount_ns))
        log("bootstrap delivered by gdb (%s)" % how)
        return lambda: None
    from .inject import manhole

    sock = manhole.inject(target.pid, session.bootstrap_code, sig=sig, timeout=timeout,
                          root=target.root, log=log)
    return lambda: manhole.drain(sock, log)


def run(pid: int, use_gdb: bool, sig: Optional[int], timeout: float, terms: Sequence[str],
        out: TextIO, render_options: RenderOptions, config_extra: dict, max_events: int,
        duration: Optional[float], verbose: bool, backend: str = "auto") -> int:
    log: Callable[[str], None] = (lambda s: _say(s)) if verbose else (lambda s: None)
    tree = query_mod.parse_query(terms)
    log("query: %s" % query_mod.describe(tree))
    target = target_mod.resolve(pid)
    log("target: CPython %s, %s" % (".".join(map(str, target.version)), target.exe))
    if use_gdb:
        target_mod.check_gdb()
        target_mod.check_ptrace(target)
    tracer = None
    if backend != "python":
        tracer = build.tracer_for(target.version, target.host_path(target.interpreter), log)
        version = ".".join(map(str, target.version))
        if tracer is None and backend == "c":
            raise InjectionFailed(
                "no compiled tracer for CPython %s (-v says why)" % version,
                "Install a C compiler and the target interpreter's headers, or use "
                "--backend python.")
        if tracer is None:
            _say("no compiled tracer for CPython %s (-v says why): using the pure-Python "
                 "tracer, which is slower" % version)
    config = dict(config_extra, query=tree)
    renderers = make_renderers(render_options, out)
    status = Status(sys.stderr.isatty() and out is not sys.stderr)
    started = time.monotonic()
    old_handlers = {s: signal.signal(s, _raise_detach)
                    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    session: Optional[Session] = None
    try:
        # Created under the handlers: a signal now cannot leave its directory behind.
        session = Session(target.pid, target.uid, target.root, config, tracer, log)
        deadline = time.monotonic() + timeout
        finish_injection = _inject(target, session, use_gdb, sig, timeout, log)
        try:
            hello = session.accept(deadline)
        finally:
            finish_injection()
        ready = session.start(hello, deadline)
        # Tracing is on: from now a signal asks the agent to detach, at once, even when we are
        # blocked writing to a slow stdout, and _stream drains what is in flight (it must not
        # be interrupted by an exception: see _stream).
        requested: List[int] = []

        def detach(signum: int, frame: Any) -> None:
            requested.append(signum)
            session.request_stop()

        for s in old_handlers:
            signal.signal(s, detach)
        _module_notices(ready, pid)
        suspended = ready.get("suspended") or []
        _say("process %d attached (backend %s, %d threads, %.0f ms%s)" % (
            pid, ready.get("backend"), ready.get("threads", 0), (time.monotonic() - started) * 1e3,
            "; suspends %s until detach" % ", ".join(map(str, suspended)) if suspended else ""))
        greenlets = ready.get("greenlets")
        if isinstance(greenlets, str) and greenlets not in ("", "traced"):
            _say("notice: " + greenlets)  # never silent: greenlets traced as one thread
        code = _stream(session, renderers, status, max_events, duration, pid, requested,
                       ReaderWatch(out.fileno()))
        if session.bye is not None and not session.bye.get("seen"):
            _children_notice(pid)
        return code
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
        if session is not None:
            session.close()


def _module_notices(ready: Dict[str, Any], pid: int) -> None:
    """What the target made of the query's module names: aliases it resolved, and names that
    match nothing because no such module is loaded (never silent)."""
    for typed, resolved in sorted(ready.get("aliases", {}).items()):
        _say("module %s resolves to %s in the target; matching %s" % (typed, resolved, resolved))
    for name, candidates in sorted(ready.get("missing", {}).items()):
        text = "module %s is not loaded in process %d: it matches nothing unless it is imported" \
            % (name, pid)
        if candidates:
            text += "; its file is loaded as %s (try %s)" % (
                ", ".join(candidates), " or ".join("module=%s" % c for c in candidates))
        _say(text)


def _children_notice(pid: int) -> None:
    """Nothing matched: if the work may be in child processes (a pre-fork server's workers,
    Django's autoreloader), say where."""
    children = target_mod.python_children(pid)
    if children:
        _say("no event matched in process %d, which has Python child processes: %s; the work "
             "may be done there (trace one with -p)" % (pid, ", ".join(map(str, children[:10]))
                                                         + (", ..." if len(children) > 10 else "")))


def _stream(session: Session, renderers: List[Any], status: Status, max_events: int,
            duration: Optional[float], pid: int, requested: List[int],
            reader: Optional[ReaderWatch] = None) -> int:
    """Render until the user, a limit or the target ends the session. Returns the exit code.

    Signals arrive in ``requested`` (set by handlers that only record them): an exception raised
    inside session.items() would end that generator and lose the events still in flight."""
    end_at = time.monotonic() + duration if duration else None
    stop_deadline: Optional[float] = None
    exit_code = 0
    seen = 0
    # Events already in flight when the user stops are still shown; only --max-events and a
    # closed stdout end the output itself.
    rendering = True

    def stop() -> None:
        nonlocal stop_deadline
        if stop_deadline is None:
            session.request_stop()
            stop_deadline = time.monotonic() + 5.0

    def reader_left() -> None:
        # `| head`: the reader is gone. Detach quietly; nothing more can be shown.
        nonlocal rendering
        _silence_stdout()
        rendering = False
        stop()

    write_error: Optional[OSError] = None

    def write_failed(exc: OSError) -> None:
        # -o on a full disk, a --perfetto directory removed meanwhile: nothing more can be
        # written. Detach cleanly, and say why at the end.
        nonlocal rendering, write_error
        write_error = write_error or exc
        rendering = False
        stop()

    # The fast pipeline (fastpath.py): a Batch per RECORDS frame, rendered text written at once.
    sink = fastpath.make_sink(session, renderers)
    items = session.items(poll=0.1, sink=sink)
    while True:
        try:
            if sink is not None:
                # How many events the sink may still render: the decoding goes on after.
                sink.limit = (-1 if not max_events else max(max_events - seen, 0)) \
                    if rendering else 0
            try:
                item = next(items)
            except StopIteration:
                break
            if requested:
                stop()
            if isinstance(item, Batch):
                assert sink is not None
                seen += item.events
                status.dropped += item.dropped
                if rendering:
                    status.shown += item.rendered
                    if max_events and seen >= max_events:
                        rendering = False
                        stop()
                    sink.emit(item)
            elif isinstance(item, Event):
                seen += 1
                if rendering:
                    for r in renderers:
                        r.event(item)
                    status.shown += 1
                    if max_events and seen >= max_events:
                        rendering = False
                        stop()
            elif isinstance(item, Drop):
                status.dropped += item.count
                # Like the events: nothing more once --max-events is reached or stdout closed.
                if rendering:
                    for r in renderers:
                        r.drop(item.count, item.seq)
            else:
                for r in renderers:
                    r.flush()
            status.update()
            if rendering and reader is not None and reader.gone():
                reader_left()
            if end_at is not None and time.monotonic() >= end_at:
                stop()
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                break
        except BrokenPipeError:
            reader_left()
        except OSError as exc:
            write_failed(exc)
    status.clear()
    for r in renderers:
        try:
            r.close()
        except BrokenPipeError:
            _silence_stdout()
        except OSError as exc:
            write_failed(exc)
    if session.bye is not None or stop_deadline is not None:
        _say("process %d detached" % pid)
        if session.bye is None:
            # Never silent: the agent will remove its tracer once it sees us gone, but it did
            # not say it had.
            _say("warning: the agent did not confirm the detach; it removes its tracer when it "
                 "sees this CLI gone")
        bye = session.bye or {}
        if bye.get("dropped"):
            _say("%d events dropped" % bye["dropped"])
    if write_error is not None:
        exit_code = _report(OutputFailed("could not write the output: %s" % write_error))
    return exit_code


def _silence_stdout() -> None:
    # Point stdout at /dev/null so that the interpreter's final flush cannot raise again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _report(exc: HunterAttachError) -> int:
    """The one line and the hint of a failure; returns its exit code."""
    _say(exc.message)
    if exc.hint:
        _say("hint: " + exc.hint)
    return exc.exit_code


class _Command(click.Command):
    """click's own errors (a bad option value, a missing -p) in our format, one line and a
    hint with exit code 2, as are errors found while checking the options."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.ClickException as exc:
            code = _report(OptionError(exc.format_message()))
        except HunterAttachError as exc:  # from an option's check
            code = _report(exc)
        except click.Abort:  # Ctrl-C while click parses, should the early handler be gone
            _say("interrupted before attaching")
            code = 130
        sys.exit(code or 0)  # --help and --version return 0


def _one_pid(ctx: click.Context, param: click.Parameter, pids: Sequence[int]) -> int:
    if len(pids) > 1:
        raise OptionError(
            "-p was given %d times (%s); hunter-trace traces one process"
            % (len(pids), ", ".join(map(str, pids))),
            "Several processes are not supported yet: trace each with its own hunter-trace.")
    return pids[0]


def _seconds(ctx: click.Context, param: click.Parameter, value: Optional[float]
             ) -> Optional[float]:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise click.BadParameter("%s is not a positive number of seconds" % value)
    return value


def _check_perfetto(path: str) -> None:
    """The Perfetto file is written at detach, next to its final path: find out now whether it
    can be, rather than lose the whole trace then."""
    try:
        fd, tmp = create_temp(path)
    except OSError as exc:
        raise OptionError("--perfetto %s: %s" % (path, exc.strerror or exc),
                          "Give a file in an existing directory that you may write.") from None
    os.close(fd)
    os.unlink(tmp)


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name=PROG, message="%(prog)s %(version)s",
                      help="Print the version and exit.")
@click.option("-p", "--pid", type=click.IntRange(min=1), multiple=True, required=True,
              callback=_one_pid, metavar="PID", help="The process to trace.")
@click.option("--gdb", "use_gdb", is_flag=True,
              help="Inject with gdb (ptrace). Without it, use the service's manhole socket.")
@click.option("-s", "--signal", "signal_name", default=None, metavar="SIGNAL",
              help="Manhole mode: send this signal first (e.g. SIGUSR1, USR1 or 10), for a "
                   "service that installed manhole with activate_on=SIGNAL.")
@click.option("-t", "--timeout", type=float, default=5.0, show_default=True, callback=_seconds,
              metavar="SECONDS", help="Seconds allowed for attaching.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write events to this file instead of stdout.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.option("--printer", type=click.Choice(["call", "code"]), default="call", show_default=True,
              help="Text layout: hunter's CallPrinter or CodePrinter.")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True, help="Colors in text output (NO_COLOR is respected).")
@click.option("--perfetto", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write a Chrome/Perfetto trace-event JSON file.")
@click.option("-c", "--summary", is_flag=True,
              help="Print a per-function table at exit (instead of the events, unless --json "
                   "or -o asks for them too).")
@click.option("--repr-limit", type=click.IntRange(16, 1 << 20), default=1024, show_default=True,
              help="Longest repr of a value.")
@click.option("--max-events", type=click.IntRange(0), default=0,
              help="Detach after this many events (0: no limit).")
@click.option("-d", "--duration", type=click.FloatRange(0, min_open=True), default=None,
              help="Detach after this many seconds.")
@click.option("--drop", is_flag=True,
              help="Drop events instead of slowing the target when the CLI falls behind.")
@click.option("--pid-prefix", is_flag=True, help="Prefix each text line with the pid.")
@click.option("--backend", type=click.Choice(["auto", "c", "python"]), default="auto",
              show_default=True,
              help="The in-target tracer: the C one (auto falls back to the pure-Python one, "
                   "with a warning, when none can be built for the target).")
@click.option("-v", "--verbose", is_flag=True, help="Show what happens while attaching.")
@click.argument("query", nargs=-1)
def main(pid: int, use_gdb: bool, signal_name: Optional[str], timeout: float,
         output: Optional[str], as_json: bool, printer: str, color: str, perfetto: Optional[str],
         summary: bool, repr_limit: int, max_events: int, duration: Optional[float], drop: bool,
         pid_prefix: bool, backend: str, verbose: bool, query: Sequence[str]) -> None:
    """Trace a running Python process: hunter-style QUERY terms, ANDed, e.g. module=os.path."""
    out: Any = sys.stdout
    try:
        # From here a Ctrl-C is a KeyboardInterrupt, caught below (the entry point's early
        # handler just exits, which is right only while nothing has been done).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sig = None
        if signal_name is not None:
            from .inject.manhole import parse_signal

            sig = parse_signal(signal_name)
            if use_gdb:
                raise OptionError(
                    "-s SIGNAL is for manhole mode; it cannot be used with --gdb",
                    "Drop -s to inject with gdb (no signal is needed), or drop --gdb to wake "
                    "the service's manhole with the signal.")
        if perfetto:
            _check_perfetto(perfetto)
        if output:
            try:
                fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except OSError as exc:
                raise OptionError("-o %s: %s" % (output, exc.strerror),
                                  "Give a file you may write.") from None
            out = Output(fd, "utf-8", owned=True)
        else:
            out = Output(sys.stdout.fileno(), sys.stdout.encoding or "utf-8", owned=False)
        # Like strace -c: the table instead of the event lines, unless they go somewhere
        # explicitly (--json or -o).
        quiet = summary and not as_json and not output
        options = RenderOptions(printer=printer, json=as_json, perfetto=perfetto,
                                summary=summary, color=color, pid_prefix=pid_prefix, quiet=quiet)
        config = {"repr_limit": repr_limit, "drop": drop, "summary": summary}
        code = run(pid, use_gdb, sig, timeout, query, out, options, config, max_events, duration,
                   verbose, backend)
    except HunterAttachError as exc:
        code = _report(exc)
    except (KeyboardInterrupt, Detach):
        _say("interrupted while attaching; nothing was left in process %d" % pid)
        code = 130
    finally:
        if out is not sys.stdout:
            try:
                out.close()
            except OSError:  # a closed pipe: nothing more can be shown anyway
                pass
    sys.exit(code)
