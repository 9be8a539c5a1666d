//! The integration tests, in one binary: every test binary links DataFusion and tfhe, so one
//! binary instead of eight saves minutes of each cold build. `cargo test --test it server::`
//! runs one module.

#[path = "../common/mod.rs"]
mod common;

mod adbc;
mod cli;
mod engine;
mod format;
mod fuzz;
mod hostile;
mod network;
mod repl;
mod server;
mod soak;
mod sqllogic;
