//! What a hostile or careless tenant did to `hedf serve` when it was probed, each as a regression
//! test against a real server process on loopback: the attack fails with a clear error, the
//! server stays up, and nobody's stored data changes.

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::population::{population, YEARS};
use crate::common::tables::{encrypted_population, key, upload};
use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, DictionaryArray, Int32Array, ListArray, RecordBatch,
    StructArray,
};
use arrow::datatypes::{DataType, Decimal128Type, Field, Int32Type, Int64Type, Schema, SchemaRef};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{CommandStatementIngest, ProstMessageExt};
use arrow_flight::{FlightData, FlightDescriptor, HandshakeRequest};
use futures::{StreamExt, TryStreamExt};
use hedf::cli::remote::{table_options, ClientTls, Remote};
use hedf::crypto::client::{decrypt_batch, MeasureColumn};
use hedf::crypto::keys::ClientKey;
use hedf::protocol::{IngestMode, UploadOptions};
use hedf::HedfError;
use prost::Message;

const ALICE: (&str, &str) = ("alice", "alice-secret");
const BOB: (&str, &str) = ("bob", "bob-secret");

fn start(dir: &Path, extra: &[&str]) -> common::Server {
    let mut args = vec!["--user", "alice:alice-secret", "--user", "bob:bob-secret"];
    args.extend(extra);
    common::Server::start(dir, &args)
}

async fn connect(server: &common::Server, login: (&str, &str)) -> Remote {
    Remote::connect(&server.url, Some(login), &ClientTls::default())
        .await
        .unwrap()
}

async fn create_population(remote: &mut Remote, table: &str) {
    let (schema, enc, _) = encrypted_population();
    let rows = upload(
        remote,
        table,
        IngestMode::CREATE,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap();
    assert_eq!(rows, 152);
}

async fn count(remote: &mut Remote, table: &str) -> i64 {
    let (_, batches) = remote
        .query(&format!("SELECT COUNT(*) FROM {table}"))
        .await
        .unwrap();
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

fn code(e: &HedfError) -> String {
    match e {
        HedfError::Remote { kind, .. } => format!("{kind:?}"),
        other => format!("local: {other}"),
    }
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// `EXPLAIN ANALYZE COPY ... TO` wrote files of the attacker's choosing anywhere the server's
/// OS user could: into another tenant's folder, over a users file. Every plan that writes or
/// defines anything is now refused, however it is wrapped, and the tenant session has no object
/// store that reaches the file system.
#[tokio::test(flavor = "multi_thread")]
async fn statements_that_write_or_define_are_refused_at_any_depth() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), &[]);
    let mut alice = connect(&server, ALICE).await;
    let mut bob = connect(&server, BOB).await;
    create_population(&mut alice, "population").await;
    create_population(&mut bob, "population").await;

    let outside = dir.path().join("outside.csv");
    let planted = dir.path().join("data/tenants/bob/manifest.tmp");
    let users = dir.path().join("users.csv");
    let attacks = [
        format!(
            "EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{}' STORED AS CSV",
            outside.display()
        ),
        format!(
            "EXPLAIN COPY (SELECT 1 AS x) TO '{}' STORED AS CSV",
            outside.display()
        ),
        format!(
            "COPY (SELECT 1 AS x) TO '{}' STORED AS CSV",
            outside.display()
        ),
        format!(
            "EXPLAIN ANALYZE COPY (SELECT \"AREA\" FROM population) TO '{}' STORED AS PARQUET",
            planted.display()
        ),
        format!(
            "EXPLAIN ANALYZE COPY (SELECT 'mallory:x' AS u) TO '{}' STORED AS CSV",
            users.display()
        ),
        "EXPLAIN ANALYZE INSERT INTO population SELECT * FROM population".into(),
        "EXPLAIN CREATE TABLE t AS SELECT 1".into(),
        "EXPLAIN ANALYZE CREATE VIEW v AS SELECT 1".into(),
        format!(
            "EXPLAIN CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '{}'",
            dir.path().display()
        ),
        "EXPLAIN ANALYZE DROP TABLE population".into(),
        "EXPLAIN SET datafusion.execution.target_partitions = 1".into(),
        "SET datafusion.execution.target_partitions = 1".into(),
        "PREPARE p AS SELECT 1".into(),
        "EXPLAIN PREPARE p AS SELECT 1".into(),
        "SELECT 1; SELECT 2".into(),
    ];
    for sql in &attacks {
        let e = alice.query(sql).await.unwrap_err();
        assert_eq!(code(&e), "InvalidArgument", "{sql}: {e}");
    }
    // A query that fails on its own values is the caller's error, told as it is.
    for (sql, says) in [
        ("SELECT COUNT(*) / 0 FROM population", "Divide by zero"),
        (
            "SELECT CAST(\"AREA\" AS INT) FROM population",
            "Cannot cast",
        ),
    ] {
        let e = alice.query(sql).await.unwrap_err();
        assert_eq!(code(&e), "InvalidArgument", "{sql}: {e}");
        assert!(e.to_string().contains(says), "{sql}: {e}");
    }
    for path in [&outside, &planted, &users] {
        assert!(!path.exists(), "{} was written", path.display());
    }
    let files = files_under(dir.path());
    assert!(
        files.iter().all(|f| !f.to_string_lossy().ends_with(".csv")),
        "{files:?}"
    );

    // Both tenants keep working: Bob can still replace and drop; nothing was planted.
    assert_eq!(count(&mut alice, "population").await, 152);
    let (schema, enc, _) = encrypted_population();
    upload(
        &mut bob,
        "population",
        IngestMode::REPLACE,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap();
    bob.execute("DROP TABLE population").await.unwrap();

    // Queries under EXPLAIN ANALYZE run; plans name segments, never server paths.
    let (_, plan) = alice
        .query("EXPLAIN SELECT \"SEX\", he_sum(\"2018\") FROM population WHERE \"AREA\" <> 'x' GROUP BY \"SEX\"")
        .await
        .unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&plan)
        .unwrap()
        .to_string();
    assert!(text.contains("population-"), "{text}");
    assert!(!text.contains(&*dir.path().to_string_lossy()), "{text}");
    let (_, analyzed) = alice
        .query("EXPLAIN ANALYZE SELECT COUNT(*) FROM population")
        .await
        .unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&analyzed)
        .unwrap()
        .to_string();
    assert!(!text.contains(&*dir.path().to_string_lossy()), "{text}");
}

