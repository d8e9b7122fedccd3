"""Sessions that must not be cut: each measures MQTT round trips to itself, continuously.

``bench/storm.py``'s HAProxy phase holds these on the instance that is *not* restarted and
reads the round-trip time they see while the other instance's devices storm back in (the
other instances' view of a restart). One forked process, one asyncio loop, one coroutine
per session (a hundred sessions at a few messages a second each: no need for the epoll
machinery of ``reconnect.py``).

A session: TLS with its own device certificate, MQTT 3.1.1 CONNECT (CONNACK 0), SUBSCRIBE
to ``devices/{id}/rtt`` at QoS 1 (inside the built-in policy's ``devices/{device_id}/#``),
then it PUBLISHes QoS 1 to that topic every ``interval`` seconds (jittered) whatever came
back: a fixed send rate, so a stall shows as long round trips of every message sent
during it rather than as fewer samples (no coordinated omission). The payload is the
message's sequence number; the round trip is from the PUBLISH written to the same message
delivered back (the gateway, the upstream broker, the gateway again). Deliveries are
acknowledged (PUBACK).

A session that ends (EOF, reset, TLS error, DISCONNECT from the server) is *cut*; it does
not reconnect. A message not delivered back ``LOSS_AFTER`` seconds after it was sent is
*lost* (counted at the end, after publishing stops and the grace has passed).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import random
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from gateway.mqtt import (
    NEED_DATA,
    Connack,
    Connect,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    decode,
    encode,
)

if TYPE_CHECKING:
    from reconnect import Member

LOSS_AFTER = 10.0
"""A message not back this many seconds after it was sent is lost."""
VERSION = 4


@dataclass
class UncutReport:
    """What the sessions saw: round-trip samples by send time, cuts, losses."""

    sessions: int = 0  # connected and subscribed
    cut: int = 0  # sessions ended by the other side (or an error) after that
    cut_reasons: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    received: int = 0
    lost: int = 0  # sent more than LOSS_AFTER ago and never delivered back
    in_flight: int = 0  # sent less than LOSS_AFTER ago, not back yet
    duplicates: int = 0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (time.time() sent, rtt)
    cpu: float = 0.0


class _Session:
    def __init__(self, member: Member, host: str, port: int, report: UncutReport) -> None:
        self.member, self.host, self.port, self.report = member, host, port, report
        self.topic = f"devices/{member.client_id}/rtt"
        self.sent: dict[int, tuple[float, float]] = {}  # seq -> (monotonic, time.time())
        self.seq = 0
        self.packet_id = 0
        self.writer: asyncio.StreamWriter | None = None
        self.buf = b""
        self.alive = False

    def _next_id(self) -> int:
        self.packet_id = self.packet_id % 65535 + 1
        return self.packet_id

    async def open(self) -> asyncio.StreamReader:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # as reconnect.py: the server's work is the same
        context.load_cert_chain(self.member.cert, self.member.key)
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=context, local_addr=(self.member.source, 0)
        )
        self.writer = writer
        writer.write(
            encode(
                Connect(protocol_level=VERSION, client_id=self.member.client_id, keepalive=600),
                version=VERSION,
            )
        )
        connack = await self._read(reader)
        if not isinstance(connack, Connack) or connack.reason_code != 0:
            raise ConnectionError(f"{self.member.client_id}: not admitted: {connack}")
        writer.write(
            encode(
                Subscribe(
                    packet_id=self._next_id(),
                    subscriptions=(Subscription(topic_filter=self.topic, qos=1),),
                ),
                version=VERSION,
            )
        )
        suback = await self._read(reader)
        if not isinstance(suback, Suback) or suback.reason_codes[0] > 2:
            raise ConnectionError(f"{self.member.client_id}: subscription refused: {suback}")
        self.alive = True
        return reader

    async def _read(self, reader: asyncio.StreamReader) -> Any:
        # bytes, not a bytearray: a decoded PUBLISH's payload is a view into the buffer.
        while True:
            result = decode(self.buf, version=VERSION)
            if result is not NEED_DATA:
                packet, used = result
                self.buf = self.buf[used:]
                return packet
            data = await reader.read(4096)
            if not data:
                raise ConnectionError("EOF")
            self.buf += data

    async def receive(self, reader: asyncio.StreamReader) -> None:
        assert self.writer is not None
        report = self.report
        try:
            while True:
                packet = await self._read(reader)
                if not isinstance(packet, Publish):
                    continue  # PUBACKs of our own messages, PINGRESP
                now = time.monotonic()
                if packet.qos and packet.packet_id is not None:
                    self.writer.write(encode(Puback(packet_id=packet.packet_id), version=VERSION))
                sent = self.sent.pop(int(bytes(packet.payload)), None)
                if sent is None:
                    report.duplicates += 1
                    continue
                report.received += 1
                report.samples.append((sent[1], now - sent[0]))
        except Exception as exc:  # any end, a decoding error included, is a cut: counted
            if self.alive:
                self.alive = False
                report.cut += 1
                report.cut_reasons[str(exc) or exc.__class__.__name__] += 1

    async def publish(self, interval: float, publishing: asyncio.Event) -> None:
        assert self.writer is not None
        await asyncio.sleep(random.uniform(0, interval))
        while self.alive and publishing.is_set():
            self.seq += 1
            self.sent[self.seq] = (time.monotonic(), time.time())
            self.report.sent += 1
            packet = Publish(
                topic=self.topic, payload=str(self.seq).encode(), qos=1, packet_id=self._next_id()
            )
            self.writer.write(encode(packet, version=VERSION))
            await asyncio.sleep(interval * random.uniform(0.5, 1.5))

    def overdue(self, now: float) -> tuple[int, int]:
        """(lost, in flight) among the messages not back yet."""
        lost = sum(1 for start, _ in self.sent.values() if now - start > LOSS_AFTER)
        return lost, len(self.sent) - lost


async def _serve(
    members: list[Member], host: str, port: int, interval: float, pipe: Connection
) -> None:
    report = UncutReport()
    sessions = [_Session(m, host, port, report) for m in members]
    opened = await asyncio.gather(*(s.open() for s in sessions), return_exceptions=True)
    failed = [str(r) for r in opened if isinstance(r, BaseException)]
    if failed:
        pipe.send(f"{len(failed)} of {len(sessions)} sessions failed to open: {failed[0]}")
        return
    report.sessions = len(sessions)
    publishing = asyncio.Event()
    publishing.set()
    tasks = [
        asyncio.create_task(s.receive(opened_s))  # type: ignore[arg-type]
        for s, opened_s in zip(sessions, opened, strict=True)
    ] + [asyncio.create_task(s.publish(interval, publishing)) for s in sessions]
    commands: asyncio.Queue[Any] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_reader(pipe.fileno(), lambda: commands.put_nowait(pipe.recv()))
    cpu_mark = time.process_time()
    pipe.send("ready")

    def snapshot() -> UncutReport:
        now = time.monotonic()
        overdue = [s.overdue(now) for s in sessions]
        report.lost = sum(o[0] for o in overdue)
        report.in_flight = sum(o[1] for o in overdue)
        report.cpu = time.process_time() - cpu_mark
        return report

    while True:
        command = await commands.get()
        if command == "report":
            pipe.send(snapshot())
        elif command == "finish":  # stop publishing; wait for what is in flight (bounded)
            publishing.clear()
            for _ in range(int(LOSS_AFTER * 10) + 5):  # bounded: LOSS_AFTER and a bit
                if not any(s.sent for s in sessions if s.alive):
                    break
                await asyncio.sleep(0.1)
            for s in sessions:  # what is still out now is lost, however recent
                for key in list(s.sent):
                    start, at = s.sent[key]
                    s.sent[key] = (start - LOSS_AFTER - 1, at)
            pipe.send(snapshot())
        elif command == "stop":
            break
    loop.remove_reader(pipe.fileno())
    for s in sessions:
        s.alive = False  # closing is ours, not a cut
        if s.writer is not None:
            s.writer.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _main(members: list[Member], host: str, port: int, interval: float, pipe: Connection) -> None:
    asyncio.run(_serve(members, host, port, interval, pipe))


class Uncut:
    """The sessions in their own process: ``start`` (all connected and subscribed),
    ``report`` (a snapshot), ``finish`` (stop publishing, final count), ``close``."""

    def __init__(
        self, members: list[Member], port: int, *, host: str = "127.0.0.1", interval: float = 0.5
    ) -> None:
        self.members, self.host, self.port, self.interval = members, host, port, interval
        self.pipe: Connection | None = None
        self.process: Any = None

    def start(self, timeout: float = 120) -> None:
        ctx = mp.get_context("fork")
        ours, theirs = ctx.Pipe()
        self.pipe = ours
        self.process = ctx.Process(
            target=_main,
            args=(self.members, self.host, self.port, self.interval, theirs),
            daemon=True,
        )
        self.process.start()
        if not ours.poll(timeout):
            raise TimeoutError(f"uncut sessions not up after {timeout:.0f}s")
        answer = ours.recv()
        if answer != "ready":
            raise ConnectionError(f"uncut sessions: {answer}")

    def _ask(self, command: str, timeout: float) -> UncutReport:
        assert self.pipe is not None
        self.pipe.send(command)
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"uncut sessions did not answer {command!r}")
        report: UncutReport = self.pipe.recv()
        return report

    def report(self) -> UncutReport:
        return self._ask("report", 30)

    def finish(self) -> UncutReport:
        return self._ask("finish", LOSS_AFTER + 30)

    def close(self) -> None:
        if self.pipe is not None:
            with contextlib.suppress(OSError):
                self.pipe.send("stop")
        if self.process is not None:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()


def window(report: UncutReport, begin: float, end: float) -> list[float]:
    """Round trips (seconds) of the messages sent in [begin, end) (``time.time()``)."""
    return [rtt for at, rtt in report.samples if begin <= at < end]
