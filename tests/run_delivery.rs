//! The run lifecycle wired into delivery, over real HTTP: a sync job and a run created through
//! the API, scripted streams of run events naming only their run, and exactly what the run's
//! webhook receives, in order, with the run's final status and counts. Every scenario runs on both
//! buses (`both_buses!`): the events come in through `POST /events` (embedded; its answer is
//! checked too) or are produced to the events topic keyed by the run id (Kafka), routed through
//! the run the API created.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const ACCOUNT: &str = "94801e49-a652-42f9-af14-dd203d7897da";

/// How long a scenario waits for something to happen (a Kafka consumer reads in batches and
/// retries in memory first; everything takes a little longer than in-process intake).
const WAIT: Duration = Duration::from_secs(30);

/// Send `events` the bus's way; on the embedded bus, `POST /events` with all of them and its
/// answer (202 checked), on Kafka `None` (the broker's acknowledgement is all there is).
async fn send(h: &Harness, events: &[Value]) -> Option<Value> {
    match h.bus {
        Bus::Embedded => {
            let (s, resp) = h.api().post("/events", json!({ "events": events })).await;
            assert_eq!(s, 202, "{resp}");
            Some(resp)
        }
        Bus::Kafka => {
            h.send(events).await;
            None
        }
    }
}

/// The open dead letters `GET /dead-letters?{query}` lists, once there are at least `n`.
async fn wait_dead_letters(app: &TestApp, query: &str, n: usize) -> Vec<Value> {
    eventually(WAIT, &format!("{n} dead letters ({query})"), || async move {
        let (s, dl) = app.get(&format!("/dead-letters?{query}")).await;
        assert_eq!(s, 200, "{dl}");
        let rows = dl["results"].as_array().unwrap().clone();
        (rows.len() >= n).then_some(rows)
    })
    .await
}

/// A webhook on `rx`, a sync job and a run of it with this error handling: (webhook id, its
/// secret, run id).
async fn run_on(app: &TestApp, rx: &Receiver, mode: &str) -> (String, String, String) {
    let (wid, secret) = app.webhook(&rx.url("/hook"), &[]).await;
    let (s, job) = app
        .post(
            "/sync-job",
            json!({
                "integration_name": "jira",
                "resources": [
                    {"resource": "ticketing/tickets", "method": "list"},
                    {"resource": "ticketing/comments", "method": "list", "depends_on": "ticketing/tickets"}
                ]
            }),
        )
        .await;
    assert_eq!(s, 201, "{job}");
    let (s, run) = app
        .post(
            "/sync-job-run",
            json!({
                "sync_job_id": job["id"], "integrated_account_id": ACCOUNT,
                "webhook_id": wid, "error_handling": mode
            }),
        )
        .await;
    assert_eq!(s, 201, "{run}");
    (wid, secret, run["id"].as_str().unwrap().to_string())
}

/// An event of `run` naming only its run: `kind` is the action (`record`, `completed`, ...).
fn ev(id: &str, run: &str, kind: &str, resource: &str) -> Value {
    let mut payload = json!({"n": id});
    if !resource.is_empty() {
        payload["resource"] = json!(resource);
    }
    json!({"id": id, "event": format!("sync_job_run:{kind}"), "sync_job_run_id": run, "payload": payload})
}

/// Bodies answered 2xx, in the order they were answered.
fn delivered(rx: &Receiver) -> Vec<Value> {
    rx.received()
        .iter()
        .filter(|r| (200..300).contains(&r.status))
        .map(|r| r.json())
        .collect()
}

/// `event` (without the `sync_job_run:` prefix) and, for events the producer sent, its id.
fn names(bodies: &[Value]) -> Vec<String> {
    bodies
        .iter()
        .map(|b| {
            let event = b["event"].as_str().unwrap().trim_start_matches("sync_job_run:");
            let id = b["id"].as_str().unwrap();
            if id.starts_with("sr_") || id.starts_with("evt_") {
                event.to_string()
            } else {
                format!("{event}:{id}")
            }
        })
        .collect()
}

