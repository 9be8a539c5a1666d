//! End-to-end tests of the engine: decrypted results against plaintext DataFusion on the same
//! rows, the seed's tables, and every refusal the engine promises.

use crate::common;

use std::sync::{Arc, OnceLock};

use crate::common::values::all_values;
use arrow::array::{
    Array, ArrayRef, AsArray, Decimal128Array, FixedSizeBinaryArray, Int64Array, RecordBatch,
    StringArray,
};
use arrow::datatypes::Decimal128Type;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::prelude::{SessionConfig, SessionContext};
use hedf::crypto::answer::share_masks;
use hedf::crypto::cell::{ColumnMarking, SUM_COUNT_AT};
use hedf::crypto::client::{decrypt_batch, decrypt_sum, encrypt_batches, MeasureColumn};
use hedf::crypto::keys::ClientKey;
use hedf::table::EncryptedTable;
use hedf::udaf::HeSumGroupsAccumulator;
use proptest::prelude::*;

fn key() -> &'static ClientKey {
    static KEY: OnceLock<ClientKey> = OnceLock::new();
    KEY.get_or_init(ClientKey::generate)
}

fn context(partitions: usize, batch_size: usize) -> SessionContext {
    hedf::engine::session::new_context_with_config(
        SessionConfig::new()
            .with_target_partitions(partitions)
            .with_batch_size(batch_size),
    )
}

/// Registers `plain` encrypted as `name` and in plaintext as `{name}_plain`.
fn register(
    ctx: &SessionContext,
    dir: &std::path::Path,
    name: &str,
    key: &ClientKey,
    plain: &[RecordBatch],
    measures: &[MeasureColumn],
) {
    let (schema, encrypted) = encrypt_batches(key, plain, measures).unwrap();
    let table = EncryptedTable::create(&dir.join(name), schema, &encrypted).unwrap();
    ctx.register_table(name, Arc::new(table)).unwrap();
    let plain_table = MemTable::try_new(plain[0].schema(), vec![plain.to_vec()]).unwrap();
    ctx.register_table(format!("{name}_plain"), Arc::new(plain_table))
        .unwrap();
}

async fn run(ctx: &SessionContext, sql: &str) -> datafusion::error::Result<Vec<RecordBatch>> {
    ctx.sql(sql).await?.collect().await
}

/// The Decimal128 columns' values as optional i128 (unscaled): the sums, where group keys
/// are compared elsewhere or not at all.
fn decimals(batches: &[RecordBatch]) -> Vec<Vec<Option<i128>>> {
    let mut rows = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            rows.push(
                b.columns()
                    .iter()
                    .filter_map(|c| c.as_primitive_opt::<Decimal128Type>())
                    .map(|c| c.is_valid(r).then(|| c.value(r)))
                    .collect(),
            );
        }
    }
    rows
}

/// Runs `encrypted_sql` (he_sum) and `plain_sql` (SUM); the decrypted results must equal the
/// plaintext ones in every column.
async fn assert_same(
    ctx: &SessionContext,
    key: &ClientKey,
    encrypted_sql: &str,
    plain_sql: &str,
) -> usize {
    let sent = run(ctx, encrypted_sql).await.unwrap();
    let got: Vec<RecordBatch> = sent
        .iter()
        .map(|b| decrypt_batch(key, b).unwrap())
        .collect();
    // As the server sends it: a row's sums on one mask carry it once.
    let shared: Vec<RecordBatch> = sent
        .iter()
        .map(|b| decrypt_batch(key, &share_masks(b).unwrap()).unwrap())
        .collect();
    assert_eq!(all_values(&shared), all_values(&got), "{encrypted_sql}");
    let want = run(ctx, plain_sql).await.unwrap();
    let (got, want) = (all_values(&got), all_values(&want));
    assert_eq!(got, want, "{encrypted_sql}");
    assert!(!want.is_empty());
    want.len()
}

fn table(
    groups: Vec<String>,
    v: Vec<Option<i128>>,
    w: Vec<Option<i128>>,
    scale: i8,
) -> RecordBatch {
    let k = Int64Array::from((0..groups.len() as i64).collect::<Vec<_>>());
    let dec = |x: Vec<Option<i128>>| {
        Arc::new(
            Decimal128Array::from(x)
                .with_precision_and_scale(18, scale)
                .unwrap(),
        ) as ArrayRef
    };
    RecordBatch::try_from_iter(vec![
        ("g", Arc::new(StringArray::from(groups)) as ArrayRef),
        ("k", Arc::new(k) as ArrayRef),
        ("v", dec(v)),
        ("w", dec(w)),
    ])
    .unwrap()
}

