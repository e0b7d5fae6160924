//! # mihomo-connections-tracker
//!
//! (architecture map: to be completed)

#![forbid(unsafe_code)]

pub mod agent_id;
pub mod error;
pub mod ingest;
pub mod log;
pub mod model;
pub mod retention;
pub mod store;
pub mod sync;
pub mod timefmt;

pub use error::{Error, Result};
