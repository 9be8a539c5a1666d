//! The seed's population table as test fixtures: the demo's own file, included by path so
//! that it stays out of hedf's public API.
// Each test binary uses a subset of these.
#![allow(dead_code, unused_imports)]

#[path = "../../src/cli/demo/population.rs"]
mod shared;

pub use shared::*;
