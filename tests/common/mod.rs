//! Test helpers: a real HTTP receiver that records what it gets and answers from a script, and
//! syncrelay itself, in-process (`spawn_app`, port 0) or as the real binary (`RelayProcess`).
#![allow(dead_code)]

pub mod broker;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};

pub const TOKEN: &str = "test-token-7b1e";

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// The status the receiver answered with.
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
    pub fn header_map(&self) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in &self.headers {
            h.insert(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }
}

/// What the receiver answers: status, extra headers, and a delay before answering.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            delay: Duration::ZERO,
        }
    }
    pub fn delayed(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// Decides the reply from the request and how many requests with the same `webhook-id` came
/// before it (0 for the first).
pub type Script = Arc<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

#[derive(Clone)]
pub struct Receiver {
    pub port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    /// Requests per `webhook-id` so far.
    counts: Arc<Mutex<HashMap<String, usize>>>,
    script: Arc<Mutex<Script>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::with_script(Arc::new(|_, _| Reply::status(200))).await
    }

    pub async fn with_script(script: Script) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let script = Arc::new(Mutex::new(script));
        let (g, s, c) = (got.clone(), script.clone(), counts.clone());
        let server = HttpServer::new(move || {
            let (g, s, c) = (g.clone(), s.clone(), c.clone());
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let (g, s, c) = (g.clone(), s.clone(), c.clone());
                async move {
                    let r = Received {
                        path: req.path().to_string(),
                        headers: req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect(),
                        body: body.to_vec(),
                        at: Instant::now(),
                        status: 0,
                    };
                    let script = s.lock().unwrap().clone();
                    let reply = {
                        let mut g = g.lock().unwrap();
                        let id = r.header("webhook-id").to_string();
                        let seen = {
                            let mut c = c.lock().unwrap();
                            let n = c.entry(id).or_insert(0);
                            *n += 1;
                            *n - 1
                        };
                        let reply = script(&r, seen);
                        g.push(Received {
                            status: reply.status,
                            ..r
                        });
                        reply
                    };
                    if !reply.delay.is_zero() {
                        tokio::time::sleep(reply.delay).await;
                    }
                    let mut resp = HttpResponse::build(actix_web::http::StatusCode::from_u16(reply.status).unwrap());
                    for (k, v) in &reply.headers {
                        resp.insert_header((k.as_str(), v.as_str()));
                    }
                    resp.body("receiver says hi")
                }
            }))
        })
        .workers(2)
        .max_connections(100_000)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        tokio::spawn(server);
        Receiver {
            port,
            got,
            counts,
            script,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn set_script(&self, script: Script) {
        *self.script.lock().unwrap() = script;
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Distinct `webhook-id`s answered with a 2xx.
    pub fn delivered_ids(&self) -> std::collections::HashSet<String> {
        self.received()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .map(|r| r.header("webhook-id").to_string())
            .collect()
    }

    /// All requests to `path`.
    pub fn on(&self, path: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.path == path).collect()
    }

    /// Wait until `pred` holds over what was received, or panic after `timeout`.
    pub async fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let until = Instant::now() + timeout;
        loop {
            let got = self.received();
            if pred(&got) {
                return got;
            }
            if Instant::now() > until {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; received {} requests",
                    got.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Settings for tests: loopback allowed, a token, a fresh data folder, port 0, fast retries.
pub fn test_env(data: &Path, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("SYNCRELAY__HTTP__LISTEN".into(), "127.0.0.1:0".into()),
        ("SYNCRELAY__AUTH__TOKENS".into(), format!("[\"{TOKEN}\"]")),
        (
            "SYNCRELAY__STORE__PATH".into(),
            data.join("syncrelay.db").display().to_string(),
        ),
        ("SYNCRELAY__DELIVERY__ALLOWED_CIDRS".into(), r#"["127.0.0.0/8"]"#.into()),
        ("SYNCRELAY__DELIVERY__RETRY__INITIAL_INTERVAL_MS".into(), "50".into()),
        ("SYNCRELAY__DELIVERY__RETRY__RANDOMIZATION_FACTOR".into(), "0".into()),
        ("SYNCRELAY__DELIVERY__POLL_INTERVAL_MS".into(), "100".into()),
        ("SYNCRELAY__HTTP__WORKERS".into(), "2".into()),
    ];
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub data: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app(extra: &[(&str, &str)]) -> TestApp {
    spawn_app_with(extra, Vec::new()).await
}

/// `spawn_app` with more variables (owned), e.g. a broker's settings.
pub async fn spawn_app_with(extra: &[(&str, &str)], more: Vec<(String, String)>) -> TestApp {
    // RUST_LOG=syncrelay=debug shows the relay's logs in a failing test's output.
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let data = tempfile::tempdir().unwrap();
    let mut env = test_env(data.path(), extra);
    env.extend(more);
    let settings = syncrelay::config::Settings::load(None, env).expect("test settings");
    let app = syncrelay::Application::build(settings).await.expect("app builds");
    let base = format!("http://127.0.0.1:{}", app.port());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        base,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        data,
        stop: Some(tx),
        task: Some(task),
    }
}

impl TestApp {
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// API calls, shared by the in-process app and the binary.
pub trait Api {
    fn base(&self) -> &str;
    fn client(&self) -> &reqwest::Client;

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client()
            .request(method, format!("{}{}", self.base(), path))
            .bearer_auth(TOKEN)
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.req(method, path);
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b.to_string());
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// `GET /metrics` (no token needed).
    async fn metrics_text(&self) -> String {
        self.client()
            .get(format!("{}/metrics", self.base()))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Register a webhook; returns (id, secret).
    async fn webhook(&self, url: &str, event_types: &[&str]) -> (String, String) {
        let (s, b) = self
            .post("/webhook", json!({"target_url": url, "event_types": event_types}))
            .await;
        assert_eq!(s, 201, "{b}");
        (b["id"].as_str().unwrap().into(), b["secret"].as_str().unwrap().into())
    }

    async fn send_events(&self, events: Vec<Value>) -> Value {
        for chunk in events.chunks(500) {
            let (s, b) = self.post("/events", json!({ "events": chunk })).await;
            assert_eq!(s, 202, "{b}");
        }
        Value::Null
    }
}

impl Api for TestApp {
    fn base(&self) -> &str {
        &self.base
    }
    fn client(&self) -> &reqwest::Client {
        &self.http
    }
}

pub fn event(id: &str, webhook_id: &str, run: Option<&str>, payload: Value) -> Value {
    let mut e = json!({"id": id, "event": "sync_job_run:record", "webhook_id": webhook_id, "payload": payload});
    match run {
        Some(r) => e["sync_job_run_id"] = json!(r),
        None => e["event"] = json!("record:created"),
    }
    e
}

pub fn run_id(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// The real binary, with its stderr captured to a file.
pub struct RelayProcess {
    pub child: Child,
    pub base: String,
    pub http: reqwest::Client,
    pub log: PathBuf,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RelayProcess {
    pub async fn start(data: &Path, port: u16, extra: &[(&str, &str)]) -> RelayProcess {
        Self::start_with(data, port, extra, Vec::new()).await
    }

    pub async fn start_with(
        data: &Path,
        port: u16,
        extra: &[(&str, &str)],
        more: Vec<(String, String)>,
    ) -> RelayProcess {
        let listen = format!("127.0.0.1:{port}");
        let mut env = test_env(data, extra);
        env.extend(more);
        env.retain(|(k, _)| k != "SYNCRELAY__HTTP__LISTEN");
        env.push(("SYNCRELAY__HTTP__LISTEN".into(), listen.clone()));
        let log = data.join(format!(
            "relay-{}.log",
            Instant::now().elapsed().as_nanos() ^ rand_suffix()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_syncrelay"))
            .envs(env)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("binary starts");
        let p = RelayProcess {
            child,
            base: format!("http://{listen}"),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            log,
        };
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = p.http.get(format!("{}/health/ready", p.base)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(
                Instant::now() < until,
                "relay did not become ready: {}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn sigterm(&mut self) {
        unsafe_free_sigterm(self.child.id());
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Api for RelayProcess {
    fn base(&self) -> &str {
        &self.base
    }
    fn client(&self) -> &reqwest::Client {
        &self.http
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// SIGTERM through the `kill` command (no unsafe code in tests).
fn unsafe_free_sigterm(pid: u32) {
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
}

/// The value of the first series in Prometheus text that starts with `series` (0 when absent).
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
