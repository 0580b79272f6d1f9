//! Kafka mode keeps every promise the embedded mode keeps, because both buses hand their
//! deliveries to one delivery core: the delivery log, the dead-letter topic for exhausted
//! deliveries, replay of exactly the failed (event, target) pair, one order for a run's events
//! whichever way they came in, and one in-flight cap. Against a real Kafka-protocol broker
//! (tansu) and real HTTP receivers.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::broker::Broker;
use support::*;

/// The broker tests share two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ACCOUNT: &str = "94801e49-a652-42f9-af14-dd203d7897da";

fn message(v: Value) -> (Option<String>, Vec<u8>) {
    let key = v["sync_job_run_id"].as_str().map(str::to_string);
    (key, v.to_string().into_bytes())
}

/// A relay in Kafka mode on a fresh topic set, with every partition assigned to it.
async fn kafka_relay(broker: &Broker, topic: &str, extra: &[(&str, &str)]) -> TestApp {
    broker.create_topic(topic, 2);
    broker.create_topic(&format!("{topic}.dlq"), 1);
    broker.create_topic(&format!("{topic}.commands"), 1);
    let app = spawn_app_with(extra, broker.relay_env(&format!("g-{topic}"), topic)).await;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if app.metric("syncrelay_kafka_assigned_partitions", &[]).await as i64 == 2 {
            return app;
        }
        assert!(Instant::now() < until, "the relay never got its partitions");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET /deliveries?event_id=…` once it lists `n` deliveries in a final state.
async fn deliveries_of(app: &TestApp, event_id: &str, n: usize) -> Vec<Value> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, b) = app.get(&format!("/deliveries?event_id={event_id}")).await;
        assert_eq!(s, 200, "{b}");
        let rows: Vec<Value> = b["results"].as_array().unwrap().clone();
        let finished = rows
            .iter()
            .filter(|r| matches!(r["status"].as_str(), Some("delivered" | "dead")))
            .count();
        if finished >= n {
            return rows;
        }
        assert!(Instant::now() < until, "{event_id}: deliveries {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_try_kafka_success_is_in_the_delivery_log_with_its_attempt() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let rx = Receiver::start().await;
    let mut app = kafka_relay(&broker, "log1", &[]).await;
    let (wid, _) = app.webhook(&rx.url("/ok"), &[]).await;
    broker
        .produce(
            "log1",
            &[message(event("k-log-1", &wid, Some(&run_id(1)), json!({"n": 1})))],
        )
        .await;
    rx.wait_for(Duration::from_secs(20), "the delivery", |g| g.len() == 1)
        .await;
    let rows = deliveries_of(&app, "k-log-1", 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["status"], "delivered");
    assert_eq!(rows[0]["attempts_made"], 1);
    assert_eq!(rows[0]["sync_job_run_id"], run_id(1));
    let (s, one) = app
        .get(&format!("/deliveries/{}", rows[0]["id"].as_str().unwrap()))
        .await;
    assert_eq!(s, 200, "{one}");
    let attempts = one["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{one}");
    assert_eq!(attempts[0]["status"], 200);
    assert_eq!(attempts[0]["response_excerpt"], "receiver says hi");
    assert_eq!(one["body"]["id"], "k-log-1", "the log shows what was signed");
    // Close the consumer while the broker is still up (librdkafka waits for it when closing).
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_delivery_that_runs_out_of_attempts_reaches_the_dead_letter_topic() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let rx = Receiver::with_script(Arc::new(|_, _| Reply::status(500))).await;
    let mut app = kafka_relay(
        &broker,
        "dlq1",
        &[
            ("SYNCRELAY__BUS__KAFKA__INLINE_ATTEMPTS", "2"),
            ("SYNCRELAY__DELIVERY__RETRY__MAX_ATTEMPTS", "4"),
        ],
    )
    .await;
    let (wid, _) = app.webhook(&rx.url("/down"), &[]).await;
    broker
        .produce(
            "dlq1",
            &[message(event("k-dlq-1", &wid, Some(&run_id(2)), json!({"n": 1})))],
        )
        .await;
    let dlq = broker.read_all("dlq1.dlq", 1, Duration::from_secs(30));
    assert_eq!(dlq.len(), 1, "one dead letter on the topic");
    let h = |k: &str| dlq[0].header(k).unwrap_or("");
    assert_eq!(h("x-dlq-reason"), "attempts_exhausted");
    assert_eq!(h("x-dlq-attempts"), "4", "two in memory, two from the store");
    assert_eq!(h("x-dlq-last-status"), "500");
    assert_eq!(h("x-dlq-source-topic"), "dlq1");
    assert!(!h("x-dlq-source-offset").is_empty());
    let body: Value = dlq[0].json();
    assert_eq!(body["id"], "k-dlq-1");
    assert_eq!(rx.received().len(), 4, "four attempts reached the receiver");
    // The same dead letter is stored, and the log shows every attempt.
    let rows = deliveries_of(&app, "k-dlq-1", 1).await;
    let dead: Vec<&Value> = rows.iter().filter(|r| r["status"] == "dead").collect();
    assert_eq!(dead.len(), 1, "{rows:?}");
    let (_, one) = app
        .get(&format!("/deliveries/{}", dead[0]["id"].as_str().unwrap()))
        .await;
    let statuses: Vec<i64> = one["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, vec![500, 500, 500, 500], "{one}");
    let (_, dls) = app.get("/dead-letters?event_id=k-dlq-1").await;
    assert_eq!(dls["results"].as_array().unwrap().len(), 1, "{dls}");
    // Close the consumer while the broker is still up (librdkafka waits for it when closing).
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_dead_letter_made_in_memory_reaches_only_the_target_that_failed() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    // The webhook refuses the body as too large; the callback URL takes it.
    let rx = Receiver::with_script(Arc::new(|r: &Received, _| {
        Reply::status(if r.path == "/big" { 413 } else { 200 })
    }))
    .await;
    let mut app = kafka_relay(&broker, "rep1", &[]).await;
    let (wid, _) = app.webhook(&rx.url("/big"), &[]).await;
    let mut e = event("k-rep-1", &wid, Some(&run_id(3)), json!({"n": 1}));
    e["callback_url"] = json!(rx.url("/cb"));
    broker.produce("rep1", &[message(e)]).await;
    rx.wait_for(Duration::from_secs(20), "both targets", |g| g.len() == 2)
        .await;
    let until = Instant::now() + Duration::from_secs(10);
    let dl_id = loop {
        let (_, dls) = app.get("/dead-letters?event_id=k-rep-1").await;
        if let Some(d) = dls["results"].as_array().unwrap().first() {
            assert_eq!(d["reason"], "payload_too_large", "{d}");
            assert!(d["delivery_id"].is_string(), "it names its delivery: {d}");
            break d["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < until, "no dead letter");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    rx.set_script(Arc::new(|_, _| Reply::status(200)));
    let (s, b) = app.post("/dead-letters/replay", json!({"ids": [dl_id]})).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["requeued"], 1, "{b}");
    rx.wait_for(Duration::from_secs(20), "the replay", |g| {
        g.iter().filter(|r| r.path == "/big").count() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rx.on("/cb").len(),
        1,
        "the callback URL answered 2xx already: not sent again"
    );
    let big = rx.on("/big");
    assert_eq!(big[1].status, 200);
    assert_eq!(big[1].header("webhook-id"), "k-rep-1", "same webhook-id");
    // Close the consumer while the broker is still up (librdkafka waits for it when closing).
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_created_through_the_api_is_delivered_before_its_events_from_kafka() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    // `created` is refused twice (503, retry after 1 s); everything else is taken.
    let rx = Receiver::with_script(Arc::new(|r: &Received, seen| {
        let created = r.json()["event"] == "sync_job_run:created";
        if created && seen < 2 {
            Reply::status(503).header("retry-after", "1")
        } else {
            Reply::status(200)
        }
    }))
    .await;
    let mut app = kafka_relay(&broker, "ord1", &[]).await;
    let (wid, _) = app.webhook(&rx.url("/hook"), &[]).await;
    let (s, job) = app
        .post(
            "/sync-job",
            json!({"integration_name": "jira", "resources": [{"resource": "ticketing/tickets", "method": "list"}]}),
        )
        .await;
    assert_eq!(s, 201, "{job}");
    let (s, run) = app
        .post(
            "/sync-job-run",
            json!({"sync_job_id": job["id"], "integrated_account_id": ACCOUNT, "webhook_id": wid}),
        )
        .await;
    assert_eq!(s, 201, "{run}");
    let run = run["id"].as_str().unwrap().to_string();
    // The executor starts at once and streams the run's events through Kafka.
    let mut msgs = vec![message(
        json!({"id": "st", "event": "sync_job_run:started", "sync_job_run_id": run, "payload": {}}),
    )];
    for i in 0..3 {
        msgs.push(message(
            json!({"id": format!("r{i}"), "event": "sync_job_run:record", "sync_job_run_id": run,
                                 "payload": {"resource": "ticketing/tickets", "i": i}}),
        ));
    }
    broker.produce("ord1", &msgs).await;
    rx.wait_for(Duration::from_secs(30), "five deliveries answered 2xx", |g| {
        g.iter().filter(|r| r.status == 200).count() >= 5
    })
    .await;
    let order: Vec<String> = rx
        .received()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| {
            r.json()["event"]
                .as_str()
                .unwrap()
                .trim_start_matches("sync_job_run:")
                .to_string()
        })
        .collect();
    assert_eq!(order, vec!["created", "started", "record", "record", "record"]);
    let refused = rx.received().iter().filter(|r| r.status == 503).count();
    assert_eq!(refused, 2, "created was refused twice first");
    // Close the consumer while the broker is still up (librdkafka waits for it when closing).
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_target_never_has_more_than_its_cap_in_flight_in_kafka_mode() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let hold = Duration::from_millis(100);
    let rx = Receiver::with_script(Arc::new(move |_, _| Reply::status(200).delayed(hold))).await;
    let mut app = kafka_relay(
        &broker,
        "cap1",
        &[("SYNCRELAY__DELIVERY__MAX_IN_FLIGHT_PER_WEBHOOK", "4")],
    )
    .await;
    let (wid, _) = app.webhook(&rx.url("/slow"), &[]).await;
    let mut msgs = Vec::new();
    for i in 0..4 {
        for run in 0..40 {
            msgs.push(message(event(
                &format!("cap-{run}-{i}"),
                &wid,
                Some(&run_id(run)),
                json!({"i": i}),
            )));
        }
    }
    broker.produce("cap1", &msgs).await;
    rx.wait_for(Duration::from_secs(60), "all 160", |g| g.len() >= 160)
        .await;
    // Each request is in flight at least from its arrival until the receiver answers.
    let got = rx.received();
    let mut edges: Vec<(Instant, i32)> = got.iter().flat_map(|r| [(r.at, 1), (r.at + hold, -1)]).collect();
    edges.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    println!("most requests in flight to one webhook: {most}");
    assert!(most <= 4, "{most} in flight exceeds the cap of 4");
    assert!(most >= 3, "runs proceed in parallel up to the cap (saw {most})");
    // The gauge counts requests in progress, the same in both modes: back to 0 when done.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let n = app.metric("syncrelay_deliveries_in_flight", &[]).await;
        if n == 0.0 {
            break;
        }
        assert!(Instant::now() < until, "{n} still counted in flight");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Close the consumer while the broker is still up (librdkafka waits for it when closing).
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_log_keeps_what_delivery_log_says() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    // /flaky answers 500 once per event, then 200; /ok answers 200; /big 413.
    let rx = Receiver::with_script(Arc::new(|r: &Received, seen| match r.path.as_str() {
        "/flaky" if seen == 0 => Reply::status(500),
        "/big" => Reply::status(413),
        _ => Reply::status(200),
    }))
    .await;
    let mut app = kafka_relay(&broker, "logf", &[("SYNCRELAY__DELIVERY__LOG", "failures")]).await;
    let (ok, _) = app.webhook(&rx.url("/ok"), &[]).await;
    let (flaky, _) = app.webhook(&rx.url("/flaky"), &[]).await;
    let (big, _) = app.webhook(&rx.url("/big"), &[]).await;
    broker
        .produce(
            "logf",
            &[
                message(event("lf-ok", &ok, Some(&run_id(1)), json!({}))),
                message(event("lf-flaky", &flaky, Some(&run_id(2)), json!({}))),
                message(event("lf-big", &big, Some(&run_id(3)), json!({}))),
            ],
        )
        .await;
    rx.wait_for(Duration::from_secs(20), "four answers", |g| g.len() >= 4)
        .await;
    // A failure is always kept (replay needs it); a retried delivery is kept under `failures`.
    assert_eq!(deliveries_of(&app, "lf-big", 1).await[0]["status"], "dead");
    let flaky_rows = deliveries_of(&app, "lf-flaky", 1).await;
    assert_eq!(flaky_rows[0]["attempts_made"], 2, "{flaky_rows:?}");
    // A first-try success is not: the log is written only for what failed at least once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, b) = app.get("/deliveries?event_id=lf-ok").await;
    assert_eq!(b["results"].as_array().unwrap().len(), 0, "{b}");
    // Close the consumer while the broker is still up (librdkafka waits for it when closing).
    app.stop().await;
}
