//! What every store implementation must do, written against the [`Store`] handle only, so the
//! every implementation runs the same checks against itself: [`suite!`] makes one `#[tokio::test]`
//! per check for a backend, given a function that opens a fresh, empty store of that backend
//! (`sqlite::tests`, `postgres::tests`).
//!
//! The integration suites cover the same behaviour end to end; these pin the contract at the
//! interface, where a second implementation is most likely to differ.

use serde_json::json;

/// One test per check of this module against one backend. `$open` is an async fn answering a
/// fresh, empty [`Store`] and a guard that keeps its data alive for the test.
macro_rules! suite {
    ($open:path) => {
        #[tokio::test]
        async fn conformance_chains_are_delivered_in_order() {
            let (store, _guard) = $open().await;
            crate::store::conformance::chains_are_delivered_in_order(&store).await;
        }

        #[tokio::test]
        async fn conformance_memory_deliveries_are_held_logged_and_parked() {
            let (store, _guard) = $open().await;
            crate::store::conformance::memory_deliveries_are_held_logged_and_parked(&store).await;
        }

        #[tokio::test]
        async fn conformance_with_runs_saves_only_what_changed() {
            let (store, _guard) = $open().await;
            crate::store::conformance::with_runs_saves_only_what_changed(&store).await;
        }

        #[tokio::test]
        async fn conformance_outcomes_and_their_run_counts_commit_together() {
            let (store, _guard) = $open().await;
            crate::store::conformance::outcomes_and_their_run_counts_commit_together(&store).await;
        }

        #[tokio::test]
        async fn conformance_a_first_try_success_keeps_its_attempt_on_its_row() {
            let (store, _guard) = $open().await;
            crate::store::conformance::a_first_try_success_keeps_its_attempt_on_its_row(&store).await;
        }

        #[tokio::test]
        async fn conformance_dropping_and_purging() {
            let (store, _guard) = $open().await;
            crate::store::conformance::dropping_and_purging(&store).await;
        }

        #[tokio::test]
        async fn conformance_purge_keeps_what_the_log_mode_keeps() {
            let (store, _guard) = $open().await;
            crate::store::conformance::purge_keeps_what_the_log_mode_keeps(&store).await;
        }

        #[tokio::test]
        async fn conformance_sync_fronts_storage() {
            let (store, _guard) = $open().await;
            crate::store::conformance::sync_fronts_storage(&store).await;
        }

        #[tokio::test]
        async fn conformance_paused_syncs_hold_their_rows_until_released() {
            let (store, _guard) = $open().await;
            crate::store::conformance::paused_syncs_hold_their_rows_until_released(&store).await;
        }

        #[tokio::test]
        async fn conformance_census_syncs_and_alert_state() {
            let (store, _guard) = $open().await;
            crate::store::conformance::census_syncs_and_alert_state(&store).await;
        }

        #[tokio::test]
        async fn conformance_leases_are_renewed_and_checked() {
            let (store, _guard) = $open().await;
            crate::store::conformance::leases_are_renewed_and_checked(&store).await;
        }

        #[tokio::test]
        async fn conformance_registry_jobs_and_commands_round_trip() {
            let (store, _guard) = $open().await;
            crate::store::conformance::registry_jobs_and_commands_round_trip(&store).await;
        }

        #[tokio::test]
        async fn conformance_secrets_are_stored_sealed_and_resealed_only_if_unchanged() {
            let (store, _guard) = $open().await;
            crate::store::conformance::secrets_are_stored_sealed_and_resealed_only_if_unchanged(store).await;
        }

        #[tokio::test]
        async fn conformance_failures_are_purged_after_their_retention() {
            let (store, _guard) = $open().await;
            crate::store::conformance::failures_are_purged_after_their_retention(&store).await;
        }

        #[tokio::test]
        async fn conformance_overlapping_writes_to_one_chain_keep_its_order() {
            let (store, _guard) = $open().await;
            crate::store::conformance::overlapping_writes_to_one_chain_keep_its_order(&store).await;
        }

        #[tokio::test]
        async fn conformance_a_message_read_again_records_only_its_new_deliveries() {
            let (store, _guard) = $open().await;
            crate::store::conformance::a_message_read_again_records_only_its_new_deliveries(&store).await;
        }

        #[tokio::test]
        async fn conformance_replay_by_more_ids_than_a_statement_binds() {
            let (store, _guard) = $open().await;
            crate::store::conformance::replay_by_more_ids_than_a_statement_binds(&store).await;
        }
    };
}
pub(crate) use suite;

use super::*;
use crate::runs::model::{ErrorHandling, Stats, Status};

pub(crate) fn delivery(id: &str, order_key: Option<&str>, run_id: Option<&str>, now: i64) -> NewDelivery {
    NewDelivery {
        id: id.into(),
        event_id: format!("ev-{id}"),
        event: "sync_job_run:record".into(),
        run_id: run_id.map(str::to_string),
        kind: "webhook",
        webhook_id: Some("wh".into()),
        target_url: None,
        target_key: "webhook:wh".into(),
        order_key: order_key.map(str::to_string),
        body: json!({"id": id}).to_string(),
        created_at: now,
        attempts: 0,
        first_attempt_at: None,
        next_attempt_at: None,
        source: None,
        log: Vec::new(),
    }
}

pub(crate) fn completion(q: &QueuedDelivery, next: Next, now: i64) -> Completion {
    Completion {
        seq: q.seq,
        delivery_id: q.id.clone(),
        order_key: q.order_key.clone(),
        attempt_no: q.attempts + 1,
        first_attempt_at: now,
        attempt: AttemptRecord {
            started_at: now,
            duration_ms: 5,
            status: Some(if matches!(next, Next::Delivered) { 200 } else { 500 }),
            error: None,
            excerpt: Some("ok".into()),
        },
        next,
        kind: "webhook",
        target_key: q.target_key.clone(),
        created_at: q.created_at,
        body: None,
        run_id: q.run_id.clone(),
        event: q.event.clone(),
        resource: None,
    }
}

fn dead_letter(q: &QueuedDelivery) -> NewDeadLetter {
    dead_letter_of(&q.id, &q.event_id, &q.event, q.webhook_id.as_deref(), &q.body)
}

/// The dead letter of a delivery given by its parts, exhausted after one attempt answered 500.
fn dead_letter_of(id: &str, event_id: &str, event: &str, webhook_id: Option<&str>, body: &str) -> NewDeadLetter {
    NewDeadLetter {
        delivery_id: Some(id.into()),
        event_id: event_id.into(),
        event: event.into(),
        webhook_id: webhook_id.map(str::to_string),
        kind: "webhook",
        reason: "exhausted",
        attempts: 1,
        last_status: Some(500),
        last_error: None,
        raw: body.into(),
    }
}

/// How many open dead letters delivery `id` has.
async fn open_dead_letters_of(store: &Store, id: &str) -> usize {
    let open = store
        .list_dead_letters(&DeadLetterFilter::default(), 0, 10)
        .await
        .unwrap();
    open.results
        .iter()
        .filter(|d| d.delivery_id.as_deref() == Some(id))
        .count()
}

pub(crate) fn ids(rows: &[QueuedDelivery]) -> Vec<&str> {
    rows.iter().map(|q| q.id.as_str()).collect()
}

/// Each row's body is the one [`delivery`] made for its id.
fn assert_own_bodies(rows: &[QueuedDelivery]) {
    for q in rows {
        assert_eq!(q.body, json!({"id": q.id}).to_string(), "the body of {}", q.id);
    }
}