fn measures(scale: i8) -> Vec<MeasureColumn> {
    vec![
        MeasureColumn::new("v", scale),
        MeasureColumn::new("w", scale).with_precision(18),
    ]
}

const SUM_BY_G: (&str, &str) = (
    "SELECT g, COUNT(*) AS n, he_sum(v), he_sum(w) FROM t GROUP BY g ORDER BY g",
    "SELECT g, COUNT(*) AS n, SUM(v), SUM(w) FROM t_plain GROUP BY g ORDER BY g",
);

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random tables: negative values, NULLs that differ between measures, 0-4 decimals, 1-3
    /// partitions, tiny batches; fused sums with FILTERs, and sums across two encryptions.
    #[test]
    fn decrypted_sums_equal_plaintext_sums(
        rows in prop::collection::vec((0u8..6, prop::option::weighted(0.8, -10i128.pow(12)..10i128.pow(12)), prop::option::weighted(0.8, i64::MIN as i128 / 4..i64::MAX as i128 / 4)), 1..200),
        scale in 0i8..=4,
        partitions in 1usize..=3,
        batch_size in 1usize..64,
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let ctx = context(partitions, batch_size);
            let groups = rows.iter().map(|r| format!("g{}", r.0)).collect();
            let batch = table(groups, rows.iter().map(|r| r.1).collect(), rows.iter().map(|r| r.2).collect(), scale);
            register(&ctx, dir.path(), "t", key(), std::slice::from_ref(&batch), &measures(scale));
            // The same rows encrypted again: another mask stream, as a second table brings.
            register(&ctx, dir.path(), "u", key(), &[batch], &measures(scale));
            assert_same(&ctx, key(), SUM_BY_G.0, SUM_BY_G.1).await;
            assert_same(&ctx, key(), "SELECT he_sum(v), he_sum(w) FROM t", "SELECT SUM(v), SUM(w) FROM t_plain").await;
            assert_same(
                &ctx,
                key(),
                "SELECT g, he_sum(v) FILTER (WHERE k % 3 = 0), he_sum(w) FILTER (WHERE k % 3 = 0), \
                 he_sum(v), SUM(w) FILTER (WHERE k % 2 = 1), COUNT(w), SUM(w) FROM t GROUP BY g ORDER BY g",
                "SELECT g, SUM(v) FILTER (WHERE k % 3 = 0), SUM(w) FILTER (WHERE k % 3 = 0), \
                 SUM(v), SUM(w) FILTER (WHERE k % 2 = 1), COUNT(w), SUM(w) FROM t_plain GROUP BY g ORDER BY g",
            ).await;
            // Sums weighted by plaintext columns and constants (float constants as written).
            assert_same(
                &ctx,
                key(),
                "SELECT g, SUM(v * k), he_sum(2 * w), SUM(w * (k % 5) * -3), \
                 SUM(v * CAST(k % 7 - 3 AS DECIMAL(5, 2))) FILTER (WHERE k % 2 = 0), \
                 SUM(v * 0.25), SUM(v * CAST(k % 3 AS TINYINT) * CAST(100 AS TINYINT)), \
                 SUM(v) FROM t GROUP BY g ORDER BY g",
                "SELECT g, SUM(v * k), SUM(2 * w), SUM(w * (k % 5) * -3), \
                 SUM(v * CAST(k % 7 - 3 AS DECIMAL(5, 2))) FILTER (WHERE k % 2 = 0), \
                 SUM(v * CAST(0.25 AS DECIMAL(3, 2))), \
                 SUM(v * CAST(k % 3 AS TINYINT) * CAST(100 AS TINYINT)), \
                 SUM(v) FROM t_plain GROUP BY g ORDER BY g",
            ).await;
            assert_same(
                &ctx,
                key(),
                "SELECT t.g, he_sum(t.v), he_sum(u.w), he_sum(t.w) FROM t JOIN u ON t.k = u.k \
                 WHERE u.k % 4 <> 1 GROUP BY t.g ORDER BY t.g",
                "SELECT t.g, SUM(t.v), SUM(u.w), SUM(t.w) FROM t_plain AS t JOIN u_plain AS u \
                 ON t.k = u.k WHERE u.k % 4 <> 1 GROUP BY t.g ORDER BY t.g",
            ).await;
        });
    }
}

