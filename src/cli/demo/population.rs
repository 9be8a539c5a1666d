//! The seed's population table and its aggregation "by X". One file for the demo and the tests
//! (`tests/common/population.rs` includes it by path), so it depends on arrow only.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;

/// 152 rows: 4 areas x 19 age groups x 2 sexes, years 2018-2022.
pub const POPULATION_CSV: &str = include_str!("../../../data/population.csv");
pub const DIMENSIONS: [&str; 3] = ["AREA", "AGE GROUP", "SEX"];
pub const YEARS: [&str; 5] = ["2018", "2019", "2020", "2021", "2022"];

/// The population table as Arrow: dimensions as strings, years as exact DECIMAL(10, 1).
pub fn population() -> Result<(SchemaRef, Vec<RecordBatch>), ArrowError> {
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
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// The seed's aggregation "by X" as SQL: `sum` (he_sum or SUM) of every year over X, i.e.
/// GROUP BY the other dimensions. None when X is not a dimension.
pub fn aggregation_sql(table: &str, over: &str, sum: &str) -> Option<String> {
    if !DIMENSIONS.contains(&over) {
        return None;
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
    Some(format!(
        "SELECT {keys}, {} FROM {table} GROUP BY {keys} ORDER BY {keys}",
        sums.join(", ")
    ))
}
