//! Intake: where an event enters. Embedded bus: `POST /events` (`api::events`) writes it to the
//! store's queue (`Engine::ingest`). Kafka: `kafka` consumes it and hands its deliveries to the
//! delivery core as memory jobs (intake depends on the delivery core, never the reverse). Only
//! `intake/kafka` knows rdkafka.

pub mod kafka;