#[tokio::test]
async fn a_group_of_100_000_rows_next_to_groups_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(2, 8192);
    let n = 100_000usize;
    let groups = (0..n)
        .map(|i| {
            if i % 25_000 == 7 {
                format!("single{i}")
            } else {
                "big".into()
            }
        })
        .collect();
    let v = (0..n)
        .map(|i| Some((i as i128 * 7919) % 200_001 - 100_000))
        .collect();
    let w = (0..n)
        .map(|i| (i % 3 != 0).then(|| i as i128 * 1_000_000_007 - 3))
        .collect();
    register(
        &ctx,
        dir.path(),
        "t",
        key(),
        &[table(groups, v, w, 2)],
        &measures(2),
    );
    assert_eq!(assert_same(&ctx, key(), SUM_BY_G.0, SUM_BY_G.1).await, 5);
    // Selective WHERE and HAVING on plaintext columns around encrypted sums.
    assert_same(
        &ctx,
        key(),
        "SELECT g, he_sum(v) FROM t WHERE k % 10 = 3 GROUP BY g HAVING COUNT(*) > 1 ORDER BY g",
        "SELECT g, SUM(v) FROM t_plain WHERE k % 10 = 3 GROUP BY g HAVING COUNT(*) > 1 ORDER BY g",
    )
    .await;
}

#[tokio::test]
async fn skip_partial_aggregation_path_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SessionConfig::new()
        .with_target_partitions(2)
        .with_batch_size(256);
    config
        .options_mut()
        .execution
        .skip_partial_aggregation_probe_rows_threshold = 1;
    config
        .options_mut()
        .execution
        .skip_partial_aggregation_probe_ratio_threshold = 0.0;
    let ctx = hedf::engine::session::new_context_with_config(config);
    let n = 3000;
    let groups = (0..n).map(|i| format!("g{}", (i * 37) % 1000)).collect();
    let v = (0..n).map(|i| Some(i as i128 - 1500)).collect();
    let w = (0..n)
        .map(|i| (i % 5 != 0).then_some(i as i128 * 3))
        .collect();
    register(
        &ctx,
        dir.path(),
        "t",
        key(),
        &[table(groups, v, w, 1)],
        &measures(1),
    );
    assert_eq!(assert_same(&ctx, key(), SUM_BY_G.0, SUM_BY_G.1).await, 1000);
    assert_same(
        &ctx,
        key(),
        "SELECT g, SUM(v * (k % 9 - 4)), SUM(w) FROM t GROUP BY g ORDER BY g",
        "SELECT g, SUM(v * (k % 9 - 4)), SUM(w) FROM t_plain GROUP BY g ORDER BY g",
    )
    .await;
}

/// A value weighted by w carries the noise of w^2 rows: one row of a table declared for 2^31
/// rows per sum, weighted by the largest w with w^2 within its budget, has the noise of a
/// 2^31-row sum and decrypts exactly (at the column's largest values, both signs); w + 1 is
/// refused by the engine, naming the weights.
#[tokio::test]
async fn a_weighted_sum_with_the_noise_of_2_pow_31_rows_is_exact_and_one_more_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(1, 16);
    let max = 10i128.pow(18) - 1;
    let batch = table(
        vec!["a".into(), "b".into()],
        vec![Some(max), Some(-max)],
        vec![None, None],
        2,
    );
    let measures = [MeasureColumn::new("v", 2)
        .with_precision(18)
        .with_max_rows_per_sum(1 << 31)];
    register(&ctx, dir.path(), "t", key(), &[batch], &measures);
    let sums = run(&ctx, "SELECT he_sum(v) FROM t").await.unwrap();
    let crypto = ColumnMarking::from_metadata(sums[0].schema().field(0).metadata())
        .unwrap()
        .unwrap()
        .crypto;
    let budget = crypto.spec.max_rows();
    assert!(budget >= 1 << 31, "{budget}");
    let w = budget.isqrt();
    assert_same(
        &ctx,
        key(),
        &format!("SELECT g, SUM(v * {w}) FROM t GROUP BY g ORDER BY g"),
        &format!("SELECT g, SUM(v * {w}) FROM t_plain GROUP BY g ORDER BY g"),
    )
    .await;
    let err = run(
        &ctx,
        &format!("SELECT SUM(v * {}) FROM t GROUP BY g", w + 1),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("budget exceeded") && err.contains("counts as w^2 rows"),
        "{err}"
    );
}

