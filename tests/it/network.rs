//! What a server on a real network needs: TLS (and mutual TLS) with no plaintext fallback,
//! no password taken or sent in clear off this machine, connection limits and deadlines, and
//! an audit line per call that never carries a secret. A real `hedf serve` on loopback with
//! certificates made per test.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

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
    // A plaintext client gets no answer from a TLS port: hyper reports the garbage it reads
    // back as an HTTP/2 protocol error, or, when the server closes first, the call as
    // cancelled (seen once in about ten runs).
    let e = Remote::connect(&server.url, Some(ALICE), &ClientTls::default())
        .await
        .err()
        .expect("plaintext was answered on a TLS port");
    assert!(
        !matches!(e, HedfError::Remote { .. })
            || matches!(
                e.kind(),
                hedf::ErrorKind::Internal | hedf::ErrorKind::Cancelled
            ),
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

/// An HTTP/2 connection to the server at `url`; the task drives it and ends when the server
/// closes it.
async fn h2_connection(
    url: &str,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    (client, tokio::spawn(connection))
}

/// A gRPC call to Flight's `method` whose request is one empty message; the response headers
/// and the rest read (Err: the connection is gone).
async fn grpc_call(
    client: &mut h2::client::SendRequest<Bytes>,
    url: &str,
    method: &str,
    authorization: &str,
) -> Result<http::HeaderMap, h2::Error> {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "{url}/arrow.flight.protocol.FlightService/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", authorization)
        .body(())
        .unwrap();
    let (response, mut stream) = client.clone().ready().await?.send_request(request, false)?;
    stream.send_data(Bytes::from_static(&[0; 5]), true)?;
    let response = response.await?;
    let headers = response.headers().clone();
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        data?;
    }
    let mut all = headers;
    all.extend(body.trailers().await?.unwrap_or_default());
    Ok(all)
}

/// A login on `client`: the bearer token, or the gRPC status code.
async fn login_h2(
    client: &mut h2::client::SendRequest<Bytes>,
    url: &str,
    (user, password): (&str, &str),
) -> Result<Result<String, String>, h2::Error> {
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{user}:{password}"),
    );
    let headers = grpc_call(client, url, "Handshake", &format!("Basic {basic}")).await?;
    Ok(match headers.get("authorization") {
        Some(token) => Ok(token.to_str().unwrap().to_string()),
        None => Err(headers["grpc-status"].to_str().unwrap().to_string()),
    })
}

/// How long after `since` the connection `driver` drives was closed, if within `limit`.
async fn closed_within(
    driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    tokio::time::timeout(limit, driver)
        .await
        .ok()?
        .unwrap()
        .ok();
    Some(since.elapsed())
}

/// A TCP connection to `server` from `local` (any address of 127/8), if the server keeps it
/// open for a second; `None` if it closes it at once. Nothing is consumed of what the server
/// sends (HTTP/2 SETTINGS at once, when admitted).
async fn admitted(local: &str, server: &str) -> Option<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{local}:0").parse::<SocketAddr>().unwrap())
        .unwrap();
    let tcp = socket
        .connect(server.trim_start_matches("http://").parse().unwrap())
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(1), tcp.peek(&mut byte)).await {
        Err(_) | Ok(Ok(1..)) => Some(tcp),
        Ok(Ok(0) | Err(_)) => None,
    }
}

/// Whether the server closes `tcp` within `limit` (what it sent before is read and dropped).
async fn closes_within(mut tcp: TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(limit, async {
        while let Ok(1..) = tcp.read(&mut buf).await {}
    })
    .await
    .is_ok()
}

