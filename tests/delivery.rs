//! Delivery behaviour over real HTTP: syncrelay in-process on port 0, a real receiver. Every
//! scenario that involves a bus runs against both (`both_buses!`, tests/support/bus.rs):
//! `name::embedded` takes events through `POST /events`, `name::kafka` has them produced to the
//! events topic of a real Kafka-protocol broker (tansu), keyed by run.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::Mac;
use serde_json::json;
use support::*;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// How long a scenario waits for deliveries (a Kafka consumer joins its group first).
const WAIT: Duration = Duration::from_secs(30);

/// The delivery log's entry (`GET /deliveries/{id}`, attempts included) of `event_id`'s one
/// delivery once it is no longer pending, waiting up to 5 s for it; panics when there is none.
async fn settled_delivery(app: &impl Api, event_id: &str) -> serde_json::Value {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, list) = app.get(&format!("/deliveries?event_id={event_id}")).await;
        let rows = list["results"].as_array().unwrap();
        if let [row] = rows.as_slice() {
            if row["status"] != "pending" || std::time::Instant::now() > until {
                let (_, d) = app.get(&format!("/deliveries/{}", row["id"].as_str().unwrap())).await;
                return d;
            }
        }
        assert!(
            std::time::Instant::now() < until,
            "the delivery log does not show one delivery of {event_id}: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

both_buses!(
    delivered_event_verifies_with_standard_webhooks_and_truto_signature_recomputes,
    |bus| async move {
        let rx = Receiver::start().await;
        let h = Harness::start(bus, &[]).await;
        let app = h.api();
        let (wid, secret) = app.webhook(&rx.url("/hook"), &[]).await;
        let run = run_id(1);
        h.send(&[json!({
            "id": "evt_sig_2", "event": "sync_job_run:record", "sync_job_run_id": run, "webhook_id": wid,
            "environment_id": "env-1", "created_at": "2026-11-25T10:00:00Z",
            "payload": {"z": 1, "a": {"nested": [1, 2, "three"]}, "unicode": "héllo ✓"}
        })])
        .await;
        let got = rx.wait_for(WAIT, "one delivery", |g| !g.is_empty()).await;
        let r = &got[0];

        // The independent reference verifier accepts it.
        let verifier = standardwebhooks::Webhook::new(&secret).unwrap();
        verifier
            .verify(&r.body, &r.header_map())
            .expect("standardwebhooks verifies the signature");
        // A wrong secret does not.
        let other = standardwebhooks::Webhook::new("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert!(other.verify(&r.body, &r.header_map()).is_err());

        // x-truto-signature: HMAC-SHA256 keyed with the secret string over the body.
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(&r.body);
        let want = format!(
            "format=sha256,v={}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(r.header("x-truto-signature"), want);

        // Headers and body per the contract.
        assert_eq!(r.header("webhook-id"), "evt_sig_2");
        assert_eq!(r.header("webhook-attempt"), "1");
        assert_eq!(r.header("content-type"), "application/json");
        assert!(r.header("user-agent").starts_with("syncrelay/"));
        let body = r.json();
        assert_eq!(body["id"], "evt_sig_2");
        assert_eq!(body["event"], "sync_job_run:record");
        assert_eq!(body["webhook_id"], wid.as_str());
        assert_eq!(body["environment_id"], "env-1");
        assert_eq!(body["created_at"], "2026-11-25T10:00:00.000Z");
        assert_eq!(body["payload"]["unicode"], "héllo ✓");
        // Payload passed through with its key order, compact.
        let text = String::from_utf8(r.body.to_vec()).unwrap();
        assert!(
            text.contains(r#""payload":{"z":1,"a":{"nested":[1,2,"three"]},"unicode":"héllo ✓"}"#),
            "{text}"
        );

        // In the delivery log with its one attempt, and counted.
        let d = settled_delivery(app, "evt_sig_2").await;
        assert_eq!(d["status"], "delivered", "{d}");
        assert_eq!(
            h.metric(
                "syncrelay_deliveries_total",
                &[("kind", "webhook"), ("outcome", "delivered")]
            )
            .await,
            1.0
        );
        let statuses: Vec<_> = d["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["status"].clone())
            .collect();
        assert_eq!(statuses, vec![json!(200)], "{d}");
    }
);

both_buses!(
    an_event_of_an_unknown_run_without_webhook_is_dead_lettered_and_the_run_goes_on,
    |bus| async move {
        let rx = Receiver::start().await;
        let h = Harness::start(bus, &[]).await;
        let app = h.api();
        let (wid, _) = app.webhook(&rx.url("/hook"), &[]).await;
        let run = run_id(2);
        // No webhook_id and a run the relay does not know: nowhere to deliver it.
        let unroutable =
            json!({"id": "evt_lost", "event": "sync_job_run:record", "sync_job_run_id": run, "payload": {}});
        h.send(&[unroutable.clone(), event("evt_next", &wid, Some(&run), json!({}))])
            .await;
        let got = rx
            .wait_for(WAIT, "the event behind it", |g| {
                g.iter().any(|r| r.header("webhook-id") == "evt_next")
            })
            .await;
        assert_eq!(got.len(), 1, "only the routable event is delivered");

        // On Kafka the dead letter is stored beside the delivery, not before it: wait for it.
        let dl = wait_dead_letters(app, "limit=1000", 1).await;
        let reasons: Vec<_> = dl
            .iter()
            .map(|d| (d["event_id"].clone(), d["reason"].clone()))
            .collect();
        assert_eq!(reasons, vec![(json!("evt_lost"), json!("unknown_run"))]);
        assert_eq!(
            h.metric("syncrelay_dead_letters_total", &[("reason", "unknown_run")])
                .await,
            1.0
        );

        if bus == Bus::Kafka {
            // And on the dead-letter topic: the original bytes, the reason and where it came from.
            let dlq = h.consume_dlq(1, Duration::from_secs(20)).await;
            assert_eq!(dlq.len(), 1, "one message on the dead-letter topic");
            let m = &dlq[0];
            assert_eq!(m.json(), unroutable);
            assert_eq!(m.header("x-dlq-reason"), Some("unknown_run"));
            assert_eq!(m.header("x-dlq-source-topic"), Some(h.kafka().topics.events.as_str()));
            assert!(m
                .header("x-dlq-source-offset")
                .is_some_and(|o| o.parse::<i64>().is_ok()));
        }
    }
);

both_buses!(
    failed_delivery_is_retried_with_growing_backoff_and_the_same_webhook_id,
    |bus| async move {
        // 500, 500, 500, then 200.
        let rx = Receiver::with_script(Arc::new(|_, seen| Reply::status(if seen < 3 { 500 } else { 200 }))).await;
        let h = Harness::start(
            bus,
            &[
                ("SYNCRELAY__DELIVERY__RETRY__INITIAL_INTERVAL_MS", "100"),
                ("SYNCRELAY__DELIVERY__RETRY__MULTIPLIER", "3"),
            ],
        )
        .await;
        let app = h.api();
        let (wid, _) = app.webhook(&rx.url("/flaky"), &[]).await;
        h.send(&[event("evt_retry", &wid, Some(&run_id(7)), json!({"n": 1}))])
            .await;
        let got = rx.wait_for(WAIT, "4 attempts", |g| g.len() >= 4).await;
        assert_eq!(got.len(), 4);
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.header("webhook-id"), "evt_retry");
            assert_eq!(r.header("webhook-attempt"), (i + 1).to_string());
            assert_eq!(r.body, got[0].body, "the body is the same on every attempt");
        }
        let gaps: Vec<Duration> = got.windows(2).map(|w| w[1].at - w[0].at).collect();
        // Schedule: 100 ms, 300 ms, 900 ms (no jitter in this test).
        assert!(gaps[0] >= Duration::from_millis(100), "{gaps:?}");
        assert!(gaps[1] >= Duration::from_millis(300), "{gaps:?}");
        assert!(gaps[2] >= Duration::from_millis(900), "{gaps:?}");
        assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "gaps grow: {gaps:?}");

        // The delivery log shows every attempt.
        let d = settled_delivery(app, "evt_retry").await;
        assert_eq!(d["status"], "delivered", "{d}");
        let statuses: Vec<_> = d["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["status"].as_i64().unwrap())
            .collect();
        assert_eq!(statuses, vec![500, 500, 500, 200]);
        assert_eq!(d["attempts"][0]["response_excerpt"], "receiver says hi");
    }
);

/// The open dead letters `GET /dead-letters?{query}` lists, once there are at least `n`.
async fn wait_dead_letters(app: &TestApp, query: &str, n: usize) -> Vec<serde_json::Value> {
    eventually(WAIT, &format!("{n} dead letters ({query})"), || async move {
        let (s, dl) = app.get(&format!("/dead-letters?{query}")).await;
        assert_eq!(s, 200, "{dl}");
        let rows = dl["results"].as_array().unwrap().clone();
        (rows.len() >= n).then_some(rows)
    })
    .await
}

/// On the Kafka bus, once the relay stored `n` open dead letters: each is on the dead-letter
/// topic too, with the CONTRACT §1 headers: the reason, the attempts made, the last status
/// (empty when there was none) and where the event was read. Returns the topic's messages.
async fn assert_dlq_mirrors_the_store(h: &Harness, n: usize) -> Vec<support::broker::Consumed> {
    let stored = wait_dead_letters(h.api(), "limit=1000", n).await;
    assert_eq!(stored.len(), n, "{stored:?}");
    let msgs = h.consume_dlq(n, WAIT).await;
    let key = |id: &str, reason: &str, attempts: String, status: String| format!("{id} {reason} {attempts} {status}");
    let mut want: Vec<String> = stored
        .iter()
        .map(|d| {
            key(
                d["event_id"].as_str().unwrap(),
                d["reason"].as_str().unwrap(),
                d["attempts"].to_string(),
                d["last_status"].as_i64().map(|s| s.to_string()).unwrap_or_default(),
            )
        })
        .collect();
    let mut got: Vec<String> = msgs
        .iter()
        .map(|m| {
            key(
                m.json()["id"].as_str().unwrap_or("?"),
                m.header("x-dlq-reason").unwrap_or("?"),
                m.header("x-dlq-attempts").unwrap_or("?").to_string(),
                m.header("x-dlq-last-status").unwrap_or("?").to_string(),
            )
        })
        .collect();
    want.sort();
    got.sort();
    assert_eq!(
        got, want,
        "the dead-letter topic (id reason attempts last-status) vs the store"
    );
    let events = &h.kafka().topics.events;
    for m in &msgs {
        assert_eq!(m.header("x-dlq-source-topic"), Some(events.as_str()), "{m:?}");
        assert!(
            m.header("x-dlq-source-partition")
                .is_some_and(|p| p.parse::<i32>().is_ok()),
            "{m:?}"
        );
        assert!(
            m.header("x-dlq-source-offset")
                .is_some_and(|o| o.parse::<i64>().is_ok()),
            "{m:?}"
        );
    }
    msgs
}

/// Every delivery of `event_id` in the delivery log as (kind, status, its attempts' statuses),
/// sorted.
async fn logged(app: &TestApp, event_id: &str) -> Vec<(String, String, Vec<i64>)> {
    let (_, list) = app.get(&format!("/deliveries?event_id={event_id}")).await;
    let mut out = Vec::new();
    for row in list["results"].as_array().unwrap() {
        let (_, d) = app.get(&format!("/deliveries/{}", row["id"].as_str().unwrap())).await;
        out.push((
            d["kind"].as_str().unwrap_or("?").to_string(),
            d["status"].as_str().unwrap_or("?").to_string(),
            attempt_statuses(&d),
        ));
    }
    out.sort();
    out
}

/// The statuses of a delivery log entry's attempts.
fn attempt_statuses(d: &serde_json::Value) -> Vec<i64> {
    d["attempts"]
        .as_array()
        .unwrap_or_else(|| panic!("no attempts: {d}"))
        .iter()
        .map(|a| a["status"].as_i64().unwrap_or(-1))
        .collect()
}

both_buses!(
    events_of_each_run_arrive_in_order_while_runs_interleave,
    |bus| async move {
        // Jittered latency so that out-of-order delivery would show.
        let rx = Receiver::with_script(Arc::new(|r, _| {
            let n = r.body.len() as u64 % 7;
            Reply::status(200).delayed(Duration::from_millis(n))
        }))
        .await;
        let h = Harness::start(bus, &[]).await;
        let (wid, _) = h.api().webhook(&rx.url("/ordered"), &[]).await;
        let mut events = Vec::new();
        for i in 0..10 {
            for run in 0..20 {
                events.push(event(
                    &format!("r{run}-e{i}"),
                    &wid,
                    Some(&run_id(run)),
                    json!({"run": run, "i": i}),
                ));
            }
        }
        h.send(&events).await;
        let got = rx.wait_for(WAIT, "200 deliveries", |g| g.len() >= 200).await;
        let mut per_run: HashMap<i64, Vec<i64>> = HashMap::new();
        let mut first_run_sequence = Vec::new();
        for r in &got {
            let b = r.json();
            let run = b["payload"]["run"].as_i64().unwrap();
            per_run
                .entry(run)
                .or_default()
                .push(b["payload"]["i"].as_i64().unwrap());
            first_run_sequence.push(run);
        }
        assert_eq!(per_run.len(), 20);
        for (run, seq) in &per_run {
            assert_eq!(seq, &(0..10).collect::<Vec<_>>(), "run {run} out of order");
        }
        // Runs interleave: the first 40 deliveries span many runs, not one run after another.
        let distinct: std::collections::HashSet<_> = first_run_sequence[..40].iter().collect();
        assert!(
            distinct.len() >= 10,
            "runs did not proceed in parallel: {:?}",
            &first_run_sequence[..40]
        );
    }
);

both_buses!(a_hanging_webhook_does_not_slow_another_webhook, |bus| async move {
    let rx = Receiver::with_script(Arc::new(|r, _| {
        if r.path == "/hang" {
            Reply::status(200).delayed(Duration::from_secs(30))
        } else {
            Reply::status(200)
        }
    }))
    .await;
    let h = Harness::start(
        bus,
        &[
            ("SYNCRELAY__DELIVERY__MAX_IN_FLIGHT", "16"),
            ("SYNCRELAY__DELIVERY__MAX_IN_FLIGHT_PER_WEBHOOK", "4"),
            ("SYNCRELAY__DELIVERY__REQUEST_TIMEOUT_MS", "20000"),
        ],
    )
    .await;
    let app = h.api();
    let (hang, _) = app.webhook(&rx.url("/hang"), &[]).await;
    let (fast, _) = app.webhook(&rx.url("/fast"), &[]).await;
    // 200 independent events to the hanging webhook first, then 100 to the healthy one (on
    // Kafka: without a run, so no key; spread over both partitions).
    let mut events: Vec<_> = (0..200)
        .map(|i| event(&format!("h{i}"), &hang, None, json!({})))
        .collect();
    events.extend((0..100).map(|i| event(&format!("f{i}"), &fast, None, json!({}))));
    let started = std::time::Instant::now();
    h.send(&events).await;
    rx.wait_for(Duration::from_secs(10), "100 fast deliveries", |g| {
        g.iter().filter(|r| r.path == "/fast").count() >= 100
    })
    .await;
    let took = started.elapsed();
    let hung = rx.on("/hang").len();
    assert!(took < Duration::from_secs(10), "healthy webhook took {took:?}");
    assert!(
        hung <= 4,
        "the per-webhook cap holds: {hung} concurrent requests to the hanging webhook"
    );
});

both_buses!(gone_disables_the_webhook_and_tells_subscribers, |bus| async move {
    let rx = Receiver::with_script(Arc::new(|r, _| {
        Reply::status(if r.path == "/gone" { 410 } else { 200 })
    }))
    .await;
    let h = Harness::start(bus, &[]).await;
    let app = h.api();
    let (gone, _) = app.webhook(&rx.url("/gone"), &[]).await;
    let (watcher, _) = app.webhook(&rx.url("/watch"), &["webhook:disabled"]).await;
    h.send(&[event("g1", &gone, Some(&run_id(1)), json!({}))]).await;
    let got = rx
        .wait_for(WAIT, "webhook:disabled", |g| g.iter().any(|r| r.path == "/watch"))
        .await;
    let note = got.iter().find(|r| r.path == "/watch").unwrap().json();
    assert_eq!(note["event"], "webhook:disabled");
    assert_eq!(note["payload"]["webhook_id"], gone.as_str());
    assert_eq!(note["webhook_id"], watcher.as_str());
    let (_, w) = app.get(&format!("/webhook/{gone}")).await;
    assert_eq!(w["is_active"], false);
    // Later events for the disabled webhook are dead-lettered, not attempted.
    h.send(&[event("g2", &gone, Some(&run_id(1)), json!({}))]).await;
    let dl = wait_dead_letters(app, "event_id=g2", 1).await;
    assert_eq!(dl[0]["reason"], "webhook_disabled");
    assert_eq!(rx.on("/gone").len(), 1);
    if bus == Bus::Kafka {
        // Both dead letters (g1 answered 410, g2 refused) are on the dead-letter topic.
        assert_dlq_mirrors_the_store(&h, 2).await;
    }
});

both_buses!(
    payload_too_large_answer_dead_letters_and_the_run_goes_on,
    |bus| async move {
        let rx = Receiver::with_script(Arc::new(|r, _| {
            Reply::status(if r.header("webhook-id") == "big" { 413 } else { 200 })
        }))
        .await;
        let h = Harness::start(bus, &[]).await;
        let app = h.api();
        let (wid, _) = app.webhook(&rx.url("/h"), &[]).await;
        let run = run_id(3);
        h.send(&[
            event("big", &wid, Some(&run), json!({})),
            event("after", &wid, Some(&run), json!({})),
        ])
        .await;
        let got = rx
            .wait_for(WAIT, "the next event", |g| {
                g.iter().any(|r| r.header("webhook-id") == "after")
            })
            .await;
        assert_eq!(
            got.iter().filter(|r| r.header("webhook-id") == "big").count(),
            1,
            "413 is not retried"
        );
        let dl = wait_dead_letters(app, "event_id=big", 1).await;
        assert_eq!(dl[0]["reason"], "payload_too_large");
        assert_eq!(dl[0]["last_status"], 413);
        if bus == Bus::Kafka {
            let msgs = assert_dlq_mirrors_the_store(&h, 1).await;
            assert_eq!(msgs[0].header("x-dlq-last-status"), Some("413"));
        }
    }
);

both_buses!(retry_after_is_honoured_on_429_and_503, |bus| async move {
    // Each event's first attempt is refused with `Retry-After: 1`: one with 429, one with 503.
    let rx = Receiver::with_script(Arc::new(|r, seen| match (r.header("webhook-id"), seen) {
        ("ra429", 0) => Reply::status(429).header("retry-after", "1"),
        ("ra503", 0) => Reply::status(503).header("retry-after", "1"),
        _ => Reply::status(200),
    }))
    .await;
    let h = Harness::start(bus, &[]).await; // initial backoff 50 ms
    let (wid, _) = h.api().webhook(&rx.url("/ra"), &[]).await;
    h.send(&[
        event("ra429", &wid, None, json!({})),
        event("ra503", &wid, None, json!({})),
    ])
    .await;
    let got = rx
        .wait_for(WAIT, "second attempts", |g| {
            g.iter().filter(|r| r.status == 200).count() >= 2
        })
        .await;
    for id in ["ra429", "ra503"] {
        let tries: Vec<_> = got.iter().filter(|r| r.header("webhook-id") == id).collect();
        assert_eq!(tries.len(), 2, "{id}: one refusal, one success");
        let gap = tries[1].at - tries[0].at;
        assert!(gap >= Duration::from_secs(1), "{id}: retried after {gap:?}");
    }
});

// On Kafka, `inline_attempts = 1`: the second attempt comes from the store (the delivery is
// parked while dl2 waits behind it in the run), so the parked path is what reaches the
// dead-letter topic and what replay re-drives.
both_buses!(
    exhausted_deliveries_are_dead_lettered_and_replay_redelivers_with_the_same_id,
    |bus| async move {
        let rx = Receiver::with_script(Arc::new(|_, _| Reply::status(500))).await;
        let h = Harness::start(
            bus,
            &[
                ("SYNCRELAY__DELIVERY__RETRY__MAX_ATTEMPTS", "2"),
                ("SYNCRELAY__BUS__KAFKA__INLINE_ATTEMPTS", "1"),
            ],
        )
        .await;
        let app = h.api();
        let (wid, _) = app.webhook(&rx.url("/dl"), &[]).await;
        let run = run_id(9);
        h.send(&[
            event("dl1", &wid, Some(&run), json!({})),
            event("dl2", &wid, Some(&run), json!({})),
        ])
        .await;
        // dl1 fails twice, is dead-lettered, then dl2 (behind it in the run) gets its turn.
        rx.wait_for(WAIT, "4 attempts", |g| g.len() >= 4).await;
        let rows = wait_dead_letters(app, &format!("webhook_id={wid}"), 2).await;
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0]["event_id"], "dl1");
        assert_eq!(rows[0]["reason"], "attempts_exhausted");
        assert_eq!(rows[0]["attempts"], 2);
        assert_eq!(rows[0]["last_status"], 500);
        let order: Vec<_> = rx
            .received()
            .iter()
            .map(|r| r.header("webhook-id").to_string())
            .collect();
        assert_eq!(order, vec!["dl1", "dl1", "dl2", "dl2"]);
        // The delivery log shows both attempts of the dead delivery.
        let d = settled_delivery(app, "dl1").await;
        assert_eq!(d["status"], "dead", "{d}");
        assert_eq!(attempt_statuses(&d), vec![500, 500], "{d}");
        if bus == Bus::Kafka {
            // Exhausted deliveries reach the dead-letter topic with the attempts and last status.
            let msgs = assert_dlq_mirrors_the_store(&h, 2).await;
            let ids: Vec<_> = msgs.iter().map(|m| m.json()["id"].clone()).collect();
            assert_eq!(ids, vec![json!("dl1"), json!("dl2")], "in the run's order");
            for m in &msgs {
                assert_eq!(m.header("x-dlq-reason"), Some("attempts_exhausted"));
                assert_eq!(m.header("x-dlq-attempts"), Some("2"));
                assert_eq!(m.header("x-dlq-last-status"), Some("500"));
            }
        }

        rx.set_script(Arc::new(|_, _| Reply::status(200)));
        let (s, b) = app.post("/dead-letters/replay", json!({"webhook_id": wid})).await;
        assert_eq!(s, 202, "{b}");
        assert_eq!(b["replayed"], 2);
        let got = rx.wait_for(WAIT, "replayed", |g| g.len() >= 6).await;
        let replayed: Vec<_> = got[4..].iter().map(|r| r.header("webhook-id").to_string()).collect();
        assert_eq!(replayed, vec!["dl1", "dl2"], "replay keeps the run's order and the ids");
        let (_, dl) = app.get(&format!("/dead-letters?webhook_id={wid}")).await;
        assert!(dl["results"].as_array().unwrap().is_empty());
        // The delivery log shows every attempt: the dead delivery keeps its two, the replay is
        // a delivery of its own (same event, same target) answered at once.
        for id in ["dl1", "dl2"] {
            let want = vec![
                ("webhook".to_string(), "dead".to_string(), vec![500, 500]),
                ("webhook".to_string(), "delivered".to_string(), vec![200]),
            ];
            eventually(WAIT, &format!("{id}'s log: {want:?}"), || {
                let want = want.clone();
                async move { (logged(app, id).await == want).then_some(()) }
            })
            .await;
        }
    }
);

both_buses!(replay_reaches_only_the_target_that_failed, |bus| async move {
    // The webhook fails until replayed; the event's callback URL takes it at once.
    let rx = Receiver::with_script(Arc::new(|r, _| Reply::status(if r.path == "/wh" { 500 } else { 200 }))).await;
    let h = Harness::start(bus, &[("SYNCRELAY__DELIVERY__RETRY__MAX_ATTEMPTS", "2")]).await;
    let app = h.api();
    let (wid, _) = app.webhook(&rx.url("/wh"), &[]).await;
    let mut e = event("rp1", &wid, Some(&run_id(11)), json!({"n": 1}));
    e["callback_url"] = json!(rx.url("/cb"));
    h.send(&[e]).await;
    let dl = wait_dead_letters(app, "event_id=rp1", 1).await;
    assert_eq!(dl.len(), 1, "only the webhook's delivery failed: {dl:?}");
    assert_eq!(dl[0]["reason"], "attempts_exhausted");
    assert_eq!(dl[0]["webhook_id"], wid.as_str());
    assert_eq!(rx.on("/wh").len(), 2);
    assert_eq!(rx.on("/cb").len(), 1);
    if bus == Bus::Kafka {
        assert_dlq_mirrors_the_store(&h, 1).await;
    }

    rx.set_script(Arc::new(|_, _| Reply::status(200)));
    let (s, b) = app.post("/dead-letters/replay", json!({"ids": [dl[0]["id"]]})).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["replayed"], 1, "{b}");
    let got = rx
        .wait_for(WAIT, "the replay", |g| {
            g.iter().any(|r| r.path == "/wh" && r.status == 200)
        })
        .await;
    let wh: Vec<_> = got.iter().filter(|r| r.path == "/wh").collect();
    assert_eq!(wh.len(), 3, "two attempts, then the replay");
    assert_eq!(wh[2].header("webhook-id"), "rp1", "same webhook-id");
    // The callback URL answered 2xx already: it is not sent the event again. The replay was
    // answered before this settle time; a second callback request would have gone out with it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.on("/cb").len(), 1, "the callback URL is not sent the event again");
    assert_eq!(rx.on("/wh").len(), 3);
    // The delivery log shows every attempt: the callback's one, the webhook's dead delivery
    // with its two, and the replay.
    assert_eq!(
        logged(app, "rp1").await,
        vec![
            ("callback".to_string(), "delivered".to_string(), vec![200]),
            ("webhook".to_string(), "dead".to_string(), vec![500, 500]),
            ("webhook".to_string(), "delivered".to_string(), vec![200]),
        ]
    );
});

