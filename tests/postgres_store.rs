//! The relay end to end on `store.kind = "postgres"`: in-process, against a real PostgreSQL the
//! test starts itself (tests/support/postgres.rs), a real receiver over HTTP.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::postgres::PgServer;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// The relay on a fresh PostgreSQL database; its URL (to look at the tables).
async fn spawn_on_postgres(extra: &[(&str, &str)]) -> (TestApp, String) {
    let url = postgres::database();
    let mut env: Vec<(&str, &str)> = vec![("SYNCRELAY__STORE__KIND", "postgres"), ("SYNCRELAY__STORE__URL", &url)];
    env.extend_from_slice(extra);
    (spawn_app(&env).await, url)
}

async fn count(url: &str, sql: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_delivers_each_run_in_order_signed_and_retries_with_the_same_id() {
    // The 4th event of run 1 is refused once (500), then accepted.
    let rx = Receiver::with_script(Arc::new(|r: &Received, n| {
        if r.header("webhook-id") == "r1_3" && n == 0 {
            Reply::status(500)
        } else {
            Reply::status(200)
        }
    }))
    .await;
    let (app, url) = spawn_on_postgres(&[]).await;
    let (wid, secret) = app.webhook(&rx.url("/pg"), &[]).await;
    let runs = [run_id(1), run_id(2)];
    let mut events = Vec::new();
    for i in 0..10 {
        for (r, run) in runs.iter().enumerate() {
            events.push(event(&format!("r{}_{i}", r + 1), &wid, Some(run), json!({"i": i})));
        }
    }
    app.send_events(events).await;
    let got = rx.wait_for(WAIT, "21 requests", |g| g.len() >= 21).await;
    assert_eq!(got.len(), 21, "20 events, one retried");

    // Every request verifies with the webhook's secret.
    let verifier = standardwebhooks::Webhook::new(&secret).unwrap();
    for r in &got {
        verifier.verify(&r.body, &r.header_map()).expect("signature verifies");
    }
    // Per run: in order, the refused one again (same webhook-id) before anything behind it.
    for (r, _) in runs.iter().enumerate() {
        let prefix = format!("r{}_", r + 1);
        let seen: Vec<String> = got
            .iter()
            .map(|g| g.header("webhook-id").to_string())
            .filter(|id| id.starts_with(&prefix))
            .collect();
        let mut want: Vec<String> = (0..10).map(|i| format!("{prefix}{i}")).collect();
        if r == 0 {
            want.insert(4, "r1_3".into());
        }
        assert_eq!(seen, want, "run {}", r + 1);
    }

    // The delivery log, read back from PostgreSQL through the API.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let row = loop {
        let (s, list) = app.get("/deliveries?event_id=r1_3").await;
        assert_eq!(s, 200, "{list}");
        let row = list["results"][0].clone();
        if row["status"] != "pending" || std::time::Instant::now() > until {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (row["status"].as_str(), row["attempts_made"].as_i64()),
        (Some("delivered"), Some(2)),
        "{row}"
    );
    let (_, d) = app.get(&format!("/deliveries/{}", row["id"].as_str().unwrap())).await;
    let statuses: Vec<_> = d["attempts"]
        .as_array()
        .unwrap_or_else(|| panic!("{d}"))
        .iter()
        .map(|a| a["status"].clone())
        .collect();
    assert_eq!(statuses, vec![json!(500), json!(200)], "{d}");
    let (_, page) = app
        .get(&format!("/deliveries?sync_job_run_id={}&limit=100", runs[1]))
        .await;
    assert_eq!(page["results"].as_array().unwrap().len(), 10, "{page}");

    // It really is PostgreSQL that holds them.
    assert_eq!(count(&url, "SELECT COUNT(*) FROM deliveries").await, 20);
    // Every first-try success keeps its attempt on its row; the attempt log holds the two of
    // the delivery that was retried.
    assert_eq!(count(&url, "SELECT COUNT(*) FROM attempts").await, 2);
    assert_eq!(
        count(
            &url,
            "SELECT COUNT(*) FROM deliveries WHERE attempts = 1 AND last_duration_ms IS NOT NULL"
        )
        .await,
        19
    );
    assert_eq!(count(&url, "SELECT COUNT(*) FROM webhooks").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_dead_letters_and_replays_with_the_same_id() {
    let rx = Receiver::with_script(Arc::new(|_, _| Reply::status(500))).await;
    let (app, url) = spawn_on_postgres(&[("SYNCRELAY__DELIVERY__RETRY__MAX_ATTEMPTS", "2")]).await;
    let (wid, _) = app.webhook(&rx.url("/dl"), &[]).await;
    let run = run_id(9);
    app.send_events(vec![
        event("dl1", &wid, Some(&run), json!({})),
        event("dl2", &wid, Some(&run), json!({})),
    ])
    .await;
    rx.wait_for(WAIT, "4 attempts", |g| g.len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, dl) = app.get(&format!("/dead-letters?webhook_id={wid}")).await;
    let rows = dl["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{dl}");
    assert_eq!(rows[0]["event_id"], "dl1");
    assert_eq!(rows[0]["reason"], "attempts_exhausted");
    assert_eq!(rows[0]["last_status"], 500);
    let order: Vec<_> = rx
        .received()
        .iter()
        .map(|r| r.header("webhook-id").to_string())
        .collect();
    assert_eq!(order, vec!["dl1", "dl1", "dl2", "dl2"]);

    rx.set_script(Arc::new(|_, _| Reply::status(200)));
    let (s, b) = app.post("/dead-letters/replay", json!({"webhook_id": wid})).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["replayed"], 2);
    let got = rx.wait_for(WAIT, "replayed", |g| g.len() >= 6).await;
    let replayed: Vec<_> = got[4..].iter().map(|r| r.header("webhook-id").to_string()).collect();
    assert_eq!(replayed, vec!["dl1", "dl2"], "replay keeps the run's order and the ids");
    let (_, dl) = app.get(&format!("/dead-letters?webhook_id={wid}")).await;
    assert!(dl["results"].as_array().unwrap().is_empty());
    assert_eq!(
        count(&url, "SELECT COUNT(*) FROM dead_letters WHERE replayed_at IS NOT NULL").await,
        2
    );
}

/// Two relays on one PostgreSQL (embedded bus), events of the same runs posted to both: every
/// event delivered once (nothing crashes, no lease expires), each run's events in the order they
/// were accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_postgres_deliver_every_event_once_in_run_order() {
    let rx = Receiver::start().await;
    let url = postgres::database();
    let env = [
        ("SYNCRELAY__STORE__KIND", "postgres"),
        ("SYNCRELAY__STORE__URL", url.as_str()),
    ];
    let a = spawn_app(&env).await;
    let b = spawn_app(&env).await;
    let (wid, _) = a.webhook(&rx.url("/two"), &[]).await;
    // b knows the webhook from the store (its version is checked every second, and an event
    // naming a webhook b does not know yet makes b look it up).
    let runs: Vec<String> = (1..=4).map(run_id).collect();
    // Batches alternate between the relays; within a run, a batch is accepted before the next
    // one is sent, so the accepted order is the numbering.
    for batch in 0..10 {
        let events: Vec<_> = runs
            .iter()
            .enumerate()
            .flat_map(|(r, run)| {
                let wid = wid.clone();
                (0..5).map(move |i| event(&format!("t{r}_{:03}", batch * 5 + i), &wid, Some(run), json!({})))
            })
            .collect();
        if batch % 2 == 0 {
            a.send_events(events).await;
        } else {
            b.send_events(events).await;
        }
    }
    rx.wait_for(WAIT, "200 deliveries", |g| g.len() >= 200).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids = rx.webhook_ids();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (200, 200), "no duplicates");
    for r in 0..runs.len() {
        in_order(&ids, &format!("t{r}_"));
    }
}

