//! One attempt, the same for every job whatever bus it came from:
//! prepare (target, secrets, body) → sign → POST → classify → schedule → outcome.
//! Whether to retry and when are `retry`'s; what the outcome does is `outcome`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use url::Url;

use super::client::{Attempt, DeliveryHeader};
use super::dead_letter::{dead_letter, Cause};
use super::engine::Engine;
use super::job::{Job, Origin};
use super::retry::{classify, is_overload, result_label, AttemptResult, Verdict};
use crate::domain::now_ms;
use crate::signing::{signature_headers, Secret};
use crate::store::{AttemptRecord, NewDeadLetter, Next};

/// What an attempt decided for its job.
pub(super) struct Decided {
    /// The attempt made (None: the job could not be attempted, e.g. its webhook is gone).
    pub record: Option<AttemptRecord>,
    pub next: Next,
    /// The body sent, when it differs from the queued one (a run's final counts).
    pub body: Option<String>,
    /// `payload.resource` of a run's record delivered to its webhook (run outcome counts).
    pub resource: Option<String>,
}

impl Engine {
    /// The URL and secrets for a delivery, or why it cannot be attempted.
    pub fn target(
        &self,
        kind: &str,
        webhook_id: Option<&str>,
        target_url: Option<&str>,
        now: i64,
    ) -> Result<(Url, Vec<Secret>), &'static str> {
        if kind == "callback" {
            let url = target_url.and_then(|u| Url::parse(u).ok()).ok_or("malformed")?;
            return Ok((url, vec![self.callback_secret.clone()]));
        }
        let id = webhook_id.ok_or("unknown_webhook")?;
        let (w, url) = self.webhooks.get_with_url(id).ok_or("unknown_webhook")?;
        if !w.is_active {
            return Err("webhook_disabled");
        }
        let url = url.ok_or("malformed")?;
        let mut secrets = vec![w.secret.clone()];
        if let Some((prev, until)) = &w.previous_secret {
            if *until > now {
                secrets.push(prev.clone());
            }
        }
        Ok((url, secrets))
    }

    /// One signed POST (used by deliveries and by `POST /webhook/{id}/test`).
    pub async fn send(&self, url: &Url, secrets: &[Secret], event_id: &str, attempt_no: i64, body: String) -> Attempt {
        let ts = now_ms() / 1000;
        let refs: Vec<&Secret> = secrets.iter().collect();
        let (sig, truto) = signature_headers(&refs, event_id, ts, body.as_bytes());
        let headers = [
            (DeliveryHeader::WebhookId, event_id.to_string()),
            (DeliveryHeader::WebhookTimestamp, ts.to_string()),
            (DeliveryHeader::WebhookSignature, sig),
            (DeliveryHeader::TrutoSignature, truto),
            (DeliveryHeader::WebhookAttempt, attempt_no.to_string()),
        ];
        self.client.post(url, &headers, body).await
    }

    /// Attempt a job the dispatcher started (its request slot is taken), then hand the outcome
    /// on. Runs as its own task.
    pub(super) async fn attempt(self: Arc<Self>, job: Job) {
        if let Origin::Memory { ack, .. } = &job.origin {
            if !ack.current() {
                // Its partition was taken from us: the new owner delivers it.
                self.request_done(&job.q.target_key);
                return self.drop_revoked(job);
            }
        }
        let decided = self.decide(&job).await;
        self.finish(job, decided).await;
    }

    async fn decide(&self, job: &Job) -> Decided {
        let q = &job.q;
        let now = now_ms();
        let attempt_no = q.attempts + 1;
        let kind = job.kind();
        let resource = if kind == "webhook" && q.run_id.is_some() {
            record_resource(&q.event, &q.body)
        } else {
            None
        };
        if kind == "webhook" {
            self.know_webhooks(q.webhook_id.as_deref().into_iter()).await;
        }
        let (url, secrets) = match self.target(kind, q.webhook_id.as_deref(), q.target_url.as_deref(), now) {
            Ok(t) => t,
            Err(reason) => {
                self.request_done(&q.target_key);
                return Decided {
                    record: None,
                    next: Next::Dead(dead(job, reason, None, Some(reason.to_string()), q.attempts, &q.body)),
                    body: None,
                    resource,
                };
            }
        };
        if job.is_memory() && is_terminal(&q.event) {
            // A run's final counts include every earlier delivery of its chain: their
            // outcomes, handed to the writer before this job became the head, are committed.
            self.barrier().await;
        }
        let final_body = self.attempt_body(&q.event, q.run_id.as_deref(), &q.body).await;
        // The body sent: the one copy the request takes; dead letters borrow it.
        let body: &str = final_body.as_deref().unwrap_or(&q.body);
        let sent = Instant::now();
        let a = self
            .send(&url, &secrets, &q.event_id, attempt_no, body.to_owned())
            .await;
        if let AttemptResult::Status {
            code: 429 | 503,
            retry_after: Some(ra),
        } = &a.result
        {
            // The receiver asked for a pause: the whole target waits, not only this event
            // (before the slot is freed, so nothing else to it starts meanwhile).
            self.targets.pause(
                &q.target_key,
                Instant::now() + (*ra).min(self.policy.retry_after_ceiling),
            );
        }
        let busy = self.request_done(&q.target_key);
        let finished = now_ms();
        let seen = self.targets.observe(
            &q.target_key,
            &a.result,
            sent,
            a.duration,
            busy.saturating_sub(1),
            finished,
        );
        self.target_changed(q, kind, seen, finished).await;
        self.metrics
            .attempts
            .with_label_values(&[result_label(&a.result), kind])
            .inc();
        self.metrics
            .attempt_duration
            .with_label_values(&[kind])
            .observe(a.duration.as_secs_f64());
        let first = q.first_attempt_at.unwrap_or(now);
        let status = a.status.map(i64::from);
        let verdict = classify(&a.result);
        // A 400 to `started`: the receiver refuses the run. Stop it; this event is finished.
        let refused = Self::stops_run(kind, &q.event, a.status)
            && match &q.run_id {
                Some(run) => self.stop_run(run, "started answered 400").await,
                None => false,
            };
        let next = match verdict {
            _ if refused => Next::Dead(dead(job, "run_stopped", status, a.error.clone(), attempt_no, body)),
            Verdict::Delivered => Next::Delivered,
            Verdict::Retry { not_before } => {
                let elapsed = Duration::from_millis((finished - first).max(0) as u64);
                // A webhook's own retry schedule, if it has one.
                let own = q
                    .webhook_id
                    .as_deref()
                    .filter(|_| kind == "webhook")
                    .and_then(|id| self.webhooks.get(id))
                    .filter(|w| w.overrides.as_ref().is_some_and(|o| o.retry.is_some()));
                let policy = match &own {
                    Some(w) => std::borrow::Cow::Owned(self.policy_with(w.overrides.as_ref())),
                    None => std::borrow::Cow::Borrowed(&self.policy),
                };
                match policy.next_delay_after(attempt_no as u32, elapsed, not_before, is_overload(&a.result)) {
                    Some(d) => Next::Retry {
                        // From now, not from `finished` (rounded down): never early.
                        at_ms: crate::domain::ms_after(d),
                    },
                    None => {
                        self.exhausted(q, attempt_no, status).await;
                        Next::Dead(dead(
                            job,
                            "attempts_exhausted",
                            status,
                            a.error.clone(),
                            attempt_no,
                            body,
                        ))
                    }
                }
            }
            Verdict::DeadLetter { reason } => Next::Dead(dead(job, reason, status, a.error.clone(), attempt_no, body)),
            Verdict::DisableWebhook => {
                if let Some(id) = &q.webhook_id {
                    if kind == "webhook" {
                        self.disable_webhook(id, "receiver answered 410 Gone").await;
                    }
                }
                Next::Dead(dead(job, "webhook_disabled", status, a.error.clone(), attempt_no, body))
            }
        };
        tracing::debug!(
            delivery_id = %q.id, event_id = %q.event_id, attempt = attempt_no,
            status = ?a.status, result = result_label(&a.result), "attempt finished"
        );
        Decided {
            record: Some(AttemptRecord {
                started_at: now,
                duration_ms: a.duration.as_millis() as i64,
                status,
                error: a.error,
                excerpt: a.excerpt,
            }),
            next,
            body: final_body,
            resource,
        }
    }

    /// Does this answer stop its run? A 400 to `sync_job_run:started` from the run's webhook.
    pub fn stops_run(kind: &str, event: &str, status: Option<u16>) -> bool {
        kind == "webhook" && event == "sync_job_run:started" && status == Some(400)
    }
}

/// The dead letter of a delivery that failed (or could not be attempted).
fn dead(
    job: &Job,
    reason: &'static str,
    last_status: Option<i64>,
    last_error: Option<String>,
    attempts: i64,
    body: &str,
) -> NewDeadLetter {
    dead_letter(
        reason,
        Cause::Delivery {
            q: &job.q,
            last_status,
            last_error,
            attempts,
            body,
        },
    )
}

pub(super) fn is_terminal(event: &str) -> bool {
    matches!(event, "sync_job_run:completed" | "sync_job_run:failed")
}

/// `payload.resource` of a `sync_job_run:record` delivery body (what run outcomes count by).
pub(crate) fn record_resource(event: &str, body: &str) -> Option<String> {
    if event != "sync_job_run:record" {
        return None;
    }
    payload_resource(body)
}

pub(crate) fn payload_resource(body: &str) -> Option<String> {
    // Called for every record delivered: read just `payload.resource`, skipping everything
    // else without building a tree of the (possibly large) payload.
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        payload: Option<crate::domain::ResourceOnly<'a>>,
    }
    let b: Body = serde_json::from_str(body).ok()?;
    b.payload?.resource.map(|r| r.into_owned())
}
