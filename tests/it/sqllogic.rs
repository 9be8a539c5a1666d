//! Runs the sqllogictest files in `sql/` against an encrypted session (what the server plans),
//! and those in `sql/client/` through a hedf client (`cli::split`: the server's part on a local
//! data folder, the rest in the client). The adapter decrypts every result batch with the
//! client key, so expected values in the files are plaintext.
//!
//! Tables: `population` (the demo dataset, encrypted) and `population_plain` (the same rows in
//! plaintext), `measures` (a small encrypted table with negatives and NULLs) and `measures_plain`.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use hedf::cli::connection::Connection;
use hedf::cli::split;
use hedf::crypto::client::{decrypt_batch, encrypt_batches, MeasureColumn};
use hedf::crypto::keys::ClientKey;
use hedf::protocol::{IngestMode, UploadOptions};
use hedf::table::EncryptedTable;
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType};

use crate::common;

/// Where a file's SQL runs.
#[derive(Clone)]
enum Target {
    /// The server's session: what it accepts and refuses on ciphertext.
    Engine(SessionContext),
    /// A hedf client over a data folder: plain SQL, split between server and client.
    Client(Connection),
}

struct HedfDb {
    target: Target,
    key: Arc<ClientKey>,
}

#[async_trait]
impl AsyncDB for HedfDb {
    type Error = hedf::HedfError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, hedf::HedfError> {
        let batches = match &self.target {
            Target::Engine(ctx) => ctx.sql(sql).await?.collect().await?,
            Target::Client(connection) => {
                split::query(connection.clone(), self.key.clone(), sql.into())
                    .await?
                    .1
            }
        };
        let plain = batches
            .iter()
            .map(|b| decrypt_batch(&self.key, b))
            .collect::<hedf::Result<Vec<_>>>()?;
        Ok(DBOutput::Rows {
            types: column_types(&plain),
            rows: rows(&plain)?,
        })
    }

    async fn shutdown(&mut self) {}
}

/// sqllogictest's type letters of the decrypted columns: T text, I integer, R decimal or
/// float; the runner checks them against each `query` line.
fn column_types(batches: &[RecordBatch]) -> Vec<DefaultColumnType> {
    let Some(batch) = batches.first() else {
        return Vec::new();
    };
    batch
        .schema()
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => DefaultColumnType::Text,
            t if t.is_integer() => DefaultColumnType::Integer,
            t if t.is_floating() || matches!(t, DataType::Decimal128(..)) => {
                DefaultColumnType::FloatingPoint
            }
            _ => DefaultColumnType::Any,
        })
        .collect()
}

fn rows(batches: &[RecordBatch]) -> hedf::Result<Vec<Vec<String>>> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        for r in 0..batch.num_rows() {
            out.push(formatters.iter().map(|f| f.value(r).to_string()).collect());
        }
    }
    Ok(out)
}

fn measures_plain() -> RecordBatch {
    use arrow::array::{Decimal128Array, Int64Array, StringArray};
    let g = StringArray::from(vec!["a", "a", "a", "b", "b", "c", "d", "d"]);
    let k = Int64Array::from(vec![1, 2, 3, 4, 5, 6, 7, 8]);
    let v = Decimal128Array::from(vec![
        Some(150),
        Some(-275),
        None,
        Some(1),
        Some(-1),
        None,
        Some(99999),
        Some(-100000),
    ])
    .with_precision_and_scale(8, 2)
    .unwrap();
    RecordBatch::try_from_iter(vec![
        ("g", Arc::new(g) as _),
        ("k", Arc::new(k) as _),
        ("v", Arc::new(v) as _),
    ])
    .unwrap()
}

/// The test tables: (name, plaintext schema, rows, measures to encrypt).
fn tables() -> Vec<(
    &'static str,
    SchemaRef,
    Vec<RecordBatch>,
    Vec<MeasureColumn>,
)> {
    let (schema, population) = common::population::population().unwrap();
    let years: Vec<MeasureColumn> = common::population::YEARS
        .iter()
        .map(|y| MeasureColumn::new(*y, 1))
        .collect();
    let measures = measures_plain();
    vec![
        ("population", schema, population, years),
        (
            "measures",
            measures.schema(),
            vec![measures],
            vec![MeasureColumn::new("v", 2)],
        ),
    ]
}

async fn session(dir: &std::path::Path, key: &ClientKey) -> SessionContext {
    let config = SessionConfig::new()
        .with_target_partitions(2)
        .with_batch_size(16);
    let ctx = hedf::engine::session::new_context_with_config(config);
    for (name, schema, plain, columns) in tables() {
        let (encrypted_schema, encrypted) = encrypt_batches(key, &plain, &columns).unwrap();
        let table = EncryptedTable::create(&dir.join(name), encrypted_schema, &encrypted).unwrap();
        ctx.register_table(name, Arc::new(table)).unwrap();
        let plain_table = MemTable::try_new(schema, vec![plain]).unwrap();
        ctx.register_table(format!("{name}_plain"), Arc::new(plain_table))
            .unwrap();
    }
    ctx
}

/// A client over a fresh data folder holding the test tables, uploaded as `hedf upload` would.
async fn client(dir: &std::path::Path, key: &ClientKey) -> Connection {
    let mut connection = Connection::local(dir, None, None).unwrap();
    for (name, schema, plain, columns) in tables() {
        let (encrypted_schema, encrypted) = encrypt_batches(key, &plain, &columns).unwrap();
        let uploads = [
            (name.to_string(), encrypted_schema, encrypted),
            (format!("{name}_plain"), schema, plain),
        ];
        for (name, schema, batches) in uploads {
            let options = UploadOptions {
                allow_plaintext: true,
            };
            let batches = batches.into_iter().map(Ok);
            connection
                .upload(&name, IngestMode::CREATE, options, schema, batches)
                .await
                .unwrap();
        }
    }
    connection
}

fn slt_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {dir}");
    files
}

#[tokio::test]
async fn sql_files_give_the_expected_answers() {
    let (engine_dir, client_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let key = Arc::new(ClientKey::generate());
    let engine = Target::Engine(session(engine_dir.path(), &key).await);
    let client = Target::Client(client(client_dir.path(), &key).await);
    let sql = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
    let files = slt_files(sql)
        .into_iter()
        .map(|f| (f, engine.clone()))
        .chain(
            slt_files(&format!("{sql}/client"))
                .into_iter()
                .map(|f| (f, client.clone())),
        );
    let (mut passed, mut failed) = (0, 0);
    for (file, target) in files {
        let key = key.clone();
        let mut runner = sqllogictest::Runner::new(move || {
            let db = HedfDb {
                target: target.clone(),
                key: key.clone(),
            };
            async move { Ok(db) }
        });
        runner.with_column_validator(sqllogictest::strict_column_validator);
        match runner.run_file_async(&file).await {
            Ok(()) => passed += 1,
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 0, "sqllogictest: {passed} passed, {failed} failed");
}
