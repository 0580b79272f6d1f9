-- Per-webhook delivery overrides (issue 15 §6): JSON of the in-flight cap and retry schedule
-- set with PATCH /webhook/{id} `overrides`; NULL: the configured defaults.
ALTER TABLE webhooks ADD COLUMN IF NOT EXISTS overrides TEXT;
