//! A client nobody here wrote: the Python ADBC Flight SQL driver (PyPI `adbc-driver-flightsql`
//! and `pyarrow`, in the tests' own Python environment) ingests, queries with plain SUM and lists
//! through a real server over TLS (`grpc+tls://`, trusting the test's CA); a plaintext client
//! is refused.

use crate::common;

use std::process::Command;

use crate::common::tls::Pki;

#[test]
fn python_adbc_driver_ingests_queries_and_lists() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let mut args = vec!["--user".to_string(), "alice:alice-secret".to_string()];
    args.extend(pki.serve_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::Server::start(&dir.path().join("server"), &args);
    let addr = server.https_url().replace("https://", "");
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new(common::python())
        .arg(format!("{root}/tests/python/adbc_client.py"))
        .arg(format!("grpc+tls://{addr}"))
        .arg(env!("CARGO_BIN_EXE_hedf"))
        .arg(dir.path())
        .arg(format!("{root}/data/population.csv"))
        .arg(&pki.ca)
        .output()
        .expect("the tests' Python environment");
    drop(server);
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
