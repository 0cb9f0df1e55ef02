-- A listener without a sentinel vouches for its connection, not for the devices its messages
-- name: such rows are stored with authenticated = false and the device they claim.
ALTER TABLE telemetry ADD COLUMN authenticated BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE telemetry ADD COLUMN claimed_device_id TEXT COLLATE "C";
