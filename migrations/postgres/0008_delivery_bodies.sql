-- Delivery bodies in a table of their own (issue 14), written once when the delivery is made.
-- A queued delivery's row changes state two or three times (promoted, claimed, completed), and
-- each change is a new row version: with its ~1 KiB body inline (below TOAST's threshold),
-- every version copied the body, six versions filled a heap page and each went to the WAL.
-- `seq` is the delivery's `seq` (never reused). A deleted delivery takes its body with it (the
-- trigger), whichever statement deletes it.
--
-- Instances of earlier versions read and write `deliveries.body`, which this drops: stop them
-- all before the first instance of this version starts (docs/OPERATIONS.md, Upgrading).
CREATE TABLE IF NOT EXISTS delivery_bodies (seq BIGINT PRIMARY KEY, body TEXT NOT NULL);
INSERT INTO delivery_bodies (seq, body) SELECT seq, body FROM deliveries;
ALTER TABLE deliveries DROP COLUMN body;
CREATE OR REPLACE FUNCTION syncrelay_delivery_bodies_gone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM delivery_bodies WHERE seq IN (SELECT seq FROM gone);
  RETURN NULL;
END
$$;
CREATE TRIGGER deliveries_bodies_gone AFTER DELETE ON deliveries
  REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION syncrelay_delivery_bodies_gone();
