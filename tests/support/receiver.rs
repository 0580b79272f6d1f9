//! A real HTTP receiver on a loopback port, for tests and the benchmark. It answers from a
//! [`Script`] (status, headers, delay) and keeps:
//!
//! - every request ([`Receiver::received`]) — in the default mode; [`Receiver::counting`] keeps
//!   only the figures below, for runs of many thousands of requests;
//! - requests answered per path since the last [`Receiver::reset`] (counted when the answer
//!   goes out, so a delayed answer begun before a reset is not counted after it);
//! - the largest number of requests in progress at once per path;
//! - a sample of every `SAMPLE_EVERY`-th 2xx request (headers and body) for signature checks;
//! - latencies of bodies carrying `"sched_us": N` (µs since [`Receiver::now_us`]'s origin) that
//!   were answered 2xx without a scripted delay.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use bytes::Bytes;
use serde_json::Value;

/// One request in [`Receiver::samples`] per this many 2xx answers.
pub const SAMPLE_EVERY: u64 = 97;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
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

/// What the receiver answers: status, extra headers, a delay before answering, and a gate the
/// answer waits for (the test opens it when what it needs in place before this answer is).
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
    pub gate: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            delay: Duration::ZERO,
            gate: None,
        }
    }
    pub fn delayed(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
    /// Answer only once `gate` holds true.
    pub fn after(mut self, gate: tokio::sync::watch::Receiver<bool>) -> Reply {
        self.gate = Some(gate);
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

struct State {
    /// Keep every request in `got` (false: counters only).
    record: bool,
    script: Mutex<Script>,
    got: Mutex<Vec<Received>>,
    /// Requests per `webhook-id` so far.
    seen: Mutex<HashMap<String, usize>>,
    /// Bumped by every reset, so an answer begun before it is not counted after it.
    generation: AtomicU64,
    /// Requests answered per path since the last reset.
    answered: Mutex<HashMap<String, u64>>,
    /// Per path: (in progress, most in progress at once).
    concurrent: Mutex<HashMap<String, (u64, u64)>>,
    /// 2xx answers decided so far (picks the samples).
    ok: AtomicU64,
    samples: Mutex<Vec<(http::HeaderMap, Bytes)>>,
    /// Origin of `sched_us`.
    epoch: Instant,
    /// [`Receiver::with_capacity`]: (capacity, hold) and the requests being held now.
    capacity: Option<(Arc<AtomicU64>, Duration)>,
    admitted: AtomicU64,
    /// Answer time minus `sched_us` (µs) of bodies carrying it (2xx, no scripted delay).
    lat: Mutex<Vec<u64>>,
}

#[derive(Clone)]
pub struct Receiver {
    pub port: u16,
    state: Arc<State>,
}

impl Receiver {
    /// Answers 200 to everything, keeps every request.
    pub async fn start() -> Receiver {
        Self::with_script(Arc::new(|_, _| Reply::status(200))).await
    }

    /// Answers from `script`, keeps every request.
    pub async fn with_script(script: Script) -> Receiver {
        Self::build(script, true)
    }

    /// Answers from `script` and keeps only counters, samples and latencies (benchmarks).
    pub fn counting(script: Script) -> Receiver {
        Self::build(script, false)
    }

    /// A receiver with a hidden capacity: it holds up to `capacity` requests at once (answering
    /// each 200 after `hold`) and answers 429 at once to any request beyond that (no
    /// Retry-After). `capacity` may be changed while it runs. Keeps every request.
    pub fn with_capacity(capacity: Arc<AtomicU64>, hold: Duration) -> Receiver {
        Self::build_with(Arc::new(|_, _| Reply::status(200)), true, Some((capacity, hold)))
    }

    fn build(script: Script, record: bool) -> Receiver {
        Self::build_with(script, record, None)
    }

    fn build_with(script: Script, record: bool, capacity: Option<(Arc<AtomicU64>, Duration)>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            record,
            script: Mutex::new(script),
            got: Mutex::default(),
            seen: Mutex::default(),
            generation: AtomicU64::new(0),
            answered: Mutex::default(),
            concurrent: Mutex::default(),
            ok: AtomicU64::new(0),
            samples: Mutex::default(),
            epoch: Instant::now(),
            lat: Mutex::default(),
            capacity,
            admitted: AtomicU64::new(0),
        });
        let s = state.clone();
        let server = HttpServer::new(move || {
            let s = s.clone();
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let s = s.clone();
                async move { s.handle(req, body).await }
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

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn set_script(&self, script: Script) {
        *self.state.script.lock().unwrap() = script;
    }

    /// Every request so far (empty for a [`Receiver::counting`] receiver).
    pub fn received(&self) -> Vec<Received> {
        self.state.got.lock().unwrap().clone()
    }

    /// The `webhook-id` of every request so far, in the order they arrived.
    pub fn webhook_ids(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| r.header("webhook-id").to_string())
            .collect()
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

    /// Forget everything received and counted so far.
    pub fn reset(&self) {
        let s = &self.state;
        s.generation.fetch_add(1, Ordering::SeqCst);
        s.got.lock().unwrap().clear();
        s.seen.lock().unwrap().clear();
        s.answered.lock().unwrap().clear();
        s.concurrent.lock().unwrap().clear();
        s.ok.store(0, Ordering::SeqCst);
        s.samples.lock().unwrap().clear();
        s.lat.lock().unwrap().clear();
    }

    /// Requests answered since the last reset whose path passes `filter`.
    pub fn answered_where(&self, filter: impl Fn(&str) -> bool) -> u64 {
        let m = self.state.answered.lock().unwrap();
        m.iter().filter(|(p, _)| filter(p)).map(|(_, n)| n).sum()
    }

    /// Requests answered since the last reset at paths starting with `prefix`.
    pub fn answered_on(&self, prefix: &str) -> u64 {
        self.answered_where(|p| p.starts_with(prefix))
    }

    /// Requests answered per path since the last reset.
    pub fn answered_by_path(&self) -> HashMap<String, u64> {
        self.state.answered.lock().unwrap().clone()
    }

    /// Wait until `n` requests whose path passes `filter` were answered; returns the instant it
    /// was seen (polled every 2 ms).
    pub async fn wait_answered(&self, n: u64, timeout: Duration, filter: impl Fn(&str) -> bool) -> Instant {
        let until = Instant::now() + timeout;
        loop {
            let got = self.answered_where(&filter);
            if got >= n {
                return Instant::now();
            }
            assert!(
                Instant::now() < until,
                "timed out after {timeout:?} waiting for {n} answered requests (got {got})"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The most requests to `path` in progress at once since the last reset.
    pub fn max_concurrent(&self, path: &str) -> u64 {
        self.state
            .concurrent
            .lock()
            .unwrap()
            .get(path)
            .map_or(0, |(_, max)| *max)
    }

    /// Microseconds since the origin of `sched_us`.
    pub fn now_us(&self) -> u64 {
        self.state.epoch.elapsed().as_micros() as u64
    }

    /// (p50, p99, p99.9) in milliseconds of the latencies of bodies carrying `sched_us`.
    pub fn percentiles(&self) -> (f64, f64, f64) {
        let v = self.state.lat.lock().unwrap().clone();
        percentiles_ms(v)
    }

    /// Verify every sampled request's Standard Webhooks signature with `secret`:
    /// (verified, sampled).
    pub fn verify_samples(&self, secret: &str) -> (usize, usize) {
        let wh = standardwebhooks::Webhook::new(secret).unwrap();
        let samples = self.state.samples.lock().unwrap();
        let ok = samples.iter().filter(|(h, b)| wh.verify(b, h).is_ok()).count();
        (ok, samples.len())
    }
}

/// (p50, p99, p99.9) in milliseconds of latencies in microseconds (NaN when there are none).
pub fn percentiles_ms(mut v: Vec<u64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)] as f64 / 1000.0;
    (at(0.50), at(0.99), at(0.999))
}

impl State {
    async fn handle(&self, req: HttpRequest, body: Bytes) -> HttpResponse {
        let generation = self.generation.load(Ordering::SeqCst);
        let r = Received {
            path: req.path().to_string(),
            headers: req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body,
            at: Instant::now(),
            status: 0,
        };
        let script = self.script.lock().unwrap().clone();
        let reply = {
            // One lock over deciding and recording, so `received()` is in answer order.
            let mut got = self.got.lock().unwrap();
            let seen = {
                let mut c = self.seen.lock().unwrap();
                let n = c.entry(r.header("webhook-id").to_string()).or_insert(0);
                *n += 1;
                *n - 1
            };
            let reply = match &self.capacity {
                None => script(&r, seen),
                Some((cap, hold)) => {
                    if self.admitted.fetch_add(1, Ordering::SeqCst) < cap.load(Ordering::SeqCst) {
                        Reply::status(200).delayed(*hold)
                    } else {
                        self.admitted.fetch_sub(1, Ordering::SeqCst);
                        Reply::status(429)
                    }
                }
            };
            if self.record {
                got.push(Received {
                    status: reply.status,
                    ..r.clone()
                });
            }
            reply
        };
        {
            let mut c = self.concurrent.lock().unwrap();
            let e = c.entry(r.path.clone()).or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.max(e.0);
        }
        if (200..300).contains(&reply.status) && self.ok.fetch_add(1, Ordering::Relaxed).is_multiple_of(SAMPLE_EVERY) {
            self.samples.lock().unwrap().push((header_map(&req), r.body.clone()));
        }
        if let Some(mut gate) = reply.gate.clone() {
            // A closed gate (its sender dropped) answers at once.
            let _ = gate.wait_for(|open| *open).await;
        }
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        if self.capacity.is_some() && reply.status == 200 {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(e) = self.concurrent.lock().unwrap().get_mut(&r.path) {
            e.0 = e.0.saturating_sub(1);
        }
        if self.generation.load(Ordering::SeqCst) == generation {
            let at_once = reply.delay.is_zero() && reply.gate.is_none() && (200..300).contains(&reply.status);
            if let Some(sched) = sched_us(&r.body).filter(|_| at_once) {
                let now = self.epoch.elapsed().as_micros() as u64;
                self.lat.lock().unwrap().push(now.saturating_sub(sched));
            }
            *self.answered.lock().unwrap().entry(r.path).or_default() += 1;
        }
        let mut resp = HttpResponse::build(actix_web::http::StatusCode::from_u16(reply.status).unwrap());
        for (k, v) in &reply.headers {
            resp.insert_header((k.as_str(), v.as_str()));
        }
        resp.body("receiver says hi")
    }
}

fn header_map(req: &HttpRequest) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in req.headers() {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(k.as_str().as_bytes()),
            http::HeaderValue::from_bytes(v.as_bytes()),
        ) {
            h.insert(k, v);
        }
    }
    h
}

/// The `sched_us` number in a body, if any.
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
