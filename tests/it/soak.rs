//! A soak run against a real `hedf serve`: 32 clients of four users mix plain-SQL queries
//! (checked against plaintext DataFusion), uploads in create, append and replace modes, drops, bad
//! statements, cancelled calls, reconnects and a few wrong passwords, for $HEDF_SOAK_SECONDS
//! (default 15; README's figures come from 300). Pass means no wrong answer, no unexpected
//! error, server memory that does not grow with time, and no file left behind.
//!
//! `HEDF_SOAK_SECONDS=300 cargo test --release --test it soak -- --nocapture` prints the
//! throughput, latency percentiles and the server's RSS over time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hedf::cli::connection::Connection;
use hedf::cli::remote::ClientTls;
use hedf::cli::split;
use hedf::crypto::client::decrypt_batch;
use hedf::crypto::keys::ClientKey;
use hedf::protocol::{IngestMode, UploadOptions};
use hedf::{ErrorKind, HedfError};

use crate::common;
use crate::common::tables::{encrypted_population, key};
use crate::common::values::all_values;

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
const CLIENTS: usize = 32;
/// Wrong passwords in all: under the 20 free failures of one address, so the clients' own
/// reconnects (all from 127.0.0.1) are never made to wait.
const WRONG_PASSWORDS: u32 = 10;

const QUERIES: [&str; 4] = [
    r#"SELECT "AREA", SUM("2018"), SUM("2022") FROM population GROUP BY "AREA" ORDER BY "AREA""#,
    r#"SELECT "AGE GROUP", SUM("2020") FROM population GROUP BY "AGE GROUP" ORDER BY 1"#,
    r#"SELECT "SEX", AVG("2019"), COUNT(*) FROM population GROUP BY "SEX" ORDER BY "SEX""#,
    r#"SELECT "AREA", SUM("2021") AS t FROM population GROUP BY "AREA" ORDER BY t DESC LIMIT 2"#,
];

#[derive(Default)]
struct Tally {
    latencies: BTreeMap<&'static str, Vec<f64>>,
    wrong: Vec<String>,
    unexpected: Vec<String>,
}

fn password(user: &str) -> String {
    format!("{user}-secret")
}

