//! Run commands out to executors (`start`, `stop`): where they go is the bus's business (a
//! table read through `GET /sync-job-run-commands`, or the Kafka commands topic); the runs and
//! the delivery core only publish them, so they know neither.

use self::async_trait_free::CommandSinkFuture;

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