#[tokio::test]
async fn select_star_returns_cells_that_decrypt_to_the_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(2, 100);
    let n = 5000;
    let groups = (0..n).map(|i| format!("g{}", i % 3)).collect();
    let v = (0..n)
        .map(|i| (i % 7 != 0).then_some(i as i128 * -13))
        .collect();
    let w = (0..n)
        .map(|i| Some(i as i128 * 1_000_000_000_000))
        .collect();
    register(
        &ctx,
        dir.path(),
        "t",
        key(),
        &[table(groups, v, w, 3)],
        &measures(3),
    );
    let got = run(&ctx, "SELECT k, v, w FROM t ORDER BY k").await.unwrap();
    let got: Vec<RecordBatch> = got
        .iter()
        .map(|b| decrypt_batch(key(), b).unwrap())
        .collect();
    let want = run(&ctx, "SELECT k, v, w FROM t_plain ORDER BY k")
        .await
        .unwrap();
    assert_eq!(decimals(&got), decimals(&want));
}

#[tokio::test]
async fn stored_ciphertext_costs_its_bodies_and_less_than_a_byte_more() {
    let dir = tempfile::tempdir().unwrap();
    let n = 1 << 16;
    let groups = (0..n).map(|i| format!("g{}", i / 1000)).collect();
    let v: Vec<_> = (0..n).map(|i| Some(i as i128)).collect();
    let batch = table(groups, v.clone(), v, 1);
    let plain_only = batch.project(&[0, 1]).unwrap();
    let ctx = context(1, 8192);
    // DECIMAL(6, 1): one 8-byte body at 2^24 rows per sum, two at the default 2^27.
    let measures = [
        MeasureColumn::new("v", 1)
            .with_precision(6)
            .with_max_rows_per_sum(1 << 24),
        MeasureColumn::new("w", 1).with_precision(6),
    ];
    register(&ctx, dir.path(), "t", key(), &[batch], &measures);
    register(&ctx, dir.path(), "p", key(), &[plain_only], &[]);
    let size = |name: &str| -> u64 {
        std::fs::read_dir(dir.path().join(name))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let overhead = (size("t") - size("p")) as f64 / n as f64 - 8.0 - 16.0;
    assert!(
        (0.0..2.0).contains(&overhead),
        "{overhead} bytes per row beyond the bodies"
    );
}

/// Several sums of one table over the same rows plan as one fused aggregate, and the answer
/// carries each row's mask sum once: the other sums name the column that carries it.
#[tokio::test]
async fn sums_of_one_table_share_one_mask_sum_per_group() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(2, 64);
    register(&ctx, dir.path(), "t", key(), &[small_table()], &measures(1));
    let sql = "SELECT g, SUM(v), he_sum(w), COUNT(*) FROM t GROUP BY g ORDER BY g";
    let plan = run(&ctx, &format!("EXPLAIN {sql}")).await.unwrap();
    let plan = arrow::util::pretty::pretty_format_batches(&plan)
        .unwrap()
        .to_string();
    assert!(plan.contains("he_sum_fused(t.v, t.w)"), "{plan}");
    assert!(plan.contains("he_sum_part("), "{plan}");

    let sent = run(&ctx, sql).await.unwrap();
    let shared = share_masks(&sent[0]).unwrap();
    let (full, sharing) = (
        shared.column(1).as_binary::<i64>(),
        shared.column(2).as_binary::<i64>(),
    );
    // Group a's w is NULL on one of its rows, so its two sums cover different rows and
    // masks; group b's cover the same row. Their few rows are listed, not 32 KiB of mask.
    let magic = |a: &arrow::array::LargeBinaryArray, g| a.value(g)[..4].to_vec();
    assert_eq!(magic(full, 0), b"HSUM");
    assert_eq!(magic(sharing, 0), b"HSUM");
    assert_eq!(magic(full, 1), b"HSUM");
    assert_eq!(magic(sharing, 1), b"HSRF");
    assert!(full.value(1).len() < 200 && sharing.value(1).len() < 100);
    assert_eq!(
        all_values(&[decrypt_batch(key(), &shared).unwrap()]),
        all_values(&[decrypt_batch(key(), &sent[0]).unwrap()])
    );
    // The fused columns are marked exactly as the same sum alone would be.
    let alone = run(&ctx, "SELECT g, SUM(v) FROM t GROUP BY g ORDER BY g")
        .await
        .unwrap();
    assert_eq!(
        sent[0].schema().field(1).metadata(),
        alone[0].schema().field(1).metadata()
    );
    assert_eq!(sent[0].schema().field(1).name(), "sum(t.v)");
    // A volatile FILTER must be drawn per call: those sums are not fused.
    let plan = run(
        &ctx,
        "EXPLAIN SELECT SUM(v) FILTER (WHERE random() < 0.5), SUM(w) FILTER (WHERE random() < 0.5) FROM t",
    )
    .await
    .unwrap();
    let plan = arrow::util::pretty::pretty_format_batches(&plan)
        .unwrap()
        .to_string();
    assert!(!plan.contains("he_sum_fused"), "{plan}");

    // Without the carrier the sharing sum cannot be decrypted, and says why.
    let alone = shared.project(&[0, 2]).unwrap();
    let err = decrypt_batch(key(), &alone).unwrap_err().to_string();
    assert!(err.contains("keep the answer's columns together"), "{err}");
}

