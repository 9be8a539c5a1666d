//! The `hedf` command line as a user runs it: every subcommand, its output and its error exits.
//! Decrypted answers are compared with plaintext DataFusion on the same rows.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::population::{aggregation_sql, population};
use assert_cmd::Command;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn hedf() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hedf"));
    cmd.env_remove("HEDF_KEY").env_remove("HEDF_PASSWORD");
    cmd
}

fn stdout(cmd: &mut Command) -> String {
    let out = cmd.assert().success().get_output().stdout.clone();
    String::from_utf8(out).unwrap()
}

/// Runs `cmd`, expects it to fail, returns its stderr (which must be one line).
fn failure(cmd: &mut Command) -> String {
    let out = cmd.assert().failure().get_output().clone();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn population_csv() -> PathBuf {
    Path::new(ROOT).join("data/population.csv")
}

/// `keygen` into `dir`; returns the key id it printed.
fn keygen(dir: &Path) -> String {
    let id = stdout(hedf().args(["keygen", "--out"]).arg(dir));
    let id = id.trim().to_string();
    assert!(
        id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    id
}

/// `hedf encrypt INPUT --key KEYS EXTRA... --out OUT`, ready to run.
fn encrypt(input: &Path, keys: &Path, extra: &[&str], out: &Path) -> Command {
    let mut cmd = hedf();
    cmd.arg("encrypt")
        .arg(input)
        .arg("--key")
        .arg(keys)
        .args(extra)
        .arg("--out")
        .arg(out);
    cmd
}

/// `sql` run by plaintext DataFusion over `copies` copies of the population rows, written
/// as CSV or JSON the way `hedf sql` writes them.
async fn plaintext(sql: &str, copies: usize, json: bool) -> String {
    let (schema, batches) = population().unwrap();
    let ctx = SessionContext::new();
    let partitions = vec![batches; copies];
    ctx.register_table(
        "population",
        Arc::new(MemTable::try_new(schema, partitions).unwrap()),
    )
    .unwrap();
    let result = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let mut out = Vec::new();
    if json {
        let mut writer = arrow::json::ArrayWriter::new(&mut out);
        for batch in &result {
            writer.write(batch).unwrap();
        }
        writer.finish().unwrap();
        out.push(b'\n');
    } else {
        let mut writer = arrow::csv::Writer::new(&mut out);
        for batch in &result {
            writer.write(batch).unwrap();
        }
    }
    String::from_utf8(out).unwrap()
}

/// A seed aggregation with plaintext `SUM`, as CSV.
async fn plaintext_csv(over: &str) -> String {
    plaintext(
        &aggregation_sql("population", over, "SUM").unwrap(),
        1,
        false,
    )
    .await
}

const BY_SEX: &str =
    r#"SELECT "SEX", he_sum("2018") AS s FROM population GROUP BY "SEX" ORDER BY "SEX""#;

fn plain(query: &str) -> String {
    query.replace("he_sum", "SUM")
}

#[test]
fn help_names_every_subcommand() {
    let help = stdout(hedf().arg("--help"));
    // The first word of each line of the "Commands:" section, exactly.
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        listed,
        [
            "demo",
            "keygen",
            "encrypt",
            "upload",
            "decrypt",
            "sql",
            "serve",
            "client",
            "hash-password",
            "help"
        ],
        "{help}"
    );
    for command in listed.iter().filter(|c| **c != "help") {
        hedf().args([command, "--help"]).assert().success();
    }
    let sql = stdout(hedf().args(["sql", "--help"]));
    for option in [
        "--server",
        "--data-dir",
        "--key",
        "--format",
        "--command",
        "--file",
    ] {
        assert!(sql.contains(option), "{option} missing from:\n{sql}");
    }
    let err = String::from_utf8(
        hedf()
            .arg("nonsense")
            .assert()
            .failure()
            .get_output()
            .stderr
            .clone(),
    )
    .unwrap();
    assert!(err.contains("unrecognized subcommand"), "{err}");
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let id = keygen(&keys);
    let file = keys.join("client.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let before = std::fs::read(&file).unwrap();
    let err = failure(hedf().args(["keygen", "--out"]).arg(&keys));
    assert!(err.contains("--force") || err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), before, "key changed");
    let new_id = stdout(hedf().args(["keygen", "--force", "--out"]).arg(&keys));
    assert_ne!(new_id.trim(), id);
}

/// Local path, no server: encrypt (measures and scale inferred), upload into a data folder,
/// query with `sql -c`; every sum equals plaintext DataFusion. Then the errors a user meets.
#[tokio::test]
async fn encrypt_upload_and_query_a_local_folder() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let id = keygen(&keys);
    let table = dir.path().join("population.parquet");
    let out = encrypt(&population_csv(), &keys, &[], &table)
        .assert()
        .success()
        .get_output()
        .clone();
    let report = String::from_utf8(out.stderr).unwrap();
    assert!(
        report.contains("encrypted 152 rows of 2018 (scale 1), 2019 (scale 1)")
            && report.contains(&id)
            && report.contains("M rows/s"),
        "{report}"
    );
    let data = dir.path().join("data");
    let upload = |mode: &str| {
        let mut cmd = hedf();
        cmd.arg("upload")
            .arg(&table)
            .arg("--data-dir")
            .arg(&data)
            .args(["--table", "population", "--mode", mode]);
        cmd
    };
    let uploaded = upload("create")
        .assert()
        .success()
        .get_output()
        .stderr
        .clone();
    assert!(String::from_utf8(uploaded)
        .unwrap()
        .contains("152 rows uploaded to population"));
    assert!(failure(&mut upload("create")).contains("already exists"));

    let sql = |key: Option<&Path>, format: &str, command: &str| {
        let mut cmd = hedf();
        cmd.arg("sql").arg("--data-dir").arg(&data);
        if let Some(key) = key {
            cmd.arg("--key").arg(key);
        }
        cmd.args(["--format", format, "-c", command]);
        cmd
    };
    for over in ["AREA", "AGE GROUP", "SEX"] {
        let query = aggregation_sql("population", over, "he_sum").unwrap();
        let got = stdout(&mut sql(Some(&keys), "csv", &query));
        assert_eq!(got, plaintext_csv(over).await, "aggregation over {over}");
    }

    // JSON, with the key given by environment variable.
    let json = stdout(
        hedf()
            .env("HEDF_KEY", &keys)
            .args(["sql", "--format", "json", "--data-dir"])
            .arg(&data)
            .args(["-c", BY_SEX]),
    );
    assert_eq!(json, plaintext(&plain(BY_SEX), 1, true).await);

    // \d lists the table; \d NAME says which columns are encrypted, their scale and key id.
    let listing = stdout(&mut sql(Some(&keys), "csv", "\\d"));
    assert_eq!(
        listing,
        format!("table,plaintext columns,encrypted columns,key id\npopulation,3,5,{id}\n")
    );
    let columns = stdout(&mut sql(Some(&keys), "csv", "\\d population"));
    assert!(columns.contains("AREA,Utf8,no,,,"), "{columns}");
    assert!(
        columns.contains(&format!("2018,\"DECIMAL(38, 1)\",yes,1,{id} (loaded),")),
        "{columns}"
    );

    // Errors are one line with a non-zero exit.
    let query = BY_SEX;
    assert!(
        failure(&mut sql(Some(&keys), "table", "SELECT * FROM nowhere"))
            .contains("no such table: nowhere")
    );
    let bad = failure(&mut sql(Some(&keys), "table", "SELEC 1"));
    assert!(bad.contains("Line: 1, Column: 1"), "{bad}");
    assert!(failure(&mut sql(Some(&keys), "table", "\\nonsense")).contains("unknown command"));
    let missing = failure(&mut sql(Some(&keys), "table", "\\d nowhere"));
    assert!(missing.contains("no such table: nowhere"), "{missing}");

    // No key: values show as <encrypted>, exit 0. Another key: <encrypted> plus a mismatch.
    let hidden = stdout(&mut sql(None, "csv", query));
    assert_eq!(hidden, "SEX,s\nF,<encrypted>\nM,<encrypted>\n");
    let other = dir.path().join("other");
    let other_id = keygen(&other);
    let out = sql(Some(&other), "csv", query)
        .assert()
        .failure()
        .get_output()
        .clone();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), hidden);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim_end(),
        format!("error: key mismatch: column \"s\" was encrypted with key id {id}; the loaded key is {other_id}")
    );

    // Append doubles every sum; DROP TABLE removes the table.
    upload("append").assert().success();
    let doubled = stdout(&mut sql(Some(&keys), "csv", query));
    assert_eq!(doubled, plaintext(&plain(query), 2, false).await);
    assert!(stdout(&mut sql(Some(&keys), "table", "DROP TABLE population")).contains("OK"));
    assert!(failure(&mut sql(Some(&keys), "table", query)).contains("no such table"));
}

