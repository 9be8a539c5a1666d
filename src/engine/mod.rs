//! What plans a tenant's SQL: a DataFusion [`session`] that knows `he_sum`, refuses
//! ciphertext misuse ([`guard`]) and sums several measures' shared masks once ([`fusion`]),
//! and the [`statement`] rules (queries over the tenant's own tables and `DROP TABLE`, nothing
//! that writes) shared by the server and the local shell.

pub mod fusion;
pub mod guard;
pub mod session;
pub mod statement;
