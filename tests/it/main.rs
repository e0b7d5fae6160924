//! The one integration-test binary: the real program against fakes on loopback, one module per area.

mod agent_master;
mod api;
mod binary;
mod cross;
mod dashboard;
mod fake_mihomo;
mod faults;
mod fuzz_corpus;
mod hostile;
mod load;
mod load_gen;
mod metrics;
mod security;
mod standalone;
mod support;
mod sync;
mod wait;
