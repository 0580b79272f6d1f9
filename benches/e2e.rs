//! End-to-end benchmark: syncrelay (release binary) against the limits of the same machine,
//! measured in the same run. `cargo bench --bench e2e -- [--quick]`.
//!
//! Starts on loopback: a fast receiver (actix-web, answers 200, counts arrivals, verifies a
//! sample of Standard Webhooks signatures), the release binary `target/release/syncrelay`
//! (built when missing) and tansu (`~/.cargo/bin/tansu` or `TANSU_BIN`) for the Kafka scenarios.
//! Prints a table and JSON, and writes the JSON to `target/bench-e2e.json`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine;
use hmac::{Hmac, Mac};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use sha2::Sha256;

const TOKEN: &str = "bench-token-3c9a";
/// The relay's delivery concurrency for one webhook, and the bare client's.
const CONCURRENCY: usize = 64;
const PAYLOAD_BYTES: usize = 1024;
const SAMPLE_EVERY: u64 = 97;

// ---------------------------------------------------------------------------------------------
// Receiver

struct RxState {
    count: AtomicU64,
    /// Origin of `sched_us` in latency events.
    epoch: Instant,
    /// Arrival minus scheduled send time (µs) of events carrying `sched_us`.
    lat: Mutex<Vec<u64>>,
    /// Sampled requests: (headers, body), verified after the scenario.
    samples: Mutex<Vec<(http::HeaderMap, Vec<u8>)>>,
}

