//! The original prototype's client script, replayed in one process on the embedded dataset:
//! encrypt, register, three aggregations decrypted, an invalid aggregation, delete. Every
//! decrypted table is also checked against plaintext DataFusion `SUM` on the same rows.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Decimal128Type, Field, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use crate::catalog::{IngestMode, UploadOptions};
use crate::client::{decrypt_batch, encrypt_batches, MeasureColumn};
use crate::error::{HedfError, Result};
use crate::keys::ClientKey;
use crate::remote::Remote;
use crate::session::new_context;
use crate::table::EncryptedTable;

/// The embedded demo dataset: 152 rows, 4 areas x 19 age groups x 2 sexes, years 2018-2022.
pub const POPULATION_CSV: &str = include_str!("../data/population.csv");
pub const DIMENSIONS: [&str; 3] = ["AREA", "AGE GROUP", "SEX"];
pub const YEARS: [&str; 5] = ["2018", "2019", "2020", "2021", "2022"];
const TABLE: &str = "population";

/// The population table as Arrow: dimensions as strings, years as exact DECIMAL(10, 1).
pub fn population() -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let fields: Vec<Field> = DIMENSIONS
        .iter()
        .map(|d| Field::new(*d, DataType::Utf8, false))
        .chain(
            YEARS
                .iter()
                .map(|y| Field::new(*y, DataType::Decimal128(10, 1), true)),
        )
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let reader = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_header(true)
        .build(std::io::Cursor::new(POPULATION_CSV))?;
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// The seed's aggregation "by X": sum every year over X, i.e. GROUP BY the other dimensions.
pub fn aggregation_sql(table: &str, over: &str, sum: &str) -> Result<String> {
    if !DIMENSIONS.contains(&over) {
        return Err(HedfError::Invalid(format!(
            "invalid or missing aggregation parameter: {over}. must be one of {:?}",
            DIMENSIONS
        )));
    }
    let keys: Vec<String> = DIMENSIONS
        .iter()
        .filter(|d| **d != over)
        .map(|d| format!("\"{d}\""))
        .collect();
    let sums: Vec<String> = YEARS
        .iter()
        .map(|y| format!("{sum}(\"{y}\") AS \"{y}\""))
        .collect();
    let keys = keys.join(", ");
    Ok(format!(
        "SELECT {keys}, {} FROM {table} GROUP BY {keys} ORDER BY {keys}",
        sums.join(", ")
    ))
}

/// Checks decrypted sums against plaintext DataFusion SUM on the same rows; returns the count
/// of values compared.
async fn verify(plain: &SessionContext, over: &str, decrypted: &[RecordBatch]) -> Result<usize> {
    let expected = plain
        .sql(&aggregation_sql("population_plain", over, "SUM")?)
        .await?
        .collect()
        .await?;
    let values = |batches: &[RecordBatch]| -> Vec<Option<i128>> {
        batches
            .iter()
            .flat_map(|b| {
                // Row by row, so results split into batches differently still compare.
                (0..b.num_rows()).flat_map(move |r| {
                    (2..b.num_columns()).map(move |c| {
                        let col = b.column(c).as_primitive::<Decimal128Type>();
                        col.is_valid(r).then(|| col.value(r))
                    })
                })
            })
            .collect()
    };
    let (got, want) = (values(decrypted), values(&expected));
    if got != want || got.is_empty() {
        return Err(HedfError::Invalid(format!(
            "decrypted sums differ from plaintext SUM for aggregation over {over}"
        )));
    }
    Ok(got.len())
}

/// The seed's three aggregations: its title for each, and the dimension summed over.
const AGGREGATIONS: [(&str, &str); 3] = [("area", "AREA"), ("age", "AGE GROUP"), ("sex", "SEX")];

/// Decrypts one aggregation's result, prints it the seed's way and checks it against plaintext.
async fn report(
    key: &ClientKey,
    plain: &SessionContext,
    over: &str,
    results: &[RecordBatch],
    out: &mut impl Write,
) -> Result<()> {
    let decrypted = results
        .iter()
        .map(|b| decrypt_batch(key, b))
        .collect::<Result<Vec<_>>>()?;
    write!(out, "{}", crate::display::format_grouped(&decrypted, 2)?)?;
    let groups: usize = decrypted.iter().map(|b| b.num_rows()).sum();
    writeln!(out, "[{groups} rows x {} columns]", YEARS.len())?;
    let checked = verify(plain, over, &decrypted).await?;
    writeln!(
        out,
        "verified: all {checked} sums equal plaintext DataFusion SUM"
    )?;
    Ok(())
}

