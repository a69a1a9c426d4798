"""``--workers N``: one supervisor process and N worker processes sharing the listeners.

The supervisor binds every listener first (so a bad address is one error line and exit 1,
before any worker exists) and resolves ``--port 0`` to a real port. Then, where the OS has
SO_REUSEPORT, each worker binds its own socket on that address and the kernel spreads
connections and datagrams over them; the supervisor keeps its TCP sockets bound but not
listening (the kernel hands connections to listening sockets only), which holds the port for
restarts, and closes its UDP sockets before the workers bind theirs: a bound UDP socket would
get its share of datagrams, and leaving the group once the workers serve moved sessions from
one worker to the other (SO_REUSEPORT's hash is taken over the group's size: a DTLS handshake
begun on one worker went on at the other, which knew nothing of it). Unix sockets, ``--fd``
sockets and every socket where SO_REUSEPORT does not balance (anywhere but Linux:
listeners.REUSE_PORT) are inherited: all workers accept on the one listening socket.

Workers are forked from the supervisor's (stdlib) event loop with signals blocked around the
fork; a child resets them and starts its own loop, exactly as a single-process server. Each
worker tells the supervisor it is ready through a pipe (whose EOF also says it is gone) and
serves its metrics on a private Unix socket; the supervisor's ``--metrics`` endpoint sums them.

A worker that dies is restarted after a delay that doubles with each quick death (logged);
SIGTERM/SIGINT are forwarded for a graceful drain, and the supervisor exits when all workers
have stopped. A second SIGINT is forwarded too: workers then exit at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable

from socket_echo.config import (
    READY_TIMEOUT,
    RESTART_DELAY,
    RESTART_MAX_DELAY,
    STABLE_AFTER,
    WORKER_CHECK_EVERY,
    WORKER_CHECK_TIMEOUT,
    WORKER_METRICS_BACKLOG,
    ListenerSpec,
    ServerConfig,
)
from socket_echo.exits import FAILED, OK
from socket_echo.gates.credentials import Credentials
from socket_echo.kinds import kind
from socket_echo.listeners import BindError, BoundListener, bind_all, close_all, rebind
from socket_echo.logs import log_event, logger, set_worker
from socket_echo.metrics import health_factory
from socket_echo.server import run
from socket_echo.supervisors import metrics_sum

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
# What a worker runs (uvicorn's Multiprocess target): the config, its listeners, the
# credentials, its private metrics listener, and the callback that says it serves; returns
# the worker's exit code. server.run by default; tests give one that exits.
Target = Callable[
    [ServerConfig, list[BoundListener], Credentials, list[BoundListener], Callable[[], None]], int
]
PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def restart_delay(quick_deaths: int, lived: float) -> tuple[int, float]:
    """After a worker died having lived ``lived`` seconds: (quick deaths now, seconds to wait
    before restarting it). The delay doubles with each quick death, from RESTART_DELAY up
    to RESTART_MAX_DELAY; a worker that lived STABLE_AFTER seconds starts afresh."""
    quick = 0 if lived >= STABLE_AFTER else quick_deaths + 1
    return quick, min(RESTART_MAX_DELAY, RESTART_DELAY * 2 ** max(0, quick - 1))


@dataclasses.dataclass
class Worker:
    index: int
    metrics_path: str
    pid: int = 0
    ready: bool = False
    answering: bool = True  # its /healthz answered at the last look (_watch_workers)
    ever_ready: bool = False
    started_at: float = 0.0
    quick_deaths: int = 0
    ready_fd: int = -1


class Supervisor:
    def __init__(
        self,
        config: ServerConfig,
        count: int,
        shared: list[BoundListener],
        placeholders: list[BoundListener],
        metrics_listeners: list[BoundListener],
        credentials: Credentials | None = None,
        target: Target = run,
    ) -> None:
        self.config = config
        self.target = target
        self.shared = shared  # inherited by every worker
        self.rebound = list(placeholders)  # every worker binds its own socket on these
        self.placeholders = placeholders  # what this process holds of them (TCP only, once run)
        self.metrics_listeners = metrics_listeners
        self.credentials = credentials or Credentials()
        self.rundir = tempfile.mkdtemp(prefix="socket-echo-")
        self.workers = [
            Worker(i, os.path.join(self.rundir, f"worker-{i}.sock")) for i in range(1, count + 1)
        ]
        self.stopping = False
        self.restarts = 0
        self.exit_code = OK
        self._finished: asyncio.Event | None = None
        self._all_ready: asyncio.Event | None = None
        self._metrics_servers: list[asyncio.AbstractServer] = []
        self.totals = metrics_sum.WorkerTotals()  # the workers' scrapes, and the dead's counters

    # -- the supervisor's side --------------------------------------------------------------
    def run(self) -> int:
        loop = asyncio.new_event_loop()  # the stdlib loop: workers are forked from it
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._main(loop))
        finally:
            for server in self._metrics_servers:
                server.close()
            close_all(self.metrics_listeners)
            close_all(self.placeholders)
            close_all(self.shared)  # removes the Unix socket files this process made
            shutil.rmtree(self.rundir, ignore_errors=True)
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> int:
        self._finished, self._all_ready = asyncio.Event(), asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGCHLD, self._reap, loop)
        how = "SO_REUSEPORT" if self.rebound else "one inherited socket per listener"
        log_event(
            logging.INFO,
            "workers",
            f"supervisor (pid {os.getpid()}): starting {len(self.workers)} workers sharing "
            f"{', '.join(b.url for b in self.rebound + self.shared)} ({how})",
            workers=len(self.workers),
        )
        self._release_udp()
        for worker in self.workers:
            self._spawn(loop, worker)
        waits = [loop.create_task(e.wait()) for e in (self._all_ready, self._finished)]
        await asyncio.wait(waits, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        await self._serve_metrics(loop)
        await self._finished.wait()
        log_event(
            logging.INFO,
            "stopped",
            f"supervisor: all workers stopped ({self.restarts} restart(s))",
            restarts=self.restarts,
        )
        return self.exit_code

    def _release_udp(self) -> None:
        """Before the workers bind their own UDP sockets: ours would take a share of the
        datagrams, and closing it later would change the group under the sessions."""
        for bound in [b for b in self.placeholders if kind(b.scheme).datagram]:
            bound.close()
            self.placeholders.remove(bound)

    async def _serve_metrics(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.metrics_listeners:
            return

        def render() -> Awaitable[bytes]:
            return metrics_sum.render(
                sum(w.ready for w in self.workers),
                self.restarts,
                [w.metrics_path for w in self.workers if w.pid],
                self.totals,
            )

        def ready() -> str:
            if self.stopping:
                return "draining"
            if not any(w.ready for w in self.workers):
                return "no worker ready"
            silent = [str(w.index) for w in self.workers if w.ready and not w.answering]
            return f"worker {', '.join(silent)} not answering" if silent else ""

        loop.create_task(self._watch_workers())

        for bound in self.metrics_listeners:
            self._metrics_servers.append(
                await loop.create_server(health_factory(render, ready, loop), sock=bound.sock)
            )
            url = bound.url.replace("tcp://", "http://")
            log_event(
                logging.INFO,
                "metrics",
                f"metrics and health on {url} (/metrics sums the workers, /healthz, /readyz)",
                listener=url,
                port=bound.spec.port,
            )

    async def _watch_workers(self) -> None:
        """Each ready worker's /healthz, every WORKER_CHECK_EVERY: one that does not answer
        within WORKER_CHECK_TIMEOUT (stopped, or its loop stuck) makes /readyz say so, as the
        connections the kernel routes to it would hang."""
        while not self.stopping:
            workers = [w for w in self.workers if w.pid and w.ready]
            verdicts = await asyncio.gather(
                *(metrics_sum.answers(w.metrics_path, WORKER_CHECK_TIMEOUT) for w in workers)
            )
            for worker, answering in zip(workers, verdicts, strict=True):
                worker.answering = answering
            await asyncio.sleep(WORKER_CHECK_EVERY)

    def _spawn(self, loop: asyncio.AbstractEventLoop, worker: Worker) -> None:
        ready_r, ready_w = os.pipe()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # the worker: never returns into the supervisor's code
                code = FAILED
                try:
                    os.close(ready_r)
                    code = self._worker_main(worker, ready_w)
                except BaseException:  # a bug, not a user's mistake: show it
                    traceback.print_exc()
                finally:
                    logging.shutdown()
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(ready_w)
        worker.pid, worker.ready, worker.ready_fd = pid, False, ready_r
        worker.started_at = loop.time()
        loop.add_reader(ready_r, self._on_ready_pipe, loop, worker)
        log_event(
            logging.INFO,
            "worker_start",
            f"worker {worker.index} started (pid {pid})",
            worker=worker.index,
            pid=pid,
        )

    def _on_ready_pipe(self, loop: asyncio.AbstractEventLoop, worker: Worker) -> None:
        try:
            data = os.read(worker.ready_fd, 64)
        except OSError:
            data = b""
        if data:
            worker.ready = worker.ever_ready = True
            if all(w.ever_ready for w in self.workers) and self._all_ready is not None:
                self._all_ready.set()
            return
        self._close_pipe(loop, worker)  # EOF: the worker is gone

    @staticmethod
    def _close_pipe(loop: asyncio.AbstractEventLoop, worker: Worker) -> None:
        worker.ready = False
        if worker.ready_fd >= 0:
            loop.remove_reader(worker.ready_fd)
            os.close(worker.ready_fd)
            worker.ready_fd = -1

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is None:
                continue
            worker.pid = 0
            self.totals.retire(worker.metrics_path)  # its counters stay in the sums
            self._close_pipe(loop, worker)
            self._on_exit(loop, worker, os.waitstatus_to_exitcode(status))
        if self.stopping and not any(w.pid for w in self.workers) and self._finished:
            self._finished.set()

    def _on_exit(self, loop: asyncio.AbstractEventLoop, worker: Worker, code: int) -> None:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited ({code})"
        if self.stopping:
            log_event(logging.DEBUG, "worker_exit", f"worker {worker.index} {how}")
            return
        if not worker.ever_ready:  # it could not even start: restarting would loop
            log_event(
                logging.ERROR,
                "worker_failed",
                f"worker {worker.index} {how} before it was ready: stopping",
                worker=worker.index,
            )
            self.exit_code = FAILED
            self._on_signal(signal.SIGTERM)
            return
        lived = loop.time() - worker.started_at
        worker.quick_deaths, delay = restart_delay(worker.quick_deaths, lived)
        log_event(
            logging.WARNING,
            "worker_restart",
            f"worker {worker.index} {how} after {lived:.1f} s; restarting in {delay:g} s",
            worker=worker.index,
            code=code,
            delay=delay,
        )
        loop.call_later(delay, self._restart, loop, worker)

    def _restart(self, loop: asyncio.AbstractEventLoop, worker: Worker) -> None:
        if self.stopping or worker.pid:
            return
        self.restarts += 1
        self._spawn(loop, worker)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping and sig != signal.SIGINT:
            return
        if not self.stopping:
            log_event(
                logging.INFO,
                "shutdown",
                f"supervisor: {sig.name}: draining {sum(1 for w in self.workers if w.pid)} "
                "worker(s)",
            )
        self.stopping = True
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, sig)
        if not any(w.pid for w in self.workers) and self._finished is not None:
            self._finished.set()

    # -- the worker's side --------------------------------------------------------------------
    def _worker_main(self, worker: Worker, ready_w: int) -> int:
        supervisor = os.getppid()
        die_with_parent()
        if os.getppid() != supervisor:  # it died before we asked to be told
            return FAILED
        signal.set_wakeup_fd(-1)  # that was the supervisor loop's pipe
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        asyncio.events._set_running_loop(None)  # the supervisor's loop is not ours
        asyncio.set_event_loop(None)
        set_worker(worker.index, self.config.log_level, self.config.log_format)
        for other in self.workers:
            if other.ready_fd >= 0:
                os.close(other.ready_fd)
        for bound in self.metrics_listeners:
            bound.sock.close()
        shared = [dataclasses.replace(b, inode=0) for b in self.shared]  # never unlink them
        try:
            own = [rebind(b, self.config.backlog) for b in self.rebound]
            private = bind_all(
                (ListenerSpec("unix", "", 0, worker.metrics_path),), WORKER_METRICS_BACKLOG
            )
        except BindError as exc:
            logger.error("%s", exc.strerror or exc)
            return FAILED
        finally:
            for bound in self.placeholders:
                bound.sock.close()

        def serving() -> None:  # once the worker serves: the write end stays open until it exits
            os.write(ready_w, b"r")

        return self.target(self.config, own + shared, self.credentials, private, serving)


def die_with_parent() -> None:
    """Linux: SIGTERM (a graceful drain) when the supervisor dies, even by SIGKILL, so
    workers are never left behind unsupervised."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