/// A delivery answered 2xx at its first attempt, stored (embedded) or logged (Kafka), lists that
/// attempt as it was, though it is kept on the delivery's row rather than in the attempt log; one
/// that took two attempts lists both.
pub(crate) async fn a_first_try_success_keeps_its_attempt_on_its_row(store: &Store) {
    let now = crate::domain::now_ms();
    let rows = [delivery("f1", None, None, now), delivery("f2", None, None, now)];
    let ready = store
        .enqueue_claiming(&rows, &[], now, &HashSet::new(), |_| {})
        .await
        .unwrap();
    assert_eq!(ids(&ready), ["f1", "f2"]);
    let first = completion(&ready[0], Next::Delivered, now);
    let retry = completion(&ready[1], Next::Retry { at_ms: now }, now);
    store.complete(&[first, retry], now, |_| {}).await.unwrap();
    let again = store.due(now, 10, &[]).await.unwrap();
    assert_eq!(ids(&again), ["f2"]);
    let mut second = completion(&again[0], Next::Delivered, now + 1);
    second.attempt.duration_ms = 9;
    store.complete(&[second], now, |_| {}).await.unwrap();

    let expect = |n: i64, started_at: i64, duration_ms: i64, status: i64| AttemptRow {
        n,
        started_at,
        duration_ms,
        status: Some(status),
        error: None,
        response_excerpt: Some("ok".into()),
    };
    assert_eq!(store.list_attempts("f1").await.unwrap(), [expect(1, now, 5, 200)]);
    assert_eq!(
        store.list_attempts("f2").await.unwrap(),
        [expect(1, now, 5, 500), expect(2, now + 1, 9, 200)]
    );

    // Logged by the Kafka path after its only attempt.
    let mut logged = delivery("f3", None, None, now);
    logged.first_attempt_at = Some(now);
    logged.log = vec![AttemptRecord {
        started_at: now,
        duration_ms: 4,
        status: Some(204),
        error: None,
        excerpt: Some("ok".into()),
    }];
    store
        .record(
            &[Logged {
                delivery: logged,
                state: "delivered",
            }],
            &[],
            &[],
            now,
            None,
        )
        .await
        .unwrap();
    assert_eq!(store.list_attempts("f3").await.unwrap(), [expect(1, now, 4, 204)]);
    assert!(store.list_attempts("nobody").await.unwrap().is_empty());
}

