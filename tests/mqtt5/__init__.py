"""MQTT 5 behaviour suite: the same scenario straight to Mosquitto and through the gateway.

Each test module starts two Mosquittos alike (``BROKER_CONFIG``) on free ports, one behind
a gateway (`conftest.SuiteHarness`, real PostgreSQL, mTLS certificates from the project's
CA). A case runs its scenario on both sides at once (`conftest.differential`), with the
same client ids and topics (inside the default policy, ``devices/{device_id}/#``; the
suite's fleet also allows ``{device_id}-*`` client ids), and asserts that the gateway's
transcript equals the broker's, and that the broker's is what the case is about (so two
equally broken runs do not pass). Clients: paho-mqtt v5, aiomqtt, mosquitto_pub/sub, and
hand-written bytes (`wire`) where no library goes.

Normalised, with the reason next to it: CONNACK Maximum Packet Size (lowered by the
gateway), Assigned Client Identifier (the device id through the gateway), a refusing
CONNACK's properties (`clients`); the takeover DISCONNECT (Mosquitto 2.0.11 sends none)
in `test_will_session`; Message Expiry Interval countdowns in `test_request_response`.

Cases:

* test_will_session: Will Delay Interval (DISCONNECT 0x04, resumed within the delay, normal
  DISCONNECT, session expiry before the delay); Session Expiry Interval (resume with
  clean_start=False and queued QoS 1, expiry 0 on DISCONNECT, expiry by time); takeover
  (the old will only when a clean start ends the session).
* test_retained: an empty retained PUBLISH clears; four clearing PUBLISHes and DISCONNECT
  in one write, then an immediate close (after the CONNACK, and with the CONNECT too).
* test_qos2: PUBREC/PUBREL/PUBCOMP both ways with paho, QoS downgrade, a DUP PUBLISH
  before PUBREL delivered once, PUBLISH and PUBREL resent to the device after reconnects.
* test_receive_maximum: the client's (deliveries held until PUBACK) and the broker's
  (CONNACK value, PUBREC 0x97 beyond it).
* test_topic_alias: client-to-broker aliases (set, use, remap, after a plain PUBLISH),
  unknown alias 0x82, alias above the maximum 0x94; broker-to-client Topic Alias Maximum
  (Mosquitto 2.0.11 sends no aliases: full topics arrive).
* test_shared_subscription_ids: $share/group/filter delivers each message to one member
  (aiomqtt); Subscription Identifiers per matching subscription.
* test_request_response: Response Topic, Correlation Data, User Properties, Content Type,
  Payload Format Indicator, Message Expiry (paho to mosquitto_sub, mosquitto_pub to
  paho); retained messages expiring.
* test_connack: a broker with limits (Server Keep Alive, Maximum QoS, Retain Available,
  its own Maximum Packet Size) and what it refuses; assigned client id; an Authentication
  Method refused with 0x8C.
"""
