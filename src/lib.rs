//! hedf: SQL over tables whose measures are homomorphically encrypted.
//!
//! The folders are the architecture, client to server:
//!
//! * [`crypto`] (tfhe + arrow only, built without the `engine` feature): the client key, the
//!   parameter set and its exact-sum budget, encoding of decimals, the byte layouts of cells
//!   and sums, and encryption and decryption of Arrow batches. Nothing in it uses the rest.
//! * [`table`] and [`udaf`], the engine's core: the encrypted table as Parquet segments and its
//!   DataFusion `TableProvider`; `he_sum`, which adds ciphertexts without any key.
//! * [`engine`]: what plans a tenant's SQL: the session (he_sum registered, ciphertext misuse
//!   refused by the guard) and the statement rules shared by the server and the local shell.
//! * [`server`]: the per-tenant store of tables and the Arrow Flight SQL service with its auth.
//! * [`cli`]: what people use: the Flight SQL client, the `hedf sql` shell, output formats, the
//!   demo and the subcommands of the `hedf` binary.
//! * [`protocol`]: what client and server agree on; [`error`]: the one error type and its kinds.
//!
//! The scheme is additive GLWE from `tfhe::core_crypto`: a chunk of N = 4096 values of a column
//! is one seeded GLWE ciphertext; a row's cell is the LWE sample extracted at its slot, stored
//! as its 8-byte body (mask regenerated from the chunk's seed). A sum is an LWE ciphertext.

pub mod crypto;
pub mod error;
pub mod protocol;

#[cfg(feature = "engine")]
pub mod cli;
#[cfg(feature = "engine")]
pub mod engine;
#[cfg(feature = "engine")]
pub mod server;
#[cfg(feature = "engine")]
pub mod table;
#[cfg(feature = "engine")]
pub mod udaf;

/// The README's Rust snippet, compiled and run by `cargo test` so it cannot go stale.
#[cfg(all(doctest, feature = "engine"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use crypto::client::{decrypt_batch, encrypt_batches, MeasureColumn};
pub use crypto::keys::ClientKey;
pub use error::{ErrorKind, HedfError, Result};
