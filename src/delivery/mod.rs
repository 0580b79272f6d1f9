//! Delivery: signing and POSTing (client), whether and when to retry (retry), and the engine
//! that routes, dispatches and records.

pub mod client;
pub mod engine;
pub mod retry;
