//! The run lifecycle the relay enforces from the events it consumes (issue 4 §3–§6), as a small
//! library the delivery engine calls:
//!
//! - [`Runs::on_ingest`] for every event before it is routed: status transitions, error
//!   handling (`ignore`, `fail_fast`, `batch`), the run's webhook/callback when the event names
//!   none, and what to queue before/after it;
//! - [`Runs::on_outcome`] once per `sync_job_run:record` (or any run event) delivery to the
//!   run's webhook, when it was answered 2xx or dead-lettered;
//! - [`Runs::terminal_payload`] at the attempt of a `completed`/`failed` event, for its counts;
//! - [`Runs::stop`] e.g. on a 400 answer to `sync_job_run:started`;
//! - [`Runs::flush_due_batches`] periodically, for batch-mode errors due by age.
//!
//! State lives with the run in the store; the rules here are synchronous and every decision is
//! made inside one store transaction (`Store::with_runs`), so decisions on one run are
//! serialised even across tasks.

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde_json::{json, Map, Value};
use url::Url;

use super::model::{ErrorHandling, Run, Stats, Status};
use crate::domain::{now_ms, Envelope, Payload};
use crate::store::{RunBatch as Batch, Store};

/// When batch-mode record errors are flushed as one `sync_job_run:record_error`.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Flush when this many errors are gathered.
    pub max_errors: usize,
    /// Flush before the gathered errors' JSON would exceed this many bytes.
    pub max_bytes: usize,
    /// Flush (through `flush_due_batches`) when the oldest gathered error is this old.
    pub max_age_ms: i64,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_errors: 100,
            max_bytes: 256 * 1024,
            max_age_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Route and deliver the event.
    Deliver,
    /// Do not deliver; counted on the run (no dead letter). Reasons: `illegal_transition`,
    /// `run_failed` (records after a fail_fast failure).
    Drop { reason: &'static str },
    /// Do not deliver; dead-letter it with this reason (`run_finished`).
    DeadLetter { reason: &'static str },
    /// Taken into a batch (batch mode record errors); nothing to deliver for this event itself.
    Absorb,
}

#[derive(Debug, Clone)]
pub struct Decision {
    /// The webhook to deliver to: the event's own, else the run's.
    pub webhook_id: Option<String>,
    /// The callback URL to deliver to as well: the event's own, else the run's.
    pub callback_url: Option<Url>,
    /// The run's sync job (its Census-style syncs get its records too).
    pub sync_job_id: String,
    pub action: Action,
    /// Queue these before this event (a batch flush ahead of a terminal event).
    pub before: Vec<Envelope>,
    /// Queue these after this event (`sync_job_run:failed` after a fail_fast error; a batch that
    /// became full).
    pub after: Vec<Envelope>,
}

pub struct Runs {
    store: Store,
    limits: BatchLimits,
}

/// Which outcomes count on a run: a `sync_job_run:record` delivered (kind `webhook`) to its
/// run's webhook, as (run id, resource, delivered). Every other delivery changes no counter.
/// The one rule for every path that finishes a delivery.
pub fn counted_outcome<'a>(
    kind: &str,
    run_id: Option<&'a str>,
    event: &str,
    resource: Option<&'a str>,
    delivered: bool,
) -> Option<(&'a str, &'a str, bool)> {
    (kind == "webhook" && event == "sync_job_run:record").then_some(())?;
    Some((run_id?, resource.unwrap_or("unknown"), delivered))
}

/// The runs outcomes count on, each once (sorted, so locks are taken in one order).
pub fn counted_runs<'a>(run_ids: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    run_ids.into_iter().collect::<BTreeSet<_>>().into_iter().collect()
}

