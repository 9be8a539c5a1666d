//! Side-by-side benchmark: he_sum on encrypted Parquet vs SUM on plaintext Parquet, same rows,
//! same queries, same session settings. Prints a table; numbers are medians of several runs.
//!
//! cargo bench --bench engine                                  (10^6 rows, 2 partitions)
//! HEDF_BENCH_ROWS=100000,1000000,10000000 cargo bench --bench engine  (sizes in one run)
//! HEDF_BENCH_PARTITIONS=1,2 cargo bench --bench engine          (target_partitions 1 vs 2)

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Decimal128Array, RecordBatch, StringArray};
use arrow::datatypes::DataType;
use datafusion::prelude::{ParquetReadOptions, SessionConfig};
use hedf::crypto::answer::share_masks;
use hedf::crypto::client::{decrypt_batch, Encryptor, MeasureColumn};
use hedf::crypto::keys::ClientKey;
use hedf::table::EncryptedTable;
use parquet::arrow::ArrowWriter;

mod common;
#[path = "../tests/common/values.rs"]
mod values;
use common::{dir_size, time_query};
use values::all_values;

const MEASURES: [&str; 5] = ["m1", "m2", "m3", "m4", "m5"];
const BATCH: usize = 65_536;

fn env(name: &str, default: usize) -> usize {
    env_list(name, default)[0]
}

/// A comma-separated list of numbers, e.g. `HEDF_BENCH_ROWS=100000,1000000`.
fn env_list(name: &str, default: usize) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.split(',').map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![default])
}

/// Rows sorted by (area, age): 76 clustered groups; `rnd2`, `rnd`, `rnd10k` and `rnd100k` are
/// unclustered 2-, 76-, 10^4- and 10^5-way keys and `sel` a 100-way filter key. Generated one batch at a time, deterministically.
fn batches(rows: usize) -> impl Iterator<Item = RecordBatch> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..rows).step_by(BATCH).map(move |start| {
        let len = BATCH.min(rows - start);
        let group = |i: usize| (start + i) * 76 / rows;
        let area: StringArray = (0..len)
            .map(|i| Some(format!("area{}", group(i) / 19)))
            .collect();
        let age: StringArray = (0..len)
            .map(|i| Some(format!("age{:02}", group(i) % 19)))
            .collect();
        let rnd: StringArray = (0..len)
            .map(|_| Some(format!("r{:02}", next() % 76)))
            .collect();
        let sel: StringArray = (0..len)
            .map(|_| Some(format!("s{:02}", next() % 100)))
            .collect();
        let rnd2: StringArray = (0..len).map(|_| Some(format!("h{}", next() % 2))).collect();
        let rnd10k: StringArray = (0..len)
            .map(|_| Some(format!("k{:04}", next() % 10_000)))
            .collect();
        let rnd100k: StringArray = (0..len)
            .map(|_| Some(format!("k{:05}", next() % 100_000)))
            .collect();
        let mut columns: Vec<(&str, ArrayRef)> = vec![
            ("area", Arc::new(area)),
            ("age", Arc::new(age)),
            ("rnd", Arc::new(rnd)),
            ("sel", Arc::new(sel)),
            ("rnd2", Arc::new(rnd2)),
            ("rnd10k", Arc::new(rnd10k)),
            ("rnd100k", Arc::new(rnd100k)),
        ];
        for m in MEASURES {
            let values =
                Decimal128Array::from_iter_values((0..len).map(|_| (next() % 200_000) as i128))
                    .with_precision_and_scale(10, 1)
                    .unwrap();
            columns.push((m, Arc::new(values)));
        }
        RecordBatch::try_from_iter(columns).unwrap()
    })
}

/// Writes `batches` to one plaintext Parquet file in `dir` (parquet-rs defaults).
fn write_plain(dir: &Path, batches: impl Iterator<Item = RecordBatch>) {
    std::fs::create_dir_all(dir).unwrap();
    let mut batches = batches.peekable();
    let schema = batches.peek().unwrap().schema();
    let mut writer = ArrowWriter::try_new(
        std::fs::File::create(dir.join("part-0.parquet")).unwrap(),
        schema,
        None,
    )
    .unwrap();
    batches.for_each(|b| writer.write(&b).unwrap());
    writer.close().unwrap();
}

