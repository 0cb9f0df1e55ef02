-- Users get a role. Every user that existed before roles was an administrator.
ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';

-- Long-lived API tokens for automation: only the SHA-256 of the token is stored, the token itself
-- is shown once. A token acts with its own role, never above its owner's current role, and goes
-- with its owner.
CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    token_digest  TEXT NOT NULL UNIQUE,
    user_name     TEXT NOT NULL REFERENCES users (user_name) ON DELETE CASCADE,
    role          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    expires_at    TEXT NOT NULL,
    last_used_at  TEXT
);
CREATE INDEX api_tokens_by_user ON api_tokens (user_name);

-- The audit log: who did what, when, from where. occurred_at is fixed-width RFC 3339 UTC, so text
-- order is time order; (occurred_at, id) is the keyset the API pages by, newest first. The actor
-- is a plain name, not a reference: the history outlives the user. details is a JSON object
-- (a diff with secrets redacted, counts of a summary row, ...).
CREATE TABLE audit_log (
    id              TEXT PRIMARY KEY NOT NULL,
    occurred_at     TEXT NOT NULL,
    actor           TEXT,
    credential      TEXT,
    source_address  TEXT,
    action          TEXT NOT NULL,
    target_kind     TEXT,
    target_key      TEXT,
    outcome         TEXT NOT NULL,
    details         TEXT NOT NULL
);
CREATE INDEX audit_log_by_time ON audit_log (occurred_at, id);
CREATE INDEX audit_log_by_actor ON audit_log (actor, occurred_at, id);