both_buses!(during_rotation_both_secrets_sign, |bus| async move {
    let rx = Receiver::start().await;
    let h = Harness::start(bus, &[]).await;
    let app = h.api();
    let (wid, old) = app.webhook(&rx.url("/rot"), &[]).await;
    let (s, rotated) = app.post(&format!("/webhook/{wid}/rotate-secret"), json!({})).await;
    assert_eq!(s, 200, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert!(rotated["previous_secret_expires_at"].is_string());
    h.send(&[event("rot1", &wid, None, json!({}))]).await;
    let got = rx.wait_for(WAIT, "delivery", |g| !g.is_empty()).await;
    let r = &got[0];
    assert_eq!(r.header("webhook-signature").split(' ').count(), 2);
    standardwebhooks::Webhook::new(&new)
        .unwrap()
        .verify(&r.body, &r.header_map())
        .expect("new secret verifies");
    standardwebhooks::Webhook::new(&old)
        .unwrap()
        .verify(&r.body, &r.header_map())
        .expect("old secret verifies");
});

both_buses!(
    callback_urls_get_the_event_signed_with_the_callback_secret,
    |bus| async move {
        let rx = Receiver::start().await;
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let h = Harness::start(bus, &[("SYNCRELAY__CALLBACKS__SECRET", secret)]).await;
        let (wid, _) = h.api().webhook(&rx.url("/wh"), &[]).await;
        let mut e = event("cb1", &wid, Some(&run_id(4)), json!({"k": "v"}));
        e["callback_url"] = json!(rx.url("/callback?x=1"));
        h.send(&[e]).await;
        let got = rx.wait_for(WAIT, "both", |g| g.len() >= 2).await;
        let cb = got.iter().find(|r| r.path == "/callback").expect("callback delivered");
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&cb.body, &cb.header_map())
            .expect("callback secret verifies");
        assert_eq!(cb.header("webhook-id"), "cb1");
        assert!(got.iter().any(|r| r.path == "/wh"));
    }
);

// ---------------------------------------------------------------------------------------------
// No bus involved.

/// Embedded only: `POST /webhook/{id}/test` signs and sends from the API handler and answers with
/// the attempt; no event goes through a bus, so a Kafka variant would test the same code again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_endpoint_sends_a_signed_test_event() {
    let rx = Receiver::start().await;
    let app = spawn_app(&[]).await;
    let (wid, secret) = app.webhook(&rx.url("/t"), &[]).await;
    let (s, b) = app.post(&format!("/webhook/{wid}/test"), json!({})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["delivered"], true);
    assert_eq!(b["attempt"]["status"], 200);
    let got = rx.received();
    assert_eq!(got[0].json()["event"], "webhook:test");
    standardwebhooks::Webhook::new(&secret)
        .unwrap()
        .verify(&got[0].body, &got[0].header_map())
        .unwrap();
}