/// Wait for `n` 2xx answers, then a little longer to see that nothing more arrives. On a
/// timeout, says what did arrive and (Kafka) how many partitions the relay held.
async fn delivered_exactly(h: &Harness, rx: &Receiver, n: usize) -> Vec<Value> {
    let until = Instant::now() + WAIT;
    while delivered(rx).len() < n {
        if Instant::now() > until {
            let seen: Vec<String> = rx
                .received()
                .iter()
                .map(|r| format!("{}:{}", r.header("webhook-id"), r.status))
                .collect();
            let partitions = h.metrics().await.get("syncrelay_kafka_assigned_partitions", &[]);
            panic!(
                "timed out after {WAIT:?} waiting for {n} deliveries answered 2xx; received \
                 {seen:?}; delivered {:?}; partitions held {partitions:?}",
                names(&delivered(rx))
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let got = delivered(rx);
    assert_eq!(got.len(), n, "{:?}", names(&got));
    got
}

async fn run_status(app: &TestApp, run: &str) -> Value {
    let (s, b) = app.get(&format!("/sync-job-run/{run}")).await;
    assert_eq!(s, 200, "{b}");
    b
}

async fn wait_status(app: &TestApp, run: &str, status: &str) -> Value {
    let until = Instant::now() + WAIT;
    loop {
        let b = run_status(app, run).await;
        if b["status"] == status {
            return b;
        }
        assert!(Instant::now() < until, "run never became {status}: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

both_buses!(
    ignore_mode_delivers_every_record_error_and_completed_last_with_counts,
    |bus| async move {
        let rx = Receiver::start().await;
        let h = Harness::start(bus, &[]).await;
        let app = h.api();
        let (wid, secret, run) = run_on(app, &rx, "ignore").await;
        let events = vec![
            ev("s1", &run, "started", ""),
            ev("r1", &run, "record", "ticketing/tickets"),
            ev("e1", &run, "record_error", "ticketing/tickets"),
            ev("r2", &run, "record", "ticketing/comments"),
            ev("e2", &run, "record_error", "ticketing/comments"),
            ev("c1", &run, "completed", ""),
        ];
        if let Some(resp) = send(&h, &events).await {
            assert!(
                resp["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|e| e["status"] == "queued" && e["deliveries"] == 1),
                "{resp}"
            );
        }
        let got = delivered_exactly(&h, &rx, 7).await;
        assert_eq!(
            names(&got),
            vec![
                "created",
                "started:s1",
                "record:r1",
                "record_error:e1",
                "record:r2",
                "record_error:e2",
                "completed:c1"
            ]
        );
        for b in &got {
            assert_eq!(b["webhook_id"], wid.as_str(), "the run's webhook: {b}");
            assert_eq!(b["sync_job_run_id"], run.as_str());
        }
        let completed = &got[6]["payload"];
        assert_eq!(completed["n"], "c1", "the producer's payload is kept: {completed}");
        assert_eq!(completed["records_delivered"], 2, "{completed}");
        assert_eq!(completed["records_dead_lettered"], 0, "{completed}");
        assert_eq!(
            completed["record_errors"],
            json!({"ticketing/comments": 1, "ticketing/tickets": 1})
        );
        // The final body is what was signed.
        let last = rx
            .received()
            .into_iter()
            .rfind(|r| r.header("webhook-id") == "c1")
            .unwrap();
        standardwebhooks::Webhook::new(&secret)
            .unwrap()
            .verify(&last.body, &last.header_map())
            .expect("the completed body with its counts verifies");

        let r = wait_status(app, &run, "completed").await;
        assert!(r["started_at"].is_string() && r["finished_at"].is_string(), "{r}");
        assert_eq!(r["resource_stats"]["ticketing/tickets"]["records"], 1, "{r}");
        assert_eq!(r["resource_stats"]["ticketing/tickets"]["errors"], 1, "{r}");
        assert_eq!(r["resource_stats"]["ticketing/comments"]["records_delivered"], 1, "{r}");

        // Events of a finished run are dead-lettered, not delivered.
        if let Some(resp) = send(&h, &[ev("late1", &run, "record", "ticketing/tickets")]).await {
            assert_eq!(resp["events"][0]["status"], "dead_lettered", "{resp}");
            assert_eq!(resp["events"][0]["reason"], "run_finished", "{resp}");
        }
        let dl = wait_dead_letters(app, "reason=run_finished", 1).await;
        let ids: Vec<&str> = dl.iter().map(|d| d["event_id"].as_str().unwrap()).collect();
        assert_eq!(ids, vec!["late1"]);
        assert_eq!(dl[0]["webhook_id"], wid.as_str());
        if bus == Bus::Kafka {
            let dlq = h.consume_dlq(1, WAIT).await;
            assert_eq!(dlq.len(), 1, "{dlq:?}");
            assert_eq!(dlq[0].json()["id"], "late1");
            assert_eq!(dlq[0].header("x-dlq-reason"), Some("run_finished"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(delivered(&rx).len(), 7);
        assert_eq!(
            app.metric("syncrelay_runs_total", &[("status", "completed")]).await,
            1.0
        );
    }
);

both_buses!(
    fail_fast_delivers_the_first_error_then_failed_and_drops_the_rest,
    |bus| async move {
        let rx = Receiver::start().await;
        let h = Harness::start(bus, &[]).await;
        let app = h.api();
        let (_, _, run) = run_on(app, &rx, "fail_fast").await;
        let events = vec![
            ev("s1", &run, "started", ""),
            ev("r1", &run, "record", "ticketing/tickets"),
            ev("e1", &run, "record_error", "ticketing/tickets"),
            ev("r2", &run, "record", "ticketing/tickets"),
            ev("e2", &run, "record_error", "ticketing/comments"),
            ev("c1", &run, "completed", ""),
        ];
        let resp = send(&h, &events).await;
        let embedded = resp.is_some();
        if let Some(resp) = resp {
            let statuses: Vec<&str> = resp["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["status"].as_str().unwrap())
                .collect();
            assert_eq!(
                statuses,
                vec!["queued", "queued", "queued", "dropped", "dropped", "dropped"]
            );
            assert_eq!(resp["events"][3]["reason"], "run_failed");
        }
        let got = delivered_exactly(&h, &rx, 5).await;
        assert_eq!(
            names(&got),
            vec!["created", "started:s1", "record:r1", "record_error:e1", "failed"]
        );
        let failed = &got[4]["payload"];
        assert_eq!(failed["reason"], "fail_fast", "{failed}");
        assert_eq!(failed["error"]["n"], "e1", "{failed}");
        assert_eq!(failed["status"], "failed", "{failed}");
        assert_eq!(failed["records_delivered"], 1, "{failed}");
        // `failed` carries the counts when it is sent. One POST is ingested at once, so the
        // records after the error are dropped by then; on Kafka they are read when they come,
        // maybe after `failed` went out (one record a batch here), so it may count fewer of
        // them. The run's own counts below are exact on both buses.
        if embedded {
            assert_eq!(failed["records_dropped"], 2, "{failed}");
        } else {
            assert!(failed["records_dropped"].as_i64().unwrap() <= 2, "{failed}");
        }
        assert_eq!(failed["record_errors"], json!({"ticketing/tickets": 1}), "{failed}");

        let r = wait_status(app, &run, "failed").await;
        assert_eq!(r["stop_reason"], "fail_fast", "{r}");
        assert_eq!(r["resource_stats"]["ticketing/tickets"]["dropped"], 1, "{r}");
        assert_eq!(r["resource_stats"]["ticketing/comments"]["dropped"], 1, "{r}");
        // The three events after the error (r2, e2, c1) are dropped as events of a failed run.
        assert_eq!(
            app.metric("syncrelay_run_events_dropped_total", &[("reason", "run_failed")])
                .await,
            3.0
        );
        assert_eq!(app.metric("syncrelay_runs_total", &[("status", "failed")]).await, 1.0);
    }
);

both_buses!(
    batch_mode_delivers_one_record_error_with_every_error_before_completed,
    |bus| async move {
        let rx = Receiver::start().await;
        let h = Harness::start(bus, &[("SYNCRELAY__RUNS__BATCH__MAX_AGE_MS", "600000")]).await;
        let app = h.api();
        let (_, _, run) = run_on(app, &rx, "batch").await;
        let events = vec![
            ev("s1", &run, "started", ""),
            ev("e1", &run, "record_error", "ticketing/tickets"),
            ev("r1", &run, "record", "ticketing/tickets"),
            ev("e2", &run, "record_error", "ticketing/comments"),
            ev("c1", &run, "completed", ""),
        ];
        if let Some(resp) = send(&h, &events).await {
            assert_eq!(resp["events"][1]["status"], "batched", "{resp}");
        }
        let got = delivered_exactly(&h, &rx, 5).await;
        assert_eq!(
            names(&got),
            vec!["created", "started:s1", "record:r1", "record_error", "completed:c1"]
        );
        let errors: Vec<&str> = got[3]["payload"]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["n"].as_str().unwrap())
            .collect();
        assert_eq!(errors, vec!["e1", "e2"]);
        assert_eq!(
            got[4]["payload"]["record_errors"],
            json!({"ticketing/comments": 1, "ticketing/tickets": 1})
        );
        wait_status(app, &run, "completed").await;
    }
);

both_buses!(batch_mode_flushes_a_batch_by_age, |bus| async move {
    let rx = Receiver::start().await;
    let h = Harness::start(bus, &[("SYNCRELAY__RUNS__BATCH__MAX_AGE_MS", "200")]).await;
    let app = h.api();
    let (_, _, run) = run_on(app, &rx, "batch").await;
    h.send(&[
        ev("s1", &run, "started", ""),
        ev("e1", &run, "record_error", "ticketing/tickets"),
    ])
    .await;
    let got = delivered_exactly(&h, &rx, 3).await;
    assert_eq!(names(&got), vec!["created", "started:s1", "record_error"]);
    assert_eq!(got[2]["payload"]["errors"][0]["n"], "e1");
    assert_eq!(run_status(app, &run).await["status"], "running");
});

both_buses!(
    completed_produced_while_a_record_is_in_retry_is_delivered_last_with_final_counts,
    |bus| async move {
        // r2 is answered 500 twice before 200; r4 is answered 413 (dead letter, the run goes on).
        let rx = Receiver::with_script(Arc::new(|r, seen| match r.header("webhook-id") {
            "r2" if seen < 2 => Reply::status(500),
            "r4" => Reply::status(413),
            _ => Reply::status(200),
        }))
        .await;
        let h = Harness::start(
            bus,
            &[
                ("SYNCRELAY__DELIVERY__RETRY__INITIAL_INTERVAL_MS", "300"),
                ("SYNCRELAY__DELIVERY__RETRY__MULTIPLIER", "1"),
            ],
        )
        .await;
        let app = h.api();
        let (_, _, run) = run_on(app, &rx, "ignore").await;
        h.send(&[
            ev("s1", &run, "started", ""),
            ev("r1", &run, "record", "ticketing/tickets"),
            ev("r2", &run, "record", "ticketing/tickets"),
            ev("r3", &run, "record", "ticketing/comments"),
            ev("r4", &run, "record", "ticketing/comments"),
        ])
        .await;
        // r2 has failed once and is waiting for its retry: now the executor says completed.
        rx.wait_for(WAIT, "r2's first attempt", |g| {
            g.iter().any(|r| r.header("webhook-id") == "r2")
        })
        .await;
        h.send(&[ev("c1", &run, "completed", "")]).await;
        let got = delivered_exactly(&h, &rx, 6).await;
        assert_eq!(
            names(&got),
            vec![
                "created",
                "started:s1",
                "record:r1",
                "record:r2",
                "record:r3",
                "completed:c1"
            ]
        );
        let attempts_r2 = rx.received().iter().filter(|r| r.header("webhook-id") == "r2").count();
        assert_eq!(attempts_r2, 3);
        // Nothing reached the receiver after completed.
        assert_eq!(
            rx.received().last().unwrap().header("webhook-id"),
            "c1",
            "completed is the last request"
        );
        let c = &got[5]["payload"];
        assert_eq!(c["records_delivered"], 3, "{c}");
        assert_eq!(c["records_dead_lettered"], 1, "{c}");
        assert_eq!(c["resource_stats"]["ticketing/tickets"]["records_delivered"], 2, "{c}");
        assert_eq!(
            c["resource_stats"]["ticketing/comments"]["records_dead_lettered"], 1,
            "{c}"
        );
        let r = wait_status(app, &run, "completed").await;
        assert_eq!(
            r["resource_stats"]["ticketing/comments"]["records_dead_lettered"], 1,
            "{r}"
        );
        // The delivery log keeps the body that was sent.
        let (_, list) = app.get("/deliveries?event_id=c1").await;
        let id = list["results"][0]["id"].as_str().unwrap().to_string();
        let (_, d) = app.get(&format!("/deliveries/{id}")).await;
        assert_eq!(d["body"]["payload"]["records_delivered"], 3, "{d}");
        if bus == Bus::Kafka {
            // r4's 413 is on the dead-letter topic.
            let dlq = h.consume_dlq(1, WAIT).await;
            assert_eq!(dlq.len(), 1, "{dlq:?}");
            assert_eq!(dlq[0].json()["id"], "r4");
            assert_eq!(dlq[0].header("x-dlq-reason"), Some("payload_too_large"));
            assert_eq!(dlq[0].header("x-dlq-last-status"), Some("413"));
        }
    }
);

both_buses!(
    a_400_to_started_stops_the_run_and_its_later_events_are_not_delivered,
    |bus| async move {
        // `started` is answered once the relay holds r1 and r2 behind it: on Kafka they may
        // otherwise come in after the run has stopped, and be refused as events of a finished
        // run (dead letters, `run_finished`) instead of dropped from its queue, which is what
        // this test is about.
        let (open, gate) = tokio::sync::watch::channel(false);
        let rx = Receiver::with_script(Arc::new(move |r, _| {
            if r.json()["event"] == "sync_job_run:started" {
                Reply::status(400).after(gate.clone())
            } else {
                Reply::status(200)
            }
        }))
        .await;
        let h = Harness::start(bus, &[]).await;
        let app = h.api();
        let (_, _, run) = run_on(app, &rx, "ignore").await;
        let ingested = || async move {
            app.metrics()
                .await
                .get("syncrelay_events_ingested_total", &[])
                .unwrap_or(0.0)
        };
        let before = ingested().await;
        h.send(&[
            ev("s1", &run, "started", ""),
            ev("r1", &run, "record", "ticketing/tickets"),
            ev("r2", &run, "record", "ticketing/tickets"),
        ])
        .await;
        eventually(WAIT, "the run's three events ingested", || async move {
            (ingested().await >= before + 3.0).then_some(())
        })
        .await;
        // Counted when decoded; planned and queued behind `started` right after.
        tokio::time::sleep(Duration::from_millis(300)).await;
        open.send(true).unwrap();
        let r = wait_status(app, &run, "stopped").await;
        assert_eq!(r["stop_reason"], "started answered 400", "{r}");
        assert!(r["finished_at"].is_string(), "{r}");
        // Later events: dead-lettered as events of a finished run.
        if let Some(resp) = send(&h, &[ev("r3", &run, "record", "ticketing/tickets")]).await {
            assert_eq!(resp["events"][0]["reason"], "run_finished", "{resp}");
        }
        wait_dead_letters(app, "reason=run_finished&event_id=r3", 1).await;
        // r1 and r2 were dropped; give anything wrongly sent after them time to arrive.
        eventually(WAIT, "r1 and r2 dropped", || async move {
            let m = app.metrics().await;
            (m.get("syncrelay_run_events_dropped_total", &[("reason", "run_stopped")]) == Some(2.0)).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got: Vec<String> = rx
            .received()
            .iter()
            .map(|r| format!("{}:{}", r.json()["event"].as_str().unwrap(), r.status))
            .collect();
        assert_eq!(
            got,
            vec!["sync_job_run:created:200", "sync_job_run:started:400"],
            "started is not retried and nothing after it is delivered"
        );
        let r = run_status(app, &run).await;
        assert_eq!(r["resource_stats"]["ticketing/tickets"]["dropped"], 3, "{r}");
        // Executors are told to stop: through `GET /sync-job-run-commands` (embedded) or on the
        // commands topic keyed by run (Kafka; the run's creation is the message before it).
        let commands: Vec<Value> = match bus {
            Bus::Embedded => {
                let (_, cmds) = app.get("/sync-job-run-commands?limit=1000").await;
                cmds["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["command"].clone())
                    .collect()
            }
            Bus::Kafka => h
                .consume_commands(2, WAIT)
                .await
                .iter()
                .map(|m| {
                    assert_eq!(m.key.as_deref(), Some(run.as_bytes()), "keyed by run: {m:?}");
                    m.json()
                })
                .collect(),
        };
        let stop: Vec<&Value> = commands.iter().filter(|c| c["type"] == "stop").collect();
        assert_eq!(stop.len(), 1, "{commands:?}");
        assert_eq!(stop[0]["run_id"], run.as_str());
        // started itself is a dead letter with its own reason.
        let (_, dl) = app.get("/dead-letters?reason=run_stopped").await;
        assert_eq!(dl["results"][0]["event_id"], "s1", "{dl}");
        assert_eq!(dl["results"][0]["last_status"], 400, "{dl}");
        assert_eq!(
            app.metric("syncrelay_run_events_dropped_total", &[("reason", "run_stopped")])
                .await,
            2.0
        );
        assert_eq!(app.metric("syncrelay_runs_total", &[("status", "stopped")]).await, 1.0);
        if bus == Bus::Kafka {
            // Both dead letters (s1 answered 400, r3 of the finished run) are on the topic.
            let dlq = h.consume_dlq(2, WAIT).await;
            let mut got: Vec<(String, String)> = dlq
                .iter()
                .map(|m| {
                    (
                        m.json()["id"].as_str().unwrap_or("?").to_string(),
                        m.header("x-dlq-reason").unwrap_or("?").to_string(),
                    )
                })
                .collect();
            got.sort();
            assert_eq!(
                got,
                vec![
                    ("r3".to_string(), "run_finished".to_string()),
                    ("s1".to_string(), "run_stopped".to_string())
                ]
            );
        }
    }
);