/// More encrypted sums than one bundle holds (255) fuse into several bundles, exactly.
#[tokio::test]
async fn three_hundred_sums_in_one_query_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(1, 64);
    let columns = 300;
    let mut fields: Vec<(String, ArrayRef)> = vec![(
        "g".into(),
        Arc::new(StringArray::from(vec!["a", "b", "a"])) as ArrayRef,
    )];
    for c in 0..columns {
        let values = Int64Array::from(vec![Some(c as i64), Some(-7), Some(c as i64 * 3)]);
        fields.push((format!("m{c}"), Arc::new(values)));
    }
    let batch = RecordBatch::try_from_iter(fields).unwrap();
    let measures: Vec<MeasureColumn> = (0..columns)
        .map(|c| MeasureColumn::new(format!("m{c}"), 0).with_precision(4))
        .collect();
    register(&ctx, dir.path(), "t", key(), &[batch], &measures);
    let list = |f: &str| {
        (0..columns)
            .map(|c| format!("{f}(m{c})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let plan = run(
        &ctx,
        &format!("EXPLAIN SELECT g, {} FROM t GROUP BY g", list("SUM")),
    )
    .await
    .unwrap();
    let plan = arrow::util::pretty::pretty_format_batches(&plan)
        .unwrap()
        .to_string();
    assert!(
        plan.contains("__hedf_fused_1"),
        "two bundles expected: {plan}"
    );
    let n = assert_same(
        &ctx,
        key(),
        &format!("SELECT g, {} FROM t GROUP BY g ORDER BY g", list("SUM")),
        &format!(
            "SELECT g, {} FROM t_plain GROUP BY g ORDER BY g",
            list("SUM")
        ),
    )
    .await;
    assert_eq!(n, 2);
}

#[test]
fn seed_tables_are_reproduced_exactly() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let mut local = hedf::cli::connection::Connection::local(dir.path(), None, None).unwrap();
    rt.block_on(hedf::cli::demo::run(&mut local, &mut out))
        .unwrap();
    let out = String::from_utf8(out).unwrap();
    common::assert_seed_rows_reproduced(&out);
    assert!(
        out.contains("must be one of [\"AREA\", \"AGE GROUP\", \"SEX\"]"),
        "{out}"
    );
    assert_eq!(out.matches("no such table: population").count(), 2, "{out}");
    assert_eq!(out.matches("verified: all").count(), 3);
}

fn small_table() -> RecordBatch {
    table(
        vec!["a".into(), "a".into(), "b".into()],
        vec![Some(10), Some(-3), Some(5)],
        vec![Some(1), None, Some(2)],
        1,
    )
}

