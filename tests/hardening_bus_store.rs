//! Regression tests for the findings of the hostile-input probe (issue 13) that depend on the bus
//! or the store: each failed before its fix, and runs on both buses (`both_buses!`) or both
//! stores (SQLite and a real PostgreSQL) where the finding applies to both.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;

const ACCOUNT: &str = "94801e49-a652-42f9-af14-dd203d7897da";
const WAIT: Duration = Duration::from_secs(30);

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

/// A sync job and a run of it delivering to webhook `wid`: the run's id.
async fn new_run(app: &TestApp, wid: &str) -> String {
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
    run["id"].as_str().unwrap().to_string()
}

/// Did the receiver get an event named `event`?
fn has(got: &[Received], event: &str) -> bool {
    got.iter().any(|r| r.json()["event"] == event)
}

/// An event of `run` naming only its run.
fn run_event(id: &str, run: &str, kind: &str) -> Value {
    json!({"id": id, "event": format!("sync_job_run:{kind}"), "sync_job_run_id": run,
           "payload": {"resource": "ticketing/tickets"}})
}

// Finding: an event id starting with the relay's own prefix `sr_<run>_` skipped every lifecycle
// rule, so a record sent after its run was stopped was delivered instead of dead-lettered
// `run_finished`. Relay-made events are now recognised by a flag no input can set.
both_buses!(
    a_client_id_with_the_relay_prefix_gets_the_lifecycle_rules,
    |bus| async move {
        let rx = Receiver::start().await;
        let mut h = Harness::start(bus, &[]).await;
        let (wid, _) = h.api().webhook(&rx.url("/hook"), &[]).await;
        let run = new_run(h.api(), &wid).await;
        h.send(&[run_event("s1", &run, "started")]).await;
        rx.wait_for(WAIT, "started", |g| has(g, "sync_job_run:started")).await;
        let (s, b) = h
            .api()
            .call(
                Method::PATCH,
                &format!("/sync-job-run/{run}"),
                Some(json!({"status": "stopped"})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        // The relay's own `stopped` event is delivered (it is relay-made, so it passes).
        rx.wait_for(WAIT, "stopped", |g| has(g, "sync_job_run:stopped")).await;
        let before = rx.received().len();

        let forged = format!("sr_{}_x1", run.replace('-', ""));
        h.send(&[run_event(&forged, &run, "record")]).await;
        let dl = wait_dead_letters(h.api(), &format!("event_id={forged}"), 1).await;
        assert_eq!(dl[0]["reason"], "run_finished", "{dl:?}");
        // And it never reached the receiver.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rx.received().len(), before);
        assert!(!rx.delivered_ids().contains(&forged));
        h.stop().await;
    }
);

/// The relay in-process on `store` (`sqlite`, or `postgres` on a fresh database of the test's
/// own PostgreSQL server) with `extra` settings.
async fn spawn_on(store: &str, extra: &[(&str, &str)]) -> TestApp {
    let mut env: Vec<(String, String)> = Vec::new();
    if store == "postgres" {
        let url = tokio::task::spawn_blocking(postgres::database).await.unwrap();
        env.push(("SYNCRELAY__STORE__KIND".into(), "postgres".into()));
        env.push(("SYNCRELAY__STORE__URL".into(), url));
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    spawn_app_with(&[], env).await
}

/// `mod name { sqlite, postgres }`: the scenario `|store: &'static str| async move {…}` on each.
macro_rules! both_stores {
    ($name:ident, $scenario:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                ($scenario)("sqlite").await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                ($scenario)("postgres").await
            }
        }
    };
}

// Finding: `POST /dead-letters/replay` with 40,000 ids answered 500 ("too many SQL variables").
// Now the list is capped (10,000 ids, a typed 400 naming `ids` above it) and the stores look the
// ids up in chunks, so a full list of 10,000 works on both stores.
both_stores!(
    replaying_many_dead_letters_by_id_never_fails,
    |store: &'static str| async move {
        let app = spawn_on(store, &[]).await;
        // Three dead letters: events for a webhook that does not exist.
        let nobody = uuid::Uuid::new_v4().to_string();
        let events: Vec<Value> = (0..3)
            .map(|i| event(&format!("lost{i}"), &nobody, None, json!({"i": i})))
            .collect();
        app.send_events(events).await;
        let dls = wait_dead_letters(&app, "reason=unknown_webhook", 3).await;

        let (s, b) = app
            .post("/dead-letters/replay", json!({"ids": vec!["x"; 40_000]}))
            .await;
        assert_eq!(
            (s, &b["type"], &b["detail"]["field"]),
            (400, &json!("bad_request"), &json!("ids")),
            "{b}"
        );

        // The most ids one request may name, the real ones last (past the first chunk).
        let mut ids: Vec<String> = (0..9_997).map(|i| format!("no_such_{i}")).collect();
        ids.extend(dls.iter().map(|d| d["id"].as_str().unwrap().to_string()));
        let (s, b) = app.post("/dead-letters/replay", json!({ "ids": ids })).await;
        assert_eq!(s, 202, "{b}");
        assert_eq!(b["replayed"], 3, "{b}");
    }
);
