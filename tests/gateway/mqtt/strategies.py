"""Hypothesis strategies for valid MQTT packets, independent of the codec's tables.

The property table below is copied from the MQTT 5.0 specification (section
2.2.2.2), not from ``gateway.mqtt.properties``, so that a mistake in the
codec's table shows up as a test failure (see test_mqtt_properties.py).
"""

from __future__ import annotations

from hypothesis import strategies as st

from gateway.mqtt import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    PropertyId,
    PropertyValue,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)

WILL = "WILL"
# id: (type, where allowed). Types: byte, u16, u32, varint, utf8, binary, pair.
SPEC_PROPERTIES: dict[int, tuple[str, frozenset[str]]] = {
    0x01: ("byte", frozenset({"PUBLISH", WILL})),
    0x02: ("u32", frozenset({"PUBLISH", WILL})),
    0x03: ("utf8", frozenset({"PUBLISH", WILL})),
    0x08: ("utf8", frozenset({"PUBLISH", WILL})),
    0x09: ("binary", frozenset({"PUBLISH", WILL})),
    0x0B: ("varint", frozenset({"PUBLISH", "SUBSCRIBE"})),
    0x11: ("u32", frozenset({"CONNECT", "CONNACK", "DISCONNECT"})),
    0x12: ("utf8", frozenset({"CONNACK"})),
    0x13: ("u16", frozenset({"CONNACK"})),
    0x15: ("utf8", frozenset({"CONNECT", "CONNACK", "AUTH"})),
    0x16: ("binary", frozenset({"CONNECT", "CONNACK", "AUTH"})),
    0x17: ("byte", frozenset({"CONNECT"})),
    0x18: ("u32", frozenset({WILL})),
    0x19: ("byte", frozenset({"CONNECT"})),
    0x1A: ("utf8", frozenset({"CONNACK"})),
    0x1C: ("utf8", frozenset({"CONNACK", "DISCONNECT"})),
    0x1F: (
        "utf8",
        frozenset(
            {
                "CONNACK",
                "PUBACK",
                "PUBREC",
                "PUBREL",
                "PUBCOMP",
                "SUBACK",
                "UNSUBACK",
                "DISCONNECT",
                "AUTH",
            }
        ),
    ),
    0x21: ("u16", frozenset({"CONNECT", "CONNACK"})),
    0x22: ("u16", frozenset({"CONNECT", "CONNACK"})),
    0x23: ("u16", frozenset({"PUBLISH"})),
    0x24: ("byte", frozenset({"CONNACK"})),
    0x25: ("byte", frozenset({"CONNACK"})),
    0x26: (
        "pair",
        frozenset(
            {
                "CONNECT",
                "CONNACK",
                "PUBLISH",
                WILL,
                "PUBACK",
                "PUBREC",
                "PUBREL",
                "PUBCOMP",
                "SUBSCRIBE",
                "SUBACK",
                "UNSUBSCRIBE",
                "UNSUBACK",
                "DISCONNECT",
                "AUTH",
            }
        ),
    ),
    0x27: ("u32", frozenset({"CONNECT", "CONNACK"})),
    0x28: ("byte", frozenset({"CONNACK"})),
    0x29: ("byte", frozenset({"CONNACK"})),
    0x2A: ("byte", frozenset({"CONNACK"})),
}
# Value rules whose breach is a Protocol Error.
ZERO_OR_ONE = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
NOT_ZERO = frozenset({0x0B, 0x21, 0x27})

# --- strings and topics ------------------------------------------------------

# Valid MQTT string characters: any code point but U+0000 and surrogates.
_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
mqtt_text = st.text(_chars, max_size=12)
# A topic level: no '/', '+', '#'; biased towards a small alphabet so that
# levels repeat (matching) and '$' shows up at the start.
_level_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00/+#")
topic_level = st.one_of(
    st.sampled_from(["", "a", "b", "$SYS", "$share", "devices", "d1", "é", "\U0001f600"]),
    st.text(_level_chars, max_size=6),
)
topic_names = st.lists(topic_level, min_size=1, max_size=5).map("/".join).filter(lambda t: t != "")


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(topic_level, st.just("+")), min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    f = "/".join(levels)
    return f if f else "#"


