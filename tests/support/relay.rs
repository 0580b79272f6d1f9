//! syncrelay itself: in-process on port 0 ([`spawn_app`]) or the real binary ([`RelayProcess`]),
//! and the API calls both answer ([`Api`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::metrics::Metrics;
use super::{free_port, TOKEN};

/// The settings every relay in tests and benchmarks gets: a token, a store in `data`, loopback
/// receivers allowed, port 0. Everything else is the relay's default.
pub fn base_env(data: &Path) -> Vec<(String, String)> {
    vec![
        ("SYNCRELAY__HTTP__LISTEN".into(), "127.0.0.1:0".into()),
        ("SYNCRELAY__AUTH__TOKENS".into(), format!("[\"{TOKEN}\"]")),
        (
            "SYNCRELAY__STORE__PATH".into(),
            data.join("syncrelay.db").display().to_string(),
        ),
        ("SYNCRELAY__DELIVERY__ALLOWED_CIDRS".into(), r#"["127.0.0.0/8"]"#.into()),
    ]
}

/// Settings for tests: [`base_env`] plus fast retries without jitter (overload floor 50 ms), a
/// 1 s breaker cool-down, a short poll interval and two HTTP workers; then `extra` (replacing a
/// key given before).
pub fn test_env(data: &Path, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = base_env(data);
    env.extend(
        [
            ("SYNCRELAY__DELIVERY__RETRY__INITIAL_INTERVAL_MS", "50"),
            ("SYNCRELAY__DELIVERY__RETRY__OVERLOAD_FLOOR_MS", "50"),
            ("SYNCRELAY__DELIVERY__BREAKER__COOL_DOWN_MS", "1000"),
            ("SYNCRELAY__DELIVERY__RETRY__RANDOMIZATION_FACTOR", "0"),
            ("SYNCRELAY__DELIVERY__POLL_INTERVAL_MS", "100"),
            ("SYNCRELAY__HTTP__WORKERS", "2"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    for (k, v) in extra {
        set(&mut env, k, v);
    }
    env
}

/// Set `key` in `env`, replacing an earlier value.
pub fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_string(), value.to_string()));
}

/// The relay in this process, on port 0.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub data: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// The relay in this process with [`test_env`] and `extra`.
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
    for (k, v) in more {
        set(&mut env, &k, &v);
    }
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
    /// Stop the relay and wait until it has (consumer closed, queue flushed).
    pub async fn stop(&mut self) {
        self.signal_stop();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Ask the relay to stop without waiting for it.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// API calls, shared by the in-process app and the binary.
#[allow(async_fn_in_trait)]
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

    /// `GET /metrics`, parsed.
    async fn metrics(&self) -> Metrics {
        Metrics::parse(&self.metrics_text().await)
    }

    /// Sum of the series of metric `name` with (at least) `labels`; panics when there is none.
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics().await.value(name, labels)
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

    /// A new sync job of `integration` listing `resource`, made through the API; returns its id.
    async fn sync_job(&self, integration: &str, resource: &str) -> String {
        let (s, job) = self
            .post(
                "/sync-job",
                json!({"integration_name": integration, "resources": [{"resource": resource, "method": "list"}]}),
            )
            .await;
        assert_eq!(s, 201, "{job}");
        job["id"].as_str().unwrap().to_string()
    }

    /// `n` runs of one new sync job (resource `ticketing/tickets`), made through the API and
    /// delivering to `webhook`; returns their ids.
    async fn runs(&self, webhook: &str, n: usize) -> Vec<String> {
        let job = self.sync_job("jira", "ticketing/tickets").await;
        let mut runs = Vec::with_capacity(n);
        for _ in 0..n {
            let (s, run) = self
                .post(
                    "/sync-job-run",
                    json!({"sync_job_id": job, "integrated_account_id": "94801e49-a652-42f9-af14-dd203d7897da",
                           "webhook_id": webhook, "error_handling": "ignore"}),
                )
                .await;
            assert_eq!(s, 201, "{run}");
            runs.push(run["id"].as_str().unwrap().to_string());
        }
        runs
    }

    /// `POST /events`, 500 per request, each answered 202.
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

/// The real binary (`CARGO_BIN_EXE_syncrelay`: the debug build under `cargo test`, the release
/// build under `cargo bench`), with its stderr captured to a file.
pub struct RelayProcess {
    pub child: Child,
    pub base: String,
    pub http: reqwest::Client,
    pub log: PathBuf,
    /// The data folder when the process owns it ([`RelayProcess::launch_fresh`]).
    _data: Option<tempfile::TempDir>,
}

impl RelayProcess {
    /// The binary with [`test_env`] and `extra`, its store in `data`, listening on `port`.
    pub async fn start(data: &Path, port: u16, extra: &[(&str, &str)]) -> RelayProcess {
        Self::start_with(data, port, extra, Vec::new()).await
    }

    /// `start` with more variables (owned), e.g. a broker's settings.
    pub async fn start_with(
        data: &Path,
        port: u16,
        extra: &[(&str, &str)],
        more: Vec<(String, String)>,
    ) -> RelayProcess {
        let mut env = test_env(data, extra);
        for (k, v) in more {
            set(&mut env, &k, &v);
        }
        Self::launch(data, port, env).await
    }

    /// The binary with exactly `env` (plus the listen address), its log in `data`; waits until
    /// `/health/ready` answers 2xx.
    pub async fn launch(data: &Path, port: u16, mut env: Vec<(String, String)>) -> RelayProcess {
        let listen = format!("127.0.0.1:{port}");
        set(&mut env, "SYNCRELAY__HTTP__LISTEN", &listen);
        let log = data.join(format!("relay-{}.log", unique_suffix()));
        // `E2E_RELAY_BIN`: another build of the relay (the benchmark's before/after comparisons).
        let bin = std::env::var_os("E2E_RELAY_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_syncrelay").into());
        let child = Command::new(bin)
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
            _data: None,
        };
        let until = Instant::now() + Duration::from_secs(60);
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

    /// The binary with [`base_env`] (the relay's defaults otherwise) and `extra`, a fresh data
    /// folder it owns and a free port: what the benchmark runs.
    pub async fn launch_fresh(extra: Vec<(String, String)>) -> RelayProcess {
        let data = tempfile::tempdir().unwrap();
        let mut env = base_env(data.path());
        for (k, v) in extra {
            set(&mut env, &k, &v);
        }
        let mut p = Self::launch(data.path(), free_port(), env).await;
        p._data = Some(data);
        p
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn sigterm(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reset the peak RSS counter (Linux: `5` in clear_refs); best effort.
    pub fn reset_peak_rss(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }

    /// VmHWM (peak RSS) in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// CPU seconds (user + system) the process has used so far.
    pub fn cpu_secs(&self) -> f64 {
        stat_cpu_secs(&std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default())
    }
}

/// User + system CPU seconds in the text of a `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat`
/// file (0 for an empty or unreadable one).
pub fn stat_cpu_secs(stat: &str) -> f64 {
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
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

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
