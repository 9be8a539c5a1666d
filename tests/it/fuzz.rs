//! Bounded fuzzing of every decoder that takes bytes from someone else: key files, the sums and
//! cells a server returns, column metadata, stored manifests, statements (tickets and
//! prepared-statement handles are SQL text) and Flight uploads. Each target mutates real inputs
//! (the corpus: a fresh key, the seed table's answers, the SQL of `sql/*.slt`) or feeds random
//! bytes, and requires a clear error or a correct answer: never a panic, a hang or a server
//! that stops answering. It found an upload batch whose damaged header type made arrow-flight
//! skip it silently; such messages are now refused.
//!
//! CI runs the same few hundred cases per target every time; `HEDF_FUZZ_SCALE=100 cargo test
//! --release --test it fuzz::` runs a hundred times more, freshly drawn.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, FixedSizeBinaryArray, LargeBinaryArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use arrow::record_batch::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::sql::{CommandStatementIngest, DoPutUpdateResult, ProstMessageExt};
use arrow_flight::{FlightData, FlightDescriptor, HandshakeRequest};
use futures::TryStreamExt;
use hedf::cli::connection::Connection;
use hedf::cli::remote::{table_options, ClientTls, Remote};
use hedf::crypto::answer::share_masks;
use hedf::crypto::cell::{BundleRef, CellRef, ColumnMarking, SumRef};
use hedf::crypto::client::decrypt_batch;
use hedf::crypto::keys::ClientKey;
use hedf::crypto::mask_sum::MaskSumRef;
use hedf::protocol::{IngestMode, UploadOptions};
use hedf::server::catalog::{Catalog, Tenant};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use prost::Message;

use crate::common;
use crate::common::population::aggregation_sql;
use crate::common::tables::{encrypted_population, key};

/// Cases per target: `base` times $HEDF_FUZZ_SCALE. Without it (CI) the cases are the same
/// every run, so a failure there reproduces; longer runs draw fresh ones.
fn runner(base: u32) -> TestRunner {
    let scale: Option<f64> = std::env::var("HEDF_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok());
    let config = Config {
        cases: ((base as f64) * scale.unwrap_or(1.0)).max(1.0) as u32,
        failure_persistence: None,
        ..Config::default()
    };
    match scale {
        Some(_) => TestRunner::new(config),
        None => TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha)),
    }
}

/// Up to five edits: flip a bit, set a byte, cut, insert, or drop a byte.
fn edits() -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6)
}

fn mutate(mut bytes: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(op, at, value) in edits {
        let n = bytes.len();
        match op % 5 {
            0 if n > 0 => bytes[at % n] ^= 1 << (value % 8),
            1 if n > 0 => bytes[at % n] = value,
            2 => bytes.truncate(at % (n + 1)),
            3 => bytes.insert(at % (n + 1), value),
            4 if n > 0 => {
                bytes.remove(at % n);
            }
            _ => {}
        }
    }
    bytes
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Runtime::new().unwrap())
}

/// A local tenant holding the seed table, and its three aggregations and SELECT * answered.
struct Answers {
    dir: tempfile::TempDir,
    tenant: Arc<Tenant>,
    sums: Vec<RecordBatch>,
    cells: RecordBatch,
}

fn answers() -> &'static Answers {
    static ANSWERS: OnceLock<Answers> = OnceLock::new();
    ANSWERS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut connection = Connection::local(dir.path(), Some("alice"), None).unwrap();
        let (schema, enc, _) = encrypted_population();
        runtime().block_on(async {
            let batches = enc.into_iter().map(Ok);
            connection
                .upload(
                    "population",
                    IngestMode::CREATE,
                    UploadOptions::default(),
                    schema,
                    batches,
                )
                .await
                .unwrap();
            let mut sums = Vec::new();
            for over in ["AREA", "AGE GROUP", "SEX"] {
                let sql = aggregation_sql("population", over, "he_sum").unwrap();
                sums.extend(connection.query(&sql).await.unwrap().1);
            }
            // The same answers as a server sends them: a row's shared mask sum sent once.
            let shared: Vec<RecordBatch> = sums.iter().map(|b| share_masks(b).unwrap()).collect();
            sums.extend(shared);
            let (_, cells) = connection
                .query("SELECT * FROM population LIMIT 20")
                .await
                .unwrap();
            let Connection::Local { tenant, .. } = connection else {
                unreachable!()
            };
            Answers {
                dir,
                tenant,
                sums,
                cells: cells[0].clone(),
            }
        })
    })
}

