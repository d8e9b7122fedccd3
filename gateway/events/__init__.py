"""The gateway's auth event sink: chain each event, fsync it to a local spool with group
commit, ship it to PostgreSQL with COPY.

`sink` (`SpoolSink`, the group commit and the ship loop), `interface` (`EventSink`,
`SinkStats`, `EventLogUnavailable`), `spool` (segment files on disk, sans-asyncio),
`shipping` (the SQL the sink speaks), `loss` (counting events refused for lack of space),
`codec` (canonical JSON, hash and COPY row; `_codec.c` is its C accelerator). The package
may import ``schemas`` and `gateway.database`, nothing else of the gateway: sessions record
through `EventSink` and never reach inside, so the sink can be tested, benchmarked and
fuzzed on its own.
"""
