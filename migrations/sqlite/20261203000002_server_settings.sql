-- Settings every node sharing the database agrees on. `secret_check` is an HMAC of a fixed text
-- under the server secret (never the secret): a node started with another secret file refuses to
-- start instead of refusing every device the others registered.
CREATE TABLE server_settings (
    name   TEXT PRIMARY KEY NOT NULL,
    value  TEXT NOT NULL
);
