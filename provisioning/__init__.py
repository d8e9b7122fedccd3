"""devicegate's control plane and the ``devicegate`` command.

The top-level modules are the registry every part shares: `db` (connections), `errors`
(typed refusals), `tokens` (secrets of bootstrap tokens and admin keys), `store` (all SQL),
`eventlog` (appending chained events in the caller's transaction), `admin` (operator
actions) and `telemetry`; they import only ``schemas``. Above them: ``pki/``,
``enrollment/``, ``audit/``, then the surfaces ``http/``, ``console/``, ``commands/`` and
``demo/``; ``agent/`` is what runs on a device. Provisioning may import ``gateway`` in one
place only, ``commands/serve.py``, so that one binary can start the data plane; it never
shares state with it except through PostgreSQL. The lower layers never import the surfaces
(tests/foundation/test_import_boundaries.py).
"""
