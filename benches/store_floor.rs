//! The floor under the SQLite store's cost per event: the same durable work the embedded bus asks
//! of SQLite (a ~1 KiB event inserted in batches of 500, finished in batches of 110, each batch a
//! transaction with `synchronous = full` in WAL mode; 20,000 events over 200 interleaved chains),
//! done by a bare single-threaded rusqlite loop with no relay around it. Its CPU per event is what
//! no change to the relay's code could get below with this storage design; the relay's own store
//! cost (the `store` share of its profile, docs/BENCHMARKS.md) is measured against it.
//!
//! Seven schemas, each printed as CPU ms per event (utime + stime, fsync's kernel time
//! included), events/s and bytes written to disk per event (`/proc/self/io`):
//!
//! - `minimal`: one row a delivery, body inline, no index but the primary key; inserted, then
//!   finished (the least a durable queue with a delivery log does);
//! - `indexed`: the lookups the relay needs (unique delivery id, event id, queued rows by chain,
//!   ready rows, delivered rows by finish time) and the body in a table of its own;
//! - `chained`: `indexed` with the relay's life cycle: a chain's rows behind its head are written
//!   `waiting` and promoted to `ready` when the row before them finishes (three writes a row);
//! - `wide`: `chained` with rows as wide as the relay's `deliveries` rows (~450 bytes: ids of the
//!   run, webhook and lease, target URL, order key, source …, here one filler column), so each
//!   page holds as few rows as the relay's and each batch of state changes dirties as many pages;
//! - `split`: `wide` with the queue's mutable state in a narrow table of its own (seq, chain,
//!   ready), indexed by chain and readiness and deleted when the delivery finishes: the wide row
//!   is written when the event comes and once more when it finishes, a promotion touches only
//!   the narrow row (the change docs/BENCHMARKS.md, ninth session, points to; not the relay's
//!   schema);
//! - `log`: `split` with the wide row never written again: a delivery's outcome is a row appended
//!   to a table of outcomes by seq, so the wide rows and the outcomes are only ever appended to
//!   and only the narrow queue table is updated in place (the floor of that design; not the
//!   relay's schema);
//! - `cursor`: no per-row queue state at all: rows are appended and indexed by chain once, an
//!   outcome is appended, and each chain keeps one cursor row (its last finished seq); a
//!   chain's next row is read as the first after its cursor. A finished batch writes the
//!   outcomes' last pages and the cursors' few pages instead of a page for each row it touches
//!   (the floor of that design; not the relay's schema).
//!
//! - `relay`: the same work through the relay's own store (`Store` on SQLite, its `Queue`
//!   interface, as the embedded bus calls it), so the gap between the floor and the relay's
//!   store is measured here directly, away from the HTTP, delivery and scheduling around it.
//!
//! `cargo bench --bench store_floor` (a second or two); `STORE_FLOOR_ONLY=wide,relay` runs some
//! rows only. CPU time on a shared machine moves by tens of percent between runs; under
//! `valgrind --tool=callgrind` the instruction counts of a row repeat exactly, which is how
//! builds of the store are compared (docs/BENCHMARKS.md, tenth session).

use std::time::Instant;

use rusqlite::{params, Connection, OptionalExtension};

const EVENTS: usize = 20_000;
const CHAINS: usize = 200;
const INSERT_BATCH: usize = 500;
/// Rows finished a transaction; `STORE_FLOOR_FINISH_BATCH` sets another (the relay's outcome
/// writer commits ~20 at a time in the e2e bench's throughput phase, ~110 on a faster machine).
const FINISH_BATCH: usize = 110;

fn finish_batch() -> usize {
    std::env::var("STORE_FLOOR_FINISH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=EVENTS).contains(n))
        .unwrap_or(FINISH_BATCH)
}

fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(r.ru_utime) + t(r.ru_stime)
}

fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What one row of the table measures: CPU, wall time and bytes written from its start.
struct Meter {
    cpu: f64,
    bytes: u64,
    wall: Instant,
}

impl Meter {
    fn start() -> Meter {
        Meter {
            cpu: cpu_secs(),
            bytes: written_bytes(),
            wall: Instant::now(),
        }
    }

    /// The row `name` of the table, per event.
    fn print(&self, name: &str) {
        let (cpu, bytes, wall) = (cpu_secs() - self.cpu, written_bytes() - self.bytes, self.wall.elapsed());
        println!(
            "| {name} | {:.4} ms | {:.0} | {:.1} KB |",
            cpu * 1e3 / EVENTS as f64,
            EVENTS as f64 / wall.as_secs_f64(),
            bytes as f64 / EVENTS as f64 / 1e3
        );
    }
}

