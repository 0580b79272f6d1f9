-- Where a delivery's event came from when it was a bus message (`topic/partition/offset`), for
-- the dead-letter topic's `x-dlq-source-*` headers. Builds from before versioned schemas may
-- have added it already: src/store/sqlite/migrate.rs skips this file when the column exists.
ALTER TABLE deliveries ADD COLUMN source TEXT;
