//! A model-based property test of the delivery queue (issue 11), on both stores: random
//! sequences of enqueue, claim, complete (2xx / retry / dead), lease expiry and "crash" (an
//! instance's handle dropped with everything it held in memory, and opened again) are run
//! against the real store — SQLite (one instance: one process per file) and PostgreSQL (two
//! instances sharing it) — and checked against a plain in-memory model after every step:
//!
//! - nothing accepted is lost: every accepted delivery is queued or finished as the model says;
//! - a chain never has two heads: at most one row of a chain is `ready`, and at most one claim
//!   of a chain's rows is live (held under an unexpired lease);
//! - a chain is delivered in order: rows finish exactly in the order they were accepted;
//! - every dead letter is accounted for: the store's dead letters are exactly the model's;
//! - a claim or completion is answered exactly as the lease rules say (claimable when unleased,
//!   own or expired; a completion is written only by the lease's holder).
//!
//! Time is synthetic (every queue method takes `now`), so lease expiry costs no sleeping.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use syncrelay::config::{StoreKind, StoreSettings, Synchronous};
use syncrelay::store::{AttemptRecord, Completion, NewDeadLetter, NewDelivery, Next, QueuedDelivery, Store};

const LEASE_MS: i64 = 1000;
const CHAINS: usize = 3;

#[derive(Debug, Clone)]
enum Outcome {
    Delivered,
    Retry,
    Dead,
}

#[derive(Debug, Clone)]
enum Op {
    /// Instance `inst` accepts `n` new deliveries of chain `chain`.
    Enqueue { inst: usize, chain: usize, n: usize },
    /// Instance `inst` claims what is due.
    Claim { inst: usize },
    /// Instance `inst` finishes the `pick`-th row it holds.
    Complete { inst: usize, pick: usize, outcome: Outcome },
    /// Time passes: every lease taken so far expires.
    Expire,
    /// A little time passes (retries fall due).
    Tick,
    /// Instance `inst` dies and starts again: its memory (what it held) is gone.
    Crash { inst: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, 0..CHAINS, 1..4usize).prop_map(|(inst, chain, n)| Op::Enqueue { inst, chain, n }),
        3 => (0..2usize).prop_map(|inst| Op::Claim { inst }),
        5 => (0..2usize, 0..8usize, prop_oneof![3 => Just(Outcome::Delivered), 2 => Just(Outcome::Retry), 1 => Just(Outcome::Dead)])
            .prop_map(|(inst, pick, outcome)| Op::Complete { inst, pick, outcome }),
        1 => Just(Op::Expire),
        2 => Just(Op::Tick),
        1 => (0..2usize).prop_map(|inst| Op::Crash { inst }),
    ]
}

/// One accepted delivery, as the model sees it.
#[derive(Debug, Clone)]
struct Row {
    id: String,
    chain: usize,
    /// Finished (delivered or dead).
    done: bool,
    dead: bool,
    /// When it is due (a retry sets it).
    due_at: i64,
    attempts: i64,
    /// The lease: (holder's generation, until). A generation is one life of one instance.
    lease: Option<(u64, i64)>,
}

struct Instance {
    store: Store,
    gen: u64,
    /// What it holds in memory (claimed, not yet completed): its copy of the row.
    held: Vec<QueuedDelivery>,
}

struct Model {
    rows: Vec<Row>,
    /// Finish order per chain.
    finished: BTreeMap<usize, Vec<String>>,
    now: i64,
    next_id: usize,
    next_gen: u64,
}

impl Model {
    fn idx(&self, id: &str) -> usize {
        self.rows.iter().position(|r| r.id == id).expect("known row")
    }
    /// The chain's first unfinished row.
    fn head(&self, chain: usize) -> Option<usize> {
        self.rows.iter().position(|r| r.chain == chain && !r.done)
    }
}