#[tokio::test]
async fn ciphertext_misuse_is_refused_at_planning() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(2, 16);
    register(&ctx, dir.path(), "t", key(), &[small_table()], &measures(1));
    let refused = [
        ("SELECT * FROM t ORDER BY v", "ordered by"),
        ("SELECT g FROM t WHERE v > 'x'", "encrypted"),
        ("SELECT v, COUNT(*) FROM t GROUP BY v", "grouped by"),
        (
            "SELECT g, he_sum(v) FROM t GROUP BY g HAVING he_sum(v) > 'a'",
            "encrypted",
        ),
        (
            "SELECT g, he_sum(v) AS s FROM t GROUP BY g ORDER BY s",
            "encrypted",
        ),
        ("SELECT DISTINCT v FROM t", "encrypted"),
        ("SELECT CAST(v AS BYTEA) FROM t", "computed on"),
        ("SELECT MIN(v) FROM t", "aggregated with"),
        ("SELECT COUNT(DISTINCT v) FROM t", "aggregated with"),
        ("SELECT a.g FROM t a JOIN t b ON a.v = b.v", "encrypted"),
        ("SELECT he_sum(k) FROM t", "plaintext Int64 column"),
        (
            "SELECT he_sum(s) FROM (SELECT he_sum(v) AS s FROM t)",
            "already a sum",
        ),
        ("SELECT he_sum(nope) FROM t", "nope"),
        ("SELECT he_sum(v) FROM missing_table", "missing_table"),
        // Through CTEs, casts, UNION and subqueries.
        (
            "WITH c AS (SELECT v AS x FROM t) SELECT * FROM c ORDER BY x",
            "ordered by",
        ),
        (
            "WITH c AS (SELECT CAST(v AS BYTEA) AS x FROM t) SELECT * FROM c",
            "computed on",
        ),
        ("SELECT v FROM t UNION SELECT v FROM t", "DISTINCT"),
        (
            "SELECT * FROM (SELECT v FROM t UNION ALL SELECT v FROM t) WHERE v IS NULL",
            "compared in a filter",
        ),
        (
            "SELECT g FROM t WHERE k IN (SELECT v FROM t)",
            "subquery's result",
        ),
        (
            "SELECT g FROM t WHERE (SELECT he_sum(v) FROM t) IS NULL",
            "subquery's result",
        ),
        (
            "SELECT g FROM t WHERE EXISTS (SELECT 1 FROM t u WHERE u.v = t.v)",
            "encrypted",
        ),
        ("SELECT (SELECT MAX(v) FROM t) AS m", "aggregated with"),
        ("SELECT v * 2 FROM t", "computed on"),
        (
            "SELECT SUM(v * w) FROM t",
            "v is encrypted: `*` needs its plaintext",
        ),
        (
            "SELECT SUM(v / 2) FROM t",
            "v is encrypted: `/` needs its plaintext",
        ),
        (
            "SELECT SUM(v * k + 1) FROM t",
            "v is encrypted: `+` needs its plaintext",
        ),
        (
            "SELECT SUM(v * CAST(w AS BIGINT)) FROM t",
            "w is encrypted and cannot be used as a weight",
        ),
        (
            "SELECT SUM(v * CAST(k AS DOUBLE)) FROM t",
            "can only be multiplied by an exact number",
        ),
        (
            "SELECT COUNT(*) FROM t WHERE v * 2 > 0",
            "v is encrypted: `>` needs its plaintext",
        ),
        (
            "SELECT SUM(v * k) * 2 FROM t",
            "is encrypted: `*` needs its plaintext",
        ),
        ("SELECT SUM(he_sum(v) * 2) FROM t", "is encrypted"),
        (
            "SELECT SUM(v) FROM t UNION ALL SELECT SUM(v * 0.5) FROM t",
            "differently in the inputs of this UNION",
        ),
        (
            "SELECT v FROM t UNION ALL SELECT X'00'",
            "differently in the inputs of this UNION",
        ),
    ];
    // Refused while planning: the physical plan is never built, nothing runs.
    for (sql, message) in refused {
        let err = match ctx.sql(sql).await {
            Ok(df) => df
                .create_physical_plan()
                .await
                .map(|_| ())
                .expect_err(sql)
                .to_string(),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(message), "{sql}: {err}");
    }
    // Counting, selecting and summing with plaintext filters stay allowed.
    assert_same(
        &ctx,
        key(),
        "SELECT COUNT(v), he_sum(v) FILTER (WHERE g = 'a') FROM t",
        "SELECT COUNT(v), SUM(v) FILTER (WHERE g = 'a') FROM t_plain",
    )
    .await;
}

#[tokio::test]
async fn wrong_and_mixed_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(2, 16);
    let other = ClientKey::generate();
    register(&ctx, dir.path(), "t", key(), &[small_table()], &measures(1));
    register(
        &ctx,
        dir.path(),
        "u",
        &other,
        &[small_table()],
        &measures(1),
    );
    let result = run(&ctx, "SELECT he_sum(v) FROM t").await.unwrap();
    let err = decrypt_batch(&other, &result[0]).unwrap_err().to_string();
    assert!(
        err.contains(&format!("key id {}", key().id())) && err.contains(&other.id().to_string()),
        "{err}"
    );
    let err = run(
        &ctx,
        "SELECT he_sum(v) FROM (SELECT v FROM t UNION ALL SELECT v FROM u)",
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("mixed keys"), "{err}");
}