/// A 2 KB query of 1,000 `+` terms overflowed a worker's stack and aborted the server. Deep
/// expressions (5,000-term sums, OR chains and IN lists, as BI tools write them) now answer
/// exactly; nesting deeper than the parser allows is an error; the server stays up.
#[tokio::test(flavor = "multi_thread")]
async fn deep_expressions_answer_or_fail_cleanly_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), &[]);
    let mut alice = connect(&server, ALICE).await;
    create_population(&mut alice, "population").await;
    let (_, _, plain) = encrypted_population();

    let sum = vec!["1"; 5000].join(" + ");
    let (_, got) = alice.query(&format!("SELECT {sum} AS s")).await.unwrap();
    assert_eq!(got[0].column(0).as_primitive::<Int64Type>().value(0), 5000);

    // 5,000 alternatives, a few of which match: counted and summed exactly.
    let (_, areas) = alice
        .query("SELECT DISTINCT \"AREA\" FROM population ORDER BY \"AREA\"")
        .await
        .unwrap();
    let areas: Vec<String> = areas[0]
        .column(0)
        .as_string::<i32>()
        .iter()
        .map(|a| a.unwrap().to_string())
        .collect();
    let mut alternatives: Vec<String> = (0..4998).map(|i| format!("'nowhere {i}'")).collect();
    alternatives.extend(areas[..2].iter().map(|a| format!("'{a}'")));
    let or = alternatives
        .iter()
        .map(|a| format!("\"AREA\" = {a}"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let in_list = format!("\"AREA\" IN ({})", alternatives.join(", "));
    // The reference is plaintext DataFusion with the IN list (the same predicate, planned in
    // linear time: DataFusion's planning of a deep chain is quadratic).
    let sql = |sum: &str, filter: &str| {
        format!("SELECT COUNT(*) AS n, {sum}(\"2018\") AS s FROM population WHERE {filter}")
    };
    let want = plain
        .sql(&sql("SUM", &in_list))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert!(want[0].column(0).as_primitive::<Int64Type>().value(0) > 0);
    for filter in [&or, &in_list] {
        let (_, got) = alice.query(&sql("he_sum", filter)).await.unwrap();
        let got = decrypt_batch(key(), &got[0]).unwrap();
        assert_eq!(
            got.column(0).as_primitive::<Int64Type>().value(0),
            want[0].column(0).as_primitive::<Int64Type>().value(0)
        );
        assert_eq!(
            got.column(1).as_primitive::<Decimal128Type>().value(0),
            want[0].column(1).as_primitive::<Decimal128Type>().value(0)
        );
    }

    // Hundreds of thousands of terms: refused by size before the parser builds a tree that
    // deep (freeing a 2,000,000-term tree overflowed the stack), also behind another statement.
    let long = format!("SELECT 1; SELECT {}1", "1+".repeat(700_000));
    let many = format!("SELECT {}1", "1+".repeat(30_000));
    for sql in [&long, &many] {
        let e = alice.query(sql).await.unwrap_err();
        assert_eq!(code(&e), "InvalidArgument", "{e}");
        assert!(e.to_string().contains("too long"), "{e}");
    }
    // Past 2 MiB the request itself is refused, before it is decoded.
    let huge = format!("SELECT {}1", "1+".repeat(2_000_000));
    let e = alice.query(&huge).await.unwrap_err();
    assert_eq!(code(&e), "ResourceExhausted", "{e}");
    assert!(e.to_string().contains("at most 2 MiB"), "{e}");

    let nested = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
    let nested_or = format!(
        "SELECT {}true{}",
        "(1 = 1 OR ".repeat(5000),
        ")".repeat(5000)
    );
    for sql in [nested, nested_or] {
        let e = alice.query(&sql).await.unwrap_err();
        assert_eq!(code(&e), "InvalidArgument", "{e}");
        assert!(e.to_string().contains("nests more than 50 levels"), "{e}");
    }

    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died"
    );
    assert_eq!(count(&mut alice, "population").await, 152);
    server.kill();
}