fn settings(kind: StoreKind, path: &std::path::Path, url: &str) -> StoreSettings {
    StoreSettings {
        kind,
        path: path.to_path_buf(),
        url: url.to_string(),
        max_connections: 2,
        synchronous: Synchronous::Normal,
        lease_ms: LEASE_MS as u64,
        encryption_key: String::new(),
        previous_encryption_keys: Vec::new(),
    }
}

fn new_delivery(id: &str, chain: usize, now: i64) -> NewDelivery {
    NewDelivery {
        id: id.into(),
        event_id: format!("ev-{id}"),
        event: "record:created".into(),
        run_id: None,
        kind: "webhook",
        webhook_id: Some("wh".into()),
        target_url: None,
        target_key: "w:wh".into(),
        order_key: Some(format!("chain{chain}")),
        body: format!("{{\"id\":\"{id}\"}}"),
        created_at: now,
        attempts: 0,
        first_attempt_at: None,
        next_attempt_at: None,
        source: None,
        log: Vec::new(),
    }
}

fn completion(q: &QueuedDelivery, outcome: &Outcome, now: i64) -> Completion {
    let next = match outcome {
        Outcome::Delivered => Next::Delivered,
        Outcome::Retry => Next::Retry { at_ms: now + 5 },
        Outcome::Dead => Next::Dead(NewDeadLetter {
            delivery_id: Some(q.id.clone()),
            event_id: q.event_id.clone(),
            event: q.event.clone(),
            webhook_id: q.webhook_id.clone(),
            kind: "webhook",
            reason: "attempts_exhausted",
            attempts: q.attempts + 1,
            last_status: Some(500),
            last_error: None,
            raw: q.body.clone(),
        }),
    };
    Completion {
        seq: q.seq,
        delivery_id: q.id.clone(),
        order_key: q.order_key.clone(),
        attempt_no: q.attempts + 1,
        first_attempt_at: now,
        attempt: AttemptRecord {
            started_at: now,
            duration_ms: 1,
            status: Some(if matches!(outcome, Outcome::Delivered) {
                200
            } else {
                500
            }),
            error: None,
            excerpt: None,
        },
        next,
        kind: "webhook",
        target_key: q.target_key.clone(),
        created_at: q.created_at,
        body: None,
        run_id: None,
        event: q.event.clone(),
        resource: None,
    }
}

fn chain_of(q: &QueuedDelivery) -> usize {
    q.order_key
        .as_deref()
        .unwrap()
        .trim_start_matches("chain")
        .parse()
        .unwrap()
}

