"""The gateway's auth event sink: chain each event, fsync it to a local spool with group
commit, ship it to PostgreSQL with COPY.

`sink` (`SpoolSink`: recording, the group commit, recovery, the ship loop), `interface`
(`EventSink`, `SinkStats`, `EventLogUnavailable`: all the sessions see), `group` (one group
commit), `spool` (segment files on disk), `shipping` (the SQL the sink speaks), `loss`
(events refused for lack of space), `codec` (canonical JSON, hash and COPY row; `_codec.c`
is its C accelerator). The package may import ``schemas`` and `gateway.database`, nothing
else of the gateway: sessions record through `EventSink` and never reach inside, so the
sink is tested, benchmarked and fuzzed on its own.
"""
