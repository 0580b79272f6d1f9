//! Issue 12: Census-style syncs (`/syncs`) end to end over real HTTP: a run's records reach every
//! sync of its job mapped and signed for the sync's webhook; a paused sync holds its deliveries
//! (across a restart of the real binary) and delivers them in order when unpaused; alerts fire,
//! repeat and recover as configured; requests are validated naming the field.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const ACCOUNT: &str = "0e7d1c9a-2b3c-4d5e-8f90-a1b2c3d4e5f6";
const WAIT: Duration = Duration::from_secs(30);

async fn job<A: Api>(app: &A) -> String {
    app.sync_job("crm", "crm/contacts").await
}

async fn run<A: Api>(app: &A, job: &str, webhook: &str) -> String {
    let (s, run) = app
        .post(
            "/sync-job-run",
            json!({"sync_job_id": job, "integrated_account_id": ACCOUNT, "webhook_id": webhook}),
        )
        .await;
    assert_eq!(s, 201, "{run}");
    run["id"].as_str().unwrap().to_string()
}

/// Create a sync; answers its id.
async fn sync<A: Api>(app: &A, body: Value) -> i64 {
    let (s, b) = app.post("/syncs", body).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["status"], "created", "{b}");
    b["data"]["sync_id"].as_i64().unwrap()
}

fn source(job: &str) -> Value {
    json!({"object": {"type": "sync_job", "id": job}})
}

fn ev(id: &str, run: &str, kind: &str, payload: Value) -> Value {
    json!({"id": id, "event": format!("sync_job_run:{kind}"), "sync_job_run_id": run, "payload": payload})
}

fn record(id: &str, run: &str, n: usize) -> Value {
    ev(
        id,
        run,
        "record",
        json!({"resource": "crm/contacts", "record": {"email": format!("u{n}@x.test"), "profile": {"first": format!("F{n}")}, "ssn": "secret", "n": n}}),
    )
}