/// A socket that never speaks, and a connection whose every login fails, are closed at the
/// first-call deadline; a logged-in one stays past it, a call in progress keeps it past the
/// idle time, and it closes an idle time after its last call ended. (The guesser is another
/// user, so that alice's own login is not throttled.)
#[tokio::test(flavor = "multi_thread")]
async fn quiet_connections_are_closed_and_busy_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::Server::start(
        dir.path(),
        &[
            "--user",
            "alice:alice-secret",
            "--first-call-timeout",
            "2",
            "--idle-timeout",
            "6",
        ],
    );
    let url = server.url.clone();
    let start = Instant::now();
    let mut silent = TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let silent = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok(1..) = silent.read(&mut buf).await {}
        start.elapsed()
    });
    let (mut failing, failing_driver) = h2_connection(&url).await;
    let attacker_url = url.clone();
    let refusals = tokio::spawn(async move {
        let mut refusals = 0;
        while let Ok(Err(code)) = login_h2(&mut failing, &attacker_url, ("mallory", "guess")).await
        {
            // Unauthenticated, then ResourceExhausted once the throttle holds logins back.
            assert!(code == "16" || code == "8", "{code}");
            refusals += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        refusals
    });
    let failing_closed = closed_within(failing_driver, start, Duration::from_secs(8))
        .await
        .expect("failed logins kept a connection open");
    let silent_closed = tokio::time::timeout(Duration::from_secs(8), silent)
        .await
        .expect("a silent socket was kept open")
        .unwrap();
    for closed in [failing_closed, silent_closed] {
        assert!(closed >= Duration::from_millis(1900), "{closed:?}");
        assert!(closed < Duration::from_secs(5), "{closed:?}");
    }
    assert!(refusals.await.unwrap() >= 3);

    let (mut busy, busy_driver) = h2_connection(&url).await;
    let token = login_h2(&mut busy, &url, ALICE).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listed = grpc_call(&mut busy, &url, "ListActions", &token)
        .await
        .expect("a logged-in connection was closed at the first-call deadline");
    assert_eq!(listed["grpc-status"], "0");
    // An upload that has not sent its first message yet is a call in progress.
    let upload = http::Request::builder()
        .method("POST")
        .uri(format!("{url}/arrow.flight.protocol.FlightService/DoPut"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", &token)
        .body(())
        .unwrap();
    let (_response, mut upload) = busy.send_request(upload, false).unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        !busy_driver.is_finished(),
        "a connection was closed during a call"
    );
    upload.send_reset(h2::Reason::CANCEL);
    let ended = Instant::now();
    let closed = closed_within(busy_driver, ended, Duration::from_secs(12))
        .await
        .expect("an idle connection was kept open");
    assert!(closed >= Duration::from_millis(5900), "{closed:?}");
}

/// One host holds at most its share of connections; when the server is full, a new connection
/// evicts the oldest one not logged in, and is refused if every connection is logged in; a
/// closed connection gives its place back. Binds client sockets to 127.0.0.2 and 127.0.0.3,
/// which Linux routes to loopback.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread")]
async fn peers_hold_at_most_their_share_of_connections() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::Server::start(
        dir.path(),
        &[
            "--user",
            "alice:alice-secret",
            "--max-connections",
            "3",
            "--max-connections-per-peer",
            "2",
        ],
    );
    let url = &server.url;
    let first = admitted("127.0.0.1", url).await.expect("first connection");
    let second = admitted("127.0.0.1", url).await.expect("second connection");
    assert!(
        admitted("127.0.0.1", url).await.is_none(),
        "a third connection from one peer"
    );
    let other = admitted("127.0.0.2", url).await.expect("another peer's");
    let third = admitted("127.0.0.3", url)
        .await
        .expect("a connection to a full server of silent sockets");
    assert!(
        closes_within(first, Duration::from_secs(2)).await,
        "the oldest silent connection was not evicted"
    );
    drop((second, other, third));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut logged_in = Vec::new();
    for local in ["127.0.0.1", "127.0.0.1", "127.0.0.2"] {
        let tcp = admitted(local, url)
            .await
            .expect("closed connections' places were not given back");
        let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(connection);
        assert!(login_h2(&mut client, url, ALICE).await.unwrap().is_ok());
        logged_in.push((client, driver));
    }
    assert!(
        admitted("127.0.0.3", url).await.is_none(),
        "a connection to a full server of logged-in ones"
    );
    for (mut client, driver) in logged_in {
        assert!(!driver.is_finished(), "a logged-in connection was evicted");
        let token = login_h2(&mut client, url, ALICE).await.unwrap().unwrap();
        let listed = grpc_call(&mut client, url, "ListActions", &token).await;
        assert_eq!(listed.unwrap()["grpc-status"], "0");
    }
}
