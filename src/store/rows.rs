//! What the store takes and returns: typed rows, filters and pages. Nothing here knows SQL or
//! JSON rendering (the API renders rows in `src/api/`).

use std::collections::HashMap;

use serde_json::Value;

use crate::runs::model::Run;
use crate::signing::Secret;

// ---- webhooks and kv ----------------------------------------------------------------------------

/// A webhook. `S` is how its secrets are held: [`Secret`] everywhere but inside the store, where
/// the backends see them as stored text ([`StoredWebhook`], sealed by `store::secrets`).
#[derive(Clone)]
pub struct Webhook<S = Secret> {
    pub id: String,
    pub target_url: String,
    pub event_types: Vec<String>,
    pub is_active: bool,
    pub description: Option<String>,
    pub secret: S,
    pub previous_secret: Option<(S, i64)>,
    pub created_at: i64,
    pub updated_at: i64,
    pub seq: i64,
    /// Per-webhook delivery settings replacing the configured ones (None: the defaults).
    pub overrides: Option<WebhookOverrides>,
}

/// `PATCH /webhook/{id}` `overrides`: this webhook's in-flight cap and retry schedule, each key
/// replacing the configured one (`delivery.max_in_flight_per_webhook`, `delivery.retry.*`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryOverrides>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_elapsed_ms: Option<u64>,
}

/// A webhook as the backends store it: secrets as stored text (sealed when a key is configured).
pub type StoredWebhook = Webhook<String>;

impl<S> std::fmt::Debug for Webhook<S> {
    // Never prints the secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("id", &self.id)
            .field("is_active", &self.is_active)
            .finish_non_exhaustive()
    }
}

// ---- queue --------------------------------------------------------------------------------------

/// A delivery's kind as stored: `webhook` (an event to its webhook), `callback` (to a callback
/// URL) or `sync` (a record to a Census-style sync's destination webhook, mapped).
pub fn kind_str(k: &str) -> &'static str {
    match k {
        "callback" => "callback",
        "sync" => "sync",
        _ => "webhook",
    }
}

#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: String,
    pub event_id: String,
    pub event: String,
    pub run_id: Option<String>,
    pub kind: &'static str,
    pub webhook_id: Option<String>,
    pub target_url: Option<String>,
    pub target_key: String,
    pub order_key: Option<String>,
    pub body: String,
    pub created_at: i64,
    /// Attempts already made before it was queued (Kafka mode parks after in-memory attempts).
    pub attempts: i64,
    pub first_attempt_at: Option<i64>,
    /// Not before this time (ms); None = now.
    pub next_attempt_at: Option<i64>,
    /// Where the event came from, when a bus message (`topic/partition/offset`): the
    /// dead-letter topic's `x-dlq-source-*` headers.
    pub source: Option<String>,
    /// Attempts already made (in memory) before the row was written: kept in the attempt log.
    pub log: Vec<AttemptRecord>,
}

/// A delivery finished in memory (Kafka), written to the log as a finished row.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Its attempts are in `delivery.log`.
    pub delivery: NewDelivery,
    /// `delivered` or `dead`.
    pub state: &'static str,
}

#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub delivery_id: Option<String>,
    pub event_id: String,
    pub event: String,
    pub webhook_id: Option<String>,
    pub kind: &'static str,
    pub reason: &'static str,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub raw: String,
}

/// A queued delivery, as the dispatcher sees it.
#[derive(Debug, Clone)]
pub struct QueuedDelivery {
    pub seq: i64,
    pub id: String,
    pub event_id: String,
    pub event: String,
    pub run_id: Option<String>,
    pub kind: String,
    pub webhook_id: Option<String>,
    pub target_url: Option<String>,
    pub target_key: String,
    pub order_key: Option<String>,
    pub body: String,
    pub attempts: i64,
    pub first_attempt_at: Option<i64>,
    pub created_at: i64,
    pub source: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub started_at: i64,
    pub duration_ms: i64,
    pub status: Option<i64>,
    pub error: Option<String>,
    pub excerpt: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Next {
    Delivered,
    Retry { at_ms: i64 },
    Dead(NewDeadLetter),
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub seq: i64,
    pub delivery_id: String,
    pub order_key: Option<String>,
    pub attempt_no: i64,
    pub first_attempt_at: i64,
    pub attempt: AttemptRecord,
    pub next: Next,
    /// For the engine's bookkeeping and metrics; not stored.
    pub kind: &'static str,
    pub target_key: String,
    pub created_at: i64,
    /// The body actually sent when it differs from the queued one (a run's `completed` /
    /// `failed` gets its final counts at attempt time); stored so the log shows what was signed.
    pub body: Option<String>,
    /// For the run lifecycle's outcome counting; not stored.
    pub run_id: Option<String>,
    pub event: String,
    pub resource: Option<String>,
}

impl Completion {
    /// What the completion makes of its row at `now`, the same on every store: (state, next
    /// attempt at, finished at).
    pub(crate) fn row_state(&self, now: i64) -> (&'static str, i64, Option<i64>) {
        match &self.next {
            Next::Delivered => ("delivered", now, Some(now)),
            Next::Retry { at_ms } => ("ready", *at_ms, None),
            Next::Dead(_) => ("dead", now, Some(now)),
        }
    }
}

// ---- delivery log -------------------------------------------------------------------------------

/// A delivery as the log shows it.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub seq: i64,
    pub id: String,
    pub event_id: String,
    pub event: String,
    pub run_id: Option<String>,
    pub kind: String,
    pub webhook_id: Option<String>,
    /// The queue state: `ready` (its chain's head), `waiting` (behind it), `delivered`, `dead`
    /// or `dropped` (its run stopped).
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    /// The body signed and sent (JSON text).
    pub body: String,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRow {
    /// 1 for the first attempt.
    pub n: i64,
    pub started_at: i64,
    pub duration_ms: i64,
    pub status: Option<i64>,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DeadLetterRow {
    pub seq: i64,
    pub id: String,
    pub delivery_id: Option<String>,
    pub event_id: String,
    pub event: String,
    pub webhook_id: Option<String>,
    pub kind: String,
    pub reason: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    /// The event as it came in (JSON text).
    pub raw: String,
    pub created_at: i64,
    pub replayed_at: Option<i64>,
}

/// `GET /deliveries` filters. `status` is a queue state (see [`DeliveryRow::state`]).
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct DeliveryFilter {
    pub event_id: Option<String>,
    pub webhook_id: Option<String>,
    pub sync_job_run_id: Option<String>,
    pub status: Option<String>,
}

#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct DeadLetterFilter {
    pub webhook_id: Option<String>,
    pub reason: Option<String>,
    pub event_id: Option<String>,
    #[serde(default)]
    pub include_replayed: bool,
}

// ---- runs, commands, Eloqua syncs ---------------------------------------------------------------

#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct RunFilter {
    pub sync_job_id: Option<String>,
    pub status: Option<String>,
    pub integrated_account_id: Option<String>,
    pub webhook_id: Option<String>,
}

