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

/// Send events given as JSON text, unchanged, the bus's way: `POST /events` with them as the
/// batch's items (202), or each produced as a message keyed by `key`.
async fn send_text(h: &Harness, key: &str, events: &[String]) {
    match h.bus {
        Bus::Embedded => {
            let body = format!(r#"{{"events":[{}]}}"#, events.join(","));
            let r = h
                .api()
                .req(Method::POST, "/events")
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        }
        Bus::Kafka => {
            let k = h.kafka();
            let msgs: Vec<(Option<String>, Vec<u8>)> = events
                .iter()
                .map(|e| (Some(key.to_string()), e.clone().into_bytes()))
                .collect();
            k.broker.produce(&k.topics.events, &msgs).await;
        }
    }
}

/// The bytes of a delivery body's `payload` (the body is `{"id","event","payload",
/// "environment_id",…}` in that order).
fn payload_bytes(r: &Received) -> String {
    let body = std::str::from_utf8(&r.body).unwrap();
    let from = body.find(r#","payload":"#).unwrap() + r#","payload":"#.len();
    let to = body.rfind(r#","environment_id":"#).unwrap();
    body[from..to].to_string()
}

/// What producers send: numbers no float holds, negative zero, an exponent, a repeated key,
/// keys out of order, whitespace (inside a string too).
const PAYLOAD_SENT: &str = "{ \"big\": 123456789012345678901234567890, \"neg\": -0, \"exp\": 1E2,\n  \
    \"dup\": 1, \"dup\": 2, \"z\": {\"b\": 1.50, \"a\": \"x y\\n\"} }";
/// What receivers get: the same bytes, whitespace outside strings aside (the body is compact).
const PAYLOAD_GOT: &str =
    r#"{"big":123456789012345678901234567890,"neg":-0,"exp":1E2,"dup":1,"dup":2,"z":{"b":1.50,"a":"x y\n"}}"#;

// Finding: the payload was not passed through untouched (CONTRACT §1):
// 123456789012345678901234567890 arrived as 1.2345678901234568e+29, -0 as -0.0, 1E2 as 100.0,
// repeated keys collapsed. Now its bytes go through as given: delivered, replayed from a dead
// letter, and in a run's `completed` (whose payload gets the run's counts added).
both_buses!(the_payload_reaches_the_receiver_byte_for_byte, |bus| async move {
    let rx = Receiver::start().await;
    let mut h = Harness::start(bus, &[]).await;
    let (wid, secret) = h.api().webhook(&rx.url("/hook"), &[]).await;
    let text = |id: &str, event: &str, run: Option<&str>, payload: &str| {
        let run = run.map(|r| format!(r#","sync_job_run_id":"{r}""#)).unwrap_or_default();
        format!(r#"{{"id":"{id}","event":"{event}","webhook_id":"{wid}"{run},"payload":{payload}}}"#)
    };
    send_text(&h, "k", &[text("p1", "record:created", None, PAYLOAD_SENT)]).await;
    let got = rx.wait_for(WAIT, "p1", |g| g.len() == 1).await;
    assert_eq!(payload_bytes(&got[0]), PAYLOAD_GOT);
    let verifier = standardwebhooks::Webhook::new(&secret).unwrap();
    verifier
        .verify(&got[0].body, &got[0].header_map())
        .expect("signature verifies");

    // Refused (webhook disabled), dead-lettered, replayed once the webhook is active again.
    let set_active = |on: bool| {
        let path = format!("/webhook/{wid}");
        let api = h.api();
        async move {
            let (s, b) = api.call(Method::PATCH, &path, Some(json!({"is_active": on}))).await;
            assert_eq!(s, 200, "{b}");
        }
    };
    set_active(false).await;
    send_text(&h, "k", &[text("p2", "record:created", None, PAYLOAD_SENT)]).await;
    let dl = wait_dead_letters(h.api(), "event_id=p2", 1).await;
    set_active(true).await;
    let (s, b) = h
        .api()
        .post("/dead-letters/replay", json!({"ids": [dl[0]["id"]]}))
        .await;
    assert_eq!(s, 202, "{b}");
    let got = rx.wait_for(WAIT, "p2", |g| g.len() == 2).await;
    assert_eq!(got[1].header("webhook-id"), "p2");
    assert_eq!(payload_bytes(&got[1]), PAYLOAD_GOT);

    // A run's `completed` gets the run's counts added to its payload; the rest stays as sent.
    let run = new_run(h.api(), &wid).await;
    let started = text("p3", "sync_job_run:started", Some(&run), "{}");
    let completed = text("p4", "sync_job_run:completed", Some(&run), PAYLOAD_SENT);
    send_text(&h, &run, &[started, completed]).await;
    let got = rx
        .wait_for(WAIT, "completed", |g| has(g, "sync_job_run:completed"))
        .await;
    let done = got.iter().find(|r| r.header("webhook-id") == "p4").unwrap();
    let p = payload_bytes(done);
    let head = &PAYLOAD_GOT[..PAYLOAD_GOT.len() - 1];
    assert!(p.starts_with(head) && p.len() > PAYLOAD_GOT.len(), "{p}");
    verifier
        .verify(&done.body, &done.header_map())
        .expect("signature verifies");
    h.stop().await;
});

/// Keys for `store.encryption_key` (base64 of 32 bytes).
const K1: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
const K2: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

/// Where a test's store lives across restarts of the relay.
struct StoreAt {
    kind: &'static str,
    /// SQLite: the database file, in folders the relay creates.
    db: std::path::PathBuf,
    /// PostgreSQL: the database's URL.
    url: String,
    _dir: tempfile::TempDir,
}

impl StoreAt {
    async fn new(kind: &'static str) -> StoreAt {
        let dir = tempfile::tempdir().unwrap();
        let url = if kind == "postgres" {
            tokio::task::spawn_blocking(postgres::database).await.unwrap()
        } else {
            String::new()
        };
        StoreAt {
            kind,
            db: dir.path().join("new/sub/syncrelay.db"),
            url,
            _dir: dir,
        }
    }

    fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = vec![("SYNCRELAY__STORE__PATH".to_string(), self.db.display().to_string())];
        if self.kind == "postgres" {
            env.push(("SYNCRELAY__STORE__KIND".into(), "postgres".into()));
            env.push(("SYNCRELAY__STORE__URL".into(), self.url.clone()));
        }
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    async fn start(&self, extra: &[(&str, &str)]) -> TestApp {
        spawn_app_with(&[], self.env(extra)).await
    }

    /// Everything the store holds about secrets, as stored: the SQLite files' bytes (database,
    /// -wal), or PostgreSQL's webhook secret columns and kv values.
    async fn raw(&self) -> String {
        if self.kind == "postgres" {
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            let rows: Vec<String> = sqlx::query_scalar(
                "SELECT secret || ' ' || coalesce(previous_secret, '') FROM webhooks UNION ALL SELECT value FROM kv",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            return rows.join("\n");
        }
        let mut all = Vec::new();
        for suffix in ["", "-wal"] {
            let mut p = self.db.as_os_str().to_owned();
            p.push(suffix);
            all.extend(std::fs::read(p).unwrap_or_default());
        }
        String::from_utf8_lossy(&all).into_owned()
    }
}

/// Send a `record:created` event to webhook `wid` and check its delivery verifies with
/// `secret` (Standard Webhooks' reference verifier).
async fn delivers_signed(app: &TestApp, rx: &Receiver, wid: &str, id: &str, secret: &str) {
    app.send_events(vec![event(id, wid, None, json!({"n": 1}))]).await;
    let got = rx
        .wait_for(WAIT, id, |g| g.iter().any(|r| r.header("webhook-id") == id))
        .await;
    let r = got.iter().find(|r| r.header("webhook-id") == id).unwrap();
    standardwebhooks::Webhook::new(secret)
        .unwrap()
        .verify(&r.body, &r.header_map())
        .expect("the delivery verifies with the webhook's secret");
}

// Finding: secrets (webhook, previous, callback) were stored in plaintext and the database file
// was created world-readable. Now they are sealed with `store.encryption_key`, rows from before
// are re-sealed at start, a rotated key keeps them readable (`store.previous_encryption_keys`),
// and the SQLite folder and files are owner-only.
both_stores!(
    secrets_are_encrypted_at_rest_and_survive_key_rotation,
    |kind: &'static str| async move {
        let at = StoreAt::new(kind).await;
        let rx = Receiver::start().await;

        // Without a key (as before): the secret is in the store as it is, which the check sees.
        let mut app = at.start(&[]).await;
        let (wid, s1) = app.webhook(&rx.url("/hook"), &[]).await;
        app.stop().await;
        assert!(at.raw().await.contains(&s1), "the check finds a plaintext secret");

        // With a key: the old row is re-sealed at start; a rotation's new and previous secrets and
        // the callback secret are stored sealed; deliveries verify.
        let mut app = at.start(&[("SYNCRELAY__STORE__ENCRYPTION_KEY", K1)]).await;
        if kind == "sqlite" {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            let sub = at.db.parent().unwrap();
            assert_eq!(mode(sub), 0o700, "data folder");
            assert_eq!(
                mode(sub.parent().unwrap()),
                0o700,
                "data folder's parent the relay created"
            );
            for suffix in ["", "-wal", "-shm"] {
                let mut p = at.db.as_os_str().to_owned();
                p.push(suffix);
                assert_eq!(mode(std::path::Path::new(&p)), 0o600, "syncrelay.db{suffix}");
            }
        }
        let (s, rotated) = app.post(&format!("/webhook/{wid}/rotate-secret"), json!({})).await;
        assert_eq!(s, 200, "{rotated}");
        let s2 = rotated["secret"].as_str().unwrap().to_string();
        delivers_signed(&app, &rx, &wid, "k1", &s2).await;
        app.stop().await;
        let raw = at.raw().await;
        assert!(!raw.contains(&s1) && !raw.contains(&s2), "no secret in the store");
        assert!(!raw.contains("whsec_"), "the callback secret is sealed too");
        if kind == "postgres" {
            assert_eq!(raw.matches("enc:v1:").count(), 3, "{raw}");
        }

        // Key rotation: the new key, the old one still readable; re-sealed at start.
        let both = format!("[\"{K1}\"]");
        let mut app = at
            .start(&[
                ("SYNCRELAY__STORE__ENCRYPTION_KEY", K2),
                ("SYNCRELAY__STORE__PREVIOUS_ENCRYPTION_KEYS", &both),
            ])
            .await;
        delivers_signed(&app, &rx, &wid, "k2", &s2).await;
        app.stop().await;
        // The old key is no longer needed.
        let mut app = at.start(&[("SYNCRELAY__STORE__ENCRYPTION_KEY", K2)]).await;
        delivers_signed(&app, &rx, &wid, "k3", &s2).await;
        let (s, w) = app.get(&format!("/webhook/{wid}")).await;
        assert_eq!(s, 200, "{w}");
        assert!(
            w["previous_secret_expires_at"].is_string(),
            "the previous secret still reads: {w}"
        );
        app.stop().await;
        let raw = at.raw().await;
        assert!(!raw.contains(&s1) && !raw.contains(&s2) && !raw.contains("whsec_"));

        // The wrong key: the start fails, naming the keys to give, never quoting a secret.
        let settings = syncrelay::config::Settings::load(
            None,
            test_env(at.db.parent().unwrap(), &[])
                .into_iter()
                .chain(at.env(&[("SYNCRELAY__STORE__ENCRYPTION_KEY", K1)]))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let err = match syncrelay::Application::build(settings).await {
            Ok(_) => panic!("the relay started with a key that opens nothing"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("store.previous_encryption_keys"), "{err}");
        assert!(
            !err.contains(K1) && !err.contains(K2) && !err.contains("whsec_"),
            "{err}"
        );
    }
);

/// Deeply nested JSON is refused with a typed 400 (JSON is read at most 128 levels deep), never
/// a crash or a 5xx, in the payload as anywhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_is_a_typed_400() {
    let app = spawn_app(&[]).await;
    let wid = uuid::Uuid::new_v4();
    let deep = format!("{}1{}", "[".repeat(20_000), "]".repeat(20_000));
    for body in [
        format!(r#"{{"id":"e","event":"a:b","webhook_id":"{wid}","payload":{{"x":{deep}}}}}"#),
        format!(r#"{{"events":[{{"id":"e","event":"a:b","webhook_id":"{wid}","payload":{{"x":{deep}}}}}]}}"#),
        format!(r#"{{"target_url":"https://example.com/","description":{deep}}}"#),
    ] {
        let path = if body.contains("target_url") {
            "/webhook"
        } else {
            "/events"
        };
        let r = app
            .req(Method::POST, path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let b: Value = r.json().await.unwrap();
        assert_eq!((status, &b["type"]), (400, &json!("bad_request")), "{path}: {b}");
    }
    // Just within the depth limit is fine.
    let ok = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    let (s, b) = app
        .post(
            "/events",
            serde_json::from_str(&format!(
                r#"{{"id":"e2","event":"a:b","webhook_id":"{wid}","payload":{{"x":{ok}}}}}"#
            ))
            .unwrap(),
        )
        .await;
    assert_eq!(s, 202, "{b}");
}
