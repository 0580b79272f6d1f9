//! Regression tests for the findings of the hostile-input probe (issue 13): each failed before
//! its fix. Over real HTTP against the in-process relay, or the real binary where the finding is
//! about the process (logs, start-up errors).

mod support;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;

fn assert_field(status: u16, body: &Value, want_status: u16, want_type: &str, field: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["type"], want_type, "{body}");
    assert_eq!(body["detail"]["field"], field, "{body}");
}

/// `n` resources, each depending on the one before it.
fn chain_job(n: usize) -> Value {
    let resources: Vec<Value> = (0..n)
        .map(|i| {
            let mut r = json!({"resource": format!("api/r{i}"), "method": "list"});
            if i > 0 {
                r["depends_on"] = json!(format!("api/r{}", i - 1));
            }
            if i == n - 1 {
                r["query"] = json!({"first": "{{resources.api.r0.id}}"});
            }
            r
        })
        .collect();
    json!({"integration_name": "chain", "resources": resources})
}

/// Finding: a long linear `depends_on` chain took O(n³) time and O(n²) memory on the API worker
/// (5,000 resources: 18 s, 911 MiB). Now at most 500 resources, validated in linear time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_job_resource_count_is_capped_and_long_chains_validate() {
    let app = spawn_app(&[]).await;
    let mut big = chain_job(5_000);
    big["validate_only"] = json!(true);
    let (s, b) = app.post("/sync-job", big).await;
    assert_field(s, &b, 400, "bad_request", "resources");
    let (s, b) = app.post("/sync-job", chain_job(5_000)).await;
    assert_field(s, &b, 400, "bad_request", "resources");

    let mut ok = chain_job(500);
    ok["validate_only"] = json!(true);
    let (s, b) = app.post("/sync-job", ok).await;
    assert_eq!(s, 200, "{b}");
    let (s, job) = app.post("/sync-job", chain_job(500)).await;
    assert_eq!(s, 201, "{job}");
    let id = job["id"].as_str().unwrap();

    // PATCH is held to the same cap.
    let (s, b) = app
        .call(
            Method::PATCH,
            &format!("/sync-job/{id}"),
            Some(json!({"resources": chain_job(501)["resources"]})),
        )
        .await;
    assert_field(s, &b, 400, "bad_request", "resources");
    let (s, b) = app
        .call(
            Method::PATCH,
            &format!("/sync-job/{id}"),
            Some(json!({"resources": chain_job(499)["resources"]})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["resources"].as_array().unwrap().len(), 499);
}

fn http_series(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| l.starts_with("syncrelay_http_requests_total{"))
        .count()
}

