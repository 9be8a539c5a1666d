//! The Flight SQL server as a real process on loopback, driven by arrow-flight's client (through
//! `hedf::cli::remote::Remote` and `FlightSqlServiceClient` directly). Every decrypted answer is
//! compared with plaintext DataFusion on the same rows.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::population::{aggregation_sql, population, YEARS};
use crate::common::tables::{encrypted_population, key, measures, upload};
use crate::common::values::all_values;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Decimal128Type, Field, Schema};
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::CommandGetPrimaryKeys;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use hedf::cli::connection::Connection;
use hedf::cli::remote::{ClientTls, Remote};
use hedf::cli::split;
use hedf::crypto::client::{decrypt_batch, encrypt_batches};
use hedf::crypto::keys::ClientKey;
use hedf::protocol::{IngestMode, UploadOptions};
use hedf::HedfError;
use tonic::transport::Channel;

const ALICE: (&str, &str) = ("alice", "alice-secret");
const BOB: (&str, &str) = ("bob", "bob-secret");

/// A `hedf serve` child process for alice and bob; killed on drop.
struct Server(common::Server);

impl std::ops::Deref for Server {
    type Target = common::Server;
    fn deref(&self) -> &common::Server {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut common::Server {
        &mut self.0
    }
}

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> Server {
        let mut args = vec!["--user", "alice:alice-secret", "--user", "bob:bob-secret"];
        args.extend(extra);
        Server(common::Server::start(dir, &args))
    }

    async fn connect(&self, login: (&str, &str)) -> Remote {
        Remote::connect(&self.url, Some(login), &ClientTls::default())
            .await
            .unwrap()
    }

    /// arrow-flight's own Flight SQL client, logged in as `login`.
    async fn flight_sql(&self, login: (&str, &str)) -> FlightSqlServiceClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = FlightSqlServiceClient::new(channel);
        client.handshake(login.0, login.1).await.unwrap();
        client
    }
}

/// Decimal values of every column after the `keys` leading ones, row by row.
fn values(batches: &[RecordBatch], keys: usize) -> Vec<Vec<Option<i128>>> {
    batches
        .iter()
        .flat_map(|b| {
            (0..b.num_rows()).map(move |r| {
                (keys..b.num_columns())
                    .map(|c| {
                        let col = b.column(c).as_primitive::<Decimal128Type>();
                        col.is_valid(r).then(|| col.value(r))
                    })
                    .collect()
            })
        })
        .collect()
}

/// Decrypted he_sum results of `over` from the server vs plaintext SUM of `factor` copies.
pub(crate) async fn assert_exact(
    remote: &mut Remote,
    plain: &SessionContext,
    over: &str,
    factor: i128,
) {
    let (_, got) = remote
        .query(&aggregation_sql("population", over, "he_sum").unwrap())
        .await
        .unwrap();
    let got: Vec<RecordBatch> = got
        .iter()
        .map(|b| decrypt_batch(key(), b).unwrap())
        .collect();
    let want = plain
        .sql(&aggregation_sql("population", over, "SUM").unwrap())
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let want: Vec<Vec<Option<i128>>> = values(&want, 2)
        .into_iter()
        .map(|r| r.into_iter().map(|v| v.map(|v| v * factor)).collect())
        .collect();
    assert!(!want.is_empty());
    assert_eq!(values(&got, 2), want, "aggregation over {over}");
}

