-- A counter every change to `webhooks` bumps, kept by the database itself (a statement-level
-- trigger, so no write path can forget it): every instance reads it once a second and reloads
-- its webhooks when it moved, so a webhook created, updated, rotated, disabled or deleted on one
-- instance is used by all of them within about a second (docs/OPERATIONS.md). The twin of the
-- trigger in migrations/sqlite/0004_leases.sql. The counter row is locked for the rest of a
-- webhook write's transaction, which serialises webhook writes: they are rare.
INSERT INTO kv (key, value) VALUES ('webhooks_version', '0') ON CONFLICT (key) DO NOTHING;

CREATE OR REPLACE FUNCTION syncrelay_webhooks_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE kv SET value = (value::BIGINT + 1)::TEXT WHERE key = 'webhooks_version';
  RETURN NULL;
END
$$;

CREATE TRIGGER webhooks_version AFTER INSERT OR UPDATE OR DELETE ON webhooks
  FOR EACH STATEMENT EXECUTE FUNCTION syncrelay_webhooks_changed();

