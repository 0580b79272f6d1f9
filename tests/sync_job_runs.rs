//! `/sync-job-run` over real HTTP: Truto's response shape, typed errors with JSON paths, the
//! start/stop commands for executors, `sync_job_run:created` / `:stopped` deliveries, filters and
//! cursors, `previous_run_date`.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;

const ACCOUNT: &str = "94801e49-a652-42f9-af14-dd203d7897da";

fn assert_field(status: u16, body: &Value, field: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["type"], "bad_request", "{body}");
    assert_eq!(body["detail"]["field"], field, "{body}");
}

fn seed_job() -> Value {
    json!({
        "integration_name": "jira",
        "args_schema": {
            "type": "object",
            "properties": {
                "project_slug": {"type": "string", "required": true},
                "user_ids": {"type": "array", "items": {"type": "string"}}
            }
        },
        "resources": [
            {"resource": "ticketing/tickets", "method": "list", "query": {"project": "{{args.project_slug}}"}},
            {"resource": "ticketing/comments", "method": "list", "depends_on": "ticketing/tickets",
             "query": {"ticket_id": "{{resources.ticketing.tickets.id}}"}},
            {"resource": "users", "method": "get", "loop_on": "user_ids", "id": "{{args.user_ids}}"}
        ]
    })
}

async fn job(app: &TestApp) -> String {
    let (s, b) = app.post("/sync-job", seed_job()).await;
    assert_eq!(s, 201, "{b}");
    b["id"].as_str().unwrap().to_string()
}

/// Commands published so far (embedded mode), oldest first.
async fn commands(app: &TestApp) -> Vec<Value> {
    let (s, b) = app.get("/sync-job-run-commands?limit=1000").await;
    assert_eq!(s, 200, "{b}");
    b["results"].as_array().unwrap().clone()
}

