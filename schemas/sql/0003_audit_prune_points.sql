-- Where retention cut each chain, so `audit verify` accepts a chain that starts after a
-- prune instead of reporting the dropped events as a gap. For each chain that had events
-- in the dropped partitions: the seq the chain now starts at, and the prev_hash that seq
-- must carry (the hash of the last dropped event).
CREATE TABLE audit_prune_points (
    prune_id   bigint NOT NULL REFERENCES audit_prunes (id),
    chain_id   text NOT NULL,
    first_seq  bigint NOT NULL,
    prev_hash  text NOT NULL,
    PRIMARY KEY (prune_id, chain_id)
);
CREATE INDEX audit_prune_points_chain_idx ON audit_prune_points (chain_id, first_seq);
