//! What a server on a real network needs: TLS (and mutual TLS) with no plaintext fallback,
//! no password taken or sent in clear off this machine, and an audit line per call that never
//! carries a secret. A real `hedf serve` on loopback with certificates made per test.

use crate::common;

use std::path::Path;

use crate::common::tables::{encrypted_population, upload};
use crate::common::tls::Pki;
use crate::server::assert_exact;
use hedf::cli::remote::{ClientTls, Remote};
use hedf::protocol::{IngestMode, UploadOptions};
use hedf::HedfError;

const ALICE: (&str, &str) = ("alice", "alice-secret");

fn tls_server(dir: &Path, pki: &Pki, extra: &[&str]) -> common::Server {
    let mut args: Vec<String> = vec!["--user".into(), "alice:alice-secret".into()];
    args.extend(pki.serve_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::Server::start(dir, &args)
}

fn trusting(pki: &Pki) -> ClientTls {
    ClientTls {
        ca: Some(std::fs::read(&pki.ca).unwrap()),
        ..ClientTls::default()
    }
}

fn with_identity(mut tls: ClientTls, cert: &Path, key: &Path) -> ClientTls {
    tls.identity = Some((std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    tls
}

async fn upload_population(remote: &mut Remote) {
    let (schema, enc, _) = encrypted_population();
    let rows = upload(
        remote,
        "population",
        IngestMode::CREATE,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap();
    assert_eq!(rows, 152);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_server_answers_https_clients_exactly_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let server = tls_server(&dir.path().join("server"), &pki, &[]);
    let https = server.https_url();

    let mut alice = Remote::connect(&https, Some(ALICE), &trusting(&pki))
        .await
        .unwrap();
    upload_population(&mut alice).await;
    let (_, _, plain) = encrypted_population();
    for over in ["AREA", "AGE GROUP", "SEX"] {
        assert_exact(&mut alice, &plain, over, 1).await;
    }

    // The CLI's flags reach the same client.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hedf"))
        .args(["sql", "--server", &https, "--user", "alice", "--tls-ca"])
        .arg(&pki.ca)
        .args([
            "--format",
            "csv",
            "-c",
            "SELECT COUNT(*) AS n FROM population",
        ])
        .env("HEDF_PASSWORD", ALICE.1)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("152"), "{stdout}");

    // A client that trusts another CA: no connection, and no fallback.
    let other = Pki::new(&dir.path().join("other"));
    let e = Remote::connect(&https, Some(ALICE), &trusting(&other))
        .await
        .err()
        .expect("a certificate of an unknown CA was trusted");
    assert!(matches!(e, HedfError::Unavailable(_)), "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    // A plaintext client gets no answer from a TLS port (hyper reports the garbage it reads
    // back as an HTTP/2 protocol error).
    let e = Remote::connect(&server.url, Some(ALICE), &ClientTls::default())
        .await
        .err()
        .expect("plaintext was answered on a TLS port");
    assert!(
        !matches!(e, HedfError::Remote { .. }) || e.kind() == hedf::ErrorKind::Internal,
        "{e}"
    );
    // TLS options with an http:// URL are a mistake, not a silent downgrade.
    let e = Remote::connect(&server.url, Some(ALICE), &trusting(&pki))
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("need an https:// server URL"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_admits_only_clients_with_a_certificate_of_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let ca = pki.ca.display().to_string();
    let server = tls_server(&dir.path().join("server"), &pki, &["--tls-client-ca", &ca]);
    let https = server.https_url();

    let client = with_identity(trusting(&pki), &pki.client_cert, &pki.client_key);
    let mut alice = Remote::connect(&https, Some(ALICE), &client).await.unwrap();
    upload_population(&mut alice).await;

    let rogue = with_identity(trusting(&pki), &pki.rogue_cert, &pki.rogue_key);
    for (who, tls) in [
        ("no certificate", trusting(&pki)),
        ("a rogue certificate", rogue),
    ] {
        let refused = match Remote::connect(&https, Some(ALICE), &tls).await {
            Err(_) => true,
            // rustls may finish its side of the handshake before the server's alert arrives.
            Ok(mut remote) => remote.query("SELECT 1").await.is_err(),
        };
        assert!(refused, "a client with {who} was admitted");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_cross_the_network_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hedf"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--user",
            "alice:alice-secret",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to take passwords in plaintext"),
        "{stderr}"
    );

    // With TLS, or when the operator says a proxy in front terminates it, the server starts.
    let pki = Pki::new(&dir.path().join("pki"));
    let mut tls = pki.serve_args();
    tls.extend(["--user".into(), "alice:alice-secret".into()]);
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    for extra in [
        tls,
        vec!["--user", "alice:alice-secret", "--insecure-plaintext"],
    ] {
        let server = common::Server::start_on(&dir.path().join("data"), "0.0.0.0:0", &extra);
        assert!(server.url.starts_with("http://0.0.0.0:"), "{}", server.url);
    }

    let e = Remote::connect("http://192.0.2.1:50051", Some(ALICE), &ClientTls::default())
        .await
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("would carry the password in plaintext"),
        "{e}"
    );
}

/// One line per call, with who, what, how much and the status, and never a secret: not the
/// password, the token, the SQL, a value or key material.
#[tokio::test(flavor = "multi_thread")]
async fn every_call_leaves_one_audit_line_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut server = common::Server::start_logged(
        &dir.path().join("server"),
        &["--user", "alice:alice-secret"],
        &log,
    );
    let mut alice = Remote::connect(&server.url, Some(ALICE), &ClientTls::default())
        .await
        .unwrap();
    upload_population(&mut alice).await;
    let (_, batches) = alice
        .query(r#"SELECT "SEX", SUM("2018") FROM population WHERE "AREA" = 'Hartlepool' GROUP BY "SEX""#)
        .await
        .unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    alice.query("DROP TABLE population").await.unwrap();
    let wrong = Remote::connect(
        &server.url,
        Some(("alice", "not-her-password")),
        &ClientTls::default(),
    )
    .await;
    assert!(wrong.is_err());
    server.kill();

    let text = std::fs::read_to_string(&log).unwrap();
    let audit: Vec<&str> = text.lines().filter(|l| l.contains("hedf::audit")).collect();
    let lines = |parts: &[&str]| {
        audit
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    };
    // Text fields are quoted: a name cannot pose as another field.
    let alice = r#"tenant="alice""#;
    assert_eq!(lines(&[r#"rpc="Handshake""#]), 2, "{text}");
    assert_eq!(
        lines(&[alice, r#"rpc="Handshake""#, "code=Ok"]),
        1,
        "{text}"
    );
    assert_eq!(
        lines(&[
            r#"tenant="-""#,
            r#"rpc="Handshake""#,
            "code=Unauthenticated"
        ]),
        1,
        "{text}"
    );
    assert_eq!(lines(&[r#"rpc="DoPut""#]), 1, "{text}");
    let put = [
        alice,
        r#"rpc="DoPut""#,
        r#"table="population""#,
        "rows=152",
        "code=Ok",
    ];
    assert_eq!(lines(&put), 1, "{text}");
    assert_eq!(lines(&[r#"rpc="DoGet""#]), 1, "{text}");
    assert_eq!(
        lines(&[
            alice,
            r#"rpc="DoGet""#,
            r#"table="population""#,
            "rows=2",
            "code=Ok"
        ]),
        1,
        "{text}"
    );
    // The query's FlightInfo and the DROP's both name the table.
    let infos = [
        alice,
        r#"rpc="GetFlightInfo""#,
        r#"table="population""#,
        "code=Ok",
    ];
    assert_eq!(lines(&infos), 2, "{text}");
    for line in &audit {
        assert!(
            line.contains(" ms=") && line.contains(" bytes_out="),
            "{line}"
        );
    }
    for secret in [
        "alice-secret",
        "not-her-password",
        "Bearer",
        "Hartlepool",
        "SELECT",
    ] {
        assert!(!text.contains(secret), "the log holds {secret:?}:\n{text}");
    }
    // Tokens are 64 hex digits.
    let token_like = text
        .split(|c: char| !c.is_ascii_hexdigit())
        .any(|w| w.len() >= 64);
    assert!(!token_like, "the log holds a token:\n{text}");
}