/// A chain is delivered one row at a time, in order; claims see exactly the rows that became
/// ready; a dead letter can be replayed onto its chain.
pub(crate) async fn chains_are_delivered_in_order(store: &Store) {
    let now = crate::domain::now_ms();
    let rows = [
        delivery("a1", Some("k"), Some("run"), now),
        delivery("a2", Some("k"), Some("run"), now),
        delivery("b1", None, Some("run"), now),
    ];
    let mut claimed = Vec::new();
    let ready = store
        .enqueue_claiming(&rows, &[], now, &HashSet::new(), |r| claimed = r.to_vec())
        .await
        .unwrap();
    // The chain's head and the row with no chain; a2 waits behind a1.
    assert_eq!(ids(&ready), ["a1", "b1"]);
    assert_eq!(ids(&claimed), ["a1", "b1"]);
    let due = store.due(now, 10, &[]).await.unwrap();
    assert_eq!(ids(&due), ["a1", "b1"]);
    // Bodies are kept apart from their rows (written once): every way a row is handed out
    // brings its own.
    assert_own_bodies(&ready);
    assert_own_bodies(&due);
    assert!(store
        .due(now, 10, &["webhook:wh".to_string()])
        .await
        .unwrap()
        .is_empty());
    assert!(store.has_active("k").await.unwrap());
    assert_eq!(store.active_order_keys().await.unwrap(), ["k"]);
    assert_eq!(store.queue_stats().await.unwrap(), (3, Some(now)));

    // A retry keeps the chain's head; finishing it promotes the next row.
    let a1 = ready[0].clone();
    let retry = completion(&a1, Next::Retry { at_ms: now + 60_000 }, now);
    let done = store.complete(&[retry], now, |_| {}).await.unwrap();
    assert!(done.promoted.is_empty() && done.lost.is_empty());
    assert_eq!(store.next_due_after(now).await.unwrap(), Some(now + 60_000));
    // The retry released the claim: the row is claimed again when due, then finished.
    let mut delivered = completion(&a1, Next::Delivered, now);
    delivered.attempt_no = 2;
    let lost = store.complete(&[delivered.clone()], now, |_| {}).await.unwrap();
    assert_eq!(
        lost.lost,
        [a1.seq],
        "not claimed since the retry: not this handle's to finish"
    );
    assert!(ids(&store.due(now + 60_000, 10, &[]).await.unwrap()).contains(&"a1"));
    let mut claimed = Vec::new();
    let promoted = store
        .complete(&[delivered], now, |r| claimed = r.to_vec())
        .await
        .unwrap()
        .promoted;
    assert_eq!(ids(&promoted), ["a2"]);
    assert_eq!(ids(&claimed), ["a2"]);
    assert_own_bodies(&promoted);

    // The last row of the chain dies: the chain is idle, the log shows it all.
    let a2 = promoted[0].clone();
    store
        .complete(&[completion(&a2, Next::Dead(dead_letter(&a2)), now)], now, |_| {})
        .await
        .unwrap();
    assert!(!store.has_active("k").await.unwrap());
    let dead = DeliveryFilter {
        status: Some("dead".into()),
        ..Default::default()
    };
    let page = store.list_deliveries(&dead, 0, 10).await.unwrap();
    assert_eq!(page.results.len(), 1);
    assert_eq!((page.results[0].id.as_str(), page.results[0].attempts), ("a2", 1));
    let a1_log = store.get_delivery("a1").await.unwrap().unwrap();
    assert_eq!((a1_log.state.as_str(), a1_log.finished_at), ("delivered", Some(now)));
    assert_eq!(a1_log.body, json!({"id": "a1"}).to_string());
    assert_eq!(page.results[0].body, json!({"id": "a2"}).to_string());
    let attempts = store.list_attempts("a1").await.unwrap();
    assert_eq!(attempts.iter().map(|a| a.n).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(attempts[1].status, Some(200));

    // Pages: one row a page, the cursor leads to the next.
    let all = DeliveryFilter::default();
    let first = store.list_deliveries(&all, 0, 1).await.unwrap();
    let after = parse_cursor(first.next_cursor.as_deref()).unwrap();
    let second = store.list_deliveries(&all, after, 10).await.unwrap();
    assert_eq!((first.results[0].id.as_str(), second.results.len()), ("a1", 2));
    assert!(second.next_cursor.is_none());

    // Replay re-queues the dead delivery at the end of its (idle) chain, ready.
    let dls = store
        .list_dead_letters(&DeadLetterFilter::default(), 0, 10)
        .await
        .unwrap();
    assert_eq!(dls.results.len(), 1);
    assert_eq!(dls.results[0].reason, "exhausted");
    let mut asked = Vec::new();
    let (replayed, requeued, held, raws) = store
        .replay_dead_letters(
            Some(&[dls.results[0].id.clone()]),
            &DeadLetterFilter::default(),
            10,
            now,
            |keys| {
                asked = keys.to_vec();
                HashSet::new()
            },
        )
        .await
        .unwrap();
    assert_eq!((requeued, held.len(), raws.len()), (1, 0, 0));
    assert_eq!(asked, ["k"]);
    assert_eq!(replayed.len(), 1);
    assert_eq!((replayed[0].event_id.as_str(), replayed[0].attempts), ("ev-a2", 0));
    assert_eq!(
        replayed[0].body,
        json!({"id": "a2"}).to_string(),
        "the dead delivery's body"
    );
    assert!(store.has_active("k").await.unwrap());
    let open = store
        .list_dead_letters(&DeadLetterFilter::default(), 0, 10)
        .await
        .unwrap();
    assert!(open.results.is_empty(), "a replayed dead letter is no longer open");

    // Stopping the run drops what is queued, except what is in flight.
    let b1 = ready[1].clone();
    let dropped = store.drop_queued_for_run("run", &[b1.seq], now).await.unwrap();
    assert_eq!(dropped.len(), 1, "the replayed row; b1 is in flight");
    assert_eq!(dropped[0].2, json!({"id": "a2"}).to_string());
    assert_eq!(store.queue_stats().await.unwrap().0, 1);

    // A completion that sent another body than the queued one (a run's `completed` with its
    // final counts) leaves that body in the log.
    let mut sent = completion(&b1, Next::Delivered, now);
    sent.body = Some(json!({"id": "b1", "final": true}).to_string());
    store.complete(&[sent], now, |_| {}).await.unwrap();
    let b1_log = store.get_delivery("b1").await.unwrap().unwrap();
    assert_eq!(b1_log.body, json!({"id": "b1", "final": true}).to_string());
}

/// The memory path (Kafka): rows held behind a head kept in memory wait until promoted; what
/// memory finished is logged with its attempts; a parked group goes ahead of the held rows.
pub(crate) async fn memory_deliveries_are_held_logged_and_parked(store: &Store) {
    let now = crate::domain::now_ms();
    let held: HashSet<String> = ["m".to_string()].into();
    let rows = [
        delivery("x1", Some("m"), None, now),
        delivery("x2", Some("m"), None, now),
    ];
    let ready = store.enqueue_claiming(&rows, &[], now, &held, |_| {}).await.unwrap();
    assert!(ready.is_empty(), "a held chain's rows wait");
    let promoted = store.promote(&["m".to_string()], now, |_| {}).await.unwrap();
    assert_eq!(ids(&promoted), ["x1"]);
    assert!(store.promote(&["m".to_string()], now, |_| {}).await.unwrap().is_empty());

    let attempt = AttemptRecord {
        started_at: now,
        duration_ms: 3,
        status: Some(503),
        error: None,
        excerpt: None,
    };
    let mut done = delivery("y1", None, None, now);
    done.log = vec![
        attempt.clone(),
        AttemptRecord {
            status: Some(200),
            ..attempt.clone()
        },
    ];
    let mut parked = delivery("p1", Some("m"), None, now);
    parked.log = vec![attempt];
    parked.attempts = 1;
    store
        .record(
            &[Logged {
                delivery: done,
                state: "delivered",
            }],
            &[(vec![parked], true)],
            &[],
            now,
            None,
        )
        .await
        .unwrap();
    let y1 = store.get_delivery("y1").await.unwrap().unwrap();
    assert_eq!(
        (y1.state.as_str(), y1.attempts, y1.last_status),
        ("delivered", 2, Some(200))
    );
    assert_eq!(store.list_attempts("y1").await.unwrap().len(), 2);
    assert_eq!(store.list_attempts("p1").await.unwrap().len(), 1);
    // The chain's order: its head, the parked row, then the row that was held behind it.
    let all = store
        .list_deliveries(&DeliveryFilter::default(), 0, 10)
        .await
        .unwrap()
        .results;
    let chain: Vec<(&str, &str)> = all
        .iter()
        .filter(|d| d.id != "y1")
        .map(|d| (d.id.as_str(), d.state.as_str()))
        .collect();
    assert_eq!(chain, [("x1", "ready"), ("p1", "waiting"), ("x2", "waiting")]);
}

pub(crate) fn run(id: &str, now: i64) -> Run {
    Run {
        id: id.into(),
        sync_job_id: "job".into(),
        integrated_account_id: "acct".into(),
        webhook_id: None,
        daemon_group_key: Some("default".into()),
        daemon_id: None,
        callback_url: None,
        args: json!({}),
        resources: json!([]),
        sync_job: json!({}),
        error_handling: ErrorHandling::Batch,
        ignore_previous_run: false,
        status: Status::Created,
        resource_stats: Stats::new(),
        illegal_transitions: 0,
        stop_reason: None,
        created_at: now,
        updated_at: now,
        started_at: None,
        finished_at: None,
        sync_unit_id: None,
        seq: 0,
    }
}

/// `with_runs` hands over exactly the runs that exist and writes back only the changed ones,
/// batch included.
pub(crate) async fn with_runs_saves_only_what_changed(store: &Store) {
    let now = crate::domain::now_ms();
    store.insert_run(&run("r1", now)).await.unwrap();
    store.insert_run(&run("r2", now)).await.unwrap();

    let seen = store.with_runs(&["nobody"], |runs| runs.is_empty()).await.unwrap();
    assert!(seen, "unknown runs: called with nothing");

    store
        .with_runs(&["r1", "r2", "nobody"], |runs| {
            assert!(runs.get_mut("nobody").is_none());
            let r1 = runs.get_mut("r1").unwrap();
            r1.run.status = Status::Running;
            r1.batch.errors.push(json!({"e": 1}));
            r1.batch.bytes = 8;
            r1.batch.since = Some(now - 10);
            r1.changed = true;
            // Changed but not marked: not saved.
            runs.get_mut("r2").unwrap().run.status = Status::Failed;
        })
        .await
        .unwrap();
    assert_eq!(store.get_run("r1").await.unwrap().unwrap().status, Status::Running);
    assert_eq!(store.get_run("r2").await.unwrap().unwrap().status, Status::Created);

    assert_eq!(store.runs_with_due_batches(now, 10).await.unwrap(), ["r1"]);
    assert!(store.runs_with_due_batches(now - 11, 10).await.unwrap().is_empty());
    let batch = store
        .with_runs(&["r1"], |runs| runs.get_mut("r1").unwrap().batch.clone())
        .await
        .unwrap();
    assert_eq!(
        (batch.errors, batch.bytes, batch.since),
        (vec![json!({"e": 1})], 8, Some(now - 10))
    );
}

/// Run counts handed to `complete` and `record` are made in their transaction: they are told
/// which deliveries the transaction did not apply (a completion whose lease was lost; a memory
/// delivery recorded before, its message read again after a crash), and the changed runs are
/// saved with the outcomes.
pub(crate) async fn outcomes_and_their_run_counts_commit_together(store: &Store) {
    let now = crate::domain::now_ms();
    store.insert_run(&run("r1", now)).await.unwrap();
    let rows = [
        delivery("x1", Some("k1"), Some("r1"), now),
        delivery("x2", Some("k2"), Some("r1"), now),
    ];
    let ready = store
        .enqueue_claiming(&rows, &[], now, &HashSet::new(), |_| {})
        .await
        .unwrap();
    let (x1, x2) = (ready[0].clone(), ready[1].clone());
    // x2's claim ends with a retry: a later completion of it is not this handle's.
    store
        .complete(
            &[completion(&x2, Next::Retry { at_ms: now + 60_000 }, now)],
            now,
            |_| {},
        )
        .await
        .unwrap();
    let mut x2_done = completion(&x2, Next::Delivered, now);
    x2_done.attempt_no = 2;
    let batch = [completion(&x1, Next::Delivered, now), x2_done];
    let mut skipped = HashSet::new();
    let mut count = |lost: &HashSet<String>, runs: &mut RunsLocked| {
        skipped = lost.clone();
        let r = runs.get_mut("r1").expect("r1 loaded");
        let applied = batch.iter().filter(|c| !lost.contains(&c.delivery_id)).count();
        r.run.resource_stats.entry("t".into()).or_default().records_delivered += applied as i64;
        r.changed = true;
    };
    let done = store
        .complete_counting(
            &batch,
            now,
            |_| {},
            Some(Counting {
                run_ids: vec!["r1"],
                count: &mut count,
            }),
        )
        .await
        .unwrap();
    assert_eq!(done.lost, [x2.seq]);
    assert_eq!(
        skipped,
        HashSet::from(["x2".to_string()]),
        "the lost completion is not counted"
    );
    let stats = |r: Run| r.resource_stats.get("t").map(|s| s.records_delivered);
    assert_eq!(stats(store.get_run("r1").await.unwrap().unwrap()), Some(1));

    // `record` (memory deliveries) counts in its transaction; a delivery it already has (the
    // same message read again) is left as it is and reported, its dead letter not made again.
    let mut m1 = delivery("m1", Some("km"), Some("r1"), now);
    m1.source = Some("events/0/7".into());
    m1.log = vec![AttemptRecord {
        started_at: now,
        duration_ms: 1,
        status: Some(500),
        error: None,
        excerpt: None,
    }];
    m1.attempts = 1;
    let logged = [Logged {
        delivery: m1.clone(),
        state: "dead",
    }];
    let mut dl = dead_letter(&ready[0]);
    dl.delivery_id = Some("m1".into());
    let mut parked = delivery("p9", Some("kp"), Some("r1"), now);
    parked.source = Some("events/0/8".into());
    for round in 0..2 {
        // Each reading of the message attempted the parked delivery once, with its own answer.
        parked.log = vec![AttemptRecord {
            started_at: now,
            duration_ms: 1,
            status: Some(if round == 0 { 503 } else { 500 }),
            error: None,
            excerpt: None,
        }];
        parked.attempts = 1;
        let mut seen = None;
        let mut count = |recorded: &HashSet<String>, runs: &mut RunsLocked| {
            seen = Some(recorded.clone());
            let r = runs.get_mut("r1").expect("r1 loaded");
            if !recorded.contains("m1") {
                r.run
                    .resource_stats
                    .entry("t".into())
                    .or_default()
                    .records_dead_lettered += 1;
                r.changed = true;
            }
        };
        store
            .record(
                &logged,
                &[(vec![parked.clone()], false)],
                std::slice::from_ref(&dl),
                now,
                Some(Counting {
                    run_ids: vec!["r1", "nobody"],
                    count: &mut count,
                }),
            )
            .await
            .unwrap();
        // The second time both deliveries are in the store already (logged and parked).
        let expect: HashSet<String> = if round == 0 {
            HashSet::new()
        } else {
            HashSet::from(["m1".to_string(), "p9".to_string()])
        };
        assert_eq!(seen, Some(expect), "round {round}");
    }
    let r1 = store.get_run("r1").await.unwrap().unwrap();
    assert_eq!(r1.resource_stats["t"].records_dead_lettered, 1, "counted once");
    assert_eq!(store.list_attempts("m1").await.unwrap().len(), 1);
    assert_eq!(open_dead_letters_of(store, "m1").await, 1, "one dead letter");
    assert_eq!(
        store
            .active_order_keys()
            .await
            .unwrap()
            .iter()
            .filter(|k| *k == "kp")
            .count(),
        1
    );
    let page = store.list_deliveries(&DeliveryFilter::default(), 0, 100).await.unwrap();
    assert_eq!(page.results.iter().filter(|d| d.id == "p9").count(), 1, "parked once");
    let p9 = store.list_attempts("p9").await.unwrap();
    assert_eq!(
        p9.iter().map(|a| a.status).collect::<Vec<_>>(),
        [Some(503)],
        "the first reading's attempt, not replaced by the second's"
    );
}

/// Logged (Kafka) deliveries recorded again — their messages read again after a crash, alone or
/// with new ones in the same batch, no parked rows beside them — are kept as first recorded,
/// with their attempts and dead letters, and counted once; the new ones in the batch are
/// recorded and counted.
pub(crate) async fn a_message_read_again_records_only_its_new_deliveries(store: &Store) {
    let now = crate::domain::now_ms();
    store.insert_run(&run("r1", now)).await.unwrap();
    let logged = |id: &str, status: i64| {
        let mut d = delivery(id, Some(&format!("k-{id}")), Some("r1"), now);
        d.source = Some(format!("events/0/{id}"));
        d.attempts = 1;
        d.first_attempt_at = Some(now);
        d.log = vec![AttemptRecord {
            started_at: now,
            duration_ms: 1,
            status: Some(status),
            error: None,
            excerpt: None,
        }];
        let state = if status < 300 { "delivered" } else { "dead" };
        Logged { delivery: d, state }
    };
    let dead_of = |l: &Logged| {
        let d = &l.delivery;
        dead_letter_of(&d.id, &d.event_id, &d.event, d.webhook_id.as_deref(), &d.body)
    };
    // Each reading answered differently: what is kept shows which reading was recorded.
    let readings = [
        vec![logged("a1", 200), logged("a2", 500)],
        vec![logged("a1", 201), logged("a2", 502), logged("a3", 200)],
        vec![logged("a3", 202)],
    ];
    let expect_recorded = [vec![], vec!["a1", "a2"], vec!["a3"]];
    for (round, batch) in readings.iter().enumerate() {
        let dead: Vec<NewDeadLetter> = batch.iter().filter(|l| l.state == "dead").map(dead_of).collect();
        let mut seen = None;
        let mut count = |recorded: &HashSet<String>, runs: &mut RunsLocked| {
            seen = Some(recorded.clone());
            let r = runs.get_mut("r1").expect("r1 loaded");
            for l in batch.iter().filter(|l| !recorded.contains(&l.delivery.id)) {
                let s = r.run.resource_stats.entry("t".into()).or_default();
                match l.state {
                    "delivered" => s.records_delivered += 1,
                    _ => s.records_dead_lettered += 1,
                }
                r.changed = true;
            }
        };
        store
            .record(
                batch,
                &[],
                &dead,
                now,
                Some(Counting {
                    run_ids: vec!["r1"],
                    count: &mut count,
                }),
            )
            .await
            .unwrap();
        let expect: HashSet<String> = expect_recorded[round].iter().map(|s| s.to_string()).collect();
        assert_eq!(seen, Some(expect), "round {round}: the deliveries recorded before");
    }
    let stats = &store.get_run("r1").await.unwrap().unwrap().resource_stats["t"];
    assert_eq!(
        (stats.records_delivered, stats.records_dead_lettered),
        (2, 1),
        "each delivery counted once"
    );
    let page = store.list_deliveries(&DeliveryFilter::default(), 0, 100).await.unwrap();
    let mut listed: Vec<(&str, &str)> = page.results.iter().map(|d| (d.id.as_str(), d.state.as_str())).collect();
    listed.sort();
    assert_eq!(listed, [("a1", "delivered"), ("a2", "dead"), ("a3", "delivered")]);
    for (id, status) in [("a1", 200), ("a2", 500), ("a3", 200)] {
        let attempts = store.list_attempts(id).await.unwrap();
        assert_eq!(
            attempts.iter().map(|a| a.status).collect::<Vec<_>>(),
            [Some(status)],
            "{id}: the first reading's attempt"
        );
    }
    assert_eq!(open_dead_letters_of(store, "a2").await, 1, "one dead letter");
    // One delivery twice in a batch is refused whole: nothing of it is written.
    let twice = [logged("a4", 200), logged("a4", 200), logged("a5", 200)];
    assert!(store.record(&twice, &[], &[], now, None).await.is_err());
    let page = store.list_deliveries(&DeliveryFilter::default(), 0, 100).await.unwrap();
    assert_eq!(page.results.len(), 3, "a4 and a5 were not written");
}

/// A run's queued rows can be dropped (except those in flight); delivered rows are purged after
/// retention with their attempts, queued ones never.
pub(crate) async fn dropping_and_purging(store: &Store) {
    let now = crate::domain::now_ms();
    let rows = [
        delivery("a1", Some("t|ra"), Some("ra"), now),
        delivery("a2", Some("t|ra"), Some("ra"), now),
        delivery("a3", Some("t|ra"), Some("ra"), now),
        delivery("b1", Some("t|rb"), Some("rb"), now),
    ];
    let ready = store
        .enqueue_claiming(&rows, &[], now, &HashSet::new(), |_| {})
        .await
        .unwrap();
    assert_eq!(ids(&ready), ["a1", "b1"]);
    assert_eq!(store.queue_stats().await.unwrap(), (4, Some(now)));
    assert!(store.has_active("t|ra").await.unwrap());
    let mut keys = store.active_order_keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, ["t|ra", "t|rb"]);

    // a1 is in flight: kept; a2 and a3 are dropped.
    let a1 = ready.iter().find(|q| q.id == "a1").unwrap();
    let dropped = store.drop_queued_for_run("ra", &[a1.seq], now).await.unwrap();
    assert_eq!(dropped.len(), 2);
    let promoted = store
        .complete(&[completion(a1, Next::Delivered, now)], now, |_| {})
        .await
        .unwrap()
        .promoted;
    assert!(promoted.is_empty(), "dropped rows are never promoted");
    assert!(!store.has_active("t|ra").await.unwrap());

    let b1 = ready.iter().find(|q| q.id == "b1").unwrap();
    store
        .complete(&[completion(b1, Next::Retry { at_ms: now + 60_000 }, now)], now, |_| {})
        .await
        .unwrap();
    assert_eq!(store.next_due_after(now).await.unwrap(), Some(now + 60_000));
    assert!(store.due(now, 10, &[]).await.unwrap().is_empty());
    assert_eq!(ids(&store.due(now + 60_000, 10, &[]).await.unwrap()), ["b1"]);
    assert!(store
        .due(now + 60_000, 10, &["webhook:wh".into()])
        .await
        .unwrap()
        .is_empty());

    assert_eq!(store.list_attempts("a1").await.unwrap().len(), 1);
    assert_eq!(
        store.purge_delivered(now, now).await.unwrap(),
        0,
        "finished at `now`, not before"
    );
    assert_eq!(store.purge_delivered(now + 1, now + 1).await.unwrap(), 1);
    assert!(store.get_delivery("a1").await.unwrap().is_none());
    assert!(store.list_attempts("a1").await.unwrap().is_empty());
    assert!(
        store.get_delivery("b1").await.unwrap().is_some(),
        "queued rows are never purged"
    );
    assert_eq!(store.get_delivery("a2").await.unwrap().unwrap().state, "dropped");
}