/// The seed's encrypted table as a stream of eight-batch uploads by a raw Flight client whose
/// request is `descriptor` followed by the first `sent` batches and then nothing more: the call
/// never completes on its own.
fn stalled_upload(
    descriptor: FlightDescriptor,
    sent: usize,
) -> impl futures::Stream<Item = FlightData> + Send + 'static {
    let (schema, enc, _) = encrypted_population();
    let batches: Vec<RecordBatch> = (0..8)
        .map(|i| enc[0].slice(i * 19, 19))
        .take(sent)
        .collect();
    FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .with_flight_descriptor(Some(descriptor))
        .build(futures::stream::iter(batches.into_iter().map(Ok)))
        .map(|d| d.unwrap())
        .chain(futures::stream::pending())
}

async fn flight_client(url: &str) -> FlightServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    FlightServiceClient::new(channel)
}

/// One handshake as `login` on `client`: the bearer token, or the server's refusal.
async fn try_login(
    client: &mut FlightServiceClient<tonic::transport::Channel>,
    login: (&str, &str),
) -> Result<String, tonic::Status> {
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{}:{}", login.0, login.1),
    );
    let mut request = tonic::Request::new(futures::stream::iter([HandshakeRequest::default()]));
    request
        .metadata_mut()
        .insert("authorization", format!("Basic {basic}").parse().unwrap());
    let response = client.handshake(request).await?;
    Ok(response
        .metadata()
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string())
}

/// A raw arrow-flight client logged in as `login` (its bearer token in `token`).
async fn raw_client(
    url: &str,
    login: (&str, &str),
) -> (FlightServiceClient<tonic::transport::Channel>, String) {
    let mut client = flight_client(url).await;
    let token = try_login(&mut client, login).await.unwrap();
    (client, token)
}

fn ingest_descriptor(table: &str, mode: IngestMode) -> FlightDescriptor {
    let command = CommandStatementIngest {
        table_definition_options: Some(table_options(mode)),
        table: table.to_string(),
        ..Default::default()
    };
    FlightDescriptor::new_cmd(command.as_any().encode_to_vec())
}

/// Sends `messages` as the request of a DoPut on a raw HTTP/2 stream, then resets the stream
/// with `reason` (CANCEL is what a gRPC client sends when its call is cancelled). Returns once
/// the reset is out.
async fn put_then_reset(url: &str, token: &str, messages: Vec<FlightData>, reason: h2::Reason) {
    let addr = url.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("{url}/arrow.flight.protocol.FlightService/DoPut"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", token)
        .body(())
        .unwrap();
    let (_response, mut stream) = client
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    for message in messages {
        let body = message.encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        stream.send_data(frame.into(), false).unwrap();
    }
    // Let the server take in the batches before the reset arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.send_reset(reason);
    tokio::time::sleep(Duration::from_millis(300)).await;
    driver.abort();
}

/// The gRPC status of a DoPut whose only message announces 48 MiB and stops after 1 KiB, sent
/// with `authorization` (or none), if the server answers within 5 s.
async fn stalled_put_status(url: &str, authorization: Option<&str>) -> Option<String> {
    let addr = url.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("{url}/arrow.flight.protocol.FlightService/DoPut"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let (response, mut stream) = client
        .ready()
        .await
        .unwrap()
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(48u32 << 20).to_be_bytes());
    frame.extend_from_slice(&[0u8; 1024]);
    // A call refused from its headers may be closed before its data goes out.
    let _ = stream.send_data(frame.into(), false);
    let status = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .ok()
        .map(|r| {
            let r = r.unwrap();
            r.headers()["grpc-status"].to_str().unwrap().to_string()
        });
    driver.abort();
    status
}

/// An anonymous DoPut was decoded before anyone asked who sent it: Flight SQL peeks at the
/// first message to route the call, so 16 stalled 56 MiB messages held 900 MiB. A call without
/// a live token is now refused from its headers, before its body is read.
#[tokio::test(flavor = "multi_thread")]
async fn calls_without_a_login_are_refused_before_their_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "alice:alice-secret"
        )
    );
    for authorization in [None, Some("Bearer 00ff"), Some(basic.as_str())] {
        let status = stalled_put_status(&server.url, authorization).await;
        assert_eq!(status.as_deref(), Some("16"), "{authorization:?}");
    }
    // A logged-in caller's message is read: the server waits for the rest of it.
    let (_, token) = raw_client(&server.url, ALICE).await;
    assert_eq!(stalled_put_status(&server.url, Some(&token)).await, None);
}

