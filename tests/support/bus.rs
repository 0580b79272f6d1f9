//! A delivery scenario written once and run against both buses.
//!
//! ```ignore
//! both_buses!(delivered_and_signed, |bus| async move {
//!     let rx = Receiver::start().await;
//!     let h = Harness::start(bus, &[]).await;            // the relay, in-process, on `bus`
//!     let (wid, secret) = h.api().webhook(&rx.url("/hook"), &[]).await;
//!     h.send(&[event("e1", &wid, Some(&run_id(1)), json!({}))]).await;
//!     rx.wait_for(Duration::from_secs(20), "one delivery", |g| g.len() == 1).await;
//!     assert_eq!(h.metric("syncrelay_deliveries_total", &[("outcome", "delivered")]).await, 1.0);
//! });
//! // A defect of one bus: the assertion stays, that bus's test is ignored with the reason.
//! both_buses!(#[kafka_ignore = "defect: ..."] retried, |bus| async move { /* ... */ });
//! ```
//!
//! This makes a module `delivered_and_signed` with the tests `embedded` and `kafka`
//! (`cargo test delivered_and_signed`, `cargo test ::kafka`).
//!
//! Kafka: one tansu per test process ([`Broker::shared`]), fresh topics (events with 2
//! partitions, commands, dead letters) and a fresh consumer group per harness; `start` returns
//! once the relay holds both partitions of its events topic; the Kafka harnesses of one process
//! run one at a time (two cores).

use std::future::Future;
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use serde_json::Value;

use super::broker::{produce_with, Broker, Consumed, Topics};
use super::metrics::Metrics;
use super::relay::{spawn_app_with, Api, TestApp};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// `bus.kind = "embedded"`: events come in through `POST /events`.
    Embedded,
    /// `bus.kind = "kafka"` against tansu: events are produced to the events topic, keyed by
    /// `sync_job_run_id`, as an executor would.
    Kafka,
}

/// The Kafka side of a harness.
pub struct KafkaSide {
    pub broker: &'static Broker,
    pub topics: Topics,
    pub group: String,
    producer: FutureProducer,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// One at a time per test process: the machine has two cores.
static KAFKA_SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The relay in this process on one bus, with the ways in and out a scenario needs.
pub struct Harness {
    pub bus: Bus,
    pub app: TestApp,
    pub kafka: Option<KafkaSide>,
}

impl Harness {
    /// Start the relay with the test settings and `extra` on `bus` (for Kafka: tansu, fresh
    /// topics and group, `session.timeout.ms` 6000, `max.poll.interval.ms` 7000).
    pub async fn start(bus: Bus, extra: &[(&str, &str)]) -> Harness {
        match bus {
            Bus::Embedded => Harness {
                bus,
                app: spawn_app_with(extra, Vec::new()).await,
                kafka: None,
            },
            Bus::Kafka => {
                let serial = KAFKA_SERIAL.lock().await;
                let broker = tokio::task::spawn_blocking(Broker::shared).await.unwrap();
                let name = format!("h-{}", uuid::Uuid::new_v4().simple());
                let topics = Topics::named(&format!("{name}.events"));
                let group = format!("{name}.relay");
                {
                    let topics = topics.clone();
                    tokio::task::spawn_blocking(move || broker.create_topics(&topics, 2))
                        .await
                        .unwrap();
                }
                let app = spawn_app_with(extra, broker.relay_env(&group, &topics.events)).await;
                wait_for_partitions(&app, 2).await;
                Harness {
                    bus,
                    app,
                    kafka: Some(KafkaSide {
                        broker,
                        producer: broker.producer(),
                        topics,
                        group,
                        _serial: serial,
                    }),
                }
            }
        }
    }

    /// The API of the relay (token included).
    pub fn api(&self) -> &TestApp {
        &self.app
    }

