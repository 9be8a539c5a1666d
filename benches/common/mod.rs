//! What the benches share: timing a query and sizing its files.

use std::path::Path;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;

pub fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// The median time of `runs` runs of `sql`, and the last run's result.
pub async fn time_query(
    ctx: &SessionContext,
    sql: &str,
    runs: usize,
) -> (Duration, Vec<RecordBatch>) {
    let mut times = Vec::new();
    let mut result = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        result = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        times.push(start.elapsed());
    }
    (median(times), result)
}

/// Bytes of the files in `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}
