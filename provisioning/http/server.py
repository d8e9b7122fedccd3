"""The provisioning HTTPS listener: TLS context, routes, and a graceful lifecycle.

Client certificates: the listener requests one (``CERT_OPTIONAL``) and, with the TLS
accelerator (``gateway._tlsext``), lets any chain through the handshake
(``accept_any_peer_certificate``; the client still proves possession of the leaf's key in
CertificateVerify). Every route that uses the certificate verifies it itself: renewal (and
EST ``simplereenroll``) checks that the issuing CA signed it and that it is a row of ours,
then decides dates, revocation and supersession on that row (a device whose certificate
expired while it was offline may still renew within the grace window); IDevID enrollment
runs the fleet's own path validation (`provisioning.enrollment.idevid`). OpenSSL's
verification could not do the latter: the trusted manufacturers change at run time and per
fleet, and a refused IDevID must reach the service to be recorded with its reason. No other
route trusts the client certificate. Without the accelerator OpenSSL verifies the chain
against ``chain.pem`` with ``X509_V_FLAG_NO_CHECK_TIME`` (signatures and CA constraints,
not dates), and IDevIDs are refused at the handshake.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
from aiohttp import web

from provisioning import console
from provisioning.audit.checkpointer import checkpoint_once, run_checkpoints
from provisioning.db import create_pool
from provisioning.enrollment.service import ProvisioningService
from provisioning.http import api, est, policy_api, ratelimit
from provisioning.http.common import CRL, SERVICE, problems_middleware
from provisioning.http.openapi import document
from provisioning.pki.ca import crl_url_of
from provisioning.pki.crl import CrlCache
from provisioning.pki.directory import (
    CA_KEYS,
    CHAIN,
    SERVER_CERT,
    SERVER_KEY,
    load_ca,
    load_certificate,
)
from provisioning.pki.signer import SignerUnavailable
from provisioning.telemetry import ProvisioningMetrics, telemetry_middleware
from schemas.checkpoints import AuditSigner, CheckpointError, checkpoint_file
from schemas.logs import configure_logging
from schemas.migrate import pending
from schemas.settings import Settings
from schemas.telemetry import Telemetry, serve_metrics, setup_telemetry

log = logging.getLogger("devicegate.provisioning")

_tlsext: ModuleType | None
try:  # the C accelerator: accept any client chain, verified per route (module docstring)
    from gateway import _tlsext
except ImportError:  # pragma: no cover
    _tlsext = None

X509_V_FLAG_NO_CHECK_TIME = 0x200000
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # TLS 1.3 suites are all AEAD already


def server_ssl_context(pki_dir: Path) -> ssl.SSLContext:
    """TLS 1.2+ with ECDHE AEAD ciphers and an optional client certificate, verified by
    the route that uses it (see the module docstring)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(pki_dir / SERVER_CERT, pki_dir / SERVER_KEY)
    context.load_verify_locations(cafile=str(pki_dir / CHAIN))
    context.verify_mode = ssl.CERT_OPTIONAL
    context.verify_flags = ssl.VerifyFlags(context.verify_flags | X509_V_FLAG_NO_CHECK_TIME)
    # No session tickets (as the gateway): devices connect once per enrollment or renewal
    # and never resume, so TLS 1.3 tickets would be two encryptions and writes per
    # connection for nothing, and ticket keys are secrets that outlive the session.
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    if _tlsext is not None:
        _tlsext.accept_any_peer_certificate(context)
        _tlsext.limit_client_chain(context)  # as the gateway's: 16 KiB, parsed only then
    else:  # pragma: no cover - built by `make .venv/.installed`
        log.warning("gateway._tlsext is not built: IDevID enrollment is off")
    return context


# On every response, API and console alike (the console adds its CSP and framing rules).
# The listener speaks only HTTPS, so HSTS costs nothing; no includeSubDomains, because the
# host name may be shared with other services. nosniff: a JSON or PEM body is never
# reinterpreted as a script by a browser.
BASE_HEADERS = {
    "Strict-Transport-Security": "max-age=31536000",
    "X-Content-Type-Options": "nosniff",
}


