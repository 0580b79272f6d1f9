//! Many instances on one PostgreSQL (issue 11): registrations reach every instance, decisions
//! about one run are serialised in the store, a killed instance's claims are taken over once
//! their leases expire. Real relays (in-process, or the binary where it is killed), a real
//! PostgreSQL (tests/support/postgres.rs), real receivers.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const ACCOUNT: &str = "94801e49-a652-42f9-af14-dd203d7897da";
const WAIT: Duration = Duration::from_secs(30);

fn pg_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("SYNCRELAY__STORE__KIND", "postgres".to_string()),
        ("SYNCRELAY__STORE__URL", url.to_string()),
    ]
}

async fn two_apps(url: &str, extra: &[(&str, &str)]) -> (TestApp, TestApp) {
    let env = pg_env(url);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    (spawn_app(&all).await, spawn_app(&all).await)
}

/// What `POST /events` made of one event: (status, reason).
async fn post_one(app: &TestApp, e: Value) -> (String, String) {
    let (s, b) = app.post("/events", json!({"events": [e]})).await;
    assert_eq!(s, 202, "{b}");
    let r = &b["events"][0];
    (
        r["status"].as_str().unwrap_or_default().to_string(),
        r["reason"].as_str().unwrap_or_default().to_string(),
    )
}

