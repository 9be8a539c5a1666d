//! TPC-H on encrypted measures: lineitem as `tpchgen-cli` generates it (standard data nobody
//! here shaped), Q1's sums and Q6's weighted revenue, each against plaintext DataFusion on the
//! same Parquet file in the same run, results required equal to the last digit.
//!
//! HEDF_TPCH_SF=1 cargo bench --bench tpch     (generates lineitem with tpchgen-cli if needed)
//! HEDF_TPCH_DIR=/data/tpch HEDF_TPCH_SF=10 HEDF_BENCH_RUNS=3 cargo bench --bench tpch
//!
//! `tpchgen-cli` comes from PyPI (`pip install tpchgen-cli`) or crates.io
//! (`cargo install tpchgen-cli`) and must be on PATH unless `$HEDF_TPCH_DIR/sf$SF` already
//! holds `lineitem.parquet`.
//!
//! Each measure gets the limbs its largest value needs (as `hedf encrypt` does when no
//! precision is declared); the bench also prints what the declared DECIMAL(15, 2) would cost.
//! Two encrypted tables of lineitem's rows: `q1` with l_quantity, l_extendedprice,
//! l_discount and l_tax encrypted (Q1 sums all four), and `q6` with only l_extendedprice
//! encrypted, since Q6 filters on l_discount and l_quantity and weights by l_discount.
//! Q1 here is the issue's: its four plain sums and COUNT(*); its `SUM(l_extendedprice *
//! (1 - l_discount))` and friends would weight by an encrypted column, which needs a
//! ciphertext product hedf does not do.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use hedf::crypto::answer::share_masks;
use hedf::crypto::client::{decrypt_batch, infer_precisions, Encryptor, MeasureColumn};
use hedf::crypto::encoding::MeasureSpec;
use hedf::crypto::keys::ClientKey;
use hedf::crypto::params::DEFAULT_MAX_ROWS_PER_SUM;
use hedf::table::EncryptedTable;
use parquet::arrow::ArrowWriter;

mod common;
#[path = "../tests/common/values.rs"]
mod values;
use common::{dir_size, time_query};
use values::all_values;

const Q1: &str = "SELECT l_returnflag, l_linestatus, SUM(l_quantity) AS sum_qty, \
     SUM(l_extendedprice) AS sum_base_price, SUM(l_discount) AS sum_disc, SUM(l_tax) AS sum_tax, \
     COUNT(*) AS count_order FROM {t} WHERE l_shipdate <= DATE '1998-09-02' \
     GROUP BY l_returnflag, l_linestatus ORDER BY l_returnflag, l_linestatus";

const Q6: &str = "SELECT SUM(l_extendedprice * l_discount) AS revenue FROM {t} \
     WHERE l_shipdate >= DATE '1994-01-01' AND l_shipdate < DATE '1995-01-01' \
     AND l_discount BETWEEN 0.05 AND 0.07 AND l_quantity < 24";

const Q1_COLUMNS: [&str; 7] = [
    "l_returnflag",
    "l_linestatus",
    "l_shipdate",
    "l_quantity",
    "l_extendedprice",
    "l_discount",
    "l_tax",
];
const Q1_MEASURES: [&str; 4] = ["l_quantity", "l_extendedprice", "l_discount", "l_tax"];
const Q6_COLUMNS: [&str; 4] = ["l_shipdate", "l_quantity", "l_extendedprice", "l_discount"];
const Q6_MEASURES: [&str; 1] = ["l_extendedprice"];

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// lineitem.parquet at scale factor `sf`, generated with tpchgen-cli unless already there.
fn lineitem(sf: &str) -> PathBuf {
    let dir = PathBuf::from(env("HEDF_TPCH_DIR", "target/tpch")).join(format!("sf{sf}"));
    let file = dir.join("lineitem.parquet");
    if !file.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        println!(
            "generating lineitem at SF {sf} with tpchgen-cli into {}",
            dir.display()
        );
        let status = Command::new("tpchgen-cli")
            .args(["parquet", "-s", sf, "--tables=lineitem", "--output-dir"])
            .arg(&dir)
            .status()
            .expect(
                "tpchgen-cli not found: pip install tpchgen-cli (or cargo install tpchgen-cli)",
            );
        assert!(status.success(), "tpchgen-cli failed");
    }
    file
}

/// The plaintext `columns` of lineitem, as DataFusion reads them.
async fn read(plain: &SessionContext, columns: &[&str]) -> Vec<RecordBatch> {
    plain
        .sql(&format!("SELECT {} FROM lineitem", columns.join(", ")))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap()
}

