"""The gateway server: listener, live connections, policy, event recording, shutdown.

Invariants:

* One live session per device and client id: a new one, once its CONNECT is authorised
  and before it reaches the broker, kicks the old one
  (DISCONNECT 0x8E on v5), and both are recorded (``session_end`` /
  ``session_taken_over`` for the old, ``connect`` / ``ok`` for the new). Keyed by client
  id too because a fleet whose policy allows ``{device_id}-*`` deliberately runs several
  clients per device; under the default policy (client id = device id) this is one
  session per device. Across workers and instances the same holds through PostgreSQL:
  with a `gateway.takeover.SessionBus`, each session is announced before its CONNECT is
  forwarded, and the worker holding an older session of the pair ends it the same way
  (``detail.taken_over_by`` names the new session's instance and worker). Without a bus
  (or while PostgreSQL is away) the broker's own takeover ends it (``upstream_closed``).
* A live directory (`gateway.revocation.LiveDirectory`, i.e. the revocation cache) is
  attached on start: its notifications cut sessions through `Gateway.revoke`, found by
  device id in the `gateway.sessions.SessionRegistry` (no scan of all connections).
* Failed handshakes are budgeted per address, and the budget never refuses a good device
  behind the same (NAT) address (`gateway.limits` says why and how): an address over its
  budget gets its failures counted in summary events and its new connections served at
  most ``throttled_in_flight`` handshakes at a time, the rest waiting their turn in a
  bounded queue. Refusals at accept cost no TLS work and are recorded as
  ``tls_handshake`` denials, throttled (`gateway.limits.EventThrottle`: one event per
  address, or per worker for ``too_many_connections``, per window, counting the refusals
  in ``detail.count``): a connection of an over-budget address beyond that queue
  (``rate_limited``), and any connection beyond ``max_connections``. Every
  ``tls_handshake`` denial that reaches `Gateway.record` takes a token from its address
  (except ``proxy_protocol_error``, which names the load balancer, the accept-time
  refusals, and summaries, already charged), so no failure path can be forgotten. With a
  `gateway.failure_channel.FailureChannel` (several workers), each such failure is also
  sent to the sibling workers, which charge it too: the budget is the instance's, while
  the check at accept stays a local lookup. Connections from ``trusted_networks`` never
  wait and are never refused at accept; their failures are charged and summarised alike.
* Events that do not gate admission are recorded in the background; `Gateway.close`
  waits for them, so a clean shutdown loses none.
* The policy is one immutable `gateway.policy_live.PolicyState` per version, swapped
  whole (`Gateway.policy_changed`: a database change heard by a
  `gateway.policy_listen.PolicyFollower`, or SIGHUP re-reading the policy file). Every
  live session is then re-judged under the new version (`Session.rejudge`), in slices of
  `REJUDGE_SLICE` seconds that yield to the loop between them, so 10,000 sessions never
  hold up packets for long; a version that arrives during a pass starts one more pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from types import TracebackType
from typing import Any

from opentelemetry.metrics import NoOpMeter
from opentelemetry.trace import NoOpTracer

from gateway.audit import EventContext, EventSink
from gateway.bridge import DeviceConnection
from gateway.config import BridgeConfig
from gateway.failure_channel import FailureChannel
from gateway.identity import DeviceIdentity
from gateway.limits import (
    Burst,
    ConnectLimiter,
    EventThrottle,
    FailureLimiter,
    HandshakeSlots,
    Slot,
    TrustedNetworks,
    address_key,
)
from gateway.policy import PolicyError, PolicySet, load_policy
from gateway.policy_listen import PolicyFollower
from gateway.policy_live import PolicyState, SessionPolicy, state_from_document
from gateway.revocation import DeviceDirectory, LiveDirectory
from gateway.sessions import SessionRegistry
from gateway.takeover import Claim, SessionBus
from gateway.telemetry import GatewayMetrics
from schemas.events import AuthEvent, EventType, Outcome, Reason, utcnow, uuid7
from schemas.notify import SessionNotice
from schemas.policy import PolicyDocument, PolicyFile

__all__ = ["Gateway"]

log = logging.getLogger("devicegate.gateway")

# tls_handshake denials that are not a failed handshake of the address they name.
_NOT_FAILURES = frozenset(
    {Reason.RATE_LIMITED, Reason.TOO_MANY_CONNECTIONS, Reason.PROXY_PROTOCOL_ERROR}
)
_ALL_ADDRESSES = "*"
REJUDGE_SLICE = 0.005
"""Seconds of re-judging live sessions between two yields to the event loop after a policy
change (a session is never cut in two: a slice ends after the session that crossed it)."""
CLOCK_STEP = 1.0
"""Seconds the wall clock may move against the monotonic clock per tick before it counts
as a step (NTP slews far slower than this)."""


async def _nothing() -> None:
    """The record of a failure counted in a summary: the summary is recorded later."""


@dataclass(frozen=True, slots=True)
class RejudgeStats:
    """One re-judgement pass over the live sessions (`Gateway.policy_changed`)."""

    version: int
    sessions: int
    ended: int
    seconds: float
    longest_slice: float


def _unexported_metrics() -> GatewayMetrics:
    """Metrics on a no-op meter and tracer, for a Gateway built without telemetry (tests)."""
    return GatewayMetrics(meter=NoOpMeter("devicegate"), tracer=NoOpTracer())


class Gateway:
    """Accepts devices on ``host:port`` and bridges them to the upstream broker.

    Use as ``async with Gateway(...) as gateway:``, or ``await start()`` / ``await close()``.

    ``failed_handshakes_per_minute`` (None: no limit) sizes the per-address token bucket;
    beyond it an address's handshakes run ``throttled_in_flight`` at a time, with at most
    ``throttled_queue`` more waiting, except from ``trusted_networks``;
    ``refusal_event_interval`` is the throttle window of accept-time refusal events.
    ``failure_channel`` shares the failed handshakes with the sibling workers (None: this
    worker is the whole instance); the gateway starts and closes it.
    ``policy_follower`` (the database's policy, `gateway.policy_listen`) hands the gateway
    each new policy version; without it the policy is ``policy_state``, else the document
    ``policy``, else ``policy_file`` (reloaded on SIGHUP).
    ``metrics`` receives the connection counts and spans (`gateway.telemetry`); without it
    they go to a no-op meter and tracer (counted, never exported).
    """

    def __init__(
        self,
        *,
        config: BridgeConfig,
        sink: EventSink,
        directory: DeviceDirectory,
        host: str,
        port: int,
        policy: PolicyDocument | PolicyFile | PolicySet | None = None,
        policy_file: Path | None = None,
        policy_state: PolicyState | None = None,
        policy_follower: PolicyFollower | None = None,
        max_connections: int = 10_000,
        reuse_port: bool = False,
        failed_handshakes_per_minute: int | None = None,
        refusal_event_interval: float = 10.0,
        bus: SessionBus | None = None,
        metrics: GatewayMetrics | None = None,
        failure_channel: FailureChannel | None = None,
        throttled_in_flight: int = 4,
        throttled_queue: int = 1000,
        trusted_networks: Iterable[IPv4Network | IPv6Network] = (),
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else _unexported_metrics()
        self.sink = sink
        self.directory = directory
        self.host = host
        self.port = port
        self.policy_file = policy_file
        self.policy_follower = policy_follower  # the database's policy (None: the file's)
        if policy_follower is not None:
            policy_state = policy_follower.state
        elif policy_state is None:
            document = policy if policy is not None else load_policy(policy_file)
            policy_state = state_from_document(document)
        self.policy_state = policy_state
        self.rejudged: RejudgeStats | None = None  # the last re-judgement pass
        self._rejudging: asyncio.Task[None] | None = None
        self._rejudge_again = False
        self.max_connections = max_connections
        self.reuse_port = reuse_port  # SO_REUSEPORT: worker processes share the port
        self.connections: set[DeviceConnection] = set()
        # Set as `drain` or `close` begins: a connection made after that is ended at once.
        self.stopping = False
        self.sessions: SessionRegistry[DeviceConnection] = SessionRegistry()
        self.failures = (
            FailureLimiter(per_minute=failed_handshakes_per_minute)
            if failed_handshakes_per_minute
            else None
        )
        self.failure_channel = failure_channel
        self.slots: HandshakeSlots[DeviceConnection] = HandshakeSlots(
            in_flight=throttled_in_flight, queue=throttled_queue
        )
        self.trusted = TrustedNetworks(trusted_networks)
        self.refusals: EventThrottle[str | None] = EventThrottle(interval=refusal_event_interval)
        # The device connect budget (`Session` takes it at CONNECT) and its refusals' events.
        self.connects = ConnectLimiter(config.connects) if config.connects is not None else None
        self.connect_refusals: EventThrottle[AuthEvent] = EventThrottle(
            interval=refusal_event_interval
        )
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._idle: asyncio.Event | None = None  # set when the last connection closes
        self.bus = bus  # cross-worker takeover (None: this worker only)
        self._claims: dict[DeviceConnection, Claim] = {}

    async def start(self) -> None:
        """Start listening (port 0 picks a free port, see ``self.port``)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: DeviceConnection(self),
            self.host,
            self.port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if isinstance(self.directory, LiveDirectory):
            self.directory.attach(self)
        if self.bus is not None:
            self.bus.attach(self)
        if self.policy_follower is not None:
            self.policy_follower.attach(self)
        if self.failure_channel is not None and self.failures is not None:
            self.failure_channel.start(self.failures)
        self._ticker = loop.create_task(self._tick(), name="gateway-tick")
        log.info("gateway listening on %s:%s", self.host, self.port)

    async def close(self) -> None:
        """Stop accepting, end every session (server_shutting_down), flush the events."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if isinstance(self.directory, LiveDirectory):
            self.directory.detach(self)
        if self.bus is not None:
            self.bus.detach(self)
        if self.policy_follower is not None:
            self.policy_follower.detach(self)
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
            self._record_bursts(self.refusals.flush())
            self._record_connect_bursts(self.connect_refusals.flush())
        if self.failure_channel is not None:
            self.failure_channel.close()
        for connection in list(self.connections):
            connection.kick(Reason.SERVER_SHUTTING_DOWN)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def drain(self, *, within: float) -> None:
        """Graceful shutdown: stop accepting, let in-flight packets finish, then `close`.

        Each live session stops reading, gets the broker's answers to what it already
        forwarded, then DISCONNECT 0x8B (v5) or a close (see `DeviceConnection.drain`).
        Sessions still open after ``within`` seconds are ended by `close`. A connection
        the listener accepted before it closed but whose ``connection_made`` runs only
        after this (the loop schedules it: a stop and a connect handled in one iteration)
        is ended at once too (`stopping`), never admitted by a gateway going away.
        """
        self.stopping = True
        if self._server is not None:
            self._server.close()
        self._idle = asyncio.Event()
        for connection in list(self.connections):
            connection.drain()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), within)
        await self.close()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def revoke(self, device_id: str, *, reason: Reason, serial: str | None = None) -> int:
        """End the sessions of ``device_id`` (only those on ``serial`` if given).

        The hook for live revocation (`gateway.revocation.RevocationListener`): each live
        session gets DISCONNECT 0x98 on MQTT 5 (closed on 3.1.1) and a ``session_revoked``
        event with ``reason``; one still being authorised is refused (``connect`` event).

        Returns:
            How many connections were ended.
        """
        doomed = [
            connection
            for connection in self.sessions.of_device(device_id)
            if not connection.closed
            and connection.session is not None
            and (serial is None or connection.session.identity.serial == serial)
        ]
        for connection in doomed:
            connection.kick(reason, revoked=True)
        return len(doomed)

    def live_identities(self) -> list[DeviceIdentity]:
        """The identities of every open connection past its handshake."""
        return [
            connection.session.identity
            for connection in self.sessions
            if connection.session is not None and not connection.closed
        ]

    def reload_policy(self) -> bool:
        """Re-read the policy file (SIGHUP); keep the old policy if the new one is invalid.

        The file's policy gets the next local version number, and live sessions are
        re-judged as for a database change. When the policy comes from the database
        (`gateway.policy_listen.PolicyFollower`), SIGHUP changes nothing: it follows NOTIFY.
        """
        if self.policy_state.source != "file":
            log.info("SIGHUP: the policy comes from the database (it follows NOTIFY)")
            return False
        try:
            document = load_policy(self.policy_file)
        except PolicyError as exc:
            log.error("policy not reloaded: %s", exc)
            return False
        log.info("policy reloaded from %s", self.policy_file)
        self.policy_changed(state_from_document(document, version=self.policy_state.version + 1))
        return True

    def policy_changed(self, state: PolicyState) -> None:
        """A new policy version: new sessions are judged by it now, live ones in a moment."""
        if state.version <= self.policy_state.version and self.policy_state.loaded:
            return  # an older or the same version (a resync that found nothing new)
        state.carry_over(self.policy_state)
        self.policy_state = state
        if self._rejudging is not None and not self._rejudging.done():
            self._rejudge_again = True  # the running pass starts over with this version
            return
        self._rejudging = self.spawn(self._rejudge(), "policy-rejudge")

    async def _rejudge(self) -> None:
        while True:
            self._rejudge_again = False
            state = self.policy_state
            started = slice_started = time.perf_counter()
            longest = 0.0
            connections = list(self.sessions)
            ended = 0
            clock = time.perf_counter
            for connection in connections:
                now = clock()
                if now - slice_started >= REJUDGE_SLICE:
                    longest = max(longest, now - slice_started)
                    await asyncio.sleep(0)  # let packets through between slices
                    slice_started = clock()
                    if self._rejudge_again:
                        break  # a newer version: start over with it
                ended += connection.rejudge(state)
            else:
                now = clock()
                longest = max(longest, now - slice_started)
                self.rejudged = RejudgeStats(
                    state.version, len(connections), ended, now - started, longest
                )
                log.info(
                    "policy version %d: %d session(s) re-judged, %d ended, in %.1f ms "
                    "(longest slice %.1f ms)",
                    state.version, len(connections), ended, (now - started) * 1e3, longest * 1e3,
                )  # fmt: skip
            if not self._rejudge_again:
                return

    # --- bridge.Hub ----------------------------------------------------------------

    def session_policy(
        self, identity: DeviceIdentity, state: PolicyState | None = None
    ) -> SessionPolicy:
        """The compiled policy of ``identity`` under ``state`` (default: the current one)."""
        state = state if state is not None else self.policy_state
        return state.for_identity(identity, trust_domain=self.config.trust_domain)

    def record(self, event: AuthEvent) -> asyncio.Task[None]:
        if event.reason is Reason.CONNECT_RATE_EXCEEDED and "count" not in event.detail:
            return self._connect_refused(event)
        if (
            self.failures is not None
            and event.type is EventType.TLS_HANDSHAKE
            and event.outcome is Outcome.DENIED
            and event.reason not in _NOT_FAILURES
            and "count" not in event.detail  # a summary: its failures were charged one by one
        ):
            key = address_key(event.peer_address)
            within = self.failures.allowed(key)
            self.failures.failed(key)
            if self.failure_channel is not None and key is not None:
                self.failure_channel.failed(key)
            if not within and key is not None:
                # Over budget: counted in the (reason, address) summary of this window.
                self._record_bursts(self.refusals.hit(f"{event.reason} {key}", event.peer_address))
                return self.spawn(_nothing(), "record-summarised")
        return self.spawn(self._record(event), "record-event")

    def _connect_refused(self, event: AuthEvent) -> asyncio.Task[None]:
        """A device over its connect budget: the window's first refusal is recorded (the
        refused connection closes once it is durable), the others counted into a summary."""
        own: asyncio.Task[None] | None = None
        for burst in self.connect_refusals.hit(event.device_id or "", event):
            task = self._record_connect_burst(burst)
            if burst.sample is event:
                own = task
        return own if own is not None else self.spawn(_nothing(), "record-summarised")

    def _record_connect_bursts(self, bursts: list[Burst[AuthEvent]]) -> None:
        for burst in bursts:
            self._record_connect_burst(burst)

    def _record_connect_burst(self, burst: Burst[AuthEvent]) -> asyncio.Task[None]:
        """The event of ``burst``: its sample, the last refusal it counts (device,
        certificate, client id, address, trace id), with ``count``; one that stands for
        more than itself is a summary, recorded now under an id of its own."""
        event = burst.sample
        detail = {
            **event.detail,
            "count": burst.count,
            "window_seconds": self.connect_refusals.interval,
        }
        update: dict[str, object] = {"detail": detail}
        if burst.count > 1:
            detail["summary"] = True
            update.update(id=uuid7(), time=utcnow())
        return self.spawn(self._record(event.model_copy(update=update)), "record-event")

    async def _record(self, event: AuthEvent) -> None:
        try:
            await self.sink.record(event)
        except Exception:
            log.exception("could not record %s event %s", event.type, event.id)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def opened(self, connection: DeviceConnection) -> bool:
        """Count a new connection in; False (refusal recorded, throttled) to abort it."""
        if not self.screen(connection):
            return False
        if len(self.connections) >= self.max_connections:
            self.handshake_done(connection)
            self._refused(connection, Reason.TOO_MANY_CONNECTIONS, _ALL_ADDRESSES)
            return False
        self.connections.add(connection)
        return True

    def screen(self, connection: DeviceConnection) -> bool:
        """Whether the connection may go on (False: refused, recorded); an over-budget
        address's connection may have to wait for a handshake slot (`DeviceConnection.hold`).

        Called at accept, and again once a PROXY v2 header has named the real address.
        """
        self.handshake_done(connection)  # the load balancer's slot, if it had one
        if self.failures is None:
            return True
        peer = connection.context.peer_address
        key = address_key(peer)
        if key is None or self.failures.allowed(key) or peer in self.trusted:
            return True
        slot = self.slots.enter(key, connection)
        if slot is Slot.WAIT:
            connection.hold()
        elif slot is Slot.FULL:
            self._refused(connection, Reason.RATE_LIMITED, key)
            return False
        return True

    def handshake_done(self, connection: DeviceConnection) -> None:
        """The connection's handshake ended (or it closed): its slot to the next in line."""
        successor = self.slots.leave(connection)
        if successor is not None:
            successor.proceed()

    def _refused(self, connection: DeviceConnection, reason: Reason, key: str) -> None:
        # Counted here, once per refused connection; the throttled event summarising the
        # burst is not counted again (see `gateway.telemetry.GatewayMetrics.observe_event`).
        self.metrics.refused(reason)
        self._record_bursts(self.refusals.hit(f"{reason} {key}", connection.context.peer_address))

    def _record_bursts(self, bursts: list[Burst[str | None]]) -> None:
        for burst in bursts:
            reason = Reason(burst.key.partition(" ")[0])
            detail: dict[str, object] = {
                "summary": True,
                "count": burst.count,
                "window_seconds": self.refusals.interval,
            }
            if reason is Reason.TOO_MANY_CONNECTIONS:
                detail["max_connections"] = self.max_connections
            elif self.failures is not None:
                detail["address"] = burst.key.partition(" ")[2]
                detail["failed_handshakes_per_minute"] = int(self.failures.capacity)
                if reason is Reason.RATE_LIMITED:
                    detail["handshakes_in_flight"] = self.slots.in_flight
                    detail["handshake_queue"] = self.slots.queue
            context = EventContext(instance=self.config.instance, peer_address=burst.sample)
            self.record(context.event(EventType.TLS_HANDSHAKE, reason, detail=detail))

    async def _tick(self) -> None:
        """Record the refusals counted but not yet reported, as their windows close;
        re-read a changed ticket key file; and re-arm every session's notAfter timer when
        the wall clock steps."""
        offset = time.time() - time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.refusals.interval))
            self._record_bursts(self.refusals.due())
            self._record_connect_bursts(self.connect_refusals.due())
            if self.config.tickets is not None:  # a rotated key file
                self.config.tickets.refresh()
            previous, offset = offset, time.time() - time.monotonic()
            if abs(offset - previous) > CLOCK_STEP:
                log.warning(
                    "wall clock stepped %+.1f s: re-arming certificate expiries", offset - previous
                )
                for connection in list(self.sessions):
                    connection.arm_expiry()

    def identified(self, connection: DeviceConnection) -> None:
        assert connection.session is not None
        self.sessions.add(connection.session.identity.device_id, connection)

    def claim(self, connection: DeviceConnection) -> None:
        assert connection.session is not None
        key = (connection.session.identity.device_id, connection.session.client_id)
        claim = self._claims[connection] = Claim(*key)
        previous = self.sessions.claim(key, connection)
        if previous is not None:
            previous.kick(Reason.SESSION_TAKEN_OVER, detail=self._taker(claim.session_id))

    def _taker(
        self, session_id: str, instance: str | None = None, worker: str | None = None
    ) -> dict[str, object]:
        return {
            "taken_over_by": {
                "instance": instance or self.config.instance,
                "worker": worker or (self.bus.worker if self.bus is not None else None),
                "session_id": session_id,
            }
        }

    async def announce(self, connection: DeviceConnection) -> None:
        """Tell the other workers and instances (see `gateway.takeover`)."""
        claim = self._claims.get(connection)
        if self.bus is not None and claim is not None:
            await self.bus.announce(claim)

    def takeover_grace(self, connection: DeviceConnection) -> float:
        """Seconds to wait for a takeover notice when the broker closed ``connection``."""
        claim = self._claims.get(connection)
        if self.bus is None or claim is None or not claim.seen:
            return 0.0
        return self.bus.grace

    def taken_over(self, notice: SessionNotice) -> int:
        """Another worker admits ``notice``'s session: end ours if it is older."""
        owner = self.sessions.owner((notice.device_id, notice.client_id))
        claim = self._claims.get(owner) if owner is not None else None
        if owner is None or claim is None or owner.closed:
            return 0
        if claim.session_id == notice.session_id or not claim.seen:
            return 0  # ours is the newer one: its announcement is still on its way
        owner.kick(
            Reason.SESSION_TAKEN_OVER,
            detail=self._taker(notice.session_id, notice.instance, notice.worker),
        )
        return 1

    def closed(self, connection: DeviceConnection) -> None:
        self.handshake_done(connection)
        self.connections.discard(connection)
        if self._idle is not None and not self.connections:
            self._idle.set()
        session = connection.session
        if session is not None:
            self.sessions.remove(session.identity.device_id, connection)
        claim = self._claims.pop(connection, None)
        if claim is not None and self.bus is not None:
            self.bus.release(claim)
