//! A real Kafka-protocol broker for tests and the benchmark: tansu, started on a free loopback
//! port (`TANSU_BIN`, else `~/.cargo/bin/tansu`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    pub value: Vec<u8>,
}

impl Consumed {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).expect("message value is JSON")
    }
}

/// The topics of one relay: events, and the commands and dead-letter topics named after it.
#[derive(Debug, Clone)]
pub struct Topics {
    pub events: String,
    pub commands: String,
    pub dlq: String,
}

impl Topics {
    /// `events`, `events.commands`, `events.dlq` (the names [`Broker::relay_env`] gives the relay).
    pub fn named(events: &str) -> Topics {
        Topics {
            events: events.to_string(),
            commands: format!("{events}.commands"),
            dlq: format!("{events}.dlq"),
        }
    }
}

/// tansu on a free loopback port, in-memory storage. It runs under a small shell that stops it
/// when this process lets go of the shell's stdin: on drop, or when the test process ends in
/// any way (a broker in a `static` is never dropped).
pub struct Broker {
    /// The watchdog shell; its stdin is the lifeline.
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

fn tansu() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = PathBuf::from(home).join(".cargo/bin/tansu");
    if p.exists() {
        return p;
    }
    panic!("tansu is not installed: run ./scripts/test.sh (it installs it), or set TANSU_BIN");
}

static SHARED: OnceLock<Broker> = OnceLock::new();

