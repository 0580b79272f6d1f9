-- The chain index's predicate as three equalities instead of `state IN ('ready', 'waiting',
-- 'paused')` (issue 14). SQLite evaluates a partial index's predicate for every row an INSERT or
-- UPDATE writes, and an `IN` list of three or more constants there is compiled into an ephemeral
-- B-tree built anew for each row (no `OP_Once` in that code path): an insert built one, a
-- promotion or a completion two, each with three inserts. That was two thirds of the B-tree
-- inserts the embedded bus made (22 index inserts an event where 6 are real), measured with
-- `cargo bench --bench store_floor` under callgrind. Equalities joined by OR are compared in
-- place. Queries reach this index only with the same predicate written the same way (SQLite
-- matches a partial index by the form of its terms): `QUEUED` in src/store/sqlite/mod.rs.
DROP INDEX IF EXISTS deliveries_key;
CREATE INDEX deliveries_key ON deliveries(order_key, seq) WHERE state = 'ready' OR state = 'waiting' OR state = 'paused';
