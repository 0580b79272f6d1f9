//! The real binary: crash durability (SIGKILL), graceful shutdown (SIGTERM), configuration
//! errors, and secrets kept out of logs.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_accepted_is_lost_when_the_process_is_killed() {
    // Every third event fails its first attempt, so some are in retry when the kill lands.
    let rx = Receiver::with_script(Arc::new(|r, seen| {
        let id = r.header("webhook-id");
        let n: u32 = id.trim_start_matches("k").parse().unwrap_or(0);
        if seen == 0 && n.is_multiple_of(3) {
            Reply::status(500)
        } else {
            Reply::status(200).delayed(Duration::from_millis(2))
        }
    }))
    .await;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let extra = [
        ("SYNCRELAY__DELIVERY__MAX_IN_FLIGHT", "8"),
        ("SYNCRELAY__DELIVERY__RETRY__INITIAL_INTERVAL_MS", "300"),
    ];
    let mut relay = RelayProcess::start(data.path(), port, &extra).await;
    let (wid, _) = relay.webhook(&rx.url("/k"), &[]).await;
    let events: Vec<_> = (0..1000)
        .map(|i| event(&format!("k{i}"), &wid, Some(&run_id(i % 25)), json!({"i": i})))
        .collect();
    relay.send_events(events).await;
    rx.wait_for(Duration::from_secs(30), "some deliveries", |g| g.len() >= 150)
        .await;
    relay.kill9();
    let distinct_before: HashSet<String> = rx
        .received()
        .iter()
        .map(|r| r.header("webhook-id").to_string())
        .collect();
    assert!(
        distinct_before.len() < 1000,
        "the kill should land while events are still queued"
    );

    let relay = RelayProcess::start(data.path(), port, &extra).await;
    let got = rx
        .wait_for(Duration::from_secs(90), "all 1000 events answered 2xx", |g| {
            g.iter()
                .filter(|r| r.status == 200)
                .map(|r| r.header("webhook-id"))
                .collect::<HashSet<_>>()
                .len()
                >= 1000
        })
        .await;
    let ok: Vec<&str> = got
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.header("webhook-id"))
        .collect();
    let distinct: HashSet<&str> = ok.iter().copied().collect();
    assert_eq!(distinct.len(), 1000);
    let duplicates = ok.len() - distinct.len();
    println!(
        "kill -9 with {} of 1000 events seen before the kill: {} successful deliveries, {duplicates} duplicates",
        distinct_before.len(),
        ok.len(),
    );
    // Duplicates come only from attempts that were in flight (or answered but not yet recorded)
    // when the process died: at most the in-flight cap, per kill.
    assert!(
        duplicates <= 8,
        "{duplicates} duplicates exceed the in-flight bound of 8"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_attempts_and_exits_cleanly() {
    let rx = Receiver::with_script(Arc::new(|_, _| Reply::status(200).delayed(Duration::from_millis(700)))).await;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut relay = RelayProcess::start(data.path(), port, &[("SYNCRELAY__SHUTDOWN__DEADLINE_MS", "5000")]).await;
    let (wid, _) = relay.webhook(&rx.url("/slow"), &[]).await;
    relay
        .send_events((0..4).map(|i| event(&format!("s{i}"), &wid, None, json!({}))).collect())
        .await;
    rx.wait_for(Duration::from_secs(10), "4 in flight", |g| g.len() >= 4)
        .await;
    let t = Instant::now();
    relay.sigterm();
    let status = loop {
        if let Some(s) = relay.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status:?}: {}", relay.logs());
    // The in-flight attempts were answered and recorded: after a restart nothing is redelivered.
    let relay = RelayProcess::start(data.path(), port, &[]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rx.received().len(), 4, "drained deliveries are not repeated");
    let (_, list) = relay.get("/deliveries?status=delivered").await;
    assert_eq!(list["results"].as_array().unwrap().len(), 4);
}

#[test]
fn unknown_or_bad_configuration_stops_the_start_naming_the_key() {
    let data = tempfile::tempdir().unwrap();
    for (var, val, key) in [
        ("SYNCRELAY__DELIVERY__MAX_INFLIGHT", "3", "delivery.max_inflight"),
        (
            "SYNCRELAY__DELIVERY__RETRY__MULTIPLIER",
            "fast",
            "delivery.retry.multiplier",
        ),
        ("SYNCRELAY__HTTP__LISTEN", "nowhere", "http.listen"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_syncrelay"))
            .env("SYNCRELAY__STORE__PATH", data.path().join("x.db"))
            .env(var, val)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "stderr should name {key}: {err}");
    }
    let cfg = data.path().join("bad.toml");
    std::fs::write(&cfg, "[delivery]\nmax_in_flight = 4\nbogus = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("delivery.bogus"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_or_responses_other_than_create_and_rotate() {
    let rx = Receiver::with_script(Arc::new(|_, seen| Reply::status(if seen == 0 { 500 } else { 200 }))).await;
    let data = tempfile::tempdir().unwrap();
    let callback_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let relay = RelayProcess::start(
        data.path(),
        free_port(),
        &[
            ("SYNCRELAY__LOG__LEVEL", "trace"),
            ("SYNCRELAY__CALLBACKS__SECRET", callback_secret),
        ],
    )
    .await;
    let (wid, secret) = relay.webhook(&rx.url("/s"), &[]).await;
    let (_, rotated) = relay.post(&format!("/webhook/{wid}/rotate-secret"), json!({})).await;
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    let mut e = event("sec1", &wid, Some(&run_id(1)), json!({}));
    e["callback_url"] = json!(rx.url("/cb"));
    relay.send_events(vec![e]).await;
    // Webhook: 500 then 200; the callback (same webhook-id) gets 200.
    rx.wait_for(Duration::from_secs(10), "deliveries", |g| g.len() >= 3)
        .await;
    let _ = relay.post(&format!("/webhook/{wid}/test"), json!({})).await;
    let mut responses = String::new();
    for p in [
        "/webhook",
        &format!("/webhook/{wid}"),
        "/deliveries",
        "/dead-letters",
        "/metrics",
    ] {
        let r = relay.req(reqwest::Method::GET, p).send().await.unwrap();
        responses.push_str(&r.text().await.unwrap());
    }
    let (_, list) = relay.get("/deliveries").await;
    for d in list["results"].as_array().unwrap() {
        let (_, one) = relay.get(&format!("/deliveries/{}", d["id"].as_str().unwrap())).await;
        responses.push_str(&one.to_string());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = relay.logs();
    assert!(logs.len() > 200, "trace logging produced output");
    for s in [&secret, &new_secret, &callback_secret.to_string(), &TOKEN.to_string()] {
        let key = &s[s.len().saturating_sub(20)..];
        assert!(!logs.contains(key), "a secret appears in the logs");
        assert!(!responses.contains(key), "a secret appears in a response");
    }
}

/// A run's counts are committed in the transaction that records the outcomes they count, so
/// wherever a kill -9 falls the run's `completed` carries exactly one count per record: none is
/// lost (counted after the outcome, in a commit the kill prevented) and a record delivered
/// again after the restart (answered before the kill, not yet recorded) is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_counts_are_exact_across_a_kill() {
    const RUNS: usize = 20;
    const RECORDS: usize = 50;
    let rx = Receiver::with_script(Arc::new(|_, _| Reply::status(200).delayed(Duration::from_millis(2)))).await;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let extra = [("SYNCRELAY__DELIVERY__MAX_IN_FLIGHT", "8")];
    let mut relay = RelayProcess::start(data.path(), port, &extra).await;
    let (wid, _) = relay.webhook(&rx.url("/run"), &[]).await;
    let runs = relay.runs(&wid, RUNS).await;
    let ev = |run: &str, id: String, kind: &str| {
        json!({"id": id, "event": format!("sync_job_run:{kind}"), "sync_job_run_id": run,
               "payload": {"resource": "ticketing/tickets"}})
    };
    let mut events: Vec<Value> = runs.iter().map(|r| ev(r, format!("s-{r}"), "started")).collect();
    for i in 0..RECORDS {
        events.extend(runs.iter().map(|r| ev(r, format!("r{i}-{r}"), "record")));
    }
    relay.send_events(events).await;
    let records = |g: &[Received]| {
        g.iter()
            .map(|r| r.header("webhook-id"))
            .filter(|id| id.starts_with('r'))
            .collect::<HashSet<_>>()
            .len()
    };
    // Killed four times, at a fifth, two, three and four fifths of the records.
    for fifth in 1..=4 {
        rx.wait_for(Duration::from_secs(60), "the next fifth of the records", |g| {
            records(g) >= RUNS * RECORDS * fifth / 5
        })
        .await;
        relay.kill9();
        relay = RelayProcess::start(data.path(), port, &extra).await;
    }
    rx.wait_for(Duration::from_secs(60), "every record", |g| {
        records(g) >= RUNS * RECORDS
    })
    .await;
    relay
        .send_events(runs.iter().map(|r| ev(r, format!("c-{r}"), "completed")).collect())
        .await;
    let got = rx
        .wait_for(Duration::from_secs(30), "every run's completed", |g| {
            g.iter().filter(|r| r.header("webhook-id").starts_with("c-")).count() >= RUNS
        })
        .await;
    for r in got.iter().filter(|r| r.header("webhook-id").starts_with("c-")) {
        let p = r.json()["payload"].clone();
        assert_eq!(p["records_delivered"], RECORDS, "{}: {p}", r.header("webhook-id"));
        assert_eq!(p["records_dead_lettered"], 0, "{p}");
    }
    for run in &runs {
        let (_, r) = relay.get(&format!("/sync-job-run/{run}")).await;
        assert_eq!(
            r["resource_stats"]["ticketing/tickets"]["records_delivered"], RECORDS,
            "{r}"
        );
    }
}