async def _base_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in BASE_HEADERS.items():
        response.headers.setdefault(name, value)


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


def build_app(
    service: ProvisioningService,
    *,
    telemetry: Telemetry | None = None,
    metrics: ProvisioningMetrics | None = None,
) -> web.Application:
    """The aiohttp application over a ready service.

    With ``telemetry``, every request gets a span and enrollments are counted in
    ``metrics`` (`provisioning.telemetry.telemetry_middleware`, outermost, so it sees the
    final status and problem reason).
    """
    middlewares: list[Any] = [problems_middleware]
    if telemetry is not None:
        middlewares.insert(0, telemetry_middleware(telemetry, metrics))
    app = web.Application(middlewares=middlewares, client_max_size=service.settings.max_body_bytes)
    app[SERVICE] = service
    app[CRL] = CrlCache(service.ca)
    app.on_response_prepare.append(_base_headers)
    app.add_routes(
        [
            web.post("/v1/enroll", api.enroll),
            web.post("/v1/renew", api.renew),
            web.get("/v1/crl", api.get_crl),
            web.get("/v1/tokens", api.list_tokens),
            web.post("/v1/tokens", api.create_token),
            web.get("/v1/tokens/{token_id}", api.get_token),
            web.post("/v1/tokens/{token_id}/revoke", api.revoke_token),
            web.get("/v1/devices", api.list_devices),
            web.get("/v1/devices/{device_id}", api.show_device),
            web.post(r"/v1/devices/{device_id}/{action:disable|enable|revoke}", api.device_action),
            web.get("/v1/certificates", api.list_certificates),
            web.post("/v1/certificates/{serial}/revoke", api.revoke_certificate),
            web.get("/v1/events", api.list_events),
            web.get("/.well-known/est/cacerts", est.cacerts),
            web.post("/.well-known/est/simpleenroll", est.simpleenroll),
            web.post("/.well-known/est/simplereenroll", est.simplereenroll),
            web.get("/openapi.json", _openapi),
            web.get("/healthz", api.healthz),
            web.get("/readyz", api.readyz),
            *policy_api.ROUTES,
        ]
    )
    console.setup(app)  # audit console under /console/ (provisioning/console)
    ratelimit.setup(app)  # failed token attempts (429); refusal summaries (refusal_budget)
    return app