/// Run one sequence of operations against a fresh database; the first broken rule fails it.
async fn run_case(kind: StoreKind, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let url = match kind {
        StoreKind::Postgres => support::postgres::database(),
        StoreKind::Sqlite => String::new(),
    };
    let s = settings(kind, &dir.path().join("q.db"), &url);
    // SQLite serves one process: one instance. PostgreSQL: two sharing the database.
    let n_inst = if kind == StoreKind::Sqlite { 1 } else { 2 };
    let mut m = Model {
        rows: Vec::new(),
        finished: BTreeMap::new(),
        now: 1_000_000,
        next_id: 0,
        next_gen: 0,
    };
    let mut insts = Vec::new();
    for _ in 0..n_inst {
        m.next_gen += 1;
        insts.push(Instance {
            store: Store::open(&s).await.unwrap(),
            gen: m.next_gen,
            held: Vec::new(),
        });
    }
    for op in ops {
        m.now += 1;
        let now = m.now;
        'step: {
            match op {
                Op::Enqueue { inst, chain, n } => {
                    let i = inst % n_inst;
                    let busy = m.head(chain).is_some();
                    let new: Vec<NewDelivery> = (0..n)
                        .map(|_| {
                            m.next_id += 1;
                            new_delivery(&format!("d{}", m.next_id), chain, now)
                        })
                        .collect();
                    let ready = insts[i]
                        .store
                        .enqueue_claiming(&new, &[], now, &HashSet::new(), |_| {})
                        .await
                        .unwrap();
                    for d in &new {
                        m.rows.push(Row {
                            id: d.id.clone(),
                            chain,
                            done: false,
                            dead: false,
                            due_at: now,
                            attempts: 0,
                            lease: None,
                        });
                    }
                    // The first new row is the chain's head (leased to this instance) unless the
                    // chain had rows queued already.
                    let want: Vec<&str> = if busy { vec![] } else { vec![new[0].id.as_str()] };
                    let got: Vec<&str> = ready.iter().map(|q| q.id.as_str()).collect();
                    prop_assert_eq!(&got, &want, "enqueue: rows ready now");
                    for q in ready {
                        let x = m.idx(&q.id);
                        m.rows[x].lease = Some((insts[i].gen, now + LEASE_MS));
                        insts[i].held.push(q);
                    }
                }
                Op::Claim { inst } => {
                    let i = inst % n_inst;
                    let gen = insts[i].gen;
                    let got = insts[i].store.due(now, 10, &[]).await.unwrap();
                    let claimable = |r: &Row| match r.lease {
                        None => true,
                        Some((g, until)) => g == gen || until <= now,
                    };
                    let mut expect: Vec<String> = (0..CHAINS)
                        .filter_map(|c| m.head(c))
                        .filter(|&x| m.rows[x].due_at <= now && claimable(&m.rows[x]))
                        .map(|x| m.rows[x].id.clone())
                        .collect();
                    expect.sort();
                    let mut ids: Vec<String> = got.iter().map(|q| q.id.clone()).collect();
                    ids.sort();
                    prop_assert_eq!(&ids, &expect, "claim: exactly the due, claimable heads");
                    for q in got {
                        let x = m.idx(&q.id);
                        prop_assert_eq!(q.attempts, m.rows[x].attempts, "claim: attempts of {}", q.id);
                        m.rows[x].lease = Some((gen, now + LEASE_MS));
                        if !insts[i].held.iter().any(|h| h.seq == q.seq) {
                            insts[i].held.push(q);
                        }
                    }
                }
                Op::Complete { inst, pick, outcome } => {
                    let i = inst % n_inst;
                    if insts[i].held.is_empty() {
                        break 'step;
                    }
                    let gen = insts[i].gen;
                    let at = pick % insts[i].held.len();
                    let q = insts[i].held.remove(at);
                    let x = m.idx(&q.id);
                    // Written only by the lease's holder, while the row is unfinished.
                    let holds = !m.rows[x].done && m.rows[x].lease.is_some_and(|(g, _)| g == gen);
                    let mut q = q;
                    q.attempts = m.rows[x].attempts;
                    let done = insts[i]
                        .store
                        .complete(&[completion(&q, &outcome, now)], now, |_| {})
                        .await
                        .unwrap();
                    prop_assert_eq!(
                        done.lost.is_empty(),
                        holds,
                        "complete {} ({:?}): written iff held",
                        &q.id,
                        &outcome
                    );
                    if !holds {
                        prop_assert!(done.promoted.is_empty());
                        break 'step;
                    }
                    m.rows[x].attempts += 1;
                    m.rows[x].lease = None;
                    match outcome {
                        Outcome::Retry => m.rows[x].due_at = now + 5,
                        Outcome::Delivered | Outcome::Dead => {
                            m.rows[x].done = true;
                            m.rows[x].dead = matches!(outcome, Outcome::Dead);
                            m.finished.entry(m.rows[x].chain).or_default().push(q.id.clone());
                            // The next row of its chain is promoted, leased to this instance.
                            let next = m.head(m.rows[x].chain);
                            let want: Vec<String> = next.iter().map(|&n| m.rows[n].id.clone()).collect();
                            let got: Vec<String> = done.promoted.iter().map(|p| p.id.clone()).collect();
                            prop_assert_eq!(&got, &want, "complete {}: promoted", &q.id);
                            if let Some(n) = next {
                                m.rows[n].due_at = now;
                                m.rows[n].lease = Some((gen, now + LEASE_MS));
                            }
                            insts[i].held.extend(done.promoted);
                        }
                    }
                }
                Op::Expire => m.now += LEASE_MS + 1,
                Op::Tick => m.now += 10,
                Op::Crash { inst } => {
                    let i = inst % n_inst;
                    insts[i].store.close().await;
                    m.next_gen += 1;
                    insts[i] = Instance {
                        store: Store::open(&s).await.unwrap(),
                        gen: m.next_gen,
                        held: Vec::new(),
                    };
                    if kind == StoreKind::Sqlite {
                        // One process per file: opening releases the leases of its earlier life.
                        for r in &mut m.rows {
                            r.lease = None;
                        }
                    }
                }
            }
        }
        check(&m, &insts).await?;
    }
    for inst in insts {
        inst.store.close().await;
    }
    Ok(())
}