/// A logged-in tenant could stall uploads midway and hold their buffers (up to a 64 MiB message
/// each, 64 calls per connection) until the connection's maximum age. Now an upload whose client
/// sends nothing for --stall-timeout ends with DEADLINE_EXCEEDED, and a user's uploads past
/// --max-uploads-per-user are refused before a byte of them is read; other users' are not.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upload_ends_and_holds_only_its_users_slot() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        &["--stall-timeout", "3", "--max-uploads-per-user", "1"],
    );
    let mut alice = connect(&server, ALICE).await;
    let mut bob = connect(&server, BOB).await;
    let (schema, enc, _) = encrypted_population();
    let (_, token) = raw_client(&server.url, ALICE).await;
    let url = server.url.clone();
    let stalled = tokio::spawn(async move { stalled_put_status(&url, Some(&token)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    create_population(&mut bob, "population").await;
    assert!(!stalled.is_finished(), "the stalled upload ended early");
    let e = upload(
        &mut alice,
        "population",
        IngestMode::CREATE,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), hedf::ErrorKind::ResourceExhausted, "{e}");
    assert!(
        e.to_string()
            .contains("too many uploads for this user at once (1 running)"),
        "{e}"
    );
    assert!(!stalled.is_finished(), "the stalled upload ended early");

    assert_eq!(stalled.await.unwrap().as_deref(), Some("4"));
    // Its slot is free again, and nothing of it was stored.
    assert_eq!(alice.tables().await.unwrap().len(), 0);
    create_population(&mut alice, "population").await;
}

/// A cancelled upload (tonic reports a stream reset with CANCEL as a clean end) and one whose
/// deadline passed replaced tables by the rows sent so far. An upload now commits only if the
/// client completed its stream: create, append and replace all leave the table as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_or_timed_out_upload_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut alice = connect(&server, ALICE).await;
    create_population(&mut alice, "population").await;
    let (schema, enc, _) = encrypted_population();
    let modes = [
        ("fresh", IngestMode::CREATE),
        ("population", IngestMode::APPEND),
        ("population", IngestMode::REPLACE),
    ];
    let assert_unchanged = |tables: Vec<(String, SchemaRef)>, what: &str| {
        let names: Vec<String> = tables.into_iter().map(|t| t.0).collect();
        assert_eq!(names, ["population"], "{what}");
    };
    // CANCEL is what gRPC clients send; NO_ERROR is a protocol violation from a client, which
    // hyper reports as a clean end of the body.
    for reason in [h2::Reason::CANCEL, h2::Reason::NO_ERROR] {
        for (table, mode) in modes {
            let (_, token) = raw_client(&server.url, ALICE).await;
            let messages = FlightDataEncoderBuilder::new()
                .with_schema(schema.clone())
                .with_flight_descriptor(Some(ingest_descriptor(table, mode)))
                .build(futures::stream::iter(
                    [enc[0].slice(0, 19), enc[0].slice(19, 19)].map(Ok),
                ))
                .try_collect::<Vec<FlightData>>()
                .await
                .unwrap();
            put_then_reset(&server.url, &token, messages, reason).await;
            let what = format!("reset with {reason:?}, {mode:?}");
            assert_eq!(count(&mut alice, "population").await, 152, "{what}");
            assert_unchanged(alice.tables().await.unwrap(), &what);
        }
    }
    for (table, mode) in modes {
        let (mut client, token) = raw_client(&server.url, ALICE).await;
        let mut request = tonic::Request::new(stalled_upload(ingest_descriptor(table, mode), 2));
        request.set_timeout(Duration::from_millis(500));
        request
            .metadata_mut()
            .insert("authorization", token.parse().unwrap());
        let outcome = async {
            let mut results = client.do_put(request).await?.into_inner();
            results.message().await
        };
        let e = tokio::time::timeout(Duration::from_secs(20), outcome)
            .await
            .expect("the server ended the call")
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
            ),
            "{mode:?}: {e}"
        );
        assert_eq!(
            count(&mut alice, "population").await,
            152,
            "timed out {mode:?}"
        );
        assert_unchanged(alice.tables().await.unwrap(), "timed out");
    }
    // No segment of the cut-off uploads is left behind.
    let segments = files_under(&dir.path().join("tenants/alice"))
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "parquet"))
        .count();
    assert_eq!(segments, 1);
}

