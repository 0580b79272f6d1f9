//! Issue 12: the Eloqua bulk sync and DevRev sync unit front doors over the run model, end to
//! end over real HTTP (the executor played by the test: start command read from
//! `GET /sync-job-run-commands`, run events sent on the bus).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const CB_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The start command of run `run`, where this bus publishes run commands: the store
/// (`GET /sync-job-run-commands`, embedded) or the commands topic (Kafka).
async fn start_command(h: &Harness, run: &str) -> Value {
    if let Some(k) = h.kafka.as_ref() {
        let (broker, topic) = (k.broker, k.topics.commands.clone());
        let got = tokio::task::spawn_blocking(move || broker.read_all(&topic, 1, Duration::from_secs(10)))
            .await
            .unwrap();
        return got
            .iter()
            .map(|m| m.json())
            .find(|c| c["type"] == "start" && c["sync_job_run_id"] == run)
            .unwrap_or_else(|| panic!("no start command for {run} on the commands topic"));
    }
    let app = h.api();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, b) = app.get("/sync-job-run-commands?limit=1000").await;
        assert_eq!(s, 200, "{b}");
        if let Some(c) = b["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["command"]["type"] == "start" && c["command"]["sync_job_run_id"] == run)
        {
            return c["command"].clone();
        }
        assert!(Instant::now() < until, "no start command for {run}: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ev(id: &str, run: &str, kind: &str) -> Value {
    json!({"id": id, "event": format!("sync_job_run:{kind}"), "sync_job_run_id": run,
           "payload": {"resource": "contacts", "n": id}})
}

async fn wait_sync_status(app: &TestApp, uri: &str, status: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, b) = app.get(&format!("/api/bulk/2.0{uri}")).await;
        assert_eq!(s, 200, "{b}");
        if b["status"] == status {
            return b;
        }
        assert!(Instant::now() < until, "sync never became {status}: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Exactly one callback on `/cb`, verified with the callback secret; returns its body.
async fn one_callback(rx: &Receiver) -> Value {
    rx.wait_for(Duration::from_secs(20), "the sync's callback", |g| {
        g.iter().any(|r| r.path == "/cb" && (200..300).contains(&r.status))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let cbs = rx.on("/cb");
    assert_eq!(cbs.len(), 1, "exactly one callback");
    let cb = &cbs[0];
    standardwebhooks::Webhook::new(CB_SECRET)
        .unwrap()
        .verify(&cb.body, &cb.header_map())
        .expect("the callback secret verifies the callback");
    assert!(!cb.header("webhook-id").is_empty());
    cb.json()
}

both_buses!(
    eloqua_sync_with_a_record_error_ends_warning_with_logs_and_one_signed_callback,
    |bus| async move {
        let rx = Receiver::start().await;
        let h = Harness::start(bus, &[("SYNCRELAY__CALLBACKS__SECRET", CB_SECRET)]).await;
        let app = h.api();
        let (wid, _) = app.webhook(&rx.url("/records"), &[]).await;
        let (s, sync) = app
            .post(
                "/api/bulk/2.0/syncs",
                json!({"syncedInstanceUri": "/contacts/exports/7", "callbackURL": rx.url("/cb"), "webhookId": wid}),
            )
            .await;
        assert_eq!(s, 201, "{sync}");
        assert_eq!(sync["status"], "pending");
        let uri = sync["uri"].as_str().unwrap().to_string();
        let run = sync["sync_job_run_id"].as_str().unwrap().to_string();

        // The executor: the start command carries the run id and the sync's uri.
        let cmd = start_command(&h, &run).await;
        assert_eq!(cmd["uri"], uri.as_str());
        assert_eq!(cmd["syncedInstanceUri"], "/contacts/exports/7");

        h.send(&[ev("s1", &run, "started")]).await;
        let active = wait_sync_status(app, &uri, "active").await;
        assert!(active["syncStartedAt"].is_string(), "{active}");
        h.send(&[
            ev("r1", &run, "record"),
            ev("r2", &run, "record"),
            ev("e1", &run, "record_error"),
            ev("r3", &run, "record"),
            ev("c1", &run, "completed"),
        ])
        .await;
        let done = wait_sync_status(app, &uri, "warning").await;
        assert!(done["syncEndedAt"].is_string(), "{done}");

        let cb = one_callback(&rx).await;
        assert_eq!(cb["event"], "eloqua_sync:finished");
        assert_eq!(cb["payload"]["uri"], uri.as_str());
        assert_eq!(cb["payload"]["status"], "warning");
        assert!(cb["payload"]["syncEndedAt"].is_string());

        // Logs: records delivered, record errors, the final status.
        rx.wait_for(Duration::from_secs(10), "records delivered", |g| {
            g.iter()
                .filter(|r| r.path == "/records" && r.json()["event"] == "sync_job_run:record")
                .count()
                >= 3
        })
        .await;
        let until = Instant::now() + Duration::from_secs(10);
        let logs = loop {
            let (s, logs) = app.get(&format!("/api/bulk/2.0{uri}/logs")).await;
            assert_eq!(s, 200, "{logs}");
            if logs["items"][0]["count"] == 3 {
                break logs;
            }
            assert!(Instant::now() < until, "{logs}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let items = logs["items"].as_array().unwrap();
        assert_eq!(items[0]["syncUri"], uri.as_str());
        assert_eq!(items[0]["severity"], "information");
        assert!(
            items.iter().any(|i| i["severity"] == "warning" && i["count"] == 1),
            "{logs}"
        );
        for i in items {
            for k in ["syncUri", "count", "severity", "statusCode", "message", "createdAt"] {
                assert!(!i[k].is_null(), "{k} in {i}");
            }
        }
        assert_eq!(logs["totalResults"], items.len());
        assert_eq!(logs["hasMore"], false);

        // The list, Eloqua's paging.
        let (s, list) = app.get("/api/bulk/2.0/syncs?limit=1&offset=0").await;
        assert_eq!(s, 200, "{list}");
        assert_eq!(list["totalResults"], 1);
        assert_eq!(list["items"][0]["uri"], uri.as_str());
        assert_eq!(list["hasMore"], false);

        // Still exactly one callback after more events of the finished run.
        h.send(&[ev("late", &run, "completed")]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rx.on("/cb").len(), 1);
        // And the dashboard's metric counts it once, by the sync's final status.
        let m = h.metrics().await;
        assert_eq!(
            m.value("syncrelay_eloqua_sync_callbacks_total", &[("status", "warning")]),
            1.0
        );
        assert_eq!(
            m.value("syncrelay_eloqua_sync_callbacks_total", &[("status", "error")]),
            0.0
        );
    }
);

both_buses!(
    eloqua_sync_whose_run_fails_ends_error_with_its_callback,
    |bus| async move {
        let rx = Receiver::start().await;
        let h = Harness::start(bus, &[("SYNCRELAY__CALLBACKS__SECRET", CB_SECRET)]).await;
        let app = h.api();
        let (s, sync) = app
            .post(
                "/api/bulk/2.0/syncs",
                json!({"syncedInstanceUri": "/contacts/imports/3", "callbackURL": rx.url("/cb")}),
            )
            .await;
        assert_eq!(s, 201, "{sync}");
        let uri = sync["uri"].as_str().unwrap().to_string();
        let run = sync["sync_job_run_id"].as_str().unwrap().to_string();
        start_command(&h, &run).await;
        h.send(&[ev("s1", &run, "started"), ev("f1", &run, "failed")]).await;
        let done = wait_sync_status(app, &uri, "error").await;
        assert!(done["syncEndedAt"].is_string());
        let cb = one_callback(&rx).await;
        assert_eq!(cb["payload"]["status"], "error");
        assert_eq!(cb["payload"]["uri"], uri.as_str());
    }
);

const ACCOUNT: &str = "94801e49-a652-42f9-af14-dd203d7897da";

async fn unit(app: &TestApp, id: &str) -> Value {
    let (s, b) = app.get(&format!("/airdrop.sync-units.get?id={}", urlencode(id))).await;
    assert_eq!(s, 200, "{b}");
    b["sync_unit"].clone()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn wait_unit(app: &TestApp, id: &str, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let u = unit(app, id).await;
        if pred(&u["sync_run"]) {
            return u;
        }
        assert!(Instant::now() < until, "{what}: {u}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devrev_bulk_create_is_all_or_nothing_with_typed_errors_naming_the_item() {
    let app = spawn_app(&[]).await;
    let (s, b) = app
        .post(
            "/airdrop.sync-units.create.bulk",
            json!({"sync_units": [
                {"external_sync_unit": "jira/PROJ-1", "keyring": "jira-prod"},
                {"external_sync_unit": "jira/PROJ-2", "keyring": "jira-prod"},
                {"external_sync_unit": "jira/PROJ-3"}
            ]}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["type"], "bad_request");
    assert_eq!(b["detail"]["field"], "sync_units[2].keyring");
    // Nothing was created.
    let (s, l) = app.get("/airdrop.sync-units.list").await;
    assert_eq!(s, 200, "{l}");
    assert_eq!(l["sync_units"].as_array().unwrap().len(), 0, "{l}");

    // Too large: typed, with the limit.
    let big: Vec<Value> = (0..2000)
        .map(|i| json!({"external_sync_unit": format!("jira/PROJ-{i}-{}", "x".repeat(40)), "keyring": "k"}))
        .collect();
    let (s, b) = app
        .post("/airdrop.sync-units.create.bulk", json!({ "sync_units": big }))
        .await;
    assert_eq!(s, 413, "{b}");
    assert_eq!(b["type"], "request_entity_too_large");
    assert_eq!(b["max_bytes"], 65536);

    // The three, valid: created together, in DevRev's shape.
    let (s, b) = app
        .post(
            "/airdrop.sync-units.create.bulk",
            json!({"sync_units": [
                {"external_sync_unit": "jira/PROJ-1", "keyring": "jira-prod"},
                {"external_sync_unit": "jira/PROJ-2", "keyring": "jira-prod"},
                {"external_sync_unit": "jira/PROJ-3", "keyring": "jira-prod"}
            ]}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let units = b["sync_units"].as_array().unwrap();
    assert_eq!(units.len(), 3);
    for u in units {
        assert!(u["id"].as_str().unwrap().starts_with("don:integration:"), "{u}");
        for k in [
            "display_id",
            "created_by",
            "modified_by",
            "created_date",
            "modified_date",
            "object_version",
            "external_sync_unit_name",
            "external_system_name",
            "external_system_type",
            "is_archived",
            "name",
            "sync_type",
        ] {
            assert!(!u[k].is_null(), "{k} in {u}");
        }
        assert!(u["sync_run"].is_null());
    }
    let (_, l) = app.get("/airdrop.sync-units.list").await;
    assert_eq!(l["sync_units"].as_array().unwrap().len(), 3, "{l}");
}

both_buses!(
    devrev_sync_unit_follows_its_runs_initial_then_incremental,
    |bus| async move {
        let rx = Receiver::start().await;
        let h = Harness::start(bus, &[]).await;
        let app = h.api();
        let (wid, _) = app.webhook(&rx.url("/hook"), &[]).await;
        let (s, b) = app
            .post(
                "/airdrop.sync-units.create.bulk",
                json!({"sync_units": [{"external_sync_unit": "jira/PROJ-9", "keyring": "jira-prod"}]}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let uid = b["sync_units"][0]["id"].as_str().unwrap().to_string();
        let (s, job) = app
            .post(
                "/sync-job",
                json!({"integration_name": "jira", "resources": [{"resource": "ticketing/tickets", "method": "list"}]}),
            )
            .await;
        assert_eq!(s, 201, "{job}");
        let new_run = || async {
            let (s, run) = app
                .post(
                    "/sync-job-run",
                    json!({"sync_job_id": job["id"], "integrated_account_id": ACCOUNT, "webhook_id": wid,
                       "sync_unit_id": uid}),
                )
                .await;
            assert_eq!(s, 201, "{run}");
            assert_eq!(run["sync_unit_id"], uid.as_str());
            run["id"].as_str().unwrap().to_string()
        };

        let r1 = new_run().await;
        let u = unit(app, &uid).await;
        assert_eq!(u["sync_run"]["id"], r1.as_str());
        assert_eq!(u["sync_run"]["mode"], "initial");
        assert_eq!(u["sync_run"]["progress"]["state"], "starting");
        h.send(&[ev("a1", &r1, "started")]).await;
        wait_unit(
            app,
            &uid,
            |r| r["progress"]["state"] == "in_progress",
            "first run in progress",
        )
        .await;
        h.send(&[ev("a2", &r1, "record"), ev("a3", &r1, "completed")]).await;
        let u = wait_unit(
            app,
            &uid,
            |r| r["progress"]["state"] == "completed",
            "first run completed",
        )
        .await;
        assert!(
            u["sync_run"]["started_at"].is_string() && u["sync_run"]["ended_at"].is_string(),
            "{u}"
        );

        let r2 = new_run().await;
        let u = unit(app, &uid).await;
        assert_eq!(u["sync_run"]["id"], r2.as_str());
        assert_eq!(u["sync_run"]["mode"], "incremental");
        assert!(u["sync_run"]["ended_at"].is_null());
        h.send(&[ev("b1", &r2, "started"), ev("b2", &r2, "failed")]).await;
        wait_unit(app, &uid, |r| r["progress"]["state"] == "failed", "second run failed").await;
        let m = h.metrics().await;
        assert_eq!(m.value("syncrelay_sync_units_created_total", &[]), 1.0);
        assert_eq!(m.value("syncrelay_sync_unit_runs_total", &[]), 2.0);

        // Archive: a run can no longer name it.
        let (s, b) = app
            .post("/airdrop.sync-units.update", json!({"id": uid, "is_archived": true}))
            .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["sync_unit"]["is_archived"], true);
        assert_eq!(b["sync_unit"]["object_version"], 2);
        let (s, b) = app
        .post(
            "/sync-job-run",
            json!({"sync_job_id": job["id"], "integrated_account_id": ACCOUNT, "webhook_id": wid, "sync_unit_id": uid}),
        )
        .await;
        assert_eq!(s, 400, "{b}");
        assert_eq!(b["detail"]["field"], "sync_unit_id");
    }
);
