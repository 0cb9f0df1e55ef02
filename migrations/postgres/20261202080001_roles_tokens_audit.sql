-- Users get a role. Every user that existed before roles was an administrator.
ALTER TABLE users ADD COLUMN role TEXT COLLATE "C" NOT NULL DEFAULT 'admin';

-- Long-lived API tokens for automation: only the SHA-256 of the token is stored, the token itself
-- is shown once. A token acts with its own role, never above its owner's current role, and goes
-- with its owner.
CREATE TABLE api_tokens (
    id            TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    name          TEXT COLLATE "C" NOT NULL,
    token_digest  TEXT COLLATE "C" NOT NULL UNIQUE,
    user_name     TEXT COLLATE "C" NOT NULL REFERENCES users (user_name) ON DELETE CASCADE,
    role          TEXT COLLATE "C" NOT NULL,
    created_at    TEXT COLLATE "C" NOT NULL,
    expires_at    TEXT COLLATE "C" NOT NULL,
    last_used_at  TEXT COLLATE "C"
);
CREATE INDEX api_tokens_by_user ON api_tokens (user_name);

-- The audit log: who did what, when, from where. occurred_at is fixed-width RFC 3339 UTC, so text
-- order is time order; (occurred_at, id) is the keyset the API pages by, newest first. The actor
-- is a plain name, not a reference: the history outlives the user. details is a JSON object
-- (a diff with secrets redacted, counts of a summary row, ...).
CREATE TABLE audit_log (
    id              TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    occurred_at     TEXT COLLATE "C" NOT NULL,
    actor           TEXT COLLATE "C",
    credential      TEXT COLLATE "C",
    source_address  TEXT COLLATE "C",
    action          TEXT COLLATE "C" NOT NULL,
    target_kind     TEXT COLLATE "C",
    target_key      TEXT COLLATE "C",
    outcome         TEXT COLLATE "C" NOT NULL,
    details         TEXT COLLATE "C" NOT NULL
);
CREATE INDEX audit_log_by_time ON audit_log (occurred_at, id);
CREATE INDEX audit_log_by_actor ON audit_log (actor, occurred_at, id);
