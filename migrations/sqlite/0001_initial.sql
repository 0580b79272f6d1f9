-- syncrelay's SQLite schema, version 1: the tables the relay made before schemas were versioned
-- (the queue and delivery log from store.rs, sync jobs and runs from runs/db.rs). Every statement
-- says IF NOT EXISTS so a database made by that earlier version is adopted as it is.

-- Key/value settings the relay generates once (e.g. the callback signing secret).
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- Webhook subscriptions.
CREATE TABLE IF NOT EXISTS webhooks (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  target_url TEXT NOT NULL,
  event_types TEXT NOT NULL,
  is_active INTEGER NOT NULL,
  description TEXT,
  secret TEXT NOT NULL,
  previous_secret TEXT,
  previous_secret_expires_at INTEGER,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);

-- The queue and delivery log: one row per (event, target). A chain (order_key) is delivered in
-- seq order: only its oldest unfinished row is 'ready', the ones behind it 'waiting'.
CREATE TABLE IF NOT EXISTS deliveries (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
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
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at INTEGER NOT NULL,
  first_attempt_at INTEGER,
  last_status INTEGER,
  last_error TEXT,
  created_at INTEGER NOT NULL,
  finished_at INTEGER
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_attempt_at, seq) WHERE state = 'ready';
CREATE INDEX IF NOT EXISTS deliveries_key ON deliveries(order_key, seq) WHERE state IN ('ready', 'waiting');
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries(event_id);
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries(finished_at) WHERE state = 'delivered';

-- Every attempt of a delivery.
CREATE TABLE IF NOT EXISTS attempts (
  delivery_id TEXT NOT NULL,
  n INTEGER NOT NULL,
  started_at INTEGER NOT NULL,
  duration_ms INTEGER NOT NULL,
  status INTEGER,
  error TEXT,
  response_excerpt TEXT,
  PRIMARY KEY (delivery_id, n)
);

-- What was given up on (exhausted, refused, unroutable ...), kept for inspection and replay.
CREATE TABLE IF NOT EXISTS dead_letters (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  delivery_id TEXT,
  event_id TEXT NOT NULL,
  event TEXT NOT NULL,
  webhook_id TEXT,
  kind TEXT NOT NULL,
  reason TEXT NOT NULL,
  attempts INTEGER NOT NULL,
  last_status INTEGER,
  last_error TEXT,
  raw TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  replayed_at INTEGER
);
CREATE INDEX IF NOT EXISTS dead_letters_open ON dead_letters(seq) WHERE replayed_at IS NULL;

-- Run commands published in embedded mode, for executors to poll.
CREATE TABLE IF NOT EXISTS commands (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  key TEXT NOT NULL,
  command TEXT NOT NULL,
  created_at INTEGER NOT NULL
);

-- Sync jobs.
CREATE TABLE IF NOT EXISTS sync_jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  integration_name TEXT NOT NULL,
  args_schema TEXT,
  resources TEXT NOT NULL,
  environment_id TEXT,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sync_jobs_integration ON sync_jobs(integration_name, seq);

-- Runs, with the lifecycle's state (status, counts, batch-mode errors being gathered).
CREATE TABLE IF NOT EXISTS sync_job_runs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
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
  ignore_previous_run INTEGER NOT NULL,
  status TEXT NOT NULL,
  resource_stats TEXT NOT NULL DEFAULT '{}',
  illegal_transitions INTEGER NOT NULL DEFAULT 0,
  stop_reason TEXT,
  batch_errors TEXT NOT NULL DEFAULT '[]',
  batch_count INTEGER NOT NULL DEFAULT 0,
  batch_bytes INTEGER NOT NULL DEFAULT 0,
  batch_since INTEGER,
  batch_seq INTEGER NOT NULL DEFAULT 0,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  started_at INTEGER,
  finished_at INTEGER
);
CREATE INDEX IF NOT EXISTS sync_job_runs_job ON sync_job_runs(sync_job_id, integrated_account_id, status);
CREATE INDEX IF NOT EXISTS sync_job_runs_batches ON sync_job_runs(batch_since) WHERE batch_since IS NOT NULL;

-- Eloqua-style bulk syncs (CONTRACT §3).
CREATE TABLE IF NOT EXISTS eloqua_syncs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  synced_instance_uri TEXT NOT NULL,
  callback_url TEXT,
  status TEXT NOT NULL,
  created_by TEXT NOT NULL,
  created_at INTEGER NOT NULL
);
