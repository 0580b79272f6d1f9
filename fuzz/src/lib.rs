//! The fuzz targets' bodies: each takes untrusted bytes, must never panic, and checks what must
//! hold of what it accepts. `fuzz_targets/*.rs` hand them to libFuzzer (`cargo fuzz`, nightly);
//! `tests/corpus.rs` runs them over the seed corpus and mutations of it on any toolchain.

use std::time::{Duration, SystemTime};

use actix_web::ResponseError;
use serde::Deserialize;
use serde_json::Value;
use syncrelay::api::parse_events;
use syncrelay::delivery::retry::{parse_retry_after, RetryPolicy};
use syncrelay::domain::Envelope;
use syncrelay::error::{parse_json, ApiError};
use syncrelay::runs::validate::{compile_args_schema, validate_args, validate_job, MAX_RESOURCES};
use syncrelay::runs::ResourceSpec;

/// 2025-11-24T16:00:00Z, a fixed "now".
const NOW_MS: i64 = 1_764_000_000_000;

/// A refusal is a typed 4xx naming what it refuses, never an internal error.
fn check_refusal(e: &ApiError) {
    let status = e.status_code().as_u16();
    assert!((400..500).contains(&status), "refusal {e:?} is {status}");
    let _ = e.error_response();
}

/// `POST /events` bodies: `api::parse_events` (repeated keys, batch and event sizes, then
/// `domain::Envelope::parse` per event).
pub fn envelope(data: &[u8]) {
    for https_only in [false, true] {
        match parse_events(data, 1000, 256 * 1024, https_only, NOW_MS) {
            Ok(req) => {
                assert!(!req.events.is_empty() && req.events.len() <= 1000);
                for e in &req.events {
                    assert!((1..=128).contains(&e.id.len()), "{:?}", e.id);
                    assert!(e.event.contains(':'));
                    if e.event.starts_with("sync_job_run:") {
                        assert!(e.sync_job_run_id.is_some());
                    }
                    assert!(e.webhook_id.is_some() || e.sync_job_run_id.is_some());
                    if let Some(u) = &e.callback_url {
                        assert!(u.scheme() == "https" || (!https_only && u.scheme() == "http"), "{u}");
                    }
                    // The delivery body is compact JSON carrying the event's fields.
                    let body: Value = serde_json::from_str(&e.body(e.webhook_id.as_deref())).expect("body is JSON");
                    assert_eq!(body["id"], e.id.as_str());
                    assert_eq!(body["event"], e.event.as_str());
                    let created = body["created_at"].as_str().expect("created_at");
                    assert_eq!(
                        syncrelay::domain::parse_rfc3339_ms(created),
                        Some(e.created_at_ms),
                        "created_at {created} does not stand for {} ms",
                        e.created_at_ms
                    );
                    // The normalised form (dead letters, replay) parses back to the same event.
                    let again = Envelope::parse(e.to_json(), NOW_MS, https_only).expect("to_json parses back");
                    assert_eq!(again.body(None), e.body(None));
                }
            }
            Err(e) => check_refusal(&e),
        }
    }
}

/// A sync job as `POST /sync-job` takes it, plus run `args` to check against its schema.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Job {
    integration_name: String,
    #[serde(default)]
    args_schema: Option<Value>,
    resources: Vec<ResourceSpec>,
    #[serde(default)]
    args: Option<Value>,
}

/// Sync job validation (`runs::validate::validate_job`) and run args against the job's schema.
pub fn sync_job(data: &[u8]) {
    let mut job: Job = match parse_json(data) {
        Ok(j) => j,
        Err(e) => return check_refusal(&e),
    };
    match validate_job(&job.integration_name, job.args_schema.as_ref(), &mut job.resources) {
        Ok(()) => {
            assert!(!job.resources.is_empty() && job.resources.len() <= MAX_RESOURCES);
            for r in &job.resources {
                assert!(r.persist.is_some(), "persist is filled in");
                if r.is_unified() {
                    assert_eq!(r.persist, Some(true), "unified resources are persisted");
                }
            }
            // Validation is idempotent: a stored job validates again unchanged (PATCH relies on it).
            let mut again = job.resources.clone();
            validate_job(&job.integration_name, job.args_schema.as_ref(), &mut again).expect("valid twice");
            assert_eq!(again, job.resources);
            if let Some(schema) = &job.args_schema {
                let v = compile_args_schema(schema).expect("a valid job's schema compiles");
                if let Some(args) = &job.args {
                    if let Err(e) = validate_args(&v, args) {
                        check_refusal(&e);
                    }
                }
            }
        }
        Err(e) => {
            check_refusal(&e);
            assert!(
                matches!(&e, ApiError::BadRequest { field: Some(_), .. }),
                "a job refusal names its field: {e:?}"
            );
        }
    }
}

/// `Retry-After` values (`delivery::retry::parse_retry_after`) and the delay they lead to.
pub fn retry_after(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_millis(NOW_MS as u64);
    let parsed = parse_retry_after(s, now);
    if let Ok(n) = s.trim().parse::<u64>() {
        assert_eq!(parsed, Some(Duration::from_secs(n)));
    }
    static POLICY: std::sync::OnceLock<RetryPolicy> = std::sync::OnceLock::new();
    let policy = POLICY.get_or_init(|| {
        let settings = syncrelay::config::Settings::load(None, Vec::<(String, String)>::new()).expect("defaults");
        RetryPolicy::from(&settings.delivery.retry)
    });
    let bound = policy
        .retry_after_ceiling
        .max(policy.max_interval.mul_f64(1.0 + policy.randomization_factor))
        + Duration::from_millis(1);
    for attempts in [0, 1, 2, 5, policy.max_attempts.saturating_sub(1)] {
        for elapsed in [Duration::ZERO, Duration::from_secs(3600)] {
            if let Some(d) = policy.next_delay(attempts, elapsed, parsed) {
                assert!(d <= bound, "{s:?}: delay {d:?} above {bound:?}");
                if let Some(ra) = parsed {
                    assert!(
                        d >= ra.min(policy.retry_after_ceiling),
                        "{s:?}: Retry-After not honoured"
                    );
                }
            }
        }
    }
}

/// List cursors (`store::parse_cursor`): a cursor is the decimal `seq` the API returned.
pub fn cursor(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match syncrelay::store::parse_cursor(Some(s)) {
        Ok(n) => {
            if !s.is_empty() {
                assert_eq!(s.parse::<i64>().ok(), Some(n));
            }
            assert_eq!(syncrelay::store::parse_cursor(Some(&n.to_string())).ok(), Some(n));
        }
        Err(e) => {
            check_refusal(&e);
            assert!(s.parse::<i64>().is_err(), "{s:?} refused");
        }
    }
}
