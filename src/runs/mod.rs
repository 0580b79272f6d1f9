//! Sync jobs and sync job runs (issue 4): the Truto-compatible control plane's model, validation
//! and SQL, and the run lifecycle the relay enforces (`lifecycle`).
//!
//! Tables live in the store's SQLite database, created by [`migrate`] (idempotent). The API calls
//! [`ensure_migrated`] before touching them, so they exist even before startup calls `migrate`.

pub mod db;
pub mod lifecycle;
pub mod model;
pub mod service;
pub mod validate;

use std::collections::HashSet;
use std::sync::Mutex;

use anyhow::Context;
use sqlx::SqlitePool;

pub use lifecycle::{Action, BatchLimits, Decision, Runs};
pub use model::{ErrorHandling, ResourceSpec, Run, Status, SyncJob};

/// Create the tables of sync jobs, runs and Eloqua-style syncs if they do not exist.
pub async fn migrate(pool: &SqlitePool) -> anyhow::Result<()> {
    sqlx::raw_sql(db::SCHEMA)
        .execute(pool)
        .await
        .context("creating sync job tables")?;
    Ok(())
}

static MIGRATED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// `migrate`, once per database file per process.
pub async fn ensure_migrated(pool: &SqlitePool) -> anyhow::Result<()> {
    let key = pool.connect_options().get_filename().display().to_string();
    if MIGRATED
        .lock()
        .expect("lock")
        .as_ref()
        .is_some_and(|s| s.contains(&key))
    {
        return Ok(());
    }
    migrate(pool).await?;
    MIGRATED
        .lock()
        .expect("lock")
        .get_or_insert_with(HashSet::new)
        .insert(key);
    Ok(())
}