/// The stock ADBC driver sends unpadded base64 Basic credentials; the server accepted only
/// padded ones, so two of every three credential lengths could not log in.
#[tokio::test(flavor = "multi_thread")]
async fn basic_credentials_log_in_padded_or_not_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    // "u1:pw", "u22:pw", "u333:pw": 5, 6 and 7 bytes, one of each length mod 3.
    let server = common::Server::start(
        dir.path(),
        &["--user", "u1:pw", "--user", "u22:pw", "--user", "u333:pw"],
    );
    for user in ["u1", "u22", "u333"] {
        let credentials = format!("{user}:pw");
        let padded =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &credentials);
        let unpadded = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &credentials,
        );
        for encoded in [&padded, &unpadded] {
            let mut client = flight_client(&server.url).await;
            let mut request =
                tonic::Request::new(futures::stream::iter([HandshakeRequest::default()]));
            request
                .metadata_mut()
                .insert("authorization", format!("Basic {encoded}").parse().unwrap());
            let response = client.handshake(request).await;
            assert!(response.is_ok(), "{credentials} as {encoded}: {response:?}");
        }
        let wrong = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            format!("{user}:px"),
        );
        let mut client = flight_client(&server.url).await;
        let mut request = tonic::Request::new(futures::stream::iter([HandshakeRequest::default()]));
        request
            .metadata_mut()
            .insert("authorization", format!("Basic {wrong}").parse().unwrap());
        let e = client.handshake(request).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
}

/// A password guesser got about 37 tries a second for one user with no backoff, and its Argon2
/// work ran on the async workers every query needs. Failed logins now earn doubling waits per
/// user name and per peer, refused without Argon2, while a logged-in tenant keeps working.
#[tokio::test(flavor = "multi_thread")]
async fn password_guessing_is_slowed_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut bob = connect(&server, BOB).await;

    let guessing = Duration::from_secs(4);
    let guessers: Vec<_> = (0..4)
        .map(|i| {
            let url = server.url.clone();
            tokio::spawn(async move {
                let mut client = flight_client(&url).await;
                let until = std::time::Instant::now() + guessing;
                let mut refusals = Vec::new();
                while std::time::Instant::now() < until {
                    let guess = format!("guess-{i}-{}", refusals.len());
                    let status = try_login(&mut client, ("alice", &guess)).await.unwrap_err();
                    refusals.push((status.code(), status.message().to_string()));
                }
                refusals
            })
        })
        .collect();
    let mut answered = 0;
    while !guessers.iter().all(|g| g.is_finished()) {
        let (_, batches) = bob.query("SELECT 41 + 1").await.unwrap();
        assert_eq!(
            batches[0].column(0).as_primitive::<Int64Type>().value(0),
            42
        );
        answered += 1;
    }
    let refusals: Vec<_> = futures::future::join_all(guessers)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    let checked = refusals
        .iter()
        .filter(|(code, _)| *code == tonic::Code::Unauthenticated)
        .count();
    let throttled: Vec<_> = refusals
        .iter()
        .filter(|(code, _)| *code == tonic::Code::ResourceExhausted)
        .collect();
    assert_eq!(checked + throttled.len(), refusals.len(), "{refusals:?}");
    // Five free guesses (a few more were already being checked when the fifth failed), then
    // one after each doubling wait: about 7 in 4 s.
    assert!(
        (5..=12).contains(&checked),
        "{checked} guesses were checked"
    );
    assert!(throttled.len() > 100, "{} refused", throttled.len());
    assert!(throttled[0].1.contains("too many failed logins; retry in"));
    assert!(answered > 0);

    // Alice's own password waits too (her tokens issued before stay valid); bob, from the same
    // address, logs in.
    let mut client = flight_client(&server.url).await;
    let e = try_login(&mut client, ALICE).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    try_login(&mut client, BOB).await.unwrap();

    // Spraying names from one address: the address's 20 free failures run out.
    let mut sprayed = 0;
    let e = loop {
        sprayed += 1;
        assert!(sprayed <= 20, "no backoff after {sprayed} names");
        let name = format!("nobody-{sprayed}");
        match try_login(&mut client, (&name, "guess")).await {
            Err(e) if e.code() == tonic::Code::Unauthenticated => continue,
            other => break other.unwrap_err(),
        }
    };
    assert!(sprayed > 1, "{e:?}");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(bob.query("SELECT 1").await.is_ok());
}

