//! Delivery, the one core both buses share: the dispatcher (`engine`: caps, chains' heads),
//! one attempt (`attempt`: prepare → sign → POST → classify → schedule), whether and when to
//! retry (`retry`), the outcome (`outcome`: attempt log, dead letters, promotion,
//! acknowledgement), concurrent writes of new rows made one store transaction (`combine`),
//! dead-letter publishing (`dead_letter`), the HTTP client with its SSRF
//! guard (`client`, the only module that knows reqwest) and the jobs themselves (`job`).

pub mod attempt;
pub mod client;
mod combine;
pub mod dead_letter;
pub mod engine;
pub mod job;
pub mod outcome;
mod ready;
pub mod retry;
pub mod targets;
