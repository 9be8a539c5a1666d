//! Results as text, for comparing an encrypted query's decrypted answer with plaintext
//! DataFusion's (tests and benches alike).
// Each test binary uses a subset of these.
#![allow(dead_code)]

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// Every value of every column as text, row by row: group keys, counts and sums alike.
pub fn all_values(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let options = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    for b in batches {
        let formatters: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for r in 0..b.num_rows() {
            rows.push(formatters.iter().map(|f| f.value(r).to_string()).collect());
        }
    }
    rows
}
