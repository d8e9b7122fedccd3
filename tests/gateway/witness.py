"""What the broker saw, observed directly on Mosquitto (never through the gateway): a paho
subscriber counting a device's messages and wills, and a private broker with a log file."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from gateway.mqtt.packets import Will
from tests.helpers import mosquitto


@dataclass(frozen=True)
class Broker:
    port: int
    log: Path

    def endings(self, client_id: str) -> list[str]:
        """How Mosquitto logged the end of each connection of ``client_id``, in order:
        ``disconnected`` after a DISCONNECT, ``closed its connection`` after a bare close,
        ``disconnected: <error>`` after a socket error (``Broken pipe``: it was reset)."""
        prefix = f"Client {client_id} "
        ends = []
        for line in self.log.read_text().splitlines():
            text = line.partition(": ")[2]
            if text.startswith(prefix) and ("disconnected" in text or "closed its" in text):
                ends.append(text.removeprefix(prefix).rstrip("."))
        return ends


@contextlib.contextmanager
def logged_mosquitto(directory: Path) -> Iterator[Broker]:
    """A private Mosquitto whose log (connections, disconnections, socket errors) is kept."""
    log = directory / "mosquitto.log"
    # Started as root, Mosquitto drops to its own user, which may not write here.
    user = "user root\n" if os.geteuid() == 0 else ""
    with mosquitto(directory, extra_config=f"log_dest file {log}\n{user}") as port:
        yield Broker(port, log)


def will_of(device_id: str) -> Will:
    """The will every test device sets: ``devices/<id>/will``, QoS 1."""
    return Will(topic=f"devices/{device_id}/will", payload=b"vanished", qos=1)


class Observer:
    """Subscribed on the broker to ``devices/<id>/#`` (QoS 2), recording what arrives."""

    def __init__(self, broker_port: int, device_id: str) -> None:
        self.port = broker_port
        self.device_id = device_id
        self._lock = threading.Lock()
        self._messages: list[tuple[str, bytes]] = []
        subscribed = threading.Event()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{device_id}", clean_session=True
        )
        client.on_message = lambda _c, _u, message: self._got(message.topic, message.payload)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_connect = lambda c, *_: c.subscribe(f"devices/{device_id}/#", qos=2)
        client.connect("127.0.0.1", broker_port)
        client.loop_start()
        if not subscribed.wait(5):
            client.loop_stop()
            raise AssertionError("the observer could not subscribe on the broker")
        self.client = client

    def _got(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._messages.append((topic, payload))

    def messages(self, topic: str | None = None) -> list[bytes]:
        """Payloads received on ``topic`` (every topic but the will's if None), in order."""
        will = will_of(self.device_id).topic
        with self._lock:
            return [
                payload
                for got, payload in self._messages
                if (got == topic if topic is not None else got != will)
            ]

    def topics(self) -> list[str]:
        """The topic of every message so far, the will's included, in arrival order."""
        with self._lock:
            return [topic for topic, _ in self._messages]

    def wills(self) -> int:
        return len(self.messages(will_of(self.device_id).topic))

    def wait(self, condition: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Whether ``condition`` holds within ``timeout`` seconds (polled)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def settle(self, quiet: float = 0.3) -> None:
        """Let every will the broker owes arrive: a connection with the device's client id
        takes over any upstream session still open (firing its will), then a quiet period."""
        probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device_id)
        probe.connect("127.0.0.1", self.port)
        probe.loop_start()
        try:
            assert self.wait(probe.is_connected, 5), "the probe could not connect"
            probe.disconnect()
        finally:
            probe.loop_stop()
        time.sleep(quiet)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
