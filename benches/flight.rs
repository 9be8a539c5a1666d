//! The Flight SQL endpoint over loopback: a real server (in this process, its own tokio tasks)
//! and hedf's client. Prints median seed-query latency (he_sum as sent, and plain SQL through
//! the client's split: SUM, which the server runs as written, and AVG, which the client
//! finishes), ingest throughput and result size.
//!
//! Then a login flood: 4 tasks guess one user's password for 10 s while another user's
//! `SELECT 1` is timed.
//!
//! cargo bench --bench flight                  (ingest of 10^6 rows x 5 measures)
//! HEDF_BENCH_ROWS=100000 cargo bench --bench flight

#[path = "../tests/common/population.rs"]
mod population;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Decimal128Array, RecordBatch, StringArray};
use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use arrow::ipc::CompressionType;
use hedf::cli::connection::Connection;
use hedf::cli::remote::{ClientTls, Remote};
use hedf::cli::split;
use hedf::crypto::client::{decrypt_batch, encrypt_batches, MeasureColumn};
use hedf::crypto::keys::ClientKey;
use hedf::protocol::{IngestMode, UploadOptions};
use hedf::server::flight::auth::{Directory, Users};
use hedf::server::flight::{ConnectionLimits, Limits, ServerConfig};
use population::{aggregation_sql, population, YEARS};

const RUNS: usize = 50;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ipc_bytes(schema: &SchemaRef, batches: &[RecordBatch], compress: bool) -> usize {
    let mut options = IpcWriteOptions::default();
    if compress {
        options = options
            .try_with_compression(Some(CompressionType::LZ4_FRAME))
            .unwrap();
    }
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new_with_options(&mut out, schema, options).unwrap();
    for b in batches {
        writer.write(b).unwrap();
    }
    writer.finish().unwrap();
    drop(writer);
    out.len()
}

/// Rows of the demo's shape: 3 plaintext dimensions, 5 measures with 1 decimal.
fn generated(rows: usize) -> Vec<RecordBatch> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..rows)
        .step_by(65_536)
        .map(|start| {
            let len = 65_536.min(rows - start);
            let dim = |name: &str, n: usize| -> ArrayRef {
                let v: StringArray = (0..len)
                    .map(|i| Some(format!("{name}{}", (start + i) * n / rows)))
                    .collect();
                Arc::new(v)
            };
            let mut columns = vec![
                ("AREA", dim("area", 4)),
                ("AGE GROUP", dim("age", 76)),
                ("SEX", dim("sex", 152)),
            ];
            for y in YEARS {
                let v: Decimal128Array = (0..len)
                    .map(|_| Some((next() % 1_000_000) as i128))
                    .collect();
                columns.push((y, Arc::new(v.with_precision_and_scale(10, 1).unwrap())));
            }
            RecordBatch::try_from_iter(columns).unwrap()
        })
        .collect()
}

/// A server on `dir` in this process, on an ephemeral loopback port; its URL. Without users,
/// authentication is off.
async fn serve(dir: &std::path::Path, users: Option<Users>) -> String {
    let config = ServerConfig {
        data_dir: dir.to_path_buf(),
        users: users.map(|u| Arc::new(Directory::new(u))),
        max_upload_bytes: u64::MAX,
        memory_limit: None,
        limits: Limits::default(),
        connections: ConnectionLimits::default(),
        tls: None,
        insecure_plaintext: false,
    };
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(hedf::server::flight::serve(
        config,
        "127.0.0.1:0".parse().unwrap(),
        move |addr| addr_tx.send(addr).unwrap(),
        std::future::pending(),
    ));
    format!("http://{}", addr_rx.await.unwrap())
}

