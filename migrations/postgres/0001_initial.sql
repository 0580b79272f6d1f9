-- syncrelay's PostgreSQL schema, version 1: the same tables as SQLite's versions 1 and 2
-- (migrations/sqlite/), with BIGINT times and counts and BIGSERIAL sequence numbers. Times are
-- Unix milliseconds, as in SQLite; booleans are 0/1 BIGINTs so both backends share row mapping.

-- Key/value settings the relay generates once (e.g. the callback signing secret).
CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- Webhook subscriptions.
CREATE TABLE webhooks (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  target_url TEXT NOT NULL,
  event_types TEXT NOT NULL,
  is_active BIGINT NOT NULL,
  description TEXT,
  secret TEXT NOT NULL,
  previous_secret TEXT,
  previous_secret_expires_at BIGINT,
  created_at BIGINT NOT NULL,
  updated_at BIGINT NOT NULL
);

-- The queue and delivery log: one row per (event, target). A chain (order_key) is delivered in
-- seq order: only its oldest unfinished row is 'ready', the ones behind it 'waiting'.
CREATE TABLE deliveries (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  event_id TEXT NOT NULL,
  event TEXT NOT NULL,
  run_id TEXT,
  kind TEXT NOT NULL,
  webhook_id TEXT,
  target_url TEXT,
  target_key TEXT NOT NULL,
  order_key TEXT,
  body TEXT NOT NULL,
  state TEXT NOT NULL,
  attempts BIGINT NOT NULL DEFAULT 0,
  next_attempt_at BIGINT NOT NULL,
  first_attempt_at BIGINT,
  last_status BIGINT,
  last_error TEXT,
  created_at BIGINT NOT NULL,
  finished_at BIGINT,
  -- Where the event came from when it was a bus message (`topic/partition/offset`).
  source TEXT,
  -- The instance that claimed this ready row, and until when no other instance may take it.
  lease_owner TEXT,
  lease_until BIGINT
);
CREATE INDEX deliveries_due ON deliveries(next_attempt_at, seq) WHERE state = 'ready';
CREATE INDEX deliveries_key ON deliveries(order_key, seq) WHERE state IN ('ready', 'waiting');
CREATE INDEX deliveries_run ON deliveries(run_id) WHERE state IN ('ready', 'waiting');
CREATE INDEX deliveries_event ON deliveries(event_id);
CREATE INDEX deliveries_finished ON deliveries(finished_at) WHERE state = 'delivered';

-- Every attempt of a delivery.
CREATE TABLE attempts (
  delivery_id TEXT NOT NULL,
  n BIGINT NOT NULL,
  started_at BIGINT NOT NULL,
  duration_ms BIGINT NOT NULL,
  status BIGINT,
  error TEXT,
  response_excerpt TEXT,
  PRIMARY KEY (delivery_id, n)
);

-- What was given up on (exhausted, refused, unroutable ...), kept for inspection and replay.
CREATE TABLE dead_letters (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  delivery_id TEXT,
  event_id TEXT NOT NULL,
  event TEXT NOT NULL,
  webhook_id TEXT,
  kind TEXT NOT NULL,
  reason TEXT NOT NULL,
  attempts BIGINT NOT NULL,
  last_status BIGINT,
  last_error TEXT,
  raw TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  replayed_at BIGINT
);
CREATE INDEX dead_letters_open ON dead_letters(seq) WHERE replayed_at IS NULL;

-- Run commands published in embedded mode, for executors to poll.
CREATE TABLE commands (
  seq BIGSERIAL PRIMARY KEY,
  key TEXT NOT NULL,
  command TEXT NOT NULL,
  created_at BIGINT NOT NULL
);

-- Sync jobs.
CREATE TABLE sync_jobs (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  integration_name TEXT NOT NULL,
  args_schema TEXT,
  resources TEXT NOT NULL,
  environment_id TEXT,
  created_at BIGINT NOT NULL,
  updated_at BIGINT NOT NULL
);
CREATE INDEX sync_jobs_integration ON sync_jobs(integration_name, seq);

-- Runs, with the lifecycle's state (status, counts, batch-mode errors being gathered).
CREATE TABLE sync_job_runs (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  sync_job_id TEXT NOT NULL,
  integrated_account_id TEXT NOT NULL,
  webhook_id TEXT,
  daemon_group_key TEXT,
  daemon_id TEXT,
  callback_url TEXT,
  args TEXT NOT NULL,
  resources TEXT NOT NULL,
  sync_job TEXT NOT NULL,
  error_handling TEXT NOT NULL,
  ignore_previous_run BIGINT NOT NULL,
  status TEXT NOT NULL,
  resource_stats TEXT NOT NULL DEFAULT '{}',
  illegal_transitions BIGINT NOT NULL DEFAULT 0,
  stop_reason TEXT,
  batch_errors TEXT NOT NULL DEFAULT '[]',
  batch_count BIGINT NOT NULL DEFAULT 0,
  batch_bytes BIGINT NOT NULL DEFAULT 0,
  batch_since BIGINT,
  batch_seq BIGINT NOT NULL DEFAULT 0,
  created_at BIGINT NOT NULL,
  updated_at BIGINT NOT NULL,
  started_at BIGINT,
  finished_at BIGINT
);
CREATE INDEX sync_job_runs_job ON sync_job_runs(sync_job_id, integrated_account_id, status);
CREATE INDEX sync_job_runs_batches ON sync_job_runs(batch_since) WHERE batch_since IS NOT NULL;

-- Eloqua-style bulk syncs (CONTRACT §3).
CREATE TABLE eloqua_syncs (
  seq BIGSERIAL PRIMARY KEY,
  synced_instance_uri TEXT NOT NULL,
  callback_url TEXT,
  status TEXT NOT NULL,
  created_by TEXT NOT NULL,
  created_at BIGINT NOT NULL
);