fn verify(r: &Received, secret: &str) {
    standardwebhooks::Webhook::new(secret)
        .unwrap()
        .verify(&r.body, &r.header_map())
        .expect("the destination webhook's secret verifies the delivery");
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

both_buses!(
    records_reach_each_sync_mapped_and_signed_and_the_run_webhook_unchanged,
    |bus| async move {
        let rx = Receiver::start().await;
        let mut h = Harness::start(bus, &[]).await;
        let app = h.api();
        let (hook, _) = app.webhook(&rx.url("/hook"), &[]).await;
        let (dest, dest_secret) = app.webhook(&rx.url("/dest"), &["nothing:subscribed"]).await;
        let (all_dest, all_secret) = app.webhook(&rx.url("/all"), &[]).await;
        let job = job(app).await;
        let mapped = sync(
            app,
            json!({
                "source_attributes": source(&job),
                "destination_attributes": {"connection_id": dest, "object": "contact"},
                "operation": "upsert",
                "label": "contacts to CRM",
                "mappings": [
                    {"from": {"type": "column", "data": "profile.first"}, "to": "first_name"},
                    {"from": {"type": "constant_value", "data": {"value": "syncrelay", "basic_type": "text"}}, "to": "Source"},
                    {"from": {"type": "column", "data": "email"}, "to": "Email", "is_primary_identifier": true},
                    {"from": {"type": "column", "data": "profile.missing"}, "to": "Absent"}
                ]
            }),
        )
        .await;
        let all = sync(
            app,
            json!({
                "source_attributes": source(&job),
                "destination_attributes": {"connection_id": all_dest, "object": "person"},
                "operation": "append",
                "field_behavior": "sync_all_properties",
                "field_normalization": "start_case",
                "field_order": "mapping_order",
                "mappings": [{"from": {"type": "column", "data": "n"}, "to": "Number"}]
            }),
        )
        .await;
        let run = run(app, &job, &hook).await;
        let mut events = vec![ev("s", &run, "started", json!({}))];
        for n in 0..3 {
            events.push(record(&format!("r{n}"), &run, n));
        }
        // A batch of records in one event: each element is mapped in place.
        events.push(ev(
            "batch",
            &run,
            "record",
            json!({"resource": "crm/contacts", "records": [{"email": "b1@x.test", "n": 10}, {"email": "b2@x.test", "n": 11}]}),
        ));
        events.push(ev("c", &run, "completed", json!({})));
        h.send(&events).await;

        let got = rx
            .wait_for(WAIT, "4 records to each sync", |g| {
                g.iter().filter(|r| r.path == "/dest").count() >= 4
                    && g.iter().filter(|r| r.path == "/all").count() >= 4
            })
            .await;
        let _ = got;
        // Records only (no lifecycle events), in the run's order, signed with each sync's own
        // webhook's secret, only the mapped fields, renamed, alphabetical by default.
        let dest_rx = rx.on("/dest");
        assert_eq!(dest_rx.len(), 4, "records only");
        for r in &dest_rx {
            verify(r, &dest_secret);
        }
        let bodies: Vec<Value> = dest_rx.iter().map(Received::json).collect();
        assert_eq!(
            bodies.iter().map(|b| b["id"].as_str().unwrap()).collect::<Vec<_>>(),
            ["r0", "r1", "r2", "batch"]
        );
        let p = &bodies[1]["payload"];
        assert_eq!(
            p["record"],
            json!({"Absent": null, "Email": "u1@x.test", "Source": "syncrelay", "first_name": "F1"})
        );
        assert_eq!(keys(&p["record"]), ["Absent", "Email", "Source", "first_name"]);
        assert_eq!(p["operation"], "upsert");
        assert_eq!(p["destination_object"], "contact");
        assert_eq!(p["primary_identifier"], "Email");
        assert_eq!(p["sync_id"], mapped);
        assert_eq!(p["resource"], "crm/contacts", "the rest of the payload is kept");
        assert_eq!(bodies[1]["webhook_id"], dest.as_str());
        assert_eq!(bodies[1]["sync_job_run_id"], run.as_str());
        assert!(
            !bodies.iter().any(|b| b.to_string().contains("secret")),
            "unmapped fields never leave"
        );
        assert_eq!(
            bodies[3]["payload"]["records"],
            json!([
                {"Absent": null, "Email": "b1@x.test", "Source": "syncrelay", "first_name": null},
                {"Absent": null, "Email": "b2@x.test", "Source": "syncrelay", "first_name": null}
            ])
        );

        // sync_all_properties with start_case, in mapping order: the mapping, then the record's
        // properties under their normalised names.
        let all_rx = rx.on("/all");
        for r in &all_rx {
            verify(r, &all_secret);
        }
        let first = all_rx[0].json();
        assert_eq!(
            keys(&first["payload"]["record"]),
            ["Number", "Email", "Profile", "Ssn", "N"]
        );
        assert_eq!(first["payload"]["record"]["Number"], 0);
        assert_eq!(first["payload"]["operation"], "append");
        assert_eq!(first["payload"]["sync_id"], all);
        assert!(first["payload"].get("primary_identifier").is_none());

        // The run's own webhook gets every event as it was sent.
        rx.wait_for(WAIT, "the run webhook's events", |g| {
            g.iter().filter(|r| r.path == "/hook").count() >= 6
        })
        .await;
        let hook_bodies: Vec<Value> = rx.on("/hook").iter().map(Received::json).collect();
        let r1 = hook_bodies.iter().find(|b| b["id"] == "r1").unwrap();
        assert_eq!(r1["payload"]["record"]["ssn"], "secret");
        assert!(r1["payload"].get("operation").is_none());
        assert_eq!(
            h.metric(
                "syncrelay_deliveries_total",
                &[("outcome", "delivered"), ("kind", "sync")]
            )
            .await,
            8.0
        );
        h.stop().await;
    }
);

/// Wait until `n` deliveries reached `path`; answers their bodies in arrival order.
async fn bodies_on(rx: &Receiver, path: &str, n: usize) -> Vec<Value> {
    rx.wait_for(WAIT, &format!("{n} deliveries on {path}"), |g| {
        g.iter()
            .filter(|r| r.path == path && (200..300).contains(&r.status))
            .count()
            >= n
    })
    .await;
    rx.on(path).iter().map(Received::json).collect()
}

async fn patch<A: Api>(app: &A, path: &str, body: Value) -> (u16, Value) {
    app.call(reqwest::Method::PATCH, path, Some(body)).await
}

both_buses!(
    a_paused_sync_holds_its_records_then_delivers_them_in_order,
    |bus| async move {
        let rx = Receiver::start().await;
        let mut h = Harness::start(bus, &[]).await;
        let app = h.api();
        let (hook, _) = app.webhook(&rx.url("/hook"), &[]).await;
        let (dest, _) = app.webhook(&rx.url("/dest"), &[]).await;
        let job = job(app).await;
        let id = sync(
        app,
        json!({"source_attributes": source(&job), "destination_attributes": {"connection_id": dest, "object": "contact"},
               "operation": "insert", "paused": true,
               "mappings": [{"from": {"type": "column", "data": "n"}, "to": "n"}]}),
    )
    .await;
        let run = run(app, &job, &hook).await;
        let events: Vec<Value> = (0..20).map(|n| record(&format!("p{n}"), &run, n)).collect();
        h.send(&events).await;
        bodies_on(&rx, "/hook", 21).await; // `created` + 20 records: every one was routed
        let held = eventually(WAIT, "20 held", || async {
            let (_, b) = app.get(&format!("/syncs/{id}")).await;
            (b["data"]["held_deliveries"] == 20).then_some(b)
        })
        .await;
        assert_eq!(held["data"]["status"], "paused");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(rx.on("/dest").is_empty(), "a paused sync's records are not attempted");
        let (s, b) = patch(app, &format!("/syncs/{id}"), json!({"paused": false})).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["status"], "updated");
        let got = bodies_on(&rx, "/dest", 20).await;
        let ns: Vec<i64> = got
            .iter()
            .map(|b| b["payload"]["record"]["n"].as_i64().unwrap())
            .collect();
        assert_eq!(ns, (0..20).collect::<Vec<_>>(), "in the run's order");
        // Records after the unpause go straight on, behind them.
        h.send(&[record("late", &run, 20)]).await;
        let got = bodies_on(&rx, "/dest", 21).await;
        assert_eq!(got[20]["id"], "late");
        let (_, b) = app.get(&format!("/syncs/{id}")).await;
        assert_eq!(b["data"]["held_deliveries"], 0);
        h.stop().await;
    }
);

