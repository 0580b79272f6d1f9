//! A failing or overloaded receiver costs nothing and heals by itself (issue 15), on both buses:
//! adaptive concurrency against a receiver with a hidden capacity, the circuit breaker against a
//! receiver that is down for a while, the overload floor, Retry-After pausing a whole target,
//! prolonged-failure disable with enable/replay, and the operational events of each.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// The adaptive limit of webhook `wid` as exported, if there is a series for it.
async fn limit_of(h: &Harness, wid: &str) -> Option<f64> {
    h.metrics()
        .await
        .get("syncrelay_target_concurrency_limit", &[("target", wid)])
}

both_buses!(
    adaptive_concurrency_follows_a_receivers_hidden_capacity,
    |bus| async move {
        // The receiver takes 8 requests at once (each held 100 ms) and answers 429 beyond that; the
        // relay may have up to 64 in flight to it.
        let capacity = Arc::new(AtomicU64::new(8));
        let hold = Duration::from_millis(100);
        let rx = Receiver::with_capacity(capacity.clone(), hold);
        let mut h = Harness::start(
            bus,
            &[
                ("SYNCRELAY__DELIVERY__MAX_IN_FLIGHT_PER_WEBHOOK", "64"),
                ("SYNCRELAY__DELIVERY__RETRY__OVERLOAD_FLOOR_MS", "200"),
                ("SYNCRELAY__DELIVERY__RETRY__MAX_ATTEMPTS", "50"),
                ("SYNCRELAY__DELIVERY__LOG", "none"),
            ],
        )
        .await;
        let (wid, _) = h.api().webhook(&rx.url("/cap"), &[]).await;
        // Independent events (no run): nothing but the limit keeps them from going at once.
        let events: Vec<Value> = (0..3000)
            .map(|i| event(&format!("a{i}"), &wid, None, json!({"i": i})))
            .collect();
        let t0 = Instant::now();
        h.send(&events).await;
        // Warm-up, then 4 s at capacity 8: sample the limit every 100 ms.
        let warm = t0 + Duration::from_secs(3);
        tokio::time::sleep_until(warm.into()).await;
        let mut limits = Vec::new();
        while t0.elapsed() < Duration::from_secs(7) {
            limits.extend(limit_of(&h, &wid).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let measured_until = Instant::now();
        let window: Vec<Received> = rx
            .received()
            .into_iter()
            .filter(|r| r.at >= warm && r.at < measured_until)
            .collect();
        let refused = window.iter().filter(|r| r.status == 429).count();
        let taken = window.iter().filter(|r| r.status == 200).count();
        let secs = (measured_until - warm).as_secs_f64();
        // Each 2xx holds the receiver `hold`: taken × hold / window = mean requests held at once.
        let mean_held = taken as f64 * hold.as_secs_f64() / secs;
        let mean_limit = limits.iter().sum::<f64>() / limits.len().max(1) as f64;
        println!("{bus:?} mean limit {mean_limit:.1}");
        limits.sort_by(f64::total_cmp);
        let median = limits.get(limits.len() / 2).copied().unwrap_or(f64::NAN);
        let share = refused as f64 / (refused + taken).max(1) as f64;
        println!(
        "{bus:?} capacity 8: {taken} taken, {refused} refused (429 share {:.1} %), mean held {mean_held:.1}, median limit {median}",
        share * 100.0
    );
        assert!(share < 0.05, "429 share {:.1} % after warm-up", share * 100.0);
        assert!(
            (7.0..=9.0).contains(&median),
            "the limit settles near 8 (median {median}, samples {limits:?})"
        );
        // What the receiver holds is a little below the limit: between an answer and the next
        // request to that slot the relay takes a few milliseconds (more on Kafka, debug build).
        assert!(
            mean_held >= 5.5,
            "the receiver is kept near its capacity ({mean_held:.1} held on average)"
        );
        // The receiver's capacity rises to 32: within seconds the relay follows.
        capacity.store(32, Ordering::SeqCst);
        let raised = Instant::now();
        let followed = eventually(Duration::from_secs(10), "the limit following capacity 32", || async {
            limit_of(&h, &wid)
                .await
                .filter(|l| *l >= 24.0)
                .map(|_| raised.elapsed())
        })
        .await;
        // And it is used: over the next second, about 24 or more requests held at once.
        let from = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let taken = rx.received().iter().filter(|r| r.status == 200 && r.at >= from).count();
        let held = taken as f64 * hold.as_secs_f64() / from.elapsed().as_secs_f64();
        println!("{bus:?} capacity 32: limit ≥ 24 after {followed:?}, {held:.1} held on average over the next second");
        assert!(followed <= Duration::from_secs(5), "followed after {followed:?}");
        assert!(held >= 16.0, "{held:.1} held on average after the rise");
        h.stop().await;
    }
);

both_buses!(
    a_down_receiver_opens_the_breaker_and_a_probe_closes_it,
    |bus| async move {
        let down = Arc::new(AtomicBool::new(true));
        let d = down.clone();
        let rx = Receiver::with_script(Arc::new(move |r, _| match r.path.as_str() {
            "/flaky" if d.load(Ordering::SeqCst) => Reply::status(500),
            _ => Reply::status(200),
        }))
        .await;
        let mut h = Harness::start(
            bus,
            &[
                ("SYNCRELAY__DELIVERY__BREAKER__CONSECUTIVE_FAILURES", "5"),
                ("SYNCRELAY__DELIVERY__BREAKER__MIN_REQUESTS", "5"),
                ("SYNCRELAY__DELIVERY__BREAKER__COOL_DOWN_MS", "2000"),
                ("SYNCRELAY__DELIVERY__RETRY__MAX_ATTEMPTS", "1000"),
                ("SYNCRELAY__DELIVERY__RETRY__MAX_INTERVAL_MS", "200"),
            ],
        )
        .await;
        let app = h.api();
        // The failing webhook subscribes to operational events too: it must never get one about
        // its own failure.
        let (flaky, _) = app.webhook(&rx.url("/flaky"), &["sync_job_run:*", "webhook:*"]).await;
        let (ok, _) = app.webhook(&rx.url("/ok"), &[]).await;
        let (_watch, _) = app
            .webhook(&rx.url("/watch"), &["webhook:failing", "webhook:recovered"])
            .await;
        let mut events = Vec::new();
        for i in 0..5 {
            for run in 1..=4 {
                events.push(event(
                    &format!("f{run}-{i}"),
                    &flaky,
                    Some(&run_id(run)),
                    json!({"i": i}),
                ));
            }
        }
        h.send(&events).await;
        // The breaker opens: webhook:failing goes to the watcher, GET /webhook says so.
        let got = rx
            .wait_for(WAIT, "webhook:failing", |g| {
                g.iter()
                    .any(|r| r.path == "/watch" && r.json()["event"] == "webhook:failing")
            })
            .await;
        let note = got
            .iter()
            .find(|r| r.path == "/watch" && r.json()["event"] == "webhook:failing")
            .unwrap()
            .json();
        assert_eq!(note["payload"]["webhook_id"], flaky.as_str());
        assert_eq!(note["payload"]["breaker"], "open");
        let (_, w) = app.get(&format!("/webhook/{flaky}")).await;
        assert_eq!(w["delivery"]["breaker"], "open", "{w}");
        assert!(w["delivery"]["failing_since"].is_string(), "{w}");
        // Open: no attempts (neither at the receiver nor counted) until the cool-down passes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rx.on("/flaky").len();
        let attempts_before = h.metric("syncrelay_delivery_attempts_total", &[]).await;
        // Meanwhile another webhook is served as usual.
        let others: Vec<Value> = (0..50).map(|i| event(&format!("o{i}"), &ok, None, json!({}))).collect();
        let sent = Instant::now();
        h.send(&others).await;
        rx.wait_for(Duration::from_secs(10), "50 to the healthy webhook", |g| {
            g.iter().filter(|r| r.path == "/ok").count() >= 50
        })
        .await;
        let healthy_took = sent.elapsed();
        tokio::time::sleep(Duration::from_millis(1000).saturating_sub(healthy_took)).await;
        assert_eq!(rx.on("/flaky").len(), before, "no attempt while open");
        let attempts_now = h.metric("syncrelay_delivery_attempts_total", &[]).await;
        assert_eq!(
            attempts_now - attempts_before,
            50.0,
            "only the healthy webhook's 50 attempts were made"
        );
        assert_eq!(
            h.metric("syncrelay_target_breaker_state", &[("target", &flaky)]).await,
            2.0
        );
        // Events stay queued: nothing dead-lettered.
        let (_, dl) = app.get(&format!("/dead-letters?webhook_id={flaky}")).await;
        assert_eq!(dl["results"].as_array().map(Vec::len), Some(0), "{dl}");
        // The receiver comes back: the half-open probe closes the breaker, everything arrives in
        // per-run order, the watcher hears webhook:recovered.
        down.store(false, Ordering::SeqCst);
        let got = rx
            .wait_for(WAIT, "20 delivered and webhook:recovered", |g| {
                g.iter()
                    .filter(|r| r.path == "/flaky" && r.status == 200 && r.json()["event"] == "sync_job_run:record")
                    .count()
                    >= 20
                    && g.iter()
                        .any(|r| r.path == "/watch" && r.json()["event"] == "webhook:recovered")
            })
            .await;
        let mut order: HashMap<String, Vec<i64>> = HashMap::new();
        for r in got.iter().filter(|r| r.path == "/flaky" && r.status == 200) {
            let b = r.json();
            if b["event"] == "sync_job_run:record" {
                order
                    .entry(b["sync_job_run_id"].as_str().unwrap().to_string())
                    .or_default()
                    .push(b["payload"]["i"].as_i64().unwrap());
            }
        }
        assert_eq!(order.len(), 4);
        for (run, seq) in &order {
            assert_eq!(seq, &vec![0, 1, 2, 3, 4], "run {run} in order, each once");
        }
        let (_, w) = app.get(&format!("/webhook/{flaky}")).await;
        assert_eq!(w["delivery"]["breaker"], "closed", "{w}");
        assert!(w["delivery"]["failing_since"].is_null(), "{w}");
        assert!(
            !rx.on("/flaky").iter().any(|r| r.json()["event"] == "webhook:failing"),
            "the failing webhook never got webhook:failing"
        );
        let m = h.metrics().await;
        assert!(m.value("syncrelay_breaker_transitions_total", &[("to", "open")]) >= 1.0);
        assert!(m.value("syncrelay_breaker_transitions_total", &[("to", "closed")]) >= 1.0);
        assert_eq!(m.value("syncrelay_target_breaker_state", &[("target", &flaky)]), 0.0);
        println!("{bus:?}: healthy webhook served in {healthy_took:?} while the other's breaker was open");
        h.stop().await;
    }
);

both_buses!(
    overloads_wait_the_floor_and_retry_after_pauses_the_whole_target,
    |bus| async move {
        // The first attempt of "t1" times out and the first of "r1" is a 429 with Retry-After: 2;
        // "r2", queued behind nothing, must wait with the rest of the target.
        let rx = Receiver::with_script(Arc::new(|r, seen| match (r.header("webhook-id"), seen) {
            ("t1", 0) => Reply::status(200).delayed(Duration::from_millis(1500)),
            ("r1", 0) => Reply::status(429).header("retry-after", "2"),
            _ => Reply::status(200),
        }))
        .await;
        let mut h = Harness::start(
            bus,
            &[
                ("SYNCRELAY__DELIVERY__REQUEST_TIMEOUT_MS", "500"),
                ("SYNCRELAY__DELIVERY__RETRY__OVERLOAD_FLOOR_MS", "1500"),
            ],
        )
        .await;
        let (slow, _) = h.api().webhook(&rx.url("/slow"), &[]).await;
        let (busy, _) = h.api().webhook(&rx.url("/busy"), &[]).await;
        h.send(&[event("t1", &slow, None, json!({})), event("r1", &busy, None, json!({}))])
            .await;
        rx.wait_for(WAIT, "r1 refused", |g| g.iter().any(|r| r.header("webhook-id") == "r1"))
            .await;
        // The receiver has r1 before the relay has its 429: r2 is sent once the relay paused the
        // target (sent in between, it may rightly go before the answer that pauses it: it did
        // once, 3.8 ms after r1).
        let paused = Instant::now();
        while h.metric("syncrelay_target_pauses_total", &[]).await < 1.0 {
            assert!(
                paused.elapsed() < WAIT,
                "the 429 with Retry-After never paused the target"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        h.send(&[event("r2", &busy, None, json!({}))]).await;
        let got = rx
            .wait_for(WAIT, "t1, r1, r2 delivered", |g| {
                ["t1", "r1", "r2"].iter().all(|id| {
                    g.iter().filter(|r| r.header("webhook-id") == *id).count() >= if *id == "r2" { 1 } else { 2 }
                })
            })
            .await;
        let at = |id: &str| -> Vec<Instant> {
            got.iter()
                .filter(|r| r.header("webhook-id") == id)
                .map(|r| r.at)
                .collect()
        };
        let t1 = at("t1");
        // Timed out 500 ms after it was sent, retried no sooner than the floor (1500 ms) after
        // that; without the floor it would be 50 ms. (The receiver sees the first attempt a
        // moment after the relay started its timeout: 100 ms of slack.)
        assert!(
            t1[1] - t1[0] >= Duration::from_millis(1900),
            "t1 retried after {:?}",
            t1[1] - t1[0]
        );
        let r1 = at("r1");
        assert!(
            r1[1] - r1[0] >= Duration::from_secs(2),
            "r1 retried after {:?}",
            r1[1] - r1[0]
        );
        let r2 = at("r2");
        assert!(
            r2[0] - r1[0] >= Duration::from_millis(1900),
            "r2 waited for the pause of its target ({:?})",
            r2[0] - r1[0]
        );
        assert!(h.metric("syncrelay_target_pauses_total", &[]).await >= 1.0);
        h.stop().await;
    }
);

both_buses!(a_long_retry_after_moves_a_targets_work_to_the_store, |bus| async move {
    // A receiver that asks for an hour's pause. Everything accepted must end up in the store
    // (queued, nothing lost), and on Kafka every offset must be committed: deliveries must
    // not sit in memory for the hour, holding their partitions (and the consumer's buffers)
    // still. 40 runs of 5: more run heads than the webhook's cap, so some are waiting to
    // go when the pause begins.
    let rx = Receiver::with_script(Arc::new(|_, _| Reply::status(503).header("retry-after", "3600"))).await;
    let mut h = Harness::start(bus, &[]).await;
    let (wid, _) = h.api().webhook(&rx.url("/paused"), &[]).await;
    let mut events = Vec::new();
    for i in 0..5 {
        for r in 0..40 {
            events.push(event(
                &format!("p{r}-{i}"),
                &wid,
                Some(&run_id(700 + r)),
                json!({"i": i}),
            ));
        }
    }
    h.send(&events).await;
    let until = Instant::now() + WAIT;
    loop {
        let depth = h.metric("syncrelay_queue_depth", &[]).await;
        let committed = match &h.kafka {
            None => true,
            Some(k) => {
                let (broker, group, topic) = (k.broker, k.group.clone(), k.topics.events.clone());
                tokio::task::spawn_blocking(move || broker.committed_and_end(&group, &topic))
                    .await
                    .unwrap()
                    .iter()
                    .all(|(_, com, end)| com >= end)
            }
        };
        if depth == 200.0 && committed {
            break;
        }
        assert!(
            Instant::now() < until,
            "{bus:?}: queue depth {depth}, offsets committed {committed} after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The pause held: no more than the first round of requests went out (32 is the cap).
    let answered = rx.answered_on("/paused");
    assert!(
        (1..=32).contains(&answered),
        "{bus:?}: {answered} requests during the pause"
    );
    assert!(h.metric("syncrelay_target_pauses_total", &[]).await >= 1.0);
    h.stop().await;
});

/// The first 2xx-answered `payload.i` of each run's records at `path`, in arrival order.
fn per_run_order(got: &[Received], path: &str) -> HashMap<String, Vec<i64>> {
    let mut order: HashMap<String, Vec<i64>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for r in got.iter().filter(|r| r.path == path && r.status == 200) {
        let b = r.json();
        if b["event"] == "sync_job_run:record" && seen.insert(r.header("webhook-id").to_string()) {
            order
                .entry(b["sync_job_run_id"].as_str().unwrap().to_string())
                .or_default()
                .push(b["payload"]["i"].as_i64().unwrap());
        }
    }
    order
}

both_buses!(
    prolonged_failure_disables_and_enable_replays_in_order,
    |bus| async move {
        let down = Arc::new(AtomicBool::new(true));
        let d = down.clone();
        let rx = Receiver::with_script(Arc::new(move |r, _| match r.path.as_str() {
            "/dying" if d.load(Ordering::SeqCst) => Reply::status(502),
            _ => Reply::status(200),
        }))
        .await;
        // Five days compressed to two seconds; the breaker probes every 300 ms meanwhile.
        let mut h = Harness::start(
            bus,
            &[
                ("SYNCRELAY__WEBHOOKS__DISABLE_AFTER_SECONDS", "2"),
                ("SYNCRELAY__DELIVERY__BREAKER__CONSECUTIVE_FAILURES", "3"),
                ("SYNCRELAY__DELIVERY__BREAKER__COOL_DOWN_MS", "300"),
                ("SYNCRELAY__DELIVERY__RETRY__MAX_ATTEMPTS", "1000"),
                ("SYNCRELAY__DELIVERY__RETRY__MAX_INTERVAL_MS", "200"),
            ],
        )
        .await;
        let app = h.api();
        let (dying, _) = app.webhook(&rx.url("/dying"), &["sync_job_run:*", "webhook:*"]).await;
        let (_watch, _) = app
            .webhook(&rx.url("/watch"), &["webhook:disabled", "webhook:enabled"])
            .await;
        let record = |run: usize, i: i64| event(&format!("d{run}-{i}"), &dying, Some(&run_id(run)), json!({"i": i}));
        let mut first = Vec::new();
        for i in 0..3 {
            for run in 1..=3 {
                first.push(record(run, i));
            }
        }
        let sent = Instant::now();
        h.send(&first).await;
        let got = rx
            .wait_for(WAIT, "webhook:disabled", |g| {
                g.iter()
                    .any(|r| r.path == "/watch" && r.json()["event"] == "webhook:disabled")
            })
            .await;
        let took = sent.elapsed();
        let note = got
            .iter()
            .find(|r| r.path == "/watch" && r.json()["event"] == "webhook:disabled")
            .unwrap()
            .json();
        assert_eq!(note["payload"]["webhook_id"], dying.as_str());
        let reason = note["payload"]["reason"].as_str().unwrap();
        assert!(reason.contains("disable_after_seconds"), "{reason}");
        assert!(
            took >= Duration::from_secs(2),
            "disabled after {took:?}, before 2 s of failures"
        );
        let (_, w) = app.get(&format!("/webhook/{dying}")).await;
        assert_eq!(w["is_active"], false);
        assert_eq!(w["delivery"]["breaker"], "held", "{w}");
        // While disabled: new events are dead-lettered at intake (as for any disabled webhook)…
        let mut later = Vec::new();
        for i in 3..5 {
            for run in 1..=3 {
                later.push(record(run, i));
            }
        }
        h.send(&later).await;
        eventually(WAIT, "6 dead letters webhook_disabled", || async {
            let (_, dl) = app
                .get(&format!("/dead-letters?webhook_id={dying}&reason=webhook_disabled"))
                .await;
            (dl["results"].as_array().map_or(0, Vec::len) >= 6).then_some(())
        })
        .await;
        // …and the pending ones are kept: the receiver is back, yet nothing goes until enabled.
        down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            !rx.on("/dying").iter().any(|r| r.status == 200),
            "nothing is sent to a disabled webhook"
        );
        let (_, q) = app.get(&format!("/deliveries?webhook_id={dying}&status=queued")).await;
        assert!(
            !q["results"].as_array().unwrap().is_empty(),
            "the first events are still queued: {q}"
        );
        let (s, b) = app
            .post(&format!("/webhook/{dying}/enable"), json!({"replay": true}))
            .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["is_active"], true);
        assert!(b["replayed"].as_u64().unwrap() >= 6, "{b}");
        let got = rx
            .wait_for(WAIT, "all 15 records and webhook:enabled", |g| {
                per_run_order(g, "/dying").values().map(Vec::len).sum::<usize>() >= 15
                    && g.iter()
                        .any(|r| r.path == "/watch" && r.json()["event"] == "webhook:enabled")
            })
            .await;
        for (run, seq) in per_run_order(&got, "/dying") {
            assert_eq!(seq, vec![0, 1, 2, 3, 4], "run {run}: every event once, in order");
        }
        assert!(
            !rx.on("/dying").iter().any(|r| r.json()["event"] == "webhook:disabled"),
            "the disabled webhook was not told of its own disabling"
        );
        let (_, w) = app.get(&format!("/webhook/{dying}")).await;
        assert_eq!(w["delivery"]["breaker"], "closed", "{w}");
        // Bad input is a typed 400 naming the field; an unknown webhook a 404.
        let (s, b) = app
            .post(&format!("/webhook/{dying}/enable"), json!({"replay": "yes"}))
            .await;
        assert_eq!(s, 400, "{b}");
        let (s, _) = app
            .post("/webhook/00000000-0000-4000-8000-000000000000/enable", json!({}))
            .await;
        assert_eq!(s, 404);
        h.stop().await;
    }
);

both_buses!(
    operational_events_reach_subscribers_and_never_the_failing_target,
    |bus| async move {
        // /dead answers 500 to everything; /watch takes every operational event.
        let rx = Receiver::with_script(Arc::new(|r, _| match r.path.as_str() {
            "/dead" => Reply::status(500),
            _ => Reply::status(200),
        }))
        .await;
        let mut h = Harness::start(bus, &[("SYNCRELAY__DELIVERY__RETRY__MAX_ATTEMPTS", "2")]).await;
        let app = h.api();
        let (dead, _) = app.webhook(&rx.url("/dead"), &["*"]).await;
        let (watch, _) = app
            .webhook(&rx.url("/watch"), &["webhook:*", "delivery:exhausted"])
            .await;
        // A catch-all webhook of run events gets no relay chatter.
        let (_all, _) = app.webhook(&rx.url("/all"), &[]).await;
        h.send(&[event("x1", &dead, None, json!({}))]).await;
        let got = rx
            .wait_for(WAIT, "delivery:exhausted", |g| {
                g.iter()
                    .any(|r| r.path == "/watch" && r.json()["event"] == "delivery:exhausted")
            })
            .await;
        let n = got
            .iter()
            .find(|r| r.path == "/watch" && r.json()["event"] == "delivery:exhausted")
            .unwrap()
            .json();
        assert_eq!(n["payload"]["webhook_id"], dead.as_str());
        assert_eq!(n["payload"]["event_id"], "x1");
        assert_eq!(n["payload"]["attempts"], 2);
        assert_eq!(n["webhook_id"], watch.as_str());
        // Rotating a secret is announced, without the secret.
        let (s, rotated) = app.post(&format!("/webhook/{dead}/rotate-secret"), json!({})).await;
        assert_eq!(s, 200);
        let got = rx
            .wait_for(WAIT, "webhook:secret_rotated", |g| {
                g.iter()
                    .any(|r| r.path == "/watch" && r.json()["event"] == "webhook:secret_rotated")
            })
            .await;
        let n = got
            .iter()
            .find(|r| r.path == "/watch" && r.json()["event"] == "webhook:secret_rotated")
            .unwrap();
        assert_eq!(n.json()["payload"]["webhook_id"], dead.as_str());
        let secret = rotated["secret"].as_str().unwrap();
        assert!(
            !String::from_utf8_lossy(&n.body).contains(secret),
            "no secret in the event"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The failing webhook (subscribed to everything) got only its own event's attempts, and
        // the catch-all webhook nothing.
        let at_dead: Vec<String> = rx
            .on("/dead")
            .iter()
            .map(|r| r.json()["event"].as_str().unwrap().to_string())
            .collect();
        assert!(at_dead.iter().all(|e| e == "record:created"), "{at_dead:?}");
        assert!(rx.on("/all").is_empty(), "catch-all got {:?}", rx.on("/all").len());
        let m = h.metrics().await;
        assert_eq!(
            m.value(
                "syncrelay_operational_events_total",
                &[("event_type", "delivery:exhausted")]
            ),
            1.0
        );
        h.stop().await;
    }
);

both_buses!(
    per_webhook_overrides_set_the_cap_and_the_retry_schedule,
    |bus| async move {
        let rx = Receiver::with_script(Arc::new(|r, _| match r.path.as_str() {
            "/fails" => Reply::status(500),
            _ => Reply::status(200).delayed(Duration::from_millis(150)),
        }))
        .await;
        let mut h = Harness::start(bus, &[]).await; // 12 attempts, cap 32 by default
        let app = h.api();
        let (slow, _) = app.webhook(&rx.url("/slow"), &[]).await;
        let (fails, _) = app.webhook(&rx.url("/fails"), &[]).await;
        // Validated: typed 400 naming the field.
        for (body, field) in [
            (json!({"overrides": {"max_in_flight": 0}}), "overrides.max_in_flight"),
            (
                json!({"overrides": {"max_in_flight": 100000}}),
                "overrides.max_in_flight",
            ),
            (
                json!({"overrides": {"retry": {"max_attempts": 0}}}),
                "overrides.retry.max_attempts",
            ),
            (
                json!({"overrides": {"retry": {"initial_interval_ms": 700000}}}),
                "overrides.retry.initial_interval_ms",
            ),
            (
                json!({"overrides": {"retry": {"multiplier": 0.5}}}),
                "overrides.retry.multiplier",
            ),
            (
                json!({"overrides": {"retry": {"often": true}}}),
                "overrides.retry.often",
            ),
            // An object, not an array (a derived struct would take one field by field).
            (json!({"overrides": []}), "overrides"),
            (json!({"overrides": {"retry": []}}), "overrides.retry"),
            (
                json!({"overrides": {"retry": {"max_attempts": "x"}}}),
                "overrides.retry.max_attempts",
            ),
        ] {
            let (s, b) = app
                .call(reqwest::Method::PATCH, &format!("/webhook/{slow}"), Some(body.clone()))
                .await;
            assert_eq!(s, 400, "{body} -> {b}");
            assert_eq!(b["detail"]["field"], field, "{body} -> {b}");
        }
        let (s, w) = app
            .call(
                reqwest::Method::PATCH,
                &format!("/webhook/{slow}"),
                Some(json!({"overrides": {"max_in_flight": 2}})),
            )
            .await;
        assert_eq!(s, 200, "{w}");
        assert_eq!(w["overrides"], json!({"max_in_flight": 2}));
        let (s, w) = app
            .call(
                reqwest::Method::PATCH,
                &format!("/webhook/{fails}"),
                Some(json!({"overrides": {"retry": {"max_attempts": 2, "initial_interval_ms": 10}}})),
            )
            .await;
        assert_eq!(s, 200, "{w}");
        let events: Vec<Value> = (0..12)
            .map(|i| event(&format!("s{i}"), &slow, None, json!({})))
            .collect();
        h.send(&events).await;
        h.send(&[event("f1", &fails, None, json!({}))]).await;
        rx.wait_for(WAIT, "12 slow deliveries", |g| {
            g.iter().filter(|r| r.path == "/slow").count() >= 12
        })
        .await;
        assert!(
            rx.max_concurrent("/slow") <= 2,
            "cap 2 held: {}",
            rx.max_concurrent("/slow")
        );
        eventually(WAIT, "f1 dead-lettered", || async {
            let (_, dl) = app.get("/dead-letters?event_id=f1").await;
            dl["results"].as_array().filter(|a| !a.is_empty()).cloned()
        })
        .await;
        assert_eq!(
            rx.on("/fails").len(),
            2,
            "the webhook's own max_attempts (2), not the default 12"
        );
        // null clears them.
        let (s, w) = app
            .call(
                reqwest::Method::PATCH,
                &format!("/webhook/{slow}"),
                Some(json!({"overrides": null})),
            )
            .await;
        assert_eq!(s, 200);
        assert!(w["overrides"].is_null(), "{w}");
        h.stop().await;
    }
);