/// Webhooks (secrets included), kv, jobs, runs, Eloqua syncs and commands read back as written.
pub(crate) async fn registry_jobs_and_commands_round_trip(store: &Store) {
    let now = crate::domain::now_ms();
    let secret = crate::signing::Secret::generate();
    let w = Webhook {
        id: "w1".into(),
        target_url: "http://127.0.0.1:1/hook".into(),
        event_types: vec!["*".into()],
        is_active: true,
        description: None,
        secret: secret.clone(),
        previous_secret: None,
        created_at: now,
        updated_at: now,
        seq: 0,
        overrides: None,
    };
    let v0 = store.webhooks_version().await.unwrap();
    let stored = store.insert_webhook(&w).await.unwrap();
    assert_eq!(stored.overrides, None);
    assert!(stored.seq > 0);
    let v1 = store.webhooks_version().await.unwrap();
    assert!(v1 > v0, "an insert moves the webhook version");
    let rotated = Webhook {
        secret: crate::signing::Secret::generate(),
        previous_secret: Some((secret.clone(), now + 1000)),
        is_active: false,
        description: Some("d".into()),
        overrides: Some(crate::store::WebhookOverrides {
            max_in_flight: Some(3),
            retry: Some(crate::store::RetryOverrides {
                max_attempts: Some(4),
                multiplier: Some(1.5),
                ..Default::default()
            }),
        }),
        ..stored.clone()
    };
    store.update_webhook(&rotated).await.unwrap();
    let v2 = store.webhooks_version().await.unwrap();
    assert!(v2 > v1, "an update (a rotation) moves the webhook version");
    let got = store.get_webhook("w1").await.unwrap().unwrap();
    assert_eq!(got.secret.expose(), rotated.secret.expose());
    assert_eq!(
        got.previous_secret.as_ref().map(|(s, e)| (s.expose(), *e)),
        Some((secret.expose(), now + 1000))
    );
    assert!(!got.is_active);
    assert_eq!(got.description.as_deref(), Some("d"));
    assert_eq!(got.overrides, rotated.overrides, "overrides read back as written");
    store
        .insert_webhook(&Webhook {
            id: "w2".into(),
            ..w.clone()
        })
        .await
        .unwrap();
    let page = store.list_webhooks(0, 1).await.unwrap();
    assert_eq!(page.results.len(), 1);
    assert_eq!(store.all_webhooks().await.unwrap().len(), 2);
    assert!(store.delete_webhook("w2").await.unwrap());
    assert!(!store.delete_webhook("w2").await.unwrap());

    assert_eq!(store.kv_get_or_insert("k", "first").await.unwrap(), "first");
    assert_eq!(store.kv_get_or_insert("k", "second").await.unwrap(), "first");

    let job = crate::runs::model::SyncJob {
        id: "job".into(),
        integration_name: "crm".into(),
        args_schema: Some(json!({"type": "object"})),
        resources: Vec::new(),
        environment_id: None,
        created_at: now,
        updated_at: now,
        seq: 0,
    };
    let job = store.insert_job(&job).await.unwrap();
    assert!(job.seq > 0);
    assert_eq!(store.list_jobs(Some("crm"), 0, 10).await.unwrap().results.len(), 1);
    assert!(store.list_jobs(Some("other"), 0, 10).await.unwrap().results.is_empty());
    let r = store.insert_run(&run("r1", now)).await.unwrap();
    assert!(r.seq > 0);
    assert_eq!(
        store.delete_job("job").await.unwrap(),
        Err(1),
        "an active run keeps its job"
    );
    let f = RunFilter {
        sync_job_id: Some("job".into()),
        ..Default::default()
    };
    assert_eq!(store.list_runs(&f, 0, 10).await.unwrap().results.len(), 1);
    assert!(store.delete_run("r1").await.unwrap());
    assert_eq!(store.delete_job("job").await.unwrap(), Ok(true));

    let e = store
        .insert_eloqua_sync("https://x", None, None, "me", now)
        .await
        .unwrap();
    assert_eq!(
        store.get_eloqua_sync(e.n).await.unwrap().unwrap().synced_instance_uri,
        "https://x"
    );

    store.insert_command("k1", &json!({"a": 1})).await.unwrap();
    store.insert_command("k2", &json!({"a": 2})).await.unwrap();
    let cmds = store.list_commands(0, 10).await.unwrap();
    assert_eq!(
        cmds.results.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(),
        ["k1", "k2"]
    );
}