/// Peak resident set size since the last reset, in MiB (Linux; 0 elsewhere).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kib.unwrap_or(0.0) / 1024.0
}

/// Resets the peak RSS counter so the next reading covers only what follows.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[tokio::main]
async fn main() {
    let runs = env("HEDF_BENCH_RUNS", 5);
    for rows in env_list("HEDF_BENCH_ROWS", 1_000_000) {
        bench(rows, &env_list("HEDF_BENCH_PARTITIONS", 2), runs).await;
    }
}

/// One table size: encryption, storage, then every query at each partition count.
async fn bench(rows: usize, partition_counts: &[usize], runs: usize) {
    let dir = tempfile::tempdir().unwrap();
    println!(
        "\nhedf benchmark: {rows} rows x {} measures, target_partitions {partition_counts:?}, {} cores, median of {runs}",
        MEASURES.len(),
        std::thread::available_parallelism().unwrap()
    );

    let key = ClientKey::generate();
    let measures: Vec<MeasureColumn> = MEASURES
        .iter()
        .map(|m| MeasureColumn::new(*m, 1).with_precision(6))
        .collect();
    let schema = batches(BATCH).next().unwrap().schema();
    let mut encryptor = Encryptor::new(&key, &schema, &measures).unwrap();
    let encrypted_schema = encryptor.schema();
    reset_peak_rss();
    let mut encrypt = Duration::ZERO;
    let encrypted = batches(rows).map(|b| {
        let start = Instant::now();
        let out = encryptor.encrypt(&b);
        encrypt += start.elapsed();
        out
    });
    EncryptedTable::create_streaming(&dir.path().join("enc"), encrypted_schema, encrypted).unwrap();
    let values = rows * MEASURES.len();
    println!(
        "encrypt: {:.2} s, {:.2} M values/s; peak RSS while encrypting and writing: {:.0} MiB",
        encrypt.as_secs_f64(),
        values as f64 / encrypt.as_secs_f64() / 1e6,
        peak_rss_mib()
    );
    write_plain(&dir.path().join("plain"), batches(rows));
    let dims_only = dir.path().join("dims");
    write_plain(
        &dims_only,
        batches(rows).map(|b| b.project(&[0, 1, 2, 3, 4, 5]).unwrap()),
    );
    reset_peak_rss();
    let (enc_size, plain_size, dims_size) = (
        dir_size(&dir.path().join("enc")),
        dir_size(&dir.path().join("plain")),
        dir_size(&dims_only),
    );
    println!(
        "stored: encrypted {} bytes, plaintext {} bytes; measures only: {:.2} B/value encrypted, {:.2} B/value plaintext",
        enc_size,
        plain_size,
        (enc_size - dims_size) as f64 / values as f64,
        (plain_size - dims_size) as f64 / values as f64
    );

    for &partitions in partition_counts {
        run_queries(&key, dir.path(), rows, partitions, runs).await;
    }
}

