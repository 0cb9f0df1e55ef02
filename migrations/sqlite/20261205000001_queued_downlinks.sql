-- Messages to devices that were offline when sent (`?queue=true`): kept until the device's next
-- connection takes them or they expire (then dead-lettered with reason downlink_expired).
CREATE TABLE queued_downlinks (
    id            TEXT PRIMARY KEY NOT NULL,
    device_id     TEXT NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    -- Only connections of this listener take it, when the sender named one.
    listener_key  TEXT,
    -- json, text or binary; binary bodies are stored as base64.
    body_kind     TEXT NOT NULL,
    body          TEXT NOT NULL,
    queued_at     TEXT NOT NULL,
    expires_at    TEXT NOT NULL
);
CREATE INDEX queued_downlinks_by_device ON queued_downlinks (device_id, queued_at);
CREATE INDEX queued_downlinks_by_expiry ON queued_downlinks (expires_at);
