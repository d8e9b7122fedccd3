"""Two sides per test module: a Mosquitto reached straight, and a gateway in front of a
second Mosquitto with the same configuration; devices registered for the gateway side."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import pytest

from schemas.policy import FleetPolicy, PolicyDocument
from tests.conftest import Pki
from tests.gateway import conftest as gateway_fixtures
from tests.gateway.clients import client_context
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.helpers import mosquitto

T = TypeVar("T")

FLEET = "mqtt5"
# The default topic policy (devices/{device_id}/#), and several clients per device: a case
# with a subscriber and a publisher uses "<device>" and "<device>-pub".
SUITE_POLICY = PolicyDocument(
    fleets={FLEET: FleetPolicy(client_ids=("{device_id}", "{device_id}-*"))}
)
# Both brokers alike. A low Receive Maximum, so flow control is visible in a few packets.
# A test module may set its own BROKER_CONFIG.
BROKER_CONFIG = "max_inflight_messages 3\n"


def _broker_config(request: pytest.FixtureRequest) -> str:
    config: str = getattr(request.module, "BROKER_CONFIG", BROKER_CONFIG)
    return config


# The gateway suite's device factory, registering devices with this module's `harness`.
make_device = gateway_fixtures.make_device


class SuiteHarness(Harness):
    policy = SUITE_POLICY


@dataclass(frozen=True)
class Side:
    """Where a client of one run connects: straight to Mosquitto, or through the gateway."""

    name: str
    port: int
    harness: Harness | None  # None: plain TCP straight to the broker

    @property
    def via_gateway(self) -> bool:
        return self.harness is not None

    def context(self, device: Device) -> ssl.SSLContext | None:
        """The device's mTLS context through the gateway; None straight to the broker."""
        return client_context(device, device.chain) if self.via_gateway else None

    def socket(self, device: Device) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        context = self.context(device)
        return context.wrap_socket(sock, server_hostname="localhost") if context else sock


@pytest.fixture(scope="module")
def harness(
    request: pytest.FixtureRequest,
    pki: Pki,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Harness]:
    """This module's gateway, in front of a Mosquitto of its own (overrides tests.gateway's
    session-wide one, so `make_device` registers devices with it)."""
    config = _broker_config(request)
    with mosquitto(tmp_path_factory.mktemp("behind"), extra_config=config) as port:
        h = SuiteHarness(pki, database_url, port)
        yield h
        h.close()


@pytest.fixture(scope="module")
def direct_port(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    config = _broker_config(request)
    with mosquitto(tmp_path_factory.mktemp("direct"), extra_config=config) as port:
        yield port


@pytest.fixture
def sides(harness: Harness, direct_port: int) -> tuple[Side, Side]:
    return Side("direct", direct_port, None), Side("gateway", harness.port, harness)


@pytest.fixture
def device(make_device: DeviceFactory) -> Device:
    """A registered device of the suite's fleet; both runs use its id as client id."""
    return make_device("m5", fleet=FLEET)


def differential(sides: tuple[Side, Side], scenario: Callable[[Side], T]) -> tuple[T, T]:
    """Run ``scenario`` straight to the broker and through the gateway: both transcripts.

    The runs use the same client ids and topics, on two brokers: nothing needs renaming,
    and they run side by side (the waits of the timed cases overlap).
    """
    with ThreadPoolExecutor(2, thread_name_prefix="mqtt5") as pool:
        direct, gateway = (pool.submit(scenario, side) for side in sides)
        return direct.result(timeout=60), gateway.result(timeout=60)


async def adifferential(
    sides: tuple[Side, Side], scenario: Callable[[Side], Awaitable[T]]
) -> tuple[T, T]:
    """`differential` for an async scenario (aiomqtt): both runs on the test's loop."""
    direct, gateway = await asyncio.gather(*(scenario(side) for side in sides))
    return direct, gateway
