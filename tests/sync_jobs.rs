//! `/sync-job` over real HTTP: the seed examples are accepted, every validation answers a typed
//! error naming the field path, PATCH revalidates the whole job, DELETE is refused while runs are
//! active. Also the Eloqua-style `/api/bulk/2.0/syncs`.

mod support;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;

fn assert_field(status: u16, body: &Value, field: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["type"], "bad_request", "{body}");
    assert_eq!(body["detail"]["field"], field, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.starts_with(field)), "{body}");
}

/// The seed example: a required `project_slug` string, comments that depend on tickets, a user
/// lookup that loops over `user_ids`.
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
            {"resource": "ticketing/tickets", "method": "list",
             "query": {"project": "{{args.project_slug}}", "updated_at": {"gt": "{{previous_run_date}}"}}},
            {"resource": "ticketing/comments", "method": "list", "depends_on": "ticketing/tickets",
             "query": {"ticket_id": "{{resources.ticketing.tickets.id}}"}},
            {"resource": "users", "method": "get", "loop_on": "user_ids", "id": "{{args.user_ids}}"}
        ],
        "environment_id": "env_1"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_job_is_accepted_listed_and_filtered_with_cursors() {
    let app = spawn_app(&[]).await;
    let (s, job) = app.post("/sync-job", seed_job()).await;
    assert_eq!(s, 201, "{job}");
    let id = job["id"].as_str().unwrap();
    assert_eq!(job["integration_name"], "jira");
    assert_eq!(job["environment_id"], "env_1");
    assert_eq!(job["args_schema"], seed_job()["args_schema"]);
    let r = &job["resources"];
    assert_eq!(r[0]["persist"], true, "unified resources always persist");
    assert_eq!(r[1]["depends_on"], "ticketing/tickets");
    assert_eq!(r[2]["persist"], false, "proxy resources default to false");
    assert_eq!(r[2]["loop_on"], "user_ids");
    assert!(job["created_at"].as_str().unwrap().ends_with('Z'));

    let (s, got) = app.get(&format!("/sync-job/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(got, job);

    // validate_only checks without creating.
    let mut v = seed_job();
    v["validate_only"] = json!(true);
    let (s, b) = app.post("/sync-job", v).await;
    assert_eq!((s, &b["valid"]), (200, &json!(true)), "{b}");

    for name in ["github", "github", "github"] {
        let mut j = seed_job();
        j["integration_name"] = json!(name);
        assert_eq!(app.post("/sync-job", j).await.0, 201);
    }
    let (s, all) = app.get("/sync-job").await;
    assert_eq!(s, 200);
    assert_eq!(
        all["results"].as_array().unwrap().len(),
        4,
        "validate_only created nothing"
    );
    let (_, p1) = app.get("/sync-job?integration_name=github&limit=2").await;
    assert_eq!(p1["results"].as_array().unwrap().len(), 2);
    let cursor = p1["next_cursor"].as_str().expect("a next page");
    let (_, p2) = app
        .get(&format!("/sync-job?integration_name=github&limit=2&cursor={cursor}"))
        .await;
    assert_eq!(p2["results"].as_array().unwrap().len(), 1);
    assert!(p2["next_cursor"].is_null());
    assert!(p1["results"]
        .as_array()
        .unwrap()
        .iter()
        .chain(p2["results"].as_array().unwrap())
        .all(|j| j["integration_name"] == "github"));

    let (s, b) = app.get("/sync-job/00000000-0000-4000-8000-000000000000").await;
    assert_eq!((s, b["type"].as_str()), (404, Some("not_found")));
    let (s, b) = app.get("/sync-job?cursor=zz").await;
    assert_field(s, &b, "cursor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_names_the_field() {
    let app = spawn_app(&[]).await;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut j = seed_job();
        f(&mut j);
        j
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            with(&|j| {
                j.as_object_mut().unwrap().remove("integration_name");
            }),
            "integration_name",
        ),
        (with(&|j| j["integration_name"] = json!("  ")), "integration_name"),
        (with(&|j| j["integration_name"] = json!(3)), "integration_name"),
        (with(&|j| j["args_schema"] = json!([1])), "args_schema"),
        (with(&|j| j["args_schema"]["type"] = json!("array")), "args_schema.type"),
        (
            with(&|j| j["args_schema"]["properties"]["project_slug"]["type"] = json!("text")),
            "args_schema.properties.project_slug.type",
        ),
        (with(&|j| j["resources"] = json!([])), "resources"),
        (
            with(&|j| {
                j["resources"][1].as_object_mut().unwrap().remove("method");
            }),
            "resources[1].method",
        ),
        (with(&|j| j["resources"][1]["bogus"] = json!(1)), "resources[1].bogus"),
        (
            with(&|j| j["resources"][0]["resource"] = json!("a/b/c")),
            "resources[0].resource",
        ),
        // Placeholders.
        (
            with(&|j| j["resources"][0]["query"]["project"] = json!("{{args.project}}")),
            "resources[0].query.project",
        ),
        (
            with(&|j| j["resources"][0]["query"]["updated_at"]["gt"] = json!("{{last_run}}")),
            "resources[0].query.updated_at.gt",
        ),
        (
            with(&|j| j["resources"][2]["id"] = json!("{{args.user_ids")),
            "resources[2].id",
        ),
        (
            with(&|j| j["resources"][1]["query"]["ticket_id"] = json!("{{resources.crm.contacts.id}}")),
            "resources[1].query.ticket_id",
        ),
        (
            with(&|j| {
                j["resources"][1].as_object_mut().unwrap().remove("depends_on");
            }),
            "resources[1].query.ticket_id",
        ),
        // depends_on and the graph.
        (
            with(&|j| j["resources"][1]["depends_on"] = json!("ticketing/users")),
            "resources[1].depends_on",
        ),
        (
            with(&|j| j["resources"][1]["depends_on"] = json!("ticketing/comments")),
            "resources[1].depends_on",
        ),
        (
            with(&|j| j["resources"][0]["depends_on"] = json!("ticketing/comments")),
            "resources[0].depends_on",
        ),
        // loop_on.
        (
            with(&|j| j["resources"][2]["loop_on"] = json!("project_slug")),
            "resources[2].loop_on",
        ),
        (
            with(&|j| j["resources"][2]["loop_on"] = json!("team_ids")),
            "resources[2].loop_on",
        ),
        // Duplicate (resource, method).
        (
            with(&|j| {
                j["resources"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"resource": "ticketing/tickets", "method": "list"}))
            }),
            "resources[3].method",
        ),
    ];
    for (body, field) in cases {
        let (s, b) = app.post("/sync-job", body.clone()).await;
        assert_field(s, &b, field);
    }
    // Same resource with another method is fine; loop_on in placeholder form too.
    let ok = with(&|j| {
        j["resources"]
            .as_array_mut()
            .unwrap()
            .push(json!({"resource": "ticketing/tickets", "method": "get", "id": "1"}));
        j["resources"][2]["loop_on"] = json!("{{args.user_ids}}");
    });
    let (s, b) = app.post("/sync-job", ok).await;
    assert_eq!(s, 201, "{b}");
    let (_, all) = app.get("/sync-job").await;
    assert_eq!(
        all["results"].as_array().unwrap().len(),
        1,
        "nothing invalid was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_is_partial_and_revalidates_the_whole_job() {
    let app = spawn_app(&[]).await;
    let (_, job) = app.post("/sync-job", seed_job()).await;
    let path = format!("/sync-job/{}", job["id"].as_str().unwrap());

    let (s, b) = app
        .call(Method::PATCH, &path, Some(json!({"integration_name": "jira_cloud"})))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["integration_name"], "jira_cloud");
    assert_eq!(b["resources"], job["resources"]);
    assert_eq!(b["args_schema"], job["args_schema"]);

    // Dropping user_ids from the schema breaks resources[2].loop_on, which the PATCH did not touch.
    let (s, b) = app
        .call(
            Method::PATCH,
            &path,
            Some(json!({"args_schema": {"type": "object", "properties": {"project_slug": {"type": "string"}}}})),
        )
        .await;
    assert_field(s, &b, "resources[2].loop_on");
    let (s, b) = app
        .call(
            Method::PATCH,
            &path,
            Some(json!({"resources": [{"resource": "x", "method": "list", "depends_on": "x"}]})),
        )
        .await;
    assert_field(s, &b, "resources[0].depends_on");
    let (s, b) = app.call(Method::PATCH, &path, Some(json!({"nope": 1}))).await;
    assert_field(s, &b, "nope");
    let (_, now) = app.get(&path).await;
    assert_eq!(now["args_schema"], job["args_schema"], "refused patches change nothing");

    let (s, b) = app
        .call(
            Method::PATCH,
            &path,
            Some(json!({"resources": [{"resource": "contacts", "method": "list", "persist": true}]})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["resources"],
        json!([{"resource": "contacts", "method": "list", "persist": true}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_is_a_typed_conflict_while_the_job_has_active_runs() {
    let app = spawn_app(&[]).await;
    let (_, job) = app.post("/sync-job", seed_job()).await;
    let id = job["id"].as_str().unwrap();
    let (s, run) = app
        .post(
            "/sync-job-run",
            json!({"sync_job_id": id, "integrated_account_id": "94801e49-a652-42f9-af14-dd203d7897da",
                   "daemon_group_key": "default", "args": {"project_slug": "acme/web"}}),
        )
        .await;
    assert_eq!(s, 201, "{run}");
    let (s, b) = app.call(Method::DELETE, &format!("/sync-job/{id}"), None).await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(b["type"], "conflict");
    let (s, _) = app
        .call(
            Method::PATCH,
            &format!("/sync-job-run/{}", run["id"].as_str().unwrap()),
            Some(json!({"status": "stopped"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = app.call(Method::DELETE, &format!("/sync-job/{id}"), None).await;
    assert_eq!(s, 204);
    let (s, _) = app.get(&format!("/sync-job/{id}")).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eloqua_style_syncs_are_created_and_read_back() {
    let app = spawn_app(&[("SYNCRELAY__DELIVERY__ALLOWED_CIDRS", "[]")]).await;
    let (s, b) = app
        .post(
            "/api/bulk/2.0/syncs",
            json!({"syncedInstanceUri": "/contacts/exports/1", "callbackURL": "https://93.184.216.34/eloqua"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["syncedInstanceUri"], "/contacts/exports/1");
    assert_eq!(b["callbackUrl"], "https://93.184.216.34/eloqua");
    assert_eq!(b["status"], "pending");
    assert!(b["createdAt"].is_string() && b["createdBy"].is_string());
    let uri = b["uri"].as_str().unwrap();
    assert!(uri.starts_with("/syncs/"), "{uri}");
    let (s, got) = app.get(&format!("/api/bulk/2.0{uri}")).await;
    assert_eq!((s, &got), (200, &b));

    for (body, field) in [
        (json!({"callbackURL": "https://93.184.216.34/"}), "syncedInstanceUri"),
        (json!({"syncedInstanceUri": "contacts"}), "syncedInstanceUri"),
        (
            json!({"syncedInstanceUri": "/contacts/exports/1", "callbackURL": "ftp://x"}),
            "callbackURL",
        ),
        (
            json!({"syncedInstanceUri": "/contacts/exports/1", "callbackURL": "http://169.254.169.254/"}),
            "callbackURL",
        ),
        (
            json!({"syncedInstanceUri": "/contacts/exports/1", "callbackURL": "http://10.1.2.3/"}),
            "callbackURL",
        ),
    ] {
        let (s, b) = app.post("/api/bulk/2.0/syncs", body).await;
        assert_field(s, &b, field);
    }
    let (s, _) = app.get("/api/bulk/2.0/syncs/999").await;
    assert_eq!(s, 404);
}
