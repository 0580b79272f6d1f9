//! Census-style sync alerts (CONTRACT §3, Census syncs: alerts). Each alert of a sync is
//! evaluated once per run of the sync's source job (the store records the run, so however many
//! paths or instances see the run move, one evaluates it), and what it decides is a
//! `sync_job_run:alert` operational event to the webhooks subscribed to it, and a metric.
//!
//! - `InvalidRecordPercent`: at the run's end, failed = record errors + records dead-lettered,
//!   over all records (records + record errors); it fires when something failed and the
//!   percentage is at or above the threshold.
//! - `Failure`: at the run's end, it fires when the run failed or was stopped.
//! - `send_for: first_time` sends when the alert starts firing (not again while later runs keep
//!   it firing); `every_time` sends for every run that fires it. `should_send_recovery` (default
//!   true) sends one `recovered` when a later run no longer fires it.
//! - `Status`: every run's `started` and its end (`completed`, `failed`, `stopped`), each once;
//!   `options.status` keeps one of the two. No recovery.

use serde_json::{json, Value};

use super::{Alert, AlertKind, Sync, ALERT_EVENT};
use crate::delivery::engine::Engine;
use crate::domain::Envelope;
use crate::runs::model::{Run, Status};

/// (failed, all records, percentage) of a run.
pub fn invalid_records(run: &Run) -> (i64, i64, f64) {
    let (mut records, mut errors, mut dead) = (0, 0, 0);
    for s in run.resource_stats.values() {
        records += s.records;
        errors += s.errors;
        dead += s.records_dead_lettered;
    }
    let failed = errors + dead;
    let all = records + errors;
    let pct = if all == 0 {
        0.0
    } else {
        (failed as f64 * 100.0 / all as f64).min(100.0)
    };
    (failed, all, pct)
}

