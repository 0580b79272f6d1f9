//! Routing: what one event becomes — deliveries to targets (its webhook, its callback URL, the
//! Census-style syncs of its run's job), dead letters, or nothing (filtered, dropped by its run's
//! lifecycle). Pure decisions; nothing here writes or sends.

use crate::delivery::dead_letter::{dead_letter, Cause};
use crate::delivery::engine::{Engine, Routed};
use crate::domain::{subscribed, Envelope, Payload};
use crate::runs::{Action, Decision};
use crate::store::{NewDeadLetter, NewDelivery};

/// One event's plan: its deliveries, its dead letters, and how it was routed.
pub type Plan = (Vec<NewDelivery>, Vec<NewDeadLetter>, Routed);

impl Engine {
    /// Decide the deliveries (and dead letters) of one event.
    pub fn route(&self, e: &Envelope, now: i64, out: &mut Vec<NewDelivery>, dead: &mut Vec<NewDeadLetter>) -> Routed {
        let before = out.len();
        let mut unroutable = |reason: &'static str, webhook_id: Option<String>| {
            dead.push(event_dead_letter(e, webhook_id, reason));
            reason
        };
        let mut reason = None;
        let mut filtered = false;
        match &e.webhook_id {
            // Only a callback URL (e.g. an Eloqua sync's callback): that is the target.
            None if e.callback_url.is_some() && e.sync_job_run_id.is_none() => {}
            // A run the relay does not know: the event must name its webhook.
            None => reason = Some(unroutable("unknown_run", None)),
            Some(wid) => match self.webhooks.get(wid) {
                None => reason = Some(unroutable("unknown_webhook", Some(wid.clone()))),
                Some(w) if !w.is_active => reason = Some(unroutable("webhook_disabled", Some(wid.clone()))),
                Some(w) if !subscribed(&w.event_types, &e.event) => filtered = true,
                Some(w) => out.push(delivery(
                    e,
                    now,
                    "webhook",
                    Some(w.id.clone()),
                    None,
                    format!("w:{}", w.id),
                    e.sync_job_run_id.as_ref().map(|r| format!("w:{}:{r}", w.id)),
                    e.body(Some(&w.id)),
                )),
            },
        }
        if let Some(cb) = &e.callback_url {
            let target_key = format!(
                "c:{}:{}",
                cb.host_str().unwrap_or(""),
                cb.port_or_known_default().unwrap_or(0)
            );
            out.push(delivery(
                e,
                now,
                "callback",
                e.webhook_id.clone(),
                Some(cb.to_string()),
                target_key,
                e.sync_job_run_id.as_ref().map(|r| format!("c:{cb}:{r}")),
                e.body(e.webhook_id.as_deref()),
            ));
        }
        let deliveries = out.len() - before;
        Routed {
            id: e.id.clone(),
            status: if deliveries > 0 {
                "queued"
            } else if reason.is_some() {
                "dead_lettered"
            } else if filtered {
                "filtered"
            } else {
                "queued"
            },
            reason,
            deliveries,
        }
    }

    /// Decide what each event becomes (deliveries, dead letters, how it was routed), in order,
    /// with one run-lifecycle transaction for all of them. Nothing is queued.
    pub async fn plan_many(&self, events: &[&Envelope], now: i64) -> anyhow::Result<Vec<Plan>> {
        let decisions = self.runs.on_ingest_many(events).await?;
        let named = events.iter().filter_map(|e| e.webhook_id.as_deref());
        let of_runs = decisions.iter().flatten().filter_map(|d| d.webhook_id.as_deref());
        self.know_webhooks(named.chain(of_runs)).await;
        Ok(events
            .iter()
            .zip(decisions)
            .map(|(e, d)| {
                let (mut out, mut dead) = (Vec::new(), Vec::new());
                let routed = self.plan_decided(e, d, now, &mut out, &mut dead);
                (out, dead, routed)
            })
            .collect())
    }

    /// Route one event after its run's lifecycle decided on it (`None`: not a run the relay
    /// knows).
    fn plan_decided(
        &self,
        e: &Envelope,
        decision: Option<Decision>,
        now: i64,
        out: &mut Vec<NewDelivery>,
        dead: &mut Vec<NewDeadLetter>,
    ) -> Routed {
        let Some(d) = decision else {
            // Not a run the relay knows: deliver as the event says.
            return self.route(e, now, out, dead);
        };
        let relay_made = e.relay_made;
        for b in &d.before {
            self.route(b, now, out, dead);
        }
        let routed = match d.action {
            Action::Deliver => {
                if !relay_made {
                    if let Some(status) = final_status(&e.event) {
                        self.metrics.runs_finished.with_label_values(&[status]).inc();
                    }
                }
                // Cheap: the clone shares the payload's bytes and parsed form (`Payload`).
                let main = Envelope {
                    webhook_id: d.webhook_id.clone(),
                    callback_url: d.callback_url.clone(),
                    ..e.clone()
                };
                let mut routed = self.route(&main, now, out, dead);
                let synced = self.route_syncs(&main, &d.sync_job_id, now, out, dead);
                if synced > 0 {
                    routed.deliveries += synced;
                    routed.status = "queued";
                }
                routed
            }
            Action::Drop { reason } => {
                self.metrics.run_events_dropped.with_label_values(&[reason]).inc();
                Routed {
                    id: e.id.clone(),
                    status: "dropped",
                    reason: Some(reason),
                    deliveries: 0,
                }
            }
            Action::DeadLetter { reason } => {
                dead.push(event_dead_letter(e, d.webhook_id.clone(), reason));
                Routed {
                    id: e.id.clone(),
                    status: "dead_lettered",
                    reason: Some(reason),
                    deliveries: 0,
                }
            }
            Action::Absorb => Routed {
                id: e.id.clone(),
                status: "batched",
                reason: None,
                deliveries: 0,
            },
        };
        for a in &d.after {
            if a.event == "sync_job_run:failed" {
                self.metrics.runs_finished.with_label_values(&["failed"]).inc();
            }
            self.route(a, now, out, dead);
        }
        routed
    }
}