/// The outcome writers (two, each with its own chains) commit side by side, and the lease
/// renewal that runs every `store.lease_ms / 3` meanwhile never takes a row that one of them
/// has just finished, and not yet let go of, for a lost lease: no lease is reported lost, no
/// event is delivered twice, every run arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_beside_busy_outcome_writers_lose_no_lease() {
    // Each answer takes a little while, so that the writers' transactions overlap the renewals.
    let rx = Receiver::with_script(Arc::new(|_: &Received, _| {
        Reply::status(200).delayed(Duration::from_millis(2))
    }))
    .await;
    let (app, _url) = spawn_on_postgres(&[("SYNCRELAY__STORE__LEASE_MS", "1000")]).await;
    let (wid, _) = app.webhook(&rx.url("/renew"), &[]).await;
    let (runs, per_run) = (40, 120);
    for batch in 0..(per_run / 10) {
        let events: Vec<_> = (0..runs)
            .flat_map(|r| {
                let wid = wid.clone();
                (0..10).map(move |i| {
                    let n = batch * 10 + i;
                    event(
                        &format!("l{r:02}_{n:03}"),
                        &wid,
                        Some(&run_id(r + 1)),
                        json!({ "n": n }),
                    )
                })
            })
            .collect();
        app.send_events(events).await;
    }
    let total = runs * per_run;
    rx.wait_for(Duration::from_secs(60), "every delivery", |g| g.len() >= total)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids = rx.webhook_ids();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (total, total), "each event delivered once");
    for r in 0..runs {
        in_order(&ids, &format!("l{r:02}_"));
    }
    assert_eq!(
        app.metric("syncrelay_leases_lost_total", &[]).await,
        0.0,
        "no lease reported lost"
    );
}