async def _rollback_only(conn: Any) -> None:
    """Pool release hook. The service keeps no session state (no LISTEN, advisory locks,
    SET or cursors), so asyncpg's full reset query, a round trip on every release, is
    replaced by a rollback of a transaction left open, which should never happen."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def device_crl_url(settings: Settings) -> str | None:
    """The CRL distribution point of device certificates: ``<public_url>/v1/crl`` when
    ``DEVICEGATE_PUBLIC_URL`` is set, else the one `ca init` wrote into ``server.crt``."""
    if settings.crl_url is not None:
        return settings.crl_url
    url = crl_url_of(load_certificate(settings.pki_dir / SERVER_CERT))
    if url is None:
        log.warning(
            "DEVICEGATE_PUBLIC_URL is not set and %s names no CRL distribution point: "
            "device certificates will name none; set DEVICEGATE_PUBLIC_URL",
            settings.pki_dir / SERVER_CERT,
        )
    return url


async def open_service(settings: Settings, *, pool_size: int = 16) -> ProvisioningService:
    """Load the CA (needs the passphrase) and open the connection pool."""
    ca = load_ca(
        settings.pki_dir,
        settings.ca_passphrase_bytes(),
        crl_url=device_crl_url(settings),
        pin_file=settings.pkcs11_pin_file,
    )
    if (settings.pki_dir / CA_KEYS).exists():
        from provisioning.pki.pkcs11 import Pkcs11Signer  # python-pkcs11 only when used

        signer = ca.signer
        try:  # say so now; requests try the token again each time
            if isinstance(signer, Pkcs11Signer):
                await asyncio.to_thread(signer.key.check)
        except SignerUnavailable as exc:
            log.warning("%s; enrollment and renewal answer 503 until it can sign", exc)
    pool = await create_pool(
        settings.database_url, min_size=2, max_size=pool_size, reset=_rollback_only
    )
    return ProvisioningService(pool=pool, ca=ca, settings=settings)


async def serve(settings: Settings, *, listen: str | None = None) -> None:
    """Listen until SIGTERM or SIGINT, then stop accepting and finish in-flight requests."""
    host, _, port = (listen or settings.provisioning_listen).rpartition(":")
    configure_logging(settings.log_format, settings.log_level.upper())
    metrics_at = settings.metrics_host_port
    telemetry = setup_telemetry(
        service_name="devicegate-provisioning",
        instance_id=settings.instance_id,
        prometheus=metrics_at is not None,
    )
    pmetrics = ProvisioningMetrics(meter=telemetry.meter)
    try:
        service = await open_service(settings)
    except BaseException:
        telemetry.shutdown()
        raise
    async with service.pool.acquire() as conn:
        missing = await pending(conn)
    if missing:  # served anyway (a rolling upgrade migrates next), but said, and not ready
        log.error(
            "the database is not migrated (pending: %s): run `devicegate db migrate`; "
            "/readyz answers not ready until then",
            ", ".join(missing),
        )
    app = build_app(service, telemetry=telemetry, metrics=pmetrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    metrics_server: asyncio.Server | None = None
    refresher: asyncio.Task[None] | None = None
    checkpoints: asyncio.Task[None] | None = None
    try:
        signer: AuditSigner | None = AuditSigner.load(settings.pki_dir)
    except CheckpointError as exc:
        log.error("audit checkpoints are OFF: %s", exc)
        signer = None
    checkpoints_file = checkpoint_file(
        settings.checkpoint_dir, f"{settings.instance_id}/provisioning"
    )
    started = False  # a port that cannot be bound: no final checkpoint, just the error
    try:
        await runner.setup()
        site = web.TCPSite(
            runner,
            host.strip("[]"),
            int(port),
            ssl_context=server_ssl_context(settings.pki_dir),
            backlog=1024,
            shutdown_timeout=10.0,
        )
        await site.start()
        started = True
        # What start-up allocated (modules, the app, the CA, the pool) lives as long as the
        # process: keep it out of the collector's full passes, which requests trigger.
        gc.freeze()
        metrics_server = await _serve_metrics(telemetry, metrics_at)
        refresher = asyncio.create_task(
            pmetrics.run_expiring_refresher(service.pool), name="expiring-certificates"
        )
        if signer is not None:
            checkpoints = asyncio.create_task(
                run_checkpoints(
                    service.pool, signer, checkpoints_file,
                    interval=settings.checkpoint_interval.total_seconds(),
                ),
                name="audit-checkpoints",
            )  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"provisioning listening on https://{host}:{port}", file=sys.stderr, flush=True)
        await stop.wait()
        print("provisioning shutting down", file=sys.stderr, flush=True)
    finally:
        for task in (refresher, checkpoints):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if metrics_server is not None:
            metrics_server.close()
            await metrics_server.wait_closed()
        await runner.cleanup()
        if signer is not None and started:  # the requests are done: sign where the chain ends
            try:
                await checkpoint_once(service.pool, signer, checkpoints_file)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.error("no final audit checkpoint: %s", exc)
        await service.close()
        telemetry.shutdown()


async def _serve_metrics(telemetry: Telemetry, at: tuple[str, int] | None) -> asyncio.Server | None:
    """``GET /metrics`` on ``metrics_listen`` (None: off, or not bindable).

    A port that cannot be bound is logged as an error and the service runs without it
    (e.g. a gateway on the same host holds the default port).
    """
    if at is None:
        return None
    try:
        server = await serve_metrics(telemetry, *at)
    except OSError as exc:
        log.error(
            "metrics not served: cannot listen on %s:%s: %s (DEVICEGATE_METRICS_LISTEN; "
            "off turns it off)",
            at[0], at[1], exc.strerror or exc,
        )  # fmt: skip
        return None
    log.info("metrics on http://%s:%s/metrics", at[0], server.sockets[0].getsockname()[1])
    return server