@st.composite
def shared_filters(draw: st.DrawFn) -> str:
    group = draw(st.text(_level_chars, min_size=1, max_size=4))
    return f"$share/{group}/{draw(topic_filters())}"


def filters_for(version: int) -> st.SearchStrategy[str]:
    """Valid filters; on MQTT 5 "$share/..." must be a valid shared subscription."""
    if version == 4:
        return topic_filters()
    plain = topic_filters().filter(lambda f: not f.startswith("$share/"))
    return st.one_of(plain, shared_filters())


# --- properties -------------------------------------------------------------


def _value(pid: int) -> st.SearchStrategy[PropertyValue]:
    kind = SPEC_PROPERTIES[pid][0]
    if pid in ZERO_OR_ONE:
        return st.sampled_from([0, 1])
    if pid == 0x08:  # Response Topic: a topic name
        return topic_names
    low = 1 if pid in NOT_ZERO else 0
    if kind == "u16":
        return st.integers(low, 0xFFFF)
    if kind == "u32":
        return st.integers(low, 0xFFFF_FFFF)
    if kind == "varint":
        return st.integers(low, 268_435_455)
    if kind == "utf8":
        return mqtt_text
    if kind == "binary":
        return st.binary(max_size=12)
    assert kind == "pair"
    return st.tuples(mqtt_text, mqtt_text)


@st.composite
def properties(draw: st.DrawFn, context: str) -> Properties:
    allowed = sorted(pid for pid, (_, where) in SPEC_PROPERTIES.items() if context in where)
    single = [pid for pid in allowed if pid != 0x26 and not (pid == 0x0B and context == "PUBLISH")]
    chosen = draw(st.lists(st.sampled_from(single), unique=True, max_size=4)) if single else []
    items: list[tuple[int, PropertyValue]] = [(pid, draw(_value(pid))) for pid in chosen]
    for _ in range(draw(st.integers(0, 2))):
        items.append((0x26, draw(_value(0x26))))
    if context == "PUBLISH":
        for _ in range(draw(st.integers(0, 2))):
            items.append((0x0B, draw(_value(0x0B))))
    items = draw(st.permutations(items))
    return Properties.of(*items)


def props(version: int, context: str) -> st.SearchStrategy[Properties]:
    return properties(context) if version == 5 else st.just(Properties())


# --- packets ----------------------------------------------------------------

packet_ids = st.integers(1, 0xFFFF)
reason_codes = st.integers(0, 0xFF)


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    username = draw(st.none() | mqtt_text)
    password = draw(st.none() | st.binary(max_size=12))
    if version == 4 and username is None:
        password = None
    will = None
    if draw(st.booleans()):
        will = Will(
            topic=draw(topic_names),
            payload=draw(st.binary(max_size=12)),
            qos=draw(st.integers(0, 2)),
            retain=draw(st.booleans()),
            properties=draw(props(version, WILL)),
        )
    return Connect(
        protocol_level=version,
        client_id=draw(mqtt_text),
        clean_start=draw(st.booleans()),
        keepalive=draw(st.integers(0, 0xFFFF)),
        username=username,
        password=password,
        will=will,
        properties=draw(props(version, "CONNECT")),
    )


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    qos = draw(st.integers(0, 2))
    properties = draw(props(version, "PUBLISH"))
    topic = draw(topic_names)
    if version == 5 and draw(st.integers(0, 4)) == 0:
        # An empty topic is valid with a Topic Alias.
        if properties.topic_alias is None:
            properties = Properties.of(*properties.items, (PropertyId.TOPIC_ALIAS, 1))
        topic = ""
    return Publish(
        topic=topic,
        payload=draw(st.binary(max_size=40)),
        qos=qos,
        retain=draw(st.booleans()),
        dup=qos > 0 and draw(st.booleans()),
        packet_id=draw(packet_ids) if qos else None,
        properties=properties,
    )