impl Engine {
    /// A run's record goes to every Census-style sync whose source is the run's job as well: to
    /// the sync's destination webhook (signed with its secret), mapped (`syncs::mapping`), on
    /// its own chain per (sync, run). Whether the sync is paused is the store's to decide when
    /// the row is written (`Queue::enqueue_claiming`). Returns how many deliveries it added.
    fn route_syncs(
        &self,
        e: &Envelope,
        job: &str,
        now: i64,
        out: &mut Vec<NewDelivery>,
        dead: &mut Vec<NewDeadLetter>,
    ) -> usize {
        if e.event != "sync_job_run:record" || self.syncs.is_empty() {
            return 0;
        }
        let Some(run) = &e.sync_job_run_id else {
            return 0;
        };
        let mut n = 0;
        for s in self.syncs.for_job(job) {
            let wid = &s.webhook_id;
            match self.webhooks.get(wid) {
                None => dead.push(event_dead_letter(e, Some(wid.clone()), "unknown_webhook")),
                Some(w) if !w.is_active => dead.push(event_dead_letter(e, Some(wid.clone()), "webhook_disabled")),
                Some(_) => {
                    // The transform works on the parsed payload; the event's other targets
                    // get it untransformed.
                    let max = crate::syncs::mapping::MAX_MAPPED_BYTES;
                    let Some(payload) =
                        crate::syncs::mapping::map_payload_within(e.payload.map(), s.id, &s.config, max)
                    else {
                        dead.push(event_dead_letter(e, Some(wid.clone()), "payload_too_large"));
                        continue;
                    };
                    // The mapped payload is new JSON: the original bytes must not be sent.
                    let mapped = Envelope {
                        payload: Payload::made(payload),
                        ..e.clone()
                    };
                    out.push(delivery(
                        e,
                        now,
                        "sync",
                        Some(wid.clone()),
                        None,
                        format!("w:{wid}"),
                        Some(format!("{}{run}", crate::syncs::order_key_prefix(s.id))),
                        mapped.body(Some(wid)),
                    ));
                    n += 1;
                }
            }
        }
        n
    }

    /// Is this a delivery of a sync that is paused now? (The Kafka intake stores those rather
    /// than keep them in memory: the store holds them.)
    pub fn held_by_pause(&self, d: &NewDelivery) -> bool {
        d.kind == "sync"
            && d.order_key
                .as_deref()
                .and_then(crate::syncs::sync_of_order_key)
                .and_then(|id| self.syncs.get(id))
                .is_some_and(|s| s.paused)
    }
}

#[allow(clippy::too_many_arguments)]
fn delivery(
    e: &Envelope,
    now: i64,
    kind: &'static str,
    webhook_id: Option<String>,
    target_url: Option<String>,
    target_key: String,
    order_key: Option<String>,
    body: String,
) -> NewDelivery {
    NewDelivery {
        id: uuid::Uuid::now_v7().to_string(),
        event_id: e.id.clone(),
        event: e.event.clone(),
        run_id: e.sync_job_run_id.clone(),
        kind,
        webhook_id,
        target_url,
        target_key,
        order_key,
        body,
        created_at: now,
        attempts: 0,
        first_attempt_at: None,
        next_attempt_at: None,
        source: None,
        log: Vec::new(),
    }
}

/// The dead letter of an event that is refused before any delivery is queued for it.
pub fn event_dead_letter(e: &Envelope, webhook_id: Option<String>, reason: &'static str) -> NewDeadLetter {
    dead_letter(reason, Cause::Refused { event: e, webhook_id })
}

/// `completed`, `failed` or `stopped` for a run's terminal events.
fn final_status(event: &str) -> Option<&'static str> {
    match event {
        "sync_job_run:completed" => Some("completed"),
        "sync_job_run:failed" => Some("failed"),
        "sync_job_run:stopped" => Some("stopped"),
        _ => None,
    }
}
