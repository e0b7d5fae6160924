//! Everything that talks to the mihomo core: its config file ([`config`]), the `/connections` WebSocket
//! ([`collector`]), the parser of its pushes ([`snapshot`]) and the tracker that turns full snapshots into
//! changes ([`diff`]), and its REST endpoints ([`rest`]).

pub mod collector;
pub mod config;
pub mod diff;
pub mod rest;
pub mod snapshot;
