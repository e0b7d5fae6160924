//! # mihomo-connections-tracker
//!
//! (architecture map: to be completed)

#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod collector;
pub mod diff;
pub mod error;
pub mod log;
pub mod model;
pub mod simulate;
pub mod snapshot;
pub mod store;
pub mod timefmt;

pub use error::{Error, Result};