#[tokio::test]
async fn malformed_ciphertexts_are_refused_and_stored_data_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (schema, encrypted) = encrypt_batches(key(), &[small_table()], &measures(1)).unwrap();
    let v_index = schema.index_of("v").unwrap();
    let cells = encrypted[0].column(v_index).as_fixed_size_binary().clone();
    let width = cells.value_length() as usize;
    let with_cells = |cells: FixedSizeBinaryArray| {
        let mut columns = encrypted[0].columns().to_vec();
        columns[v_index] = Arc::new(cells);
        RecordBatch::try_new(schema.clone(), columns)
    };

    // A cell whose header was garbled (key id byte flipped) is refused at storage time.
    let mut garbled = cells.value_data().to_vec();
    garbled[0] ^= 0xff;
    let garbled = FixedSizeBinaryArray::new(width as i32, garbled.into(), None);
    let err = EncryptedTable::create(
        &dir.path().join("g"),
        schema.clone(),
        &[with_cells(garbled.clone()).unwrap()],
    )
    .unwrap_err();
    assert!(err.to_string().contains("mixed keys"), "{err}");
    // A truncated cell cannot even form a batch of the table's schema.
    let truncated =
        FixedSizeBinaryArray::try_from_iter(cells.iter().map(|c| c.unwrap()[..width - 1].to_vec()))
            .unwrap();
    assert!(with_cells(truncated).is_err());

    // he_sum over garbled cells that bypass storage is an error, not a number.
    let ctx = context(1, 16);
    let mem = MemTable::try_new(schema.clone(), vec![vec![with_cells(garbled).unwrap()]]).unwrap();
    ctx.register_table("m", Arc::new(mem)).unwrap();
    let err = run(&ctx, "SELECT he_sum(v) FROM m").await.unwrap_err();
    assert!(err.to_string().contains("mixed keys"), "{err}");

    // A table that refused an upload is untouched; a damaged file is an error, not a panic.
    let table_dir = dir.path().join("t");
    let table = EncryptedTable::create(&table_dir, schema.clone(), &encrypted).unwrap();
    assert!(EncryptedTable::create(&table_dir, schema.clone(), &encrypted).is_err());
    ctx.register_table("t", Arc::new(table)).unwrap();
    let before = run(&ctx, "SELECT he_sum(v) FROM t").await.unwrap();
    let before = decimals(&[decrypt_batch(key(), &before[0]).unwrap()]);
    assert_eq!(before, vec![vec![Some(12)]]);
    let file = std::fs::read_dir(&table_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = EncryptedTable::open(&table_dir).unwrap_err();
    assert!(err.to_string().contains("Parquet"), "{err}");
}

#[tokio::test]
async fn sums_over_the_budget_are_refused_by_server_and_client() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(1, 16);
    register(&ctx, dir.path(), "t", key(), &[small_table()], &measures(1));
    let result = run(&ctx, "SELECT he_sum(v) FROM t").await.unwrap();
    let field = result[0].schema().field(0).clone();
    let crypto = ColumnMarking::from_metadata(field.metadata())
        .unwrap()
        .unwrap()
        .crypto;
    let sum = result[0].column(0).as_binary::<i64>().value(0).to_vec();
    assert_eq!(decrypt_sum(key(), &sum, &crypto, "v").unwrap(), 12);

    // A partial state claiming max_rows rows, plus one more real row: the server refuses.
    let max = crypto.spec.max_rows();
    let mut forged = sum.clone();
    forged[SUM_COUNT_AT].copy_from_slice(&max.to_le_bytes());
    let mut acc = HeSumGroupsAccumulator::new(vec![("v".into(), crypto)]);
    let state: ArrayRef = Arc::new(arrow::array::LargeBinaryArray::from_iter_values([
        forged.clone()
    ]));
    acc.merge_batch(&[state], &[0], 1).unwrap();
    assert!(
        acc.evaluate(EmitTo::All).is_ok(),
        "exactly max_rows is within budget"
    );
    let state: ArrayRef = Arc::new(arrow::array::LargeBinaryArray::from_iter_values([
        forged.clone()
    ]));
    acc.merge_batch(&[state], &[0], 1).unwrap();
    let (_, encrypted) = encrypt_batches(key(), &[small_table()], &measures(1)).unwrap();
    let cells = encrypted[0].column(2).clone();
    acc.update_batch(&[cells], &[0, 0, 0], None, 1).unwrap();
    let err = acc.evaluate(EmitTo::All).unwrap_err().to_string();
    assert!(
        err.contains("budget exceeded") && err.contains(&max.to_string()),
        "{err}"
    );

    // The client does not trust the server's check either.
    forged[SUM_COUNT_AT].copy_from_slice(&(max + 1).to_le_bytes());
    let err = decrypt_sum(key(), &forged, &crypto, "v")
        .unwrap_err()
        .to_string();
    assert!(err.contains("budget exceeded"), "{err}");
}

