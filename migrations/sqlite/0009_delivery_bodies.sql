-- Delivery bodies in a table of their own (issue 14), written once when the delivery is made.
-- A queued delivery's row changes state two or three times (promoted, claimed, completed) and
-- SQLite writes a changed row out whole: with its ~1 KiB body inline, every change rewrote the
-- body too and a page held three rows, so a batch of completions dirtied about a page a row.
-- `seq` is the delivery's `seq` (never reused: AUTOINCREMENT). A deleted delivery takes its
-- body with it (the trigger), whichever statement deletes it.
CREATE TABLE IF NOT EXISTS delivery_bodies (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);
INSERT INTO delivery_bodies (seq, body) SELECT seq, body FROM deliveries;
ALTER TABLE deliveries DROP COLUMN body;
CREATE TRIGGER IF NOT EXISTS deliveries_body_gone AFTER DELETE ON deliveries BEGIN
  DELETE FROM delivery_bodies WHERE seq = OLD.seq;
END;