/// A file that was never encrypted is not stored unless the user says so, and then with a
/// warning per numeric column left in clear.
#[test]
fn uploading_a_plaintext_file_needs_allow_plaintext_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.parquet");
    let (schema, batches) = population().unwrap();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&plain).unwrap(), schema, None)
            .unwrap();
    for batch in &batches {
        writer.write(batch).unwrap();
    }
    writer.close().unwrap();
    let upload = |extra: &[&str]| {
        let mut cmd = hedf();
        cmd.arg("upload")
            .arg(&plain)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--table", "clear"])
            .args(extra);
        cmd
    };
    let out = upload(&[]).assert().failure().get_output().clone();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("warning: column \"2018\"") && err.contains("stored in clear"),
        "{err}"
    );
    assert!(
        err.contains("no encrypted column") && err.contains("--allow-plaintext"),
        "{err}"
    );
    let out = upload(&["--allow-plaintext"])
        .assert()
        .success()
        .get_output()
        .clone();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.matches("warning: column").count(), 5, "{err}");
    assert!(err.contains("152 rows uploaded to clear"), "{err}");
}

/// A key file others can read loads with a warning; a damaged one is refused, never used to
/// decrypt garbage.
#[test]
fn loose_key_files_warn_and_damaged_ones_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keygen(&keys);
    let file = keys.join("client.key");
    let table = dir.path().join("population.parquet");
    let quiet = encrypt(&population_csv(), &keys, &[], &table)
        .assert()
        .success()
        .get_output()
        .stderr
        .clone();
    assert!(!String::from_utf8(quiet).unwrap().contains("warning"));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loud = encrypt(&population_csv(), &keys, &[], &table)
        .assert()
        .success()
        .get_output()
        .stderr
        .clone();
    let loud = String::from_utf8(loud).unwrap();
    assert!(
        loud.contains("warning:") && loud.contains("mode 644") && loud.contains("chmod 600"),
        "{loud}"
    );
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let err = failure(&mut encrypt(&population_csv(), &keys, &[], &table));
    assert!(
        err.contains("client.key") && err.contains("damaged"),
        "{err}"
    );
}