    /// Send events the way this bus takes them: `POST /events` (each answered 202), or produced
    /// to the events topic keyed by `sync_job_run_id` (in order, every one acknowledged).
    pub async fn send(&self, events: &[Value]) {
        match &self.kafka {
            None => {
                self.app.send_events(events.to_vec()).await;
            }
            Some(k) => {
                let msgs: Vec<(Option<String>, Vec<u8>)> = events
                    .iter()
                    .map(|e| {
                        (
                            e["sync_job_run_id"].as_str().map(str::to_string),
                            e.to_string().into_bytes(),
                        )
                    })
                    .collect();
                produce_with(&k.producer, &k.topics.events, &msgs).await;
            }
        }
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> Metrics {
        self.app.metrics().await
    }

    /// Sum of the series of metric `name` with (at least) `labels`; panics when there is none.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.app.metric(name, labels).await
    }

    /// The Kafka side; panics on the embedded bus.
    pub fn kafka(&self) -> &KafkaSide {
        self.kafka.as_ref().expect("this scenario runs on the Kafka bus only")
    }

    /// The messages on the dead-letter topic with their headers, read from the start until
    /// `expect` arrived or `timeout` passed (Kafka only).
    pub async fn consume_dlq(&self, expect: usize, timeout: Duration) -> Vec<Consumed> {
        let k = self.kafka();
        let (broker, topic) = (k.broker, k.topics.dlq.clone());
        tokio::task::spawn_blocking(move || broker.read_all(&topic, expect, timeout))
            .await
            .unwrap()
    }

    /// The messages on the commands topic (what executors are told), read from the start until
    /// `expect` arrived or `timeout` passed (Kafka only).
    pub async fn consume_commands(&self, expect: usize, timeout: Duration) -> Vec<Consumed> {
        let k = self.kafka();
        let (broker, topic) = (k.broker, k.topics.commands.clone());
        tokio::task::spawn_blocking(move || broker.read_all(&topic, expect, timeout))
            .await
            .unwrap()
    }

    /// Stop the relay and wait for it (consumer closed while the broker is up).
    pub async fn stop(&mut self) {
        self.app.stop().await;
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Not awaited: the runtime ends the task. The shared broker outlives it, so
        // librdkafka's close does not wait for a broker that is gone.
        self.app.signal_stop();
    }
}

/// Wait until the relay holds `n` partitions (`syncrelay_kafka_assigned_partitions`), up to 30 s:
/// events produced before would be read anyway (`auto.offset.reset = earliest`), but a scenario's
/// timings would include the group join.
async fn wait_for_partitions(app: &TestApp, n: i64) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let held = app.metrics().await.get("syncrelay_kafka_assigned_partitions", &[]);
        if held.is_some_and(|v| v as i64 == n) {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "the relay never got its {n} partitions (holds {held:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run `scenario` on `bus` (what `both_buses!` expands to; gives the closure its argument type).
pub fn with_bus<F, Fut>(bus: Bus, scenario: F) -> Fut
where
    F: FnOnce(Bus) -> Fut,
    Fut: Future<Output = ()>,
{
    scenario(bus)
}

/// `both_buses!(name, |bus| async move { ... })`: a module `name` with the tests `embedded` and
/// `kafka`, each running the closure with its [`Bus`]. `#[kafka_ignore = "reason"]` (or
/// `#[embedded_ignore = "reason"]`) before the name ignores that bus's test.
#[macro_export]
macro_rules! both_buses {
    (#[kafka_ignore = $reason:literal] $name:ident, $scenario:expr $(,)?) => {
        $crate::both_buses!(@emit $name, [], [#[ignore = $reason]], $scenario);
    };
    (#[embedded_ignore = $reason:literal] $name:ident, $scenario:expr $(,)?) => {
        $crate::both_buses!(@emit $name, [#[ignore = $reason]], [], $scenario);
    };
    ($name:ident, $scenario:expr $(,)?) => {
        $crate::both_buses!(@emit $name, [], [], $scenario);
    };
    (@emit $name:ident, [$(#[$emb:meta])*], [$(#[$kfk:meta])*], $scenario:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$emb])*
            async fn embedded() {
                $crate::support::bus::with_bus($crate::support::bus::Bus::Embedded, $scenario).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$kfk])*
            async fn kafka() {
                $crate::support::bus::with_bus($crate::support::bus::Bus::Kafka, $scenario).await
            }
        }
    };
}