/// A segment deleted under the server gave silent zeros, NULLs or half sums, and after a
/// restart one broken table failed every table of its tenant. A table now knows its segments'
/// sizes and row counts: a missing or short one is an error naming that table only, before and
/// after a restart, until the table is replaced or dropped.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_or_short_segment_damages_only_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), &[]);
    let mut alice = connect(&server, ALICE).await;
    for table in ["lost", "short", "fine"] {
        create_population(&mut alice, table).await;
    }
    let tenant = dir.path().join("tenants/alice");
    let segment = |table: &str| {
        files_under(&tenant)
            .into_iter()
            .find(|f| {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with(&format!("{table}-")) && name.ends_with(".parquet")
            })
            .unwrap()
    };
    std::fs::remove_file(segment("lost")).unwrap();
    let short = segment("short");
    let bytes = std::fs::read(&short).unwrap();
    std::fs::write(&short, &bytes[..bytes.len() - 100]).unwrap();

    for restarted in [false, true] {
        for (table, why) in [("lost", "is missing"), ("short", "bytes")] {
            for sql in [
                format!("SELECT COUNT(*) FROM {table}"),
                format!("SELECT he_sum(\"2018\") FROM {table}"),
            ] {
                let e = alice.query(&sql).await.unwrap_err();
                assert_eq!(code(&e), "DataLoss", "{sql} (restarted: {restarted}): {e}");
                let text = e.to_string();
                assert!(
                    text.contains(&format!("table {table} is damaged")) && text.contains(why),
                    "{text}"
                );
            }
        }
        assert_eq!(
            count(&mut alice, "fine").await,
            152,
            "restarted: {restarted}"
        );
        if !restarted {
            server.kill();
            server = start(dir.path(), &[]);
            alice = connect(&server, ALICE).await;
        }
    }

    // Replacing repairs a table, dropping removes it; the others are untouched.
    let (schema, enc, _) = encrypted_population();
    upload(
        &mut alice,
        "lost",
        IngestMode::REPLACE,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap();
    assert_eq!(count(&mut alice, "lost").await, 152);
    let e = upload(
        &mut alice,
        "short",
        IngestMode::APPEND,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), "DataLoss", "{e}");
    alice.execute("DROP TABLE short").await.unwrap();
    let mut tables: Vec<String> = alice
        .tables()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.0)
        .collect();
    tables.sort();
    assert_eq!(tables, ["fine", "lost"]);
}

/// A table with no encrypted column (a file that was never encrypted) was stored without a word.
/// It is refused unless the uploader says a plaintext table is intended.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_encrypted_columns_needs_explicit_consent() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut alice = connect(&server, ALICE).await;
    let (schema, plain) = population().unwrap();
    let e = upload(
        &mut alice,
        "clear",
        IngestMode::CREATE,
        UploadOptions::default(),
        &schema,
        &plain,
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), "InvalidArgument", "{e}");
    assert!(e.to_string().contains("no encrypted column"), "{e}");
    assert!(alice.tables().await.unwrap().is_empty());
    let rows = upload(
        &mut alice,
        "clear",
        IngestMode::CREATE,
        UploadOptions {
            allow_plaintext: true,
        },
        &schema,
        &plain,
    )
    .await
    .unwrap();
    assert_eq!(rows, 152);
    assert_eq!(
        hedf::server::catalog::plaintext_warnings(&schema).len(),
        YEARS.len(),
        "every year column is a numeric plaintext column"
    );
}

