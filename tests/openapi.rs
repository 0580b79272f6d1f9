//! The OpenAPI document (`GET /openapi.json`, `docs/openapi.json`) stays in step with the
//! routes: every route `api::configure` registers is documented with its method and path, every
//! documented operation is routed and answers with a documented status and a body that matches
//! its documented schema. Also the regression tests for what schemathesis found
//! (`scripts/schemathesis.sh`).

mod support;

use std::collections::BTreeSet;

use serde_json::{json, Value};
use support::*;

fn default_settings() -> syncrelay::config::Settings {
    syncrelay::config::Settings::load(None, Vec::<(String, String)>::new()).expect("defaults load")
}

fn document() -> Value {
    syncrelay::api::openapi_document(&default_settings())
}

/// Follow `#/…` references inside the document.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(
            doc,
            doc.pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("{r} does not resolve")),
        ),
        None => v,
    }
}

/// A validator for `schema`, whose `$ref`s point into the document's components.
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = schema.clone();
    if let Value::Object(o) = &mut root {
        o.insert("components".into(), doc["components"].clone());
    } else {
        root = json!({"allOf": [schema], "components": doc["components"]});
    }
    jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("schema does not compile: {e}\n{schema}"))
}

fn assert_matches(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let v = validator(doc, schema);
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: {instance} does not match its schema: {errors:?}"
    );
}

#[test]
fn every_route_is_documented_and_every_documented_operation_is_routed() {
    let routes: BTreeSet<(String, String)> = syncrelay::api::route_table().into_iter().collect();
    let documented: BTreeSet<(String, String)> =
        syncrelay::api::documented_operations(&document()).into_iter().collect();
    let undocumented: Vec<_> = routes.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routes).collect();
    assert!(
        undocumented.is_empty(),
        "routed but not in the OpenAPI document: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "in the OpenAPI document but not routed: {unrouted:?}"
    );
    assert_eq!(
        routes.len(),
        syncrelay::api::route_table().len(),
        "a route is registered twice"
    );
}

#[test]
fn the_document_is_openapi_3_1_with_resolvable_refs_and_unique_operation_ids() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["components"]["securitySchemes"]["bearerAuth"]["scheme"], "bearer");
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_string()), "operationId {id} twice");
            let responses = op["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path}");
            let public = op.get("security") == Some(&json!([]));
            assert_eq!(
                public,
                path.starts_with("/health/") || path == "/metrics" || path == "/openapi.json",
                "{method} {path}: only health, metrics and the document are public"
            );
            if !public {
                assert!(responses.contains_key("401"), "{method} {path} documents no 401");
            }
            for p in path.split('/').filter(|s| s.starts_with('{')) {
                let name = p.trim_matches(|c| c == '{' || c == '}');
                assert!(
                    op["parameters"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|x| x["name"] == name && x["in"] == "path")),
                    "{method} {path}: path parameter {name} undocumented"
                );
            }
            // Each request example is valid for its schema.
            if let Some(media) = op.pointer("/requestBody/content/application~1json") {
                assert_matches(
                    &doc,
                    &media["schema"],
                    &media["example"],
                    &format!("{method} {path} example"),
                );
            }
        }
    }
    // Every reference resolves, and every schema compiles.
    fn walk(doc: &Value, v: &Value) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    assert!(doc.pointer(r.trim_start_matches('#')).is_some(), "{r} does not resolve");
                }
                o.values().for_each(|x| walk(doc, x));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(doc, x)),
            _ => {}
        }
    }
    walk(&doc, &doc);
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        let _ = validator(&doc, schema);
        let _ = name;
    }
}

/// `docs/openapi.json` is the document for the default settings; `UPDATE_OPENAPI=1 cargo test
/// --test openapi` rewrites it.
#[test]
fn docs_openapi_json_is_the_served_document() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let doc = document();
    let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("docs/openapi.json exists"))
        .expect("docs/openapi.json is JSON");
    assert!(
        on_disk == doc,
        "docs/openapi.json is out of date: run `UPDATE_OPENAPI=1 cargo test --test openapi` and commit it"
    );
}