@st.composite
def publish_responses(draw: st.DrawFn, version: int) -> Packet:
    classes: list[type[Puback | Pubrec | Pubrel | Pubcomp]] = [Puback, Pubrec, Pubrel, Pubcomp]
    cls = draw(st.sampled_from(classes))
    context = cls.__name__.upper()
    if version == 4:
        return cls(packet_id=draw(packet_ids))
    return cls(
        packet_id=draw(packet_ids),
        reason_code=draw(reason_codes),
        properties=draw(props(version, context)),
    )


@st.composite
def subscriptions(draw: st.DrawFn, version: int) -> Subscription:
    if version == 4:
        return Subscription(topic_filter=draw(topic_filters()), qos=draw(st.integers(0, 2)))
    topic_filter = draw(filters_for(version))
    shared = topic_filter.startswith("$share/")
    return Subscription(
        topic_filter=topic_filter,
        qos=draw(st.integers(0, 2)),
        no_local=not shared and draw(st.booleans()),
        retain_as_published=draw(st.booleans()),
        retain_handling=draw(st.integers(0, 2)),
    )


@st.composite
def subscribes(draw: st.DrawFn, version: int) -> Subscribe:
    return Subscribe(
        packet_id=draw(packet_ids),
        subscriptions=tuple(draw(st.lists(subscriptions(version), min_size=1, max_size=4))),
        properties=draw(props(version, "SUBSCRIBE")),
    )


@st.composite
def subacks(draw: st.DrawFn, version: int) -> Suback:
    codes = st.sampled_from([0, 1, 2, 0x80]) if version == 4 else reason_codes
    return Suback(
        packet_id=draw(packet_ids),
        reason_codes=tuple(draw(st.lists(codes, min_size=1, max_size=5))),
        properties=draw(props(version, "SUBACK")),
    )


@st.composite
def unsubscribes(draw: st.DrawFn, version: int) -> Unsubscribe:
    return Unsubscribe(
        packet_id=draw(packet_ids),
        topic_filters=tuple(draw(st.lists(filters_for(version), min_size=1, max_size=4))),
        properties=draw(props(version, "UNSUBSCRIBE")),
    )


@st.composite
def unsubacks(draw: st.DrawFn, version: int) -> Unsuback:
    if version == 4:
        return Unsuback(packet_id=draw(packet_ids))
    return Unsuback(
        packet_id=draw(packet_ids),
        reason_codes=tuple(draw(st.lists(reason_codes, min_size=1, max_size=5))),
        properties=draw(props(version, "UNSUBACK")),
    )


@st.composite
def connacks(draw: st.DrawFn, version: int) -> Connack:
    return Connack(
        session_present=draw(st.booleans()),
        reason_code=draw(st.integers(0, 5) if version == 4 else reason_codes),
        properties=draw(props(version, "CONNACK")),
    )


@st.composite
def disconnects(draw: st.DrawFn, version: int) -> Disconnect:
    if version == 4:
        return Disconnect()
    return Disconnect(reason_code=draw(reason_codes), properties=draw(props(version, "DISCONNECT")))


@st.composite
def auths(draw: st.DrawFn) -> Auth:
    return Auth(reason_code=draw(reason_codes), properties=draw(props(5, "AUTH")))


def packets(version: int) -> st.SearchStrategy[Packet]:
    """Any valid packet of ``version``, every type."""
    choices: list[st.SearchStrategy[Packet]] = [
        connects(version),
        connacks(version),
        publishes(version),
        publish_responses(version),
        subscribes(version),
        subacks(version),
        unsubscribes(version),
        unsubacks(version),
        st.just(Pingreq()),
        st.just(Pingresp()),
        disconnects(version),
    ]
    if version == 5:
        choices.append(auths())
    return st.one_of(choices)
