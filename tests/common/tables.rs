//! The seed's table encrypted under one test key, and an upload of batches through the client.
// Each test binary uses a subset of these.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use hedf::cli::remote::Remote;
use hedf::crypto::client::{encrypt_batches, MeasureColumn};
use hedf::crypto::keys::ClientKey;
use hedf::protocol::{IngestMode, UploadOptions};

use super::population::{population, YEARS};

/// One key per test binary: key generation is the slow part of encrypting 152 rows.
pub fn key() -> &'static ClientKey {
    static KEY: OnceLock<ClientKey> = OnceLock::new();
    KEY.get_or_init(ClientKey::generate)
}

/// Every year of the population table as a measure with one decimal.
pub fn measures() -> Vec<MeasureColumn> {
    YEARS.iter().map(|y| MeasureColumn::new(*y, 1)).collect()
}

/// The population table encrypted under [`key`], and a plaintext session holding the same rows
/// as `population`.
pub fn encrypted_population() -> (SchemaRef, Vec<RecordBatch>, SessionContext) {
    let (schema, plain) = population().unwrap();
    let (enc_schema, enc) = encrypt_batches(key(), &plain, &measures()).unwrap();
    let ctx = SessionContext::new();
    ctx.register_table(
        "population",
        Arc::new(MemTable::try_new(schema, vec![plain]).unwrap()),
    )
    .unwrap();
    (enc_schema, enc, ctx)
}

/// Uploads `batches` as `table` through the Flight SQL client.
pub async fn upload(
    remote: &mut Remote,
    table: &str,
    mode: IngestMode,
    options: UploadOptions,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> hedf::Result<i64> {
    let batches: Vec<hedf::Result<RecordBatch>> = batches.iter().cloned().map(Ok).collect();
    remote
        .upload(
            table,
            mode,
            options,
            schema.clone(),
            futures::stream::iter(batches),
        )
        .await
}
