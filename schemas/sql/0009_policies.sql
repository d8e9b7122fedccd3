-- Policies in the database (issue 23): versioned policy documents, their attachments to
-- fleets, groups and devices, device groups, device attributes, and default attributes on
-- fleets and bootstrap tokens that a new device receives when its row is created.
--
-- One global policy version (`policy_version`, a single row) numbers the state gateways
-- load (schemas/policy_store.py). Every transaction that changes any of these tables bumps
-- it once and queues pg_notify('devicegate_policy', '<version>'): the deferred triggers
-- below do it at commit, whoever writes (provisioning bumps explicitly earlier, to name the
-- version in its auth event; the trigger then sees the transaction already counted). The
-- row lock on `policy_version` is held until commit, so versions are committed in order and
-- a REPEATABLE READ snapshot that reads the row reads the state of exactly that version.
-- Lock order: provisioning takes it after the event chain head (the deferred trigger runs
-- at commit, after every event append; the admin path calls the bump after locking the
-- head), never before.

CREATE TABLE policy_version (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version    bigint NOT NULL CHECK (version >= 0),
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO policy_version (singleton, version) VALUES (true, 0);

-- Every revision of every policy; the newest revision of a name is the policy. `version`
-- is the global policy version whose transaction wrote it. A NULL document is a deletion.
CREATE TABLE policies (
    name        text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    version     bigint NOT NULL,
    document    jsonb CHECK (document IS NULL OR pg_column_size(document) <= 262144),
    sha256      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX policies_version_idx ON policies (version);

CREATE TABLE device_groups (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    description text NOT NULL DEFAULT '' CHECK (length(description) <= 500),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE group_members (
    group_name  text NOT NULL REFERENCES device_groups (name) ON DELETE CASCADE,
    device_id   text NOT NULL REFERENCES devices (device_id),
    added_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, device_id)
);
CREATE INDEX group_members_device_idx ON group_members (device_id);

-- Which policy applies to whom. A fleet target need not have a fleets row yet (a policy
-- may be attached before its first token); a group or device target must exist, which the
-- writer checks (one table for three kinds cannot carry the foreign keys).
CREATE TABLE policy_attachments (
    policy_name text NOT NULL,
    target_kind text NOT NULL CHECK (target_kind IN ('fleet', 'group', 'device')),
    target      text NOT NULL CHECK (length(target) BETWEEN 1 AND 128),
    created_at  timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    PRIMARY KEY (policy_name, target_kind, target)
);
CREATE INDEX policy_attachments_target_idx ON policy_attachments (target_kind, target);

-- Free key/value attributes of a device; `model`, `site` and `line` are keys like any other
-- (their values are checked more strictly by the writer). Limits are enforced with clear
-- messages by the writer; the checks here are the backstop.
CREATE TABLE device_attributes (
    device_id   text NOT NULL REFERENCES devices (device_id),
    key         text NOT NULL CHECK (key ~ '^[a-z][a-z0-9_]{0,62}$'),
    value       text NOT NULL CHECK (length(value) BETWEEN 1 AND 256),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, key)
);

ALTER TABLE fleets ADD COLUMN default_attributes jsonb NOT NULL DEFAULT '{}'
    CHECK (jsonb_typeof(default_attributes) = 'object');
ALTER TABLE bootstrap_tokens ADD COLUMN default_attributes jsonb NOT NULL DEFAULT '{}'
    CHECK (jsonb_typeof(default_attributes) = 'object');

-- Bump the global version once per transaction and queue the notification (PostgreSQL
-- folds identical notifications of one transaction into one). Returns the new version.
-- A transaction-local setting remembers that this transaction has bumped already; a
-- rollback to a savepoint undoes the setting together with the UPDATE.
CREATE FUNCTION devicegate_policy_bump() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    bumped text := current_setting('devicegate.policy_version', true);
    v bigint;
BEGIN
    IF bumped IS NOT NULL AND bumped <> '' THEN
        RETURN bumped::bigint;
    END IF;
    UPDATE policy_version SET version = version + 1, changed_at = now()
        WHERE singleton RETURNING version INTO v;
    PERFORM set_config('devicegate.policy_version', v::text, true);
    PERFORM pg_notify('devicegate_policy', v::text);
    RETURN v;
END $$;

CREATE FUNCTION devicegate_policy_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM devicegate_policy_bump();
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER policies_changed AFTER INSERT OR UPDATE OR DELETE ON policies
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION devicegate_policy_changed();
CREATE CONSTRAINT TRIGGER policy_attachments_changed
    AFTER INSERT OR UPDATE OR DELETE ON policy_attachments
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION devicegate_policy_changed();
CREATE CONSTRAINT TRIGGER device_groups_changed AFTER INSERT OR UPDATE OR DELETE ON device_groups
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION devicegate_policy_changed();
CREATE CONSTRAINT TRIGGER group_members_changed AFTER INSERT OR UPDATE OR DELETE ON group_members
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION devicegate_policy_changed();
CREATE CONSTRAINT TRIGGER device_attributes_changed
    AFTER INSERT OR UPDATE OR DELETE ON device_attributes
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION devicegate_policy_changed();

-- A new device row receives its fleet's default attributes, overlaid by its token's.
-- Every enrollment path inserts the row (one statement, or a merged batch statement), so
-- the defaults are applied there and nowhere else.
CREATE FUNCTION devicegate_device_default_attributes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO device_attributes (device_id, key, value)
    SELECT NEW.device_id, d.key, d.value
    FROM jsonb_each_text(
        coalesce((SELECT default_attributes FROM fleets WHERE name = NEW.fleet), '{}')
        || coalesce((SELECT default_attributes FROM bootstrap_tokens WHERE id = NEW.token_id),
                    '{}')
    ) AS d(key, value)
    ON CONFLICT (device_id, key) DO UPDATE SET value = EXCLUDED.value, updated_at = now();
    RETURN NULL;
END $$;

CREATE TRIGGER devices_default_attributes AFTER INSERT ON devices
    FOR EACH ROW EXECUTE FUNCTION devicegate_device_default_attributes();
