-- Shared-access signatures are HMACs keyed by the device's key itself, so the sentinel needs the
-- key, not only its digest: keys issued from now on are also kept sealed (ChaCha20-Poly1305 under
-- a key derived from the server secret, which is not in the database). Devices registered before
-- have none until a key is rotated.
ALTER TABLE devices ADD COLUMN primary_key_sealed TEXT COLLATE "C";
ALTER TABLE devices ADD COLUMN secondary_key_sealed TEXT COLLATE "C";
