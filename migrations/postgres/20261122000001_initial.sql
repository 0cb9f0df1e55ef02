-- PostgreSQL twin of migrations/sqlite (same versions, same tables): JSON documents and payloads
-- are jsonb, digests bytea. Timestamps stay fixed-width RFC 3339 UTC text, so the queries and
-- their keyset order are the same on both engines. Every text column compares bytewise
-- (COLLATE "C"), as SQLite's do: the same order on both engines whatever the database's locale,
-- and index maintenance without locale-aware comparisons on the telemetry write path.

-- Definitions of every kind: the schema-validated document as the operator wrote it (minus
-- write-only secrets), plus the secret's stored form (Argon2id hash or sealed client password).
CREATE TABLE definitions (
    kind        TEXT COLLATE "C" NOT NULL,
    key         TEXT COLLATE "C" NOT NULL,
    document    JSONB NOT NULL,
    secret      TEXT COLLATE "C",
    created_at  TEXT COLLATE "C" NOT NULL,
    updated_at  TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (kind, key)
);

-- The device registry. Access keys exist only as HMAC-SHA-256 digests under the server secret.
CREATE TABLE devices (
    device_id             TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    name                  TEXT COLLATE "C" NOT NULL,
    device_type           TEXT COLLATE "C" NOT NULL,
    enabled               BOOLEAN NOT NULL,
    properties            JSONB NOT NULL,
    primary_key_digest    BYTEA NOT NULL,
    secondary_key_digest  BYTEA NOT NULL,
    created_at            TEXT COLLATE "C" NOT NULL,
    last_contact          TEXT COLLATE "C",
    message_count         BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE users (
    user_name      TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    password_hash  TEXT COLLATE "C" NOT NULL,
    created_at     TEXT COLLATE "C" NOT NULL
);

-- Admin sessions: only the SHA-256 of the bearer token is stored.
CREATE TABLE sessions (
    token_digest  TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    user_name     TEXT COLLATE "C" NOT NULL REFERENCES users (user_name) ON DELETE CASCADE,
    expires_at    TEXT COLLATE "C" NOT NULL
);

-- The built-in telemetry store. received_at is fixed-width RFC 3339 UTC, so text order is time order.
CREATE TABLE telemetry (
    id              TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    listener_key    TEXT COLLATE "C" NOT NULL,
    device_id       TEXT COLLATE "C",
    device_type     TEXT COLLATE "C",
    connection_id   BIGINT NOT NULL,
    source_address  TEXT COLLATE "C",
    received_at     TEXT COLLATE "C" NOT NULL,
    content_type    TEXT COLLATE "C" NOT NULL,
    payload         JSONB NOT NULL,
    metadata        JSONB NOT NULL,
    downstream_key  TEXT COLLATE "C" NOT NULL
);
CREATE INDEX telemetry_by_time ON telemetry (received_at);
CREATE INDEX telemetry_by_device ON telemetry (device_id, received_at);
CREATE INDEX telemetry_by_listener ON telemetry (listener_key, received_at);

-- Envelopes that could not be authenticated or delivered, with why. Never holds a credential.
CREATE TABLE dead_letters (
    id            TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    listener_key  TEXT COLLATE "C",
    device_id     TEXT COLLATE "C",
    module        TEXT COLLATE "C" NOT NULL,
    reason        TEXT COLLATE "C" NOT NULL,
    message       TEXT COLLATE "C" NOT NULL,
    received_at   TEXT COLLATE "C" NOT NULL,
    content_type  TEXT COLLATE "C",
    payload       TEXT COLLATE "C"
);
CREATE INDEX dead_letters_by_time ON dead_letters (received_at);
