"""The gateway suite's fixtures (a scratch database, PKI, Mosquitto, registered devices)."""

from tests.gateway.conftest import harness, make_device

__all__ = ["harness", "make_device"]