/// Send a request for an operation and check the answer against the document: not a routing
/// miss (404 `no route`, 405), a documented status, and a body matching that status's schema.
async fn call_documented(
    app: &TestApp,
    doc: &Value,
    method: &str,
    template: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let op = &doc["paths"][template][method];
    let mut req = app
        .http
        .request(method.to_uppercase().parse().unwrap(), format!("{}{path}", app.base))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let what = format!("{} {path}", method.to_uppercase());
    assert_ne!(status, 405, "{what}: documented but not routed for this method: {text}");
    assert!(
        !(status == 404 && text.contains("\"no route ")),
        "{what}: documented but not routed: {text}"
    );
    let response = op["responses"]
        .get(status.to_string())
        .unwrap_or_else(|| panic!("{what}: status {status} is not documented ({text})"));
    let response = resolve(doc, response);
    // Documented headers are there and match their schema.
    if let Some(hs) = response.get("headers").and_then(Value::as_object) {
        for (name, h) in hs {
            match headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
                Some(v) => assert_matches(doc, &h["schema"], &json!(v), &format!("{what} header {name}")),
                None => assert!(h["required"] != true, "{what}: {status} without its {name} header"),
            }
        }
    }
    let value = match response.get("content") {
        None => {
            assert!(text.is_empty(), "{what}: {status} documents no body but got {text}");
            Value::Null
        }
        Some(content) if content.get("application/json").is_some() => {
            assert!(
                content_type.starts_with("application/json"),
                "{what}: content-type {content_type}"
            );
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
            assert_matches(
                doc,
                &content["application/json"]["schema"],
                &v,
                &format!("{what} {status}"),
            );
            v
        }
        Some(content) => {
            let (media, _) = content.as_object().unwrap().iter().next().unwrap();
            assert!(
                content_type.starts_with(media.as_str()),
                "{what}: content-type {content_type}, documented {media}"
            );
            Value::String(text)
        }
    };
    (status, value)
}