/// The bytes at `row` of a binary column (sums are `LargeBinary`, cells `FixedSizeBinary`).
fn value(column: &ArrayRef, row: usize) -> Vec<u8> {
    match column.data_type() {
        DataType::LargeBinary => column.as_binary::<i64>().value(row).to_vec(),
        DataType::FixedSizeBinary(_) => column.as_fixed_size_binary().value(row).to_vec(),
        _ => column.as_binary::<i32>().value(row).to_vec(),
    }
}

/// `batch` with the value at `row` of binary column `column` replaced by `bytes` (cut or
/// padded to the width of a fixed-size column).
fn with_value(batch: &RecordBatch, column: usize, row: usize, bytes: &[u8]) -> RecordBatch {
    let old = batch.column(column);
    let values: Vec<Option<Vec<u8>>> = (0..old.len())
        .map(|i| match i == row {
            true => Some(bytes.to_vec()),
            false => old.is_valid(i).then(|| value(old, i)),
        })
        .collect();
    let new: ArrayRef = match old.data_type() {
        DataType::LargeBinary => Arc::new(LargeBinaryArray::from_iter(values)),
        DataType::FixedSizeBinary(width) => {
            let width = *width as usize;
            let values = values.into_iter().map(|v| {
                v.map(|mut v| {
                    v.resize(width, 0);
                    v
                })
            });
            Arc::new(
                FixedSizeBinaryArray::try_from_sparse_iter_with_size(values, width as i32).unwrap(),
            )
        }
        _ => Arc::new(BinaryArray::from_iter(values)),
    };
    let mut columns = batch.columns().to_vec();
    columns[column] = new;
    RecordBatch::try_new(batch.schema(), columns).unwrap()
}

fn binary_columns(batch: &RecordBatch) -> Vec<usize> {
    let columns: Vec<usize> = (0..batch.num_columns())
        .filter(|&c| {
            matches!(
                batch.column(c).data_type(),
                DataType::Binary | DataType::LargeBinary | DataType::FixedSizeBinary(_)
            )
        })
        .collect();
    assert!(!columns.is_empty(), "{:?}", batch.schema());
    columns
}

#[test]
fn key_files() {
    let good = key().to_bytes();
    runner(2000)
        .run(&edits(), |edits| {
            let bytes = mutate(good.clone(), &edits);
            // The check value catches every change: a key that loads is the key.
            if let Ok(loaded) = ClientKey::from_bytes(&bytes) {
                prop_assert_eq!(loaded.to_bytes(), good.clone());
            }
            Ok(())
        })
        .unwrap();
    runner(1000)
        .run(&prop::collection::vec(any::<u8>(), 0..1200), |bytes| {
            prop_assert!(ClientKey::from_bytes(&bytes).is_err());
            Ok(())
        })
        .unwrap();
}

#[test]
fn sums_and_cells_from_a_server() {
    let answers = answers();
    let mut inputs: Vec<RecordBatch> = answers.sums.clone();
    inputs.push(answers.cells.clone());
    let strategy = (0..inputs.len(), any::<usize>(), any::<usize>(), edits());
    runner(400)
        .run(&strategy, |(which, column, row, edits)| {
            let batch = &inputs[which];
            let columns = binary_columns(batch);
            let column = columns[column % columns.len()];
            let row = row % batch.num_rows();
            let good = value(batch.column(column), row);
            let forged = with_value(batch, column, row, &mutate(good, &edits));
            // A changed body decrypts to another number (ciphertexts carry no MAC; the server
            // is trusted not to tamper), everything else is an error: never a panic.
            let _ = decrypt_batch(key(), &forged);
            Ok(())
        })
        .unwrap();
    let crypto = ColumnMarking::from_metadata(answers.cells.schema().field(3).metadata())
        .unwrap()
        .unwrap()
        .crypto;
    runner(1000)
        .run(&prop::collection::vec(any::<u8>(), 0..200), |bytes| {
            let _ = SumRef::parse(&bytes);
            let _ = BundleRef::parse(&bytes);
            let _ = MaskSumRef::parse(&bytes);
            let _ = CellRef::parse(&bytes, &crypto);
            Ok(())
        })
        .unwrap();
}

