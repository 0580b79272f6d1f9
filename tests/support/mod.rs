//! Test support shared by every integration test (`mod support;`) and the benchmark
//! (`#[path = "../tests/support/mod.rs"] mod support;`):
//!
//! - [`receiver`]: a real HTTP receiver answering from a script, recording what it gets;
//! - [`relay`]: syncrelay in-process ([`spawn_app`]) or as the real binary ([`RelayProcess`]),
//!   and the API calls both answer ([`Api`]);
//! - [`metrics`]: the Prometheus text format, parsed ([`Metrics`]);
//! - [`broker`]: a real Kafka-protocol broker, tansu ([`broker::Broker`]);
//! - [`bus`]: one delivery scenario written once and run against both buses ([`Harness`],
//!   `both_buses!`);
//! - [`postgres`]: a real PostgreSQL started by the test process ([`postgres::database`]).
#![allow(dead_code)]

pub mod broker;
pub mod bus;
pub mod metrics;
pub mod postgres;
pub mod receiver;
pub mod relay;

use std::net::TcpListener;

use serde_json::{json, Value};

// Not every test crate (nor the benchmark) uses every name.
#[allow(unused_imports)]
pub use bus::{Bus, Harness};
#[allow(unused_imports)]
pub use metrics::Metrics;
#[allow(unused_imports)]
pub use receiver::{Received, Receiver, Reply, Script};
#[allow(unused_imports)]
pub use relay::{base_env, spawn_app, spawn_app_with, test_env, Api, RelayProcess, TestApp};

pub const TOKEN: &str = "test-token-7b1e";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A record event of run `run` for `webhook_id`; without a run, a `record:created` event.
pub fn event(id: &str, webhook_id: &str, run: Option<&str>, payload: Value) -> Value {
    let mut e = json!({"id": id, "event": "sync_job_run:record", "webhook_id": webhook_id, "payload": payload});
    match run {
        Some(r) => e["sync_job_run_id"] = json!(r),
        None => e["event"] = json!("record:created"),
    }
    e
}

/// The `n`-th run id (a valid UUID).
/// The ids among `ids` that start with `prefix`, in their order, checked to be sorted: for a
/// run whose events are numbered in the order they were accepted, that it arrived in order.
pub fn in_order<'a>(ids: &'a [String], prefix: &str) -> Vec<&'a String> {
    let seen: Vec<&String> = ids.iter().filter(|id| id.starts_with(prefix)).collect();
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "{prefix}… in order");
    seen
}

pub fn run_id(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// Poll `probe` every 50 ms until it gives `Some`, or panic after `timeout` naming `what`: for
/// state that appears asynchronously (on the Kafka bus, everything after the produce).
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < until,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