#[tokio::main]
async fn main() {
    let rows: usize = std::env::var("HEDF_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let url = serve(dir.path(), None).await;
    let mut remote = Remote::connect(&url, None, &ClientTls::default())
        .await
        .unwrap();
    let key = Arc::new(ClientKey::generate());
    let connection = Connection::remote(&url, None, &ClientTls::default())
        .await
        .unwrap();
    let measures: Vec<MeasureColumn> = YEARS.iter().map(|y| MeasureColumn::new(*y, 1)).collect();

    // The seed's three aggregations over the 152-row table.
    let (_, plain) = population().unwrap();
    let (schema, enc) = encrypt_batches(&key, &plain, &measures).unwrap();
    let batches: Vec<hedf::Result<RecordBatch>> = enc.iter().cloned().map(Ok).collect();
    remote
        .upload(
            "population",
            IngestMode::CREATE,
            UploadOptions::default(),
            schema,
            futures::stream::iter(batches),
        )
        .await
        .unwrap();
    println!("Flight SQL over loopback, {RUNS} runs each, medians (2-core machine)");
    println!(
        "{:<22} {:>10} {:>11} {:>11} {:>11} {:>10}",
        "seed aggregation", "round trip", "+ decrypt", "split SUM", "split AVG", "result IPC"
    );
    for (title, over) in [
        ("by area (38 groups)", "AREA"),
        ("by age (8 groups)", "AGE GROUP"),
        ("by sex (76 groups)", "SEX"),
    ] {
        let sql = aggregation_sql("population", over, "he_sum").unwrap();
        let (mut trip, mut full) = (Vec::new(), Vec::new());
        let mut size = 0;
        for _ in 0..RUNS {
            let t = Instant::now();
            let (schema, result) = remote.query(&sql).await.unwrap();
            trip.push(t.elapsed());
            for b in &result {
                decrypt_batch(&key, b).unwrap();
            }
            full.push(t.elapsed());
            size = ipc_bytes(&schema, &result, false);
        }
        let [sums, averages] =
            ["SUM", "AVG"].map(|f| aggregation_sql("population", over, f).unwrap());
        let (mut split_sum, mut split_avg) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            for (sql, times) in [(&sums, &mut split_sum), (&averages, &mut split_avg)] {
                let t = Instant::now();
                let (_, result) = split::query(connection.clone(), key.clone(), sql.clone())
                    .await
                    .unwrap();
                for b in &result {
                    decrypt_batch(&key, b).unwrap();
                }
                times.push(t.elapsed());
            }
        }
        let values = size as f64
            / (YEARS.len()
                * if over == "SEX" {
                    76
                } else if over == "AREA" {
                    38
                } else {
                    8
                }) as f64;
        println!(
            "{title:<22} {:>7.2} ms {:>8.2} ms {:>8.2} ms {:>8.2} ms {:>7.2} MB ({:.0} B/value)",
            median(trip).as_secs_f64() * 1e3,
            median(full).as_secs_f64() * 1e3,
            median(split_sum).as_secs_f64() * 1e3,
            median(split_avg).as_secs_f64() * 1e3,
            size as f64 / 1e6,
            values
        );
    }

    // Ingest: an encrypted table of `rows` rows x 5 measures, as hedf's client sends it.
    let plain = generated(rows);
    let t = Instant::now();
    let (schema, enc) = encrypt_batches(&key, &plain, &measures).unwrap();
    let encrypt = t.elapsed();
    let wire = ipc_bytes(&schema, &enc, true);
    let raw = ipc_bytes(&schema, &enc, false);
    let mut times = Vec::new();
    for run in 0..3 {
        let batches: Vec<hedf::Result<RecordBatch>> = enc.iter().cloned().map(Ok).collect();
        let t = Instant::now();
        let n = remote
            .upload(
                &format!("t{run}"),
                IngestMode::CREATE,
                UploadOptions::default(),
                schema.clone(),
                futures::stream::iter(batches),
            )
            .await
            .unwrap();
        times.push(t.elapsed());
        assert_eq!(n as usize, rows);
    }
    let time = median(times).as_secs_f64();
    let stored: u64 = std::fs::read_dir(dir.path().join("tenants/anonymous"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("t0-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    println!();
    println!("ingest of {rows} rows x 5 encrypted measures (client encryption took {:.2} s, not included)", encrypt.as_secs_f64());
    println!(
        "  upload (median of 3): {:.3} s, {:.2} M rows/s",
        time,
        rows as f64 / time / 1e6
    );
    println!(
        "  encrypted cells as Arrow IPC: {:.1} MB -> {:.0} MB/s",
        raw as f64 / 1e6,
        raw as f64 / time / 1e6
    );
    println!(
        "  on the wire (cells, LZ4 IPC): {:.1} MB -> {:.0} MB/s",
        wire as f64 / 1e6,
        wire as f64 / time / 1e6
    );
    println!(
        "  stored Parquet: {:.1} MB ({:.2} B/value)",
        stored as f64 / 1e6,
        stored as f64 / (rows * 5) as f64
    );
    login_flood().await;
}

/// 4 tasks send wrong passwords for alice for 10 s; bob, logged in before, runs `SELECT 1`
/// meanwhile. Prints how many guesses the server checked and bob's latency.
async fn login_flood() {
    let dir = tempfile::tempdir().unwrap();
    let mut users = Users::default();
    users.add("alice", "alice-secret").unwrap();
    users.add("bob", "bob-secret").unwrap();
    let url = serve(dir.path(), Some(users)).await;
    let tls = ClientTls::default();
    let mut bob = Remote::connect(&url, Some(("bob", "bob-secret")), &tls)
        .await
        .unwrap();
    let mut quiet = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        bob.query("SELECT 1").await.unwrap();
        quiet.push(t.elapsed());
    }
    let until = Instant::now() + Duration::from_secs(10);
    let guessers: Vec<_> = (0..4)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let (mut checked, mut refused) = (0, 0);
                for n in 0.. {
                    if Instant::now() >= until {
                        break;
                    }
                    let guess = format!("guess-{i}-{n}");
                    match Remote::connect(&url, Some(("alice", &guess)), &ClientTls::default())
                        .await
                    {
                        Err(e) if e.kind() == hedf::ErrorKind::Unauthenticated => checked += 1,
                        Err(_) => refused += 1,
                        Ok(_) => panic!("a guess logged in"),
                    }
                }
                (checked, refused)
            })
        })
        .collect();
    let mut flood = Vec::new();
    while Instant::now() < until {
        let t = Instant::now();
        bob.query("SELECT 1").await.unwrap();
        flood.push(t.elapsed());
    }
    let (mut checked, mut refused) = (0, 0);
    for g in guessers {
        let (c, r) = g.await.unwrap();
        checked += c;
        refused += r;
    }
    flood.sort();
    let p99 = flood[flood.len() * 99 / 100];
    println!();
    println!("login flood: 4 tasks x 10 s of wrong passwords for one user");
    println!("  guesses checked (Argon2 ran): {checked}; refused by backoff: {refused}");
    println!(
        "  another user's SELECT 1: median {:.2} ms (quiet: {:.2} ms), p99 {:.2} ms, {} runs",
        median(flood.clone()).as_secs_f64() * 1e3,
        median(quiet).as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        flood.len()
    );
}
