"""MQTT 3.1.1 and 5.0 for devicegate: a sans-IO codec and the topic rules.

``codec`` (decode, encode, split_frame), ``packets`` (the packet values),
``properties`` (MQTT 5 properties), ``topics`` (the one topic matcher),
``errors``. Everything public is re-exported here.

Sans-IO and self-contained: the package imports only itself and the standard library, not
``schemas`` nor the rest of the gateway, so the codec can be fuzzed and reused on its own.
"""

from gateway.mqtt.codec import NEED_DATA, NeedData, decode, encode, split_frame
from gateway.mqtt.errors import (
    MALFORMED_PACKET,
    PACKET_TOO_LARGE,
    PROTOCOL_ERROR,
    UNSUPPORTED_PROTOCOL_VERSION,
    InvalidTopic,
    MalformedPacket,
    UnsupportedProtocolVersion,
)
from gateway.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    RawPacket,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from gateway.mqtt.properties import EMPTY_PROPERTIES, Properties, PropertyId, PropertyValue
from gateway.mqtt.topics import (
    filter_contains,
    matches,
    parse_shared,
    validate_topic_filter,
    validate_topic_name,
)

__all__ = [
    "EMPTY_PROPERTIES",
    "MALFORMED_PACKET",
    "MQTT_3_1_1",
    "MQTT_5",
    "NEED_DATA",
    "PACKET_TOO_LARGE",
    "PROTOCOL_ERROR",
    "UNSUPPORTED_PROTOCOL_VERSION",
    "Auth",
    "Connack",
    "Connect",
    "Disconnect",
    "InvalidTopic",
    "MalformedPacket",
    "NeedData",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Properties",
    "PropertyId",
    "PropertyValue",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "RawPacket",
    "Suback",
    "Subscribe",
    "Subscription",
    "Unsuback",
    "Unsubscribe",
    "UnsupportedProtocolVersion",
    "Will",
    "decode",
    "encode",
    "filter_contains",
    "matches",
    "parse_shared",
    "split_frame",
    "validate_topic_filter",
    "validate_topic_name",
]
