//! The server side: the per-tenant [`catalog`] of encrypted tables (immutable Parquet segments
//! under an atomically replaced manifest) and the Arrow Flight SQL service ([`flight`]) with
//! its authentication. It never holds a key.

pub mod admission;
pub mod catalog;
pub mod flight;
