"""devicegate's data plane: the mutual-TLS MQTT bridge, one process per worker.

The top-level modules are the session and its surroundings: `connection` (the sans-IO
session state machine, with `admission` and `codes`), `bridge` (the only socket code),
`tls` (the memory-BIO pump), `proxy` (PROXY v2), `identity`, `policy` (pure),
`revocation` and `revocation_listen`, `takeover`, `limits`, `config`, `workers`,
`telemetry` and `spans`; ``mqtt/`` is the codec, ``events/`` the
durable auth event sink. The gateway may import ``schemas`` and itself, and never
``provisioning``: the data plane keeps running, and its code stays reviewable, without the
control plane (tests/foundation/test_import_boundaries.py fails on such an import).
"""