async fn events_for(rx: &Receiver, n: usize) -> Vec<Value> {
    rx.wait_for(Duration::from_secs(10), "deliveries", |g| g.len() >= n)
        .await;
    rx.received().iter().map(|r| r.json()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_has_trutos_shape_publishes_a_start_command_and_delivers_created() {
    let app = spawn_app(&[]).await;
    let rx = Receiver::start().await;
    let (wh, _) = app.webhook(&rx.url("/hook"), &[]).await;
    let job_id = job(&app).await;
    let (s, run) = app
        .post(
            "/sync-job-run",
            json!({"sync_job_id": job_id, "integrated_account_id": ACCOUNT, "webhook_id": wh,
                   "args": {"project_slug": "acme/web", "user_ids": ["u1", "u2"]}}),
        )
        .await;
    assert_eq!(s, 201, "{run}");
    let id = run["id"].as_str().unwrap();
    for k in [
        "id",
        "args",
        "resources",
        "sync_job_id",
        "integrated_account_id",
        "status",
        "daemon_id",
        "daemon_group_key",
        "webhook_id",
        "error_handling",
        "ignore_previous_run",
        "resource_stats",
        "created_at",
        "updated_at",
        "started_at",
        "finished_at",
        "sync_job",
    ] {
        assert!(run.get(k).is_some(), "missing {k}: {run}");
    }
    assert_eq!(run["status"], "created");
    assert_eq!(run["error_handling"], "ignore");
    assert_eq!(run["ignore_previous_run"], false);
    assert_eq!(run["webhook_id"], wh.as_str());
    assert!(run["daemon_group_key"].is_null() && run["started_at"].is_null() && run["finished_at"].is_null());
    assert_eq!(run["resources"].as_array().unwrap().len(), 3);
    assert_eq!(run["resources"][1]["depends_on"], "ticketing/tickets");
    assert_eq!(run["sync_job"]["id"], job_id.as_str());
    assert_eq!(run["resource_stats"], json!({}));

    let (s, got) = app.get(&format!("/sync-job-run/{id}")).await;
    assert_eq!((s, &got), (200, &run));

    let cmds = commands(&app).await;
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0]["key"], id);
    let c = &cmds[0]["command"];
    assert_eq!(c["type"], "start");
    assert_eq!(c["run"]["id"], id);
    assert_eq!(c["sync_job"]["id"], job_id.as_str());
    assert!(c["previous_run_date"].is_null());

    let got = events_for(&rx, 1).await;
    assert_eq!(got[0]["event"], "sync_job_run:created");
    assert_eq!(got[0]["sync_job_run_id"], id);
    assert_eq!(got[0]["webhook_id"], wh.as_str());
    assert_eq!(got[0]["payload"]["id"], id);
    assert_eq!(got[0]["payload"]["status"], "created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_validation_names_fields_and_json_paths() {
    let app = spawn_app(&[("SYNCRELAY__DELIVERY__ALLOWED_CIDRS", "[]")]).await;
    let (wh, _) = app.webhook("https://93.184.216.34/hook", &[]).await;
    let (off, _) = app.webhook("https://93.184.216.34/off", &[]).await;
    let (s, _) = app
        .call(
            Method::PATCH,
            &format!("/webhook/{off}"),
            Some(json!({"is_active": false})),
        )
        .await;
    assert_eq!(s, 200);
    let job_id = job(&app).await;
    let base = json!({"sync_job_id": job_id, "integrated_account_id": ACCOUNT, "webhook_id": wh,
                      "args": {"project_slug": "acme/web"}});
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = base.clone();
        f(&mut b);
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            with(&|b| {
                b.as_object_mut().unwrap().remove("sync_job_id");
            }),
            "sync_job_id",
        ),
        (with(&|b| b["sync_job_id"] = json!("nope")), "sync_job_id"),
        (
            with(&|b| b["sync_job_id"] = json!("00000000-0000-4000-8000-000000000000")),
            "sync_job_id",
        ),
        (
            with(&|b| b["integrated_account_id"] = json!("acct-1")),
            "integrated_account_id",
        ),
        (with(&|b| b["daemon_group_key"] = json!("default")), "webhook_id"),
        (
            with(&|b| {
                b.as_object_mut().unwrap().remove("webhook_id");
            }),
            "webhook_id",
        ),
        (
            with(&|b| b["webhook_id"] = json!("00000000-0000-4000-8000-000000000000")),
            "webhook_id",
        ),
        (with(&|b| b["webhook_id"] = json!(off)), "webhook_id"),
        (with(&|b| b["args"] = json!({})), "args.project_slug"),
        (with(&|b| b["args"] = json!({"project_slug": 42})), "args.project_slug"),
        (
            with(&|b| b["args"] = json!({"project_slug": "a", "user_ids": ["u1", 7]})),
            "args.user_ids[1]",
        ),
        (with(&|b| b["args"] = json!([1])), "args"),
        (with(&|b| b["error_handling"] = json!("retry")), "error_handling"),
        (
            with(&|b| b["ignore_previous_run"] = json!("yes")),
            "ignore_previous_run",
        ),
        (
            with(&|b| b["callback_url"] = json!("ftp://example.com/x")),
            "callback_url",
        ),
        (
            with(&|b| b["callback_url"] = json!("http://169.254.169.254/latest")),
            "callback_url",
        ),
        (with(&|b| b["surprise"] = json!(1)), "surprise"),
    ];
    for (body, field) in cases {
        let (s, b) = app.post("/sync-job-run", body.clone()).await;
        assert_field(s, &b, field);
    }
    let (s, b) = app
        .post("/sync-job-run", with(&|b| b["validate_only"] = json!(true)))
        .await;
    assert_eq!((s, &b["valid"]), (200, &json!(true)), "{b}");
    let (_, list) = app.get("/sync-job-run").await;
    assert_eq!(list["results"], json!([]), "nothing was created");
    assert!(
        commands(&app).await.is_empty(),
        "no command for refused or validate-only runs"
    );
    for mode in ["fail_fast", "ignore", "batch"] {
        let (s, b) = app
            .post(
                "/sync-job-run",
                with(&|b| {
                    b["error_handling"] = json!(mode);
                    b["callback_url"] = json!("https://93.184.216.34/cb");
                }),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        assert_eq!(b["error_handling"], mode);
        assert_eq!(b["callback_url"], "https://93.184.216.34/cb");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_listed_with_filters_and_cursors() {
    let app = spawn_app(&[]).await;
    let rx = Receiver::start().await;
    let (wh, _) = app.webhook(&rx.url("/hook"), &[]).await;
    let job_a = job(&app).await;
    let job_b = job(&app).await;
    let other = "2b2c8d3e-1111-4a53-9d7a-3a0f0c5f9b11";
    let mut ids = Vec::new();
    for (j, acct, by_webhook) in [
        (&job_a, ACCOUNT, true),
        (&job_a, other, false),
        (&job_b, ACCOUNT, true),
        (&job_a, ACCOUNT, false),
    ] {
        let mut b = json!({"sync_job_id": j, "integrated_account_id": acct, "args": {"project_slug": "p"}});
        if by_webhook {
            b["webhook_id"] = json!(wh);
        } else {
            b["daemon_group_key"] = json!("default");
        }
        let (s, r) = app.post("/sync-job-run", b).await;
        assert_eq!(s, 201, "{r}");
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    let (s, _) = app
        .call(
            Method::PATCH,
            &format!("/sync-job-run/{}", ids[3]),
            Some(json!({"status": "stopped"})),
        )
        .await;
    assert_eq!(s, 200);
    let ids_of = |b: &Value| -> Vec<String> {
        b["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, b) = app.get(&format!("/sync-job-run?sync_job_id={job_a}")).await;
    assert_eq!(ids_of(&b), vec![ids[0].clone(), ids[1].clone(), ids[3].clone()]);
    let (_, b) = app.get(&format!("/sync-job-run?integrated_account_id={other}")).await;
    assert_eq!(ids_of(&b), vec![ids[1].clone()]);
    let (_, b) = app.get(&format!("/sync-job-run?webhook_id={wh}")).await;
    assert_eq!(ids_of(&b), vec![ids[0].clone(), ids[2].clone()]);
    let (_, b) = app.get("/sync-job-run?status=stopped").await;
    assert_eq!(ids_of(&b), vec![ids[3].clone()]);
    let (_, b) = app
        .get(&format!(
            "/sync-job-run?status=created&sync_job_id={job_a}&integrated_account_id={ACCOUNT}"
        ))
        .await;
    assert_eq!(ids_of(&b), vec![ids[0].clone()]);

    let (_, p1) = app.get("/sync-job-run?limit=3").await;
    assert_eq!(ids_of(&p1), ids[..3].to_vec());
    let c = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = app.get(&format!("/sync-job-run?limit=3&cursor={c}")).await;
    assert_eq!(ids_of(&p2), ids[3..].to_vec());
    assert!(p2["next_cursor"].is_null());

    let (s, b) = app.get("/sync-job-run?status=sleeping").await;
    assert_field(s, &b, "status");
    let (s, b) = app.get("/sync-job-run?webhook_id=abc").await;
    assert_field(s, &b, "webhook_id");
    let (s, b) = app.get("/sync-job-run?limit=0").await;
    assert_field(s, &b, "limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_run_publishes_a_stop_command_and_delivers_stopped() {
    let app = spawn_app(&[]).await;
    let rx = Receiver::start().await;
    let (wh, _) = app.webhook(&rx.url("/hook"), &[]).await;
    let job_id = job(&app).await;
    let (_, run) = app
        .post(
            "/sync-job-run",
            json!({"sync_job_id": job_id, "integrated_account_id": ACCOUNT, "webhook_id": wh, "args": {"project_slug": "p"}}),
        )
        .await;
    let id = run["id"].as_str().unwrap();
    let path = format!("/sync-job-run/{id}");
    let (s, b) = app.call(Method::PATCH, &path, Some(json!({"status": "running"}))).await;
    assert_field(s, &b, "status");
    let (s, b) = app.call(Method::PATCH, &path, Some(json!({"status": "stopped"}))).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], "stopped");
    assert!(b["finished_at"].is_string());
    // Stopping again changes nothing.
    let (s, again) = app.call(Method::PATCH, &path, Some(json!({"status": "stopped"}))).await;
    assert_eq!((s, &again), (200, &b));

    let cmds = commands(&app).await;
    let types: Vec<&str> = cmds.iter().map(|c| c["command"]["type"].as_str().unwrap()).collect();
    assert_eq!(types, vec!["start", "stop"]);
    assert_eq!(cmds[1]["key"], id);

    let got = events_for(&rx, 2).await;
    let names: Vec<&str> = got.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["sync_job_run:created", "sync_job_run:stopped"]);
    assert_eq!(got[1]["payload"]["status"], "stopped");

    let (s, _) = app.call(Method::DELETE, &path, None).await;
    assert_eq!(s, 204);
    let (s, b) = app.get(&path).await;
    assert_eq!((s, b["type"].as_str()), (404, Some("not_found")));
    let got = events_for(&rx, 3).await;
    assert_eq!(got[2]["event"], "sync_job_run:deleted");
}

/// Drive a run to `completed` through the lifecycle library (what the engine does with the
/// executor's events), on the app's own database.
async fn complete(app: &TestApp, run_id: &str) {
    use syncrelay::config::{StoreKind, StoreSettings, Synchronous};
    use syncrelay::runs::{Action, BatchLimits, Runs};
    use syncrelay::store::Store;
    let store = Store::open(&StoreSettings {
        kind: StoreKind::Sqlite,
        path: app.data.path().join("syncrelay.db"),
        url: String::new(),
        max_connections: 2,
        synchronous: Synchronous::Full,
        lease_ms: 60_000,
        encryption_key: String::new(),
        previous_encryption_keys: Vec::new(),
    })
    .await
    .unwrap();
    let runs = Runs::new(store.clone(), BatchLimits::default());
    for (n, kind) in ["started", "completed"].iter().enumerate() {
        let e = syncrelay::domain::Envelope::parse_text(
            &json!({"id": format!("x{n}"), "event": format!("sync_job_run:{kind}"), "sync_job_run_id": run_id, "payload": {}})
                .to_string(),
            0,
            false,
        )
        .unwrap();
        let d = runs.on_ingest(&e).await.unwrap().expect("known run");
        assert_eq!(d.action, Action::Deliver);
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_command_carries_the_previous_completed_runs_finish_time() {
    let app = spawn_app(&[]).await;
    let job_id = job(&app).await;
    let body = |ignore: bool| {
        json!({"sync_job_id": job_id, "integrated_account_id": ACCOUNT, "daemon_group_key": "default",
               "args": {"project_slug": "p"}, "ignore_previous_run": ignore})
    };
    let (_, first) = app.post("/sync-job-run", body(false)).await;
    let first_id = first["id"].as_str().unwrap();
    complete(&app, first_id).await;
    let (_, done) = app.get(&format!("/sync-job-run/{first_id}")).await;
    assert_eq!(done["status"], "completed");
    assert!(done["started_at"].is_string());
    let finished = done["finished_at"].as_str().unwrap().to_string();

    let (s, second) = app.post("/sync-job-run", body(false)).await;
    assert_eq!(s, 201, "{second}");
    let (s, third) = app.post("/sync-job-run", body(true)).await;
    assert_eq!(s, 201, "{third}");
    assert_eq!(third["ignore_previous_run"], true);
    let cmds = commands(&app).await;
    assert_eq!(cmds.len(), 3);
    assert!(cmds[0]["command"]["previous_run_date"].is_null());
    assert_eq!(cmds[1]["command"]["previous_run_date"], finished.as_str());
    assert!(cmds[2]["command"]["previous_run_date"].is_null(), "ignore_previous_run");
    // Another account has no previous run.
    let mut other = body(false);
    other["integrated_account_id"] = json!("2b2c8d3e-1111-4a53-9d7a-3a0f0c5f9b11");
    app.post("/sync-job-run", other).await;
    let cmds = commands(&app).await;
    assert!(cmds[3]["command"]["previous_run_date"].is_null());
}