/// Sort keys of (group g, last slot) and (group g + 1, slot 0) are consecutive integers; they
/// must not be mistaken for one run.
#[tokio::test]
async fn runs_never_cross_from_one_group_into_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(1, 8192);
    let n = 8192;
    let groups = (0..n)
        .map(|i| match i {
            0 | 8191 => "a",
            1 | 4096 => "b",
            _ => "c",
        })
        .map(String::from)
        .collect();
    let v = (0..n).map(|i| Some(i as i128 * 31 - 7)).collect();
    register(
        &ctx,
        dir.path(),
        "t",
        key(),
        &[table(groups, v, vec![Some(1); n], 0)],
        &measures(0),
    );
    assert_eq!(assert_same(&ctx, key(), SUM_BY_G.0, SUM_BY_G.1).await, 3);
}

#[tokio::test]
async fn csv_and_parquet_files_encrypt_into_tables_that_sum_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("population.csv");
    std::fs::write(&csv, common::population::POPULATION_CSV).unwrap();
    let (schema, plain) = common::population::population().unwrap();
    let parquet = dir.path().join("population.parquet");
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&parquet).unwrap(),
        schema.clone(),
        None,
    )
    .unwrap();
    plain.iter().for_each(|b| writer.write(b).unwrap());
    writer.close().unwrap();

    let ctx = context(2, 32);
    ctx.register_table(
        "population_plain",
        Arc::new(MemTable::try_new(schema, vec![plain]).unwrap()),
    )
    .unwrap();
    let years: Vec<MeasureColumn> = common::population::YEARS
        .iter()
        .map(|y| MeasureColumn::new(*y, 1))
        .collect();
    for (name, input) in [("from_csv", &csv), ("from_parquet", &parquet)] {
        let table =
            hedf::table::files::encrypt_file(key(), input, &years, &dir.path().join(name)).unwrap();
        ctx.register_table(name, Arc::new(table)).unwrap();
        assert_same(
            &ctx,
            key(),
            &common::population::aggregation_sql(name, "AGE GROUP", "he_sum").unwrap(),
            &common::population::aggregation_sql("population_plain", "AGE GROUP", "SUM").unwrap(),
        )
        .await;
    }

    // A value with more decimals than the scale is an error naming its row and column.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "g,v\na,1.5\nb,2.25\n").unwrap();
    let err = hedf::table::files::encrypt_file(
        key(),
        &bad,
        &[MeasureColumn::new("v", 1)],
        &dir.path().join("bad"),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("column v, data row 2")
            && err.to_string().contains("more than 1 decimal"),
        "{err}"
    );
}

/// Columns of separate encryptions cannot be stored as one table: two columns on one slot
/// (same key on possibly the same mask) and a row whose cells have different masks are both
/// refused, whoever assembled the batch.
#[test]
fn columns_from_separate_encryptions_cannot_share_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let batch = small_table();
    let encrypt = || encrypt_batches(key(), std::slice::from_ref(&batch), &measures(1)).unwrap();
    let ((schema_a, a), (_, b)) = (encrypt(), encrypt());
    // g, k and v of the first encryption, then `last` as the fourth column.
    let with_last = |schema: &arrow::datatypes::SchemaRef, last: &ArrayRef| {
        let mut columns = a[0].columns()[..3].to_vec();
        columns.push(last.clone());
        RecordBatch::try_new(schema.clone(), columns).unwrap()
    };
    // v of one encryption beside w of another: distinct slots, different masks.
    let mixed = with_last(&schema_a, b[0].column(3));
    let e = EncryptedTable::create(&dir.path().join("mixed"), schema_a.clone(), &[mixed])
        .expect_err("refused")
        .to_string();
    assert!(e.contains("different encryptions"), "{e}");
    // v twice under two names: both on slot 0.
    let mut fields: Vec<_> = schema_a.fields().iter().cloned().collect();
    fields[3] = Arc::new(fields[2].as_ref().clone().with_name("v2"));
    let schema = Arc::new(arrow::datatypes::Schema::new(fields));
    let doubled = with_last(&schema, b[0].column(2));
    let e = EncryptedTable::create(&dir.path().join("doubled"), schema, &[doubled])
        .expect_err("refused")
        .to_string();
    assert!(e.contains("slot 0"), "{e}");
}