/// Retention: delivered rows older than `before` go, first-try successes older than
/// `first_try_before` go (`delivery.log = failures`), retried ones stay until `before`.
pub(crate) async fn purge_keeps_what_the_log_mode_keeps(store: &Store) {
    let now = 1_000_000;
    let rows = [
        delivery("p1", Some("pk1"), None, now),
        delivery("p2", Some("pk2"), None, now),
    ];
    let ready = store
        .enqueue_claiming(&rows, &[], now, &HashSet::new(), |_| {})
        .await
        .unwrap();
    assert_eq!(ready.len(), 2);
    // p1 delivered on its first attempt; p2 retried once, then delivered.
    let p2 = ready.iter().find(|q| q.id == "p2").unwrap().clone();
    let p1 = ready.iter().find(|q| q.id == "p1").unwrap().clone();
    store
        .complete(&[completion(&p2, Next::Retry { at_ms: now }, now)], now, |_| {})
        .await
        .unwrap();
    assert!(ids(&store.due(now, 10, &[]).await.unwrap()).contains(&"p2"));
    let mut p2 = p2;
    p2.attempts = 1;
    store
        .complete(
            &[
                completion(&p1, Next::Delivered, now),
                completion(&p2, Next::Delivered, now),
            ],
            now,
            |_| {},
        )
        .await
        .unwrap();
    // `failures`: first-try successes go at once, retried ones stay.
    assert_eq!(store.purge_delivered(now - 1000, now + 1).await.unwrap(), 1);
    assert!(store.get_delivery("p1").await.unwrap().is_none());
    assert!(store.get_delivery("p2").await.unwrap().is_some());
    assert_eq!(store.list_attempts("p2").await.unwrap().len(), 2);
    // Past the retention period, everything delivered goes, with its attempts.
    assert_eq!(store.purge_delivered(now + 1, now + 1).await.unwrap(), 1);
    assert!(store.get_delivery("p2").await.unwrap().is_none());
    assert!(store.list_attempts("p2").await.unwrap().is_empty());
}