/// Uploads whose schema or bytes are broken in ways the probe found: each is refused with
/// INVALID_ARGUMENT (never a dropped connection), and the server keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_uploads_are_refused_with_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), &[]);
    let mut alice = connect(&server, ALICE).await;
    create_population(&mut alice, "population").await;
    let (schema, enc, _) = encrypted_population();
    let plaintext_ok = UploadOptions {
        allow_plaintext: true,
    };

    // Metadata numbers that wrapped in `as u8` casts: 257 limbs read as 1.
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut meta = fields[3].metadata().clone();
    meta.insert("hedf.limbs".into(), "257".into());
    fields[3] = fields[3].clone().with_metadata(meta);
    let wrapped = Arc::new(Schema::new(fields));
    let batches: Vec<RecordBatch> = enc
        .iter()
        .map(|b| RecordBatch::try_new(wrapped.clone(), b.columns().to_vec()).unwrap())
        .collect();
    let e = upload(
        &mut alice,
        "t",
        IngestMode::CREATE,
        UploadOptions::default(),
        &wrapped,
        &batches,
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), "InvalidArgument", "{e}");
    assert!(e.to_string().contains("hedf.limbs"), "{e}");

    // Duplicate and empty column names made a table that no query could read.
    for names in [["a", "a"], ["", "b"]] {
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new(names[0], DataType::Int32, true),
                Field::new(names[1], DataType::Int32, true),
            ])),
            vec![
                Arc::new(Int32Array::from(vec![1])),
                Arc::new(Int32Array::from(vec![2])),
            ],
        )
        .unwrap();
        let e = upload(
            &mut alice,
            "t",
            IngestMode::CREATE,
            plaintext_ok,
            &batch.schema(),
            std::slice::from_ref(&batch),
        )
        .await
        .unwrap_err();
        assert_eq!(code(&e), "InvalidArgument", "{names:?}: {e}");
    }

    // A client key hidden in nested columns or in metadata.
    let key_bytes = ClientKey::generate().to_bytes();
    let binary: ArrayRef = Arc::new(BinaryArray::from(vec![key_bytes.as_slice()]));
    let list: ArrayRef = Arc::new(ListArray::new(
        Arc::new(Field::new_list_field(DataType::Binary, true)),
        arrow::buffer::OffsetBuffer::from_lengths([1]),
        binary.clone(),
        None,
    ));
    let strukt: ArrayRef = Arc::new(StructArray::from(vec![(
        Arc::new(Field::new("k", DataType::Binary, true)),
        binary.clone(),
    )]));
    let dictionary: ArrayRef = Arc::new(
        DictionaryArray::<Int32Type>::try_new(Int32Array::from(vec![0]), binary.clone()).unwrap(),
    );
    for column in [list, strukt, dictionary] {
        let batch = RecordBatch::try_from_iter([("hidden", column.clone())]).unwrap();
        let e = upload(
            &mut alice,
            "t",
            IngestMode::CREATE,
            plaintext_ok,
            &batch.schema(),
            std::slice::from_ref(&batch),
        )
        .await
        .unwrap_err();
        assert_eq!(code(&e), "InvalidArgument", "{}: {e}", column.data_type());
        assert!(e.to_string().contains("secret key"), "{e}");
    }
    let in_metadata =
        Schema::new(vec![Field::new("n", DataType::Int32, true)]).with_metadata(HashMap::from([(
            "note".to_string(),
            String::from_utf8_lossy(&key_bytes).into_owned(),
        )]));
    let batch = RecordBatch::try_new(
        Arc::new(in_metadata),
        vec![Arc::new(Int32Array::from(vec![1]))],
    )
    .unwrap();
    let e = upload(
        &mut alice,
        "t",
        IngestMode::CREATE,
        plaintext_ok,
        &batch.schema(),
        std::slice::from_ref(&batch),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("secret key"), "{e}");

    // An IPC batch whose header claims other row counts than its buffers hold: no forged
    // count reaches a table, none takes the connection down.
    let forged_counts = [0i64, 1, 18, 20, 1 << 31, 1 << 62, i64::MAX, -1];
    let honest = FlightDataEncoderBuilder::new()
        .with_schema(schema.clone())
        .build(futures::stream::iter([Ok(enc[0].slice(0, 19))]))
        .try_collect::<Vec<FlightData>>()
        .await
        .unwrap();
    let pattern = 19i64.to_le_bytes();
    let header = &honest[1].data_header;
    let at: Vec<usize> = (0..header.len() - 8)
        .filter(|&i| header[i..i + 8] == pattern)
        .collect();
    assert!(!at.is_empty());
    let (client, token) = raw_client(&server.url, ALICE).await;
    for &offset in &at {
        for forged in forged_counts {
            let mut messages = honest.clone();
            let mut bytes = messages[1].data_header.to_vec();
            bytes[offset..offset + 8].copy_from_slice(&forged.to_le_bytes());
            messages[1].data_header = bytes.into();
            messages[0].flight_descriptor = Some(ingest_descriptor("forged", IngestMode::CREATE));
            let mut client = client.clone();
            let mut request = tonic::Request::new(futures::stream::iter(messages));
            request
                .metadata_mut()
                .insert("authorization", token.parse().unwrap());
            let outcome = async {
                let mut results = client.do_put(request).await?.into_inner();
                results.message().await
            }
            .await;
            match outcome {
                Err(e) => assert_eq!(
                    e.code(),
                    tonic::Code::InvalidArgument,
                    "row count {forged} at {offset}: {e}"
                ),
                // A count the decoder does not rely on may pass; the table then holds the
                // honest rows, never the forged count.
                Ok(_) => assert_eq!(
                    count(&mut alice, "forged").await,
                    19,
                    "row count {forged} at {offset} was accepted"
                ),
            }
            let _ = alice.execute("DROP TABLE IF EXISTS forged").await;
        }
    }
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died"
    );
    assert_eq!(count(&mut alice, "population").await, 152);
    server.kill();
}

