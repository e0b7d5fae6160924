//! SQLite storage: the schema and its migrations ([`schema`]), the single writer thread ([`writer`]) and the
//! one merge of connection rows and their traffic that it runs for tracking and for sync batches ([`merge`]).
//! Readers (HTTP workers, the agent's sync thread) open their own read-only connections with
//! [`schema::open`]; WAL lets them read while the writer commits.

pub mod checkpoint;
pub mod merge;
pub mod rollup;
pub mod schema;
pub mod writer;

pub use schema::{open, Access};
pub use writer::{WriteCmd, Writer, WriterConfig, WriterHandle};
