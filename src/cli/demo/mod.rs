//! The original prototype's client script on the embedded dataset, over a [`Connection`] (a
//! local data folder or a server): encrypt, upload, three aggregations decrypted, an invalid
//! aggregation, delete. Every decrypted table is also checked against plaintext DataFusion
//! `SUM` on the same rows. The key never leaves this process.

use std::io::Write;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Decimal128Type;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use crate::cli::connection::Connection;
use crate::crypto::client::{decrypt_batch, encrypt_batches, MeasureColumn};
use crate::crypto::keys::ClientKey;
use crate::error::{HedfError, Result};
use crate::protocol::{IngestMode, UploadOptions};

mod population;

use population::{population, DIMENSIONS, YEARS};

const TABLE: &str = "population";

/// The seed's aggregation "by X", or the prototype's error for an X that is not a dimension.
fn aggregation_sql(table: &str, over: &str, sum: &str) -> Result<String> {
    population::aggregation_sql(table, over, sum).ok_or_else(|| {
        HedfError::Invalid(format!(
            "invalid or missing aggregation parameter: {over}. must be one of {DIMENSIONS:?}"
        ))
    })
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
    write!(
        out,
        "{}",
        crate::cli::display::format_grouped(&decrypted, 2)?
    )?;
    let groups: usize = decrypted.iter().map(|b| b.num_rows()).sum();
    writeln!(out, "[{groups} rows x {} columns]", YEARS.len())?;
    let checked = verify(plain, over, &decrypted).await?;
    writeln!(
        out,
        "verified: all {checked} sums equal plaintext DataFusion SUM"
    )?;
    Ok(())
}

/// Runs the demo against `connection`, writing what the seed's client printed (and a little
/// more) to `out`.
pub async fn run(connection: &mut Connection, out: &mut impl Write) -> Result<()> {
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

    writeln!(out, "get before dataset has been uploaded:")?;
    match connection
        .query(&aggregation_sql(TABLE, "AREA", "he_sum")?)
        .await
    {
        Ok(_) => {
            return Err(HedfError::Invalid(format!(
                "table {TABLE} already exists; drop it before running the demo"
            )))
        }
        Err(e) => writeln!(out, "{}", e.user_message())?,
    }

    writeln!(out, "upload encrypted dataset:")?;
    let measures: Vec<MeasureColumn> = YEARS.iter().map(|y| MeasureColumn::new(*y, 1)).collect();
    let (encrypted_schema, encrypted) = encrypt_batches(&key, &plain_batches, &measures)?;
    let rows = connection
        .upload(
            TABLE,
            IngestMode::CREATE,
            UploadOptions::default(),
            encrypted_schema,
            encrypted.into_iter().map(Ok),
        )
        .await?;
    writeln!(out, "{rows} rows (key id {})", key.id())?;

    for (title, over) in AGGREGATIONS {
        writeln!(out, "aggregate by {title} and decrypt:")?;
        let (_, results) = connection
            .query(&aggregation_sql(TABLE, over, "he_sum")?)
            .await?;
        report(&key, &plain, over, &results, out).await?;
    }

    // The seed validated the parameter before building the query; the server refuses the
    // query such a parameter would make.
    writeln!(out, "aggregate with invalid param:")?;
    let refused = aggregation_sql(TABLE, "INVALID", "he_sum")
        .err()
        .ok_or_else(|| HedfError::Invalid("invalid aggregation unexpectedly accepted".into()))?;
    writeln!(out, "{}", refused.user_message())?;
    let invalid = format!("SELECT \"INVALID\", he_sum(\"2018\") FROM {TABLE} GROUP BY \"INVALID\"");
    match connection.query(&invalid).await {
        Ok(_) => {
            return Err(HedfError::Invalid(
                "invalid aggregation unexpectedly accepted".into(),
            ))
        }
        Err(e) => writeln!(out, "{}", e.user_message())?,
    }

    writeln!(out, "delete encrypted data on server:")?;
    connection.query(&format!("DROP TABLE {TABLE}")).await?;
    writeln!(out, "check encrypted data no longer on server:")?;
    match connection
        .query(&format!("SELECT COUNT(*) FROM {TABLE}"))
        .await
    {
        Ok(_) => {
            return Err(HedfError::Invalid(
                "table still present after delete".into(),
            ))
        }
        Err(e) => writeln!(out, "{}", e.user_message())?,
    }
    Ok(())
}
