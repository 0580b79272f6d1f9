-- The chain index says "queued" as `finished_at IS NULL` instead of naming the queued states
-- (issue 14). A partial index whose predicate names a column an UPDATE sets is maintained by that
-- UPDATE: with `state` in the predicate, every promotion (`waiting` -> `ready`), pause and release
-- deleted the row's chain entry and inserted the same entry again, two B-tree seeks on a ~80-byte
-- string key for nothing. `finished_at` changes only when a row leaves the queue (its completion,
-- a dead letter, a dropped run) and that is exactly when its entry must go: promotions fell from
-- 20 k to 12.5 k instructions a row, the relay's store from 2,501 M to 2,333 M instructions for
-- 20,000 events (`cargo bench --bench store_floor` under callgrind).
--
-- The two say the same of every row the store writes: a row is queued (`ready`, `waiting`,
-- `paused`) exactly when it has no finish time (store::rows::Completion::row_state and every
-- finishing statement set one; nothing queues a finished row again). Rows that disagree, which
-- only a hand edit could have made, are made to agree first, by their state, so the index holds
-- exactly the rows it held before. Queries reach it with `QUEUED` (src/store/sqlite/mod.rs).
UPDATE deliveries SET finished_at = COALESCE(first_attempt_at, next_attempt_at, created_at)
  WHERE finished_at IS NULL AND NOT (state = 'ready' OR state = 'waiting' OR state = 'paused');
UPDATE deliveries SET finished_at = NULL
  WHERE finished_at IS NOT NULL AND (state = 'ready' OR state = 'waiting' OR state = 'paused');
DROP INDEX IF EXISTS deliveries_key;
CREATE INDEX deliveries_key ON deliveries(order_key, seq) WHERE finished_at IS NULL;