struct Receiver {
    port: u16,
    state: Arc<RxState>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(RxState {
            count: AtomicU64::new(0),
            epoch: Instant::now(),
            lat: Mutex::default(),
            samples: Mutex::default(),
        });
        let s = state.clone();
        let server = HttpServer::new(move || {
            let s = s.clone();
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let s = s.clone();
                async move {
                    if let Some(sched) = sched_us(&body) {
                        let now = s.epoch.elapsed().as_micros() as u64;
                        s.lat.lock().unwrap().push(now.saturating_sub(sched));
                    }
                    let n = s.count.fetch_add(1, Ordering::Relaxed);
                    if n.is_multiple_of(SAMPLE_EVERY) {
                        let mut h = http::HeaderMap::new();
                        for (k, v) in req.headers() {
                            if let (Ok(k), Ok(v)) = (
                                http::header::HeaderName::from_bytes(k.as_str().as_bytes()),
                                http::HeaderValue::from_bytes(v.as_bytes()),
                            ) {
                                h.insert(k, v);
                            }
                        }
                        s.samples.lock().unwrap().push((h, body.to_vec()));
                    }
                    HttpResponse::Ok().body("ok")
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
        Receiver { port, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    fn reset(&self) {
        self.state.count.store(0, Ordering::SeqCst);
        self.state.samples.lock().unwrap().clear();
        self.state.lat.lock().unwrap().clear();
    }

    fn now_us(&self) -> u64 {
        self.state.epoch.elapsed().as_micros() as u64
    }

    /// (p50, p99, p99.9) of the recorded latencies, in milliseconds.
    fn percentiles(&self) -> (f64, f64, f64) {
        let mut v = self.state.lat.lock().unwrap().clone();
        if v.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)] as f64 / 1000.0;
        (at(0.50), at(0.99), at(0.999))
    }

    fn count(&self) -> u64 {
        self.state.count.load(Ordering::SeqCst)
    }

    /// Wait until `n` requests arrived; returns the instant it was seen (polled every 2 ms).
    async fn wait_for(&self, n: u64, timeout: Duration) -> Instant {
        let until = Instant::now() + timeout;
        loop {
            if self.count() >= n {
                return Instant::now();
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for {n} arrivals (got {})",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Verify every sampled signature with `secret`: (verified, sampled).
    fn verify_samples(&self, secret: &str) -> (usize, usize) {
        let wh = standardwebhooks::Webhook::new(secret).unwrap();
        let samples = self.state.samples.lock().unwrap();
        let ok = samples.iter().filter(|(h, b)| wh.verify(b, h).is_ok()).count();
        (ok, samples.len())
    }
}

/// The `sched_us` number in a delivered body, if any.
fn sched_us(body: &[u8]) -> Option<u64> {
    let key = b"\"sched_us\":";
    let pos = body.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: String = body[pos..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit())
        .map(|b| *b as char)
        .collect();
    digits.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Relay process

struct Relay {
    child: Child,
    base: String,
    http: reqwest::Client,
    _data: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn relay_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join("target/release/syncrelay");
    if !bin.exists() {
        eprintln!("building the release binary (cargo build --release --bin syncrelay)...");
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--bin", "syncrelay"])
            .current_dir(&root)
            .status()
            .expect("cargo build");
        assert!(st.success(), "release build failed");
    }
    bin
}

impl Relay {
    async fn start(extra: Vec<(String, String)>) -> Relay {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("SYNCRELAY__HTTP__LISTEN".into(), format!("127.0.0.1:{port}")),
            ("SYNCRELAY__AUTH__TOKENS".into(), format!("[\"{TOKEN}\"]")),
            (
                "SYNCRELAY__STORE__PATH".into(),
                data.path().join("syncrelay.db").display().to_string(),
            ),
            ("SYNCRELAY__DELIVERY__ALLOWED_CIDRS".into(), r#"["127.0.0.0/8"]"#.into()),
            (
                "SYNCRELAY__DELIVERY__MAX_IN_FLIGHT_PER_WEBHOOK".into(),
                CONCURRENCY.to_string(),
            ),
        ];
        env.extend(extra);
        let log = data.path().join("relay.log");
        let child = Command::new(relay_binary())
            .envs(env)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("relay starts");
        let r = Relay {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            _data: data,
        };
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(resp) = r.http.get(format!("{}/health/ready", r.base)).send().await {
                if resp.status().is_success() {
                    break;
                }
            }
            assert!(
                Instant::now() < until,
                "relay did not become ready: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        r
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{}", self.base, path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request");
        let s = resp.status().as_u16();
        let t = resp.text().await.unwrap();
        (s, serde_json::from_str(&t).unwrap_or(Value::String(t)))
    }

    async fn webhook(&self, url: &str) -> (String, String) {
        let (s, b) = self
            .post("/webhook", &json!({"target_url": url, "event_types": []}))
            .await;
        assert_eq!(s, 201, "{b}");
        (b["id"].as_str().unwrap().into(), b["secret"].as_str().unwrap().into())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reset the peak RSS counter (Linux: `5` in clear_refs); best effort.
    fn reset_peak_rss(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }

    /// VmHWM (peak RSS) in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// CPU seconds (user + system) the relay has used so far.
    fn cpu_secs(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
        let rest = s.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Broker (tansu)

struct Broker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn tansu() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cargo/bin/tansu")
}

impl Broker {
    fn start() -> Broker {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("tansu.log")).unwrap())
            .spawn()
            .expect("tansu starts (install with `cargo install tansu` or set TANSU_BIN)");
        let until = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker { child, port, _dir: dir }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(tansu())
            .args(["topic", "create", "--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .args(["--partitions", &partitions.to_string(), name])
            .output()
            .expect("tansu topic create");
        assert!(
            out.status.success(),
            "topic create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            .create()
            .unwrap()
    }

    /// The relay's Kafka settings. `E2E_FETCH_WAIT_MS` sets librdkafka's `fetch.wait.max.ms`
    /// (default 500): tansu answers a long-polled fetch only when that wait expires, not when
    /// new records arrive, which puts up to that much on every delivery's latency.
    fn relay_env(&self, group: &str, topic: &str) -> Vec<(String, String)> {
        let fetch_wait = std::env::var("E2E_FETCH_WAIT_MS")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .map(|ms| format!(r#","fetch.wait.max.ms":{ms}"#))
            .unwrap_or_default();
        vec![
            ("SYNCRELAY__BUS__KIND".into(), "kafka".into()),
            ("SYNCRELAY__BUS__KAFKA__GROUP_ID".into(), group.into()),
            ("SYNCRELAY__BUS__KAFKA__TOPICS".into(), format!("[\"{topic}\"]")),
            ("SYNCRELAY__BUS__KAFKA__DLQ_TOPIC".into(), format!("{topic}.dlq")),
            (
                "SYNCRELAY__BUS__KAFKA__COMMANDS_TOPIC".into(),
                format!("{topic}.commands"),
            ),
            (
                "SYNCRELAY__BUS__KAFKA__LIBRDKAFKA".into(),
                format!(
                    r#"{{"bootstrap.servers":"{}","session.timeout.ms":6000,"max.poll.interval.ms":7000,"heartbeat.interval.ms":1000{}}}"#,
                    self.bootstrap(),
                    fetch_wait
                ),
            ),
        ]
    }

    /// Sum over partitions of (committed offset of `group`, log end).
    fn committed_and_end(&self, group: &str, topic: &str) -> (i64, i64) {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition(topic, p.id());
        }
        let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        let (mut com, mut end) = (0, 0);
        for e in committed.elements() {
            let (_, high) = c
                .fetch_watermarks(topic, e.partition(), Duration::from_secs(10))
                .unwrap();
            if let Offset::Offset(o) = e.offset() {
                com += o;
            }
            end += high;
        }
        (com, end)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Workload

fn run_id(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// An event of about `PAYLOAD_BYTES` JSON bytes.
fn event(id: &str, webhook: &str, run: &str, i: usize) -> Value {
    let mut e = json!({"id": id, "event": "sync_job_run:record", "sync_job_run_id": run, "webhook_id": webhook,
                       "payload": {"run": run, "i": i, "pad": ""}});
    let len = e.to_string().len();
    e["payload"]["pad"] = json!("x".repeat(PAYLOAD_BYTES.saturating_sub(len)));
    e
}

/// A latency event: carries its scheduled send time.
fn sched_event(id: &str, webhook: &str, k: usize, sched: u64, run_offset: usize) -> Value {
    let mut e = event(id, webhook, &run_id(run_offset + k % 200), k / 200);
    e["payload"]["sched_us"] = json!(sched);
    e
}

/// `runs` × `per_run` events, interleaved so every batch spans many runs.
fn workload(prefix: &str, webhook: &str, runs: usize, per_run: usize, run_offset: usize) -> Vec<Value> {
    let mut v = Vec::with_capacity(runs * per_run);
    for i in 0..per_run {
        for r in 0..runs {
            let run = run_id(run_offset + r);
            v.push(event(&format!("{prefix}-{r}-{i}"), webhook, &run, i));
        }
    }
    v
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// L_client: a bare reqwest client, signing like the relay, `CONCURRENCY` requests in flight.
async fn l_client(rx: &Receiver, n: usize) -> (f64, usize, usize) {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let body: Arc<Vec<u8>> = Arc::new(event("lc", "wh", &run_id(0), 0).to_string().into_bytes());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = rx.url("/limit");
    rx.reset();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, key, body, next) = (client.clone(), url.clone(), key.clone(), body.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n as u64 {
                    break;
                }
                let id = format!("msg_{i}");
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
                mac.update(format!("{id}.{ts}.").as_bytes());
                mac.update(&body);
                let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("webhook-id", &id)
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", format!("v1,{sig}"))
                    .body(body.as_ref().clone())
                    .send()
                    .await
                    .expect("post");
                assert!(resp.status().is_success());
                let _ = resp.bytes().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let el = started.elapsed();
    let (ok, sampled) = rx.verify_samples(secret);
    (n as f64 / secs(el), ok, sampled)
}

/// Post `events` in batches of 500, two batches in flight; returns when all are accepted.
async fn post_events(relay: &Relay, events: &[Value]) {
    let chunks: Vec<&[Value]> = events.chunks(500).collect();
    for pair in chunks.chunks(2) {
        let bodies: Vec<Value> = pair.iter().map(|c| json!({ "events": c })).collect();
        let futs = bodies.iter().map(|b| relay.post("/events", b));
        for (s, b) in futures_util::future::join_all(futs).await {
            assert_eq!(s, 202, "{b}");
        }
    }
}

struct EmbeddedResult {
    eps: f64,
    single_eps: f64,
    rss_throughput: f64,
    rss_single: f64,
    verified: (usize, usize),
    /// (rate, (p50, p99, p99.9) ms)
    latency: (f64, (f64, f64, f64)),
}

async fn embedded(rx: &Receiver, runs: usize, per_run: usize, single: usize, lat_secs: f64) -> EmbeddedResult {
    let relay = Relay::start(vec![]).await;
    let (wid, secret) = relay.webhook(&rx.url("/embedded")).await;
    let events = workload("emb", &wid, runs, per_run, 0);
    let n = events.len() as u64;
    rx.reset();
    relay.reset_peak_rss();
    let cpu0 = relay.cpu_secs();
    let started = Instant::now();
    post_events(&relay, &events).await;
    let accepted = started.elapsed();
    let done = rx.wait_for(n, Duration::from_secs(600)).await;
    let eps = n as f64 / secs(done - started);
    eprintln!(
        "  embedded: relay CPU {:.2}s over {:.2}s wall",
        relay.cpu_secs() - cpu0,
        secs(done - started)
    );
    eprintln!(
        "  embedded: accepted {n} in {:.2}s, delivered in {:.2}s",
        secs(accepted),
        secs(done - started)
    );
    let rss_throughput = relay.peak_rss_mib();
    let verified = rx.verify_samples(&secret);

    // One run, strictly sequential.
    let events = workload("single", &wid, 1, single, 1_000_000);
    rx.reset();
    relay.reset_peak_rss();
    let started = Instant::now();
    post_events(&relay, &events).await;
    let done = rx.wait_for(single as u64, Duration::from_secs(600)).await;
    let single_eps = single as f64 / secs(done - started);
    let rss_single = relay.peak_rss_mib();
    let v2 = rx.verify_samples(&secret);

    // Latency at half the measured throughput, paced; POSTs of the due events every tick.
    let rate = eps / 2.0;
    let n_lat = (rate * lat_secs) as usize;
    rx.reset();
    let base = rx.now_us();
    let start = Instant::now();
    let mut k = 0;
    while k < n_lat {
        let now = secs(start.elapsed());
        let mut due = Vec::new();
        while k < n_lat && k as f64 / rate <= now {
            let sched = base + (k as f64 / rate * 1e6) as u64;
            due.push(sched_event(&format!("lat-{k}"), &wid, k, sched, 4_000_000));
            k += 1;
        }
        if !due.is_empty() {
            post_events(&relay, &due).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    rx.wait_for(n_lat as u64, Duration::from_secs(600)).await;
    let latency = (rate, rx.percentiles());
    relay.stop();
    EmbeddedResult {
        eps,
        single_eps,
        rss_throughput,
        rss_single,
        verified: (verified.0 + v2.0, verified.1 + v2.1),
        latency,
    }
}

struct KafkaResult {
    eps_delivered: f64,
    eps_committed: f64,
    l_broker: f64,
    rss: f64,
    verified: (usize, usize),
    latency: (f64, (f64, f64, f64)),
}

async fn kafka(rx: &Receiver, runs: usize, per_run: usize, lat_secs: f64) -> KafkaResult {
    let broker = Broker::start();
    let topic = "bench.events";
    broker.create_topic(topic, 8);
    let group = "bench-relay";
    let relay = Relay::start(broker.relay_env(group, topic)).await;
    let (wid, secret) = relay.webhook(&rx.url("/kafka")).await;
    let producer = broker.producer();

    // Warm up: the group is joined and partitions assigned once one event comes through.
    rx.reset();
    let warm = event("warm", &wid, &run_id(2_000_000), 0).to_string();
    producer
        .send(
            FutureRecord::to(topic).key("warm").payload(&warm),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce warm-up");
    rx.wait_for(1, Duration::from_secs(120)).await;

    let events: Vec<(String, Vec<u8>)> = workload("kfk", &wid, runs, per_run, 0)
        .into_iter()
        .map(|e| {
            (
                e["sync_job_run_id"].as_str().unwrap().to_string(),
                e.to_string().into_bytes(),
            )
        })
        .collect();
    let n = events.len() as u64;
    rx.reset();
    relay.reset_peak_rss();
    let cpu0 = relay.cpu_secs();
    let started = Instant::now();
    for chunk in events.chunks(2000) {
        let futs = chunk
            .iter()
            .map(|(k, v)| producer.send(FutureRecord::to(topic).key(k).payload(v), Duration::from_secs(60)));
        for r in futures_util::future::join_all(futs).await {
            r.map_err(|(e, _)| e).expect("produce");
        }
    }
    let produced = started.elapsed();
    let delivered = rx.wait_for(n, Duration::from_secs(600)).await;
    let committed = loop {
        let (com, end) = broker.committed_and_end(group, topic);
        if com >= end {
            break Instant::now();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "offsets not committed: {com}/{end}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "  kafka: produced {n} in {:.2}s, delivered in {:.2}s, committed in {:.2}s",
        secs(produced),
        secs(delivered - started),
        secs(committed - started)
    );
    eprintln!(
        "  kafka: relay CPU {:.2}s over {:.2}s wall",
        relay.cpu_secs() - cpu0,
        secs(delivered - started)
    );
    let rss = relay.peak_rss_mib();
    let verified = rx.verify_samples(&secret);

    // Latency at half the measured throughput, paced, each record stamped with its schedule.
    let eps_delivered = n as f64 / secs(delivered - started);
    let rate = eps_delivered / 2.0;
    let n_lat = (rate * lat_secs) as usize;
    rx.reset();
    let base = rx.now_us();
    let start = Instant::now();
    let mut acks = Vec::with_capacity(n_lat);
    let mut k = 0;
    while k < n_lat {
        let now = secs(start.elapsed());
        while k < n_lat && k as f64 / rate <= now {
            let sched = base + (k as f64 / rate * 1e6) as u64;
            let e = sched_event(&format!("lat-{k}"), &wid, k, sched, 3_000_000);
            let key = e["sync_job_run_id"].as_str().unwrap().to_string();
            let v = e.to_string();
            acks.push(
                producer
                    .send_result(FutureRecord::to(topic).key(&key).payload(&v))
                    .map_err(|(e, _)| e)
                    .expect("enqueue"),
            );
            k += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for a in futures_util::future::join_all(acks).await {
        a.expect("delivery future").map_err(|(e, _)| e).expect("produce");
    }
    rx.wait_for(n_lat as u64, Duration::from_secs(600)).await;
    let latency = (rate, rx.percentiles());
    relay.stop();

    // L_broker: a bare consumer reads the same topic (same messages) from the beginning.
    let bootstrap = broker.bootstrap();
    let total = n + 1;
    let l_broker = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "bench-bare-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
        }
        c.assign(&tpl).unwrap();
        let started = Instant::now();
        let mut got = 0u64;
        let mut bytes = 0usize;
        while got < total {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "bare consumer stalled at {got}"
            );
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                bytes += rdkafka::message::Message::payload(&m).map_or(0, <[u8]>::len);
                got += 1;
            }
        }
        assert!(bytes > 0);
        total as f64 / secs(started.elapsed())
    })
    .await
    .unwrap();
    KafkaResult {
        eps_delivered,
        eps_committed: n as f64 / secs(committed - started),
        l_broker,
        rss,
        verified,
        latency,
    }
}

fn machine() -> (usize, String) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    (std::thread::available_parallelism().map_or(0, |n| n.get()), cpu)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 4 } else { 1 };
    let runs = 200;
    let per_run = 100 / scale;
    let total = runs * per_run;
    let single = 2000 / scale;
    let lat_secs = 10.0 / scale as f64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let _ = relay_binary();
        let rx = Receiver::start();
        tokio::time::sleep(Duration::from_millis(200)).await;

        eprintln!("L_client: {total} signed POSTs, concurrency {CONCURRENCY}");
        let (l_client, lc_ok, lc_n) = l_client(&rx, total).await;
        eprintln!("embedded: {runs} runs x {per_run} events, then one run of {single}");
        let emb = embedded(&rx, runs, per_run, single, lat_secs).await;
        eprintln!("kafka: {runs} runs x {per_run} events, 8 partitions");
        let kfk = kafka(&rx, runs, per_run, lat_secs).await;

        let emb_ratio = emb.eps / l_client;
        let k_limit = l_client.min(kfk.l_broker);
        let binds = if kfk.l_broker < l_client { "L_broker" } else { "L_client" };
        let k_ratio = kfk.eps_delivered / k_limit;
        let max_rss = emb.rss_throughput.max(emb.rss_single).max(kfk.rss);
        let (nproc, cpu) = machine();
        let fetch_wait = std::env::var("E2E_FETCH_WAIT_MS").unwrap_or_else(|_| "default (500)".into());
        let verified = (
            lc_ok + emb.verified.0 + kfk.verified.0,
            lc_n + emb.verified.1 + kfk.verified.1,
        );
        let yes = |b: bool| if b { "met" } else { "MISSED" };

        println!();
        println!("syncrelay e2e benchmark ({}; {nproc} cores, {cpu})", if quick { "quick" } else { "full" });
        println!("relay librdkafka fetch.wait.max.ms: {fetch_wait}");
        println!("| measurement | value | target | result |");
        println!("|---|---:|---|---|");
        println!("| L_client (bare signing reqwest, concurrency {CONCURRENCY}) | {l_client:.0} events/s | | |");
        println!("| L_broker (bare rdkafka consumer, tansu) | {:.0} msgs/s | | |", kfk.l_broker);
        println!(
            "| Embedded bus e2e ({total} events, {runs} runs) | {:.0} events/s ({emb_ratio:.2} x L_client) | >= 0.5 x L_client | {} |",
            emb.eps,
            yes(emb_ratio >= 0.5)
        );
        println!(
            "| Kafka e2e delivered ({total} events, 8 partitions) | {:.0} events/s ({k_ratio:.2} x {binds}) | >= 0.7 x min(L_client, L_broker) | {} |",
            kfk.eps_delivered,
            yes(k_ratio >= 0.7)
        );
        println!(
            "| Kafka e2e to offsets committed | {:.0} events/s ({:.2} x {binds}) | | |",
            kfk.eps_committed,
            kfk.eps_committed / k_limit
        );
        for (name, (rate, (p50, p99, p999))) in [("Embedded", emb.latency), ("Kafka", kfk.latency)] {
            println!(
                "| {name} latency at {rate:.0} events/s (half e2e), paced {lat_secs:.1}s: p50 / p99 / p99.9 | {p50:.1} / {p99:.1} / {p999:.1} ms | p99 <= 50 ms | {} |",
                yes(p99 <= 50.0)
            );
        }
        println!("| Single run ({single} events, embedded, sequential) | {:.0} events/s | | |", emb.single_eps);
        println!(
            "| Relay peak RSS: embedded throughput / single run / kafka | {:.1} / {:.1} / {:.1} MiB | <= 300 MiB | {} |",
            emb.rss_throughput,
            emb.rss_single,
            kfk.rss,
            yes(max_rss <= 300.0)
        );
        println!("| Sampled signatures verified | {} / {} | all | {} |", verified.0, verified.1, yes(verified.0 == verified.1));

        let out = json!({
            "mode": if quick { "quick" } else { "full" },
            "machine": {"nproc": nproc, "cpu": cpu},
            "relay_fetch_wait_max_ms": fetch_wait,
            "payload_bytes": PAYLOAD_BYTES,
            "concurrency": CONCURRENCY,
            "events": total, "runs": runs, "single_run_events": single,
            "l_client_eps": l_client,
            "l_broker_mps": kfk.l_broker,
            "embedded_eps": emb.eps, "embedded_ratio_l_client": emb_ratio,
            "kafka_delivered_eps": kfk.eps_delivered, "kafka_committed_eps": kfk.eps_committed,
            "kafka_ratio": k_ratio, "kafka_binding_limit": binds,
            "single_run_eps": emb.single_eps,
            "latency_ms": {
                "embedded": {"rate_eps": emb.latency.0, "p50": emb.latency.1.0, "p99": emb.latency.1.1, "p999": emb.latency.1.2},
                "kafka": {"rate_eps": kfk.latency.0, "p50": kfk.latency.1.0, "p99": kfk.latency.1.1, "p999": kfk.latency.1.2},
            },
            "rss_mib": {"embedded_throughput": emb.rss_throughput, "single_run": emb.rss_single, "kafka": kfk.rss},
            "signatures": {"verified": verified.0, "sampled": verified.1},
            "targets": {
                "embedded_ge_0_5_l_client": emb_ratio >= 0.5,
                "kafka_ge_0_7_min_limit": k_ratio >= 0.7,
                "rss_le_300_mib": max_rss <= 300.0,
                "embedded_p99_le_50ms": emb.latency.1.1 <= 50.0,
                "kafka_p99_le_50ms": kfk.latency.1.1 <= 50.0,
            },
        });
        let text = serde_json::to_string_pretty(&out).unwrap();
        println!("{text}");
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-e2e.json");
        std::fs::write(&path, &text).unwrap();
        eprintln!("wrote {}", path.display());
    });
}