#[test]
fn column_metadata() {
    let answers = answers();
    let batch = &answers.sums[0];
    let want = decrypt_batch(key(), batch).unwrap();
    let strategy = (
        1..batch.num_columns(),
        any::<usize>(),
        edits(),
        any::<bool>(),
    );
    runner(500)
        .run(&strategy, |(column, entry, edits, drop)| {
            let schema = batch.schema();
            let field = schema.field(column);
            let mut meta: HashMap<String, String> = field.metadata().clone();
            let mut names: Vec<String> = meta.keys().cloned().collect();
            names.sort();
            if names.is_empty() {
                return Ok(());
            }
            let name = names[entry % names.len()].clone();
            if drop {
                meta.remove(&name);
            } else {
                let value = mutate(meta[&name].clone().into_bytes(), &edits);
                meta.insert(name, String::from_utf8_lossy(&value).into_owned());
            }
            let mut fields: Vec<Field> =
                schema.fields().iter().map(|f| f.as_ref().clone()).collect();
            fields[column] = field.clone().with_metadata(meta.clone());
            let forged =
                RecordBatch::try_new(Arc::new(Schema::new(fields)), batch.columns().to_vec())
                    .unwrap();
            let _ = ColumnMarking::from_metadata(&meta);
            // Metadata is authenticated by its tag: altered, a column decrypts as before, or
            // not at all (an error, or without its marking it stays opaque bytes): never to
            // another number.
            if let Ok(got) = decrypt_batch(key(), &forged) {
                for (c, column) in got.columns().iter().enumerate() {
                    let opaque = matches!(column.data_type(), DataType::LargeBinary);
                    prop_assert!(opaque || column == want.column(c), "column {}", c);
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn stored_manifests() {
    let answers = answers();
    let manifest = |root: &std::path::Path| root.join("tenants/alice/manifest");
    let good = std::fs::read(manifest(answers.dir.path())).unwrap();
    runner(300)
        .run(&edits(), |edits| {
            let root = tempfile::tempdir().unwrap();
            Catalog::open(root.path(), None)
                .unwrap()
                .tenant("alice")
                .unwrap();
            std::fs::write(manifest(root.path()), mutate(good.clone(), &edits)).unwrap();
            // Loaded or refused; a loaded table whose files are missing reports DATA_LOSS.
            if let Ok(tenant) = Catalog::open(root.path(), None).unwrap().tenant("alice") {
                for (_, version) in tenant.snapshot().iter() {
                    let _ = version.rows();
                }
            }
            Ok(())
        })
        .unwrap();
}

/// Statements of `sql/*.slt`: the SQL a ticket or a prepared-statement handle carries.
fn sql_corpus() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.extend(
        std::fs::read_dir(format!("{dir}/client"))
            .unwrap()
            .flatten()
            .map(|e| e.path()),
    );
    for file in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
    {
        let text = std::fs::read_to_string(file).unwrap();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if line.starts_with("query") || line.starts_with("statement") {
                let sql: Vec<&str> = lines
                    .by_ref()
                    .take_while(|l| !l.trim().is_empty() && *l != "----")
                    .collect();
                out.push(sql.join("\n"));
            }
        }
    }
    assert!(out.len() > 50, "{} statements in sql/", out.len());
    out
}

#[test]
fn statements() {
    let answers = answers();
    let corpus = sql_corpus();
    let strategy = (0..corpus.len(), edits());
    runner(600)
        .run(&strategy, |(which, edits)| {
            let bytes = mutate(corpus[which].clone().into_bytes(), &edits);
            let sql = String::from_utf8_lossy(&bytes);
            runtime().block_on(async {
                let _ = hedf::engine::statement::plan(&answers.tenant, &sql).await;
            });
            Ok(())
        })
        .unwrap();
}

/// Uploads whose Flight messages were altered in transit to a real server: each is refused
/// with a clear status (or stored whole, if the change was harmless), and the server goes on.
#[test]
fn flight_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::Server::start(dir.path(), &["--user", "alice:alice-secret"]);
    let (schema, enc, _) = encrypted_population();
    let runtime = runtime();
    let (client, token) = runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = arrow_flight::flight_service_client::FlightServiceClient::new(channel)
            .max_decoding_message_size(64 << 20);
        let basic = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "alice:alice-secret",
        );
        let mut request = tonic::Request::new(futures::stream::iter([HandshakeRequest::default()]));
        request
            .metadata_mut()
            .insert("authorization", format!("Basic {basic}").parse().unwrap());
        let response = client.handshake(request).await.unwrap();
        let token = response.metadata().get("authorization").unwrap().clone();
        (client, token)
    });
    let messages = |table: &str| -> Vec<FlightData> {
        let command = CommandStatementIngest {
            table_definition_options: Some(table_options(IngestMode::CREATE)),
            table: table.to_string(),
            ..Default::default()
        };
        let descriptor = FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
        runtime
            .block_on(
                FlightDataEncoderBuilder::new()
                    .with_schema(schema.clone())
                    .with_flight_descriptor(Some(descriptor))
                    .build(futures::stream::iter(enc.clone().into_iter().map(Ok)))
                    .try_collect::<Vec<FlightData>>(),
            )
            .unwrap()
    };
    let count = messages("t").len();
    let case = std::sync::atomic::AtomicU32::new(0);
    // What the server said it stored, per table: IPC carries no checksum (TLS protects it in
    // transit), so a changed row count can be stored, but never other than reported.
    let reported = std::sync::Mutex::new(HashMap::new());
    let strategy = (0..count, 0..3u8, edits());
    runner(48)
        .run(&strategy, |(which, part, edits)| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut sent = messages(&format!("t{n}"));
            let data = &mut sent[which];
            let field = match part {
                0 => &mut data.data_header,
                1 => &mut data.data_body,
                _ => &mut data.app_metadata,
            };
            *field = mutate(field.to_vec(), &edits).into();
            let mut request = tonic::Request::new(futures::stream::iter(sent));
            request
                .metadata_mut()
                .insert("authorization", token.clone());
            let outcome = runtime.block_on(async {
                match client.clone().do_put(request).await {
                    Ok(response) => response.into_inner().try_collect::<Vec<_>>().await,
                    Err(status) => Err(status),
                }
            });
            if let Ok(results) = &outcome {
                let rows = DoPutUpdateResult::decode(results[0].app_metadata.clone())
                    .unwrap()
                    .record_count;
                reported.lock().unwrap().insert(format!("t{n}"), rows);
            }
            if let Err(status) = outcome {
                prop_assert!(
                    matches!(
                        status.code(),
                        tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
                    ),
                    "{status:?}"
                );
            }
            Ok(())
        })
        .unwrap();
    // The server still answers, every stored table whole.
    let stored = runtime.block_on(async {
        let mut remote = Remote::connect(
            &server.url,
            Some(("alice", "alice-secret")),
            &ClientTls::default(),
        )
        .await
        .unwrap();
        let mut stored = HashMap::new();
        for (name, _) in remote.tables().await.unwrap() {
            let sql = format!("SELECT COUNT(*) FROM {name}");
            let (_, batches) = remote.query(&sql).await.unwrap();
            let rows = batches[0].column(0).as_primitive::<Int64Type>().value(0);
            stored.insert(name, rows);
        }
        stored
    });
    assert!(!stored.is_empty(), "no upload was accepted");
    for (name, rows) in &stored {
        assert_eq!(
            Some(rows),
            reported.lock().unwrap().get(name),
            "table {name}"
        );
    }
}
