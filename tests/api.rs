//! API behaviour: typed errors naming the field, authentication, limits, the SSRF guard, and
//! that bad input never blocks good events behind it.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

fn assert_typed(status: u16, body: &Value, want_status: u16, want_type: &str, field: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["type"], want_type, "{body}");
    assert!(body["message"].is_string(), "{body}");
    if let Some(f) = field {
        assert_eq!(body["detail"]["field"], f, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_token_are_refused_with_a_typed_error() {
    let app = spawn_app(&[]).await;
    for auth in [None, Some("Bearer wrong"), Some("Basic dGVzdA==")] {
        let mut r = app.http.get(format!("{}/webhook", app.base));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap();
        assert_typed(status, &body, 401, "unauthenticated", None);
    }
    // Health and metrics need no token.
    for p in ["/health/live", "/health/ready", "/metrics"] {
        assert_eq!(
            app.http.get(format!("{}{p}", app.base)).send().await.unwrap().status(),
            200,
            "{p}"
        );
    }
    let (s, b) = app.get("/nope").await;
    assert_typed(s, &b, 404, "not_found", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_registration_validates_and_refuses_non_global_targets() {
    let app = spawn_app(&[("SYNCRELAY__DELIVERY__ALLOWED_CIDRS", "[]")]).await;
    let cases = [
        (json!({}), "target_url"),
        (json!({"target_url": 5}), "target_url"),
        (json!({"target_url": "not a url"}), "target_url"),
        (json!({"target_url": "ftp://example.com/x"}), "target_url"),
        (
            json!({"target_url": "http://169.254.169.254/latest/meta-data"}),
            "target_url",
        ),
        (json!({"target_url": "http://10.0.0.1/hook"}), "target_url"),
        (json!({"target_url": "http://127.0.0.1:9/hook"}), "target_url"),
        (json!({"target_url": "http://[::1]/hook"}), "target_url"),
        (json!({"target_url": "http://localhost/hook"}), "target_url"),
        (json!({"target_url": "http://user:pw@93.184.216.34/"}), "target_url"),
        (
            json!({"target_url": "https://93.184.216.34/", "event_types": ["ok:x", "Bad Name"]}),
            "event_types[1]",
        ),
        (
            json!({"target_url": "https://93.184.216.34/", "secret": "plain"}),
            "secret",
        ),
        (
            json!({"target_url": "https://93.184.216.34/", "surprise": 1}),
            "surprise",
        ),
    ];
    for (body, field) in cases {
        let (s, b) = app.post("/webhook", body.clone()).await;
        assert_typed(s, &b, 400, "bad_request", Some(field));
    }
    // validate_only validates without creating.
    let (s, b) = app
        .post(
            "/webhook",
            json!({"target_url": "https://93.184.216.34/hook", "validate_only": true}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (_, list) = app.get("/webhook").await;
    assert!(list["results"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_get_typed_errors_or_dead_letters_and_good_events_still_flow() {
    let rx = Receiver::start().await;
    let app = spawn_app(&[("SYNCRELAY__EVENTS__MAX_EVENT_BYTES", "2048")]).await;
    let (wid, _) = app.webhook(&rx.url("/good"), &[]).await;
    let run = run_id(1);
    let good = |n: usize| event(&format!("good{n}"), &wid, Some(&run), json!({"n": n}));

    // Malformed: not JSON, wrong shapes; each names the field, nothing is queued.
    let (s, b) = app.call(reqwest::Method::POST, "/events", None).await;
    assert_typed(s, &b, 400, "bad_request", None);
    let resp = app
        .req(reqwest::Method::POST, "/events")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let (s, b) = app
        .post(
            "/events",
            json!({"events": [good(0), {"id": "x", "event": "a:b", "webhook_id": wid}]}),
        )
        .await;
    assert_typed(s, &b, 400, "bad_request", Some("events[1].payload"));
    let (s, b) = app
        .post(
            "/events",
            json!({"id": "has space", "event": "a:b", "webhook_id": wid, "payload": {}}),
        )
        .await;
    assert_typed(s, &b, 400, "bad_request", Some("id"));
    let (s, b) = app.post("/events", json!({"events": "nope"})).await;
    assert_typed(s, &b, 400, "bad_request", Some("events"));
    let (s, b) = app.post("/events", json!({"events": []})).await;
    assert_typed(s, &b, 400, "bad_request", Some("events"));

    // Over the size limit: per event, and for the whole body.
    let big = event("big", &wid, Some(&run), json!({"blob": "x".repeat(4096)}));
    let (s, b) = app.post("/events", json!({"events": [good(1), big]})).await;
    assert_typed(s, &b, 413, "request_entity_too_large", Some("events[1]"));
    assert_eq!(b["max_bytes"], 2048);
    let huge = "x".repeat(5 * 1024 * 1024);
    let resp = app
        .req(reqwest::Method::POST, "/events")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["type"], "request_entity_too_large");

    // A callback URL on a non-global address is refused by name.
    let mut cb = good(2);
    cb["callback_url"] = json!("http://10.0.0.1/cb");
    let (s, b) = app.post("/events", json!({"events": [cb]})).await;
    assert_typed(s, &b, 400, "bad_request", Some("events[0].callback_url"));
    let mut cb = good(2);
    cb["callback_url"] = json!("http://169.254.169.254/latest");
    let (s, b) = app.post("/events", cb).await;
    assert_typed(s, &b, 400, "bad_request", Some("callback_url"));

    // An unknown webhook is accepted and dead-lettered with its reason; the good one flows.
    let unknown = "5b6c1a52-0000-4000-8000-000000000000";
    let (s, b) = app
        .post(
            "/events",
            json!({"events": [event("lost", unknown, Some(&run), json!({})), good(3)]}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["events"][0]["status"], "dead_lettered");
    assert_eq!(b["events"][0]["reason"], "unknown_webhook");
    assert_eq!(b["events"][1]["status"], "queued");
    let got = rx
        .wait_for(Duration::from_secs(10), "good3", |g| {
            g.iter().any(|r| r.header("webhook-id") == "good3")
        })
        .await;
    // None of the refused events reached the receiver.
    let ids: Vec<_> = got.iter().map(|r| r.header("webhook-id").to_string()).collect();
    assert_eq!(ids, vec!["good3"]);
    let (_, dl) = app.get("/dead-letters?reason=unknown_webhook").await;
    assert_eq!(dl["results"][0]["event_id"], "lost");
    assert_eq!(dl["results"][0]["event_body"]["id"], "lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_host_name_is_refused_when_given_and_never_dialled() {
    // Nothing is allowed here: `localhost` is refused when the event is given (CONTRACT §3), not
    // only at connect time. Other names that resolve to a blocked address are dropped by the
    // guarded resolver when dialled (`delivery::client` unit tests).
    let rx = Receiver::start().await;
    let app = spawn_app(&[("SYNCRELAY__DELIVERY__ALLOWED_CIDRS", "[]")]).await;
    let unknown = "5b6c1a52-0000-4000-8000-000000000001";
    let mut e = event("dns1", unknown, None, json!({}));
    e["callback_url"] = json!(format!("http://localhost:{}/cb", rx.port));
    let (s, b) = app.post("/events", e).await;
    assert_typed(s, &b, 400, "bad_request", Some("callback_url"));
    let (_, dl) = app.get("/dead-letters?event_id=dns1").await;
    assert_eq!(dl["results"], json!([]), "nothing was queued");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.received().is_empty(), "the loopback name was never dialled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_with_a_cursor_and_never_show_secrets() {
    let app = spawn_app(&[]).await;
    let mut secrets = Vec::new();
    for i in 0..5 {
        let (_, s) = app.webhook(&format!("http://127.0.0.1:9/{i}"), &[]).await;
        secrets.push(s);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/webhook?limit=2&cursor={c}"),
            None => "/webhook?limit=2".into(),
        };
        let (s, b) = app.get(&path).await;
        assert_eq!(s, 200);
        let text = b.to_string();
        for sec in &secrets {
            assert!(!text.contains(&sec[6..]), "a list response shows a secret");
        }
        for w in b["results"].as_array().unwrap() {
            assert!(w.get("secret").is_none());
            seen.push(w["id"].as_str().unwrap().to_string());
            let (_, one) = app.get(&format!("/webhook/{}", w["id"].as_str().unwrap())).await;
            assert!(one.get("secret").is_none(), "{one}");
        }
        match b["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.into()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    let (s, b) = app.get("/webhook?limit=0").await;
    assert_eq!(s, 400);
    assert_eq!(b["detail"]["field"], "limit");
    let (s, b) = app.get("/webhook?cursor=zzz").await;
    assert_eq!(s, 400);
    assert_eq!(b["detail"]["field"], "cursor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_patch_delete_and_event_type_filters() {
    let rx = Receiver::with_script(Arc::new(|_, _| Reply::status(200))).await;
    let app = spawn_app(&[]).await;
    let (wid, _) = app.webhook(&rx.url("/a"), &["sync_job_run:completed"]).await;
    // Filtered: not subscribed.
    let (_, b) = app
        .post("/events", event("f1", &wid, Some(&run_id(1)), json!({})))
        .await;
    assert_eq!(b["events"][0]["status"], "filtered");
    let (s, w) = app
        .call(
            reqwest::Method::PATCH,
            &format!("/webhook/{wid}"),
            Some(json!({"target_url": rx.url("/b"), "event_types": []})),
        )
        .await;
    assert_eq!(s, 200, "{w}");
    assert_eq!(w["target_url"], rx.url("/b"));
    app.send_events(vec![event("f2", &wid, Some(&run_id(1)), json!({}))])
        .await;
    rx.wait_for(Duration::from_secs(10), "delivery to the new URL", |g| {
        g.iter().any(|r| r.path == "/b")
    })
    .await;
    let (s, b) = app
        .call(
            reqwest::Method::PATCH,
            &format!("/webhook/{wid}"),
            Some(json!({"target_url": "http://10.1.2.3/"})),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["detail"]["field"], "target_url");
    let (s, _) = app
        .call(reqwest::Method::DELETE, &format!("/webhook/{wid}"), None)
        .await;
    assert_eq!(s, 204);
    let (s, b) = app.get(&format!("/webhook/{wid}")).await;
    assert_eq!(s, 404);
    assert_eq!(b["type"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let rx = Receiver::with_script(Arc::new(|_, seen| Reply::status(if seen == 0 { 500 } else { 200 }))).await;
    let app = spawn_app(&[]).await;
    let (wid, _) = app.webhook(&rx.url("/m"), &[]).await;
    app.send_events((0..5).map(|i| event(&format!("m{i}"), &wid, None, json!({}))).collect())
        .await;
    rx.wait_for(Duration::from_secs(10), "10 attempts", |g| g.len() >= 10)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = app.metrics().await;
    assert_eq!(m.value("syncrelay_events_ingested_total", &[("source", "api")]), 5.0);
    let webhook = ("kind", "webhook");
    assert_eq!(
        m.value("syncrelay_deliveries_total", &[webhook, ("outcome", "delivered")]),
        5.0
    );
    assert_eq!(m.value("syncrelay_delivery_retries_total", &[webhook]), 5.0);
    assert_eq!(
        m.value("syncrelay_delivery_attempts_total", &[webhook, ("result", "http_5xx")]),
        5.0
    );
    assert_eq!(
        m.value("syncrelay_delivery_attempts_total", &[webhook, ("result", "success")]),
        5.0
    );
    assert_eq!(m.value("syncrelay_deliveries_in_flight", &[]), 0.0);
    let posted = [("method", "POST"), ("route", "/events"), ("status_class", "2xx")];
    assert!(m.value("syncrelay_http_requests_total", &posted) >= 1.0);
    assert_eq!(m.value("syncrelay_delivery_latency_seconds_count", &[]), 5.0);
}
