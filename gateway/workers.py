"""The multi-process gateway: a supervisor and N SO_REUSEPORT workers.

The supervisor (this module, run by ``devicegate serve gateway --workers N``) starts each
worker as ``python -m gateway.serve --worker-index I --settings-stdin`` and hands it the
settings as one JSON line on its stdin. Each worker binds its own listening socket with
SO_REUSEPORT on the same address (the kernel spreads new connections across them), runs
its own event loop (uvloop), database pool, spool ``spool_dir/w<I>`` and event chain
``<instance>/w<I>``. Workers share no memory, so one crashing loses only its own sessions;
they share the failed-handshake budget by telling one another their failures over
datagram socketpairs this supervisor makes and keeps (`gateway.failure_channel.Mesh`).

Invariants:

* Signals: SIGTERM and SIGINT are forwarded to every worker as SIGTERM, and its stdin is
  closed: a worker still importing ignores signals and stops on its stdin's end instead.
  Each drains (stops accepting, finishes packets in flight, ends sessions, ships its
  spool); the supervisor exits 0 once every worker has exited 0. SIGHUP is forwarded as
  is (policy reload). Workers still running after ``drain_timeout`` + `SHIP_GRACE` get
  SIGKILL (their spools are replayed at the next start).
* A worker that exits while the supervisor is not stopping is restarted with exponential
  backoff (0.5 s doubling to `MAX_BACKOFF`; reset after `STABLE_AFTER` seconds of life).
* The supervisor holds the write end of each worker's stdin: if the supervisor dies, even
  by SIGKILL, the workers see their stdin end and drain.
* The listen address is checked (and a port 0 resolved) by binding it with SO_REUSEPORT in
  the supervisor before any worker starts; that socket never listens, so it gets no
  connections. First a probe binds it *without* SO_REUSEPORT: that fails (EADDRINUSE)
  while anything listens there, so a second gateway never silently shares the port
  (SO_REUSEPORT would let it, for the same uid). Worker restarts do not probe.
* Slots (`gateway.instances`): the supervisor claims a block of worker slots on its state
  directory; worker ``i`` of the block is started as slot ``base + i`` (spool, chain,
  checkpoints and metrics port are the slot's). Without ``take_over`` a live supervisor
  on the same state directory is refused (`GatewayRunning`, one line).
* Take-over (``take_over``, `serve gateway --take-over`): the probe is skipped (the old
  instance listens), the new workers bind beside the old ones on other slots, each only
  once its `gateway.preflight.Readiness` is empty (broker reachable, revocation state
  current, policy loaded: no device meets a worker that would refuse it), and once every
  worker reports listening and ready on its ready pipe, the old supervisors get SIGTERM
  and drain as for any stop. Not ready within ``takeover_within``:
  the take-over is abandoned (the new instance stops, exits 1), the old one serves on.
* Orphaned slots (`gateway.instances.claim_orphans`, `gateway.orphans`): right after its
  own block, the supervisor claims every slot outside the live blocks whose spool a dead
  gateway left with events in it; once its workers are all ready (or `ORPHANS_AFTER`
  seconds after start) it runs one ship-only process per such slot, and releases the
  slot's claim when that process exits. They never delay the workers; a stop sends them
  SIGTERM too (what they have not shipped stays in the spool).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Final

from gateway import tls
from gateway.config import config_from_settings
from gateway.events import codec as event_codec
from gateway.failure_channel import Mesh
from gateway.instances import GatewayRunning, Orphan, Running, SlotClaim, claim_orphans, claim_slots
from gateway.orphans import ORPHANS_AFTER
from gateway.policy import load_policy
from gateway.serve import raise_fd_limit
from schemas.logs import configure_logging
from schemas.settings import Settings

__all__ = [
    "MAX_BACKOFF",
    "SHIP_GRACE",
    "STABLE_AFTER",
    "Supervisor",
    "supervise",
]

log = logging.getLogger("devicegate.gateway.supervisor")

MAX_BACKOFF: Final = 15.0
STABLE_AFTER: Final = 30.0
SHIP_GRACE: Final = 15.0
"""Beyond the drain timeout: time for a worker to flush and ship its spool."""
_POLL: Final = 0.05


@dataclass
class _Worker:
    index: int  # in this supervisor (its failure mesh)
    slot: int  # on the state directory (spool, chain, metrics port)
    process: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None  # the read end of its ready pipe, until it reports
    ready: bool = False
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)


@dataclass
class _Orphan:
    """An orphaned slot this supervisor claimed, and its ship-only process once started."""

    orphan: Orphan
    claim: SlotClaim
    process: subprocess.Popen[bytes] | None = None


class Supervisor:
    """Starts, watches, restarts and stops the worker processes.

    Args:
        settings: The gateway settings (sent to every worker).
        workers: How many worker processes.
        python: The interpreter for the workers (default: this one).
        take_over: Start beside the running gateway and stop it once ready (see above).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        workers: int,
        python: str = sys.executable,
        take_over: bool = False,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.settings = settings
        self.python = python
        self.count = workers
        self.workers: list[_Worker] = []
        self.take_over = take_over
        self.replacing: list[Running] = []  # the supervisors a take-over stops
        self._claim: SlotClaim | None = None
        self.orphans: list[_Orphan] = []  # claimed, not yet shipped (or given up)
        self._orphans_started = False
        self._stopping = False
        self._hangup = False
        self._reserved: socket.socket | None = None
        self._mesh: Mesh | None = None
        self._wakeup: tuple[int, int] = (-1, -1)

    # --- lifecycle --------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit status (0: every worker drained)."""
        raise_fd_limit()
        self._claim_slots()
        try:
            return self._run()
        finally:
            if self._claim is not None:
                self._claim.release()
            for orphan in self.orphans:
                orphan.claim.release()

    def _run(self) -> int:
        if not any(old.listen == self.settings.gateway_listen for old in self.replacing):
            self._probe_address()  # (a take-over expects its predecessor there, no one else)
        self._reserve_address()
        if self.count > 1:  # one worker has no siblings to share failures with
            self._mesh = Mesh(self.count)
        # A signal wakes the watch loop at once (a stop starts the drain without waiting
        # out the poll interval): its handler runs, and the wakeup fd ends the nap.
        self._wakeup = os.pipe()
        for fd in self._wakeup:
            os.set_blocking(fd, False)
        previous_wakeup = signal.set_wakeup_fd(self._wakeup[1], warn_on_full_buffer=False)
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        status = 0
        try:
            for worker in self.workers:
                self._start(worker)
            begun = time.monotonic()
            within = self.settings.takeover_within.total_seconds()
            while not self._stopping:
                if self._hangup:
                    self._hangup = False
                    self._forward(signal.SIGHUP)
                self._watch()
                self._watch_orphans(begun)
                if self.replacing:
                    if self._all_ready():
                        self._replace()
                    elif time.monotonic() - begun > within:
                        log.error(
                            "take-over abandoned: the workers were not ready within %.0f s "
                            "(see their /readyz); the running gateway (pid %s) serves on",
                            within, ", ".join(str(r.pid) for r in self.replacing),
                        )  # fmt: skip
                        self.replacing = []
                        self._stopping = True
                        status = 1
                self._nap()
            return self._stop() or status
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_wakeup)
            for fd in self._wakeup:
                os.close(fd)
            if self._reserved is not None:
                self._reserved.close()
            if self._mesh is not None:
                self._mesh.close()
            for worker in self.workers:
                self._close_ready(worker)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._hangup = True
        else:
            self._stopping = True

    def _nap(self) -> None:
        """Sleep one poll interval, or less if a signal arrives."""
        readable, _, _ = select.select([self._wakeup[0]], [], [], _POLL)
        if readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wakeup[0], 512)

    def _claim_slots(self) -> None:
        claim, live = claim_slots(self.settings.spool_dir, self.count, self.settings.gateway_listen)
        self._claim = claim
        if live and not self.take_over:
            claim.release()
            self._claim = None
            pids = ", ".join(sorted({str(r.pid) for r in live}))
            raise GatewayRunning(
                f"a gateway already runs on the state directory {self.settings.spool_dir} "
                f"(supervisor pid {pids}): stop it, or replace it without a gap with "
                "`devicegate serve gateway --take-over`"
            )
        # One supervisor may hold several claims (orphaned slots it ships): one each.
        self.replacing = list({old.pid: old for old in live}.values())
        self.workers = [_Worker(i, claim.base + i) for i in range(self.count)]
        try:
            claimed = claim_orphans(self.settings.spool_dir, self.settings.gateway_listen)
        except OSError as exc:  # never worth refusing to start for
            log.error("orphaned spools not looked for: %s", exc)
            claimed = []
        self.orphans = [_Orphan(orphan, slot_claim) for orphan, slot_claim in claimed]
        if live:
            log.info(
                "taking over from the gateway with pid %s: workers on slots w%d..w%d",
                ", ".join(str(r.pid) for r in self.replacing), claim.base,
                claim.base + self.count - 1,
            )  # fmt: skip

    def _probe_address(self) -> None:
        """Fail (EADDRINUSE) if anything listens on the address: bound without
        SO_REUSEPORT, a listener of any process (even one with it) is a conflict."""
        host, port = self.settings.listen_host_port
        if port == 0:
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise GatewayRunning(
                    f"cannot listen on {self.settings.gateway_listen}: another process "
                    "listens there (a running gateway? replace it without a gap with "
                    "`devicegate serve gateway --take-over`, or choose another --listen)"
                ) from None

    def _all_ready(self) -> bool:
        for worker in self.workers:
            if not worker.ready and worker.ready_fd is not None:
                with contextlib.suppress(BlockingIOError):
                    worker.ready = os.read(worker.ready_fd, 16) != b""
                if worker.ready:
                    self._close_ready(worker)
        return all(worker.ready for worker in self.workers)

    def _close_ready(self, worker: _Worker) -> None:
        if worker.ready_fd is not None:
            os.close(worker.ready_fd)
            worker.ready_fd = None

    def _replace(self) -> None:
        """Every new worker is ready: SIGTERM the old supervisors (they drain)."""
        for old in self.replacing:
            log.info("all %d workers ready; stopping the old gateway (pid %d)", self.count, old.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(old.pid, signal.SIGTERM)
        self.replacing = []

    def _reserve_address(self) -> None:
        host, port = self.settings.listen_host_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        if port == 0:
            port = sock.getsockname()[1]
            listen = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            self.settings = self.settings.model_copy(update={"gateway_listen": listen})
        self._reserved = sock

    @property
    def port(self) -> int:
        return self.settings.listen_host_port[1]

    # --- workers ----------------------------------------------------------------------

    def _payload(self) -> bytes:
        secrets = {"ca_passphrase", "ca_passphrase_file"}  # a gateway needs no CA key
        data = self.settings.model_dump(mode="json", exclude=secrets)
        return json.dumps(data).encode() + b"\n"

    def _start(self, worker: _Worker) -> None:
        command = [
            self.python, "-m", "gateway.serve",
            "--worker-index", str(worker.slot), "--settings-stdin",
        ]  # fmt: skip
        pass_fds: tuple[int, ...] = ()
        if self._mesh is not None:
            fds = self._mesh.fds(worker.index)
            command += fds.args()
            pass_fds = fds.pass_fds
        self._close_ready(worker)
        worker.ready = False
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        command += ["--ready-fd", str(write_end)]
        if self.replacing:  # the old gateway serves until this one is ready
            command.append("--listen-when-ready")
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                preexec_fn=_ignore_signals,
                pass_fds=(*pass_fds, write_end),
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        worker.ready_fd = read_end
        assert process.stdin is not None
        process.stdin.write(self._payload())
        process.stdin.flush()  # and kept open: its end tells the worker we are gone
        worker.process = process
        worker.started = time.monotonic()
        worker.restart_at = None
        log.info("worker %d started (pid %d)", worker.slot, process.pid)

    def _watch_orphans(self, begun: float) -> None:
        """Start the ship-only processes once the workers are ready (or `ORPHANS_AFTER`),
        and release each slot's claim when its process has exited."""
        if not self.orphans:
            return
        if not self._orphans_started:
            if not (self._all_ready() or time.monotonic() - begun > ORPHANS_AFTER):
                return
            self._orphans_started = True
            for orphan in self.orphans:
                self._ship(orphan)
        for orphan in list(self.orphans):
            process = orphan.process
            code = None if process is None else process.poll()
            if process is not None and code is None:
                continue
            if process is not None and code not in (0, 1):  # 1: it logged why
                log.error(
                    "shipping the orphaned spool of slot w%d failed (exit %s); its events "
                    "stay on disk for the next start",
                    orphan.orphan.slot, code,
                )  # fmt: skip
            orphan.claim.release()
            self.orphans.remove(orphan)

    def _ship(self, orphan: _Orphan) -> None:
        command = [
            self.python, "-m", "gateway.serve",
            "--worker-index", str(orphan.orphan.slot), "--ship-only", "--settings-stdin",
        ]  # fmt: skip
        try:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, preexec_fn=_quiet)
            assert process.stdin is not None
            with process.stdin:
                process.stdin.write(self._payload())
        except OSError as exc:  # (then released at the next watch)
            log.error("cannot ship the orphaned spool of slot w%d: %s", orphan.orphan.slot, exc)
            return
        orphan.process = process

    def _stop_orphans(self, deadline: float) -> None:
        """At stop (after SIGTERM, sent with the workers'): wait for the ship-only
        processes until ``deadline``, then kill; release every orphan claim."""
        for orphan in self.orphans:
            if orphan.process is not None:
                try:
                    _wait(orphan.process, max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    orphan.process.kill()
                    orphan.process.wait()
            orphan.claim.release()
        self.orphans = []

    def _watch(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            process = worker.process
            if process is not None:
                code = process.poll()
                if code is None:
                    continue
                self._reap(worker, code)
                if now - worker.started >= STABLE_AFTER:
                    worker.failures = 0
                worker.failures += 1
                delay = min(0.5 * 2 ** (worker.failures - 1), MAX_BACKOFF)
                worker.restart_at = now + delay
                log.error(
                    "worker %d (pid %d) exited with %d; restarting in %.1fs",
                    worker.slot, process.pid, code, delay,
                )  # fmt: skip
            elif worker.restart_at is not None and now >= worker.restart_at:
                self._start(worker)

    def _reap(self, worker: _Worker, code: int) -> None:
        process = worker.process
        assert process is not None
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        worker.exit_codes.append(code)
        worker.process = None

    def _forward(self, signum: int) -> None:
        if signum == signal.SIGTERM:
            for worker in self.workers:  # the level-triggered stop, for workers starting
                if worker.process is not None and worker.process.stdin is not None:
                    with contextlib.suppress(OSError):
                        worker.process.stdin.close()
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    def _stop(self) -> int:
        log.info("stopping %d workers", len(self.workers))
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout.total_seconds() + SHIP_GRACE
        for orphan in self.orphans:
            if orphan.process is not None and orphan.process.poll() is None:
                orphan.process.terminate()
        status = 0
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                code = _wait(process, max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time; killing it", worker.slot)
                process.kill()
                code = process.wait()
            self._reap(worker, code)
            if code != 0:
                status = 1
        self._stop_orphans(deadline)
        log.info("all workers stopped (status %d)", status)
        return status


def _wait(process: subprocess.Popen[bytes], timeout: float) -> int:
    """`Popen.wait`, told of the exit at once: with a timeout, ``wait`` polls with naps of
    up to 50 ms, which a stop would add to its time; a pidfd is readable when it exits."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except OSError:  # already reaped, or no pidfd (Linux < 5.3)
        return process.wait(timeout)
    try:
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    return process.wait(0.5)  # raises TimeoutExpired if it has not exited after all


def _quiet() -> None:
    # A ship-only process: a Ctrl-C to the terminal's process group is the supervisor's
    # to handle (it sends SIGTERM); SIGTERM keeps its default until the loop takes it.
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def _ignore_signals() -> None:
    # In the child before exec (the supervisor is single-threaded): a worker ignores these
    # until its event loop installs its handlers, so a SIGHUP or SIGTERM that arrives while
    # it imports does not kill it. A stop is never lost: it also closes the worker's stdin.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def supervise(settings: Settings, *, workers: int, take_over: bool = False) -> int:
    """Run ``workers`` gateway worker processes until SIGTERM; the exit status.

    ``workers`` 0 means one per CPU; ``take_over`` replaces the running gateway (see
    `Supervisor`). The TLS files and the policy file are checked here
    first, so a configuration error is one clear message, not workers restarting forever.

    Raises:
        GatewayConfigError: the TLS files are missing or unusable.
        PolicyError: the policy file is unreadable or invalid.
        GatewayRunning: a gateway runs on this state directory or listens on the
            address (and ``take_over`` is off).
        OSError: the listen address cannot be bound.
    """
    configure_logging(settings.log_format, settings.log_level.upper())
    config_from_settings(settings)
    load_policy(settings.policy_file)
    if not event_codec.ACCELERATED:
        log.warning(
            "the auth event encoder runs in Python (gateway.events._codec is not built): "
            "each event costs about 1.5x the CPU; reinstall with a C compiler at hand"
        )
    if not tls.CAPTURES_PRESENTED:
        log.warning(
            "refused TLS handshakes will not name the presented certificate "
            "(gateway._tlsext is not built); reinstall with a C compiler and OpenSSL's "
            "headers (libssl-dev) at hand"
        )
    count = workers or os.cpu_count() or 1
    return Supervisor(settings, workers=count, take_over=take_over).run()
