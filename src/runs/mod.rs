//! Sync jobs and sync job runs (issue 4): the Truto-compatible control plane's model and
//! validation, and the run lifecycle the relay enforces (`lifecycle`). They are stored by the
//! store's [`crate::store::RunStore`].

pub mod commands;
pub mod eloqua;
pub mod lifecycle;
pub mod model;
pub mod service;
pub mod validate;

pub use lifecycle::{Action, BatchLimits, Decision, Runs};
pub use model::{ErrorHandling, ResourceSpec, Run, Status, SyncJob};
