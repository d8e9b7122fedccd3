"""Reading the auth event log: filters and cursor pages (`query`), record formats
(`format`), following live (`follow`), counting (`summary`), verifying the hash chains
(`verify`) and dropping old partitions (`prune`).

Shared by ``devicegate audit``, ``GET /v1/events`` and the console. May import ``schemas``
and the registry modules (`prune` records its own event); never ``http``, ``console``,
``commands`` or ``demo``: each reader takes a connection and returns values.
"""
