"""Devices that hold mTLS MQTT sessions and reconnect with jittered exponential backoff.

The load generator of ``bench/storm.py`` (and of its test, tests/gateway/test_storm.py).
One process holds many devices in one ``epoll`` loop over non-blocking sockets whose TLS
OpenSSL drives directly (``SSLSocket``: no event loop, no per-connection coroutine), as
``bench/mqtt_gateway.py``'s handshake generator does: on a 2-core machine the generator
competes with the servers for the CPU. Each device has its own certificate and
``SSLContext`` (Python resumes a session only through the context that made it).

A device's life: connect (TCP, TLS with its certificate, MQTT 3.1.1 CONNECT, CONNACK 0),
hold the session; when the server cuts it, wait ``uniform(0, base)`` and connect again;
each failed attempt (refused, reset, TLS alert, CONNACK != 0, nothing within
`ATTEMPT_TIMEOUT`) doubles the window, up to ``cap`` ("full jitter", as a fleet's devices
should back off). With ``resume`` on, an attempt offers the TLS session (ticket) of the
device's last connection.

The parent drives a `Fleet` (one process per group of devices) with commands over a pipe
and gets counters back: devices held, successful connects (with connect time and whether
the session was resumed, time from the cut to being back), failures by reason, and the
process's CPU time.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import math
import multiprocessing as mp
import random
import resource
import select
import socket
import ssl
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

ATTEMPT_TIMEOUT = 10.0
"""An attempt without CONNACK after this long fails (``timeout``)."""


@dataclass(frozen=True)
class Member:
    """One device: its files, its client id, the loopback address it connects from."""

    cert: str
    key: str
    client_id: str
    source: str = "127.0.0.1"


@dataclass
class Report:
    """What one process saw since the last ``reset``."""

    held: int = 0
    connects: int = 0
    resumed: int = 0
    connect_times: list[float] = field(default_factory=list)  # attempt start -> CONNACK
    back_times: list[float] = field(default_factory=list)  # cut -> CONNACK
    last_back: float = 0.0  # time.time() of the last CONNACK
    failures: Counter[str] = field(default_factory=Counter)
    attempts_max: int = 0  # most attempts one device needed to get back
    cpu: float = 0.0


def _connect_frame(client_id: str, keepalive: int = 600) -> bytes:
    def text(s: str) -> bytes:
        b = s.encode()
        return struct.pack("!H", len(b)) + b

    body = text("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + text(client_id)
    return b"\x10" + bytes([len(body)]) + body  # client ids here keep it under 128 bytes


_WAIT, _TLS, _CONNACK, _HELD = range(4)


class _Device:
    __slots__ = (
        "attempts", "buf", "connect", "context", "cut_at", "index", "member", "session",
        "sock", "started", "state",
    )  # fmt: skip

    def __init__(self, index: int, member: Member) -> None:
        self.index = index
        self.member = member
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the servers' work is the same either way
        context.load_cert_chain(member.cert, member.key)
        self.context = context
        self.connect = _connect_frame(member.client_id)
        self.session: ssl.SSLSession | None = None
        self.sock: ssl.SSLSocket | None = None
        self.state = _WAIT
        self.buf = b""
        self.started = 0.0
        self.cut_at = 0.0
        self.attempts = 0


class _Loop:
    def __init__(self, members: list[Member], pipe: Connection) -> None:
        self.devices = [_Device(i, m) for i, m in enumerate(members)]
        self.pipe = pipe
        self.poller = select.epoll()
        self.by_fd: dict[int, _Device] = {}
        self.due: list[tuple[float, int]] = []  # (monotonic time, device index)
        self.port = 0
        self.resume = False
        self.base = 1.0
        self.cap = 30.0
        self.report = Report()
        self.cpu_mark = time.process_time()
        self.held = 0

    # --- attempts ---

    def _start(self, index: int) -> None:
        device = self.devices[index]
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.bind((device.member.source, 0))
        session = device.session if self.resume else None
        sock = device.context.wrap_socket(raw, do_handshake_on_connect=False, session=session)
        device.sock, device.state, device.buf = sock, _TLS, b""
        device.started = time.monotonic()
        device.attempts += 1
        code = sock.connect_ex(("127.0.0.1", self.port))
        if code not in (0, errno.EINPROGRESS):
            self._fail(device, errno.errorcode.get(code, str(code)))
            return
        self.by_fd[sock.fileno()] = device
        self.poller.register(sock.fileno(), select.EPOLLOUT)

    def _close(self, device: _Device) -> None:
        sock = device.sock
        if sock is None:
            return
        with contextlib.suppress(OSError, ValueError, KeyError):
            self.poller.unregister(sock.fileno())
            del self.by_fd[sock.fileno()]
        sock.close()
        device.sock = None

    def _later(self, device: _Device, window: float) -> None:
        device.state = _WAIT
        heapq.heappush(self.due, (time.monotonic() + random.uniform(0, window), device.index))

    def _fail(self, device: _Device, reason: str) -> None:
        self._close(device)
        self.report.failures[reason] += 1
        self._later(device, min(self.cap, self.base * 2 ** min(device.attempts, 16)))

    def _cut(self, device: _Device) -> None:
        self._close(device)
        self.held -= 1
        device.cut_at = time.monotonic()
        device.attempts = 0
        self._later(device, self.base)

    def _step(self, device: _Device, events: int) -> None:
        sock = device.sock
        assert sock is not None
        try:
            if device.state == _TLS:
                if events & (select.EPOLLERR | select.EPOLLHUP) and not events & select.EPOLLIN:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    self._fail(device, errno.errorcode.get(code, "hangup"))
                    return
                sock.do_handshake()
                sock.send(device.connect)
                device.state = _CONNACK
                self.poller.modify(sock.fileno(), select.EPOLLIN)
            data = sock.recv(256)
        except ssl.SSLWantReadError:
            self.poller.modify(sock.fileno(), select.EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self.poller.modify(sock.fileno(), select.EPOLLOUT)
            return
        except ssl.SSLError as exc:
            if device.state == _HELD:
                self._cut(device)
            else:
                self._fail(device, f"tls:{exc.reason or exc.__class__.__name__}")
            return
        except OSError as exc:
            if device.state == _HELD:
                self._cut(device)
            elif exc.errno == errno.ENOTCONN:  # the TCP connect is still under way
                self.poller.modify(sock.fileno(), select.EPOLLOUT)
            else:
                self._fail(device, errno.errorcode.get(exc.errno or 0, "oserror"))
            return
        if device.state == _HELD:
            if not data:
                self._cut(device)
            return  # anything else (none expected) is ignored
        if not data:
            self._fail(device, "closed before CONNACK")
            return
        device.buf += data
        if len(device.buf) < 4:
            return
        if device.buf[3] != 0:
            self._fail(device, f"CONNACK {device.buf[3]}")
            return
        now = time.monotonic()
        report = self.report
        report.connects += 1
        report.connect_times.append(now - device.started)
        if device.cut_at:
            report.back_times.append(now - device.cut_at)
            device.cut_at = 0.0
        report.last_back = time.time()
        report.attempts_max = max(report.attempts_max, device.attempts)
        if sock.session_reused:
            report.resumed += 1
        device.session = sock.session
        device.state = _HELD
        self.held += 1

    # --- the loop ---

    def _command(self, command: tuple[Any, ...]) -> bool:
        name = command[0]
        if name == "connect":  # ("connect", port, resume, base, cap): hold every device
            _, self.port, self.resume, self.base, self.cap = command
            now = time.monotonic()  # each device within the first backoff window
            for index in range(len(self.devices)):
                heapq.heappush(self.due, (now + random.uniform(0, self.base), index))
        elif name == "target":  # ("target", port, resume): where reconnects go from now on
            _, self.port, self.resume = command
        elif name == "reset":
            self.report = Report()
            self.cpu_mark = time.process_time()
        elif name == "report":
            self.report.held = self.held
            self.report.cpu = time.process_time() - self.cpu_mark
            self.pipe.send(self.report)
        elif name == "held":
            self.pipe.send(self.held)
        elif name == "drop":  # close every session (the server sees the clients go)
            for device in self.devices:
                if device.state == _HELD:
                    self._close(device)
                    device.state = _WAIT
                    self.held -= 1
            self.due.clear()
            self.pipe.send(self.held)
        elif name == "stop":
            return False
        return True

    def run(self) -> None:
        swept = time.monotonic()
        while True:
            now = time.monotonic()
            timeout = 0.05
            if self.due:
                timeout = max(0.0, min(timeout, self.due[0][0] - now))
            for fd, events in self.poller.poll(timeout):
                device = self.by_fd.get(fd)
                if device is not None:
                    self._step(device, events)
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                _, index = heapq.heappop(self.due)
                if self.devices[index].state == _WAIT:
                    self._start(index)
            if now - swept > 0.5:
                swept = now
                for device in list(self.by_fd.values()):
                    if device.state in (_TLS, _CONNACK) and now - device.started > ATTEMPT_TIMEOUT:
                        self._fail(device, "timeout")
            while self.pipe.poll():
                if not self._command(self.pipe.recv()):
                    return


def _main(members: list[Member], pipe: Connection) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = _Loop(members, pipe)
    pipe.send("ready")
    loop.run()


class Fleet:
    """``procs`` processes holding ``members`` between them (round robin)."""

    def __init__(self, members: list[Member], procs: int = 2) -> None:
        ctx = mp.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs = []
        for p in range(procs):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_main, args=(members[p::procs], theirs), daemon=True)
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)
        for pipe in self.pipes:
            if not pipe.poll(120) or pipe.recv() != "ready":
                raise RuntimeError("a load process did not start")
        self.size = len(members)

    def send(self, *command: Any) -> None:
        for pipe in self.pipes:
            pipe.send(command)

    def ask(self, *command: Any) -> list[Any]:
        self.send(*command)
        return [pipe.recv() for pipe in self.pipes]

    def held(self) -> int:
        return sum(self.ask("held"))

    def connect(self, port: int, *, resume: bool, base: float, cap: float) -> None:
        self.send("connect", port, resume, base, cap)

    def wait_held(self, count: int, timeout: float) -> float:
        """Seconds until ``count`` devices hold sessions (raises TimeoutError)."""
        start = time.monotonic()
        while (held := self.held()) < count:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{held} of {count} devices back after {timeout:.0f}s")
            time.sleep(0.05)
        return time.monotonic() - start

    def report(self) -> Report:
        total = Report()
        for part in self.ask("report"):
            total.held += part.held
            total.connects += part.connects
            total.resumed += part.resumed
            total.connect_times += part.connect_times
            total.back_times += part.back_times
            total.last_back = max(total.last_back, part.last_back)
            total.failures += part.failures
            total.attempts_max = max(total.attempts_max, part.attempts_max)
            total.cpu += part.cpu
        return total

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("stop")
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN if no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
