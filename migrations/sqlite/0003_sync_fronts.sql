-- Eloqua bulk syncs follow a run (issue 12 §1-4); DevRev-style sync units track their runs
-- (issue 12 §9-10).
ALTER TABLE eloqua_syncs ADD COLUMN run_id TEXT;
-- When the sync's one callback was queued (NULL: not yet); set once, so exactly one is sent.
ALTER TABLE eloqua_syncs ADD COLUMN callback_queued_at INTEGER;
CREATE INDEX IF NOT EXISTS eloqua_syncs_run ON eloqua_syncs(run_id) WHERE run_id IS NOT NULL;

ALTER TABLE sync_job_runs ADD COLUMN sync_unit_id TEXT;
CREATE INDEX IF NOT EXISTS sync_job_runs_unit ON sync_job_runs(sync_unit_id, seq) WHERE sync_unit_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS sync_units (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  external_sync_unit TEXT NOT NULL,
  keyring TEXT NOT NULL,
  name TEXT NOT NULL,
  is_archived INTEGER NOT NULL DEFAULT 0,
  object_version INTEGER NOT NULL DEFAULT 1,
  created_by TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);
