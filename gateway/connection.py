"""The per-connection MQTT session as a sans-IO state machine: bytes in, actions out.

States: ``AWAIT_CONNECT`` -> ``AUTHORIZING`` (directory check, upstream dial, the broker's
CONNACK, the durable connect event) -> ``ACTIVE`` -> ``CLOSED``.

Invariants:

* No I/O, no await: the bridge feeds bytes and outcomes in and executes the returned
  `gateway.actions` in order. The pure steps live beside it: `gateway.admission` (the
  CONNECT judged, the broker's CONNECT, the device's CONNACK), `gateway.codes` (the
  CONNACK and DISCONNECT codes per reason); tests/foundation/test_import_boundaries.py
  fails if any of them imports asyncio, ssl, sockets or the bridge. The one clock read
  is the denial budget's, injected with it (`gateway.denials.DenialBudget`), so tests
  step it by hand.
* CONNECT is the first packet. It first takes a token of the device's connect budget
  (`gateway.limits.ConnectLimiter`, shared by the worker's sessions): over budget, it is
  refused (``connect_rate_exceeded``) before the policy, the directory, the takeover and the
  broker. Nothing is sent upstream before the device, its
  certificate, its client id and its will topic are authorised, and the device gets its
  CONNACK only through `Admit`, i.e. after its connect event is durable.
* Device-to-broker: every packet is decoded, or recognised by `gateway.fastpath` as one
  the decoder would accept (so malformed input always closes the session with
  ``protocol_error``), and judged; runs of allowed packets are forwarded as slices of the
  received bytes, never re-encoded. Payload bytes are copied at most once, when a frame
  straddles two TLS records. Only the CONNECT and a partially denied SUBSCRIBE are
  re-encoded.
* Decisions are cached per session (topic/filter and, when the policy reads them, its
  flags -> decision); the policy is pure, so a cache entry is valid until the policy
  version changes: `Session.rejudge` empties the caches, re-checks the client id and the
  subscriptions made on this connection (tracked, at most `SUBSCRIPTIONS_TRACKED`), and
  ends the session if the new version forbids one of them (see `rejudge`). A PUBLISH to
  a topic already allowed is recognised from its bytes by `gateway.fastpath` and not
  decoded at all.
* v5 topic aliases from the device are resolved before judging: a PUBLISH is authorised
  against the topic the broker will use. Alias 0 or above the broker's maximum closes with
  0x94, an unknown alias with 0x82.
* Broker-to-device bytes go through `gateway.downstream.Downstream` untouched, except
  the CONNACK (v5 Assigned Client Identifier; Maximum Packet Size lowered to the
  gateway's own limit, so a compliant client never trips it) and merged SUBACKs.
* Denials go through the session's `gateway.denials.DenialBudget`: the first few of a
  window are events of their own (a SUBSCRIBE's denied filters are one event with their
  count and a sample), the rest are summed up in one event per type when the window
  closes (`Session.denials_due`, on the bridge's timer) or the session ends (every end
  event is preceded by the held summaries: `Session.end_events`). Past the budget the
  session is closed with ``too_many_denials`` (DISCONNECT 0x97 quota exceeded on v5);
  the packet that crossed it is neither answered nor forwarded.
* Ended from outside (`Session.cut`: takeover, revocation, certificate expiry, shutdown),
  a session always records why: an admitted one (or one whose connect event is already
  on its way to the log) its ``session_end`` / ``session_revoked``, with a DISCONNECT on
  v5 (0x8E taken over, 0x98 administrative action for revocations, 0x87 not authorized
  for an expired certificate, 0x8B shutting down); one still being authorised a
  ``connect`` refusal with the same reason, and a refusing CONNACK if its CONNECT came.
  Only a shutdown also sends the broker a DISCONNECT (no will); the bridge leaves a
  takeover to the broker's own, and the other cuts to a drop, so the device's will fires.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from enum import Enum
from typing import Final

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
from gateway.admission import connect_refusal, device_connack, upstream_connect
from gateway.audit import EventContext
from gateway.codes import (
    CLEAN_CUTS,
    DISCONNECT_BYTES,
    HANDED_OVER,
    NORMAL_ENDS,
    PROTOCOL_ERROR,
    QUOTA_EXCEEDED,
    TOPIC_ALIAS_INVALID,
    connack_code,
    disconnect_code,
)
from gateway.denials import SAMPLE_SIZE, DenialBudget, DenialLimits, Summary, clip, sample
from gateway.downstream import Downstream, SubackMerge
from gateway.fastpath import MORE, allowed_publish_end
from gateway.identity import DeviceIdentity
from gateway.limits import ConnectLimiter
from gateway.mqtt.codec import NEED_DATA, decode, encode, split_frame
from gateway.mqtt.errors import MalformedPacket, UnsupportedProtocolVersion
from gateway.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsubscribe,
)
from gateway.mqtt.properties import Properties, PropertyId
from gateway.policy import Action as PolicyAction
from gateway.policy import Decision
from gateway.policy_live import NO_POLICY, SessionPolicy, judges_deliveries
from schemas.certificates import describe_certificate, presented_detail
from schemas.events import AuthEvent, EventType, Outcome, Reason

__all__ = ["Session", "State"]

_CACHE_LIMIT: Final = 1024
SUBSCRIPTIONS_TRACKED: Final = 1024
"""Filters a session remembers for re-judging (`Session.rejudge`); a session that made more
is ended by the next policy change, which cannot tell whether it still holds a forbidden one."""
_OWN_PACKET_IDS: Final = 0xFFFF  # the gateway's UNSUBSCRIBEs count down from here
# Packet types a client may send after CONNECT (AUTH only on v5).
_FROM_CLIENT: Final = frozenset({3, 4, 5, 6, 7, 8, 10, 12, 14, 15})
_PUBLISH, _PUBREL, _SUBSCRIBE, _UNSUBSCRIBE, _DISCONNECT, _CONNECT = 3, 6, 8, 10, 14, 1
NOT_AUTHORIZED: Final = 0x87  # MQTT 5 DISCONNECT of a session a policy change ends


class State(Enum):
    AWAIT_CONNECT = "await_connect"
    AUTHORIZING = "authorizing"
    ACTIVE = "active"
    CLOSED = "closed"


class Session:
    """One device connection, from its first plaintext byte to its close."""

    # Slots: a held session is one of tens of thousands (bench/README.md, "Memory per held
    # session"); an attribute not listed here raises AttributeError.
    __slots__ = (
        "_admitting",
        "_alias_max",
        "_aliases",
        "_assign_client_id",
        "_buf",
        "_connack_size",
        "_connects",
        "_denial_limits",
        "_denials",
        "_held_downstream",
        "_local_qos2",
        "_need",
        "_own_id",
        "_pending",
        "_pending_len",
        "_publish_cache",
        "_raw_allowed",
        "_raw_flagged",
        "_subscribe_cache",
        "_untracked",
        "_upstream_buf",
        "bytes_in",
        "bytes_out",
        "client_id",
        "connect",
        "context",
        "denied",
        "downstream",
        "fast_path",
        "identity",
        "max_packet_size",
        "packets_in",
        "policy",
        "state",
        "subscriptions",
        "version",
    )

    def __init__(
        self,
        *,
        identity: DeviceIdentity,
        policy: SessionPolicy,
        context: EventContext,
        max_packet_size: int,
        denial_limits: DenialLimits | None = None,
        denials: DenialBudget | None = None,
        connects: ConnectLimiter | None = None,
    ) -> None:
        self.identity = identity
        self._connects = connects  # the device's connect budget, taken by its CONNECT
        self.policy = policy
        self.context = context
        self.max_packet_size = max_packet_size
        self.state = State.AWAIT_CONNECT
        self.version = MQTT_3_1_1
        self.client_id: str | None = None
        self.connect: Connect | None = None
        self.downstream = Downstream(MQTT_3_1_1)
        self.bytes_in = 0
        self.bytes_out = 0
        self.packets_in = 0
        self.denied = 0
        self._denial_limits = denial_limits
        self._denials = denials  # made at the first denial: most sessions never have one
        self._buf = b""  # before admission: bytes not yet judged
        self._pending: list[bytes | memoryview] = []  # once active: a partial frame's pieces
        self._pending_len = 0
        self._need = 0  # total size of the partial frame, 0 while its header is incomplete
        self._assign_client_id = False
        self._admitting = False  # Admit returned: the connect event is on its way
        self._connack_size = 0  # the CONNACK `Admit` carries, counted out once it is sent
        self._upstream_buf = b""
        self._held_downstream: list[bytes | memoryview] = []
        self._publish_cache: dict[object, Decision] = {}
        self._raw_allowed: dict[bytes, bool] = {}  # topic bytes -> allowed, for the fast path
        # ... per QoS and retain flag (``qos << 1 | retain``) when the policy reads them.
        self._raw_flagged: dict[int, dict[bytes, bool]] = {}
        self.fast_path = True
        self._subscribe_cache: dict[object, Decision] = {}
        # Filters forwarded to the broker, with their QoS (insertion-ordered), re-judged on
        # a policy change; past SUBSCRIPTIONS_TRACKED only the fact that there were more.
        self.subscriptions: dict[str, int] = {}
        self._untracked = False
        self._own_id = _OWN_PACKET_IDS
        self._watch_deliveries()
        self._aliases: dict[int, str] = {}
        self._alias_max = 0
        self._local_qos2: set[int] | None = None  # made when first needed (rare)

    # --- events ----------------------------------------------------------------------

    def _event(
        self,
        type_: EventType,
        reason: Reason,
        detail: Mapping[str, object] | None = None,
        outcome: Outcome | None = None,
    ) -> AuthEvent:
        return self.context.event(
            type_, reason, outcome=outcome, client_id=self.client_id, detail=dict(detail or {})
        )

    @property
    def denials(self) -> DenialBudget:
        """The session's denial budget (`gateway.denials`), made when first needed."""
        if self._denials is None:
            self._denials = DenialBudget(self._denial_limits)
        return self._denials

    def end_events(
        self,
        reason: Reason,
        error: str | None = None,
        type_: EventType = EventType.SESSION_END,
    ) -> list[AuthEvent]:
        """The last events of an admitted session: the summaries of the denials still held,
        then its ``session_end`` (or ``session_revoked``)."""
        held = self._denials.flush() if self._denials is not None else []
        events = [self._summary_event(s) for s in held]
        events.append(self._end_event(reason, error, type_))
        return events

    def _summary_event(self, summary: Summary) -> AuthEvent:
        key = "topics" if summary.type is EventType.PUBLISH else "filters"
        detail = {
            "summary": True,
            "count": summary.count,
            key: list(summary.sample),
            "window_seconds": self.denials.limits.window,
        }
        return self._event(summary.type, summary.reason, detail)

    def denials_due_in(self) -> float | None:
        """Seconds until the open denial window closes (None: no window open)."""
        return self._denials.due_in() if self._denials is not None else None

    def denials_due(self) -> list[Action]:
        """The bridge's timer: record the summaries of a denial window that has closed."""
        if self.state is not State.ACTIVE or self._denials is None:
            return []
        return [Record(self._summary_event(s)) for s in self.denials.due()]

    def _end_event(
        self,
        reason: Reason,
        error: str | None = None,
        type_: EventType = EventType.SESSION_END,
    ) -> AuthEvent:
        """The ``session_end`` (or ``session_revoked``) event alone: see `end_events`."""
        outcome = Outcome.ALLOWED if reason in NORMAL_ENDS else Outcome.DENIED
        detail: dict[str, object] = {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "packets_in": self.packets_in,
            "packets_out": self.downstream.packets,
            "denied": self.denied,
        }
        if self.downstream.withheld:  # deliveries the policy's receive rules kept back
            detail["withheld"] = self.downstream.withheld
        if error is not None:
            detail["error"] = error
        return self._event(type_, reason, detail, outcome)

    # --- the device's bytes ----------------------------------------------------------

    def receive_device(self, data: bytes) -> list[Action]:
        """Plaintext from the device."""
        self.bytes_in += len(data)
        if self.state is State.ACTIVE:
            return self._active(data)
        if self.state is State.AWAIT_CONNECT:
            return self._await_connect(data)
        if self.state is State.AUTHORIZING:
            self._buf += data  # a client may pipeline packets before CONNACK
            if len(self._buf) > self.max_packet_size:
                return self._close_before_admission(
                    Reason.PROTOCOL_ERROR, "too much before CONNACK"
                )
        return []

    def _close_before_admission(self, reason: Reason, detail: str) -> list[Action]:
        self.state = State.CLOSED
        return [Record(self._event(EventType.CONNECT, reason, {"error": detail})), Close(reason)]

    def _await_connect(self, data: bytes) -> list[Action]:
        buf = self._buf + data if self._buf else data
        try:
            frame = split_frame(buf, self.max_packet_size)
            if frame is NEED_DATA:
                self._buf = buf
                return []
            if frame[0] != _CONNECT:
                raise MalformedPacket("the first packet is not CONNECT")
            result = decode(buf, version=MQTT_3_1_1, max_packet_size=self.max_packet_size)
        except UnsupportedProtocolVersion as exc:
            self.state = State.CLOSED
            version = MQTT_5 if exc.protocol_level > MQTT_5 else MQTT_3_1_1
            connack = Connack(
                reason_code=connack_code(Reason.UNSUPPORTED_PROTOCOL_VERSION, version)
            )
            detail = {"protocol_name": exc.protocol_name, "protocol_level": exc.protocol_level}
            event = self._event(EventType.CONNECT, Reason.UNSUPPORTED_PROTOCOL_VERSION, detail)
            return [
                Record(event),
                ToDevice(encode(connack, version=version)),
                Close(Reason.UNSUPPORTED_PROTOCOL_VERSION),
            ]
        except MalformedPacket as exc:
            reason = (
                Reason.PACKET_TOO_LARGE if exc.v5_reason_code == 0x95 else Reason.PROTOCOL_ERROR
            )
            return self._close_before_admission(reason, exc.reason)
        if result is NEED_DATA:
            self._buf = buf
            return []
        connect, used = result
        assert isinstance(connect, Connect)
        self._buf = buf[used:]
        self.packets_in += 1
        return self._on_connect(connect)

    def _refuse(
        self, reason: Reason, detail: Mapping[str, object] | None = None, code: int | None = None
    ) -> list[Action]:
        self.state = State.CLOSED
        connack = Connack(
            reason_code=code if code is not None else connack_code(reason, self.version)
        )
        return [
            Record(self._event(EventType.CONNECT, reason, detail)),
            ToDevice(encode(connack, version=self.version)),
            Close(reason),
        ]

    def _on_connect(self, connect: Connect) -> list[Action]:
        self.state = State.AUTHORIZING
        self.version = connect.protocol_level
        self.downstream.version = self.version
        self.connect = connect
        self.client_id = connect.client_id
        budget, self._connects = self._connects, None
        if budget is not None and not budget.take(self.identity.device_id):
            # First: no policy, directory, takeover or broker work for a looping device.
            return self._refuse(Reason.CONNECT_RATE_EXCEEDED, budget.detail)
        if self.policy is NO_POLICY:  # the database's policy is not loaded yet: fail closed
            return self._refuse(Reason.POLICY_NOT_LOADED)
        refusal = connect_refusal(connect, self.identity, self.policy)
        if refusal is not None:
            return self._refuse(refusal.reason, refusal.detail, refusal.code)
        if not connect.client_id:  # the gateway names it after the device
            self._assign_client_id = self.version == MQTT_5
            self.client_id = self.identity.device_id
        will = connect.will
        if will is not None and not self._allowed(
            PolicyAction.PUBLISH, will.topic, will.qos, will.retain
        ):
            return self._refuse(Reason.TOPIC_NOT_AUTHORIZED, {"will_topic": will.topic})
        return [CheckDevice()]

    def device_checked(self, reason: Reason) -> list[Action]:
        """The directory's verdict on this device and certificate."""
        if self.state is not State.AUTHORIZING:
            return []
        if reason is not Reason.OK:
            # Which certificate the verdict is on, in full (refusals only: never per CONNECT).
            der = self.identity.der
            detail = {"presented": presented_detail(describe_certificate(der))} if der else None
            return self._refuse(reason, detail)
        assert self.connect is not None and self.client_id is not None
        connect = upstream_connect(self.connect, self.identity, self.client_id)
        return [DialUpstream(encode(connect, version=self.version))]

    def upstream_failed(self, detail: str) -> list[Action]:
        """The broker could not be reached (or closed before its CONNACK)."""
        if self.state is not State.AUTHORIZING:
            return []
        return self._refuse(Reason.UPSTREAM_UNAVAILABLE, {"error": detail})

    def connect_timed_out(self) -> list[Action]:
        """No complete CONNECT within the connect timeout."""
        if self.state is not State.AWAIT_CONNECT:
            return []
        return self._close_before_admission(Reason.CONNECT_TIMEOUT, "no CONNECT in time")

    # --- the broker's bytes ----------------------------------------------------------

    def receive_upstream(self, data: bytes) -> list[Action]:
        """Bytes from the broker."""
        if self.state is State.ACTIVE:
            try:
                chunks = self.downstream.feed(data)
            except MalformedPacket as exc:
                return self._protocol_close(Reason.UPSTREAM_CLOSED, None, exc.reason)
            for chunk in chunks:
                self.bytes_out += len(chunk)
            actions: list[Action] = [ToDevice(chunk) for chunk in chunks]
            replies = self.downstream.replies
            if replies:  # the gateway's acks of deliveries the policy withheld
                actions.append(ToUpstream(b"".join(replies)))
                replies.clear()
            return actions
        if self.state is State.AUTHORIZING:
            return self._await_connack(data)
        return []

    def _await_connack(self, data: bytes) -> list[Action]:
        if self._held_downstream:  # CONNACK already seen: waiting for admission
            self._held_downstream.append(data)
            return []
        buf = self._upstream_buf + data
        try:
            result = decode(buf, version=self.version)
            if result is not NEED_DATA and not isinstance(result[0], Connack):
                raise MalformedPacket("the broker's first packet is not CONNACK")
        except MalformedPacket as exc:
            return self._refuse(Reason.UPSTREAM_UNAVAILABLE, {"error": exc.reason})
        if result is NEED_DATA:
            self._upstream_buf = buf
            return []
        connack, used = result
        assert isinstance(connack, Connack)
        self._upstream_buf = b""
        rest = buf[used:]
        if connack.reason_code != 0:
            self.state = State.CLOSED
            detail = {"broker_reason_code": connack.reason_code}
            return [
                Record(self._event(EventType.CONNECT, Reason.UPSTREAM_UNAVAILABLE, detail)),
                ToDevice(buf[:used]),
                Close(Reason.UPSTREAM_UNAVAILABLE),
            ]
        if self.version == MQTT_5:
            self._alias_max = connack.properties.topic_alias_maximum or 0
            assigned = self.client_id if self._assign_client_id else None
            connack = device_connack(
                connack, max_packet_size=self.max_packet_size, assigned_client_id=assigned
            )
        connack_bytes = encode(connack, version=self.version)
        self._connack_size = len(connack_bytes)
        self._held_downstream.append(rest)  # non-empty list marks "CONNACK seen"
        self._admitting = True
        info: dict[str, object] = {
            "protocol_version": self.version,
            "policy_version": self.policy.version,
        }
        if self.connect is not None:
            info["clean_start"] = self.connect.clean_start
            info["keepalive"] = self.connect.keepalive
        return [Admit(self._event(EventType.CONNECT, Reason.OK, info), connack_bytes)]

    def admitted(self) -> list[Action]:
        """The connect event is durable and the CONNACK sent: the session is live."""
        if self.state is not State.AUTHORIZING:
            return []
        self.state = State.ACTIVE
        # The bridge has just sent `Admit.connack` itself (never a ToDevice): counted out
        # as the CONNECT was counted in. The gateway's own refusals are not counted.
        self.bytes_out += self._connack_size
        self.downstream.packets += 1
        actions: list[Action] = []
        held, self._held_downstream = self._held_downstream, []
        for data in held:
            if data:
                actions.extend(self.receive_upstream(bytes(data)))
        if self._buf and self.state is State.ACTIVE:
            buf, self._buf = self._buf, b""
            actions.extend(self._active(buf))
        return actions

    def admission_failed(self) -> list[Action]:
        """The connect event could not be stored: refuse (no unrecorded sessions)."""
        if self.state is not State.AUTHORIZING:
            return []
        return self._refuse(Reason.EVENT_LOG_UNAVAILABLE)

    # --- the live session, device to broker -------------------------------------------

    def _protocol_close(self, reason: Reason, v5_code: int | None, detail: str) -> list[Action]:
        self.state = State.CLOSED
        actions: list[Action] = [Record(e) for e in self.end_events(reason, detail)]
        if v5_code is not None and self.version == MQTT_5:
            actions.append(ToDevice(encode(Disconnect(reason_code=v5_code), version=MQTT_5)))
        actions.append(Close(reason))
        return actions

    def _active(self, data: bytes) -> list[Action]:
        if not self._pending:
            return self._scan(data, 0)
        # A frame straddles the previous input and this one: join just that frame (never
        # the rest of ``data``), so payload bytes are copied at most once, at record edges.
        try:
            cut = self._straddle_cut(data)
        except MalformedPacket as exc:
            return self._malformed([], exc)
        if cut < 0:
            self._pending.append(data)
            self._pending_len += len(data)
            return []
        frame = b"".join([*self._pending, memoryview(data)[:cut]])
        self._pending = []
        self._pending_len = self._need = 0
        actions = self._scan(frame, 0)
        if cut < len(data) and self.state is State.ACTIVE:
            actions.extend(self._scan(data, cut))
        return actions

    def _straddle_cut(self, data: bytes) -> int:
        """How many bytes of ``data`` complete the pending frame; -1 if not enough."""
        if not self._need:
            first = self._pending[0]
            head = bytes(first[:5]) if len(first) >= 5 else b"".join(self._pending)[:5]
            frame = split_frame(head + data[:5], self.max_packet_size)
            if frame is NEED_DATA:
                return -1
            self._need = frame[3]
        missing = self._need - self._pending_len
        return missing if missing <= len(data) else -1

    def _malformed(self, actions: list[Action], exc: MalformedPacket) -> list[Action]:
        reason = Reason.PACKET_TOO_LARGE if exc.v5_reason_code == 0x95 else Reason.PROTOCOL_ERROR
        actions.extend(self._protocol_close(reason, exc.v5_reason_code, exc.reason))
        return actions

    def _scan(self, data: bytes, pos: int) -> list[Action]:
        """Judge the packets of ``data`` from ``pos``; keep a trailing partial frame."""
        n = len(data)
        view = memoryview(data)
        actions: list[Action] = []
        start = pos  # start of the run of packets forwarded as they are
        version = self.version
        v5 = version == MQTT_5
        limit = self.max_packet_size
        raw_allowed = self._raw_allowed if self.fast_path else {}
        flagged = self._raw_flagged if self.fast_path and self.policy.publish_flags_matter else None
        try:
            while pos < n:
                if data[pos] >> 4 == _PUBLISH:
                    end = allowed_publish_end(
                        data,
                        pos,
                        n,
                        v5=v5,
                        max_packet_size=limit,
                        allowed=raw_allowed,
                        flagged=flagged,
                    )
                    if end > 0:
                        self.packets_in += 1
                        pos = end
                        continue
                    if end == MORE:
                        break
                result = decode(view[pos:], version=version, max_packet_size=limit)
                if result is NEED_DATA:
                    break
                packet, used = result
                end = pos + used
                self.packets_in += 1
                packet_type = data[pos] >> 4
                if packet_type not in _FROM_CLIENT:
                    raise MalformedPacket(
                        f"packet type {packet_type} from a client", PROTOCOL_ERROR
                    )
                verdict: list[Action] | None = None
                if packet_type == _PUBLISH:
                    assert isinstance(packet, Publish)
                    verdict = self._publish(packet)
                elif packet_type == _SUBSCRIBE:
                    assert isinstance(packet, Subscribe)
                    verdict = self._subscribe(packet)
                elif packet_type == _UNSUBSCRIBE:
                    assert isinstance(packet, Unsubscribe)
                    for topic_filter in packet.topic_filters:
                        self.subscriptions.pop(topic_filter, None)
                elif packet_type == _PUBREL and self._local_qos2:
                    assert isinstance(packet, Pubrel)
                    verdict = self._pubrel(packet)
                elif packet_type == _DISCONNECT:
                    actions.append(ToUpstream(view[start:end]))
                    self.state = State.CLOSED
                    actions.extend(Record(e) for e in self.end_events(Reason.CLIENT_DISCONNECTED))
                    actions.append(Close(Reason.CLIENT_DISCONNECTED))
                    return actions
                if verdict is not None:
                    if start < pos:
                        actions.append(ToUpstream(view[start:pos]))
                    actions.extend(verdict)
                    start = end
                    if self.state is State.CLOSED:
                        return actions
                pos = end
        except MalformedPacket as exc:
            if start < pos:
                actions.append(ToUpstream(view[start:pos]))
            return self._malformed(actions, exc)
        if start == 0 and pos == n:
            actions.append(ToUpstream(data))
        elif start < pos:
            actions.append(ToUpstream(view[start:pos]))
        if pos < n:
            self._pending = [view[pos:]]
            self._pending_len = n - pos
        return actions

    def _verdict(
        self, action: PolicyAction, topic: str, qos: int = 0, retain: bool = False
    ) -> Decision:
        key: object
        if action is PolicyAction.PUBLISH:
            cache = self._publish_cache
            key = (topic, qos, retain) if self.policy.publish_flags_matter else topic
        else:  # SUBSCRIBE and RECEIVE share a cache: the action is in the key
            cache = self._subscribe_cache
            key = (action, topic, qos)
        verdict = cache.get(key)
        if verdict is None:
            verdict = self.policy.decide(action, topic, qos=qos, retain=retain)
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[key] = verdict
        return verdict

    def _allowed(
        self, action: PolicyAction, topic: str, qos: int = 0, retain: bool = False
    ) -> bool:
        return self._verdict(action, topic, qos, retain).allowed

    def _watch_deliveries(self) -> None:
        """Judge deliveries (broker to device) only when the policy has receive rules."""
        receives = judges_deliveries(self.policy)
        self.downstream.judged_by(self._may_receive if receives else None)

    def _may_receive(self, topic: str) -> bool:
        # Cached like PUBLISH: a device receives the same few topics again and again.
        return self._verdict(PolicyAction.RECEIVE, topic).allowed

    def _publish(self, packet: Publish) -> list[Action] | None:
        """None: forward as is. Otherwise what to do instead."""
        topic = packet.topic
        if self.version == MQTT_5 and packet.properties:
            alias = packet.properties.topic_alias
            if alias is not None:
                if alias == 0 or alias > self._alias_max:
                    raise MalformedPacket(f"topic alias {alias} invalid", TOPIC_ALIAS_INVALID)
                if topic:
                    self._aliases[alias] = topic
                else:
                    known = self._aliases.get(alias)
                    if known is None:
                        raise MalformedPacket(f"unknown topic alias {alias}", PROTOCOL_ERROR)
                    topic = known
        judged = self._verdict(PolicyAction.PUBLISH, topic, packet.qos, packet.retain)
        if judged.allowed:
            # Not via an alias: the fast path may skip decoding the next PUBLISH to this
            # topic (with the same QoS and retain flag, when the policy's conditions read them).
            if topic is packet.topic:
                if self.policy.publish_flags_matter:
                    flags = (packet.qos << 1) | packet.retain
                    raw = self._raw_flagged.get(flags)
                    if raw is None:
                        raw = self._raw_flagged[flags] = {}
                else:
                    raw = self._raw_allowed
                if len(raw) >= _CACHE_LIMIT:
                    raw.clear()
                raw[topic.encode()] = True
            return None
        actions = self._deny(
            EventType.PUBLISH,
            1,
            (topic,),
            lambda: {
                "count": 1,
                "topic": clip(topic),
                "qos": packet.qos,
                "policy_version": judged.version,
                "statement": judged.statement,
            },
        )
        if self.denials.exceeded:
            return self._too_many_denials(actions)
        packet_id = packet.packet_id
        if self.version == MQTT_5:
            if packet.qos == 1 and packet_id is not None:
                actions.append(
                    ToDevice(encode(Puback(packet_id=packet_id, reason_code=0x87), version=MQTT_5))
                )
            elif packet.qos == 2 and packet_id is not None:
                actions.append(
                    ToDevice(encode(Pubrec(packet_id=packet_id, reason_code=0x87), version=MQTT_5))
                )
            return actions
        if not self.policy.drop_denied_publish_v3:
            self.state = State.CLOSED  # MQTT-3.3.5-2: close the connection
            actions.extend(Record(e) for e in self.end_events(Reason.TOPIC_NOT_AUTHORIZED))
            actions.append(Close(Reason.TOPIC_NOT_AUTHORIZED))
            return actions
        if packet.qos == 1 and packet_id is not None:
            actions.append(ToDevice(encode(Puback(packet_id=packet_id), version=MQTT_3_1_1)))
        elif packet.qos == 2 and packet_id is not None:
            if self._local_qos2 is None:
                self._local_qos2 = set()
            self._local_qos2.add(packet_id)
            actions.append(ToDevice(encode(Pubrec(packet_id=packet_id), version=MQTT_3_1_1)))
        return actions

    def _deny(
        self,
        type_: EventType,
        count: int,
        targets: Iterable[str],
        detail: Callable[[], dict[str, object]],
    ) -> list[Action]:
        """Account ``count`` denials of ``targets``: the events to record now (``detail``
        is built only if this denial is recorded on its own)."""
        self.denied += count
        verdict = self.denials.deny(type_, Reason.TOPIC_NOT_AUTHORIZED, count, targets)
        actions: list[Action] = [Record(self._summary_event(s)) for s in verdict.due]
        if verdict.record:
            actions.append(Record(self._event(type_, Reason.TOPIC_NOT_AUTHORIZED, detail())))
        return actions

    def _too_many_denials(self, actions: list[Action]) -> list[Action]:
        limits = self.denials.limits
        error = f"more than {limits.per_window} denials in {limits.window:g} s"
        actions.extend(self._protocol_close(Reason.TOO_MANY_DENIALS, QUOTA_EXCEEDED, error))
        return actions

    def _pubrel(self, packet: Pubrel) -> list[Action] | None:
        if self._local_qos2 is None or packet.packet_id not in self._local_qos2:
            return None
        self._local_qos2.discard(packet.packet_id)
        return [ToDevice(encode(Pubcomp(packet_id=packet.packet_id), version=self.version))]

    def _subscribe(self, packet: Subscribe) -> list[Action] | None:
        subscribe = PolicyAction.SUBSCRIBE
        judged = [self._verdict(subscribe, s.topic_filter, s.qos) for s in packet.subscriptions]
        verdicts = [j.allowed for j in judged]
        if all(verdicts):
            self._track(packet.subscriptions)
            return None
        denied_code = 0x87 if self.version == MQTT_5 else 0x80
        # One event for the packet, however many filters it denies: their count, a sample.
        denied = [
            s.topic_filter
            for s, allowed in zip(packet.subscriptions, verdicts, strict=True)
            if not allowed
        ]
        actions = self._deny(
            EventType.SUBSCRIBE,
            len(denied),
            denied,
            lambda: {
                "count": len(denied),
                "filters": sample(denied),
                "policy_version": self.policy.version,
                "statement": next(j.statement for j in judged if not j.allowed),
            },
        )
        if self.denials.exceeded:
            return self._too_many_denials(actions)
        if not any(verdicts):
            codes = (denied_code,) * len(verdicts)
            suback = Suback(packet_id=packet.packet_id, reason_codes=codes)
            actions.append(ToDevice(encode(suback, version=self.version)))
            return actions
        kept = tuple(
            s for s, allowed in zip(packet.subscriptions, verdicts, strict=True) if allowed
        )
        self._track(kept)
        merge = SubackMerge(tuple(None if allowed else denied_code for allowed in verdicts))
        self.downstream.merges[packet.packet_id] = merge
        actions.append(
            ToUpstream(encode(replace(packet, subscriptions=kept), version=self.version))
        )
        return actions

    def _track(self, subscriptions: Iterable[Subscription]) -> None:
        tracked = self.subscriptions
        for subscription in subscriptions:
            topic_filter = subscription.topic_filter
            if topic_filter not in tracked and len(tracked) >= SUBSCRIPTIONS_TRACKED:
                self._untracked = True
                return
            tracked[topic_filter] = subscription.qos  # a new SUBSCRIBE replaces the QoS

    # --- a policy change -------------------------------------------------------------

    def rejudge(self, policy: SessionPolicy) -> list[Action]:
        """Judge the live session again under ``policy`` (a newer policy version).

        Decisions from now on are the new policy's (the caches are emptied). The session
        ends (``session_ended_by_policy``) if its client id is no longer allowed or it holds
        a subscription the new policy forbids; such subscriptions are first removed at the
        broker (UNSUBSCRIBE in the gateway's own packet id space, its UNSUBACK swallowed),
        so a persistent broker session does not keep them, each recorded as a
        ``subscription_revoked`` event. MQTT 5 has no server-initiated unsubscribe: a v5
        device is told with DISCONNECT 0x87 Not authorized and a reason string naming the
        filter; a 3.1.1 device's connection is closed. If the device's will topic is
        forbidden too, the broker gets a DISCONNECT so the will does not fire.
        """
        if policy is self.policy or self.state is State.CLOSED:
            return []
        self.policy = policy
        self._publish_cache.clear()
        self._subscribe_cache.clear()
        self._raw_allowed.clear()
        self._raw_flagged.clear()
        self._watch_deliveries()
        if self.state is State.AWAIT_CONNECT:
            return []  # its CONNECT will be judged by the new policy
        version = policy.version
        detail: dict[str, object] = {"policy_version": version}
        requested = self.connect.client_id if self.connect is not None else ""
        if requested and not policy.client_id_allowed(requested):
            detail["client_id"] = requested
            detail["error"] = f"client id {requested!r} no longer allowed"
        revoked = [
            (topic_filter, verdict)
            for topic_filter, qos in self.subscriptions.items()
            if not (verdict := self._verdict(PolicyAction.SUBSCRIBE, topic_filter, qos)).allowed
        ]
        if self._untracked and "error" not in detail and not revoked:
            detail["error"] = f"more than {SUBSCRIPTIONS_TRACKED} subscriptions to re-judge"
        if "error" not in detail and not revoked:
            return []
        if self.state is State.AUTHORIZING and not self._admitting:
            return self.cut(Reason.SESSION_ENDED_BY_POLICY, detail=detail)
        actions: list[Action] = []
        if revoked:
            filters = tuple(topic_filter for topic_filter, _ in revoked)
            packet_id = self._own_packet_id()
            self.downstream.unsubacks.add(packet_id)
            actions.append(
                ToUpstream(
                    encode(
                        Unsubscribe(packet_id=packet_id, topic_filters=filters),
                        version=self.version,
                    )
                )
            )
            for topic_filter, verdict in revoked[:SAMPLE_SIZE]:
                del self.subscriptions[topic_filter]
                why = {
                    "filter": clip(topic_filter),
                    "policy_version": version,
                    "statement": verdict.statement,
                }
                actions.append(
                    Record(self._event(EventType.SUBSCRIBE, Reason.SUBSCRIPTION_REVOKED, why))
                )
            if len(revoked) > SAMPLE_SIZE:  # the rest in one summary: bounded rows per change
                rest = [topic_filter for topic_filter, _ in revoked[SAMPLE_SIZE:]]
                why = {
                    "summary": True,
                    "count": len(rest),
                    "filters": sample(rest),
                    "policy_version": version,
                }
                actions.append(
                    Record(self._event(EventType.SUBSCRIBE, Reason.SUBSCRIPTION_REVOKED, why))
                )
            detail["filters"] = sample(filters)
            detail.setdefault("error", f"subscription to {clip(filters[0])!r} revoked by policy")
        will = self.connect.will if self.connect is not None else None
        if will is not None and not self._allowed(
            PolicyAction.PUBLISH, will.topic, will.qos, will.retain
        ):
            actions.append(ToUpstream(DISCONNECT_BYTES))  # no will to a forbidden topic
        message = f"{detail['error']} (policy version {version})"
        actions.extend(self.cut(Reason.SESSION_ENDED_BY_POLICY, detail=detail, message=message))
        return actions

    def _own_packet_id(self) -> int:
        """A packet id for the gateway's own UNSUBSCRIBE: counting down from 65535, never
        one of the device's SUBSCRIBEs awaiting their SUBACK nor an UNSUBACK still owed."""
        while True:
            packet_id = self._own_id
            self._own_id = packet_id - 1 if packet_id > 1 else _OWN_PACKET_IDS
            owed = self.downstream
            if packet_id not in owed.merges and packet_id not in owed.unsubacks:
                return packet_id

    # --- ends ------------------------------------------------------------------------

    def close(self, reason: Reason, type_: EventType = EventType.SESSION_END) -> list[AuthEvent]:
        """The connection ended from outside (``reason``); the end events, if due.

        Empty if the session was never admitted or has already recorded its end.
        """
        was_active = self.state is State.ACTIVE
        self.state = State.CLOSED
        return self.end_events(reason, type_=type_) if was_active else []

    def cut(
        self,
        reason: Reason,
        *,
        revoked: bool = False,
        detail: Mapping[str, object] | None = None,
        message: str | None = None,
    ) -> list[Action]:
        """End the session from outside: takeover, revocation, expiry, shutdown, policy.

        ``revoked`` records ``session_revoked`` instead of ``session_end`` (``session_superseded``,
        allowed, when the device renewed: `HANDED_OVER`); ``detail`` is
        added to the end event's detail (e.g. which session took over); ``message`` is the
        v5 DISCONNECT's Reason String. See the module invariants for what is recorded and
        sent in each state.
        """
        state = self.state
        if state is State.CLOSED:
            return []
        self.state = State.CLOSED
        # Forwarded frames end on a packet boundary, so the DISCONNECT follows them cleanly
        # (dropped by the bridge if the broker connection is not open).
        goodbye: list[Action] = (
            [ToUpstream(DISCONNECT_BYTES)]
            if reason in CLEAN_CUTS and state is not State.AWAIT_CONNECT
            else []
        )
        if state is State.ACTIVE or self._admitting:
            type_ = EventType.SESSION_END
            if revoked:
                handed_over = reason in HANDED_OVER
                type_ = EventType.SESSION_SUPERSEDED if handed_over else EventType.SESSION_REVOKED
            *summaries, event = self.end_events(reason, type_=type_)
            if detail:
                event = event.model_copy(update={"detail": {**event.detail, **detail}})
            actions: list[Action] = [Record(e) for e in (*summaries, event)]
            if state is State.ACTIVE and self.version == MQTT_5:  # never before its CONNACK
                disconnect = Disconnect(reason_code=disconnect_code(reason))
                if message is not None:
                    reason_string = Properties(((PropertyId.REASON_STRING, clip(message)),))
                    disconnect = replace(disconnect, properties=reason_string)
                actions.append(ToDevice(encode(disconnect, version=MQTT_5)))
            actions.extend(goodbye)
            actions.append(Close(reason))
            return actions
        refusal = detail if reason is Reason.SESSION_ENDED_BY_POLICY else None
        actions = [Record(self._event(EventType.CONNECT, reason, refusal))]
        if state is State.AUTHORIZING:  # its CONNECT came: answer it
            connack = Connack(reason_code=connack_code(reason, self.version))
            actions.append(ToDevice(encode(connack, version=self.version)))
        actions.extend(goodbye)
        actions.append(Close(reason))
        return actions
