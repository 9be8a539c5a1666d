//! Helpers shared by the integration tests.
// Each test binary uses a subset of these.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A `hedf serve` child process on an ephemeral loopback port; killed on drop.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl Server {
    /// Starts `hedf serve` on `dir` with `extra` arguments (users, limits) and waits until it
    /// listens.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hedf"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .nth(4)
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .trim_end_matches(',');
        Server {
            url: format!("http://{addr}"),
            child,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asserts that `out` reproduces all 56 rows of numbers the seed's README printed for its three
/// aggregations, digit for digit.
pub fn assert_seed_rows_reproduced(out: &str) {
    let seed = include_str!("../fixtures/seed_readme.txt");
    let number = |s: &str| -> Vec<String> {
        s.split_whitespace()
            .filter(|w| w.contains('.') && w.parse::<f64>().is_ok())
            .map(String::from)
            .collect()
    };
    let start = seed.find("aggregate by area and decrypt:").unwrap();
    let end = seed.find("aggregate with invalid param:").unwrap();
    let want: Vec<Vec<String>> = seed[start..end]
        .lines()
        .map(number)
        .filter(|v| v.len() == 5)
        .collect();
    assert_eq!(want.len(), 56);
    let lines: Vec<Vec<String>> = out.lines().map(number).collect();
    for row in &want {
        assert!(
            lines
                .iter()
                .any(|l| l.windows(5).any(|w| w == row.as_slice())),
            "seed row {row:?} missing from:\n{out}"
        );
    }
}
