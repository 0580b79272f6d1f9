-- A delivery whose first attempt succeeded keeps that attempt on its own row instead of in
-- `attempts` (issue 14: one row written per delivered event, not two). The attempt's start is
-- `first_attempt_at`, its status and error `last_status` / `last_error`; these two columns hold
-- the rest. `attempts` keeps every attempt of a delivery that needed more than one, or failed.
ALTER TABLE deliveries ADD COLUMN last_duration_ms INTEGER;
ALTER TABLE deliveries ADD COLUMN last_excerpt TEXT;
