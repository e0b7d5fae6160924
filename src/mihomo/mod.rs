//! Everything that talks to the mihomo core: its config file ([`config`]), the `/connections` WebSocket
//! ([`collector`]), the parser of its pushes ([`snapshot`]) and the tracker that turns full snapshots into
//! changes ([`diff`]), its REST endpoints ([`rest`]) and the thread that polls them on a schedule ([`poll`]).

pub mod collector;
pub mod config;
pub mod diff;
pub mod poll;
pub mod rest;
pub mod snapshot;
