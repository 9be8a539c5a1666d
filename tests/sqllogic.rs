//! Runs the sqllogictest files in `sql/` against an encrypted session. The adapter decrypts
//! every result batch with the client key, so expected values in the files are plaintext.
//!
//! Tables: `population` (the demo dataset, encrypted) and `population_plain` (the same rows in
//! plaintext), `measures` (a small encrypted table with negatives and NULLs) and `measures_plain`.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use hedf::crypto::client::{decrypt_batch, encrypt_batches, MeasureColumn};
use hedf::crypto::keys::ClientKey;
use hedf::table::EncryptedTable;
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType};

struct HedfDb {
    ctx: SessionContext,
    key: Arc<ClientKey>,
}

#[async_trait]
impl AsyncDB for HedfDb {
    type Error = hedf::HedfError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, hedf::HedfError> {
        let batches = self.ctx.sql(sql).await?.collect().await?;
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

async fn session(dir: &std::path::Path, key: &ClientKey) -> SessionContext {
    let config = SessionConfig::new()
        .with_target_partitions(2)
        .with_batch_size(16);
    let ctx = hedf::engine::session::new_context_with_config(config);
    let (schema, population) = common::population::population().unwrap();
    let years: Vec<MeasureColumn> = common::population::YEARS
        .iter()
        .map(|y| MeasureColumn::new(*y, 1))
        .collect();
    let measures = measures_plain();
    let tables = [
        ("population", schema, population, years),
        (
            "measures",
            measures.schema(),
            vec![measures],
            vec![MeasureColumn::new("v", 2)],
        ),
    ];
    for (name, schema, plain, columns) in tables {
        let (encrypted_schema, encrypted) = encrypt_batches(key, &plain, &columns).unwrap();
        let table = EncryptedTable::create(&dir.join(name), encrypted_schema, &encrypted).unwrap();
        ctx.register_table(name, Arc::new(table)).unwrap();
        let plain_table = MemTable::try_new(schema, vec![plain]).unwrap();
        ctx.register_table(format!("{name}_plain"), Arc::new(plain_table))
            .unwrap();
    }
    ctx
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(ClientKey::generate());
    let ctx = session(dir.path(), &key).await;
    let mut files: Vec<PathBuf> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in sql/");
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let (ctx, key) = (ctx.clone(), key.clone());
        let mut runner = sqllogictest::Runner::new(move || {
            let db = HedfDb {
                ctx: ctx.clone(),
                key: key.clone(),
            };
            async move { Ok(db) }
        });
        runner.with_column_validator(sqllogictest::strict_column_validator);
        match runner.run_file_async(file).await {
            Ok(()) => passed += 1,
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                failed += 1;
            }
        }
    }
    println!("sqllogictest: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
