-- A delivery whose first attempt succeeded keeps that attempt on its own row instead of in
-- `attempts` (issue 14: one row version and its index entries fewer per delivered event). The
-- attempt's start is `first_attempt_at`, its status and error `last_status` / `last_error`;
-- these two columns hold the rest. `attempts` keeps every attempt of a delivery that needed
-- more than one, or failed. The twin of migrations/sqlite/0008_first_attempt.sql.
ALTER TABLE deliveries ADD COLUMN last_duration_ms BIGINT;
ALTER TABLE deliveries ADD COLUMN last_excerpt TEXT;