/// Claims are leases: renewed while held, released by a completion; a row's completion (or
/// dead-lettering) is written only while this handle holds its lease.
pub(crate) async fn leases_are_renewed_and_checked(store: &Store) {
    let now = 2_000_000;
    let rows = [
        delivery("l1", Some("lk"), None, now),
        delivery("l2", Some("lk"), None, now),
        delivery("m1", Some("mk"), None, now),
        delivery("m2", Some("mk"), None, now),
    ];
    let ready = store
        .enqueue_claiming(&rows, &[], now, &HashSet::new(), |_| {})
        .await
        .unwrap();
    assert_eq!(ids(&ready), ["l1", "m1"]);
    let (l1, m1) = (ready[0].clone(), ready[1].clone());
    // Both heads are this handle's; waiting rows are nobody's.
    let mut held = store.renew(&[l1.seq, m1.seq, l1.seq + 1], now + 10).await.unwrap();
    held.sort();
    assert_eq!(held, [l1.seq, m1.seq]);
    assert!(store.renew(&[], now).await.unwrap().is_empty());

    // A retry releases the lease: renewing it finds it lost, completing it again changes
    // nothing (no attempt, no promotion), until it is claimed again.
    store
        .complete(&[completion(&l1, Next::Retry { at_ms: now + 100 }, now)], now, |_| {})
        .await
        .unwrap();
    assert!(store.renew(&[l1.seq], now + 20).await.unwrap().is_empty());
    let stale = store
        .complete(&[completion(&l1, Next::Delivered, now + 30)], now + 30, |_| {})
        .await
        .unwrap();
    assert_eq!((stale.lost.as_slice(), stale.promoted.len()), ([l1.seq].as_slice(), 0));
    assert_eq!(
        store.list_attempts("l1").await.unwrap().len(),
        1,
        "the stale attempt is not recorded"
    );
    // Claimed again when due (with m1, still this handle's: its own claims are answered again).
    assert_eq!(ids(&store.due(now + 100, 10, &[]).await.unwrap()), ["m1", "l1"]);
    let mut again = completion(&l1, Next::Delivered, now + 100);
    again.attempt_no = 2;
    let done = store.complete(&[again], now + 100, |_| {}).await.unwrap();
    assert_eq!((ids(&done.promoted), done.lost.len()), (vec!["l2"], 0));
    assert_eq!(store.list_attempts("l1").await.unwrap().len(), 2);
    // A finished row can be completed no more.
    let twice = store
        .complete(&[completion(&l1, Next::Delivered, now + 110)], now + 110, |_| {})
        .await
        .unwrap();
    assert_eq!(twice.lost, [l1.seq]);

    // Dead-lettering without an attempt is conditional the same way.
    assert!(store.dead_letter_queued(&m1, &dead_letter(&m1), now).await.unwrap());
    assert!(!store.dead_letter_queued(&m1, &dead_letter(&m1), now).await.unwrap());
    let open = store
        .list_dead_letters(&DeadLetterFilter::default(), 0, 10)
        .await
        .unwrap();
    assert_eq!(open.results.iter().filter(|d| d.event_id == "ev-m1").count(), 1);
    // m2 was promoted behind it, leased to this handle.
    assert_eq!(ids(&store.due(now, 10, &[]).await.unwrap()), ["m2"]);
}

/// Eloqua syncs find their run and mark their one callback once; sync units are stored all
/// together and show their latest run and how many runs name them.
pub(crate) async fn sync_fronts_storage(store: &Store) {
    let now = 1_700_000_000_000;
    let runs = store.runs();
    let mut r1 = run("run-a", now);
    r1.sync_unit_id = Some("unit-1".into());
    store.insert_run(&r1).await.unwrap();
    let s = store
        .insert_eloqua_sync(
            "/contacts/exports/1",
            Some("https://cb.example.com/x"),
            Some("run-a"),
            "api",
            now,
        )
        .await
        .unwrap();
    let got = runs.eloqua_sync_for_run("run-a").await.unwrap().unwrap();
    assert_eq!(
        (got.n, got.run_id.as_deref(), got.callback_queued_at),
        (s.n, Some("run-a"), None)
    );
    assert!(runs.eloqua_sync_for_run("run-x").await.unwrap().is_none());
    assert!(runs.mark_eloqua_callback(s.n, Some(now)).await.unwrap());
    assert!(
        !runs.mark_eloqua_callback(s.n, Some(now + 1)).await.unwrap(),
        "marked once"
    );
    assert_eq!(
        store.get_eloqua_sync(s.n).await.unwrap().unwrap().callback_queued_at,
        Some(now)
    );
    runs.mark_eloqua_callback(s.n, None).await.unwrap();
    assert!(
        runs.mark_eloqua_callback(s.n, Some(now + 2)).await.unwrap(),
        "unmarked, marked again"
    );
    store
        .insert_eloqua_sync("/contacts/exports/2", None, None, "api", now)
        .await
        .unwrap();
    let (page, total) = runs.list_eloqua_syncs(1, 10).await.unwrap();
    assert_eq!((page.len(), total), (1, 2));
    assert_eq!(page[0].synced_instance_uri, "/contacts/exports/2");

    let unit = |id: &str| SyncUnit {
        id: id.into(),
        external_sync_unit: format!("ext-{id}"),
        keyring: "k".into(),
        name: format!("ext-{id}"),
        is_archived: false,
        object_version: 1,
        created_by: "api".into(),
        created_at: now,
        updated_at: now,
        seq: 0,
    };
    let units = runs.insert_sync_units(&[unit("unit-1"), unit("unit-2")]).await.unwrap();
    assert!(units[0].seq < units[1].seq);
    // All or nothing: a duplicate id fails the whole insert.
    assert!(runs.insert_sync_units(&[unit("unit-3"), unit("unit-1")]).await.is_err());
    assert!(runs.get_sync_unit("unit-3").await.unwrap().is_none());
    let page = runs.list_sync_units(0, 10).await.unwrap();
    assert_eq!(page.results.len(), 2);
    let mut u = runs.get_sync_unit("unit-1").await.unwrap().unwrap();
    u.is_archived = true;
    u.object_version = 2;
    runs.update_sync_unit(&u).await.unwrap();
    let u = runs.get_sync_unit("unit-1").await.unwrap().unwrap();
    assert!(u.is_archived && u.object_version == 2);

    let (latest, n) = runs.latest_unit_run("unit-1").await.unwrap().unwrap();
    assert_eq!((latest.id.as_str(), n), ("run-a", 1));
    let mut r2 = run("run-b", now + 1);
    r2.sync_unit_id = Some("unit-1".into());
    store.insert_run(&r2).await.unwrap();
    let (latest, n) = runs.latest_unit_run("unit-1").await.unwrap().unwrap();
    assert_eq!(
        (latest.id.as_str(), latest.sync_unit_id.as_deref(), n),
        ("run-b", Some("unit-1"), 2)
    );
    assert!(runs.latest_unit_run("unit-2").await.unwrap().is_none());
}

fn census_row(paused: bool, now: i64) -> CensusSyncRow {
    CensusSyncRow {
        id: 0,
        sync_job_id: "job-1".into(),
        webhook_id: "wh".into(),
        paused,
        config: "{}".into(),
        created_at: now,
        updated_at: now,
    }
}

/// A paused Census-style sync's rows (`s:<sync>:<run>` chains) are written `paused`: never due,
/// counted, kept; rows behind them wait. Pausing later pauses what waits; releasing is refused
/// while the stored sync is paused and, once it is not, makes each chain go on from its oldest
/// row, in order.
pub(crate) async fn paused_syncs_hold_their_rows_until_released(store: &Store) {
    let now = crate::domain::now_ms();
    let runs = store.runs();
    let q = store.queue();
    let s = runs.insert_census_sync(&census_row(true, now)).await.unwrap();
    let key = format!("s:{}:run", s.id);
    let other = runs.insert_census_sync(&census_row(false, now)).await.unwrap();
    let other_key = format!("s:{}:run", other.id);
    let rows = [
        delivery("p1", Some(&key), Some("run"), now),
        delivery("p2", Some(&key), Some("run"), now),
        delivery("o1", Some(&other_key), Some("run"), now),
        delivery("o2", Some(&other_key), Some("run"), now),
    ];
    let ready = store
        .enqueue_claiming(&rows, &[], now, &HashSet::new(), |_| {})
        .await
        .unwrap();
    assert_eq!(ids(&ready), ["o1"], "the paused sync's rows are held, the other's go");
    assert_eq!(ids(&store.due(now, 10, &[]).await.unwrap()), ["o1"]);
    assert_eq!(store.queue_stats().await.unwrap().0, 4, "held rows are counted");
    assert!(store.has_active(&key).await.unwrap());
    assert!(store.active_order_keys().await.unwrap().contains(&key));
    assert_eq!(q.paused_counts().await.unwrap(), [(s.id, 2)]);
    // Still paused: releasing does nothing.
    assert!(store.release_paused(s.id, now, |_| {}).await.unwrap().is_empty());
    // A later row of the chain is held too.
    store
        .enqueue(&[delivery("p3", Some(&key), Some("run"), now)], &[], now)
        .await
        .unwrap();

    // The other sync is paused while o1 is in flight: o2 (waiting) is paused, and finishing o1
    // promotes nothing.
    let mut o = other.clone();
    o.paused = true;
    assert!(runs.update_census_sync(&o).await.unwrap());
    assert_eq!(q.pause_queued(other.id).await.unwrap(), 1);
    let promoted = store
        .complete(&[completion(&ready[0], Next::Delivered, now)], now, |_| {})
        .await
        .unwrap();
    assert!(promoted.promoted.is_empty(), "o2 is held");

    // Unpaused: the chain goes on from its oldest row, one at a time, in order.
    let mut unpaused = s.clone();
    unpaused.paused = false;
    assert!(runs.update_census_sync(&unpaused).await.unwrap());
    let mut claimed = Vec::new();
    let released = store.release_paused(s.id, now, |r| claimed = r.to_vec()).await.unwrap();
    assert_eq!(ids(&released), ["p1"]);
    assert_eq!(ids(&claimed), ["p1"]);
    assert_eq!(q.paused_counts().await.unwrap(), [(other.id, 1)]);
    // A row written after the release waits behind the released ones.
    store
        .enqueue(&[delivery("p4", Some(&key), Some("run"), now)], &[], now)
        .await
        .unwrap();
    let mut order = Vec::new();
    let mut head = released[0].clone();
    loop {
        order.push(head.id.clone());
        let next = store
            .complete(&[completion(&head, Next::Delivered, now)], now, |_| {})
            .await
            .unwrap();
        match next.promoted.first() {
            Some(n) => head = n.clone(),
            None => break,
        }
    }
    assert_eq!(order, ["p1", "p2", "p3", "p4"]);
    assert!(!store.has_active(&key).await.unwrap());
    // A deleted sync's held rows are released too (never lost).
    assert!(runs.delete_census_sync(other.id).await.unwrap());
    assert_eq!(ids(&store.release_paused(other.id, now, |_| {}).await.unwrap()), ["o2"]);
}

