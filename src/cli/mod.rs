//! What people use: the Flight SQL client ([`remote`]), a [`connection`] to a local data folder
//! or a server, plain SQL split between server and client ([`split`]), the `hedf sql` shell
//! ([`repl`]), output formats ([`display`]), the prototype's [`demo`], and the `hedf` binary's
//! subcommands ([`commands`]).

pub mod commands;
pub mod connection;
pub mod demo;
pub mod display;
pub mod remote;
pub mod repl;
pub mod split;