impl Broker {
    pub fn start() -> Broker {
        let port = super::free_port();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        // `cat` returns at EOF of the lifeline, then tansu is killed.
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#""$@" </dev/null & pid=$!; cat >/dev/null; kill -9 $pid; wait $pid"#)
            .arg("sh")
            .arg(tansu())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("tansu.log")).unwrap())
            .spawn()
            .expect("tansu starts");
        let mut b = Broker { child, port, dir };
        let until = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = b.child.try_wait() {
                panic!("tansu exited ({st}): {}", b.logs());
            }
            assert!(Instant::now() < until, "tansu did not listen on {port}: {}", b.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    /// One broker for the whole test process, started on first use; stopped when the process
    /// ends. Tests sharing it use their own topics and groups.
    pub fn shared() -> &'static Broker {
        SHARED.get_or_init(Broker::start)
    }

    /// tansu's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
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

    /// Create the three topics of `topics`: events with `partitions`, the others with one.
    pub fn create_topics(&self, topics: &Topics, partitions: u32) {
        self.create_topic(&topics.events, partitions);
        self.create_topic(&topics.commands, 1);
        self.create_topic(&topics.dlq, 1);
    }

    /// `relay_env` for a static group member (`group.instance.id`): a restarted instance takes
    /// its partitions back instead of joining as a new member.
    pub fn relay_env_static(&self, group: &str, topic: &str, instance: &str) -> Vec<(String, String)> {
        let mut env = self.relay_env(group, topic);
        let (_, lib) = env
            .iter_mut()
            .find(|(k, _)| k == "SYNCRELAY__BUS__KAFKA__LIBRDKAFKA")
            .unwrap();
        *lib = lib.replacen('{', &format!("{{\"group.instance.id\":\"{instance}\","), 1);
        env
    }

    /// The relay's bus settings for `group` consuming `topic` (commands and dead letters to
    /// `topic.commands`, `topic.dlq`; see [`Topics::named`]), with librdkafka settings that
    /// join a group in seconds against tansu, and statistics every second.
    pub fn relay_env(&self, group: &str, topic: &str) -> Vec<(String, String)> {
        self.relay_env_with(group, topic, serde_json::json!({"statistics.interval.ms": 1000}))
    }

    /// `relay_env` with `librdkafka` (a JSON object) merged into the fast-join settings instead
    /// of the statistics interval.
    pub fn relay_env_with(&self, group: &str, topic: &str, librdkafka: serde_json::Value) -> Vec<(String, String)> {
        let topics = Topics::named(topic);
        let mut lib = serde_json::json!({
            "bootstrap.servers": self.bootstrap(),
            "session.timeout.ms": 6000,
            "max.poll.interval.ms": 7000,
            "heartbeat.interval.ms": 1000,
        });
        for (k, v) in librdkafka.as_object().expect("librdkafka settings are an object") {
            lib[k] = v.clone();
        }
        vec![
            ("SYNCRELAY__BUS__KIND".into(), "kafka".into()),
            ("SYNCRELAY__BUS__KAFKA__GROUP_ID".into(), group.into()),
            (
                "SYNCRELAY__BUS__KAFKA__TOPICS".into(),
                format!("[\"{}\"]", topics.events),
            ),
            ("SYNCRELAY__BUS__KAFKA__DLQ_TOPIC".into(), topics.dlq),
            ("SYNCRELAY__BUS__KAFKA__COMMANDS_TOPIC".into(), topics.commands),
            ("SYNCRELAY__BUS__KAFKA__LIBRDKAFKA".into(), lib.to_string()),
        ]
    }

    /// One record per batch: tansu 0.6 answers a fetch that starts inside a record batch with
    /// the *next* batch, so a consumer resuming from a committed offset in the middle of a batch
    /// would never see the rest of it (seen in the SIGKILL test: first offsets after restarts
    /// were all batch boundaries, the records between the committed offset and the boundary
    /// never arrived). Real Kafka returns the containing batch and the client skips ahead.
    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("linger.ms", "0")
            .set("batch.num.messages", "1")
            .set("message.timeout.ms", "30000")
            .create()
            .unwrap()
    }

    /// A producer that batches: `linger_ms` and librdkafka's default batch size (several
    /// records per batch; see [`Broker::producer`] for what tansu does with that).
    pub fn batching_producer(&self, linger_ms: u32) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("linger.ms", linger_ms.to_string())
            .set("message.timeout.ms", "60000")
            .create()
            .unwrap()
    }

    /// Produce (key, value) pairs in order with [`Broker::producer`], waiting for every
    /// acknowledgement. Returns the log end per partition (one past the highest acknowledged
    /// offset).
    pub async fn produce(&self, topic: &str, messages: &[(Option<String>, Vec<u8>)]) -> BTreeMap<i32, i64> {
        produce_with(&self.producer(), topic, messages).await
    }

    /// Read everything on `topic` (all partitions) from the start, until `expect` messages or
    /// `timeout` (blocking).
    pub fn read_all(&self, topic: &str, expect: usize, timeout: Duration) -> Vec<Consumed> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("max.poll.interval.ms", "7000")
            .create()
            .unwrap();
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
        }
        c.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let until = Instant::now() + timeout;
        while out.len() < expect && Instant::now() < until {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Consumed {
                    key: m.key().map(<[u8]>::to_vec),
                    headers,
                    value: m.payload().unwrap_or_default().to_vec(),
                });
            }
        }
        out
    }

    /// (committed offset of `group`, log end) per partition of `topic`.
    pub fn committed_and_end(&self, group: &str, topic: &str) -> Vec<(i32, i64, i64)> {
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
        committed
            .elements()
            .iter()
            .map(|e| {
                let (_, high) = c
                    .fetch_watermarks(topic, e.partition(), Duration::from_secs(10))
                    .unwrap();
                let off = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                };
                (e.partition(), off, high)
            })
            .collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // the watchdog kills tansu
        let _ = self.child.wait();
    }
}

/// Produce (key, value) pairs to `topic` with `producer`, 2,000 awaited at a time, in order;
/// returns when all are acknowledged, with the log end per partition (one past the highest
/// acknowledged offset).
pub async fn produce_with(
    producer: &FutureProducer,
    topic: &str,
    messages: &[(Option<String>, Vec<u8>)],
) -> BTreeMap<i32, i64> {
    let mut ends = BTreeMap::new();
    for chunk in messages.chunks(2000) {
        let futs = chunk.iter().map(|(k, v)| {
            let mut r = FutureRecord::to(topic).payload(v);
            if let Some(k) = k {
                r = r.key(k);
            }
            producer.send(r, Duration::from_secs(60))
        });
        for r in futures_util::future::join_all(futs).await {
            let d = r.map_err(|(e, _)| e).expect("produce");
            let end = ends.entry(d.partition).or_insert(0);
            *end = (*end).max(d.offset + 1);
        }
    }
    ends
}