/// Census-style syncs round-trip; an alert is evaluated once per run and remembers whether it
/// fired.
pub(crate) async fn census_syncs_and_alert_state(store: &Store) {
    let now = crate::domain::now_ms();
    let runs = store.runs();
    let a = runs.insert_census_sync(&census_row(false, now)).await.unwrap();
    let mut b = census_row(true, now);
    b.config = r#"{"x":1}"#.into();
    let b = runs.insert_census_sync(&b).await.unwrap();
    assert!(b.id > a.id);
    assert_eq!(runs.get_census_sync(b.id).await.unwrap().as_ref(), Some(&b));
    let (page, total) = runs.list_census_syncs(1, 10).await.unwrap();
    assert_eq!((page.len(), total, page[0].id), (1, 2, b.id));
    assert_eq!(runs.all_census_syncs().await.unwrap().len(), 2);
    let mut changed = a.clone();
    changed.webhook_id = "wh2".into();
    changed.updated_at = now + 1;
    assert!(runs.update_census_sync(&changed).await.unwrap());
    assert_eq!(runs.get_census_sync(a.id).await.unwrap(), Some(changed));

    let step = |run: &'static str, firing: bool| runs.census_alert_step(a.id, "Failure", run, firing);
    assert_eq!(
        step("r1", true).await.unwrap(),
        Some(false),
        "first run: nothing fired before"
    );
    assert_eq!(step("r1", true).await.unwrap(), None, "a run is evaluated once");
    assert_eq!(step("r2", false).await.unwrap(), Some(true));
    assert_eq!(step("r3", false).await.unwrap(), Some(false));
    assert_eq!(
        runs.census_alert_step(a.id, "Status:started", "r3", true)
            .await
            .unwrap(),
        Some(false),
        "each alert keeps its own state"
    );
    assert!(runs.delete_census_sync(a.id).await.unwrap());
    assert!(!runs.delete_census_sync(a.id).await.unwrap());
    assert!(runs.get_census_sync(a.id).await.unwrap().is_none());
}

/// A dead letter without a delivery (an event refused when routed), for replay.
pub(crate) fn refused(event_id: &str) -> NewDeadLetter {
    NewDeadLetter {
        delivery_id: None,
        event_id: event_id.into(),
        event: "x:y".into(),
        webhook_id: None,
        kind: "webhook",
        reason: "unknown_webhook",
        attempts: 0,
        last_status: None,
        last_error: None,
        raw: format!(r#"{{"id":"{event_id}"}}"#),
    }
}

/// Replay by more ids than one SQL statement may bind (SQLite 32,766 variables, PostgreSQL
/// 65,535) finds the ones that exist (issue 13: 40,000 ids answered 500, "too many SQL
/// variables"). The API caps the list lower; the store must not depend on it.
pub(crate) async fn replay_by_more_ids_than_a_statement_binds(store: &Store) {
    let now = crate::domain::now_ms();
    store.enqueue(&[], &[refused("r1"), refused("r2")], now).await.unwrap();
    let open = store
        .list_dead_letters(&DeadLetterFilter::default(), 0, 10)
        .await
        .unwrap();
    let mut ids: Vec<String> = (0..70_000).map(|i| format!("none-{i}")).collect();
    ids.insert(35_000, open.results[1].id.clone());
    ids.push(open.results[0].id.clone());
    let (_, requeued, _, raws) = store
        .replay_dead_letters(Some(&ids), &DeadLetterFilter::default(), 10_000, now, |_| {
            HashSet::new()
        })
        .await
        .unwrap();
    assert_eq!((requeued, raws.len()), (0, 2));
    assert!(raws[0].contains("r1") && raws[1].contains("r2"), "{raws:?}");
}

/// Secrets reach the backend sealed and come back opened; re-sealing (`reseal_webhook`,
/// `kv_replace`) is a compare-and-set, so a secret changed meanwhile is never overwritten.
pub(crate) async fn secrets_are_stored_sealed_and_resealed_only_if_unchanged(store: Store) {
    use crate::store::secrets::Sealer;
    let key = |n: u8| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([n; 32])
    };
    let settings = |current: u8, previous: &[u8]| crate::config::StoreSettings {
        kind: crate::config::StoreKind::Sqlite,
        path: "unused".into(),
        url: String::new(),
        max_connections: 2,
        synchronous: crate::config::Synchronous::Normal,
        lease_ms: 60_000,
        encryption_key: key(current),
        previous_encryption_keys: previous.iter().map(|n| key(*n)).collect(),
    };
    let sealed = store
        .clone()
        .with_sealer(Sealer::from_settings(&settings(1, &[])).unwrap());
    let now = crate::domain::now_ms();
    let secret = crate::signing::Secret::generate();
    let w = Webhook {
        id: "ws".into(),
        target_url: "http://127.0.0.1:1/hook".into(),
        event_types: vec![],
        is_active: true,
        description: None,
        secret: secret.clone(),
        previous_secret: Some((crate::signing::Secret::generate(), now + 1000)),
        overrides: None,
        created_at: now,
        updated_at: now,
        seq: 0,
    };
    sealed.insert_webhook(&w).await.unwrap();
    sealed.update_webhook(&w).await.unwrap();
    let raw = sealed.registry().get_webhook("ws").await.unwrap().unwrap();
    assert!(raw.secret.starts_with("enc:v1:") && !raw.secret.contains(secret.expose()));
    let raw_prev = raw.previous_secret.clone().unwrap().0;
    assert!(raw_prev.starts_with("enc:v1:"));
    assert_eq!(
        sealed.get_webhook("ws").await.unwrap().unwrap().secret.expose(),
        secret.expose()
    );
    // Compare-and-set: a stale `from` changes nothing; the current one does.
    let reg = sealed.registry();
    assert!(!reg
        .reseal_webhook("ws", ("stale", Some(&raw_prev)), ("x", None))
        .await
        .unwrap());
    assert!(!reg
        .reseal_webhook("ws", (&raw.secret, None), ("x", None))
        .await
        .unwrap());
    assert!(reg
        .reseal_webhook("ws", (&raw.secret, Some(&raw_prev)), ("x", Some("y")))
        .await
        .unwrap());
    let now_raw = reg.get_webhook("ws").await.unwrap().unwrap();
    assert_eq!(
        (now_raw.secret.as_str(), now_raw.previous_secret.unwrap().0.as_str()),
        ("x", "y")
    );
    reg.kv_get_or_insert("kk", "a").await.unwrap();
    assert!(!reg.kv_replace("kk", "b", "c").await.unwrap());
    assert!(reg.kv_replace("kk", "a", "c").await.unwrap());
    assert_eq!(reg.kv_get_or_insert("kk", "z").await.unwrap(), "c");

    // A kv secret: sealed when stored, re-sealed with a new key, the same secret throughout.
    let generated = crate::signing::Secret::generate();
    let got = sealed
        .secret_get_or_insert("callbacks.secret", &generated)
        .await
        .unwrap();
    assert_eq!(got.expose(), generated.expose());
    let first = reg.kv_get_or_insert("callbacks.secret", "-").await.unwrap();
    assert!(first.starts_with("enc:v1:"));
    let rotated = store.with_sealer(Sealer::from_settings(&settings(2, &[1])).unwrap());
    let again = rotated
        .secret_get_or_insert("callbacks.secret", &crate::signing::Secret::generate())
        .await
        .unwrap();
    assert_eq!(again.expose(), generated.expose());
    let second = reg.kv_get_or_insert("callbacks.secret", "-").await.unwrap();
    assert!(second.starts_with("enc:v1:") && second != first);
}

