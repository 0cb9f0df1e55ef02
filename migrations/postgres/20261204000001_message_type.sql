-- The envelope's own message type (a Web PubSub event name, $connected, $disconnected), stored
-- with telemetry and returned by the telemetry API.
ALTER TABLE telemetry ADD COLUMN message_type TEXT;
