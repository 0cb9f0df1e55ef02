-- Telemetry is read newest first and keyset-paged on (received_at, id), for everything or for one
-- device or listener: each index ends in that key, so a page is one index range scan however deep.
DROP INDEX telemetry_by_time;
DROP INDEX telemetry_by_device;
DROP INDEX telemetry_by_listener;
CREATE INDEX telemetry_by_time ON telemetry (received_at, id);
CREATE INDEX telemetry_by_device ON telemetry (device_id, received_at, id);
CREATE INDEX telemetry_by_listener ON telemetry (listener_key, received_at, id);