#[test]
fn encrypt_refuses_values_with_more_decimals_than_the_scale() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keygen(&keys);
    let input = dir.path().join("bad.csv");
    std::fs::write(&input, "g,v\na,1.5\nb,2.25\n").unwrap();
    let out = dir.path().join("bad.parquet");
    let err = failure(&mut encrypt(
        &input,
        &keys,
        &["--measures", "v", "--scale", "1"],
        &out,
    ));
    assert!(
        err.contains("column v, data row 2") && err.contains("more than 1 decimal places"),
        "{err}"
    );
    assert!(!out.exists(), "a failed encryption left {}", out.display());
    // A declared precision spares the scan; a value beyond it (1.50 > 0.99) is refused.
    let err = failure(&mut encrypt(
        &input,
        &keys,
        &["--measures", "v", "--scale", "2", "--precision", "2"],
        &out,
    ));
    assert!(
        err.contains("column v, data row 1") && err.contains("declared precision"),
        "{err}"
    );
    // Inferred, the scale is 2 and the same file encrypts.
    encrypt(&input, &keys, &[], &out).assert().success();
    let missing = failure(&mut encrypt(Path::new("nowhere.csv"), &keys, &[], &out));
    assert!(
        missing.contains("nowhere.csv") || missing.contains("No such file"),
        "{missing}"
    );
    let no_key = failure(&mut encrypt(&input, Path::new("/nonexistent"), &[], &out));
    assert!(no_key.contains("client.key"), "{no_key}");
}