/// The invariants, read from the store after every step.
async fn check(m: &Model, insts: &[Instance]) -> Result<(), TestCaseError> {
    let store = &insts[0].store;
    let mut ready_per_chain: HashMap<usize, usize> = HashMap::new();
    for r in &m.rows {
        // Nothing accepted is lost: every row is where the model says.
        let Some(d) = store.get_delivery(&r.id).await.unwrap() else {
            return Err(TestCaseError::fail(format!("{} accepted, then lost", r.id)));
        };
        let want = match (r.done, r.dead) {
            (true, true) => "dead",
            (true, false) => "delivered",
            (false, _) if m.head(r.chain) == Some(m.idx(&r.id)) => "ready",
            (false, _) => "waiting",
        };
        prop_assert_eq!(d.state.as_str(), want, "state of {}", &r.id);
        prop_assert_eq!(d.attempts, r.attempts, "attempts of {}", &r.id);
        if d.state == "ready" {
            *ready_per_chain.entry(r.chain).or_default() += 1;
        }
    }
    // One head per chain.
    prop_assert!(
        ready_per_chain.values().all(|n| *n <= 1),
        "two heads: {:?}",
        ready_per_chain
    );
    // At most one live claim per chain over all instances.
    let mut live: HashMap<usize, Vec<&str>> = HashMap::new();
    for inst in insts {
        for q in &inst.held {
            let r = &m.rows[m.idx(&q.id)];
            if !r.done && r.lease.is_some_and(|(g, until)| g == inst.gen && until > m.now) {
                live.entry(chain_of(q)).or_default().push(&q.id);
            }
        }
    }
    prop_assert!(
        live.values().all(|v| v.len() <= 1),
        "two live claims in one chain: {:?}",
        live
    );
    // Chains finish in the order they were accepted.
    for (chain, done) in &m.finished {
        let order: Vec<&String> = m
            .rows
            .iter()
            .filter(|r| r.chain == *chain)
            .map(|r| &r.id)
            .take(done.len())
            .collect();
        prop_assert_eq!(done.iter().collect::<Vec<_>>(), order, "chain {} order", chain);
    }
    // Every dead letter accounted for: exactly the model's dead rows, once each.
    let dl = store.list_dead_letters(&Default::default(), 0, 1000).await.unwrap();
    let mut got: Vec<String> = dl.results.iter().filter_map(|d| d.delivery_id.clone()).collect();
    got.sort();
    let mut want: Vec<String> = m.rows.iter().filter(|r| r.dead).map(|r| r.id.clone()).collect();
    want.sort();
    prop_assert_eq!(got, want, "dead letters");
    Ok(())
}

fn run_model(kind: StoreKind, cases: u32) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases,
        // Shrinking re-runs cases against a fresh database each: keep it bounded.
        max_shrink_iters: 200,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        rt.block_on(run_case(kind, ops))
    });
    if let Err(e) = result {
        panic!("{kind:?}: {e}");
    }
}

#[test]
fn the_sqlite_queue_behaves_like_the_model() {
    run_model(StoreKind::Sqlite, 48);
}

#[test]
fn the_postgres_queue_shared_by_two_instances_behaves_like_the_model() {
    run_model(StoreKind::Postgres, 48);
}
