"""The socket side of one device connection: TLS pump, session actions, upstream.

Invariants:

* This module and `gateway.upstream` hold the only socket code; decisions are made by
  the sans-IO `gateway.connection.Session` and `gateway.tls.TlsPump`.
* Ciphertext to the device is written once per event: every action of one input is
  queued into the pump, then the outgoing BIO is read and written once.
* A failed handshake is answered with OpenSSL's alert (flushed before closing) and
  recorded as a ``tls_handshake`` denial with the peer address.
* Either side closing closes the other, lingering (`_shut`, `gateway.upstream`): what was
  written reaches the peer, in order, before the close. The broker gets a DISCONNECT only
  when the device sent one or the gateway drains; a takeover is the broker's own; any
  other end is a drop, and the broker publishes the will (docs/mqtt-behaviour.md says why,
  per end). A device that leaves while its CONNECT is authorised still has the packets it
  pipelined forwarded (`_device_ended`):

  ==========================  =======================================  =============
  the session ends by         the broker gets, after what came before  the will
  ==========================  =======================================  =============
  device DISCONNECT           that DISCONNECT, as sent                as it asks
  device drop                 a close                                 fires
  takeover                    the successor's CONNECT (hand-over)     as it decides
  revocation, notAfter        a close                                 fires
  limit, protocol error       a close (the bad packet withheld)       fires
  drain (SIGTERM), shutdown   a DISCONNECT (`Session.cut`)            none
  ==========================  =======================================  =============

* Backpressure both ways: a side whose write buffer is high pauses reading on the other.
* Telemetry per connection, never per packet: a `ConnectionTrace` from accept (past the
  limits) to `_close`, whose trace id is in every event's detail (`EventContext.trace_id`);
  an admitted session is in `GatewayMetrics`' live set from admission to `_close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Coroutine
from dataclasses import replace
from datetime import UTC, datetime
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any, Protocol, cast

from gateway.actions import (
    Action,
    Admit,
    CheckDevice,
    Close,
    DialUpstream,
    Record,
    ToDevice,
    ToUpstream,
)
from gateway.audit import EventContext, EventSink
from gateway.config import BridgeConfig
from gateway.connection import Session, State
from gateway.identity import DeviceIdentity, IdentityError, identity_from_der
from gateway.limits import ConnectLimiter
from gateway.policy_live import PolicyState, SessionPolicy
from gateway.proxy import ProxyGate, ProxyProtocolError
from gateway.revocation import DeviceDirectory
from gateway.spans import ATTR_PEER, ConnectionTrace
from gateway.telemetry import GatewayMetrics
from gateway.tls import TlsFailure, TlsPump
from gateway.upstream import close_lingering, dial
from schemas.certificates import describe_certificate
from schemas.events import AuthEvent, EventType, Outcome, Reason

__all__ = ["DeviceConnection", "Hub"]

log = logging.getLogger("devicegate.gateway")

_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()

LINGER_SECONDS = 2.0
"""How long a closed connection keeps draining input while the peer reads our last bytes."""


class Hub(Protocol):
    """The server as a connection sees it."""

    config: BridgeConfig
    sink: EventSink
    directory: DeviceDirectory
    metrics: GatewayMetrics
    connects: ConnectLimiter | None
    stopping: bool  # draining or closing: new connections are ended at once

    def session_policy(
        self, identity: DeviceIdentity, state: PolicyState | None = None
    ) -> SessionPolicy: ...

    def record(self, event: AuthEvent) -> asyncio.Task[None]: ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]: ...

    def opened(self, connection: DeviceConnection) -> bool: ...

    def screen(self, connection: DeviceConnection) -> bool: ...

    def handshake_done(self, connection: DeviceConnection) -> None: ...

    def identified(self, connection: DeviceConnection) -> None: ...

    def claim(self, connection: DeviceConnection) -> None: ...

    async def announce(self, connection: DeviceConnection) -> None: ...

    def takeover_grace(self, connection: DeviceConnection) -> float: ...

    def closed(self, connection: DeviceConnection) -> None: ...


def _address(peer: Any) -> str | None:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return None


def _trusted(peer: Any, networks: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    if not (isinstance(peer, tuple) and len(peer) >= 2):
        return False
    try:
        address = ip_address(peer[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _expired(identity: DeviceIdentity) -> bool:
    return identity.not_after is not None and identity.not_after <= datetime.now(UTC)


class DeviceConnection(asyncio.Protocol):
    """One device's TCP connection, from accept to close."""

    # Slots: one per held session (bench/README.md, "Memory per held session").
    __slots__ = (
        "_admitted",
        "_barrier",
        "_denials",
        "_device_gone",
        "_device_paused",
        "_expiry",
        "_gate",
        "_held",
        "_linger",
        "_pending",
        "_timer",
        "_to_upstream",
        "_waiting",
        "closed",
        "config",
        "context",
        "hub",
        "pump",
        "session",
        "trace",
        "transport",
        "upstream",
    )

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.config = hub.config
        self.pump = TlsPump(self.config.ssl_context)
        self.context = EventContext(instance=self.config.instance)
        self.session: Session | None = None
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None  # the certificate's notAfter
        self._denials: asyncio.TimerHandle | None = None  # the denial window's end
        self._device_paused = False
        self._to_upstream: list[bytes | memoryview] = []
        self._gate: ProxyGate | None = None  # the PROXY v2 stage, before TLS
        self._barrier: int | None = None  # draining: the PINGRESP count to exceed
        self.trace: ConnectionTrace | None = None  # from accept (past the limits) to close
        self._admitted = False  # CONNACKed, and in the metrics' live set
        self._held = False  # closed, but the socket waits for the refusal's event
        self._device_gone = False  # the device closed while its CONNECT was authorised
        self._waiting = False  # queued for a handshake slot (`hold`): reading paused
        self._pending = b""  # bytes after the PROXY header, kept while waiting

    # --- asyncio.Protocol, device side -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer is None:
            # Reset before we got to it (HAProxy closes its checks with a RST): nothing to
            # serve, and no address to record or to judge a PROXY header by.
            self.closed = True
            transport.abort()
            return
        # No TCP_NODELAY here: asyncio and uvloop set it on every TCP transport already.
        address = _address(peer)
        self.context = EventContext(instance=self.config.instance, peer_address=address)
        if not self.hub.opened(self):  # refused (and counted) by the limits
            self.closed = True
            transport.abort()
            return
        self.trace = trace = self.hub.metrics.connection(peer=address)
        self.context = EventContext(
            instance=self.config.instance, peer_address=address, trace_id=trace.trace_id
        )
        if self.config.proxy_protocol_from:
            self._gate = ProxyGate(trusted=_trusted(peer, self.config.proxy_protocol_from))
        if self.hub.stopping:
            # Accepted before the listener closed, made after the drain (or close) ended
            # the open connections: ended as they were, before any TLS work.
            self.kick(Reason.SERVER_SHUTTING_DOWN)
            return
        if not self._waiting:
            self._arm_handshake_timer()

    def _arm_handshake_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.config.handshake_timeout, self._handshake_timeout)

    def hold(self) -> None:
        """Wait for a handshake slot (`gateway.limits.HandshakeSlots`): read nothing, do no
        TLS work, and start no handshake timer until `proceed`."""
        self._waiting = True
        if self.transport is not None:
            self.transport.pause_reading()

    def proceed(self) -> None:
        """A handshake slot is ours: read again, and start the handshake timer."""
        if self.closed or not self._waiting:
            return
        self._waiting = False
        if self.transport is not None and not self._device_paused:
            self.transport.resume_reading()
        if self._timer is None:
            self._arm_handshake_timer()
        pending, self._pending = self._pending, b""
        if pending:
            self.data_received(pending)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            if self._gate is not None:
                data = self._proxy_data(data)
                if not data:
                    return
            self._device_data(data)
        except Exception:  # a bug must not leave a half-judged session open
            self._internal_error()

    def _proxy_data(self, data: bytes) -> bytes:
        """The PROXY v2 stage: the bytes for TLS once the header is read, else b""."""
        assert self._gate is not None
        try:
            result = self._gate.feed(data)
        except ProxyProtocolError as exc:
            self._proxy_failed(str(exc))
            return b""
        if result is None:
            return b""
        self._gate = None
        header, rest = result
        if header is not None and header.source is not None:
            # Events name the device's real address, and the proxy it came through.
            self.context = replace(
                self.context, peer_address=_address(header.source), proxy=self.context.peer_address
            )
            if self.trace is not None:
                self.trace.span.set_attribute(ATTR_PEER, self.context.peer_address or "")
            if not self.hub.screen(self):  # the real address is rate limited (recorded)
                self._close(Reason.RATE_LIMITED, graceful=False, linger=False)
                return b""
            if self._waiting:  # for a handshake slot of the real address (`proceed`)
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._pending = rest
                return b""
        return rest

    def _proxy_failed(self, error: str) -> None:
        detail = {"error": error, "proxy": self.context.peer_address}
        recorded = self.hub.record(
            self.context.event(EventType.TLS_HANDSHAKE, Reason.PROXY_PROTOCOL_ERROR, detail=detail)
        )
        self._close(Reason.PROXY_PROTOCOL_ERROR, graceful=False, linger=False, after=recorded)

    def _device_data(self, data: bytes) -> None:
        try:
            chunks = self.pump.feed(data)
        except TlsFailure as failure:
            self._tls_failed(failure)
            return
        session = self.session
        if session is None:
            if not self.pump.handshake_complete:
                self._flush()
                return
            session = self._start_session()
            if session is None:
                return
        for chunk in chunks:
            self._run(session.receive_device(chunk))
            if self.closed:
                return
        if self._timer is not None and session.state is not State.AWAIT_CONNECT:
            self._timer.cancel()
            self._timer = None
        if self.pump.eof:
            self._device_ended()
            return
        self._flush()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self.closed:
            if self._gate is not None and self._gate.buffered:
                self._proxy_failed("connection closed inside the PROXY v2 header")
                return
            self._device_ended()

    def _device_ended(self) -> None:
        """The device closed its side (FIN, close_notify or reset).

        What it sent before is still the broker's: a session whose CONNECT is being
        authorised goes on without the device, forwards the packets it pipelined once
        admitted, and ends then (with their DISCONNECT if they hold one, else as a drop),
        as a broker reading the same bytes would. Anything else ends now.
        """
        if self.session is not None and self.session.state is State.AUTHORIZING:
            self._device_gone = True
            return
        self._lost(Reason.CONNECTION_LOST)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # --- upstream.UpstreamPeer ---------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        if self.closed or self.session is None:
            return
        try:
            self._run(self.session.receive_upstream(data))
            self._flush()
            if self._barrier is not None and self.session.downstream.pingresps > self._barrier:
                self._end_drain()
        except Exception:
            self._internal_error()

    def _internal_error(self) -> None:
        log.exception("internal error; closing the connection (fail closed)")
        session = self.session
        if session is not None:
            for event in session.close(Reason.PROTOCOL_ERROR):
                self.hub.record(event)
        self._close(Reason.PROTOCOL_ERROR, graceful=False, linger=False)

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream = None
        if self.closed or self.session is None:
            return
        if self.session.state is State.AUTHORIZING:
            self._run(self.session.upstream_failed("the broker closed the connection"))
            self._flush()
            return
        grace = self.hub.takeover_grace(self)
        if grace > 0:
            # Perhaps the broker's own takeover by a session admitted on another worker,
            # whose notice is on its way: let it name the successor (gateway.takeover).
            self.pause_device()
            asyncio.get_running_loop().call_later(grace, self._upstream_gone)
            return
        self._lost(Reason.UPSTREAM_CLOSED)

    def _upstream_gone(self) -> None:
        if not self.closed:
            self._lost(Reason.UPSTREAM_CLOSED)

    def pause_device(self) -> None:
        if self.transport is not None and not self._device_paused:
            self._device_paused = True
            self.transport.pause_reading()

    def resume_device(self) -> None:
        if self.transport is not None and self._device_paused and self._barrier is None:
            self._device_paused = False
            self.transport.resume_reading()

    # --- handshake -------------------------------------------------------------------

    def _tls_context(self, identity: DeviceIdentity | None = None) -> EventContext:
        return self.context.with_tls(
            self.pump.version(), self.pump.cipher(), identity, resumed=self.pump.resumed()
        )

    def _start_session(self) -> Session | None:
        self.hub.handshake_done(self)
        der = self.pump.peer_certificate()
        try:
            if der is None:
                raise IdentityError("no peer certificate after the handshake")
            identity = identity_from_der(der, trust_domain=self.config.trust_domain)
        except IdentityError as exc:
            self.context = self._tls_context()
            self._tls_failed(TlsFailure(exc.reason, str(exc), presented=der))
            return None
        if self.pump.resumed() and _expired(identity):
            # OpenSSL does not verify the certificate again on resumption; the ticket
            # callback already ignores such tickets, and this holds if it ever did not.
            self.context = self._tls_context()
            failure = TlsFailure(Reason.CERTIFICATE_EXPIRED, "resumed past notAfter", presented=der)
            self._tls_failed(failure)
            return None
        self.context = self._tls_context(identity)
        if self.trace is not None:
            self.trace.handshake_done(device_id=identity.device_id, fleet=identity.fleet)
        self.session = Session(
            identity=identity,
            policy=self.hub.session_policy(identity),
            context=self.context,
            max_packet_size=self.config.max_packet_size,
            denial_limits=self.config.denials,
            connects=self.hub.connects,
        )
        self.hub.identified(self)
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.config.connect_timeout, self._connect_timeout)
        self.arm_expiry()
        return self.session

    def arm_expiry(self) -> None:
        """(Re)arm the timer that ends the session at its certificate's notAfter.

        Validity is wall-clock time and loop timers run on the monotonic clock, so the hub
        calls this again for every session when the wall clock steps (NTP, a resumed VM).
        """
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        session = self.session
        if self.closed or session is None or session.identity.not_after is None:
            return
        left = (session.identity.not_after - datetime.now(UTC)).total_seconds()
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(max(0.0, left), self._certificate_expired)

    def _tls_failed(self, failure: TlsFailure, *, linger: bool = True) -> None:
        session = self.session
        if session is not None and session.state is State.ACTIVE:
            for event in session.end_events(failure.reason, failure.detail):
                self.hub.record(event)
        else:  # refused before admission: the handshake (or the certificate) failed
            detail: dict[str, object] = {"error": failure.detail}
            if failure.verify_code is not None:
                detail["verify_code"] = failure.verify_code
            if failure.verify_depth is not None:
                detail["verify_depth"] = failure.verify_depth
            presented = failure.presented
            event = self._tls_context().event(
                EventType.TLS_HANDSHAKE,
                failure.reason,
                detail=detail,
                presented=describe_certificate(presented) if presented else None,
            )
            if self.trace is not None:
                self.trace.handshake_done(failure=failure.reason)
            self._close(failure.reason, graceful=False, linger=linger, after=self.hub.record(event))
            return
        self._close(failure.reason, graceful=False, linger=linger)

    def _handshake_timeout(self) -> None:
        self._timer = None
        if not self.closed and self.session is None:
            self._tls_failed(
                TlsFailure(Reason.HANDSHAKE_TIMEOUT, "no TLS handshake in time"), linger=False
            )

    def _connect_timeout(self) -> None:
        self._timer = None
        if not self.closed and self.session is not None:
            self._run(self.session.connect_timed_out())
            self._flush()

    def _phase(self, name: str) -> contextlib.AbstractContextManager[object]:
        """A child span of the connection's (``authorize``, ``upstream_dial``)."""
        trace = self.trace
        if trace is None or not trace.recording:
            return _NO_SPAN  # sampled out: no child spans, not even a generator to run
        return trace.phase(name)

    # --- actions ---------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        recorded: asyncio.Task[None] | None = None
        for action in actions:
            kind = type(action)
            if kind is ToUpstream:
                assert isinstance(action, ToUpstream)
                self._to_upstream.append(action.data)
            elif kind is ToDevice:
                assert isinstance(action, ToDevice)
                self.pump.encrypt(action.data)
            elif kind is Record:
                assert isinstance(action, Record)
                recorded = self.hub.record(action.event)
            elif kind is Close:
                assert isinstance(action, Close)
                # A refusal (never admitted) waits for its event; an admitted session's
                # end does not hold its DISCONNECT back from the broker.
                held = recorded if not self._admitted else None
                self._close(action.reason, graceful=True, after=held)
                return
            elif kind is CheckDevice:
                self.hub.spawn(self._check_device(), "check-device")
            elif kind is DialUpstream:
                assert isinstance(action, DialUpstream)
                self.hub.spawn(self._dial(action.connect), "dial-upstream")
            elif kind is Admit:
                assert isinstance(action, Admit)
                self.hub.spawn(self._admit(action), "admit")
        if recorded is not None and self._denials is None:
            self._arm_denials()  # a denial window opens with a recorded denial

    def _arm_denials(self) -> None:
        """Time the open denial window's summaries (`Session.denials_due`)."""
        session = self.session
        if self.closed or session is None or session.state is not State.ACTIVE:
            return
        delay = session.denials_due_in()
        if delay is not None:
            self._denials = asyncio.get_running_loop().call_later(delay, self._denials_due)

    def _denials_due(self) -> None:
        self._denials = None
        if self.closed or self.session is None:
            return
        self._run(self.session.denials_due())
        self._flush()
        if self._denials is None:
            self._arm_denials()  # the loop's clock fired a little early: not closed yet

    def _flush(self) -> None:
        """One write per side for everything queued while handling one input."""
        if self._held:
            return
        out = self.pump.take_outgoing()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)  # (a device gone while authorised gets nothing)
        pending = self._to_upstream
        if pending:
            self._to_upstream = []
            if self.upstream is not None:
                if len(pending) == 1:
                    self.upstream.write(pending[0])
                else:
                    self.upstream.writelines(pending)  # uvloop: one writev, no join

    async def _check_device(self) -> None:
        session = self.session
        assert session is not None
        identity = session.identity
        try:
            with self._phase("authorize"):
                reason = await self.hub.directory.check(
                    device_id=identity.device_id, fleet=identity.fleet, serial=identity.serial
                )
        except Exception:  # fail closed: no state, no admission
            log.exception("device directory lookup failed")
            reason = Reason.REVOCATION_STATE_STALE
        if not self.closed:
            self._run(session.device_checked(reason))
            self._flush()

    async def _dial(self, connect: bytes) -> None:
        session = self.session
        assert session is not None
        # Take over before the broker sees the new CONNECT, so the old session is ended by
        # us (DISCONNECT 0x8E, recorded), not cut by the broker's own takeover.
        self.hub.claim(self)
        # ... and on other workers and instances (through PostgreSQL, gateway.takeover).
        await self.hub.announce(self)
        if self.closed:
            return
        try:
            with self._phase("upstream_dial"), self.hub.metrics.time_dial():
                transport, _ = await dial(
                    self.config.upstream, self, within=self.config.dial_timeout
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            if not self.closed:
                self._run(session.upstream_failed(f"{type(exc).__name__}: {exc}"))
                self._flush()
            return
        if self.closed:
            transport.close()
            return
        self.upstream = transport
        transport.write(connect)

    async def _admit(self, admit: Admit) -> None:
        session = self.session
        assert session is not None
        try:
            await self.hub.sink.record(admit.event)
        except Exception:
            log.exception("cannot record the connect event; refusing the session")
            if not self.closed:
                self._run(session.admission_failed())
                self._flush()
            return
        if self.closed:
            return
        # Counted live before `admitted` runs: it may end the session at once (bytes the
        # device pipelined), and `_close` must then find it to fold its counts.
        self.hub.metrics.session_started(session)
        self._admitted = True
        if self.trace is not None:
            self.trace.decided(Outcome.ALLOWED, Reason.OK)
        self.pump.encrypt(admit.connack)
        self._run(session.admitted())
        self._flush()
        if self._device_gone and not self.closed:  # its pipelined packets are forwarded
            self._lost(Reason.CONNECTION_LOST)

    # --- ends ------------------------------------------------------------------------

    def _lost(self, reason: Reason, type_: EventType = EventType.SESSION_END) -> None:
        if self.session is not None:
            for event in self.session.close(reason, type_):
                self.hub.record(event)
        gone = reason is Reason.CONNECTION_LOST
        self._close(reason, graceful=not gone, linger=not gone)

    def kick(
        self, reason: Reason, *, revoked: bool = False, detail: dict[str, object] | None = None
    ) -> None:
        """End a session from outside (takeover, shutdown, revocation, expiry).

        What is recorded and sent is `Session.cut`'s decision: on MQTT 5 a live session
        first gets a DISCONNECT (0x8E taken over, 0x8B shutting down, 0x98 administrative
        action, 0x87 certificate expired); on 3.1.1 the connection is just closed. The
        broker gets a DISCONNECT only for a shutdown (see the module's table).
        ``revoked`` records ``session_revoked`` instead of ``session_end``; ``detail`` is
        added to that event's detail. A connection
        still in its TLS handshake is just closed.
        """
        if self.closed:
            return
        if self.session is None:
            self._lost(reason)
            return
        if reason is Reason.SESSION_TAKEN_OVER:
            self._hand_over_upstream()
        self._run(self.session.cut(reason, revoked=revoked, detail=detail))
        if not self.closed:  # the session had already ended
            self._close(reason, graceful=True)

    def _hand_over_upstream(self) -> None:
        """Leave a taken-over session's broker connection for the broker's own takeover.

        Closed here, before the successor's CONNECT reaches the broker, it would look like a
        lost connection: the broker would publish the will of a client that is still there
        (issue 18). Left open, the successor's CONNECT takes it over at the broker, which
        decides as it would without the gateway: no will if the session goes on, the will
        if a clean start ends it. Whatever it still sends is dropped (this connection is
        closed); it is closed anyway once the successor had time to dial.
        """
        self._flush()  # what the device sent before is the broker's, in order
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            handover = self.config.dial_timeout + 1.0  # the successor's announce and dial
            asyncio.get_running_loop().call_later(handover, self._end_hand_over, upstream)

    def _end_hand_over(self, upstream: asyncio.Transport) -> None:
        if not upstream.is_closing():  # no successor took it over: a drop, the will fires
            self.hub.spawn(close_lingering(upstream, within=LINGER_SECONDS), "upstream-close")

    def rejudge(self, state: PolicyState) -> int:
        """Judge the session again under a new policy version (`Session.rejudge`); 1 if
        that ended it, else 0."""
        session = self.session
        if self.closed or session is None:
            return 0
        policy = self.hub.session_policy(session.identity, state)
        if policy is session.policy:
            return 0
        actions = session.rejudge(policy)
        if not actions:
            return 0
        self._run(actions)
        self._flush()
        return 1 if self.closed else 0

    def _certificate_expired(self) -> None:
        self._expiry = None
        self.kick(Reason.CERTIFICATE_EXPIRED)

    def drain(self) -> None:
        """End the session for a shutdown without cutting packets in flight.

        Reads nothing more from the device, sends the broker a PINGREQ and waits for its
        PINGRESP: the broker answers in order, so every PUBACK/PUBREC/SUBACK for what the
        device sent so far reaches the device first. Then the session ends like `kick`
        (DISCONNECT 0x8B on v5; a DISCONNECT to the broker, so the device's will does not
        fire). A connection not yet admitted is ended at once.
        """
        session = self.session
        if self.closed or self._barrier is not None:
            return
        if session is None or session.state is not State.ACTIVE or self.upstream is None:
            self.kick(Reason.SERVER_SHUTTING_DOWN)
            return
        if self.transport is not None and not self._device_paused:
            self._device_paused = True
            self.transport.pause_reading()
        self._barrier = session.downstream.pingresps
        session.downstream.swallow += 1  # the barrier's answer is not for the device
        self._flush()
        self.upstream.write(b"\xc0\x00")  # PINGREQ

    def _end_drain(self) -> None:
        self._barrier = None
        if self.transport is not None and self._device_paused:
            # Closed by the kick below before anything is read: the lingering close
            # discards the device's unread bytes instead of answering them with a RST.
            self._device_paused = False
            self.transport.resume_reading()
        self.kick(Reason.SERVER_SHUTTING_DOWN)

    def _close(
        self,
        reason: Reason,
        *,
        graceful: bool,
        linger: bool = True,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        """End the connection; with ``after`` (the decision's event being recorded), the
        last bytes go out and the socket closes only once that event is on disk, as a
        CONNACK waits for its connect event: no refusal without its record."""
        if self.closed:
            return
        self.closed = True
        self.hub.handshake_done(self)
        if self.session is not None and self.session.state is not State.CLOSED:
            self.session.state = State.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._denials is not None:
            self._denials.cancel()
            self._denials = None
        if after is not None and not after.done():
            self._held = True
            after.add_done_callback(lambda _: self._shut(reason, graceful=graceful, linger=linger))
            return
        self._shut(reason, graceful=graceful, linger=linger)

    def _shut(self, reason: Reason, *, graceful: bool, linger: bool) -> None:
        self._held = False
        transport = self.transport
        if transport is not None and transport.is_closing():
            # The device hung up while its refusal's event was being recorded: nothing
            # more reaches it (and writing to a closed uvloop transport raises).
            self.pump.take_outgoing()
        elif graceful and self.pump.handshake_complete:
            self.pump.close_notify()
        self._flush()
        if transport is not None and not transport.is_closing():
            if linger and transport.can_write_eof():
                # Lingering close: send FIN after the last bytes (the CONNACK refusal, the
                # TLS alert) and keep reading until the peer closes too. Closing with
                # unread input would send a RST, which can destroy those last bytes
                # before the peer reads them.
                transport.write_eof()
                loop = asyncio.get_running_loop()
                self._linger = loop.call_later(LINGER_SECONDS, transport.abort)
            else:
                transport.close()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            # Lingering too, and for the same reason (see `gateway.upstream`): the broker
            # reads everything written above, in order, whatever it is still echoing back.
            # It ends with a DISCONNECT only if the device sent one or `Session.cut` chose
            # one (drain); otherwise the broker sees the connection drop: the will fires.
            self.hub.spawn(close_lingering(upstream, within=LINGER_SECONDS), "upstream-close")
        self.hub.closed(self)
        if self._admitted and self.session is not None:
            self.hub.metrics.session_ended(self.session, reason)
        if self.trace is not None:
            self.trace.end(reason)
        log.debug("connection closed: %s", reason)