/// Count outcomes (run id, resource, delivered) on the runs loaded in `runs`: records
/// delivered or dead-lettered per resource. Called inside the store transaction that loaded
/// them, which is the one that records the outcomes themselves when they come from the outcome
/// writer (so a crash keeps both or neither).
pub fn count_into<'a>(runs: &mut crate::store::RunsLocked, items: impl IntoIterator<Item = (&'a str, &'a str, bool)>) {
    let now = now_ms();
    for (run_id, resource, delivered) in items {
        let Some(r) = runs.get_mut(run_id) else {
            continue;
        };
        let s = r.run.resource_stats.entry(resource.to_string()).or_default();
        if delivered {
            s.records_delivered += 1;
        } else {
            s.records_dead_lettered += 1;
        }
        r.run.updated_at = now;
        r.changed = true;
    }
}

/// Ids of events the relay makes for a run start with this (one id per made event, the same
/// on every attempt). Not how they are recognised: that is `Envelope::relay_made`.
pub fn relay_event_prefix(run_id: &str) -> String {
    format!("sr_{}_", run_id.replace('-', ""))
}

fn resource_of(payload: &Payload) -> String {
    payload
        .resource()
        .map_or_else(|| "unknown".to_string(), Cow::into_owned)
}

fn environment_of(run: &Run) -> Option<String> {
    run.sync_job
        .get("environment_id")
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn run_envelope(run: &Run, id: String, event: &str, payload: Map<String, Value>, now: i64) -> Envelope {
    Envelope {
        id,
        event: event.to_string(),
        sync_job_run_id: Some(run.id.clone()),
        webhook_id: run.webhook_id.clone(),
        callback_url: run.callback_url.as_deref().and_then(|u| Url::parse(u).ok()),
        environment_id: environment_of(run),
        created_at_ms: now,
        payload: Payload::made(payload),
        relay_made: true,
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(o) => o,
        _ => Map::new(),
    }
}

impl Runs {
    pub fn new(store: Store, limits: BatchLimits) -> Runs {
        Runs { store, limits }
    }

    pub fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn flush(&self, run: &Run, b: &mut Batch, now: i64) -> Option<Envelope> {
        if b.errors.is_empty() {
            return None;
        }
        b.seq += 1;
        let errors = std::mem::take(&mut b.errors);
        b.bytes = 0;
        b.since = None;
        let mut payload = Map::new();
        payload.insert("errors".into(), Value::Array(errors));
        Some(run_envelope(
            run,
            format!("{}errors_{}", relay_event_prefix(&run.id), b.seq),
            "sync_job_run:record_error",
            payload,
            now,
        ))
    }

    /// Decide what to do with one event. `None`: the relay does not know this run (an executor
    /// created it elsewhere, or it is not a run event): deliver as the event says.
    pub async fn on_ingest(&self, e: &Envelope) -> anyhow::Result<Option<Decision>> {
        Ok(self.on_ingest_many(&[e]).await?.pop().flatten())
    }

    /// [`Runs::on_ingest`] for a batch of events, in order, in one transaction: events of runs
    /// the relay does not know cost one read for the whole batch, and each known run is loaded
    /// and saved once however many of its events the batch holds.
    pub async fn on_ingest_many(&self, events: &[&Envelope]) -> anyhow::Result<Vec<Option<Decision>>> {
        let ids: BTreeSet<&str> = events.iter().filter_map(|e| e.sync_job_run_id.as_deref()).collect();
        if ids.is_empty() {
            return Ok(vec![None; events.len()]);
        }
        let ids: Vec<&str> = ids.into_iter().collect();
        self.store
            .with_runs(&ids, |runs| {
                let now = now_ms();
                events
                    .iter()
                    .map(|e| {
                        let r = runs.get_mut(e.sync_job_run_id.as_deref()?)?;
                        let (d, changed) = self.decide(&mut r.run, &mut r.batch, e, now);
                        r.changed |= changed;
                        Some(d)
                    })
                    .collect()
            })
            .await
    }

    /// The lifecycle rules for one event of a known run: the decision, and whether the run
    /// changed (and must be saved).
    fn decide(&self, run: &mut Run, batch: &mut Batch, e: &Envelope, now: i64) -> (Decision, bool) {
        let mut d = Decision {
            webhook_id: e.webhook_id.clone().or_else(|| run.webhook_id.clone()),
            sync_job_id: run.sync_job_id.clone(),
            callback_url: e
                .callback_url
                .clone()
                .or_else(|| run.callback_url.as_deref().and_then(|u| Url::parse(u).ok())),
            action: Action::Deliver,
            before: Vec::new(),
            after: Vec::new(),
        };
        if e.relay_made {
            // Made by the relay itself (batch flush, synthesized failed, API stop): already
            // decided. Never the id: a client may send any id, the flag only code sets.
            return (d, false);
        }
        let kind = e.event.strip_prefix("sync_job_run:").unwrap_or(&e.event);
        let is_record = matches!(kind, "record" | "record_error");
        let resource = resource_of(&e.payload);
        let status = run.status;

        if !status.is_active() {
            d.action = if status == Status::Failed && run.stop_reason.as_deref() == Some("fail_fast") {
                Action::Drop { reason: "run_failed" }
            } else if matches!(kind, "deleted" | "alert") {
                Action::Deliver
            } else {
                Action::DeadLetter { reason: "run_finished" }
            };
            if is_record {
                run.resource_stats.entry(resource).or_default().dropped += 1;
                run.updated_at = now;
            }
            return (d, is_record);
        }

        let mut illegal = false;
        match kind {
            "started" => match status {
                Status::Created | Status::RateLimited => {
                    run.status = Status::Running;
                    run.started_at = run.started_at.or(Some(now));
                }
                _ => illegal = true,
            },
            "rate_limited" => run.status = Status::RateLimited,
            "completed" | "failed" | "stopped" => {
                if kind == "completed" && status == Status::Created {
                    illegal = true;
                } else {
                    run.status = match kind {
                        "completed" => Status::Completed,
                        "failed" => Status::Failed,
                        _ => Status::Stopped,
                    };
                    if kind == "stopped" {
                        run.stop_reason = Some("executor".into());
                    }
                    run.finished_at = Some(now);
                    d.before.extend(self.flush(run, batch, now));
                }
            }
            "record" => {
                if status == Status::RateLimited {
                    run.status = Status::Running;
                }
                run.resource_stats.entry(resource).or_default().records += 1;
            }
            "record_error" => {
                if status == Status::RateLimited {
                    run.status = Status::Running;
                }
                run.resource_stats.entry(resource).or_default().errors += 1;
                match run.error_handling {
                    ErrorHandling::Ignore => {}
                    ErrorHandling::FailFast => {
                        run.status = Status::Failed;
                        run.stop_reason = Some("fail_fast".into());
                        run.finished_at = Some(now);
                        run.updated_at = now;
                        let mut payload = obj(run.to_json());
                        payload.insert("reason".into(), json!("fail_fast"));
                        payload.insert("error".into(), Value::Object(e.payload.map().clone()));
                        d.after.push(run_envelope(
                            run,
                            format!("{}failed", relay_event_prefix(&run.id)),
                            "sync_job_run:failed",
                            payload,
                            now,
                        ));
                    }
                    ErrorHandling::Batch => {
                        d.action = Action::Absorb;
                        let item = Value::Object(e.payload.map().clone());
                        let size = item.to_string().len() as i64;
                        // One more error would overflow the byte limit: send what we have first.
                        if !batch.errors.is_empty() && batch.bytes + size + 1 > self.limits.max_bytes as i64 {
                            d.after.extend(self.flush(run, batch, now));
                        }
                        batch.errors.push(item);
                        batch.bytes += size + 1;
                        batch.since = batch.since.or(Some(now));
                        if batch.errors.len() >= self.limits.max_errors || batch.bytes >= self.limits.max_bytes as i64 {
                            d.after.extend(self.flush(run, batch, now));
                        }
                    }
                }
            }
            // `created`, `updated`, `deleted`, `alert`, ...: delivered, the run is unchanged.
            _ => return (d, false),
        }
        if illegal {
            run.illegal_transitions += 1;
            d.action = Action::Drop {
                reason: "illegal_transition",
            };
        }
        run.updated_at = now;
        (d, true)
    }

    /// Count outcomes (run id, resource, delivered = answered 2xx, else dead-lettered; see
    /// [`counted_outcome`]) in one transaction of their own. The outcome writer counts in the
    /// transaction that records the outcomes instead (see [`count_into`]); this is for
    /// outcomes recorded elsewhere.
    pub async fn on_outcomes(&self, items: &[(&str, &str, bool)]) -> anyhow::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let ids = counted_runs(items.iter().map(|(run, _, _)| *run));
        self.store
            .with_runs(&ids, |runs| count_into(runs, items.iter().copied()))
            .await
    }

    /// Count records and record errors of a run that were queued but will not be delivered
    /// (dropped after the run stopped), one resource name per event.
    pub async fn note_dropped(&self, run_id: &str, resources: &[String]) -> anyhow::Result<()> {
        if resources.is_empty() {
            return Ok(());
        }
        self.store
            .with_runs(&[run_id], |runs| {
                let Some(r) = runs.get_mut(run_id) else {
                    return;
                };
                for res in resources {
                    r.run.resource_stats.entry(res.clone()).or_default().dropped += 1;
                }
                r.run.updated_at = now_ms();
                r.changed = true;
            })
            .await
    }

    /// The counts merged into a run's `completed` / `failed` payload at attempt time.
    pub async fn terminal_payload(&self, run_id: &str) -> anyhow::Result<Value> {
        let Some(run) = self.store.get_run(run_id).await? else {
            return Ok(json!({}));
        };
        Ok(counts(&run.resource_stats))
    }

    /// Stop an active run (e.g. its webhook answered 400 to `sync_job_run:started`, or the API
    /// was asked to). `None`: unknown or no longer active, nothing changed. `Some(flushed)`: the
    /// run is now `stopped`; `flushed` holds a batch of gathered errors to queue before any
    /// `sync_job_run:stopped` the caller sends.
    pub async fn stop(&self, run_id: &str, why: &str) -> anyhow::Result<Option<Vec<Envelope>>> {
        self.store
            .with_runs(&[run_id], |runs| {
                let r = runs.get_mut(run_id)?;
                if !r.run.status.is_active() {
                    return None;
                }
                let now = now_ms();
                r.run.status = Status::Stopped;
                r.run.stop_reason = Some(why.to_string());
                r.run.finished_at = Some(now);
                r.run.updated_at = now;
                r.changed = true;
                Some(self.flush(&r.run, &mut r.batch, now).into_iter().collect())
            })
            .await
    }

    /// Batch mode: the batches whose oldest error is at least `max_age_ms` old, taken off their
    /// runs. Queue them as they are (they carry the run's webhook and callback URL).
    pub async fn flush_due_batches(&self) -> anyhow::Result<Vec<Envelope>> {
        let now = now_ms();
        let due_since = now - self.limits.max_age_ms;
        let ids = self.store.runs_with_due_batches(due_since, 1000).await?;
        let mut out = Vec::new();
        // One transaction per run, so a long list never holds the write lock for long.
        for id in ids {
            let flushed = self
                .store
                .with_runs(&[id.as_str()], |runs| {
                    let r = runs.get_mut(&id)?;
                    if r.batch.since.is_none_or(|s| s > due_since) {
                        return None;
                    }
                    let e = self.flush(&r.run, &mut r.batch, now)?;
                    r.changed = true;
                    Some(e)
                })
                .await?;
            out.extend(flushed);
        }
        Ok(out)
    }
}