/// Post a fresh event to `app` every 100 ms until `pred` holds for what became of it (or of
/// its delivery); answers how long that took.
async fn until_within(what: &str, limit: Duration, mut probe: impl AsyncFnMut(usize) -> bool) -> Duration {
    let t0 = Instant::now();
    let mut n = 0;
    loop {
        if probe(n).await {
            let took = t0.elapsed();
            assert!(took <= limit, "{what}: took {took:?}, more than {limit:?}");
            return took;
        }
        assert!(t0.elapsed() < limit + Duration::from_secs(5), "{what}: never happened");
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A webhook created, rotated, disabled and deleted on instance A is used as such by instance
/// B within about a second (B checks the store's webhook version every second); a rotated
/// secret signs B's deliveries within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_made_on_one_instance_are_used_by_another_within_a_second() {
    let rx = Receiver::start().await;
    let url = postgres::database();
    let (a, b) = two_apps(&url, &[]).await;

    // Created on A: B routes events to it.
    let (wid, old_secret) = a.webhook(&rx.url("/reg"), &[]).await;
    let took = until_within(
        "B routes to a webhook created on A",
        Duration::from_secs(2),
        async |n| post_one(&b, event(&format!("c{n}"), &wid, None, json!({}))).await.0 == "queued",
    )
    .await;
    eprintln!("created on A, used by B after {took:?}");

    // Rotated on A: B's deliveries verify with the new secret (during the grace period they
    // carry both signatures; before B reloads, only the old one).
    let (s, rotated) = a.post(&format!("/webhook/{wid}/rotate-secret"), json!({})).await;
    assert_eq!(s, 200, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    let new = standardwebhooks::Webhook::new(&new_secret).unwrap();
    let took = until_within(
        "B signs with a secret rotated on A",
        Duration::from_secs(2),
        async |n| {
            let id = format!("rot{n}");
            assert_eq!(post_one(&b, event(&id, &wid, None, json!({}))).await.0, "queued");
            let got = rx
                .wait_for(WAIT, &id, |g| g.iter().any(|r| r.header("webhook-id") == id))
                .await;
            let r = got.iter().find(|r| r.header("webhook-id") == id).unwrap();
            new.verify(&r.body, &r.header_map()).is_ok()
        },
    )
    .await;
    eprintln!("rotated on A, signing on B after {took:?}");
    // The old secret still verifies during the grace period (both signatures are sent).
    let last = rx.received().pop().unwrap();
    standardwebhooks::Webhook::new(&old_secret)
        .unwrap()
        .verify(&last.body, &last.header_map())
        .expect("the previous secret signs too during the grace period");

    // Disabled on A: B refuses it.
    let (s, w) = a
        .call(
            reqwest::Method::PATCH,
            &format!("/webhook/{wid}"),
            Some(json!({"is_active": false})),
        )
        .await;
    assert_eq!(s, 200, "{w}");
    until_within("B sees a webhook disabled on A", Duration::from_secs(2), async |n| {
        post_one(&b, event(&format!("d{n}"), &wid, None, json!({}))).await
            == ("dead_lettered".into(), "webhook_disabled".into())
    })
    .await;

    // Deleted on A: B no longer knows it.
    let (s, _) = a.call(reqwest::Method::DELETE, &format!("/webhook/{wid}"), None).await;
    assert_eq!(s, 204);
    until_within("B forgets a webhook deleted on A", Duration::from_secs(2), async |n| {
        post_one(&b, event(&format!("x{n}"), &wid, None, json!({}))).await
            == ("dead_lettered".into(), "unknown_webhook".into())
    })
    .await;
}

/// Two instances feed one run at once (its records and record errors posted to both, in
/// parallel): every ingest decision and every delivery outcome is counted exactly once, because
/// each decision about the run loads it `FOR UPDATE` in one transaction; `completed`, sent last,
/// carries the final counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_feeding_one_run_never_lose_or_double_count() {
    let rx = Receiver::start().await;
    let url = postgres::database();
    let (a, b) = two_apps(&url, &[]).await;
    let (wid, _) = a.webhook(&rx.url("/run"), &[]).await;
    let (s, job) = a
        .post(
            "/sync-job",
            json!({"integration_name": "jira", "resources": [{"resource": "ticketing/tickets", "method": "list"}]}),
        )
        .await;
    assert_eq!(s, 201, "{job}");
    let (s, run) = a
        .post(
            "/sync-job-run",
            json!({"sync_job_id": job["id"], "integrated_account_id": ACCOUNT, "webhook_id": wid, "error_handling": "ignore"}),
        )
        .await;
    assert_eq!(s, 201, "{run}");
    let run = run["id"].as_str().unwrap().to_string();
    let ev = |id: String, kind: &str| run_event(&run, id, kind);
    // B knows the webhook (and so the run's target) within a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (s, _) = a.post("/events", json!({"events": [ev("s".into(), "started")]})).await;
    assert_eq!(s, 202);

    // 2 × 10 batches of 10 records and 2 record errors, A's and B's in parallel.
    tokio::join!(feed(&a, &run, "a"), feed(&b, &run, "b"));
    // 1 created + 1 started + 240 run events.
    rx.wait_for(WAIT, "every record and record error", |g| g.len() >= 242)
        .await;
    let (s, _) = b
        .post("/events", json!({"events": [ev("c".into(), "completed")]}))
        .await;
    assert_eq!(s, 202);
    let got = rx
        .wait_for(WAIT, "completed", |g| g.iter().any(|r| r.header("webhook-id") == "c"))
        .await;
    let ids: Vec<String> = got.iter().map(|r| r.header("webhook-id").to_string()).collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), unique.len(), "nothing delivered twice");
    let completed = got.iter().find(|r| r.header("webhook-id") == "c").unwrap().json();
    let p = &completed["payload"];
    assert_eq!(p["records_delivered"], 200, "{p}");
    assert_eq!(p["records_dead_lettered"], 0, "{p}");
    assert_eq!(p["record_errors"], json!({"ticketing/tickets": 40}), "{p}");
    let (_, r) = a.get(&format!("/sync-job-run/{run}")).await;
    let stats = &r["resource_stats"]["ticketing/tickets"];
    assert_eq!(
        (stats["records"].as_i64(), stats["errors"].as_i64()),
        (Some(200), Some(40)),
        "{r}"
    );
    assert_eq!(r["status"], "completed", "{r}");
}

/// An event of `run`: `kind` is the action.
fn run_event(run: &str, id: String, kind: &str) -> Value {
    json!({"id": id, "event": format!("sync_job_run:{kind}"), "sync_job_run_id": run,
           "payload": {"resource": "ticketing/tickets"}})
}

