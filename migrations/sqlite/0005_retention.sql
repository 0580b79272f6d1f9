-- Retention of failures (delivery.dead_letter_retention_hours): dead and dropped rows by the
-- time they finished, dead letters by the time they were made, found without a table scan.
CREATE INDEX IF NOT EXISTS deliveries_failed_finished ON deliveries(finished_at) WHERE state IN ('dead', 'dropped');
CREATE INDEX IF NOT EXISTS dead_letters_created ON dead_letters(created_at);