fn code(e: &HedfError) -> String {
    match e {
        HedfError::Remote { kind, .. } => format!("{kind:?}"),
        other => format!("local: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_demo_replays_over_flight_sql() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut out = Vec::new();
    let mut remote =
        hedf::cli::connection::Connection::remote(&server.url, Some(ALICE), &ClientTls::default())
            .await
            .unwrap();
    hedf::cli::demo::run(&mut remote, &mut out).await.unwrap();
    let out = String::from_utf8(out).unwrap();
    common::assert_seed_rows_reproduced(&out);
    assert!(out.contains("152 rows"), "{out}");
    assert_eq!(out.matches("no such table: population").count(), 2, "{out}");
    assert!(out.contains("No field named \"INVALID\""), "{out}");
    assert!(out.contains("\"AGE GROUP\""), "{out}");
    assert_eq!(out.matches("verified: all").count(), 3);
}

/// Plain SQL through a hedf client and a real server: the server's part runs there on
/// ciphertext, the client decrypts and finishes, and every answer equals plaintext DataFusion's
/// on the same rows. EXPLAIN shows what the server was sent: sums and counts by group, no AVG.
#[tokio::test(flavor = "multi_thread")]
async fn plain_sql_is_split_between_server_and_client() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let (schema, plain) = population().unwrap();
    let key = Arc::new(ClientKey::generate());
    let (enc_schema, enc) = encrypt_batches(&key, &plain, &measures()).unwrap();
    let reference = SessionContext::new();
    let table = datafusion::datasource::MemTable::try_new(schema, vec![plain]).unwrap();
    reference
        .register_table("population", Arc::new(table))
        .unwrap();
    let mut connection = Connection::remote(&server.url, Some(ALICE), &ClientTls::default())
        .await
        .unwrap();
    let options = UploadOptions::default();
    let batches = enc.into_iter().map(Ok);
    connection
        .upload(
            "population",
            IngestMode::CREATE,
            options,
            enc_schema,
            batches,
        )
        .await
        .unwrap();

    let average = r#"SELECT "SEX", AVG("2018"), SUM("2019") - SUM("2018"), COUNT(*)
        FROM population GROUP BY "SEX" HAVING SUM("2018") > 1000 ORDER BY "SEX""#;
    for sql in [
        r#"SELECT "AREA", SUM("2018") AS total FROM population GROUP BY "AREA"
           ORDER BY total DESC, "AREA" LIMIT 10"#,
        average,
        r#"SELECT "AGE GROUP", ROUND(SUM("2018") * 100.0 / SUM(SUM("2018")) OVER (), 4)
           FROM population GROUP BY "AGE GROUP" ORDER BY 1"#,
    ] {
        let (_, got) = split::query(connection.clone(), key.clone(), sql.into())
            .await
            .unwrap();
        let want = reference.sql(sql).await.unwrap().collect().await.unwrap();
        assert!(!want.is_empty(), "{sql}");
        assert_eq!(all_values(&got), all_values(&want), "{sql}");
    }

    let (_, explained) = split::query(connection.clone(), key, format!("EXPLAIN {average}"))
        .await
        .unwrap();
    let rows = all_values(&explained);
    let [server_part, client] = rows.as_slice() else {
        panic!("one server part and the client's plan: {rows:?}");
    };
    assert_eq!(server_part[0], "server_part_1 (server)");
    let sent = server_part[1].to_lowercase();
    assert!(
        sent.contains("sum(") && sent.contains("count(") && sent.contains("group by"),
        "{sent}"
    );
    assert!(!sent.contains("avg") && !sent.contains("having"), "{sent}");
    assert_eq!(client[0], "client");
    assert!(client[1].contains("server_part_1"), "{}", client[1]);

    // What that part fetches: one row per group (here 2 sexes), sums and counts, no cell.
    let (schema, fetched) = connection.query(&server_part[1]).await.unwrap();
    assert_eq!(fetched.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    for field in schema.fields().iter().skip(1) {
        let kind = field.metadata().get("hedf.kind").map(String::as_str);
        assert!(
            kind == Some("sum") || (kind.is_none() && field.data_type() == &DataType::Int64),
            "{field:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_downloads_and_prepared_statements_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let (schema, enc, plain) = encrypted_population();
    let mut alice = server.connect(ALICE).await;
    assert_eq!(
        upload(
            &mut alice,
            "population",
            IngestMode::CREATE,
            UploadOptions::default(),
            &schema,
            &enc
        )
        .await
        .unwrap(),
        152
    );
    for over in ["AREA", "AGE GROUP", "SEX"] {
        assert_exact(&mut alice, &plain, over, 1).await;
    }

    // SELECT * streams the stored ciphertexts back; they decrypt to the uploaded values.
    let order = "ORDER BY \"AREA\", \"AGE GROUP\", \"SEX\"";
    let (_, cells) = alice
        .query(&format!("SELECT * FROM population {order}"))
        .await
        .unwrap();
    let got: Vec<RecordBatch> = cells
        .iter()
        .map(|b| decrypt_batch(key(), b).unwrap())
        .collect();
    let want = plain
        .sql(&format!("SELECT * FROM population {order}"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(values(&got, 3), values(&want, 3));

    // The prepared-statement route (what ADBC drivers use).
    let mut client = server.flight_sql(ALICE).await;
    let sql = aggregation_sql("population", "AGE GROUP", "he_sum").unwrap();
    let mut prepared = client.prepare(sql.clone(), None).await.unwrap();
    let sums_schema = prepared.dataset_schema().unwrap().clone();
    assert_eq!(sums_schema.fields().len(), 2 + YEARS.len());
    let info = prepared.execute().await.unwrap();
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let stream = client.do_get(endpoint.ticket.unwrap()).await.unwrap();
        batches.extend(stream.try_collect::<Vec<_>>().await.unwrap());
    }
    prepared.close().await.unwrap();
    let got: Vec<RecordBatch> = batches
        .iter()
        .map(|b| decrypt_batch(key(), b).unwrap())
        .collect();
    let (_, direct) = alice.query(&sql).await.unwrap();
    let direct: Vec<RecordBatch> = direct
        .iter()
        .map(|b| decrypt_batch(key(), b).unwrap())
        .collect();
    assert_eq!(values(&got, 2), values(&direct, 2));
    assert_eq!(values(&got, 2).len(), 8);

    // Listing: the table with its encrypted schema.
    let tables = alice.tables().await.unwrap();
    assert_eq!(tables.len(), 1);
    assert_eq!(tables[0].0, "population");
    assert_eq!(tables[0].1.fields().len(), 8);
    assert_eq!(
        tables[0]
            .1
            .field(3)
            .metadata()
            .get("hedf.kind")
            .map(String::as_str),
        Some("cell")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_map_to_grpc_codes_and_tenants_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-upload-bytes", "200000"]);
    let (schema, enc, plain) = encrypted_population();
    let mut alice = server.connect(ALICE).await;
    let mut bob = server.connect(BOB).await;
    upload(
        &mut alice,
        "population",
        IngestMode::CREATE,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap();

    let e = alice.query("SELECT * FROM nowhere").await.unwrap_err();
    assert_eq!(code(&e), "NotFound", "{e}");
    let e = alice.query("SELEKT 1").await.unwrap_err();
    assert_eq!(code(&e), "InvalidArgument", "{e}");
    let e = alice
        .query("SELECT \"2018\" + 1 FROM population")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidArgument", "{e}");
    let e = alice.query("CREATE TABLE t AS SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "InvalidArgument", "{e}");
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
    assert_eq!(code(&e), "AlreadyExists", "{e}");

    // Authentication.
    let e = Remote::connect(&server.url, Some(("alice", "wrong")), &ClientTls::default())
        .await
        .err()
        .unwrap();
    assert_eq!(code(&e), "Unauthenticated", "{e}");
    let e = Remote::connect(&server.url, Some(("mallory", "x")), &ClientTls::default())
        .await
        .err()
        .unwrap();
    assert_eq!(code(&e), "Unauthenticated", "{e}");
    let mut anonymous = Remote::connect(&server.url, None, &ClientTls::default())
        .await
        .unwrap();
    let e = anonymous.query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "Unauthenticated", "{e}");

    // Bob cannot see, read, append to or drop Alice's table.
    assert!(bob.tables().await.unwrap().is_empty());
    let e = bob
        .query("SELECT COUNT(*) FROM population")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "NotFound", "{e}");
    let e = bob
        .query("SELECT COUNT(*) FROM hedf.alice.population")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "NotFound", "{e}");
    let e = bob.execute("DROP TABLE population").await.unwrap_err();
    assert_eq!(code(&e), "NotFound", "{e}");
    let e = upload(
        &mut bob,
        "population",
        IngestMode::APPEND,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), "NotFound", "{e}");

    // Bad uploads: unmarked ciphertext, a secret key in a column, another key, too large.
    let unmarked = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let stripped: Vec<RecordBatch> = enc
        .iter()
        .map(|b| RecordBatch::try_new(unmarked.clone(), b.columns().to_vec()).unwrap())
        .collect();
    let e = upload(
        &mut alice,
        "t2",
        IngestMode::CREATE,
        UploadOptions::default(),
        &unmarked,
        &stripped,
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), "InvalidArgument", "{e}");
    let key_bytes = key().to_bytes();
    let leaked = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(
            "note",
            DataType::Binary,
            false,
        )])),
        vec![Arc::new(arrow::array::BinaryArray::from(vec![
            key_bytes.as_slice()
        ]))],
    )
    .unwrap();
    // Stored on purpose without encryption, so the key check is what refuses it.
    let e = alice
        .upload(
            "t3",
            IngestMode::CREATE,
            UploadOptions {
                allow_plaintext: true,
            },
            leaked.schema(),
            futures::stream::iter(vec![Ok(leaked.clone())]),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidArgument", "{e}");
    assert!(e.to_string().contains("secret key"), "{e}");
    let other_key = ClientKey::generate();
    let (_, plain_batches) = population().unwrap();
    let (other_schema, other) = encrypt_batches(&other_key, &plain_batches, &measures()).unwrap();
    let e = upload(
        &mut alice,
        "population",
        IngestMode::APPEND,
        UploadOptions::default(),
        &other_schema,
        &other,
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), "InvalidArgument", "{e}");
    let big: Vec<RecordBatch> = (0..40).flat_map(|_| enc.clone()).collect();
    let e = upload(
        &mut alice,
        "population",
        IngestMode::REPLACE,
        UploadOptions::default(),
        &schema,
        &big,
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), "ResourceExhausted", "{e}");

    // Unsupported RPCs say so, so clients can fall back.
    let mut client = server.flight_sql(ALICE).await;
    let e = client
        .get_primary_keys(CommandGetPrimaryKeys {
            table: "population".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    match e {
        FlightError::Tonic(status) => assert_eq!(status.code(), tonic::Code::Unimplemented),
        other => panic!("{other}"),
    }

    // After all that, Alice's table is intact and exact; no leftovers on disk.
    assert_exact(&mut alice, &plain, "SEX", 1).await;
    let tenant = dir.path().join("tenants/alice");
    let files: Vec<String> = std::fs::read_dir(&tenant)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files.iter().filter(|f| f.ends_with(".parquet")).count(),
        1,
        "{files:?}"
    );
    assert!(!files.iter().any(|f| f.starts_with(".tmp")), "{files:?}");
    for file in &files {
        let bytes = std::fs::read(tenant.join(file)).unwrap();
        assert!(
            !hedf::crypto::keys::is_key_material(&bytes),
            "{file} holds key material"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn append_replace_interrupted_upload_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let (schema, enc, plain) = encrypted_population();
    let mut alice = server.connect(ALICE).await;
    upload(
        &mut alice,
        "population",
        IngestMode::CREATE,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap();
    assert_eq!(
        upload(
            &mut alice,
            "population",
            IngestMode::APPEND,
            UploadOptions::default(),
            &schema,
            &enc
        )
        .await
        .unwrap(),
        152
    );
    assert_exact(&mut alice, &plain, "AREA", 2).await;

    // An upload whose source fails midway is aborted; the table keeps its two copies.
    let failing = futures::stream::iter(vec![
        Ok(enc[0].clone()),
        Err(HedfError::Invalid("source broke".into())),
    ]);
    let e = alice
        .upload(
            "population",
            IngestMode::APPEND,
            UploadOptions::default(),
            schema.clone(),
            failing,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("source broke"), "{e}");
    assert_exact(&mut alice, &plain, "AREA", 2).await;

    assert_eq!(
        upload(
            &mut alice,
            "population",
            IngestMode::REPLACE,
            UploadOptions::default(),
            &schema,
            &enc
        )
        .await
        .unwrap(),
        152
    );
    assert_exact(&mut alice, &plain, "AGE GROUP", 1).await;

    // Stored parts (what `hedf encrypt` writes) upload as well as cells.
    let stored = dir.path().join("population.parquet");
    let input = dir.path().join("population.csv");
    std::fs::write(&input, common::population::POPULATION_CSV).unwrap();
    hedf::table::files::encrypt_to_parquet(key(), &input, &measures(), &stored, &mut |_| {})
        .unwrap();
    let (stored_schema, batches) = hedf::table::files::read_encrypted(&stored).unwrap();
    let rows = alice
        .upload(
            "population",
            IngestMode::APPEND,
            UploadOptions::default(),
            stored_schema,
            futures::stream::iter(batches.collect::<Vec<_>>()),
        )
        .await
        .unwrap();
    assert_eq!(rows, 152);
    assert_exact(&mut alice, &plain, "SEX", 2).await;

    server.kill();
    let server = Server::start(dir.path(), &[]);
    let mut alice = server.connect(ALICE).await;
    assert_exact(&mut alice, &plain, "AREA", 2).await;
    alice.execute("DROP TABLE population").await.unwrap();
    assert!(alice.tables().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_large_ingest_leaves_the_old_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let (schema, enc, plain) = encrypted_population();
    let mut alice = server.connect(ALICE).await;
    upload(
        &mut alice,
        "population",
        IngestMode::CREATE,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap();

    // An endless upload replacing the table; the server dies while it streams.
    let endless = futures::stream::iter(std::iter::repeat(enc[0].clone()).map(Ok));
    let url = server.url.clone();
    let uploading = tokio::spawn(async move {
        let mut remote = Remote::connect(&url, Some(ALICE), &ClientTls::default())
            .await
            .unwrap();
        remote
            .upload(
                "population",
                IngestMode::REPLACE,
                UploadOptions::default(),
                schema,
                endless,
            )
            .await
    });
    let tenant = dir.path().join("tenants/alice");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let partial: u64 = std::fs::read_dir(&tenant)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        if partial > 4 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "upload never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill(); // SIGKILL
    assert!(uploading.await.unwrap().is_err());

    let server = Server::start(dir.path(), &[]);
    let mut alice = server.connect(ALICE).await;
    assert_exact(&mut alice, &plain, "AREA", 1).await;
    let leftovers: Vec<_> = std::fs::read_dir(&tenant)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_readers_and_two_writers_at_once_all_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let (schema, enc, plain) = encrypted_population();
    let mut alice = server.connect(ALICE).await;
    upload(
        &mut alice,
        "population",
        IngestMode::CREATE,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap();
    let plain = Arc::new(plain);
    let until = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (url, plain) = (server.url.clone(), plain.clone());
        tasks.push(tokio::spawn(async move {
            let mut remote = Remote::connect(&url, Some(ALICE), &ClientTls::default())
                .await
                .unwrap();
            let mut n = 0;
            while Instant::now() < until {
                assert_exact(&mut remote, &plain, ["AREA", "AGE GROUP", "SEX"][i % 3], 1).await;
                n += 1;
            }
            n
        }));
    }
    for _ in 0..2 {
        let (url, schema, enc) = (server.url.clone(), schema.clone(), enc.clone());
        tasks.push(tokio::spawn(async move {
            let mut remote = Remote::connect(&url, Some(ALICE), &ClientTls::default())
                .await
                .unwrap();
            let mut n = 0;
            while Instant::now() < until {
                // Replacing with the same rows: readers must always see one whole copy.
                let rows = upload(
                    &mut remote,
                    "population",
                    IngestMode::REPLACE,
                    UploadOptions::default(),
                    &schema,
                    &enc,
                )
                .await
                .unwrap();
                assert_eq!(rows, 152);
                n += 1;
            }
            n
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap() > 0);
    }
    let names: Vec<String> = std::fs::read_dir(dir.path().join("tenants/alice"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    assert_eq!(
        names.len(),
        1,
        "retired segments were not deleted: {names:?}"
    );
}

/// Queries draw on one memory pool of `--memory-limit`: 6,000 groups of one row each sum
/// within 64 MiB (their mask sums list rows instead of holding 32 KiB each), a query that
/// does not fit fails with RESOURCE_EXHAUSTED, and the server goes on answering, exactly.
#[tokio::test(flavor = "multi_thread")]
async fn a_query_over_the_memory_limit_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--memory-limit", "64MiB"]);
    let mut alice = server.connect(ALICE).await;

    // 6,000 groups of one row: 6,000 x 32 KiB of mask sums would be three times the limit.
    let rows = 6_000;
    let cents: Vec<i128> = (0..rows as i128)
        .map(|i| (i * 7919) % 20_001 - 10_000)
        .collect();
    let plain = RecordBatch::try_from_iter(vec![
        (
            "g",
            Arc::new(arrow::array::Int64Array::from_iter_values(0..rows as i64)) as _,
        ),
        (
            "v",
            Arc::new(
                arrow::array::Decimal128Array::from(cents.clone())
                    .with_precision_and_scale(7, 2)
                    .unwrap(),
            ) as _,
        ),
    ])
    .unwrap();
    let measures = [hedf::MeasureColumn::new("v", 2)];
    let (schema, enc) = encrypt_batches(key(), &[plain], &measures).unwrap();
    upload(
        &mut alice,
        "wide",
        IngestMode::CREATE,
        UploadOptions::default(),
        &schema,
        &enc,
    )
    .await
    .unwrap();

    let (_, batches) = alice
        .query("SELECT g, SUM(v) FROM wide GROUP BY g ORDER BY g")
        .await
        .unwrap();
    let groups: Vec<Vec<Option<i128>>> = batches
        .iter()
        .flat_map(|b| values(&[decrypt_batch(key(), b).unwrap()], 1))
        .collect();
    let want: Vec<Vec<Option<i128>>> = cents.iter().map(|&c| vec![Some(c)]).collect();
    assert_eq!(groups, want);

    // 36 million values gathered in one array: far over the limit, and nothing spills them.
    let e = alice
        .query("SELECT array_agg(a.g) FROM wide a CROSS JOIN wide b")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), hedf::ErrorKind::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("64.0 MB"), "{e}");

    let (_, batches) = alice.query("SELECT SUM(v) FROM wide").await.unwrap();
    let total = decrypt_batch(key(), &batches[0]).unwrap();
    assert_eq!(
        values(&[total], 0),
        vec![vec![Some(cents.iter().sum::<i128>())]]
    );
}

/// A query runs at most `--query-timeout` (DEADLINE_EXCEEDED, its work dropped), and a tenant
/// runs at most `--max-queries-per-user` at once: more wait in a short queue, a full queue is
/// refused at once (RESOURCE_EXHAUSTED), and other tenants are not held up.
#[tokio::test(flavor = "multi_thread")]
async fn queries_are_limited_in_time_and_number() {
    const ENDLESS: &str = "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r) \
                           SELECT count(*) FROM r";
    let one = |batches: &[RecordBatch]| {
        batches[0]
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0)
    };

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--query-timeout", "2"]);
    let mut alice = server.connect(ALICE).await;
    let started = Instant::now();
    let e = alice.query(ENDLESS).await.unwrap_err();
    assert_eq!(e.kind(), hedf::ErrorKind::DeadlineExceeded, "{e}");
    assert!(e.to_string().contains("time limit of 2 s"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(one(&alice.query("SELECT 1").await.unwrap().1), 1);

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-queries-per-user", "1"]);
    let mut alice = server.connect(ALICE).await;
    let mut bob = server.connect(BOB).await;
    // An endless query whose answer nobody reads holds alice's one slot.
    let mut client = server.flight_sql(ALICE).await;
    let info = client.execute(ENDLESS.into(), None).await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let held = client.do_get(ticket).await.unwrap();

    assert_eq!(one(&bob.query("SELECT 1").await.unwrap().1), 1);
    let mut queued = Vec::new();
    for _ in 0..4 {
        let mut remote = server.connect(ALICE).await;
        queued.push(tokio::spawn(async move { remote.query("SELECT 2").await }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = alice.query("SELECT 3").await.unwrap_err();
    assert_eq!(e.kind(), hedf::ErrorKind::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("queue is full"), "{e}");
    assert!(queued.iter().all(|q| !q.is_finished()));

    // Cancelling the endless query frees the slot: the queued queries run.
    drop(held);
    for q in queued {
        assert_eq!(one(&q.await.unwrap().unwrap().1), 2);
    }
}

/// `kill -HUP` reloads the users file: a removed user is refused at once, tokens included; a
/// new user can log in; a file that does not load keeps the users as they were.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_users_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users");
    let line = |(name, password): (&str, &str)| {
        format!(
            "{name}:{}\n",
            hedf::server::flight::auth::hash_password(password).unwrap()
        )
    };
    // Bob's line stays as it is: a new hash (even of the same password) would end his tokens.
    let bob_line = line(BOB);
    std::fs::write(&file, line(ALICE) + &bob_line).unwrap();
    let data = dir.path().join("data");
    let server = common::Server::start(&data, &["--users-file", file.to_str().unwrap()]);
    let mut alice = Remote::connect(&server.url, Some(ALICE), &ClientTls::default())
        .await
        .unwrap();
    let mut bob = Remote::connect(&server.url, Some(BOB), &ClientTls::default())
        .await
        .unwrap();
    assert!(alice.query("SELECT 1").await.is_ok());
    let carol = ("carol", "carol-secret");
    assert!(
        Remote::connect(&server.url, Some(carol), &ClientTls::default())
            .await
            .is_err()
    );

    let hangup = |server: &common::Server| {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    // Within a second of the signal, alice's token is refused and carol can log in.
    let carol_line = line(carol);
    std::fs::write(&file, bob_line.clone() + &carol_line).unwrap();
    hangup(&server);
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        match alice.query("SELECT 1").await {
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(_) => panic!("alice's token still works after the reload"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.kind(), hedf::ErrorKind::Unauthenticated, "{e}");
    let e = Remote::connect(&server.url, Some(ALICE), &ClientTls::default())
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), hedf::ErrorKind::Unauthenticated, "{e}");
    assert!(bob.query("SELECT 1").await.is_ok());
    let mut carol_remote = Remote::connect(&server.url, Some(carol), &ClientTls::default())
        .await
        .unwrap();

    // Bob's new password ends his tokens.
    std::fs::write(&file, line((BOB.0, "bob-new")) + &carol_line).unwrap();
    hangup(&server);
    let deadline = Instant::now() + Duration::from_secs(10);
    while bob.query("SELECT 1").await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "bob's token outlived his password"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut bob = Remote::connect(&server.url, Some((BOB.0, "bob-new")), &ClientTls::default())
        .await
        .unwrap();

    // A broken file is not loaded: everyone who could log in still can.
    std::fs::write(&file, "carol has no hash\n").unwrap();
    hangup(&server);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(carol_remote.query("SELECT 1").await.is_ok());
    assert!(bob.query("SELECT 1").await.is_ok());
    assert!(
        Remote::connect(&server.url, Some(carol), &ClientTls::default())
            .await
            .is_ok()
    );
}