/// Batch-mode record errors gathered on a run, stored with it until they are flushed as one
/// `sync_job_run:record_error`.
#[derive(Debug, Clone, Default)]
pub struct RunBatch {
    pub errors: Vec<Value>,
    /// Size of `errors` as JSON, with a separator each.
    pub bytes: i64,
    /// When the oldest gathered error came in.
    pub since: Option<i64>,
    /// Flushes made so far (numbers the flushed events' ids).
    pub seq: i64,
}

/// A run and its batch, loaded for update (see `RunStore::with_runs`).
#[derive(Debug)]
pub struct LockedRun {
    pub run: Run,
    pub batch: RunBatch,
    /// Set it when `run` or `batch` changed: only changed runs are written back.
    pub changed: bool,
}

/// The runs one `RunStore::with_runs` call holds, by id; ids the store does not know are absent.
#[derive(Debug, Default)]
pub struct RunsLocked {
    runs: HashMap<String, LockedRun>,
}

impl RunsLocked {
    /// For store implementations: the runs just loaded, none changed yet.
    pub fn new(loaded: impl IntoIterator<Item = (Run, RunBatch)>) -> RunsLocked {
        RunsLocked {
            runs: loaded
                .into_iter()
                .map(|(run, batch)| {
                    (
                        run.id.clone(),
                        LockedRun {
                            run,
                            batch,
                            changed: false,
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut LockedRun> {
        self.runs.get_mut(id)
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// For store implementations: what must be written back.
    pub fn changed(&self) -> impl Iterator<Item = &LockedRun> {
        self.runs.values().filter(|r| r.changed)
    }
}

/// A run command published in embedded mode.
#[derive(Debug, Clone)]
pub struct CommandRow {
    pub seq: i64,
    pub key: String,
    /// The command (JSON text).
    pub command: String,
    pub created_at: i64,
}

/// A Census-style sync as stored (`crate::syncs::Sync` is its parsed form).
#[derive(Debug, Clone, PartialEq)]
pub struct CensusSyncRow {
    /// Census's integer sync id (assigned by the store).
    pub id: i64,
    pub sync_job_id: String,
    pub webhook_id: String,
    pub paused: bool,
    /// The validated settings, JSON.
    pub config: String,
    pub created_at: i64,
    pub updated_at: i64,
}

pub struct EloquaSync {
    pub n: i64,
    pub synced_instance_uri: String,
    pub callback_url: Option<String>,
    /// The stored status (rows from before syncs had runs keep `pending`); a sync with a run
    /// shows its run's status (api/eloqua.rs).
    pub status: String,
    pub created_by: String,
    pub created_at: i64,
    /// The run the sync started (CONTRACT §3, Eloqua bulk syncs).
    pub run_id: Option<String>,
    /// When its one callback was queued.
    pub callback_queued_at: Option<i64>,
}

/// A DevRev-style airdrop sync unit (CONTRACT §3, DevRev sync units).
#[derive(Debug, Clone)]
pub struct SyncUnit {
    pub id: String,
    pub external_sync_unit: String,
    pub keyring: String,
    pub name: String,
    pub is_archived: bool,
    pub object_version: i64,
    pub created_by: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub seq: i64,
}

// ---- pages --------------------------------------------------------------------------------------

pub struct Page<T> {
    pub results: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page from up to `limit + 1` rows keyed by their cursor position (`seq`): the extra row
    /// only tells that there is a next page.
    pub fn from_rows(mut rows: Vec<(i64, T)>, limit: i64) -> Page<T> {
        let next_cursor = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|(seq, _)| seq.to_string())
        } else {
            None
        };
        Page {
            results: rows.into_iter().map(|(_, t)| t).collect(),
            next_cursor,
        }
    }
}

/// The position a cursor of [`Page::next_cursor`] stands for (0: the start).
pub fn parse_cursor(c: Option<&str>) -> Result<i64, crate::error::ApiError> {
    match c {
        None | Some("") => Ok(0),
        Some(c) => c
            .parse::<i64>()
            .map_err(|_| crate::error::ApiError::field("cursor", "is not a cursor this API returned")),
    }
}
