-- Census-style syncs (issue 12 §5-8); the PostgreSQL twin of migrations/sqlite/0004_census_syncs.sql.
-- A sync subscribes a destination webhook to the records of a sync job's runs, mapped. `config` is the sync's validated settings as JSON (mappings, alerts);
-- the columns routing and pausing need are kept apart so the queue can consult them.
CREATE TABLE IF NOT EXISTS census_syncs (
  id BIGSERIAL PRIMARY KEY,
  sync_job_id TEXT NOT NULL,
  webhook_id TEXT NOT NULL,
  paused BIGINT NOT NULL DEFAULT 0,
  config TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  updated_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS census_syncs_job ON census_syncs(sync_job_id);

-- Per sync and alert: the last run the alert was evaluated for (so each run is evaluated once,
-- whichever path or instance sees it finish) and whether the alert is firing (first_time and
-- recovery need the previous run's state).
CREATE TABLE IF NOT EXISTS census_alert_state (
  sync_id BIGINT NOT NULL,
  alert TEXT NOT NULL,
  last_run TEXT NOT NULL DEFAULT '',
  firing BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (sync_id, alert)
);

-- Deliveries of a paused sync are rows in state 'paused' (never ready, never promoted) until the
-- sync is unpaused. A chain's queued rows are now those ready, waiting or paused: the queue's
-- queries say `state IN ('ready', 'waiting', 'paused')`, and a partial index is only used for the
-- very condition it was made with, so the chain index is made again with that condition.
DROP INDEX IF EXISTS deliveries_key;
CREATE INDEX IF NOT EXISTS deliveries_key ON deliveries(order_key, seq) WHERE state IN ('ready', 'waiting', 'paused');
CREATE INDEX IF NOT EXISTS deliveries_paused ON deliveries(order_key, seq) WHERE state = 'paused';
DROP INDEX IF EXISTS deliveries_run;
CREATE INDEX IF NOT EXISTS deliveries_run ON deliveries(run_id) WHERE state IN ('ready', 'waiting', 'paused');
