"""``devicegate serve gateway``: run one gateway worker in this process until SIGTERM.

SIGTERM/SIGINT drain: stop accepting, let the packets in flight finish, end every session
(DISCONNECT 0x8B on v5, ``server_shutting_down``; a DISCONNECT to the broker, so no will
fires) within ``Settings.drain_timeout``, then flush and ship the event spool.

The policy comes from the database (``POLICY_SOURCE=database``, the default when no
``POLICY_FILE`` is set): a `gateway.policy_listen.PolicyFollower` loads it at start and
follows every change by NOTIFY; until it is loaded devices are refused
(``policy_not_loaded``), as they are until the revocation state is current, so a worker
that starts while PostgreSQL is away never admits a device under a policy it has not
read. With ``POLICY_SOURCE=file`` SIGHUP re-reads the file; either way a new policy
re-judges the live sessions.

Several workers (``--workers N``) are separate processes started by `gateway.workers`;
each runs `serve` with its own ``worker_index`` (its slot, `gateway.instances`: during a
take-over the new instance's workers have other slots than the old one's): its own
SO_REUSEPORT listener on the shared address, its own spool (``spool_dir/w<i>``), event
chain (``<instance>/w<i>``), metrics port and database pool. They share one budget of
failed handshakes per address: each tells the others its failures over the datagram
sockets the supervisor hands it (`gateway.failure_channel`, ``--failure-inbox FD
--failure-outbox FD ...``).

Also runnable as ``python -m gateway.serve`` (settings from the environment), which the
supervisor uses for its workers: ``--worker-index I --settings-stdin`` reads the settings
as one JSON line on stdin and keeps stdin open; its end (the supervisor died) stops the
worker. ``--worker-index K --ship-only`` serves nothing: it ships slot K's orphaned spool
and exits (`gateway.orphans`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

import uvloop

from gateway.config import config_from_settings
from gateway.events.checkpoints import CheckpointPolicy
from gateway.events.sink import SpoolSink
from gateway.failure_channel import ChannelFds, FailureChannel
from gateway.policy_listen import PolicyFollower, load_database_state
from gateway.preflight import BrokerWatch, Readiness, schema_problem
from gateway.revocation_listen import RevocationCache
from gateway.server import Gateway
from gateway.takeover import SessionBus
from gateway.telemetry import GatewayMetrics, ObservingSink
from schemas.checkpoints import AuditSigner, CheckpointError, checkpoint_file
from schemas.logs import configure_logging
from schemas.settings import Settings, load_settings
from schemas.telemetry import Telemetry, serve_metrics, setup_telemetry

__all__ = ["checkpoint_policy", "main", "raise_fd_limit", "serve"]

log = logging.getLogger("devicegate.gateway")


def checkpoint_policy(settings: Settings, worker: str) -> CheckpointPolicy | None:
    """How this worker signs checkpoints: the audit key from the PKI directory and its own
    file ``<checkpoint_dir>/<instance>_<worker>.jsonl``; None (logged as an error) when
    there is no audit key: the chain then has no tamper evidence beyond the database."""
    try:
        signer = AuditSigner.load(settings.pki_dir)
    except CheckpointError as exc:
        log.error("audit checkpoints are OFF: %s", exc)
        return None
    return CheckpointPolicy(
        signer=signer,
        file=checkpoint_file(settings.checkpoint_dir, f"{settings.instance_id}/{worker}"),
        interval=settings.checkpoint_interval.total_seconds(),
    )


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (two sockets per session)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


async def serve(
    settings: Settings,
    *,
    ready: Callable[[Gateway], None] | None = None,
    worker_index: int = 0,
    reuse_port: bool = False,
    watch_stdin: bool = False,
    failure_fds: ChannelFds | None = None,
    ready_fd: int | None = None,
    listen_when_ready: bool = False,
) -> None:
    """Run one gateway worker until SIGTERM or SIGINT (or stdin's end, if watched).

    Args:
        settings: The configuration.
        ready: Called once the listener is up (tests use it to learn the port).
        worker_index: This worker's number: spool ``w<i>``, chain ``<instance>/w<i>``.
        reuse_port: Bind with SO_REUSEPORT (several workers share the address).
        watch_stdin: Stop when stdin reaches its end (the supervisor is gone).
        failure_fds: This worker's ends of the supervisor's failure mesh (None: no
            siblings).
        ready_fd: Written and closed once the worker listens and its `Readiness` has no
            problem (the supervisor's take-over waits for it).
        listen_when_ready: Listen only once the `Readiness` has no problem (a take-over:
            the running gateway serves meanwhile, so no device meets a worker that would
            refuse it); stopped before that, the worker never listens.
    """
    loop = asyncio.get_running_loop()
    host, port = settings.listen_host_port
    config = config_from_settings(settings)
    worker = f"w{worker_index}"
    configure_logging(
        settings.log_format, settings.log_level.upper(), fields={"worker": worker_index}
    )
    metrics_at = settings.metrics_host_port
    telemetry = setup_telemetry(
        service_name="devicegate-gateway",
        instance_id=f"{settings.instance_id}/{worker}",
        prometheus=metrics_at is not None,
        worker=worker_index,
    )
    metrics = GatewayMetrics(meter=telemetry.meter, tracer=telemetry.tracer)
    # Revocation state from LISTEN/NOTIFY; until it is current, connections are refused
    # (revocation_state_stale), so starting while PostgreSQL is away is safe.
    directory = RevocationCache(
        database_url=settings.database_url,
        stale_after=settings.revocation_stale_after.total_seconds(),
    )
    metrics.watch_revocation(directory.state_age)
    # Sessions admitted elsewhere (other workers, other instances) take over ours: heard
    # on the revocation cache's LISTEN connection.
    bus = SessionBus(
        database_url=settings.database_url, instance=settings.instance_id, worker=worker
    )
    bus.listen_on(directory)
    await bus.start()
    await directory.start()
    follower: PolicyFollower | None = None
    if settings.effective_policy_source == "database":
        if settings.policy_file is not None:
            log.warning(
                "POLICY_FILE %s is ignored: POLICY_SOURCE is database (seed the database "
                "with `devicegate policy apply FILE`)",
                settings.policy_file,
            )
        follower = PolicyFollower(database_url=settings.database_url, load=load_database_state)
        await follower.start()
    # Say plainly what is missing around the worker (and keep saying it on /readyz).
    schema = await schema_problem(settings.database_url)
    if schema is not None:
        log.error("%s", schema)
    broker = BrokerWatch(config.upstream.host, config.upstream.port)
    await broker.start()
    readiness = Readiness(
        broker=broker,
        revocation_stale=directory.stale,
        schema=schema,
        policy_loaded=(lambda: follower.loaded) if follower is not None else None,
    )
    if not await directory.wait_current(within=10.0):
        log.warning("revocation state is not current yet; refusing devices until it is")
    if follower is not None and not await follower.wait_current(within=10.0):
        log.warning("the database's policy is not loaded yet; refusing devices until it is")
    metrics_server: asyncio.Server | None = None
    marks: list[float] = []  # loop.time() of the stop's phases
    try:
        metrics_server = await _serve_metrics(
            telemetry, metrics_at, worker_index, readiness=readiness.problems
        )
        async with SpoolSink(
            database_url=settings.database_url,
            spool_dir=settings.spool_dir / worker,
            chain_id=f"{settings.instance_id}/{worker}",
            random_id=True,
            instance=settings.instance_id,
            checkpoints=checkpoint_policy(settings, worker),
            max_bytes=settings.spool_max_bytes,
            metrics=metrics,
        ) as sink:
            metrics.watch_sink(lambda: sink.stats)
            gateway = Gateway(
                config=config,
                sink=ObservingSink(sink, metrics),
                directory=directory,
                host=host,
                port=port,
                policy_file=settings.policy_file if follower is None else None,
                policy_follower=follower,
                max_connections=settings.max_connections,
                reuse_port=reuse_port,
                failed_handshakes_per_minute=settings.failed_handshakes_per_minute,
                throttled_in_flight=settings.throttled_handshakes_in_flight,
                throttled_queue=settings.throttled_handshake_queue,
                trusted_networks=settings.trusted_networks,
                bus=bus,
                metrics=metrics,
                failure_channel=FailureChannel.from_fds(failure_fds) if failure_fds else None,
            )
            stop = asyncio.Event()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGHUP, gateway.reload_policy)
            if watch_stdin:
                _watch_stdin(loop, stop)
            if listen_when_ready and not await _ready_or_stopped(readiness, stop):
                return
            await gateway.start()
            reported: asyncio.Task[None] | None = None
            if ready_fd is not None:
                reported = loop.create_task(_report_ready(readiness, ready_fd), name="ready")
            # Everything built so far (modules, settings, telemetry, pools) lives as long
            # as the worker: keep it out of the cyclic collector's full passes, which would
            # otherwise traverse it again and again while connections churn.
            gc.freeze()
            try:
                if ready is not None:
                    ready(gateway)
                await stop.wait()
                if reported is not None:
                    reported.cancel()
                log.info("worker %s draining", worker)
                marks.append(loop.time())
                await gateway.drain(within=settings.drain_timeout.total_seconds())
            finally:
                await gateway.close()
                marks.append(loop.time())
        marks.append(loop.time())  # the spool flushed and shipped
    finally:
        await broker.close()
        if follower is not None:
            await follower.close()
        await directory.close()
        await bus.close()
        if metrics_server is not None:
            metrics_server.close()
            await metrics_server.wait_closed()
        telemetry.shutdown()
    if len(marks) == 3:  # the stop's phases: where a drain's time goes
        ended = loop.time()
        log.info(
            "worker %s stopped in %.2f s: sessions ended %.2f s, spool shipped %.2f s, "
            "connections closed %.2f s",
            worker, ended - marks[0], marks[1] - marks[0], marks[2] - marks[1], ended - marks[2],
        )  # fmt: skip
    else:
        log.info("worker %s stopped", worker)


async def _serve_metrics(
    telemetry: Telemetry,
    at: tuple[str, int] | None,
    worker_index: int,
    *,
    readiness: Callable[[], list[str]] | None = None,
) -> asyncio.Server | None:
    """``GET /metrics`` (and ``GET /readyz``: `gateway.preflight.Readiness`) of worker ``i``
    on port ``P + i`` (None: off, or not bindable).

    A port that cannot be bound is logged as an error and the worker serves devices
    without it: metrics are not worth refusing devices for (and its scrape target shows
    ``up == 0``).
    """
    if at is None:
        return None
    host, port = at[0], at[1] + worker_index if at[1] else 0
    try:
        server = await serve_metrics(telemetry, host, port, readiness=readiness)
    except OSError as exc:
        log.error(
            "metrics not served: cannot listen on %s:%s: %s (DEVICEGATE_METRICS_LISTEN; "
            "worker i uses its port + i; off turns it off)",
            host, port, exc.strerror or exc,
        )  # fmt: skip
        return None
    log.info("metrics on http://%s:%s/metrics", host, server.sockets[0].getsockname()[1])
    return server


async def _ready_or_stopped(readiness: Readiness, stop: asyncio.Event) -> bool:
    """Wait until nothing is missing (True) or the worker is told to stop (False)."""
    problems = readiness.problems()
    if problems:
        log.info("listening once ready (a take-over): %s", "; ".join(problems))
    while problems and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
        problems = readiness.problems()
    return not stop.is_set()


async def _report_ready(readiness: Readiness, fd: int) -> None:
    """Tell the supervisor (one byte, then EOF) once nothing is missing."""
    try:
        while readiness.problems():  # noqa: ASYNC110 (a poll: its parts notify nothing)
            await asyncio.sleep(0.05)
        os.write(fd, b"1")
    finally:
        os.close(fd)


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            log.warning("the supervisor is gone; stopping")
            stop.set()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)


def main(settings: Settings, *, worker_index: int = 0, reuse_port: bool = False) -> None:
    """Run one worker on uvloop (the ``serve gateway`` command's in-process entry point)."""
    raise_fd_limit()
    uvloop.run(serve(settings, worker_index=worker_index, reuse_port=reuse_port))


def _exit_now() -> NoReturn:
    """Exit a worker whose `serve` returned: sessions ended, spool shipped, pools closed.

    What is left is the interpreter's teardown: freeing every object the worker made (its
    frozen generation too) and joining leftover threads, which only delays the
    supervisor's exit (and so a restart): up to 0.9 s was seen under a storm's load after
    a drain of 1,000 sessions; ~30 ms from the worker's last line to the supervisor's exit
    with this (bench/README.md, "The drain").
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.serve")
    parser.add_argument("--workers", type=int, default=None, help="run N worker processes")
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settings-stdin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--failure-inbox", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--failure-outbox", type=int, action="append", default=[], help=argparse.SUPPRESS
    )
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--listen-when-ready", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ship-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.settings_stdin:
        settings = Settings(**json.loads(sys.stdin.buffer.readline()))
    else:
        settings = load_settings()
    configure_logging(
        settings.log_format, settings.log_level.upper(), fields={"worker": args.worker_index or 0}
    )
    if args.ship_only and args.worker_index is not None:
        from gateway.orphans import ship_orphan

        return 0 if uvloop.run(ship_orphan(settings, args.worker_index)) else 1
    if args.worker_index is not None:
        raise_fd_limit()
        uvloop.run(
            serve(
                settings,
                worker_index=args.worker_index,
                reuse_port=True,
                watch_stdin=args.settings_stdin,
                failure_fds=(
                    ChannelFds(args.failure_inbox, tuple(args.failure_outbox))
                    if args.failure_inbox is not None
                    else None
                ),
                ready_fd=args.ready_fd,
                listen_when_ready=args.listen_when_ready,
            )
        )
        _exit_now()
    if args.workers is not None and args.workers != 1:
        from gateway.workers import supervise

        return supervise(settings, workers=args.workers)
    main(settings)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