/// 10 batches of 10 records and 2 record errors of `run`, posted to `app` one after another.
async fn feed(app: &TestApp, run: &str, tag: &str) {
    for i in 0..10 {
        let mut batch: Vec<Value> = (0..10)
            .map(|j| run_event(run, format!("{tag}r{i}_{j}"), "record"))
            .collect();
        batch.extend((0..2).map(|j| run_event(run, format!("{tag}e{i}_{j}"), "record_error")));
        let (s, b) = app.post("/events", json!({"events": batch})).await;
        assert_eq!(s, 202, "{b}");
        assert!(
            b["events"].as_array().unwrap().iter().all(|e| e["status"] == "queued"),
            "{b}"
        );
    }
}

/// kill -9 of an instance holding claimed (in flight) and parked (waiting to retry) deliveries
/// for a failing receiver: once the receiver recovers, the survivor delivers every one of them
/// after the dead instance's leases expire; nothing is lost, and each run's first successful
/// deliveries come in the run's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_claims_are_delivered_by_the_survivor_after_the_lease() {
    // Failing slowly: at the kill, requests are in flight (claimed) and others wait to retry.
    let rx = Receiver::with_script(Arc::new(|_, _| Reply::status(500).delayed(Duration::from_millis(300)))).await;
    let url = postgres::database();
    let extra = [
        ("SYNCRELAY__STORE__KIND", "postgres"),
        ("SYNCRELAY__STORE__URL", url.as_str()),
        ("SYNCRELAY__STORE__LEASE_MS", "2000"),
        ("SYNCRELAY__DELIVERY__RETRY__MAX_ATTEMPTS", "1000"),
        ("SYNCRELAY__DELIVERY__RETRY__MAX_ELAPSED_MS", "600000"),
        ("SYNCRELAY__DELIVERY__RETRY__MAX_INTERVAL_MS", "400"),
    ];
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let mut a = RelayProcess::start(dir_a.path(), free_port(), &extra).await;
    let mut b = RelayProcess::start(dir_b.path(), free_port(), &extra).await;
    let (wid, _) = a.webhook(&rx.url("/kill"), &[]).await;
    let runs: Vec<String> = (1..=10).map(run_id).collect();
    let events: Vec<Value> = (0..10)
        .flat_map(|i| {
            let wid = wid.clone();
            runs.iter()
                .enumerate()
                .map(move |(r, run)| event(&format!("k{r}_{i}"), &wid, Some(run), json!({})))
        })
        .collect();
    a.send_events(events).await;
    // Every run's head attempted at least once by A, and some a second time (parked, retried).
    rx.wait_for(WAIT, "A attempting", |g| g.len() >= 25).await;
    let (pending, lease_left): (i64, Option<i64>) = {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let n = sqlx::query_as(
            "SELECT COUNT(*), MIN(lease_until) - $1 FROM deliveries WHERE state = 'ready' AND lease_until > $1",
        )
        .bind(now)
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        n
    };
    a.kill9();
    assert!(pending > 0, "A held leases when it was killed");
    let killed_at = Instant::now();
    rx.set_script(Arc::new(|_, _| Reply::status(200)));

    // The survivor delivers all 100.
    let all: HashSet<String> = (0..10)
        .flat_map(|i| (0..10).map(move |r| format!("k{r}_{i}")))
        .collect();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let got = rx
        .wait_for(Duration::from_secs(60), "all 100 delivered", |g| {
            let ok: HashSet<&str> = g
                .iter()
                .filter(|r| r.status == 200)
                .map(|r| r.header("webhook-id"))
                .collect();
            all.iter().all(|id| ok.contains(id.as_str()))
        })
        .await;
    eprintln!(
        "all delivered {:?} after the kill ({pending} rows leased to A, the first lease ending {lease_left:?} ms after)",
        killed_at.elapsed()
    );
    // First successful delivery of each event, per run, in order.
    let mut firsts: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for r in got.iter().filter(|r| r.status == 200) {
        let id = r.header("webhook-id").to_string();
        if !seen.insert(id.clone()) {
            continue;
        }
        let (run, i) = id[1..].split_once('_').unwrap();
        firsts.entry(run.parse().unwrap()).or_default().push(i.parse().unwrap());
    }
    for (run, order) in &firsts {
        assert_eq!(order, &(0..10).collect::<Vec<_>>(), "run {run}");
    }
    // Nothing left queued or dead.
    let left: i64 = eventually(WAIT, "queue drained", || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM deliveries WHERE state <> 'delivered'")
                .fetch_one(&pool)
                .await
                .unwrap();
            (n == 0).then_some(n)
        }
    })
    .await;
    assert_eq!(left, 0);
    let dead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dead_letters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    b.sigterm();
}