/// Encrypts `measures` of `batches` into an encrypted table in `dir` at hedf's default rows per
/// sum, each column's limbs chosen from its largest value (as `hedf encrypt` does unless told a
/// precision); prints time and, per column, the limbs against those of its declared precision.
fn encrypt(key: &ClientKey, batches: &[RecordBatch], measures: &[&str], dir: &Path) {
    let schema = batches[0].schema();
    let declared: Vec<(i8, u8)> = measures
        .iter()
        .map(|m| match schema.field_with_name(m).unwrap().data_type() {
            DataType::Decimal128(p, s) => (*s, *p),
            other => panic!("{m} is {other}, expected a decimal"),
        })
        .collect();
    let undeclared: Vec<MeasureColumn> = measures
        .iter()
        .zip(&declared)
        .map(|(m, (s, _))| MeasureColumn::new(*m, *s))
        .collect();
    let columns = infer_precisions(&schema, &undeclared, batches.iter().cloned().map(Ok)).unwrap();
    for (c, (s, p)) in columns.iter().zip(&declared) {
        let limbs = |p| {
            MeasureSpec::for_precision(p, *s, DEFAULT_MAX_ROWS_PER_SUM)
                .unwrap()
                .limbs
        };
        println!(
            "  {}: largest value has {} digits: {} limb(s), {} B/value (DECIMAL({p}, {s}) declared: {} limbs)",
            c.name,
            c.precision.unwrap(),
            limbs(c.precision.unwrap()),
            8 * limbs(c.precision.unwrap()) as usize,
            limbs(*p)
        );
    }
    let mut encryptor = Encryptor::new(key, &schema, &columns).unwrap();
    let encrypted_schema = encryptor.schema();
    let mut time = Duration::ZERO;
    let encrypted = batches.iter().map(|b| {
        let start = Instant::now();
        let out = encryptor.encrypt(b);
        time += start.elapsed();
        out
    });
    EncryptedTable::create_streaming(dir, encrypted_schema, encrypted).unwrap();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let values = rows * measures.len();
    println!(
        "  encrypt {}: {:.1} s, {:.2} M values/s",
        measures.join(", "),
        time.as_secs_f64(),
        values as f64 / time.as_secs_f64() / 1e6
    );
}

/// Bytes of `batches` as one plaintext Parquet file (parquet-rs defaults).
fn plain_parquet_size(batches: &[RecordBatch], file: &Path) -> u64 {
    let mut writer = ArrowWriter::try_new(
        std::fs::File::create(file).unwrap(),
        batches[0].schema(),
        None,
    )
    .unwrap();
    batches.iter().for_each(|b| writer.write(b).unwrap());
    writer.close().unwrap();
    std::fs::metadata(file).unwrap().len()
}

#[tokio::main]
async fn main() {
    let sf = env("HEDF_TPCH_SF", "1");
    let runs: usize = env("HEDF_BENCH_RUNS", "3").parse().unwrap();
    let file = lineitem(&sf);
    let config = SessionConfig::new().with_target_partitions(2);
    let plain = SessionContext::new_with_config(config.clone());
    plain
        .register_parquet(
            "lineitem",
            file.to_str().unwrap(),
            ParquetReadOptions::default(),
        )
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let key = ClientKey::generate();
    println!(
        "\nhedf TPC-H: lineitem SF {sf}, {} cores, median of {runs}",
        std::thread::available_parallelism().unwrap()
    );

    let q1_rows = read(&plain, &Q1_COLUMNS).await;
    let rows: usize = q1_rows.iter().map(|b| b.num_rows()).sum();
    println!("{rows} rows");
    encrypt(&key, &q1_rows, &Q1_MEASURES, &work.path().join("q1"));
    let q1_plain_bytes = plain_parquet_size(&q1_rows, &work.path().join("q1_plain.parquet"));
    let q1_enc_bytes = dir_size(&work.path().join("q1"));
    drop(q1_rows);
    let q6_rows = read(&plain, &Q6_COLUMNS).await;
    encrypt(&key, &q6_rows, &Q6_MEASURES, &work.path().join("q6"));
    drop(q6_rows);
    println!(
        "  stored, Q1's 7 columns: encrypted {:.1} MB, plaintext Parquet {:.1} MB ({:.1} B/row against {:.1})",
        q1_enc_bytes as f64 / 1e6,
        q1_plain_bytes as f64 / 1e6,
        q1_enc_bytes as f64 / rows as f64,
        q1_plain_bytes as f64 / rows as f64
    );

    let enc = hedf::engine::session::new_context_with_config(config);
    for t in ["q1", "q6"] {
        let table = EncryptedTable::open(&work.path().join(t)).unwrap();
        enc.register_table(t, Arc::new(table)).unwrap();
    }
    println!(
        "{:<6} {:>12} {:>12} {:>8} {:>10}",
        "query", "plaintext", "encrypted", "ratio", "groups"
    );
    for (name, sql, table) in [("Q1", Q1, "q1"), ("Q6", Q6, "q6")] {
        let (plain_time, want) = time_query(&plain, &sql.replace("{t}", "lineitem"), runs).await;
        let (enc_time, sent) = time_query(&enc, &sql.replace("{t}", table), runs).await;
        let got: Vec<RecordBatch> = sent
            .iter()
            .map(|b| decrypt_batch(&key, &share_masks(b).unwrap()).unwrap())
            .collect();
        // A fast wrong answer is no answer: every key and sum must equal plaintext's.
        assert_eq!(all_values(&got), all_values(&want), "{name}");
        let groups: usize = got.iter().map(|b| b.num_rows()).sum();
        println!(
            "{name:<6} {:>10.1}ms {:>10.1}ms {:>7.1}x {:>10}",
            plain_time.as_secs_f64() * 1e3,
            enc_time.as_secs_f64() * 1e3,
            enc_time.as_secs_f64() / plain_time.as_secs_f64(),
            groups
        );
    }
}