/// The real binary: 100 records held by a paused sync survive a kill -9 and a restart, and are
/// all delivered, in order, once the sync is unpaused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sync_holds_100_records_across_a_restart_and_delivers_them_in_order_when_unpaused() {
    let rx = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut relay = RelayProcess::start(data.path(), port, &[]).await;
    let (hook, _) = relay.webhook(&rx.url("/hook"), &[]).await;
    let (dest, dest_secret) = relay.webhook(&rx.url("/dest"), &[]).await;
    let job = job(&relay).await;
    let id = sync(
        &relay,
        json!({"source_attributes": source(&job), "destination_attributes": {"connection_id": dest, "object": "contact"},
               "operation": "upsert", "paused": true,
               "mappings": [{"from": {"type": "column", "data": "n"}, "to": "n", "is_primary_identifier": true}]}),
    )
    .await;
    let run = run(&relay, &job, &hook).await;
    let events: Vec<Value> = (0..100).map(|n| record(&format!("p{n}"), &run, n)).collect();
    relay.send_events(events).await; // each answered 202: committed
    bodies_on(&rx, "/hook", 101).await;
    let (_, b) = relay.get(&format!("/syncs/{id}")).await;
    assert_eq!(b["data"]["held_deliveries"], 100, "{b}");
    relay.kill9();

    let relay = RelayProcess::start(data.path(), port, &[]).await;
    let (_, b) = relay.get(&format!("/syncs/{id}")).await;
    assert_eq!(
        (b["data"]["paused"].clone(), b["data"]["held_deliveries"].clone()),
        (json!(true), json!(100))
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rx.on("/dest").is_empty(), "still held after the restart");
    assert_eq!(relay.metric("syncrelay_sync_deliveries_held", &[]).await, 100.0);

    let (s, b) = patch(&relay, &format!("/syncs/{id}"), json!({"paused": false})).await;
    assert_eq!(s, 200, "{b}");
    let got = bodies_on(&rx, "/dest", 100).await;
    let ns: Vec<i64> = got
        .iter()
        .map(|b| b["payload"]["record"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, (0..100).collect::<Vec<_>>(), "all of them, in order");
    for r in rx.on("/dest") {
        verify(&r, &dest_secret);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.on("/dest").len(), 100, "each once");
}

