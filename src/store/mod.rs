//! SQLite storage: the schema and its migrations ([`schema`]) and the single writer thread ([`writer`]).
//! Readers (HTTP workers, the agent's sync thread) open their own read-only connections with
//! [`schema::open`]; WAL lets them read while the writer commits.

pub mod checkpoint;
pub mod rollup;
pub mod schema;
pub mod writer;

pub use schema::{open, Access};
pub use writer::{WriteCmd, Writer, WriterConfig};
