-- Nodes sharing the database: each refreshes its row every few seconds; rows not refreshed for
-- a while are gone (GET /api/v1/nodes lists the live ones).
CREATE TABLE nodes (
    node_id     TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    address     TEXT COLLATE "C" NOT NULL,
    started_at  TEXT COLLATE "C" NOT NULL,
    last_seen   TEXT COLLATE "C" NOT NULL,
    -- The node's listener statuses at its last heartbeat (JSON array), for the status API.
    listeners   TEXT COLLATE "C" NOT NULL DEFAULT '[]'
);