/// PostgreSQL restarted under a running relay (every connection ended, as in a failover): the
/// events accepted before it are all delivered, a client that sends again on 503 gets the later
/// ones accepted once the server is back, and every run arrives whole and in order — the pool's
/// connections, broken by the restart, are replaced and not handed out again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_the_relay_loses_nothing_and_delivery_resumes() {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = pg.create_database();
    let rx = Receiver::start().await;
    let app = spawn_app(&[("SYNCRELAY__STORE__KIND", "postgres"), ("SYNCRELAY__STORE__URL", &url)]).await;
    let (wid, _) = app.webhook(&rx.url("/restart"), &[]).await;
    let runs: Vec<String> = (1..=4).map(run_id).collect();
    let batch = |b: usize| -> Vec<serde_json::Value> {
        runs.iter()
            .enumerate()
            .flat_map(|(r, run)| {
                let wid = wid.clone();
                (0..10).map(move |i| event(&format!("p{r}_{:03}", b * 10 + i), &wid, Some(run), json!({"b": b})))
            })
            .collect()
    };
    app.send_events(batch(0)).await;
    rx.wait_for(WAIT, "the first 40", |g| g.len() >= 40).await;

    // Kept to the end: the server stops when it is dropped.
    let _pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .unwrap();

    // Right after the restart, while the pool still holds connections the server has ended:
    // each batch sent again on 503 (never another status) until it is accepted.
    let mut refused = 0;
    for b in 1..=3 {
        let until = std::time::Instant::now() + WAIT;
        loop {
            let (s, body) = app.post("/events", json!({ "events": batch(b) })).await;
            if s == 202 {
                break;
            }
            assert_eq!((s, body["type"].as_str()), (503, Some("service_unavailable")), "{body}");
            refused += 1;
            assert!(std::time::Instant::now() < until, "batch {b} still refused: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let got = rx.wait_for(WAIT, "all 160", |g| g.len() >= 160).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids = rx.webhook_ids();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 160, "every event delivered ({} requests)", got.len());
    for r in 0..runs.len() {
        let prefix = format!("p{r}_");
        let seen: Vec<&String> = ids.iter().filter(|id| id.starts_with(&prefix)).collect();
        let mut want = seen.clone();
        want.sort();
        want.dedup();
        assert_eq!(want.len(), 40, "run {r} whole");
        // At least once: an event whose outcome's commit was cut by the restart may come again,
        // but never out of order (a repeat is its chain's head, sent again before the next).
        let mut firsts = seen.clone();
        firsts.dedup();
        let mut sorted = firsts.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(firsts, sorted, "run {r} in order");
    }
    // A broken connection is dropped when it fails: far fewer refusals than the pool has
    // connections times the batches.
    assert!(refused <= 4, "{refused} batches refused after the restart");
    assert_eq!(
        count(&url, "SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'").await,
        160
    );
}
