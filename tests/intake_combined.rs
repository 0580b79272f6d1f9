//! Concurrent `POST /events` on the embedded bus, on both stores: the relay writes the rows of
//! callers that arrive while another's write is under way in one store transaction
//! (`delivery/combine.rs`). What a user checks: every event accepted is delivered once, each run
//! in the order its events were accepted — however the writes were combined.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const CLIENTS: usize = 8;
const BATCHES: usize = 10;
/// Events a batch, half for each of a client's two runs.
const PER_BATCH: usize = 40;

async fn concurrent_posts_are_combined_and_each_run_arrives_whole_and_in_order(env: &[(&str, &str)]) {
    let rx = Receiver::start().await;
    let app = spawn_app(env).await;
    let (wid, _) = app.webhook(&rx.url("/combined"), &[]).await;
    // Each client sends its batches one after the other (each accepted before the next is
    // sent, so its runs' order is their numbering); the clients all at once.
    let clients = (0..CLIENTS).map(|c| {
        let (app, wid) = (&app, wid.clone());
        async move {
            let runs = [run_id(2 * c + 1), run_id(2 * c + 2)];
            for b in 0..BATCHES {
                let events: Vec<_> = (0..PER_BATCH)
                    .map(|i| {
                        let r = i % 2;
                        let n = b * PER_BATCH / 2 + i / 2;
                        event(&format!("c{c}r{r}_{n:04}"), &wid, Some(&runs[r]), json!({"n": n}))
                    })
                    .collect();
                app.send_events(events).await;
            }
        }
    });
    futures_util::future::join_all(clients).await;
    let total = CLIENTS * BATCHES * PER_BATCH;
    rx.wait_for(WAIT, "every event", |g| g.len() >= total).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids = rx.webhook_ids();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (total, total), "each event once");
    for c in 0..CLIENTS {
        for r in 0..2 {
            let prefix = format!("c{c}r{r}_");
            assert_eq!(
                in_order(&ids, &prefix).len(),
                BATCHES * PER_BATCH / 2,
                "run {prefix} whole"
            );
        }
    }
    // The writes were combined (without it, the test above is only the plain path's).
    let joined = app.metric("syncrelay_queue_writes_joined_total", &[]).await;
    assert!(joined > 0.0, "no write joined another's: {joined}");
    assert_eq!(
        app.metric("syncrelay_events_ingested_total", &[("source", "api")])
            .await,
        total as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_concurrent_posts_are_combined_and_each_run_arrives_whole_and_in_order() {
    concurrent_posts_are_combined_and_each_run_arrives_whole_and_in_order(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_posts_are_combined_and_each_run_arrives_whole_and_in_order() {
    let url = tokio::task::spawn_blocking(postgres::database).await.unwrap();
    concurrent_posts_are_combined_and_each_run_arrives_whole_and_in_order(&[
        ("SYNCRELAY__STORE__KIND", "postgres"),
        ("SYNCRELAY__STORE__URL", &url),
    ])
    .await;
}