/// What a delivery costs PostgreSQL, measured with `pg_stat_statements` (the test server loads
/// it): one relay, embedded bus, 2,000 events over 100 runs, every one answered 2xx at once.
/// Statements (including BEGIN / COMMIT) and commits per delivery are printed for
/// docs/OPERATIONS.md and bounded here, so a change that adds a statement per attempt fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_per_delivery_on_postgres() {
    let rx = Receiver::start().await;
    let url = postgres::database();
    let (app, _) = (
        spawn_app(&[
            ("SYNCRELAY__STORE__KIND", "postgres"),
            ("SYNCRELAY__STORE__URL", url.as_str()),
        ])
        .await,
        (),
    );
    let (wid, _) = app.webhook(&rx.url("/cost"), &[]).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&pool)
        .await
        .unwrap();
    let commits = || async {
        sqlx::query_scalar::<_, i64>("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // Let the start-up settle, then count from zero.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_stat_reset()").execute(&pool).await.unwrap();
    let c0 = commits().await;
    let n = 2000;
    let events: Vec<Value> = (0..n)
        .map(|i| event(&format!("m{i}"), &wid, Some(&run_id(i % 100)), json!({"i": i})))
        .collect();
    let t0 = Instant::now();
    for chunk in events.chunks(100) {
        app.send_events(chunk.to_vec()).await;
    }
    rx.wait_for(Duration::from_secs(90), "all delivered", |g| g.len() >= n)
        .await;
    let took = t0.elapsed();
    // The last outcomes are committed within a writer round.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT s.query, s.calls FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = current_database() AND s.query NOT ILIKE '%pg_stat%' ORDER BY s.calls DESC",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let total: i64 = rows.iter().map(|(_, c)| c).sum();
    let commits = commits().await - c0;
    for (q, c) in rows.iter().take(12) {
        eprintln!("{c:>7}  {}", q.chars().take(110).collect::<String>().replace('\n', " "));
    }
    let per = total as f64 / n as f64;
    eprintln!(
        "{n} deliveries in {took:?}: {total} statements ({per:.2} per delivery, BEGIN/COMMIT included), \
         {commits} commits ({:.2} per delivery)",
        commits as f64 / n as f64
    );
    assert!(per < 6.0, "{per:.2} statements per delivery");
}