/// The stored upload format carries a column's scale only in field metadata: editing
/// `hedf.scale` silently scaled every sum. The key's tag over the parameters now travels with
/// the column to every sum, and the client refuses to decrypt what the key did not vouch for.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_scale_is_caught_by_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), &[]);
    let mut alice = connect(&server, ALICE).await;
    let csv = dir.path().join("population.csv");
    std::fs::write(&csv, common::population::POPULATION_CSV).unwrap();
    let stored = dir.path().join("population.parquet");
    let measures: Vec<MeasureColumn> = YEARS.iter().map(|y| MeasureColumn::new(*y, 1)).collect();
    hedf::table::files::encrypt_to_parquet(key(), &csv, &measures, &stored, &mut |_| {}).unwrap();
    let (schema, batches) = hedf::table::files::read_encrypted(&stored).unwrap();
    let batches: Vec<RecordBatch> = batches.collect::<hedf::Result<_>>().unwrap();

    let forge = |field: &Field| {
        let mut meta = field.metadata().clone();
        if meta.contains_key("hedf.scale") {
            meta.insert("hedf.scale".into(), "3".into());
        }
        field.clone().with_metadata(meta)
    };
    let forged = Arc::new(Schema::new(
        schema.fields().iter().map(|f| forge(f)).collect::<Vec<_>>(),
    ));
    let forged_batches: Vec<RecordBatch> = batches
        .iter()
        .map(|b| RecordBatch::try_new(forged.clone(), b.columns().to_vec()).unwrap())
        .collect();
    upload(
        &mut alice,
        "forged",
        IngestMode::CREATE,
        UploadOptions::default(),
        &forged,
        &forged_batches,
    )
    .await
    .unwrap();
    let (_, sums) = alice
        .query("SELECT \"SEX\", he_sum(\"2018\") AS s FROM forged GROUP BY \"SEX\"")
        .await
        .unwrap();
    let e = decrypt_batch(key(), &sums[0]).unwrap_err();
    assert!(e.to_string().contains("altered"), "{e}");
    let (_, cells) = alice.query("SELECT \"2018\" FROM forged").await.unwrap();
    let e = decrypt_batch(key(), &cells[0]).unwrap_err();
    assert!(e.to_string().contains("altered"), "{e}");

    // The same file unforged decrypts exactly.
    upload(
        &mut alice,
        "honest",
        IngestMode::CREATE,
        UploadOptions::default(),
        &schema,
        &batches,
    )
    .await
    .unwrap();
    let (_, sums) = alice
        .query("SELECT he_sum(\"2018\") AS s FROM honest")
        .await
        .unwrap();
    let total = decrypt_batch(key(), &sums[0]).unwrap();
    let (_, _, plain) = encrypted_population();
    let want = plain
        .sql("SELECT SUM(\"2018\") FROM population")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        total.column(0).as_primitive::<Decimal128Type>().value(0),
        want[0].column(0).as_primitive::<Decimal128Type>().value(0)
    );
}

/// The data folder was world-readable; an empty password was accepted.
#[tokio::test(flavor = "multi_thread")]
async fn the_store_is_private_and_passwords_are_not_empty() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, &[]);
    let mut alice = connect(&server, ALICE).await;
    create_population(&mut alice, "population").await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("tenants")), 0o700);
    assert_eq!(mode(&data.join("tenants/alice")), 0o700);
    for file in files_under(&data) {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_hedf"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--user",
            "eve:",
            "--data-dir",
        ])
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("empty password"), "{stderr}");
    let e = Remote::connect(&server.url, Some(("alice", "")), &ClientTls::default())
        .await
        .err()
        .unwrap();
    assert_eq!(code(&e), "Unauthenticated", "{e}");
}

/// Uploads cut off by stock clients (pyarrow's Flight client: deadline, killed process; the ADBC
/// driver: a source that fails midway), in create, append and replace modes: the table stays as
/// it was. Credentials of every length mod 3 log in through ADBC.
#[test]
fn stock_clients_cut_off_uploads_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::Server::start(
        &dir.path().join("data"),
        &[
            "--user",
            "alice:alice-secret",
            "--user",
            "u1:pw",
            "--user",
            "u22:pw",
            "--user",
            "u333:pw",
        ],
    );
    let csv = dir.path().join("population.csv");
    std::fs::write(&csv, common::population::POPULATION_CSV).unwrap();
    let stored = dir.path().join("population.parquet");
    let measures: Vec<MeasureColumn> = YEARS.iter().map(|y| MeasureColumn::new(*y, 1)).collect();
    hedf::table::files::encrypt_to_parquet(key(), &csv, &measures, &stored, &mut |_| {}).unwrap();
    let descriptors: Vec<String> = [
        ("fresh", IngestMode::CREATE),
        ("population", IngestMode::APPEND),
        ("population", IngestMode::REPLACE),
    ]
    .iter()
    .map(|(table, mode)| {
        let FlightDescriptor { cmd, .. } = ingest_descriptor(table, *mode);
        cmd.iter().map(|b| format!("{b:02x}")).collect()
    })
    .collect();
    let output = std::process::Command::new(common::python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/cut_off_uploads.py"
        ))
        .arg(server.url.trim_start_matches("http://"))
        .arg(&stored)
        .args(&descriptors)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for line in [
        "pyarrow deadline create: unchanged",
        "pyarrow deadline append: unchanged",
        "pyarrow deadline replace: unchanged",
        "pyarrow killed create: unchanged",
        "pyarrow killed append: unchanged",
        "pyarrow killed replace: unchanged",
        "adbc failing source create: unchanged",
        "adbc failing source append: unchanged",
        "adbc failing source replace: unchanged",
        "adbc login u1: ok",
        "adbc login u22: ok",
        "adbc login u333: ok",
    ] {
        assert!(
            stdout.contains(line),
            "missing {line:?} in:\n{stdout}\n{stderr}"
        );
    }
}
