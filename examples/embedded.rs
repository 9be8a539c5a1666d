//! The embedded Rust API end to end: key, encryption of Arrow batches, an encrypted Parquet
//! table in a folder, SQL with he_sum in a DataFusion session, decryption of the results.
//!
//! cargo run --release --example embedded [-- TABLE_DIR]

use std::sync::Arc;

use arrow::array::{ArrayRef, Decimal128Array, RecordBatch, StringArray};
use arrow::util::pretty::print_batches;
use hedf::crypto::client::{decrypt_batch, encrypt_batches, MeasureColumn};
use hedf::crypto::keys::ClientKey;
use hedf::table::EncryptedTable;

#[tokio::main]
async fn main() -> hedf::Result<()> {
    // Client: a key (keep it; `ClientKey::save`/`load` write and read it) and plaintext data.
    let key = ClientKey::generate();
    let region = StringArray::from(vec!["north", "north", "south", "south", "south"]);
    let sales =
        Decimal128Array::from(vec![1250, -300, 999, 1, 10000]).with_precision_and_scale(9, 2)?;
    let plain = RecordBatch::try_from_iter(vec![
        ("region", Arc::new(region) as ArrayRef),
        ("sales", Arc::new(sales) as ArrayRef),
    ])?;

    // Client: encrypt the measure; dimension columns stay plaintext.
    let (schema, encrypted) = encrypt_batches(
        &key,
        &[plain],
        &[MeasureColumn::new("sales", 2).with_precision(9)],
    )?;

    // Server: store the encrypted batches as Parquet and query them. No key is involved here.
    let dir = match std::env::args().nth(1) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => tempfile::tempdir()?.keep(),
    };
    let table = EncryptedTable::create(&dir, schema, &encrypted)?;
    let ctx = hedf::engine::session::new_context();
    ctx.register_table("sales", Arc::new(table))?;
    let results = ctx
        .sql("SELECT region, COUNT(*) AS orders, he_sum(sales) AS total FROM sales GROUP BY region ORDER BY region")
        .await?
        .collect()
        .await?;

    // Client: decrypt the result batches into Decimal128 columns.
    let plain = results
        .iter()
        .map(|b| decrypt_batch(&key, b))
        .collect::<hedf::Result<Vec<_>>>()?;
    print_batches(&plain)?;
    println!("encrypted table stored in {}", dir.display());
    Ok(())
}
