-- Claims of queued deliveries are leased in the store, as on PostgreSQL (migrations/postgres/
-- 0001): the instance that took a ready row, and until when (Unix ms) nothing else may. The
-- engine renews the leases of the rows it has in flight and completes a row only while it holds
-- its lease. The owner names its process: opening the store releases the leases of processes
-- that are gone. The columns give both stores one code path and one test suite.
ALTER TABLE deliveries ADD COLUMN lease_owner TEXT;
ALTER TABLE deliveries ADD COLUMN lease_until INTEGER;

-- A counter every change to `webhooks` bumps (kept by the database itself, so no write path
-- can forget it): instances sharing a store compare it once a second and reload the webhooks
-- when it moved (see docs/OPERATIONS.md). Cheap: one row read.
INSERT OR IGNORE INTO kv (key, value) VALUES ('webhooks_version', '0');
CREATE TRIGGER IF NOT EXISTS webhooks_version_insert AFTER INSERT ON webhooks BEGIN
  UPDATE kv SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'webhooks_version';
END;
CREATE TRIGGER IF NOT EXISTS webhooks_version_update AFTER UPDATE ON webhooks BEGIN
  UPDATE kv SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'webhooks_version';
END;
CREATE TRIGGER IF NOT EXISTS webhooks_version_delete AFTER DELETE ON webhooks BEGIN
  UPDATE kv SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'webhooks_version';
END;