fn example(doc: &Value, method: &str, template: &str) -> Option<Value> {
    doc["paths"][template][method]
        .pointer("/requestBody/content/application~1json/example")
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed_and_answers_as_documented() {
    let app = spawn_app(&[]).await;
    // The served document is the one in the code (and so docs/openapi.json), without a token.
    let served: Value = app
        .http
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let doc = document();
    assert!(served == doc, "GET /openapi.json is not the document");

    // Objects to address: made from the document's own examples.
    let (s, webhook) = call_documented(
        &app,
        &doc,
        "post",
        "/webhook",
        "/webhook",
        example(&doc, "post", "/webhook").as_ref(),
    )
    .await;
    assert_eq!(s, 201, "{webhook}");
    let webhook_id = webhook["id"].as_str().unwrap().to_string();
    let (s, job) = call_documented(
        &app,
        &doc,
        "post",
        "/sync-job",
        "/sync-job",
        example(&doc, "post", "/sync-job").as_ref(),
    )
    .await;
    assert_eq!(s, 201, "{job}");
    let job_id = job["id"].as_str().unwrap().to_string();
    let mut run_body = example(&doc, "post", "/sync-job-run").unwrap();
    run_body["sync_job_id"] = json!(job_id);
    run_body["webhook_id"] = json!(webhook_id);
    let (s, run) = call_documented(&app, &doc, "post", "/sync-job-run", "/sync-job-run", Some(&run_body)).await;
    assert_eq!(s, 201, "{run}");
    let run_id = run["id"].as_str().unwrap().to_string();
    let (s, sync) = call_documented(
        &app,
        &doc,
        "post",
        "/api/bulk/2.0/syncs",
        "/api/bulk/2.0/syncs",
        example(&doc, "post", "/api/bulk/2.0/syncs").as_ref(),
    )
    .await;
    assert_eq!(s, 201, "{sync}");
    let sync_n = sync["uri"].as_str().unwrap().trim_start_matches("/syncs/").to_string();
    let (s, units) = call_documented(
        &app,
        &doc,
        "post",
        "/airdrop.sync-units.create.bulk",
        "/airdrop.sync-units.create.bulk",
        example(&doc, "post", "/airdrop.sync-units.create.bulk").as_ref(),
    )
    .await;
    assert_eq!(s, 201, "{units}");
    let unit_id = units["sync_units"][0]["id"].as_str().unwrap().to_string();
    // A Census-style sync from the job's runs to the webhook.
    let mut census_body = example(&doc, "post", "/syncs").unwrap();
    census_body["source_attributes"]["object"]["id"] = json!(job_id);
    census_body["destination_attributes"]["connection_id"] = json!(webhook_id);
    let (s, census) = call_documented(&app, &doc, "post", "/syncs", "/syncs", Some(&census_body)).await;
    assert_eq!(s, 201, "{census}");
    let census_id = census["data"]["sync_id"].to_string();
    // The run's `created` event is in the delivery log.
    let mut delivery_id = None;
    for _ in 0..50 {
        let (_, page) = call_documented(&app, &doc, "get", "/deliveries", "/deliveries", None).await;
        if let Some(id) = page["results"][0]["id"].as_str() {
            delivery_id = Some(id.to_string());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let delivery_id = delivery_id.expect("a delivery of sync_job_run:created");

    let concrete = |template: &str| -> String {
        let id = if template.starts_with("/webhook/") {
            &webhook_id
        } else if template.starts_with("/sync-job/") {
            &job_id
        } else if template.starts_with("/sync-job-run/") {
            &run_id
        } else if template.starts_with("/deliveries/") {
            &delivery_id
        } else if template.starts_with("/syncs/") {
            &census_id
        } else {
            &sync_n
        };
        if template == "/airdrop.sync-units.get" {
            // The unit is named in the query string.
            return format!("{template}?id={}", unit_id.replace('/', "%2F").replace(':', "%3A"));
        }
        template.replace("{id}", id)
    };
    let mut ops: Vec<(String, String)> = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.push((method.clone(), template.clone()));
        }
    }
    // Deletions last (the rest address the objects above).
    ops.sort_by_key(|(m, _)| m == "delete");
    let mut seen = Vec::new();
    for (method, template) in &ops {
        let mut body = example(&doc, method, template);
        if template == "/airdrop.sync-units.update" {
            body = Some(json!({"id": unit_id, "name": "renamed"}));
        }
        if template == "/syncs" && method == "post" {
            body = Some(census_body.clone());
        }
        let (status, value) = call_documented(&app, &doc, method, template, &concrete(template), body.as_ref()).await;
        seen.push(format!("{} {template} {status}", method.to_uppercase()));
        // Addressed objects exist: reads of them succeed.
        if method == "get" && (template.contains("{id}") || template.ends_with(".get")) {
            assert_eq!(status, 200, "GET {template}: {value}");
        }
    }
    // A missing object is a documented 404 too.
    for template in ["/webhook/{id}", "/sync-job/{id}", "/sync-job-run/{id}"] {
        let (s, _) = call_documented(&app, &doc, "get", template, &concrete(template), None).await;
        assert_eq!(s, 404, "GET {template} after delete");
    }
    let (s, _) = call_documented(
        &app,
        &doc,
        "get",
        "/webhook/{id}",
        "/webhook/00000000-0000-4000-8000-000000000000",
        None,
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(seen.len(), syncrelay::api::route_table().len(), "{seen:#?}");
}

/// schemathesis (`unsupported_method`): a routed path asked with another method answered 404
/// `no route`; it is 405 `method_not_allowed` with an `Allow` header naming the routed methods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_path_asked_with_another_method_is_405_with_allow() {
    let app = spawn_app(&[]).await;
    let id = "00000000-0000-4000-8000-000000000000";
    for (method, path, allow) in [
        ("TRACE", "/events".to_string(), "POST"),
        ("PUT", format!("/webhook/{id}"), "GET, PATCH, DELETE"),
        ("GET", format!("/webhook/{id}/test"), "POST"),
        ("DELETE", "/sync-job".to_string(), "POST, GET"),
        ("POST", "/health/live".to_string(), "GET"),
        ("PATCH", "/api/bulk/2.0/syncs/7".to_string(), "GET"),
    ] {
        let resp = app
            .http
            .request(method.parse().unwrap(), format!("{}{path}", app.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        assert_eq!(resp.headers()["allow"], allow, "{method} {path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["type"], "method_not_allowed", "{body}");
        assert_eq!(
            body["detail"]["allowed"],
            json!(allow.split(", ").collect::<Vec<_>>()),
            "{body}"
        );
    }
    // A path no route has is still 404, and a token is still needed before either.
    let (s, b) = app.get("/webhooks").await;
    assert_eq!(s, 404, "{b}");
    assert_eq!(b["type"], "not_found");
    let resp = app.http.put(format!("{}/events", app.base)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

/// schemathesis (`positive_data_acceptance`): `GET /deliveries` shows deliveries with status
/// `dropped` (a stopped run's queued events) but refused `status=dropped` as a filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_can_be_filtered_by_every_status_they_show() {
    let app = spawn_app(&[]).await;
    for status in ["pending", "queued", "delivered", "dead", "dropped"] {
        let (s, b) = app.get(&format!("/deliveries?status={status}")).await;
        assert_eq!(s, 200, "{status}: {b}");
        assert_eq!(b["results"], json!([]));
    }
    let (s, b) = app.get("/deliveries?status=gone").await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["detail"]["field"], "status");
    assert!(b["detail"]["reason"].as_str().unwrap().contains("dropped"), "{b}");
}

/// schemathesis (`positive_data_acceptance`): `POST /dead-letters/replay` refused `"limit": 858.0`,
/// an integer in JSON Schema's sense; integral numbers are accepted, fractions still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_limit_accepts_any_integral_json_number() {
    let app = spawn_app(&[]).await;
    for limit in [json!(5), json!(5.0), json!(1e3)] {
        let (s, b) = app
            .post("/dead-letters/replay", json!({"reason": "x", "limit": limit}))
            .await;
        assert_eq!(s, 202, "{limit}: {b}");
        assert_eq!(b["replayed"], 0, "{b}");
    }
    for limit in [
        json!(5.5),
        json!("5"),
        json!(0),
        json!(1e5),
        json!(18446744073709551615u64),
    ] {
        let (s, b) = app
            .post("/dead-letters/replay", json!({"reason": "x", "limit": limit}))
            .await;
        assert_eq!(s, 400, "{limit}: {b}");
        assert_eq!(b["detail"]["field"], "limit", "{b}");
    }
}
