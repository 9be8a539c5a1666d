//! A client nobody here wrote: the Python ADBC Flight SQL driver (PyPI `adbc-driver-flightsql`
//! and `pyarrow`, installed by `.ci/run`) ingests, queries and lists through a real server.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn python_adbc_driver_ingests_queries_and_lists() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_hedf"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--user",
            "alice:alice-secret",
            "--data-dir",
        ])
        .arg(dir.path().join("server"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .nth(4)
        .unwrap()
        .trim_end_matches(',');
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("python3")
        .arg(format!("{root}/tests/python/adbc_client.py"))
        .arg(format!("grpc://{addr}"))
        .arg(env!("CARGO_BIN_EXE_hedf"))
        .arg(dir.path())
        .arg(format!("{root}/data/population.csv"))
        .output()
        .expect("python3 with adbc-driver-flightsql and pyarrow (see .ci/run)");
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("8 decrypted groups equal the plaintext sums"),
        "{stdout}"
    );
}