/// Finding: every made-up HTTP method added a `/metrics` series (the label was the raw method).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_http_methods_share_one_metrics_series() {
    let app = spawn_app(&[]).await;
    // One unknown method first, so the `other` series exists before counting.
    let m = Method::from_bytes(b"PROBE").unwrap();
    app.http
        .request(m, format!("{}/webhook", app.base))
        .send()
        .await
        .unwrap();
    let before = http_series(&app.metrics_text().await);
    for i in 0..50 {
        let m = Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let r = app
            .http
            .request(m, format!("{}/webhook", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let text = app.metrics_text().await;
    assert!(http_series(&text) <= before + 1, "{text}");
    assert!(!text.contains("MADEUP"), "{text}");
    assert!(text.contains(r#"method="other""#), "{text}");
}

/// Finding: a client that sent its headers and then trickled the body held its connection (and
/// a file descriptor) forever. Now it is answered 408 and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_body_is_cut_off_with_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(&[("SYNCRELAY__HTTP__BODY_READ_TIMEOUT_MS", "500")]).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "POST /webhook HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: 10000\r\n\r\n{{"
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    // One byte every 100 ms, for as long as the server takes it (at most 10 s).
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if wr.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(8), rd.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(read.is_ok(), "connection still open after 8 s; got {text:?}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    trickle.abort();
}

/// Every way a delivery target is given: (method, path, body with the URL at `field`).
async fn target_entry_points(app: &TestApp, url: &str) -> Vec<(u16, Value, &'static str)> {
    let mut out = Vec::new();
    let (s, b) = app
        .post("/webhook", json!({"target_url": url, "validate_only": true}))
        .await;
    out.push((s, b, "target_url"));
    let (s, hook) = app
        .post("/webhook", json!({"target_url": "http://93.184.216.34/hook"}))
        .await;
    assert_eq!(s, 201, "{hook}");
    let (s, b) = app
        .call(
            Method::PATCH,
            &format!("/webhook/{}", hook["id"].as_str().unwrap()),
            Some(json!({"target_url": url})),
        )
        .await;
    out.push((s, b, "target_url"));
    let (s, b) = app
        .post(
            "/events",
            json!({"id": "e1", "event": "x:y", "webhook_id": hook["id"], "payload": {},
                   "callback_url": url, "validate_only": true}),
        )
        .await;
    out.push((s, b, "callback_url"));
    let (s, job) = app
        .post(
            "/sync-job",
            json!({"integration_name": "x", "resources": [{"resource": "x", "method": "list"}]}),
        )
        .await;
    assert_eq!(s, 201, "{job}");
    let (s, b) = app
        .post(
            "/sync-job-run",
            json!({"sync_job_id": job["id"], "integrated_account_id": run_id(1),
                   "daemon_group_key": "g", "callback_url": url, "validate_only": true}),
        )
        .await;
    out.push((s, b, "callback_url"));
    let (s, b) = app
        .post(
            "/api/bulk/2.0/syncs",
            json!({"syncedInstanceUri": "/contacts/exports/1", "callbackURL": url, "validate_only": true}),
        )
        .await;
    out.push((s, b, "callbackURL"));
    out
}

/// Finding: the SSRF guard accepted 6to4 (without looking at the embedded IPv4), Teredo, SIIT,
/// site-local, discard-only, benchmarking and the new documentation block, on every entry
/// point, with or without an allow-list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_special_purpose_targets_are_refused_on_every_entry_point() {
    for allowed in [r#"["127.0.0.0/8"]"#, "[]"] {
        let app = spawn_app(&[("SYNCRELAY__DELIVERY__ALLOWED_CIDRS", allowed)]).await;
        for addr in [
            "2002:a9fe:a9fe::1",
            "2002:a00:1::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::ffff:0:a9fe:a9fe",
            "fec0::1",
            "100::1",
            "2001:2::1",
            "3fff::1",
            "::a9fe:a9fe",
        ] {
            let url = format!("http://[{addr}]/hook");
            for (s, b, field) in target_entry_points(&app, &url).await {
                assert_field(s, &b, 400, "bad_request", field);
            }
        }
        // 6to4 of loopback is refused unless loopback itself is allowed.
        let url = "http://[2002:7f00:1::1]/hook";
        for (s, b, field) in target_entry_points(&app, url).await {
            if allowed == "[]" {
                assert_field(s, &b, 400, "bad_request", field);
            } else {
                assert!(s < 300, "{field}: {s} {b}");
            }
        }
        // A global address in 6to4 form is fine.
        for (s, b, field) in target_entry_points(&app, "http://[2002:808:808::1]/hook").await {
            assert!(s < 300, "{field}: {s} {b}");
        }
    }
}

/// Finding: loopback host names in a target (notably an event's `callback_url`) were accepted
/// and refused only at connect time. Now refused when given, unless loopback is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_host_names_are_refused_when_given() {
    let names = [
        "localhost",
        "LocalHost",
        "foo.localhost",
        "localhost.",
        "LOCALHOST..",
        "\u{ff4c}\u{ff4f}\u{ff43}\u{ff41}\u{ff4c}\u{ff48}\u{ff4f}\u{ff53}\u{ff54}", // full-width
        "localhost\u{3002}",                                                        // ideographic full stop
        "a.b.LOCALHOST",
    ];
    let app = spawn_app(&[("SYNCRELAY__DELIVERY__ALLOWED_CIDRS", "[]")]).await;
    for name in names {
        let url = format!("http://{name}:9/hook");
        for (s, b, field) in target_entry_points(&app, &url).await {
            assert_field(s, &b, 400, "bad_request", field);
        }
    }
    // With loopback allowed, an event's callback URL may name it.
    let app = spawn_app(&[]).await;
    let (_, hook) = app
        .post("/webhook", json!({"target_url": "http://93.184.216.34/hook"}))
        .await;
    for name in names {
        let (s, b) = app
            .post(
                "/events",
                json!({"id": "e1", "event": "x:y", "webhook_id": hook["id"], "payload": {},
                       "callback_url": format!("http://{name}:9/hook"), "validate_only": true}),
            )
            .await;
        assert_eq!(s, 200, "{name}: {b}");
    }
}

/// Finding: the `Bearer` scheme was case-sensitive (only `Bearer ` and `bearer `).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_scheme_is_case_insensitive_and_near_tokens_fail() {
    let app = spawn_app(&[]).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = app
            .http
            .get(format!("{}/webhook", app.base))
            .header("authorization", format!("{scheme} {TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    let near = [
        String::new(),
        TOKEN[..TOKEN.len() - 1].to_string(),
        format!("{TOKEN}x"),
        TOKEN.to_uppercase(),
    ];
    for t in near {
        let r = app
            .http
            .get(format!("{}/webhook", app.base))
            .header("authorization", format!("Bearer {t}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{t:?}");
    }
}

/// Run the binary with `env` until it exits (it must, within 20 s): (exit code, stderr).
fn run_binary(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let data = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .env("SYNCRELAY__HTTP__LISTEN", "127.0.0.1:0")
        .env("SYNCRELAY__STORE__PATH", data.path().join("db").display().to_string())
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > until {
            let _ = child.kill();
            panic!("the binary did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Findings: a malformed `auth.tokens` (a bare string) was echoed in the start-up error; empty
/// tokens were accepted; an unknown key was named twice (`webhooks.x.x`).
#[test]
fn start_up_errors_name_the_key_once_and_never_echo_secrets() {
    let (code, err) = run_binary(&[("SYNCRELAY__AUTH__TOKENS", "hunter2-very-secret")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("auth.tokens"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    let (code, err) = run_binary(&[("SYNCRELAY__AUTH__TOKENS", r#"["good-token",""]"#)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("auth.tokens[1]"), "{err}");

    let (code, err) = run_binary(&[("SYNCRELAY__WEBHOOKS__X", "1")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`webhooks.x`"), "{err}");
    assert!(!err.contains("webhooks.x.x") && !err.contains("field `x`"), "{err}");
}

/// Finding: text logs written to a file or a pipe carried ANSI colour codes.
#[test]
fn text_logs_to_a_pipe_carry_no_colour_codes() {
    use std::io::{BufRead, BufReader};
    let data = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_syncrelay"))
        .env("SYNCRELAY__HTTP__LISTEN", "127.0.0.1:0")
        .env("SYNCRELAY__STORE__PATH", data.path().join("db").display().to_string())
        .env("SYNCRELAY__LOG__FORMAT", "text")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.contains("listening");
        lines.push(line);
        if done || lines.len() > 200 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = lines.join("\n");
    assert!(text.contains("listening"), "{text}");
    assert!(!text.contains('\u{1b}'), "{text:?}");
}

/// Finding: `/events` silently kept the last of repeated keys; other routes refused them but
/// named the field `body`. Now every route answers a typed 400 naming the repeated key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_json_keys_are_refused_by_name_on_every_route() {
    let app = spawn_app(&[]).await;
    let (_, hook) = app
        .post("/webhook", json!({"target_url": "http://93.184.216.34/hook"}))
        .await;
    let hook_id = hook["id"].as_str().unwrap().to_string();
    let (_, job) = app
        .post(
            "/sync-job",
            json!({"integration_name": "x", "resources": [{"resource": "x", "method": "list"}]}),
        )
        .await;
    let job_id = job["id"].as_str().unwrap().to_string();
    let ev = format!(r#""event":"x:y","webhook_id":"{hook_id}","payload":{{}}"#);
    let cases: Vec<(Method, String, String, &str)> = vec![
        (
            Method::POST,
            "/events".into(),
            format!(r#"{{"id":"a","id":"b",{ev}}}"#),
            "id",
        ),
        (
            Method::POST,
            "/events".into(),
            format!(r#"{{"events":[{{"id":"a",{ev}}},{{"id":"b",{ev},"event":"x:z"}}]}}"#),
            "events[1].event",
        ),
        (
            Method::POST,
            "/events".into(),
            format!(r#"{{"events":[{{"id":"a",{ev}}}],"events":[]}}"#),
            "events",
        ),
        (
            Method::POST,
            "/webhook".into(),
            r#"{"target_url":"http://93.184.216.34/a","target_url":"http://93.184.216.34/b"}"#.into(),
            "target_url",
        ),
        (
            Method::PATCH,
            format!("/webhook/{hook_id}"),
            r#"{"is_active":true,"is_active":false}"#.into(),
            "is_active",
        ),
        (
            Method::POST,
            "/sync-job".into(),
            r#"{"integration_name":"x","resources":[{"resource":"x","method":"list","query":{"a":"1","a":"2"}}]}"#
                .into(),
            "resources[0].query.a",
        ),
        (
            Method::PATCH,
            format!("/sync-job/{job_id}"),
            r#"{"args_schema":{"type":"object","type":"object"}}"#.into(),
            "args_schema.type",
        ),
        (
            Method::POST,
            "/sync-job-run".into(),
            format!(
                r#"{{"sync_job_id":"{job_id}","integrated_account_id":"{}","daemon_group_key":"g","args":{{"k":1,"k":2}}}}"#,
                run_id(1)
            ),
            "args.k",
        ),
        (
            Method::POST,
            "/api/bulk/2.0/syncs".into(),
            r#"{"syncedInstanceUri":"/a/1","syncedInstanceUri":"/b/2"}"#.into(),
            "syncedInstanceUri",
        ),
        (
            Method::POST,
            "/dead-letters/replay".into(),
            r#"{"reason":"x","reason":"y"}"#.into(),
            "reason",
        ),
    ];
    for (method, path, body, field) in cases {
        let resp = app
            .req(method.clone(), &path)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let b: Value = resp.json().await.unwrap();
        assert_field(status, &b, 400, "bad_request", field);
        assert!(
            b["message"].as_str().unwrap().starts_with(field),
            "{method} {path} {body}: {b}"
        );
    }
    // A repeated key inside an event's payload belongs to the producer: not refused here.
    let (s, b) = app
        .req(Method::POST, "/events")
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"id":"p1","event":"x:y","webhook_id":"{hook_id}","payload":{{"k":1,"k":2}},"validate_only":true}}"#
        ))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(s, 200, "{:?}", b.text().await);
}

/// Finding: several fields had no length or count limit (`syncedInstanceUri` took NUL and
/// 100 KB, resource names 100 KB, 150,000 `event_types`, an unbounded `description`). Every
/// string and array field now has a documented maximum (CONTRACT §3), refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_limits_are_enforced_by_name() {
    let app = spawn_app(&[]).await;
    let long = |n: usize| "a".repeat(n);
    let target = "http://93.184.216.34/hook";
    let (_, hook) = app.post("/webhook", json!({"target_url": target})).await;
    let hook_id = hook["id"].as_str().unwrap().to_string();
    let (_, job) = app
        .post(
            "/sync-job",
            json!({"integration_name": "x", "resources": [{"resource": "x", "method": "list"}]}),
        )
        .await;
    let job_id = job["id"].as_str().unwrap().to_string();
    let res = |extra: Value| {
        let mut r = json!({"resource": "x", "method": "list"});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        json!({"integration_name": "x", "resources": [r], "validate_only": true})
    };
    let types: Vec<String> = (0..101).map(|i| format!("e{i}:x")).collect();
    let cases: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::POST,
            "/webhook".into(),
            json!({"target_url": target, "description": long(1025)}),
            "description",
        ),
        (
            Method::PATCH,
            format!("/webhook/{hook_id}"),
            json!({"description": long(1025)}),
            "description",
        ),
        (
            Method::POST,
            "/webhook".into(),
            json!({"target_url": target, "event_types": types}),
            "event_types",
        ),
        (
            Method::PATCH,
            format!("/webhook/{hook_id}"),
            json!({"event_types": types}),
            "event_types",
        ),
        (
            Method::POST,
            "/webhook".into(),
            json!({"target_url": format!("http://93.184.216.34/{}", long(2100))}),
            "target_url",
        ),
        (
            Method::POST,
            "/api/bulk/2.0/syncs".into(),
            json!({"syncedInstanceUri": "/contacts/exports/1\u{0}"}),
            "syncedInstanceUri",
        ),
        (
            Method::POST,
            "/api/bulk/2.0/syncs".into(),
            json!({"syncedInstanceUri": format!("/{}", long(100_000))}),
            "syncedInstanceUri",
        ),
        (
            Method::POST,
            "/sync-job".into(),
            res(json!({"resource": long(300)})),
            "resources[0].resource",
        ),
        (
            Method::POST,
            "/sync-job".into(),
            res(json!({"method": long(100)})),
            "resources[0].method",
        ),
        (
            Method::POST,
            "/sync-job".into(),
            res(json!({"id": long(2000)})),
            "resources[0].id",
        ),
        (
            Method::POST,
            "/sync-job".into(),
            res(json!({"query": {"q": long(20_000)}})),
            "resources[0].query",
        ),
        (
            Method::POST,
            "/sync-job".into(),
            json!({"integration_name": long(300), "resources": [{"resource": "x", "method": "list"}]}),
            "integration_name",
        ),
        (
            Method::POST,
            "/sync-job".into(),
            json!({"integration_name": "x", "environment_id": long(300), "resources": [{"resource": "x", "method": "list"}]}),
            "environment_id",
        ),
        (
            Method::POST,
            "/sync-job-run".into(),
            json!({"sync_job_id": job_id, "integrated_account_id": run_id(1), "daemon_group_key": long(300)}),
            "daemon_group_key",
        ),
        (
            Method::POST,
            "/sync-job-run".into(),
            json!({"sync_job_id": job_id, "integrated_account_id": run_id(1), "daemon_group_key": "g",
                   "args": {"a": long(70_000)}}),
            "args",
        ),
        (
            Method::POST,
            "/events".into(),
            json!({"id": "e", "event": "x:y", "webhook_id": hook_id, "payload": {}, "environment_id": long(300)}),
            "environment_id",
        ),
        (
            Method::POST,
            "/events".into(),
            json!({"events": [{"id": "e", "event": "x:y", "webhook_id": hook_id, "payload": {},
                               "callback_url": format!("http://93.184.216.34/{}", long(2100))}]}),
            "events[0].callback_url",
        ),
        (
            Method::POST,
            "/dead-letters/replay".into(),
            json!({"ids": vec!["x"; 10_001]}),
            "ids",
        ),
        (
            Method::POST,
            "/dead-letters/replay".into(),
            json!({"ids": [long(200)]}),
            "ids[0]",
        ),
    ];
    for (method, path, body, field) in cases {
        let (s, b) = app.call(method.clone(), &path, Some(body)).await;
        assert_field(s, &b, 400, "bad_request", field);
    }
    // Just within the limits is fine.
    let (s, b) = app
        .post(
            "/webhook",
            json!({"target_url": target, "description": long(1024), "event_types": &types[..100], "validate_only": true}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = app
        .post(
            "/api/bulk/2.0/syncs",
            json!({"syncedInstanceUri": format!("/{}", long(2047)), "validate_only": true}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = app.get(&format!("/sync-job?integration_name={}", long(300))).await;
    assert_field(s, &b, 400, "bad_request", "integration_name");
}

/// A receiver that answers every request with `200 OK` and the first bytes of a body it never
/// finishes (the connection stays open).
async fn endless_body_receiver() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // Read the request head and its (small) body.
                while let Ok(n) = sock.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                        break;
                    }
                }
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100000\r\n\r\nstarted")
                    .await;
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            });
        }
    });
    port
}

/// Findings: `POST /webhook/{id}/test` ignored `is_active`; reqwest's timeout and the outer one
/// were equal, so a 2xx whose body never ends was recorded as delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sends_refuse_inactive_webhooks_and_an_endless_2xx_body_is_a_timeout() {
    let app = spawn_app(&[("SYNCRELAY__DELIVERY__REQUEST_TIMEOUT_MS", "700")]).await;
    let port = endless_body_receiver().await;
    let (id, _) = app.webhook(&format!("http://127.0.0.1:{port}/hook"), &[]).await;
    for _ in 0..3 {
        let (s, b) = app.post(&format!("/webhook/{id}/test"), json!({})).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["delivered"], false, "{b}");
        assert!(b["attempt"]["error"].as_str().unwrap().contains("timed out"), "{b}");
    }
    let (s, b) = app
        .call(
            Method::PATCH,
            &format!("/webhook/{id}"),
            Some(json!({"is_active": false})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = app.post(&format!("/webhook/{id}/test"), json!({})).await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(b["type"], "conflict", "{b}");
}

/// `http.rate_limit`: per token, answered with the typed `too_many_requests`, `retry_after`
/// and a `Retry-After` header, counted in a metric; health and metrics are not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requests_are_rate_limited_per_token() {
    let tokens = format!(r#"["{TOKEN}","other-token-42"]"#);
    let app = spawn_app(&[
        ("SYNCRELAY__AUTH__TOKENS", &tokens),
        ("SYNCRELAY__HTTP__RATE_LIMIT__PER_SECOND", "0.5"),
        ("SYNCRELAY__HTTP__RATE_LIMIT__BURST", "3"),
    ])
    .await;
    for _ in 0..3 {
        let (s, b) = app.get("/webhook").await;
        assert_eq!(s, 200, "{b}");
    }
    let resp = app.req(Method::GET, "/webhook").send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["type"], "too_many_requests", "{b}");
    assert_eq!(b["retry_after"], retry_after, "{b}");
    // Another token has its own bucket; health and metrics need none.
    let r = app
        .http
        .get(format!("{}/webhook", app.base))
        .bearer_auth("other-token-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for _ in 0..10 {
        let r = app.http.get(format!("{}/health/live", app.base)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(app.metric("syncrelay_http_rate_limited_total", &[]).await, 1.0);
}

/// Found by schemathesis: serde takes a JSON array for a struct whose fields all have defaults,
/// so `POST /webhook/{id}/enable` with `[]` answered 200. Every request body is an object.
#[tokio::test]
async fn array_bodies_are_refused_where_an_object_is_expected() {
    let app = spawn_app(&[]).await;
    let (_, hook) = app
        .post("/webhook", json!({"target_url": "http://93.184.216.34/hook"}))
        .await;
    let hook_id = hook["id"].as_str().unwrap().to_string();
    for (method, path) in [
        (Method::POST, format!("/webhook/{hook_id}/enable")),
        (Method::PATCH, format!("/webhook/{hook_id}")),
        (Method::POST, "/dead-letters/replay".to_string()),
    ] {
        for body in ["[]", "[true]"] {
            let resp = app
                .req(method.clone(), &path)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let b: Value = resp.json().await.unwrap();
            assert_eq!(status, 400, "{method} {path} {body}: {b}");
            assert_eq!(b["type"], "bad_request", "{b}");
        }
    }
    // An empty body still enables (the options are optional).
    let resp = app
        .req(Method::POST, &format!("/webhook/{hook_id}/enable"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// The same hole one level down: a derived struct inside a body took an array, field by field
/// (`"resources": [["api/r0", "list"]]` made a resource, `"destination_attributes": ["c", "o"]`
/// a destination). A struct is an object at any depth; the error names the field.
#[tokio::test]
async fn arrays_are_refused_where_a_nested_object_is_expected() {
    let app = spawn_app(&[]).await;
    let (_, hook) = app
        .post("/webhook", json!({"target_url": "http://93.184.216.34/hook"}))
        .await;
    let hook_id = hook["id"].as_str().unwrap().to_string();
    let (s, b) = app
        .post(
            "/sync-job",
            json!({"integration_name": "crm", "resources": [["crm/contacts", "list"]]}),
        )
        .await;
    assert_field(s, &b, 400, "bad_request", "resources[0]");
    let job = app.sync_job("crm", "crm/contacts").await;
    let source = json!({"object": {"type": "sync_job", "id": job}});
    let sync = |patch: Value| {
        let mut body = json!({
            "source_attributes": source.clone(),
            "destination_attributes": {"connection_id": hook_id.clone(), "object": "contact"},
            "operation": "insert",
            "mappings": [{"from": {"type": "column", "data": "n"}, "to": "n"}],
        });
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (patch, field) in [
        (
            json!({"destination_attributes": [hook_id.clone(), "contact"]}),
            "destination_attributes",
        ),
        (
            json!({"source_attributes": [["sync_job", job.clone()]]}),
            "source_attributes",
        ),
        (
            json!({"mappings": [[{"type": "column", "data": "n"}, "n"]]}),
            "mappings[0]",
        ),
        (
            json!({"mappings": [{"from": ["column", "n"], "to": "n"}]}),
            "mappings[0].from",
        ),
        (json!({"alert_attributes": [["Failure"]]}), "alert_attributes[0]"),
    ] {
        let (s, b) = app.post("/syncs", sync(patch.clone())).await;
        assert_field(s, &b, 400, "bad_request", field);
    }
    // The same bodies with objects are taken.
    let (s, b) = app
        .post("/syncs", sync(json!({"alert_attributes": [{"type": "Failure"}]})))
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = app
        .call(
            Method::PATCH,
            &format!("/webhook/{hook_id}"),
            Some(json!({"overrides": {"retry": [3]}})),
        )
        .await;
    assert_field(s, &b, 400, "bad_request", "overrides.retry");
}

#[tokio::test]
async fn unknown_query_parameters_are_refused_naming_them() {
    let app = spawn_app(&[]).await;
    // A misspelt filter would otherwise be ignored and answer with every delivery.
    for (path, field) in [
        ("/deliveries?stauts=dead", "stauts"),
        ("/deliveries?cursor=&=null", ""),
        ("/dead-letters?status=dead", "status"),
        ("/webhook?limit=2&page=3", "page"),
        ("/health/live?verbose=1", "verbose"),
    ] {
        let (s, b) = app.get(path).await;
        assert_eq!(s, 400, "{path}: {b}");
        assert_eq!(b["type"], "bad_request", "{path}: {b}");
        assert_eq!(b["detail"]["field"], field, "{path}: {b}");
    }
    let (s, b) = app.post("/events?dry_run=1", json!({"events": []})).await;
    assert_eq!((s, b["detail"]["field"].as_str()), (400, Some("dry_run")), "{b}");
    // The documented ones are taken, filters and paging together.
    for path in [
        "/deliveries?status=dead&limit=5",
        "/dead-letters?reason=max_attempts&limit=1",
        "/webhook?limit=2",
        "/syncs?per_page=2&page=1",
        "/health/live",
    ] {
        let (s, b) = app.get(path).await;
        assert_eq!(s, 200, "{path}: {b}");
    }
}
