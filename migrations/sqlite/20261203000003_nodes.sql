-- Nodes sharing the database: each refreshes its row every few seconds; rows not refreshed for
-- a while are gone (GET /api/v1/nodes lists the live ones).
CREATE TABLE nodes (
    node_id     TEXT PRIMARY KEY NOT NULL,
    address     TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    last_seen   TEXT NOT NULL,
    -- The node's listener statuses at its last heartbeat (JSON array), for the status API.
    listeners   TEXT NOT NULL DEFAULT '[]'
);