/// The whole path a user takes, over a real server: keygen, encrypt, serve, upload, `sql -f`
/// with the demo queries in `sql/`; the pivot output reproduces the seed's tables. Then the
/// server-side errors: wrong password, unreachable server. And `decrypt` of a saved result.
#[test]
fn full_user_path_through_a_server_reproduces_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let id = keygen(&keys);
    let table = dir.path().join("population.parquet");
    let measures = ["--measures", "2018,2019,2020,2021,2022", "--scale", "1"];
    encrypt(&population_csv(), &keys, &measures, &table)
        .assert()
        .success();
    let hash = stdout(hedf().arg("hash-password").write_stdin("s3cret\n"));
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let users = dir.path().join("users");
    std::fs::write(&users, format!("alice:{hash}")).unwrap();
    let server = common::Server::start(
        &dir.path().join("server"),
        &["--users-file", users.to_str().unwrap()],
    );

    let as_alice = |password: &str| {
        let mut cmd = hedf();
        cmd.env("HEDF_PASSWORD", password);
        cmd
    };
    as_alice("s3cret")
        .arg("upload")
        .arg(&table)
        .args([
            "--server",
            &server.url,
            "--user",
            "alice",
            "--table",
            "population",
        ])
        .assert()
        .success();
    let mut pivot = String::new();
    for file in ["by_area", "by_age", "by_sex"] {
        pivot += &stdout(
            as_alice("s3cret")
                .args([
                    "sql",
                    "--server",
                    &server.url,
                    "--user",
                    "alice",
                    "--format",
                    "pivot",
                    "--key",
                ])
                .arg(&keys)
                .arg("-f")
                .arg(Path::new(ROOT).join(format!("sql/{file}.sql"))),
        );
    }
    common::assert_seed_rows_reproduced(&pivot);

    let wrong = failure(as_alice("guess").args([
        "sql",
        "--server",
        &server.url,
        "--user",
        "alice",
        "-c",
        "\\d",
    ]));
    assert!(wrong.contains("authentication failed"), "{wrong}");
    let unreachable = failure(hedf().args(["sql", "--server", "http://127.0.0.1:1", "-c", "\\d"]));
    assert!(
        unreachable.contains("cannot reach http://127.0.0.1:1"),
        "{unreachable}"
    );
    let listing = stdout(as_alice("s3cret").args([
        "sql",
        "--server",
        &server.url,
        "--user",
        "alice",
        "--format",
        "csv",
        "-c",
        "\\d",
    ]));
    assert_eq!(
        listing,
        format!("table,plaintext columns,encrypted columns,key id\npopulation,3,5,{id}\n")
    );
    drop(server);

    // `decrypt` reads a result file any client saved; another key is refused.
    let result = dir.path().join("result.arrow");
    save_local_result(&dir.path().join("local"), &table, &result);
    let decrypted = stdout(
        hedf()
            .arg("decrypt")
            .arg(&result)
            .arg("--key")
            .arg(&keys)
            .args(["--format", "csv"]),
    );
    let expected = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(plaintext_csv("AREA"));
    assert_eq!(decrypted, expected);
    let other = dir.path().join("other");
    keygen(&other);
    let err = failure(hedf().arg("decrypt").arg(&result).arg("--key").arg(&other));
    assert!(err.contains("key mismatch"), "{err}");
}

/// Uploads `table` into a local folder and saves one he_sum result as an Arrow IPC file, as a
/// stock client would.
fn save_local_result(data: &Path, table: &Path, result: &Path) {
    hedf()
        .arg("upload")
        .arg(table)
        .arg("--data-dir")
        .arg(data)
        .args(["--table", "population"])
        .assert()
        .success();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (schema, batches) = runtime.block_on(async {
        let tenant = hedf::server::catalog::Catalog::open(data, None)
            .unwrap()
            .tenant(hedf::protocol::ANONYMOUS)
            .unwrap();
        hedf::engine::statement::run(
            &tenant,
            &aggregation_sql("population", "AREA", "he_sum").unwrap(),
        )
        .await
        .unwrap()
    });
    let mut writer =
        arrow::ipc::writer::FileWriter::try_new(std::fs::File::create(result).unwrap(), &schema)
            .unwrap();
    for batch in &batches {
        writer.write(batch).unwrap();
    }
    writer.finish().unwrap();
}
