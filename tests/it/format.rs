//! The stored format, pinned. `tests/fixtures/format2` holds a key, the table it encrypted
//! (`hedf keygen`, then `hedf encrypt plain.csv --measures x,y`) and the plaintext: every later
//! hedf must decrypt that table and sum it exactly, or a dependency bump (tfhe's mask stream,
//! its key generator) has made stored tables unreadable. `tests/fixtures/format1` is a table of
//! the previous format, which must be refused with its version named.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::CsvReadOptions;
use hedf::crypto::client::decrypt_batch;
use hedf::crypto::keys::ClientKey;
use hedf::table::EncryptedTable;

use crate::common::values::all_values;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Runs `sql` on the fixture table (decrypted) and on its plaintext CSV; both must agree.
async fn same_as_plaintext(sql: &str) -> usize {
    let dir = fixtures().join("format2");
    let key = ClientKey::load(&dir.join("client.key")).unwrap();
    let ctx = hedf::engine::session::new_context();
    let table = EncryptedTable::open(&dir.join("table")).unwrap();
    ctx.register_table("t", Arc::new(table)).unwrap();
    let schema = Schema::new(vec![
        Field::new("g", DataType::Utf8, false),
        Field::new("x", DataType::Decimal128(18, 1), true),
        Field::new("y", DataType::Decimal128(18, 0), true),
    ]);
    ctx.register_csv(
        "plain",
        dir.join("plain.csv").to_str().unwrap(),
        CsvReadOptions::new().schema(&schema),
    )
    .await
    .unwrap();
    let encrypted = ctx.sql(&sql.replace("SUM", "he_sum")).await.unwrap();
    let got: Vec<_> = encrypted
        .collect()
        .await
        .unwrap()
        .iter()
        .map(|b| decrypt_batch(&key, b).unwrap())
        .collect();
    let want = ctx
        .sql(&sql.replace(" t ", " plain "))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let (mut got, mut want) = (all_values(&got), all_values(&want));
    // Rows of a query without ORDER BY compare as sets.
    if !sql.contains("ORDER BY") {
        got.sort();
        want.sort();
    }
    assert_eq!(got, want, "{sql}");
    got.len()
}

#[tokio::test]
async fn the_format_2_fixture_decrypts_and_sums_exactly() {
    let groups = same_as_plaintext(
        "SELECT g, SUM(x), SUM(y), COUNT(x), COUNT(*) FROM t GROUP BY g ORDER BY g",
    )
    .await;
    assert_eq!(groups, 4, "groups a, b, c and the all-NULL-x group d");
    let rows = same_as_plaintext("SELECT g, x, y FROM t ").await;
    assert_eq!(rows, 40);
}

#[test]
fn a_table_of_the_previous_format_is_refused_naming_the_version() {
    let e = EncryptedTable::open(&fixtures().join("format1"))
        .expect_err("format 1 refused")
        .to_string();
    assert!(e.contains("layout 2"), "{e}");
    assert!(e.contains("re-encrypt"), "{e}");
}
