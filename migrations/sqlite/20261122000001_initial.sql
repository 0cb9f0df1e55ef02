-- Definitions of every kind: the schema-validated document as the operator wrote it (minus
-- write-only secrets), plus the secret's stored form (Argon2id hash or sealed client password).
CREATE TABLE definitions (
    kind        TEXT NOT NULL,
    key         TEXT NOT NULL,
    document    TEXT NOT NULL,
    secret      TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);

-- The device registry. Access keys exist only as HMAC-SHA-256 digests under the server secret.
CREATE TABLE devices (
    device_id             TEXT PRIMARY KEY NOT NULL,
    name                  TEXT NOT NULL,
    device_type           TEXT NOT NULL,
    enabled               BOOLEAN NOT NULL,
    properties            TEXT NOT NULL,
    primary_key_digest    BLOB NOT NULL,
    secondary_key_digest  BLOB NOT NULL,
    created_at            TEXT NOT NULL,
    last_contact          TEXT,
    message_count         BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE users (
    user_name      TEXT PRIMARY KEY NOT NULL,
    password_hash  TEXT NOT NULL,
    created_at     TEXT NOT NULL
);

-- Admin sessions: only the SHA-256 of the bearer token is stored.
CREATE TABLE sessions (
    token_digest  TEXT PRIMARY KEY NOT NULL,
    user_name     TEXT NOT NULL REFERENCES users (user_name) ON DELETE CASCADE,
    expires_at    TEXT NOT NULL
);

-- The built-in telemetry store. received_at is fixed-width RFC 3339 UTC, so text order is time order.
CREATE TABLE telemetry (
    id              TEXT PRIMARY KEY NOT NULL,
    listener_key    TEXT NOT NULL,
    device_id       TEXT,
    device_type     TEXT,
    connection_id   BIGINT NOT NULL,
    source_address  TEXT,
    received_at     TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    payload         TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    downstream_key  TEXT NOT NULL
);
CREATE INDEX telemetry_by_time ON telemetry (received_at);
CREATE INDEX telemetry_by_device ON telemetry (device_id, received_at);
CREATE INDEX telemetry_by_listener ON telemetry (listener_key, received_at);

-- Envelopes that could not be authenticated or delivered, with why. Never holds a credential.
CREATE TABLE dead_letters (
    id            TEXT PRIMARY KEY NOT NULL,
    listener_key  TEXT,
    device_id     TEXT,
    module        TEXT NOT NULL,
    reason        TEXT NOT NULL,
    message       TEXT NOT NULL,
    received_at   TEXT NOT NULL,
    content_type  TEXT,
    payload       TEXT
);
CREATE INDEX dead_letters_by_time ON dead_letters (received_at);
