-- Messages to devices that were offline when sent (`?queue=true`): kept until the device's next
-- connection takes them or they expire (then dead-lettered with reason downlink_expired).
CREATE TABLE queued_downlinks (
    id            TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    device_id     TEXT COLLATE "C" NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    -- Only connections of this listener take it, when the sender named one.
    listener_key  TEXT COLLATE "C",
    -- json, text or binary; binary bodies are stored as base64.
    body_kind     TEXT COLLATE "C" NOT NULL,
    body          TEXT NOT NULL,
    queued_at     TEXT COLLATE "C" NOT NULL,
    expires_at    TEXT COLLATE "C" NOT NULL
);
CREATE INDEX queued_downlinks_by_device ON queued_downlinks (device_id, queued_at);
CREATE INDEX queued_downlinks_by_expiry ON queued_downlinks (expires_at);