/// Dead and dropped rows (with their attempts) and dead letters are forgotten once older than
/// their retention (issue 13: only delivered rows were ever purged); queued and delivered rows
/// are left to their own rules.
pub(crate) async fn failures_are_purged_after_their_retention(store: &Store) {
    let now = crate::domain::now_ms();
    let rows = [
        delivery("d1", Some("t|x"), Some("x"), now),
        delivery("p1", Some("t|y"), Some("y"), now),
        delivery("p2", Some("t|y"), Some("y"), now),
        delivery("ok", None, None, now),
        delivery("q1", Some("t|z"), Some("z"), now),
    ];
    let ready = store
        .enqueue_claiming(&rows, &[refused("gone")], now, &HashSet::new(), |_| {})
        .await
        .unwrap();
    let row = |id: &str| ready.iter().find(|q| q.id == id).unwrap().clone();
    let d1 = row("d1");
    store
        .complete(
            &[
                completion(&d1, Next::Dead(dead_letter(&d1)), now),
                completion(&row("ok"), Next::Delivered, now),
            ],
            now,
            |_| {},
        )
        .await
        .unwrap();
    let p1 = row("p1");
    assert_eq!(store.drop_queued_for_run("y", &[p1.seq], now).await.unwrap().len(), 1);
    store
        .complete(&[completion(&p1, Next::Dead(dead_letter(&p1)), now)], now, |_| {})
        .await
        .unwrap();
    let all = DeadLetterFilter {
        include_replayed: true,
        ..Default::default()
    };
    assert_eq!(store.list_dead_letters(&all, 0, 10).await.unwrap().results.len(), 3);
    assert_eq!(store.list_attempts("d1").await.unwrap().len(), 1);

    // Nothing is older than the cut-offs yet.
    assert_eq!(store.purge_failed(now, now).await.unwrap(), 0);
    // Dead letters first (their rows are kept a little longer by the engine).
    assert_eq!(store.purge_failed(now, now + 1).await.unwrap(), 3);
    assert!(store.list_dead_letters(&all, 0, 10).await.unwrap().results.is_empty());
    assert!(store.get_delivery("d1").await.unwrap().is_some());
    // Then the dead and dropped rows with their attempts.
    assert_eq!(store.purge_failed(now + 1, now + 1).await.unwrap(), 3);
    for id in ["d1", "p1", "p2"] {
        assert!(store.get_delivery(id).await.unwrap().is_none(), "{id}");
    }
    assert!(store.list_attempts("d1").await.unwrap().is_empty());
    assert_eq!(store.get_delivery("ok").await.unwrap().unwrap().state, "delivered");
    assert!(
        store.get_delivery("q1").await.unwrap().is_some(),
        "queued rows are never purged"
    );
    assert_eq!(store.queue_stats().await.unwrap().0, 1);
}

/// Writes to one chain in transactions that overlap, while its head finishes, keep the chain's
/// order: one row of it ready at a time, each write's rows delivered together and in the order
/// given, none left waiting behind nothing. (PostgreSQL writes a batch's rows before it locks
/// their chains, so a later write can draw its seqs first and commit first.)
pub(crate) async fn overlapping_writes_to_one_chain_keep_its_order(store: &Store) {
    const WRITERS: usize = 8;
    const PER_WRITE: usize = 5;
    const PARKERS: usize = 2;
    let now = crate::domain::now_ms();
    for round in 0..6 {
        let key = format!("k{round}");
        // Even rounds: the chain's head is queued and finishes while the writes run; odd
        // rounds: the chain is empty and the first write to commit brings its head.
        let head = [delivery(&format!("h{round}"), Some(&key), Some("run"), now)];
        let ready = if round % 2 == 0 {
            store
                .enqueue_claiming(&head, &[], now, &HashSet::new(), |_| {})
                .await
                .unwrap()
        } else {
            Vec::new()
        };
        let writes: Vec<Vec<NewDelivery>> = (0..WRITERS)
            .map(|w| {
                (0..PER_WRITE)
                    .map(|i| delivery(&format!("r{round}-w{w}-{i}"), Some(&key), Some("run"), now))
                    .collect()
            })
            .collect();
        let none = HashSet::new();
        let all = futures_util::future::join_all(
            writes
                .iter()
                .map(|rows| store.enqueue_claiming(rows, &[], now, &none, |_| {})),
        );
        // Rows parked on the chain (a memory job's, `record`) are a write of their own too.
        let parked: Vec<(Vec<NewDelivery>, bool)> = (WRITERS..WRITERS + PARKERS)
            .map(|w| {
                let rows = (0..PER_WRITE)
                    .map(|i| delivery(&format!("r{round}-w{w}-{i}"), Some(&key), Some("run"), now))
                    .collect();
                (rows, false)
            })
            .collect();
        let parks = futures_util::future::join_all(
            parked
                .iter()
                .map(|p| store.record(&[], std::slice::from_ref(p), &[], now, None)),
        );
        let head_done: Vec<Completion> = ready.iter().map(|q| completion(q, Next::Delivered, now)).collect();
        let finish = store.complete(&head_done, now, |_| {});
        let (written, parks, finished) = tokio::join!(all, parks, finish);
        for p in parks {
            p.unwrap();
        }
        let mut ready_now: Vec<String> = finished.unwrap().promoted.iter().map(|q| q.id.clone()).collect();
        for w in written {
            ready_now.extend(w.unwrap().iter().map(|q| q.id.clone()));
        }
        assert!(ready_now.len() <= 1, "round {round}: more than one head: {ready_now:?}");
        // Deliver the chain one row at a time.
        let mut order: Vec<String> = Vec::new();
        loop {
            let due = store.due(now, 100, &[]).await.unwrap();
            // Rows written a second time (PostgreSQL) keep their bodies.
            assert_own_bodies(&due);
            let heads: Vec<&QueuedDelivery> = due.iter().filter(|q| q.order_key.as_deref() == Some(&key)).collect();
            assert!(heads.len() <= 1, "round {round}: more than one head: {:?}", ids(&due));
            let Some(q) = heads.first() else { break };
            order.push(q.id.clone());
            store
                .complete(&[completion(q, Next::Delivered, now)], now, |_| {})
                .await
                .unwrap();
        }
        assert!(
            !store.has_active(&key).await.unwrap(),
            "round {round}: rows left behind after {order:?}"
        );
        assert_eq!(order.len(), (WRITERS + PARKERS) * PER_WRITE, "round {round}: {order:?}");
        // Each write's rows one after another, in their order.
        for chunk in order.chunks(PER_WRITE) {
            let writer = chunk[0].rsplit_once('-').unwrap().0;
            let expected: Vec<String> = (0..PER_WRITE).map(|i| format!("{writer}-{i}")).collect();
            assert_eq!(
                chunk,
                expected.as_slice(),
                "round {round}: writes interleaved: {order:?}"
            );
        }
    }
}