async fn connect(url: &str, user: &str) -> hedf::Result<Connection> {
    Connection::remote(url, Some((user, &password(user))), &ClientTls::default()).await
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread")]
async fn soak_of_thirty_two_mixed_clients() {
    let seconds: u64 = std::env::var("HEDF_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let dir = tempfile::tempdir().unwrap();
    // Every client of a user may upload at once: refusals past a share are tested elsewhere.
    let mut args: Vec<String> = [
        "--memory-limit",
        "1GiB",
        "--max-uploads-per-user",
        "8",
        "--max-concurrent-uploads",
        "32",
    ]
    .map(String::from)
    .into();
    for user in USERS {
        args.extend(["--user".to_string(), format!("{user}:{}", password(user))]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::Server::start(dir.path(), &args);
    let url = server.url.clone();
    let pid = server.child.id();

    let (schema, enc, reference) = encrypted_population();
    let reference = Arc::new(reference);
    let mut want = Vec::new();
    for sql in QUERIES {
        want.push(all_values(
            &reference.sql(sql).await.unwrap().collect().await.unwrap(),
        ));
    }
    for user in USERS {
        let mut c = connect(&url, user).await.unwrap();
        let batches = enc.clone().into_iter().map(Ok);
        c.upload(
            "population",
            IngestMode::CREATE,
            UploadOptions::default(),
            schema.clone(),
            batches,
        )
        .await
        .unwrap();
    }

    let key = Arc::new(ClientKey::from_bytes(&key().to_bytes()).unwrap());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let wrong_passwords = Arc::new(AtomicU32::new(0));
    let want = Arc::new(want);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let rss = Arc::new(Mutex::new(vec![(0.0, rss_kib(pid))]));
    let sampler = {
        let rss = rss.clone();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let t = start.elapsed().as_secs_f64();
                rss.lock().unwrap().push((t, rss_kib(pid)));
            }
        })
    };

    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (url, key, tally, want) = (url.clone(), key.clone(), tally.clone(), want.clone());
        let (schema, enc) = (schema.clone(), enc.clone());
        let wrong_passwords = wrong_passwords.clone();
        clients.push(tokio::spawn(async move {
            let user = USERS[client % USERS.len()];
            let mut connection = connect(&url, user).await.unwrap();
            // Scheduling only, not cryptography: a fixed LCG per client makes runs repeatable.
            let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (client as u64 + 1);
            let mut next = move |n: u64| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 33) % n
            };
            let mut round = 0u64;
            // Rows of this client's own table `c{client}`, grown by appends, reset by replaces.
            let mut held = 0u64;
            while Instant::now() < deadline {
                round += 1;
                let roll = next(100);
                let began = Instant::now();
                let (what, outcome): (&'static str, Result<(), String>) = match roll {
                    0..=54 => {
                        let q = next(QUERIES.len() as u64) as usize;
                        // A statement the server runs as written comes back encrypted.
                        let got = split::query(connection.clone(), key.clone(), QUERIES[q].into())
                            .await
                            .and_then(|(schema, batches)| {
                                let plain: hedf::Result<Vec<_>> =
                                    batches.iter().map(|b| decrypt_batch(&key, b)).collect();
                                Ok((schema, plain?))
                            });
                        let outcome = match got {
                            Ok((_, batches)) if all_values(&batches) == want[q] => Ok(()),
                            Ok((_, batches)) => {
                                tally.lock().unwrap().wrong.push(format!(
                                    "{}: {:?}",
                                    QUERIES[q],
                                    all_values(&batches)
                                ));
                                Ok(())
                            }
                            Err(e) => Err(e.to_string()),
                        };
                        ("query", outcome)
                    }
                    55..=69 => {
                        let (mode, table) = match roll {
                            55..=61 => (IngestMode::CREATE, format!("c{client}_{round}")),
                            62..=65 => (IngestMode::APPEND, format!("c{client}")),
                            _ => (IngestMode::REPLACE, format!("c{client}")),
                        };
                        // Append to a table that exists and has room; otherwise start it over.
                        let mode = if mode == IngestMode::APPEND && !(1..8 * 152).contains(&held) {
                            IngestMode::REPLACE
                        } else {
                            mode
                        };
                        let expected = if mode == IngestMode::APPEND {
                            held + 152
                        } else {
                            152
                        };
                        let batches = enc.clone().into_iter().map(Ok);
                        let uploaded = connection
                            .upload(
                                &table,
                                mode,
                                UploadOptions::default(),
                                schema.clone(),
                                batches,
                            )
                            .await;
                        let own = table == format!("c{client}");
                        let counted = match uploaded {
                            Ok(152) => {
                                if own {
                                    held = expected;
                                }
                                connection
                                    .query(&format!("SELECT COUNT(*) FROM {table}"))
                                    .await
                                    .map(|(_, b)| all_values(&b))
                            }
                            Ok(n) => Err(HedfError::internal(format!("{n} rows uploaded"))),
                            Err(e) => Err(e),
                        };
                        match counted {
                            Ok(rows) if rows == vec![vec![expected.to_string()]] => {}
                            Ok(rows) => tally
                                .lock()
                                .unwrap()
                                .wrong
                                .push(format!("{table}: {rows:?}")),
                            Err(e) => tally
                                .lock()
                                .unwrap()
                                .unexpected
                                .push(format!("upload: {e}")),
                        }
                        let dropped = if mode == IngestMode::CREATE {
                            connection
                                .query(&format!("DROP TABLE {table}"))
                                .await
                                .map(|_| ())
                        } else {
                            Ok(())
                        };
                        ("upload", dropped.map_err(|e| e.to_string()))
                    }
                    70..=79 => {
                        let e = connection.query("SELECT nope FROM population").await;
                        let outcome = match e {
                            Err(e) if e.kind() == ErrorKind::InvalidArgument => Ok(()),
                            other => Err(format!("a bad statement answered {other:?}")),
                        };
                        ("bad statement", outcome)
                    }
                    80..=89 => {
                        let call = connection.query(QUERIES[0]);
                        let _ = tokio::time::timeout(Duration::from_millis(next(20)), call).await;
                        ("cancelled call", Ok(()))
                    }
                    90..=94 => {
                        drop(std::mem::replace(
                            &mut connection,
                            match connect(&url, user).await {
                                Ok(c) => c,
                                Err(e) => {
                                    tally
                                        .lock()
                                        .unwrap()
                                        .unexpected
                                        .push(format!("reconnect: {e}"));
                                    continue;
                                }
                            },
                        ));
                        ("reconnect", Ok(()))
                    }
                    _ => {
                        if wrong_passwords.fetch_add(1, Ordering::Relaxed) >= WRONG_PASSWORDS {
                            continue;
                        }
                        // A guesser of its own name: a real user's failures would make
                        // that user's reconnects wait (by design), which is not under test.
                        let e = Connection::remote(
                            &url,
                            Some(("mallory", "guess")),
                            &ClientTls::default(),
                        )
                        .await;
                        let outcome = match e {
                            // Checked and refused, or refused at once after 5 failures.
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::Unauthenticated | ErrorKind::ResourceExhausted
                                ) =>
                            {
                                Ok(())
                            }
                            Err(e) => Err(format!("a wrong password got {e}")),
                            Ok(_) => Err("a wrong password was accepted".into()),
                        };
                        ("wrong password", outcome)
                    }
                };
                let ms = began.elapsed().as_secs_f64() * 1e3;
                let mut t = tally.lock().unwrap();
                t.latencies.entry(what).or_default().push(ms);
                if let Err(e) = outcome {
                    t.unexpected.push(format!("{what}: {e}"));
                }
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    sampler.await.unwrap();
    let elapsed = start.elapsed().as_secs_f64();

    // Nothing but manifests and the segments they name is left on disk.
    let mut c = connect(&url, "alice").await.unwrap();
    let _ = c.tables().await.unwrap();
    for user in USERS {
        let tenant = dir.path().join("tenants").join(user);
        let manifest = std::fs::read_to_string(tenant.join("manifest")).unwrap();
        for entry in std::fs::read_dir(&tenant).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                name == "manifest" || manifest.contains(&name),
                "{user}: {name} is left over"
            );
        }
    }

    let tally = tally.lock().unwrap();
    let rss = rss.lock().unwrap();
    let total: usize = tally.latencies.values().map(Vec::len).sum();
    println!(
        "soak: {CLIENTS} clients, {elapsed:.0} s, {total} calls ({:.1}/s)",
        total as f64 / elapsed
    );
    for (what, ms) in &tally.latencies {
        let mut ms = ms.clone();
        ms.sort_by(f64::total_cmp);
        println!(
            "  {what:>15}: {:>6} calls, p50 {:>7.1} ms, p99 {:>7.1} ms",
            ms.len(),
            percentile(&ms, 0.5),
            percentile(&ms, 0.99)
        );
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let step = (rss.len() / 6).max(1);
    let trace: Vec<String> = rss
        .iter()
        .step_by(step)
        .map(|(t, kib)| format!("{t:.0}s {:.0}", mib(*kib)))
        .collect();
    println!("  server RSS MiB: {}", trace.join(", "));
    assert!(tally.wrong.is_empty(), "wrong answers: {:?}", tally.wrong);
    assert!(
        tally.unexpected.is_empty(),
        "unexpected errors: {:?}",
        tally.unexpected
    );
    assert!(tally
        .latencies
        .get("query")
        .is_some_and(|q| q.len() >= CLIENTS));
    // Flat: after the first third, memory stays within half again of where it was by then,
    // and below the 1 GiB query pool plus the server's own.
    assert!(
        rss.iter().all(|(_, kib)| *kib > 0),
        "no RSS read from /proc"
    );
    let settled = rss[rss.len() / 3].1;
    let peak = rss.iter().map(|(_, kib)| *kib).max().unwrap();
    let last = rss.last().unwrap().1;
    assert!(last <= settled * 3 / 2 + 64 * 1024, "RSS grew: {trace:?}");
    assert!(peak < 1536 * 1024, "RSS peaked at {:.0} MiB", mib(peak));
}
