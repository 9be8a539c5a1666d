//! `hedf sql` driven through a pseudo-terminal the way a person types: a multi-line query
//! answered with decrypted numbers, `\d`, `\timing`, Ctrl-C during a long query (the session
//! survives), `\q`; the history file keeps the statements.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::common::population::population;
use arrow::array::AsArray;
use arrow::datatypes::Decimal128Type;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

fn hedf(args: &[&str], dir: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_hedf"))
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "hedf {args:?}");
}

/// Plaintext DataFusion's 2018 totals for F and M, formatted as decimals.
async fn plaintext_sums() -> Vec<String> {
    let (schema, batches) = population().unwrap();
    let ctx = SessionContext::new();
    ctx.register_table(
        "population",
        Arc::new(MemTable::try_new(schema, vec![batches]).unwrap()),
    )
    .unwrap();
    let batches = ctx
        .sql(r#"SELECT SUM("2018") FROM population GROUP BY "SEX" ORDER BY "SEX""#)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let sums = batches[0].column(0).as_primitive::<Decimal128Type>();
    (0..sums.len()).map(|i| sums.value_as_string(i)).collect()
}

#[tokio::test]
async fn interactive_session_through_a_pty() {
    let dir = tempfile::tempdir().unwrap();
    let csv = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/population.csv");
    let root = dir.path();
    hedf(&["keygen", "--out", "keys"], root);
    let csv = csv.to_str().unwrap();
    hedf(
        &["encrypt", csv, "--key", "keys", "--out", "p.parquet"],
        root,
    );
    hedf(
        &[
            "upload",
            "p.parquet",
            "--data-dir",
            "data",
            "--table",
            "population",
        ],
        root,
    );
    let sums = plaintext_sums().await;

    let mut command = Command::new(env!("CARGO_BIN_EXE_hedf"));
    command
        .args(["sql", "--data-dir", "data", "--key", "keys"])
        .current_dir(root)
        .env("HEDF_HISTORY", root.join("history"))
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(command, Some(30_000)).unwrap();
    p.exp_string("Ready in").unwrap();
    p.exp_string("hedf> ").unwrap();

    p.send_line(r#"SELECT "SEX", he_sum("2018") AS s"#).unwrap();
    p.exp_string("-> ").unwrap();
    p.send_line(r#"FROM population GROUP BY "SEX" ORDER BY "SEX";"#)
        .unwrap();
    for sum in &sums {
        p.exp_string(sum).unwrap();
    }
    p.exp_string("(2 rows)").unwrap();

    p.send_line("\\d").unwrap();
    p.exp_regex(r"population\s*\|\s*3\s*\|\s*5").unwrap();
    p.send_line("\\timing").unwrap();
    p.exp_string("Timing is on.").unwrap();

    // 10^9 steps of a recursive query: far longer than the test waits.
    p.send_line(
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 1000000000) SELECT count(*) FROM r;",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    p.send_control('c').unwrap();
    p.exp_string("query cancelled").unwrap();

    // The session goes on.
    p.send_line(r#"SELECT he_sum("2018") AS s FROM population WHERE "SEX" = 'F';"#)
        .unwrap();
    p.exp_string(&sums[0]).unwrap();
    p.exp_string("Time: ").unwrap();
    p.send_line("\\q").unwrap();
    p.exp_eof().unwrap();

    let history = std::fs::read_to_string(root.join("history")).unwrap();
    assert!(
        history.contains(r#"FROM population GROUP BY "SEX" ORDER BY "SEX";"#),
        "{history}"
    );
}
