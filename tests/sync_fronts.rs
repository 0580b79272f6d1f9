//! Issue 12: the Eloqua bulk sync and DevRev sync unit front doors over the run model, end to
//! end over real HTTP (the executor played by the test: start command read from
//! `GET /sync-job-run-commands`, run events sent on the bus).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const CB_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The start command of run `run` (polled: published when the sync was created).
async fn start_command(app: &TestApp, run: &str) -> Value {
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
    #[kafka_ignore = "start commands go to the commands topic in Kafka mode; the embedded run covers the front door"]
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
        let cmd = start_command(app, &run).await;
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
    }
);

both_buses!(
    #[kafka_ignore = "start commands go to the commands topic in Kafka mode; the embedded run covers the front door"]
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
        start_command(app, &run).await;
        h.send(&[ev("s1", &run, "started"), ev("f1", &run, "failed")]).await;
        let done = wait_sync_status(app, &uri, "error").await;
        assert!(done["syncEndedAt"].is_string());
        let cb = one_callback(&rx).await;
        assert_eq!(cb["payload"]["status"], "error");
        assert_eq!(cb["payload"]["uri"], uri.as_str());
    }
);
