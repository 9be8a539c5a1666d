//! hedf: SQL over tables whose measures are homomorphically encrypted.
//!
//! Architecture, client to server:
//!
//! * Client side (tfhe + arrow only, no engine): [`keys`] holds the secret key, [`encoding`]
//!   turns decimals into fixed-point limbs, [`client`] encrypts Arrow batches into cell columns
//!   and decrypts results ([`glwe`] encrypts one chunk). [`params`] names the tfhe parameter set and derives the exact-sum
//!   budget; [`cell`] defines the byte layouts; [`mask`] regenerates public masks from seeds.
//! * Server side (feature `engine`, DataFusion): [`table`] stores encrypted tables as Parquet
//!   and serves them as a `TableProvider`; [`udaf`] is `he_sum`, adding ciphertexts without any
//!   key; [`guard`] refuses plans that would compare or compute on ciphertext; [`session`]
//!   builds a `SessionContext` with both; [`ingest`] encrypts CSV/Parquet files into tables.
//!   [`demo`] replays the original prototype's demo.
//! * Server (feature `engine`): [`catalog`] keeps each tenant's tables as immutable Parquet
//!   segments under an atomically replaced manifest; [`flight`] serves them over Arrow Flight
//!   SQL with authentication; [`remote`] is the matching client (upload, query, list).
//!   [`statement`] plans a tenant's SQL the same way for the server and the local shell.
//! * People: [`repl`] is `hedf sql`, a shell over a local folder or a server that decrypts
//!   results as it prints them; [`display`] formats them (table, CSV, JSON, the seed's pivot).
//!
//! The scheme is additive GLWE from `tfhe::core_crypto`: a chunk of N = 4096 values of a column
//! is one seeded GLWE ciphertext; a row's cell is the LWE sample extracted at its slot, stored
//! as its 8-byte body (mask regenerated from the chunk's seed). A sum is an LWE ciphertext.

pub mod cell;
pub mod client;
pub mod encoding;
pub mod error;
pub mod glwe;
pub mod keys;
pub mod mask;
pub mod params;

#[cfg(feature = "engine")]
pub mod catalog;
#[cfg(feature = "engine")]
pub mod demo;
#[cfg(feature = "engine")]
pub mod display;
#[cfg(feature = "engine")]
pub mod flight;
#[cfg(feature = "engine")]
pub mod guard;
#[cfg(feature = "engine")]
pub mod ingest;
#[cfg(feature = "engine")]
pub mod remote;
#[cfg(feature = "engine")]
pub mod repl;
#[cfg(feature = "engine")]
pub mod session;
#[cfg(feature = "engine")]
pub mod statement;
#[cfg(feature = "engine")]
pub mod table;
#[cfg(feature = "engine")]
pub mod udaf;

pub use error::{HedfError, Result};
