//! Intake: where an event enters. Embedded bus: `POST /events` (`api::events`) writes it to the
//! store's queue (`Engine::ingest`). Kafka: `kafka` consumes it and hands its deliveries to the
//! delivery core as memory jobs. Also where run commands go for executors (`CommandSink`).
//! Only `intake/kafka` knows rdkafka.

pub mod kafka;

use async_trait_free::CommandSinkFuture;

/// Publishes run commands (`sync_job_run.commands`) for executors. Embedded: a durable table
/// that executors read through `GET /sync-job-run-commands`; Kafka: the commands topic, keyed by
/// run id.
pub trait CommandSink: Send + Sync + 'static {
    /// Durably publish `command` (JSON) keyed by `key` (the run id). Returns once it is stored
    /// (embedded) or acknowledged by the broker (Kafka).
    fn publish(&self, key: &str, command: serde_json::Value) -> CommandSinkFuture<'_>;
}

pub mod async_trait_free {
    //! A boxed future alias, so the trait stays object-safe without a macro crate.
    pub type CommandSinkFuture<'a> =
        std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + 'a>>;
}

/// Commands kept in the store's `commands` table.
pub struct EmbeddedCommands {
    pub store: crate::store::Store,
}

impl CommandSink for EmbeddedCommands {
    fn publish(&self, key: &str, command: serde_json::Value) -> CommandSinkFuture<'_> {
        let key = key.to_string();
        Box::pin(async move { self.store.insert_command(&key, &command).await })
    }
}