async fn run_queries(key: &ClientKey, dir: &Path, rows: usize, partitions: usize, runs: usize) {
    let values = rows * MEASURES.len();
    println!("target_partitions {partitions}:");
    let config = SessionConfig::new().with_target_partitions(partitions);
    let ctx = hedf::engine::session::new_context_with_config(config);
    ctx.register_table(
        "enc",
        Arc::new(EncryptedTable::open(&dir.join("enc")).unwrap()),
    )
    .unwrap();
    ctx.register_parquet(
        "plain",
        dir.join("plain").to_str().unwrap(),
        ParquetReadOptions::default(),
    )
    .await
    .unwrap();

    let cases = [
        (
            "clustered GROUP BY area, age (76 groups)",
            "GROUP BY area, age",
            "",
        ),
        ("clustered GROUP BY area (4 groups)", "GROUP BY area", ""),
        ("random GROUP BY rnd2 (2 groups)", "GROUP BY rnd2", ""),
        ("random GROUP BY rnd (76 groups)", "GROUP BY rnd", ""),
        (
            "random GROUP BY rnd10k (10^4 groups)",
            "GROUP BY rnd10k",
            "",
        ),
        (
            "random GROUP BY rnd100k (10^5 groups)",
            "GROUP BY rnd100k",
            "",
        ),
        (
            "WHERE sel = 's07' (1%), GROUP BY area",
            "GROUP BY area",
            "WHERE sel = 's07'",
        ),
        (
            "WHERE sel < 's50' (50%), GROUP BY area",
            "GROUP BY area",
            "WHERE sel < 's50'",
        ),
    ];
    println!(
        "{:<42} {:>12} {:>12} {:>8} {:>14} {:>12} {:>10} {:>10}",
        "query",
        "plaintext",
        "encrypted",
        "ratio",
        "ns/row/measure",
        "decrypt/val",
        "peak RSS",
        "sent B/val"
    );
    for (name, group, filter) in cases {
        let keys = group.trim_start_matches("GROUP BY ");
        let list = |f: &str| {
            MEASURES
                .iter()
                .map(|m| format!("{f}({m})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let plain_sql = format!(
            "SELECT {keys}, {} FROM plain {filter} {group} ORDER BY {keys}",
            list("SUM")
        );
        let enc_sql = format!(
            "SELECT {keys}, {} FROM enc {filter} {group} ORDER BY {keys}",
            list("he_sum")
        );
        let (plain_time, plain_result) = time_query(&ctx, &plain_sql, runs).await;
        reset_peak_rss();
        let (enc_time, result) = time_query(&ctx, &enc_sql, runs).await;
        let rss = peak_rss_mib();
        // What the server sends: a row's sums carry their shared mask once.
        let sent: Vec<RecordBatch> = result.iter().map(|b| share_masks(b).unwrap()).collect();
        let sent_bytes: usize = sent
            .iter()
            .flat_map(|b| b.columns())
            .filter(|c| c.data_type() == &DataType::LargeBinary)
            .map(|c| c.to_data().buffers()[1].len())
            .sum();
        let start = Instant::now();
        let decrypted: Vec<RecordBatch> = sent
            .iter()
            .map(|b| decrypt_batch(key, b).unwrap())
            .collect();
        let groups: usize = decrypted.iter().map(|b| b.num_rows()).sum();
        let per_value = start.elapsed() / (groups * MEASURES.len()) as u32;
        // A fast wrong answer is no answer: every group key and sum must equal plaintext's.
        assert_eq!(
            all_values(&decrypted),
            all_values(&plain_result),
            "{name}: decrypted sums differ from plaintext SUM"
        );
        println!(
            "{name:<42} {:>10.1}ms {:>10.1}ms {:>7.1}x {:>14.1} {:>10.2}us {:>7.0}MiB {:>10}",
            plain_time.as_secs_f64() * 1e3,
            enc_time.as_secs_f64() * 1e3,
            enc_time.as_secs_f64() / plain_time.as_secs_f64(),
            enc_time.as_nanos() as f64 / values as f64,
            per_value.as_secs_f64() * 1e6,
            rss,
            sent_bytes / (groups * MEASURES.len())
        );
    }
    let (_, result) = time_query(&ctx, "SELECT area, he_sum(m1) FROM enc GROUP BY area", 1).await;
    let sum_bytes = result[0].column(1).to_data().buffers()[1].len() / result[0].num_rows();
    println!("he_sum result: {sum_bytes} bytes per group per measure");
    let all = MEASURES
        .iter()
        .map(|m| format!("he_sum({m})"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("SELECT area, {all} FROM enc GROUP BY area");
    let (_, result) = time_query(&ctx, &sql, 1).await;
    let sent = share_masks(&result[0]).unwrap();
    let bytes: usize = (1..sent.num_columns())
        .map(|c| sent.column(c).to_data().buffers()[1].len())
        .sum();
    println!(
        "sent with shared masks: {} bytes per result value ({} measures)",
        bytes / (sent.num_rows() * MEASURES.len()),
        MEASURES.len()
    );
}