/// What an alert evaluates for this run now: (state key, firing, observed value). Empty when
/// the run has not reached the point the alert looks at.
pub fn checks(a: &Alert, run: &Run) -> Vec<(String, bool, Value)> {
    let finished = !run.status.is_active();
    match a.kind {
        AlertKind::InvalidRecordPercent if finished => {
            let (failed, _, pct) = invalid_records(run);
            let t = a.threshold.unwrap_or(100.0);
            vec![(
                a.kind.as_str().into(),
                failed > 0 && pct >= t,
                json!((pct * 100.0).round() / 100.0),
            )]
        }
        AlertKind::Failure if finished => vec![(
            a.kind.as_str().into(),
            matches!(run.status, Status::Failed | Status::Stopped),
            json!(run.status.as_str()),
        )],
        AlertKind::Status => {
            let mut out = Vec::new();
            if run.started_at.is_some() && a.status.as_deref() != Some("completed") {
                out.push(("Status:started".into(), true, json!("started")));
            }
            if finished && a.status.as_deref() != Some("started") {
                out.push(("Status:completed".into(), true, json!(run.status.as_str())));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// What to send, given whether the alert fires for this run and fired for the previous one.
pub fn decide(a: &Alert, firing: bool, was_firing: bool) -> Option<&'static str> {
    match (a.kind, firing) {
        (AlertKind::Status, _) => Some("triggered"),
        (_, true) if a.every_time || !was_firing => Some("triggered"),
        (_, false) if was_firing && a.should_send_recovery => Some("recovered"),
        _ => None,
    }
}

/// The alert event's payload.
pub fn payload(s: &Sync, a: &Alert, run: &Run, observed: Value, state: &str) -> Value {
    json!({
        "sync_id": s.id,
        "alert_type": a.kind.as_str(),
        "threshold": a.threshold,
        "observed_value": observed,
        "state": state,
        "sync_job_run_id": run.id,
        "sync_job_id": run.sync_job_id,
        "send_for": if a.every_time { "every_time" } else { "first_time" },
        "destination_object": s.config.destination_object,
    })
}

/// Runs among these events whose syncs' alerts may have something new to say.
pub fn alert_runs<'a>(events: impl IntoIterator<Item = &'a Envelope>) -> Vec<String> {
    let mut ids: Vec<String> = events
        .into_iter()
        .filter(|e| {
            matches!(
                e.event.as_str(),
                "sync_job_run:started"
                    | "sync_job_run:completed"
                    | "sync_job_run:failed"
                    | "sync_job_run:stopped"
                    | "sync_job_run:record_error"
            )
        })
        .filter_map(|e| e.sync_job_run_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

impl Engine {
    /// Evaluate the alerts of the syncs of these runs' jobs (boxed: it queues through
    /// `Engine::queue`, which calls it).
    pub fn sync_alerts<'a>(
        &'a self,
        run_ids: &'a [String],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            if self.syncs.is_empty() {
                return;
            }
            for id in run_ids {
                if let Err(e) = self.sync_alerts_of(id).await {
                    tracing::error!(error = %format!("{e:#}"), run_id = %id, "evaluating sync alerts failed");
                }
            }
        })
    }

    async fn sync_alerts_of(&self, run_id: &str) -> anyhow::Result<()> {
        let Some(run) = self.store.get_run(run_id).await? else {
            return Ok(());
        };
        for s in self.syncs.for_job(&run.sync_job_id) {
            for a in &s.config.alerts {
                for (key, firing, observed) in checks(a, &run) {
                    let Some(was) = self.store.runs().census_alert_step(s.id, &key, &run.id, firing).await? else {
                        continue;
                    };
                    let Some(state) = decide(a, firing, was) else {
                        continue;
                    };
                    self.metrics
                        .sync_alerts
                        .with_label_values(&[a.kind.as_str(), state])
                        .inc();
                    tracing::info!(sync_id = s.id, alert = a.kind.as_str(), state, run_id, "sync alert");
                    self.broadcast(ALERT_EVENT, payload(&s, a, &run, observed, state), None)
                        .await?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::model::{ErrorHandling, ResourceStats};

    fn alert(kind: AlertKind, every_time: bool, recovery: bool, threshold: Option<f64>) -> Alert {
        Alert {
            kind,
            type_name: kind.as_str().into(),
            every_time,
            should_send_recovery: recovery,
            threshold,
            status: None,
        }
    }

    fn run(status: Status, records: i64, errors: i64, dead: i64) -> Run {
        let mut stats = crate::runs::model::Stats::new();
        stats.insert(
            "r".into(),
            ResourceStats {
                records,
                errors,
                records_dead_lettered: dead,
                ..Default::default()
            },
        );
        Run {
            id: "run".into(),
            sync_job_id: "job".into(),
            integrated_account_id: "acc".into(),
            webhook_id: None,
            daemon_group_key: None,
            daemon_id: None,
            callback_url: None,
            args: Value::Null,
            resources: Value::Null,
            sync_job: Value::Null,
            error_handling: ErrorHandling::Ignore,
            ignore_previous_run: false,
            status,
            resource_stats: stats,
            illegal_transitions: 0,
            stop_reason: None,
            created_at: 0,
            updated_at: 0,
            started_at: Some(0),
            finished_at: None,
            sync_unit_id: None,
            seq: 0,
        }
    }

    #[test]
    fn invalid_record_percent_fires_at_the_threshold() {
        let a = alert(AlertKind::InvalidRecordPercent, false, true, Some(50.0));
        // 2 record errors + 1 dead letter over 4 records + 2 errors = 50 %.
        let c = checks(&a, &run(Status::Completed, 4, 2, 1));
        assert_eq!(c, vec![("InvalidRecordPercent".into(), true, json!(50.0))]);
        let c = checks(&a, &run(Status::Completed, 5, 2, 0));
        assert!(!c[0].1, "28.57 % is under 50 %");
        assert!(
            checks(&a, &run(Status::Running, 4, 2, 1)).is_empty(),
            "only at the run's end"
        );
        let zero = alert(AlertKind::InvalidRecordPercent, false, true, Some(0.0));
        assert!(!checks(&zero, &run(Status::Completed, 3, 0, 0))[0].1, "nothing failed");
        assert!(!checks(&zero, &run(Status::Completed, 0, 0, 0))[0].1, "no records");
    }

    #[test]
    fn first_time_sends_once_every_time_each_run_and_recovery_once() {
        let first = alert(AlertKind::Failure, false, true, None);
        assert_eq!(decide(&first, true, false), Some("triggered"));
        assert_eq!(decide(&first, true, true), None);
        assert_eq!(decide(&first, false, true), Some("recovered"));
        assert_eq!(decide(&first, false, false), None);
        let every = alert(AlertKind::Failure, true, false, None);
        assert_eq!(decide(&every, true, true), Some("triggered"));
        assert_eq!(decide(&every, false, true), None, "no recovery asked");
    }

    #[test]
    fn failure_and_status_look_at_the_run_status() {
        let f = alert(AlertKind::Failure, false, true, None);
        assert!(checks(&f, &run(Status::Failed, 0, 0, 0))[0].1);
        assert!(checks(&f, &run(Status::Stopped, 0, 0, 0))[0].1);
        assert!(!checks(&f, &run(Status::Completed, 0, 0, 0))[0].1);
        let s = alert(AlertKind::Status, false, true, None);
        let keys: Vec<String> = checks(&s, &run(Status::Completed, 0, 0, 0))
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(keys, ["Status:started", "Status:completed"]);
        let mut only = s.clone();
        only.status = Some("started".into());
        assert_eq!(checks(&only, &run(Status::Completed, 0, 0, 0)).len(), 1);
    }
}
