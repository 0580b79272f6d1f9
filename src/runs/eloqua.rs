//! Eloqua-style bulk syncs (CONTRACT §3): a sync is a front door over one run. Its status is
//! its run's, in Eloqua's words; when the run finishes, one signed callback carries the sync.

use serde_json::{json, Value};

use super::model::{Run, Status};
use crate::domain::rfc3339_ms;
use crate::store::EloquaSync;

/// An Eloqua sync's run has no sync job (Eloqua has none): its `sync_job_id` is this nil UUID
/// and its `sync_job` names the sync.
pub const NO_SYNC_JOB: &str = "00000000-0000-0000-0000-000000000000";

/// The event of the sync's callback (its body's `event`).
pub const CALLBACK_EVENT: &str = "eloqua_sync:finished";

/// Records delivered, record errors, records dead-lettered.
pub fn totals(run: &Run) -> (i64, i64, i64) {
    let s = run.resource_stats.values();
    let (mut d, mut e, mut x) = (0, 0, 0);
    for r in s {
        d += r.records_delivered;
        e += r.errors;
        x += r.records_dead_lettered;
    }
    (d, e, x)
}

/// `pending` (created) → `active` (started, rate limited) → `success` (completed, no record
/// errors, nothing dead-lettered) | `warning` (completed with record errors or dead letters) |
/// `error` (failed or stopped).
pub fn status_of(run: &Run) -> &'static str {
    match run.status {
        Status::Created => "pending",
        Status::Running | Status::RateLimited => "active",
        Status::Completed => {
            let (_, errors, dead) = totals(run);
            if errors > 0 || dead > 0 {
                "warning"
            } else {
                "success"
            }
        }
        Status::Failed | Status::Stopped => "error",
    }
}

/// Finished in Eloqua's sense: the run reached a final status.
pub fn is_finished(run: &Run) -> bool {
    !run.status.is_active()
}

pub fn uri_of(s: &EloquaSync) -> String {
    format!("/syncs/{}", s.n)
}

/// The sync resource (Eloqua's shape). `run`: the sync's run, when it has one.
pub fn sync_json(s: &EloquaSync, run: Option<&Run>) -> Value {
    let status = run.map(status_of).unwrap_or(s.status.as_str());
    let mut v = json!({
        "syncedInstanceUri": s.synced_instance_uri,
        "callbackUrl": s.callback_url,
        "status": status,
        "createdAt": rfc3339_ms(s.created_at),
        "createdBy": s.created_by,
        "uri": uri_of(s),
    });
    if let Some(r) = run {
        if let Some(t) = r.started_at {
            v["syncStartedAt"] = json!(rfc3339_ms(t));
        }
        if let Some(t) = r.finished_at {
            v["syncEndedAt"] = json!(rfc3339_ms(t));
        }
        v["sync_job_run_id"] = json!(r.id);
    }
    v
}

/// The sync's log items (Eloqua's shape): records delivered, record errors, dead letters, and
/// the final status once finished. Status codes are the relay's, in Eloqua's `ELQ-` style.
pub fn log_items(s: &EloquaSync, run: &Run) -> Vec<Value> {
    let (delivered, errors, dead) = totals(run);
    let uri = uri_of(s);
    let at = rfc3339_ms(run.updated_at);
    let item = |count: i64, severity: &str, code: &str, message: String| {
        json!({"syncUri": uri, "count": count, "severity": severity, "statusCode": code,
               "message": message, "createdAt": at})
    };
    let mut out = vec![item(
        delivered,
        "information",
        "ELQ-00040",
        format!("{delivered} records delivered."),
    )];
    if errors > 0 {
        out.push(item(
            errors,
            "warning",
            "ELQ-00041",
            format!("{errors} record errors reported."),
        ));
    }
    if dead > 0 {
        out.push(item(
            dead,
            "warning",
            "ELQ-00042",
            format!("{dead} records dead-lettered."),
        ));
    }
    if is_finished(run) {
        let status = status_of(run);
        let severity = if status == "error" { "error" } else { "information" };
        out.push(item(
            0,
            severity,
            "ELQ-00101",
            format!("Sync processed for sync {uri}, resulting in {status} status."),
        ));
    }
    out
}