/// The alerts of `sync` delivered so far: (state, run) in arrival order.
fn alerts_of(rx: &Receiver, sync: i64) -> Vec<(String, String)> {
    rx.on("/alerts")
        .iter()
        .map(Received::json)
        .filter(|b| b["payload"]["sync_id"] == sync)
        .map(|b| {
            (
                b["payload"]["state"].as_str().unwrap().to_string(),
                b["payload"]["sync_job_run_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

both_buses!(
    an_invalid_record_alert_fires_at_the_threshold_once_or_every_time_and_recovers,
    |bus| async move {
        let rx = Receiver::start().await;
        let mut h = Harness::start(bus, &[]).await;
        let app = h.api();
        let (hook, _) = app.webhook(&rx.url("/hook"), &["sync_job_run:record"]).await;
        let (dest, _) = app.webhook(&rx.url("/dest"), &["nothing:subscribed"]).await;
        let (_, alert_secret) = app.webhook(&rx.url("/alerts"), &["sync_job_run:alert"]).await;
        let job = job(app).await;
        let base = json!({"source_attributes": source(&job), "destination_attributes": {"connection_id": dest, "object": "contact"},
                          "operation": "append", "mappings": [{"from": {"type": "column", "data": "n"}, "to": "n"}]});
        let mut first = base.clone();
        first["alert_attributes"] =
            json!([{"type": "InvalidRecordPercent", "send_for": "first_time", "options": {"threshold": "50"}}]);
        let first = sync(app, first).await;
        let mut every = base.clone();
        every["alert_attributes"] = json!([{"type": "InvalidRecordPercentAlertConfiguration", "send_for": "every_time",
                                            "should_send_recovery": false, "options": {"threshold": 50}}]);
        let every = sync(app, every).await;

        // (records, record errors) per run: 50 %, 50 %, 0 %.
        let mut runs = Vec::new();
        for (i, (records, errors)) in [(1, 1), (2, 2), (3, 0)].into_iter().enumerate() {
            let r = run(app, &job, &hook).await;
            let mut events = vec![ev(&format!("s{i}"), &r, "started", json!({}))];
            for k in 0..records {
                events.push(record(&format!("r{i}-{k}"), &r, k));
            }
            for k in 0..errors {
                events.push(ev(
                    &format!("e{i}-{k}"),
                    &r,
                    "record_error",
                    json!({"resource": "crm/contacts", "error": "bad"}),
                ));
            }
            events.push(ev(&format!("c{i}"), &r, "completed", json!({})));
            h.send(&events).await;
            // What this run sends, before the next run starts (a run's alert follows the one
            // before it).
            let want = [2, 3, 4][i];
            eventually(WAIT, &format!("{want} alerts after run {i}"), || async {
                (alerts_of(&rx, first).len() + alerts_of(&rx, every).len() >= want).then_some(())
            })
            .await;
            runs.push(r);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = |st: &str, r: &String| (st.to_string(), r.clone());
        assert_eq!(
            alerts_of(&rx, first),
            [s("triggered", &runs[0]), s("recovered", &runs[2])],
            "first_time: once while firing, then one recovery"
        );
        assert_eq!(
            alerts_of(&rx, every),
            [s("triggered", &runs[0]), s("triggered", &runs[1])],
            "every_time: each run at the threshold; no recovery asked"
        );
        let a = rx.on("/alerts");
        for r in &a {
            verify(r, &alert_secret);
        }
        let body = a[0].json();
        assert_eq!(body["event"], "sync_job_run:alert");
        assert_eq!(body["payload"]["alert_type"], "InvalidRecordPercent");
        assert_eq!(body["payload"]["threshold"], 50.0);
        assert_eq!(body["payload"]["observed_value"], 50.0);
        assert_eq!(
            h.metric(
                "syncrelay_sync_alerts_total",
                &[("alert_type", "InvalidRecordPercent"), ("state", "triggered")]
            )
            .await,
            3.0
        );
        assert_eq!(
            h.metric(
                "syncrelay_sync_alerts_total",
                &[("alert_type", "InvalidRecordPercent"), ("state", "recovered")]
            )
            .await,
            1.0
        );
        h.stop().await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_only_creates_nothing_and_bad_requests_name_the_field() {
    let rx = Receiver::start().await;
    let app = spawn_app(&[]).await;
    let (dest, _) = app.webhook(&rx.url("/dest"), &[]).await;
    let job = job(&app).await;
    let body = json!({
        "source_attributes": source(&job),
        "destination_attributes": {"connection_id": dest, "object": "contact"},
        "operation": "upsert",
        "mappings": [
            {"from": {"type": "column", "data": "email"}, "to": "Email", "is_primary_identifier": true},
            {"from": {"type": "column", "data": "name"}, "to": "Name"},
            {"from": {"type": "column", "data": "id"}, "to": "Id"}
        ],
        "validate_only": true
    });
    let (s, b) = app.post("/syncs", body.clone()).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"]["validate_only"], true);
    let (_, list) = app.get("/syncs").await;
    assert_eq!(
        list["pagination"]["total_records"], 0,
        "validate_only created nothing: {list}"
    );

    let bad = |edit: &dyn Fn(&mut Value)| {
        let mut v = body.clone();
        edit(&mut v);
        v
    };
    for (v, field) in [
        (bad(&|v| v["mappings"][2]["to"] = json!("Email")), "mappings[2].to"),
        (bad(&|v| v["mappings"][2]["to"] = json!(7)), "mappings[2].to"),
        (
            bad(&|v| v["mappings"][0]["is_primary_identifier"] = json!(false)),
            "mappings",
        ),
        (bad(&|v| v["operation"] = json!("merge")), "operation"),
        (
            bad(&|v| v["source_attributes"]["object"]["id"] = json!("00000000-0000-4000-8000-000000000009")),
            "source_attributes.object.id",
        ),
        (
            bad(&|v| v["destination_attributes"]["connection_id"] = json!("00000000-0000-4000-8000-000000000009")),
            "destination_attributes.connection_id",
        ),
        (
            bad(&|v| v["alert_attributes"] = json!([{"type": "InvalidRecordPercent", "options": {"threshold": 150}}])),
            "alert_attributes[0].options.threshold",
        ),
    ] {
        // With validate_only and without: the same refusal, nothing created.
        for validate_only in [true, false] {
            let mut v = v.clone();
            v["validate_only"] = json!(validate_only);
            let (s, b) = app.post("/syncs", v).await;
            assert_eq!(s, 400, "{b}");
            assert_eq!(b["type"], "bad_request", "{b}");
            assert_eq!(b["detail"]["field"], field, "{b}");
        }
    }
    let (_, list) = app.get("/syncs").await;
    assert_eq!(list["pagination"]["total_records"], 0);

    // Created for real: read, paged, patched (validated the same way), deleted.
    let mut real = body.clone();
    real["validate_only"] = json!(false);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(sync(&app, real.clone()).await);
    }
    let (s, one) = app.get(&format!("/syncs/{}", ids[0])).await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["status"], "success");
    assert_eq!(one["data"]["destination_attributes"]["connection_id"], dest.as_str());
    assert_eq!(one["data"]["field_order"], "alphabetical_column_name");
    assert_eq!(one["data"]["mappings"][0]["is_primary_identifier"], true);
    let (_, page) = app.get("/syncs?per_page=2").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        (
            page["pagination"]["next_page"].clone(),
            page["pagination"]["last_page"].clone()
        ),
        (json!(2), json!(2))
    );
    let (_, page2) = app.get("/syncs?per_page=2&page=2").await;
    assert_eq!(page2["data"][0]["id"], ids[2]);
    let (s, b) = app.get("/syncs?per_page=101").await;
    assert_eq!((s, b["detail"]["field"].clone()), (400, json!("per_page")));
    let (s, b) = patch(
        &app,
        &format!("/syncs/{}", ids[0]),
        json!({"mappings": [{"from": {"type": "column", "data": "a"}, "to": ""}]}),
    )
    .await;
    assert_eq!((s, b["detail"]["field"].clone()), (400, json!("mappings[0].to")), "{b}");
    let (s, b) = patch(
        &app,
        &format!("/syncs/{}", ids[0]),
        json!({"label": "renamed", "failed_run_notifications_enabled": true}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"]["label"], "renamed");
    assert_eq!(b["data"]["failed_run_notifications_enabled"], true);
    assert_eq!(b["data"]["alert_attributes"][0]["type"], "FailureAlertConfiguration");
    let (s, _) = app
        .call(reqwest::Method::DELETE, &format!("/syncs/{}", ids[0]), None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = app.get(&format!("/syncs/{}", ids[0])).await;
    assert_eq!(s, 404);
    let (s, _) = app.get("/syncs/abc").await;
    assert_eq!(s, 404);
}

both_buses!(failure_and_status_alerts_follow_the_runs, |bus| async move {
    let rx = Receiver::start().await;
    let mut h = Harness::start(bus, &[]).await;
    let app = h.api();
    let (hook, _) = app.webhook(&rx.url("/hook"), &["sync_job_run:record"]).await;
    let (dest, _) = app.webhook(&rx.url("/dest"), &["nothing:subscribed"]).await;
    app.webhook(&rx.url("/alerts"), &["sync_job_run:*"]).await;
    let job = job(app).await;
    let id = sync(
        app,
        json!({"source_attributes": source(&job), "destination_attributes": {"connection_id": dest, "object": "contact"},
               "operation": "append", "mappings": [{"from": {"type": "column", "data": "n"}, "to": "n"}],
               "alert_attributes": [{"type": "FailureAlertConfiguration"}, {"type": "StatusAlertConfiguration"}]}),
    )
    .await;
    // (alert type, state, observed value) of this sync's alerts so far.
    let seen = || -> Vec<(String, String, Value)> {
        rx.on("/alerts")
            .iter()
            .map(Received::json)
            .filter(|b| b["event"] == "sync_job_run:alert" && b["payload"]["sync_id"] == id)
            .map(|b| {
                let p = &b["payload"];
                (
                    p["alert_type"].as_str().unwrap().into(),
                    p["state"].as_str().unwrap().into(),
                    p["observed_value"].clone(),
                )
            })
            .collect()
    };
    let a = |t: &str, s: &str, v: &str| (t.to_string(), s.to_string(), json!(v));
    let r1 = run(app, &job, &hook).await;
    h.send(&[ev("s1", &r1, "started", json!({})), ev("f1", &r1, "failed", json!({}))])
        .await;
    eventually(WAIT, "run 1's alerts", || async { (seen().len() >= 3).then_some(()) }).await;
    let r2 = run(app, &job, &hook).await;
    h.send(&[
        ev("s2", &r2, "started", json!({})),
        ev("c2", &r2, "completed", json!({})),
    ])
    .await;
    eventually(WAIT, "run 2's alerts", || async { (seen().len() >= 6).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = seen();
    // Within one run, the order of different alert types is not promised.
    let key = |x: &(String, String, Value)| (x.0.clone(), x.1.clone(), x.2.to_string());
    got[..3].sort_by_key(key);
    got[3..].sort_by_key(key);
    assert_eq!(
        got,
        [
            a("Failure", "triggered", "failed"),
            a("Status", "triggered", "failed"),
            a("Status", "triggered", "started"),
            a("Failure", "recovered", "completed"),
            a("Status", "triggered", "completed"),
            a("Status", "triggered", "started"),
        ]
    );
    h.stop().await;
});