fn run(schema: &str, dir: &std::path::Path) {
    let c = Connection::open(dir.join(format!("{schema}.db"))).expect("open");
    c.pragma_update(None, "journal_mode", "wal").expect("wal");
    c.pragma_update(None, "synchronous", "full").expect("synchronous");
    let ddl = match schema {
        "minimal" => {
            "CREATE TABLE q (seq INTEGER PRIMARY KEY, id TEXT, event_id TEXT, chain TEXT, state TEXT, \
             finished_at INTEGER, body TEXT)"
        }
        "log" => {
            "CREATE TABLE q (seq INTEGER PRIMARY KEY, id TEXT UNIQUE, event_id TEXT, chain TEXT, state TEXT, \
             finished_at INTEGER, meta TEXT);
             CREATE INDEX q_event ON q(event_id);
             CREATE TABLE b (seq INTEGER PRIMARY KEY, body TEXT);
             CREATE TABLE o (seq INTEGER PRIMARY KEY, finished_at INTEGER, status INTEGER, duration INTEGER);
             CREATE TABLE n (seq INTEGER PRIMARY KEY, chain TEXT, ready INTEGER);
             CREATE INDEX n_chain ON n(chain, seq);
             CREATE INDEX n_due ON n(seq) WHERE ready = 1"
        }
        "cursor" => {
            "CREATE TABLE q (seq INTEGER PRIMARY KEY, id TEXT UNIQUE, event_id TEXT, chain TEXT, state TEXT, \
             finished_at INTEGER, meta TEXT);
             CREATE INDEX q_event ON q(event_id);
             CREATE INDEX q_chain ON q(chain, seq);
             CREATE TABLE b (seq INTEGER PRIMARY KEY, body TEXT);
             CREATE TABLE o (seq INTEGER PRIMARY KEY, finished_at INTEGER, status INTEGER, duration INTEGER);
             CREATE TABLE cur (chain TEXT PRIMARY KEY, done INTEGER NOT NULL) WITHOUT ROWID"
        }
        "split" => {
            "CREATE TABLE q (seq INTEGER PRIMARY KEY, id TEXT UNIQUE, event_id TEXT, chain TEXT, state TEXT, \
             finished_at INTEGER, meta TEXT);
             CREATE INDEX q_event ON q(event_id);
             CREATE INDEX q_finished ON q(finished_at) WHERE state = 'delivered';
             CREATE TABLE b (seq INTEGER PRIMARY KEY, body TEXT);
             CREATE TABLE n (seq INTEGER PRIMARY KEY, chain TEXT, ready INTEGER);
             CREATE INDEX n_chain ON n(chain, seq);
             CREATE INDEX n_due ON n(seq) WHERE ready = 1"
        }
        _ => {
            "CREATE TABLE q (seq INTEGER PRIMARY KEY, id TEXT UNIQUE, event_id TEXT, chain TEXT, state TEXT, \
             finished_at INTEGER, meta TEXT);
             CREATE INDEX q_event ON q(event_id);
             CREATE INDEX q_chain ON q(chain, seq) WHERE state IN ('ready', 'waiting');
             CREATE INDEX q_due ON q(seq) WHERE state = 'ready';
             CREATE INDEX q_finished ON q(finished_at) WHERE state = 'delivered';
             CREATE TABLE b (seq INTEGER PRIMARY KEY, body TEXT)"
        }
    };
    c.execute_batch(ddl).expect("schema");
    let body = "x".repeat(1024);
    let cursor = schema == "cursor";
    let log = schema == "log" || cursor;
    let split = schema == "split" || schema == "log";
    let chained = matches!(schema, "chained" | "wide" | "split" | "log" | "cursor");
    let meta = matches!(schema, "wide" | "split" | "log" | "cursor").then(|| "m".repeat(400));
    if cursor {
        for k in 0..CHAINS {
            c.execute(
                "INSERT INTO cur (chain, done) VALUES (?, 0)",
                params![format!("chain-{k}")],
            )
            .expect("cursor");
        }
    }
    let meter = Meter::start();
    let (mut inserted, mut finished) = (0usize, 0usize);
    while finished < EVENTS {
        if inserted < EVENTS {
            let end = (inserted + INSERT_BATCH).min(EVENTS);
            let tx = c.unchecked_transaction().expect("begin");
            // The body inline (`minimal`), or in `b` by the row's seq.
            let mut row = c
                .prepare_cached(if schema == "minimal" {
                    "INSERT INTO q (seq, id, event_id, chain, state, body) VALUES (?, ?, ?, ?, ?, ?)"
                } else {
                    "INSERT INTO q (seq, id, event_id, chain, state, meta) VALUES (?, ?, ?, ?, ?, ?)"
                })
                .expect("prepare");
            let mut apart = (schema != "minimal").then(|| {
                c.prepare_cached("INSERT INTO b (seq, body) VALUES (?, ?)")
                    .expect("prepare")
            });
            let mut narrow = split.then(|| {
                c.prepare_cached("INSERT INTO n (seq, chain, ready) VALUES (?, ?, ?)")
                    .expect("prepare")
            });
            for i in inserted..end {
                let seq = i as i64 + 1;
                // Event i belongs to chain i % CHAINS, so every batch spans every chain (as the e2e bench).
                let (id, event_id, chain) = (
                    format!("0193a7f2-{i:08}"),
                    format!("ev-{}-{}", i % CHAINS, i / CHAINS),
                    format!("chain-{}", i % CHAINS),
                );
                let head = !chained || i < CHAINS;
                let state = match (split, head) {
                    (true, _) => "queued",
                    (false, true) => "ready",
                    (false, false) => "waiting",
                };
                match apart.as_mut() {
                    None => row.execute(params![seq, id, event_id, chain, state, body]),
                    Some(apart) => row
                        .execute(params![seq, id, event_id, chain, state, meta])
                        .and_then(|_| apart.execute(params![seq, body])),
                }
                .expect("insert");
                if let Some(narrow) = narrow.as_mut() {
                    narrow.execute(params![seq, chain, head]).expect("insert narrow");
                }
            }
            drop((row, apart, narrow));
            tx.commit().expect("commit");
            inserted = end;
        }
        let end = (finished + finish_batch()).min(inserted);
        let tx = c.unchecked_transaction().expect("begin");
        let mut finish = c
            .prepare_cached(if log {
                "INSERT INTO o (finished_at, seq, status, duration) VALUES (?, ?, 200, 1)"
            } else {
                "UPDATE q SET state = 'delivered', finished_at = ? WHERE seq = ?"
            })
            .expect("prepare");
        let mut promote = c
            .prepare_cached(if cursor {
                // Read, not written: the chain's next row is the first after its cursor.
                "SELECT seq FROM q WHERE chain = ? AND seq > ? ORDER BY seq LIMIT 1"
            } else if split {
                "UPDATE n SET ready = 1 WHERE seq = ?"
            } else {
                "UPDATE q SET state = 'ready' WHERE seq = ?"
            })
            .expect("prepare");
        let mut dequeue = split.then(|| c.prepare_cached("DELETE FROM n WHERE seq = ?").expect("prepare"));
        let mut advance = cursor.then(|| {
            c.prepare_cached("UPDATE cur SET done = ? WHERE chain = ?")
                .expect("prepare")
        });
        for i in finished..end {
            finish.execute(params![1_i64, i as i64 + 1]).expect("finish");
            if let Some(dequeue) = dequeue.as_mut() {
                dequeue.execute(params![i as i64 + 1]).expect("dequeue");
            }
            if let Some(advance) = advance.as_mut() {
                let chain = format!("chain-{}", i % CHAINS);
                advance.execute(params![i as i64 + 1, chain]).expect("advance");
                let next: Option<i64> = promote
                    .query_row(params![chain, i as i64 + 1], |r| r.get(0))
                    .optional()
                    .expect("next");
                assert_eq!(next, (i + CHAINS < EVENTS).then_some((i + CHAINS) as i64 + 1));
                continue;
            }
            if chained && i + CHAINS < EVENTS {
                promote.execute(params![(i + CHAINS) as i64 + 1]).expect("promote");
            }
        }
        drop((finish, promote, dequeue, advance));
        tx.commit().expect("commit");
        finished = end;
    }
    meter.print(schema);
}