/// Runs the demo, writing what the seed's client printed (and a little more) to `out`.
pub async fn run(data_dir: &Path, out: &mut impl Write) -> Result<()> {
    let key = ClientKey::generate();
    let (schema, plain_batches) = population()?;
    let ctx = new_context();
    let plain = SessionContext::new();
    plain.register_table(
        "population_plain",
        Arc::new(MemTable::try_new(
            schema.clone(),
            vec![plain_batches.clone()],
        )?),
    )?;

    writeln!(out, "get before dataset has been uploaded:")?;
    match ctx.sql(&aggregation_sql(TABLE, "AREA", "he_sum")?).await {
        Ok(_) => {
            return Err(HedfError::Invalid(
                "query before upload unexpectedly succeeded".into(),
            ))
        }
        Err(e) => writeln!(out, "{}", e.strip_backtrace())?,
    }

    writeln!(out, "upload encrypted dataset:")?;
    let measures: Vec<MeasureColumn> = YEARS.iter().map(|y| MeasureColumn::new(*y, 1)).collect();
    let (encrypted_schema, encrypted) = encrypt_batches(&key, &plain_batches, &measures)?;
    let table_dir = data_dir.join(TABLE);
    let table = EncryptedTable::create(&table_dir, encrypted_schema, &encrypted)?;
    let rows: usize = encrypted.iter().map(|b| b.num_rows()).sum();
    let bytes: u64 = std::fs::read_dir(&table_dir)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    writeln!(
        out,
        "{rows} rows (key id {}, {bytes} bytes of Parquet in {})",
        key.id(),
        table_dir.display()
    )?;
    ctx.register_table(TABLE, Arc::new(table))?;

    for (title, over) in AGGREGATIONS {
        writeln!(out, "aggregate by {title} and decrypt:")?;
        let results = ctx
            .sql(&aggregation_sql(TABLE, over, "he_sum")?)
            .await?
            .collect()
            .await?;
        report(&key, &plain, over, &results, out).await?;
    }

    writeln!(out, "aggregate with invalid param:")?;
    match aggregation_sql(TABLE, "INVALID", "he_sum") {
        Ok(_) => {
            return Err(HedfError::Invalid(
                "invalid aggregation unexpectedly accepted".into(),
            ))
        }
        Err(e) => writeln!(out, "{e}")?,
    }

    writeln!(out, "delete encrypted data on server:")?;
    ctx.deregister_table(TABLE)?;
    std::fs::remove_dir_all(&table_dir)?;
    writeln!(out, "check encrypted data no longer on server:")?;
    match ctx.sql(&format!("SELECT COUNT(*) FROM {TABLE}")).await {
        Ok(_) => {
            return Err(HedfError::Invalid(
                "table still present after delete".into(),
            ))
        }
        Err(e) => writeln!(out, "{}", e.strip_backtrace())?,
    }
    Ok(())
}

/// The seed's client script against a running hedf server: the same steps and output as
/// [`run`], over Flight SQL. The key never leaves this process; the server sees ciphertext.
pub async fn run_remote(
    url: &str,
    login: Option<(&str, &str)>,
    out: &mut impl Write,
) -> Result<()> {
    let key = ClientKey::generate();
    let (schema, plain_batches) = population()?;
    let plain = SessionContext::new();
    plain.register_table(
        "population_plain",
        Arc::new(MemTable::try_new(
            schema.clone(),
            vec![plain_batches.clone()],
        )?),
    )?;
    let mut server = Remote::connect(url, login).await?;

    writeln!(out, "get before dataset has been uploaded:")?;
    match server
        .query(&aggregation_sql(TABLE, "AREA", "he_sum")?)
        .await
    {
        Ok(_) => {
            return Err(HedfError::Invalid(format!(
                "table {TABLE} already exists on the server; drop it before running the demo"
            )))
        }
        Err(e) => writeln!(out, "{e}")?,
    }

    writeln!(out, "upload encrypted dataset:")?;
    let measures: Vec<MeasureColumn> = YEARS.iter().map(|y| MeasureColumn::new(*y, 1)).collect();
    let (encrypted_schema, encrypted) = encrypt_batches(&key, &plain_batches, &measures)?;
    let rows = server
        .upload(
            TABLE,
            IngestMode::CREATE,
            UploadOptions::default(),
            encrypted_schema,
            futures::stream::iter(encrypted.into_iter().map(Ok)),
        )
        .await?;
    writeln!(out, "{rows} rows (key id {})", key.id())?;

    for (title, over) in AGGREGATIONS {
        writeln!(out, "aggregate by {title} and decrypt:")?;
        let (_, results) = server
            .query(&aggregation_sql(TABLE, over, "he_sum")?)
            .await?;
        report(&key, &plain, over, &results, out).await?;
    }

    writeln!(out, "aggregate with invalid param:")?;
    let invalid = format!("SELECT \"INVALID\", he_sum(\"2018\") FROM {TABLE} GROUP BY \"INVALID\"");
    match server.query(&invalid).await {
        Ok(_) => {
            return Err(HedfError::Invalid(
                "invalid aggregation unexpectedly accepted".into(),
            ))
        }
        Err(e) => writeln!(out, "{e}")?,
    }

    writeln!(out, "delete encrypted data on server:")?;
    server.execute(&format!("DROP TABLE {TABLE}")).await?;
    writeln!(out, "check encrypted data no longer on server:")?;
    match server.query(&format!("SELECT COUNT(*) FROM {TABLE}")).await {
        Ok(_) => {
            return Err(HedfError::Invalid(
                "table still present after delete".into(),
            ))
        }
        Err(e) => writeln!(out, "{e}")?,
    }
    Ok(())
}
