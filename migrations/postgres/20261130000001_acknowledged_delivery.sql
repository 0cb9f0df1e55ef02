-- Acknowledged delivery. The id a device gave a message is kept with its telemetry row; one
-- downstream stores a (device, message id) once, which is what makes a retried message a
-- duplicate instead of a second row. Rows without an id are not in the index.
ALTER TABLE telemetry ADD COLUMN message_id TEXT COLLATE "C";
CREATE UNIQUE INDEX telemetry_message_ids ON telemetry (device_id, message_id, downstream_key)
    WHERE message_id IS NOT NULL;

-- Retention deletes a downstream's oldest rows; this index finds them without a scan.
CREATE INDEX telemetry_by_downstream ON telemetry (downstream_key, received_at);

-- A connection that never authenticated keeps only the start of its payload in a dead letter.
ALTER TABLE dead_letters ADD COLUMN payload_truncated BOOLEAN NOT NULL DEFAULT FALSE;