/// The relay's own store (`syncrelay::store::Store` on SQLite, as `cargo run` opens it) doing the
/// same work through its `Queue` interface, as the embedded bus asks it: each batch of 500
/// events queued and its chains' heads claimed (`enqueue_claiming`), the ready rows finished as
/// first-try successes `finish_batch()` at a time (`complete`, which promotes each finished
/// chain's next row). Rows as the router makes them (ids, run, webhook, chain of run and
/// webhook). Everything the relay's store code adds to the floor's statements shows here.
fn relay(dir: &std::path::Path) {
    use syncrelay::config::{StoreKind, StoreSettings, Synchronous};
    use syncrelay::store::{AttemptRecord, Completion, NewDelivery, Next, QueuedDelivery, Store};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = Store::open(&StoreSettings {
            kind: StoreKind::Sqlite,
            path: dir.join("relay.db"),
            url: String::new(),
            max_connections: 8,
            synchronous: Synchronous::Full,
            lease_ms: 60_000,
            encryption_key: String::new(),
            previous_encryption_keys: Vec::new(),
        })
        .await
        .expect("open the relay's store");
        let q = store.queue();
        let webhook = uuid::Uuid::now_v7().to_string();
        let runs: Vec<String> = (0..CHAINS).map(|_| uuid::Uuid::now_v7().to_string()).collect();
        let body = format!("{{\"payload\":\"{}\"}}", "x".repeat(1010));
        let now = 1_700_000_000_000_i64;
        let meter = Meter::start();
        let mut ready: std::collections::VecDeque<QueuedDelivery> = Default::default();
        let (mut inserted, mut finished) = (0usize, 0usize);
        while finished < EVENTS {
            if inserted < EVENTS {
                let end = (inserted + INSERT_BATCH).min(EVENTS);
                let batch: Vec<NewDelivery> = (inserted..end)
                    .map(|i| {
                        let run = &runs[i % CHAINS];
                        NewDelivery {
                            id: uuid::Uuid::now_v7().to_string(),
                            event_id: uuid::Uuid::now_v7().to_string(),
                            event: "sync_job_run:record".into(),
                            run_id: Some(run.clone()),
                            kind: "webhook",
                            webhook_id: Some(webhook.clone()),
                            target_url: None,
                            target_key: format!("w:{webhook}"),
                            order_key: Some(format!("w:{webhook}:{run}")),
                            body: body.clone(),
                            created_at: now,
                            attempts: 0,
                            first_attempt_at: None,
                            next_attempt_at: None,
                            source: None,
                            log: Vec::new(),
                        }
                    })
                    .collect();
                let claimed = q
                    .enqueue_claiming(&batch, &[], now, &Default::default(), &mut |_| {})
                    .await
                    .expect("enqueue");
                ready.extend(claimed);
                inserted = end;
            }
            let n = finish_batch().min(ready.len());
            let batch: Vec<Completion> = ready
                .drain(..n)
                .map(|r| Completion {
                    seq: r.seq,
                    delivery_id: r.id,
                    order_key: r.order_key,
                    attempt_no: 1,
                    first_attempt_at: now,
                    attempt: AttemptRecord {
                        started_at: now,
                        duration_ms: 1,
                        status: Some(200),
                        error: None,
                        excerpt: Some("ok".into()),
                    },
                    next: Next::Delivered,
                    kind: "webhook",
                    target_key: r.target_key,
                    created_at: r.created_at,
                    body: None,
                    run_id: r.run_id,
                    event: r.event,
                    resource: None,
                })
                .collect();
            let done = q.complete(&batch, now, &mut |_| {}, None).await.expect("complete");
            assert!(done.lost.is_empty(), "no lease is lost here");
            ready.extend(done.promoted);
            finished += batch.len();
        }
        meter.print("relay (its `Store`, through `Queue`)");
        store.close().await;
    });
}

fn main() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary folder");
    println!("SQLite store floor: {EVENTS} events of ~1 KiB, {CHAINS} chains, inserted {INSERT_BATCH} and finished {} a transaction, synchronous = full\n", finish_batch());
    println!("| schema | CPU an event | events/s | written to disk an event |");
    println!("|---|---:|---:|---:|");
    // `STORE_FLOOR_ONLY=wide,relay`: some rows only (under `valgrind`, say).
    let only = std::env::var("STORE_FLOOR_ONLY").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o.split(',').any(|w| w.trim() == name));
    for schema in ["minimal", "indexed", "chained", "wide", "split", "log", "cursor"] {
        if wanted(schema) {
            run(schema, dir.path());
        }
    }
    if wanted("relay") {
        relay(dir.path());
    }
}
