//! The run lifecycle's side of delivery: final counts in a run's `completed`/`failed`, a run
//! stopped by its receiver, batches of record errors flushed by age, and operational events.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::delivery::attempt::payload_resource;
use crate::delivery::engine::Engine;
use crate::domain::{now_ms, subscribed, Envelope, Payload};
use crate::runs::eloqua;

/// Runs that may have just finished because of these events (their final events, and record
/// errors, which end a `fail_fast` run).
pub fn finishing_runs<'a>(events: impl IntoIterator<Item = &'a Envelope>) -> Vec<String> {
    let mut ids: Vec<String> = events
        .into_iter()
        .filter(|e| {
            matches!(
                e.event.as_str(),
                "sync_job_run:completed" | "sync_job_run:failed" | "sync_job_run:stopped" | "sync_job_run:record_error"
            )
        })
        .filter_map(|e| e.sync_job_run_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

impl Engine {
    /// Eloqua syncs (CONTRACT §3): queue the ONE callback of each sync among these runs whose
    /// run has finished. The sync is marked in the store before its callback is queued (and
    /// unmarked if queueing fails), so however many paths see the run finish, one is sent.
    /// (Boxed: it queues through `Engine::queue`, which calls it.)
    pub fn eloqua_callbacks<'a>(
        &'a self,
        run_ids: &'a [String],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            for id in run_ids {
                if let Err(e) = self.eloqua_callback(id).await {
                    tracing::error!(error = %format!("{e:#}"), run_id = %id, "queueing an Eloqua sync callback failed");
                }
            }
        })
    }

    async fn eloqua_callback(&self, run_id: &str) -> anyhow::Result<()> {
        let store = self.store.runs();
        let Some(sync) = store.eloqua_sync_for_run(run_id).await? else {
            return Ok(());
        };
        let Some(cb) = sync.callback_url.as_deref().and_then(|u| url::Url::parse(u).ok()) else {
            return Ok(());
        };
        if sync.callback_queued_at.is_some() {
            return Ok(());
        }
        let Some(run) = self.store.get_run(run_id).await? else {
            return Ok(());
        };
        if !eloqua::is_finished(&run) || !store.mark_eloqua_callback(sync.n, Some(now_ms())).await? {
            return Ok(());
        }
        let Value::Object(payload) = eloqua::sync_json(&sync, Some(&run)) else {
            anyhow::bail!("the sync resource is an object")
        };
        let env = Envelope {
            id: format!("evt_eloqua_sync_{}", sync.n),
            event: eloqua::CALLBACK_EVENT.into(),
            sync_job_run_id: None,
            webhook_id: None,
            callback_url: Some(cb),
            environment_id: None,
            created_at_ms: now_ms(),
            payload: Payload::made(payload),
            relay_made: true,
        };
        if let Err(e) = self.queue(std::slice::from_ref(&env)).await {
            let _ = store.mark_eloqua_callback(sync.n, None).await;
            return Err(e);
        }
        self.metrics
            .eloqua_callbacks
            .with_label_values(&[eloqua::status_of(&run)])
            .inc();
        Ok(())
    }

    /// The body to send for this attempt: a run's `completed` / `failed` gets the run's final
    /// counts (`Runs::terminal_payload`) merged into its payload now, when every earlier event
    /// of the run to this webhook was answered or dead-lettered (the chain's order). `None`:
    /// send the queued body as it is.
    pub async fn attempt_body(&self, event: &str, run_id: Option<&str>, body: &str) -> Option<String> {
        if !matches!(event, "sync_job_run:completed" | "sync_job_run:failed") {
            return None;
        }
        let counts = match self.runs.terminal_payload(run_id?).await {
            Ok(Value::Object(c)) if !c.is_empty() => c,
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "run counts unavailable; sending the queued body");
                return None;
            }
        };
        // Member by member, values as their bytes: the payload's numbers, key order and
        // repeated keys stay as the producer sent them (CONTRACT §1); only the counts change.
        let mut top = crate::domain::object_members(body)?;
        let (_, payload) = top.iter_mut().find(|(k, _)| k == "payload")?;
        let mut members = crate::domain::object_members(payload.get())?;
        for (k, x) in counts {
            let x = serde_json::value::to_raw_value(&x).ok()?;
            match members.iter().position(|(m, _)| *m == k) {
                Some(i) => {
                    members[i].1 = x;
                    // A repeated key is replaced once: the last of its kind would win.
                    let mut n = 0;
                    members.retain(|(m, _)| {
                        n += (*m == k) as usize;
                        *m != k || n == 1
                    });
                }
                None => members.push((k, x)),
            }
        }
        *payload = serde_json::value::RawValue::from_string(crate::domain::write_members(&members)).ok()?;
        let new = crate::domain::write_members(&top);
        (new != body).then_some(new)
    }

    /// Stop an active run because its webhook refused it: status `stopped`, the run's queued
    /// deliveries are dropped (counted), a stop command is published for executors, and a
    /// gathered batch of errors is queued. Returns false when the run is unknown or no longer
    /// active (nothing changed).
    pub async fn stop_run(&self, run_id: &str, why: &str) -> bool {
        // No event is between its run's decision and its queueing while the run stops and its
        // queued events are dropped (see `Engine::run_gate`). Released before anything that
        // queues events itself (the callbacks, the alerts, the flushed batch).
        let gate = self.run_gate.write().await;
        let flushed = match self.runs.stop(run_id, why).await {
            Ok(Some(f)) => f,
            Ok(None) => return false,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), run_id, "stopping a run failed");
                return false;
            }
        };
        let (keep, mut dropped_memory, mut promote) = self.forget_run(run_id);
        let res = self.store.drop_queued_for_run(run_id, &keep, now_ms()).await;
        // Rows of the run promoted while the drop waited for the write lock.
        let (_, later, more) = self.forget_run(run_id);
        drop(gate);
        dropped_memory.extend(later);
        promote.extend(more);
        tracing::info!(run_id, reason = why, "run stopped");
        self.eloqua_callbacks(&[run_id.to_string()]).await;
        self.sync_alerts(&[run_id.to_string()]).await;
        self.metrics.runs_finished.with_label_values(&["stopped"]).inc();
        if !promote.is_empty() {
            self.promote(&promote).await;
        }
        match res {
            Ok(mut dropped) => {
                dropped.extend(dropped_memory);
                let webhook: Vec<_> = dropped.iter().filter(|(k, _, _)| k == "webhook").collect();
                self.metrics
                    .run_events_dropped
                    .with_label_values(&["run_stopped"])
                    .inc_by(webhook.len() as u64);
                let resources: Vec<String> = webhook
                    .iter()
                    .filter(|(_, ev, _)| matches!(ev.as_str(), "sync_job_run:record" | "sync_job_run:record_error"))
                    .map(|(_, _, body)| payload_resource(body).unwrap_or_else(|| "unknown".into()))
                    .collect();
                if let Err(e) = self.runs.note_dropped(run_id, &resources).await {
                    tracing::error!(error = %format!("{e:#}"), run_id, "counting dropped events failed");
                }
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), run_id, "dropping a stopped run's deliveries failed"),
        }
        match self.commands.get() {
            Some(c) => {
                let cmd = json!({"type": "stop", "run_id": run_id, "reason": why});
                if let Err(e) = c.publish(run_id, cmd).await {
                    tracing::error!(error = %format!("{e:#}"), run_id, "publishing a stop command failed");
                }
            }
            None => tracing::warn!(run_id, "no command sink: stop command not published"),
        }
        if !flushed.is_empty() {
            if let Err(e) = self.queue(&flushed).await {
                tracing::error!(error = %format!("{e:#}"), run_id, "queueing a stopped run's batch failed");
            }
        }
        true
    }

    /// Batch mode: every so often, queue the batches of record errors that are due by age.
    pub(crate) async fn flush_batches(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.batch_tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.runs.flush_due_batches().await {
                Ok(due) if !due.is_empty() => {
                    if let Err(e) = self.queue(&due).await {
                        tracing::error!(error = %format!("{e:#}"), batches = due.len(), "queueing due error batches failed");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "flushing due error batches failed"),
            }
        }
    }

    /// Queue an operational event (`webhook:disabled`, `webhook:failing`, …) to every active
    /// webhook that subscribes to it. `about`: the webhook the event is about; it never gets
    /// an event about its own failure (nor any while its target is failing), so a failing
    /// receiver is not sent more, and an operational event cannot feed itself.
    /// `webhook:disabled` goes to every webhook whose event types include it (an empty list
    /// included, as always); the others only to webhooks naming them (`webhook:failing`,
    /// `webhook:*`, `*`): a catch-all webhook of run events does not get relay chatter.
    pub async fn broadcast(&self, event: &str, payload: serde_json::Value, about: Option<&str>) -> anyhow::Result<()> {
        let serde_json::Value::Object(payload) = payload else {
            anyhow::bail!("payload must be an object")
        };
        let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
        let now = now_ms();
        let explicit = event != "webhook:disabled";
        let envelopes: Vec<Envelope> = self
            .webhooks
            .all()
            .iter()
            .filter(|w| w.is_active && subscribed(&w.event_types, event) && !(explicit && w.event_types.is_empty()))
            .filter(|w| match about {
                Some(a) if a == w.id => !about_its_failure(event) && !self.target_unhealthy(&format!("w:{a}")),
                _ => true,
            })
            .map(|w| Envelope {
                id: id.clone(),
                event: event.to_string(),
                sync_job_run_id: None,
                webhook_id: Some(w.id.clone()),
                callback_url: None,
                environment_id: None,
                created_at_ms: now,
                payload: Payload::made(payload.clone()),
                relay_made: true,
            })
            .collect();
        if let Some(c) = crate::metrics::OPERATIONAL_EVENTS.iter().find(|e| **e == event) {
            self.metrics.operational_events.with_label_values(&[c]).inc();
        }
        if !envelopes.is_empty() {
            self.ingest(&envelopes, "api").await?;
        }
        Ok(())
    }

    /// Disable a webhook (410 Gone, or failing for `webhooks.disable_after_seconds`) and tell
    /// its subscribers why.
    pub async fn disable_webhook(&self, id: &str, reason: &str) {
        let Some(w) = self.webhooks.get(id) else {
            return;
        };
        if !w.is_active {
            return;
        }
        let mut w = (*w).clone();
        w.is_active = false;
        w.updated_at = now_ms();
        if let Err(e) = self.store.update_webhook(&w).await {
            tracing::error!(error = %format!("{e:#}"), "could not disable webhook");
            return;
        }
        tracing::warn!(webhook_id = %id, reason, "webhook disabled");
        self.webhooks.put(w);
        // Its pending events stay queued, untouched, until it is enabled again.
        self.targets.hold(&format!("w:{id}"), true);
        self.metrics.webhooks_disabled.inc();
        let payload = json!({"webhook_id": id, "reason": reason, "disabled_at": crate::domain::rfc3339_ms(now_ms())});
        if let Err(e) = self.broadcast("webhook:disabled", payload, Some(id)).await {
            tracing::error!(error = %format!("{e:#}"), "could not queue webhook:disabled");
        }
    }

    /// An attempt changed its target's state: its breaker opened (`webhook:failing`) or closed
    /// (`webhook:recovered`), or it has failed long enough to be disabled. Callback hosts have
    /// no subscribers: their changes are logged and counted only.
    pub(crate) async fn target_changed(
        &self,
        q: &crate::store::QueuedDelivery,
        kind: &str,
        seen: crate::delivery::targets::Observed,
        now: i64,
    ) {
        let webhook = q.webhook_id.as_deref().filter(|_| kind == "webhook");
        if seen.opened {
            tracing::warn!(target = %q.target_key, "circuit breaker opened: deliveries held");
            if let Some(id) = webhook {
                let payload = json!({
                    "webhook_id": id,
                    "breaker": "open",
                    "failing_since": seen.failing_since.map(crate::domain::rfc3339_ms),
                    "opened_at": crate::domain::rfc3339_ms(now),
                });
                if let Err(e) = self.broadcast("webhook:failing", payload, Some(id)).await {
                    tracing::error!(error = %format!("{e:#}"), "could not queue webhook:failing");
                }
            }
        }
        if seen.closed {
            tracing::info!(target = %q.target_key, "circuit breaker closed: deliveries resume");
            if let Some(id) = webhook {
                let payload =
                    json!({"webhook_id": id, "breaker": "closed", "recovered_at": crate::domain::rfc3339_ms(now)});
                if let Err(e) = self.broadcast("webhook:recovered", payload, Some(id)).await {
                    tracing::error!(error = %format!("{e:#}"), "could not queue webhook:recovered");
                }
            }
        }
        if let (Some(id), Some(since)) = (webhook, seen.failing_since) {
            if self.disable_after_ms > 0 && now - since >= self.disable_after_ms {
                let reason = format!(
                    "deliveries failed for {} s without a success (webhooks.disable_after_seconds)",
                    (now - since) / 1000
                );
                self.disable_webhook(id, &reason).await;
            }
        }
    }

    /// Enable a webhook again (`POST /webhook/{id}/enable`): its held events go again, in
    /// order, and with `replay` so do the events dead-lettered because it was disabled
    /// (reason `webhook_disabled`: those that arrived while it was disabled, and any taken off
    /// the queue as it was being disabled), each at the end of its run's chain. Returns the
    /// webhook and how many dead letters were re-queued.
    pub async fn enable_webhook(
        &self,
        mut w: crate::store::Webhook,
        replay: bool,
    ) -> anyhow::Result<(crate::store::Webhook, u64)> {
        let was_active = w.is_active;
        let now = now_ms();
        if !was_active {
            w.is_active = true;
            w.updated_at = now;
            self.store.update_webhook(&w).await?;
            self.webhooks.put(w.clone());
        }
        self.targets.hold(&format!("w:{}", w.id), false);
        let mut replayed = 0;
        if replay {
            let filter = crate::store::DeadLetterFilter {
                webhook_id: Some(w.id.clone()),
                reason: Some("webhook_disabled".into()),
                event_id: None,
                include_replayed: false,
            };
            // In pages, oldest first: each page goes behind the one before in its chains.
            loop {
                let at = now_ms();
                let (requeued, raws) = self.replay_dead_letters(None, &filter, 1000, at).await?;
                // Events refused at intake because the webhook was disabled have no delivery
                // to re-queue: they are routed again, in their order (as the replay route does).
                let n = requeued + raws.len() as u64;
                let envelopes: Vec<Envelope> = raws
                    .iter()
                    .filter_map(|raw| Envelope::parse_text(raw, at, false).ok())
                    .collect();
                if !envelopes.is_empty() {
                    self.ingest(&envelopes, "api").await?;
                }
                replayed += n;
                if n < 1000 {
                    break;
                }
            }
            self.metrics.dead_letters_replayed.inc_by(replayed);
        }
        self.notify();
        if !was_active {
            tracing::info!(webhook_id = %w.id, replayed, "webhook enabled");
            let payload =
                json!({"webhook_id": w.id, "enabled_at": crate::domain::rfc3339_ms(now), "replayed": replayed});
            if let Err(e) = self.broadcast("webhook:enabled", payload, Some(&w.id)).await {
                tracing::error!(error = %format!("{e:#}"), "could not queue webhook:enabled");
            }
        }
        Ok((w, replayed))
    }

    /// `delivery:exhausted`: a delivery was dead-lettered after its attempts. Not for the
    /// relay's own operational events (a subscriber failing to take them must not make more).
    pub(crate) async fn exhausted(&self, q: &crate::store::QueuedDelivery, attempts: i64, last_status: Option<i64>) {
        if is_operational(&q.event) {
            return;
        }
        let payload = json!({
            "webhook_id": q.webhook_id,
            "kind": q.kind,
            "event_id": q.event_id,
            "event": q.event,
            "sync_job_run_id": q.run_id,
            "attempts": attempts,
            "last_status": last_status,
        });
        let about = q.webhook_id.as_deref().filter(|_| q.kind == "webhook");
        if let Err(e) = self.broadcast("delivery:exhausted", payload, about).await {
            tracing::error!(error = %format!("{e:#}"), "could not queue delivery:exhausted");
        }
    }
}

/// Events the relay makes about its own operation.
pub fn is_operational(event: &str) -> bool {
    crate::metrics::OPERATIONAL_EVENTS.contains(&event)
}

/// Events about a webhook's failure: never sent to that webhook.
fn about_its_failure(event: &str) -> bool {
    matches!(event, "webhook:failing" | "webhook:disabled" | "delivery:exhausted")
}