/// `records_delivered`, `records_dead_lettered`, `records_dropped` (totals), `record_errors`
/// (per resource) and the full `resource_stats`.
pub fn counts(stats: &Stats) -> Value {
    let delivered: i64 = stats.values().map(|s| s.records_delivered).sum();
    let dead: i64 = stats.values().map(|s| s.records_dead_lettered).sum();
    let dropped: i64 = stats.values().map(|s| s.dropped).sum();
    let errors: Map<String, Value> = stats
        .iter()
        .filter(|(_, s)| s.errors > 0)
        .map(|(k, s)| (k.clone(), json!(s.errors)))
        .collect();
    json!({
        "records_delivered": delivered,
        "records_dead_lettered": dead,
        "records_dropped": dropped,
        "record_errors": errors,
        "resource_stats": stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{StoreKind, StoreSettings, Synchronous};
    use crate::runs::model::Run;

    const WEBHOOK: &str = "9b0c2a7e-4d7b-4f4e-9a59-0d4b8f1c2e3a";

    async fn store(dir: &tempfile::TempDir) -> Store {
        Store::open(&StoreSettings {
            kind: StoreKind::Sqlite,
            path: dir.path().join("runs.db"),
            url: String::new(),
            max_connections: 2,
            synchronous: Synchronous::Normal,
            lease_ms: 60_000,
            encryption_key: String::new(),
            previous_encryption_keys: Vec::new(),
        })
        .await
        .unwrap()
    }

    async fn new_run(store: &Store, mode: ErrorHandling) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let run = Run {
            id: id.clone(),
            sync_job_id: uuid::Uuid::new_v4().to_string(),
            integrated_account_id: uuid::Uuid::new_v4().to_string(),
            webhook_id: Some(WEBHOOK.into()),
            daemon_group_key: None,
            daemon_id: None,
            callback_url: Some("https://cb.example.com/hook".into()),
            args: json!({}),
            resources: json!([]),
            sync_job: json!({"environment_id": "env_1"}),
            error_handling: mode,
            ignore_previous_run: false,
            status: Status::Created,
            resource_stats: Stats::new(),
            illegal_transitions: 0,
            stop_reason: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            sync_unit_id: None,
            seq: 0,
        };
        store.insert_run(&run).await.unwrap();
        id
    }

    fn ev(run: &str, n: usize, kind: &str, resource: &str) -> Envelope {
        let mut payload = Map::new();
        payload.insert("resource".into(), json!(resource));
        payload.insert("n".into(), json!(n));
        Envelope {
            id: format!("e{n}"),
            event: format!("sync_job_run:{kind}"),
            sync_job_run_id: Some(run.into()),
            webhook_id: None,
            callback_url: None,
            environment_id: None,
            created_at_ms: 0,
            payload: Payload::made(payload),
            relay_made: false,
        }
    }

    /// Feed a script; return (event id, action, before ids, after ids) per event.
    async fn feed(runs: &Runs, run: &str, script: &[(&str, &str)]) -> Vec<(Action, Vec<Envelope>, Vec<Envelope>)> {
        let mut out = Vec::new();
        for (n, (kind, res)) in script.iter().enumerate() {
            let d = runs
                .on_ingest(&ev(run, n, kind, res))
                .await
                .unwrap()
                .expect("known run");
            assert_eq!(d.webhook_id.as_deref(), Some(WEBHOOK));
            assert_eq!(
                d.callback_url.as_ref().map(Url::as_str),
                Some("https://cb.example.com/hook")
            );
            out.push((d.action, d.before, d.after));
        }
        out
    }

    async fn status(store: &Store, run: &str) -> Run {
        store.get_run(run).await.unwrap().unwrap()
    }

    const SCRIPT: [(&str, &str); 7] = [
        ("started", ""),
        ("record", "ticketing/tickets"),
        ("record_error", "ticketing/tickets"),
        ("record", "ticketing/tickets"),
        ("record_error", "ticketing/comments"),
        ("record", "ticketing/comments"),
        ("completed", ""),
    ];

    #[tokio::test]
    async fn ignore_mode_delivers_every_record_error_and_completes() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let runs = Runs::new(store.clone(), BatchLimits::default());
        let run = new_run(&store, ErrorHandling::Ignore).await;
        let got = feed(&runs, &run, &SCRIPT).await;
        for (a, b, af) in &got {
            assert_eq!(*a, Action::Deliver);
            assert!(b.is_empty() && af.is_empty());
        }
        let r = status(&store, &run).await;
        assert_eq!(r.status, Status::Completed);
        assert!(r.started_at.is_some() && r.finished_at.is_some());
        assert_eq!(r.resource_stats["ticketing/tickets"].records, 2);
        assert_eq!(r.resource_stats["ticketing/tickets"].errors, 1);
        assert_eq!(r.resource_stats["ticketing/comments"].errors, 1);
        // Events after the end are dead-lettered.
        let d = runs.on_ingest(&ev(&run, 99, "record", "x")).await.unwrap().unwrap();
        assert_eq!(d.action, Action::DeadLetter { reason: "run_finished" });
    }

    #[tokio::test]
    async fn fail_fast_fails_on_the_first_error_then_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let runs = Runs::new(store.clone(), BatchLimits::default());
        let run = new_run(&store, ErrorHandling::FailFast).await;
        let got = feed(&runs, &run, &SCRIPT).await;
        let actions: Vec<Action> = got.iter().map(|g| g.0.clone()).collect();
        let drop = Action::Drop { reason: "run_failed" };
        assert_eq!(
            actions,
            vec![
                Action::Deliver,
                Action::Deliver,
                Action::Deliver,
                drop.clone(),
                drop.clone(),
                drop.clone(),
                drop
            ]
        );
        let after = &got[2].2;
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].event, "sync_job_run:failed");
        assert_eq!(after[0].webhook_id.as_deref(), Some(WEBHOOK));
        assert_eq!(after[0].environment_id.as_deref(), Some("env_1"));
        assert_eq!(after[0].payload.map()["error"]["n"], 2);
        // The synthesized event passes through when fed back.
        let back = runs.on_ingest(&after[0]).await.unwrap().unwrap();
        assert_eq!(back.action, Action::Deliver);
        // The same id from a client (issue 13: ids are not proof of origin) gets the rules.
        let forged = Envelope {
            relay_made: false,
            ..after[0].clone()
        };
        let d = runs.on_ingest(&forged).await.unwrap().unwrap();
        assert_eq!(d.action, Action::Drop { reason: "run_failed" });
        let r = status(&store, &run).await;
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.stop_reason.as_deref(), Some("fail_fast"));
        assert_eq!(r.resource_stats["ticketing/tickets"].dropped, 1);
        assert_eq!(r.resource_stats["ticketing/comments"].dropped, 2);
        let c = runs.terminal_payload(&run).await.unwrap();
        assert_eq!(c["records_dropped"], 3);
        assert_eq!(c["record_errors"], json!({"ticketing/tickets": 1}));
    }

    #[tokio::test]
    async fn batch_mode_absorbs_errors_and_flushes_by_count_and_before_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let limits = BatchLimits {
            max_errors: 2,
            max_bytes: 1 << 20,
            max_age_ms: 60_000,
        };
        let runs = Runs::new(store.clone(), limits);
        let run = new_run(&store, ErrorHandling::Batch).await;
        let script = [
            ("started", ""),
            ("record_error", "a"),
            ("record", "a"),
            ("record_error", "a"),
            ("record_error", "b"),
            ("completed", ""),
        ];
        let got = feed(&runs, &run, &script).await;
        let actions: Vec<Action> = got.iter().map(|g| g.0.clone()).collect();
        assert_eq!(
            actions,
            vec![
                Action::Deliver,
                Action::Absorb,
                Action::Deliver,
                Action::Absorb,
                Action::Absorb,
                Action::Deliver
            ]
        );
        // Full at the second error: flushed after it.
        assert!(got[1].2.is_empty());
        let full = &got[3].2;
        assert_eq!(full.len(), 1);
        assert_eq!(full[0].event, "sync_job_run:record_error");
        let ns: Vec<Value> = full[0].payload.map()["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["n"].clone())
            .collect();
        assert_eq!(ns, vec![json!(1), json!(3)]);
        // The rest goes before completed.
        let before = &got[5].1;
        assert_eq!(before.len(), 1);
        assert_eq!(before[0].payload.map()["errors"].as_array().unwrap().len(), 1);
        assert_ne!(before[0].id, full[0].id);
        assert_eq!(
            runs.on_ingest(&before[0]).await.unwrap().unwrap().action,
            Action::Deliver
        );
        let r = status(&store, &run).await;
        assert_eq!(r.status, Status::Completed);
        assert_eq!(r.resource_stats["a"].errors, 2);
        assert_eq!(r.resource_stats["b"].errors, 1);
    }

    #[tokio::test]
    async fn batch_mode_flushes_by_bytes_and_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let runs = Runs::new(
            store.clone(),
            BatchLimits {
                max_errors: 1000,
                max_bytes: 60,
                max_age_ms: 0,
            },
        );
        let run = new_run(&store, ErrorHandling::Batch).await;
        // Each error is ~30 bytes: the second fits, the third overflows and flushes the first two.
        let got = feed(
            &runs,
            &run,
            &[
                ("started", ""),
                ("record_error", "r"),
                ("record_error", "r"),
                ("record_error", "r"),
            ],
        )
        .await;
        assert!(got[1].2.is_empty());
        let flushed: usize = got.iter().map(|g| g.2.len()).sum();
        assert!(flushed >= 1, "a batch was flushed by size");
        for g in &got {
            for e in &g.2 {
                assert!(
                    e.payload.map()["errors"].to_string().len() <= 62,
                    "{}",
                    e.payload.map()["errors"]
                );
            }
        }
        // Age 0: what is left is due now.
        let due = runs.flush_due_batches().await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].sync_job_run_id.as_deref(), Some(run.as_str()));
        assert!(runs.flush_due_batches().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn illegal_transitions_are_refused_and_counted_and_stop_ends_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let runs = Runs::new(store.clone(), BatchLimits::default());
        let run = new_run(&store, ErrorHandling::Ignore).await;
        let got = feed(
            &runs,
            &run,
            &[
                ("completed", ""),
                ("started", ""),
                ("started", ""),
                ("rate_limited", ""),
                ("started", ""),
                ("record", "x"),
            ],
        )
        .await;
        let ill = Action::Drop {
            reason: "illegal_transition",
        };
        let actions: Vec<Action> = got.iter().map(|g| g.0.clone()).collect();
        assert_eq!(
            actions,
            vec![
                ill.clone(),
                Action::Deliver,
                ill,
                Action::Deliver,
                Action::Deliver,
                Action::Deliver
            ]
        );
        let r = status(&store, &run).await;
        assert_eq!(r.illegal_transitions, 2);
        assert_eq!(r.status, Status::Running);
        // Outcomes count per resource.
        runs.on_outcomes(&[(run.as_str(), "x", true), (run.as_str(), "x", false)])
            .await
            .unwrap();
        let c = runs.terminal_payload(&run).await.unwrap();
        assert_eq!(c["records_delivered"], 1);
        assert_eq!(c["records_dead_lettered"], 1);
        // A 400 to started: stop.
        assert!(runs.stop(&run, "started_rejected").await.unwrap().is_some());
        assert!(runs.stop(&run, "again").await.unwrap().is_none());
        let d = runs.on_ingest(&ev(&run, 50, "record", "x")).await.unwrap().unwrap();
        assert_eq!(d.action, Action::DeadLetter { reason: "run_finished" });
        let r = status(&store, &run).await;
        assert_eq!(r.status, Status::Stopped);
        assert_eq!(r.stop_reason.as_deref(), Some("started_rejected"));
        // Unknown runs: no decision.
        assert!(runs
            .on_ingest(&ev(&uuid::Uuid::new_v4().to_string(), 1, "record", "x"))
            .await
            .unwrap()
            .is_none());
    }
}