/// Two instances, Kafka + PostgreSQL, one consumer group (tansu): a webhook created on A is used
/// by B (whose partitions carry events naming it); 5,000 events over 50 runs are delivered in
/// each run's order; the delivery log and the dead letters read the same from either instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_and_postgres_two_instances_one_group() {
    use support::broker::Broker;
    // A record whose payload says so is refused for good (400): dead-lettered at once.
    let rx = Receiver::with_script(Arc::new(|r: &Received, _| {
        if r.json()["payload"]["refuse"] == true {
            Reply::status(400)
        } else {
            Reply::status(200)
        }
    }))
    .await;
    let broker = Broker::start();
    broker.create_topic("sc1", 4);
    let url = postgres::database();
    let mut env = broker.relay_env("gsc1", "sc1");
    env.push(("SYNCRELAY__STORE__KIND".into(), "postgres".into()));
    env.push(("SYNCRELAY__STORE__URL".into(), url.clone()));
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = RelayProcess::start_with(da.path(), free_port(), &[], env.clone()).await;
    let mut b = RelayProcess::start_with(db.path(), free_port(), &[], env).await;
    let (wid, _) = a.webhook(&rx.url("/kp"), &[]).await;
    let until = Instant::now() + Duration::from_secs(40);
    loop {
        let la = a.metric("syncrelay_kafka_assigned_partitions", &[]).await as i64;
        let lb = b.metric("syncrelay_kafka_assigned_partitions", &[]).await as i64;
        if la > 0 && lb > 0 && la + lb == 4 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the instances did not share the partitions (A {la}, B {lb})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut msgs = Vec::new();
    for i in 0..100 {
        for run in 0..50 {
            let refuse = i == 50 && run % 10 == 0;
            let v = json!({"id": format!("k{run}-{i}"), "event": "sync_job_run:record", "sync_job_run_id": run_id(run),
                           "webhook_id": wid, "payload": {"run": run, "i": i, "refuse": refuse}});
            msgs.push((Some(run_id(run)), v.to_string().into_bytes()));
        }
    }
    broker.produce("sc1", &msgs).await;
    let got = rx
        .wait_for(Duration::from_secs(120), "all 5,000 events", |g| {
            g.iter().map(|r| r.header("webhook-id")).collect::<HashSet<_>>().len() >= 5000
        })
        .await;
    let delivered = [("kind", "webhook"), ("outcome", "delivered")];
    let (na, nb) = (
        a.metric("syncrelay_deliveries_total", &delivered).await,
        b.metric("syncrelay_deliveries_total", &delivered).await,
    );
    assert!(
        na > 0.0 && nb > 0.0,
        "both instances delivered (A {na}, B {nb}): B used A's webhook"
    );
    // Per run, first answers in order.
    let mut firsts: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for r in &got {
        if seen.insert(r.header("webhook-id").to_string()) {
            let p = r.json()["payload"].clone();
            firsts
                .entry(p["run"].as_i64().unwrap())
                .or_default()
                .push(p["i"].as_i64().unwrap());
        }
    }
    assert_eq!(firsts.len(), 50);
    for (run, order) in &firsts {
        if order != &(0..100).collect::<Vec<_>>() {
            panic!(
                "run {run} out of order: {order:?}\nA: {}\nB: {}",
                what_happened(&a).await,
                what_happened(&b).await
            );
        }
    }
    // The delivery log and the dead letters, the same from both.
    let dead_a = eventually(WAIT, "5 dead letters", || {
        let (a, path) = (&a, format!("/dead-letters?webhook_id={wid}&limit=100"));
        async move { Some(all_pages(a, path).await).filter(|d: &Vec<String>| d.len() >= 5) }
    })
    .await;
    assert_eq!(dead_a.len(), 5, "{dead_a:?}");
    assert_eq!(
        dead_a,
        all_pages(&b, format!("/dead-letters?webhook_id={wid}&limit=100")).await
    );
    // Give the batched log rows a moment, then compare the logs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log_a = all_pages(&a, format!("/deliveries?webhook_id={wid}&limit=500")).await;
    let log_b = all_pages(&b, format!("/deliveries?webhook_id={wid}&limit=500")).await;
    assert_eq!(log_a.len(), 5000, "the delivery log holds every delivery");
    assert_eq!(log_a, log_b, "the same log from either instance");
    a.sigterm();
    b.sigterm();
}

/// What an instance saw that bears on order: rebalances, parked deliveries, retries, lost
/// leases, and its log's warnings and partition movements (for a failing test's message).
async fn what_happened(p: &RelayProcess) -> String {
    let mut out = String::new();
    for (name, labels) in [
        ("syncrelay_kafka_rebalances_total", vec![("event", "assign")]),
        ("syncrelay_kafka_rebalances_total", vec![("event", "revoke")]),
        ("syncrelay_deliveries_parked_total", vec![]),
        ("syncrelay_delivery_retries_total", vec![("kind", "webhook")]),
        ("syncrelay_leases_lost_total", vec![]),
    ] {
        out += &format!("{name}{labels:?} = {}; ", p.metric(name, &labels).await);
    }
    let logs = p.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| ["revoked", "assigned", "WARN", "ERROR"].iter().any(|k| l.contains(k)))
        .collect();
    out + "\n" + &lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Every row of a paged list (`event_id:status` of deliveries, `event_id:reason` of dead letters).
async fn all_pages(app: &RelayProcess, path: String) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.clone(),
        };
        let (s, page) = app.get(&q).await;
        assert_eq!(s, 200, "{page}");
        for r in page["results"].as_array().unwrap() {
            let what = r["status"].as_str().or(r["reason"].as_str()).unwrap_or_default();
            ids.push(format!("{}:{what}", r["event_id"].as_str().unwrap_or_default()));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return ids,
        }
    }
}
