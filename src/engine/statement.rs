//! One tenant's SQL, planned the same way for the Flight server and the local REPL: queries
//! over the tenant's own tables, and `DROP TABLE`. Nothing else runs: a plan that would write,
//! define or change anything (DML, DDL, COPY, SET, PREPARE ...) is refused wherever it sits,
//! under EXPLAIN or EXPLAIN ANALYZE, in a CTE or a subquery.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::TableReference;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::{DFParserBuilder, Statement as DfStatement};
use datafusion::sql::resolve::resolve_table_references;
use datafusion::sql::sqlparser::ast::{ObjectType, Statement};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::ParserError;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::engine::session::{tenant_context, CATALOG, SCHEMA};
use crate::error::{HedfError, Result};
use crate::server::catalog::{Tables, Tenant};

/// Queries reading fewer rows than this run in one partition.
const PARALLEL_ROWS: u64 = 1 << 17;
/// How deeply the SQL parser may nest (DataFusion's default): deeper input is an error, not a
/// stack overflow.
const PARSER_RECURSION_LIMIT: usize = 50;
/// Largest statement accepted, in bytes and in tokens (whitespace and comments aside). The
/// parser builds an operator chain (`1 + 1 + ...`) iteratively but as a tree as deep as the
/// chain is long, which later passes (and freeing it) walk recursively: a few million terms
/// would overflow any stack. A 5,000-term OR chain is about 20,000 tokens.
const MAX_SQL_BYTES: usize = 1 << 20;
const MAX_SQL_TOKENS: usize = 50_000;

/// What a SQL text asks for.
pub enum Planned {
    Query {
        ctx: Box<SessionContext>,
        plan: LogicalPlan,
        tables: Arc<Tables>,
        /// The tables it reads, by name, sorted: for audit lines.
        reads: Vec<String>,
    },
    DropTable {
        name: String,
        if_exists: bool,
    },
}

/// Parses one statement and plans it for `tenant`: a query over the tenant's tables only,
/// or `DROP TABLE`. Anything else is refused.
pub async fn plan(tenant: &Tenant, sql: &str) -> Result<Planned> {
    let statement = parse(sql)?;
    if let Some(drop) = drop_table(&statement)? {
        return Ok(drop);
    }
    if !is_query(&statement) {
        return Err(refused());
    }
    let tables = tenant.snapshot();
    let (references, _) = resolve_table_references(&statement, true)?;
    let mut read = Vec::new();
    for reference in &references {
        let name = own_table(reference)?;
        let version = tables
            .get(&name)
            .ok_or(HedfError::NoSuchTable(name.clone()))?;
        read.push((name, version.clone()));
    }
    let mut rows = 0;
    let mut providers = Vec::new();
    for (name, version) in &read {
        rows += version.rows()?;
        providers.push((name.as_str(), version.provider()?));
    }
    // Small inputs: one partition. Spreading them would only move 32 KiB-per-group partial
    // sums between partitions (measured: 51 -> 33 ms for the seed's largest aggregation).
    let partitions = if rows < PARALLEL_ROWS {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let store = tenant.store(read.iter().map(|(_, v)| v.as_ref()))?;
    let ctx = tenant_context(providers, store, partitions, tenant.memory_pool().clone())?;
    let plan = ctx.state().statement_to_plan(statement).await?;
    refuse_side_effects(&plan)?;
    let mut reads: Vec<String> = read.into_iter().map(|(name, _)| name).collect();
    reads.sort();
    reads.dedup();
    Ok(Planned::Query {
        ctx: Box::new(ctx),
        plan,
        tables,
        reads,
    })
}

/// One statement, within the size and nesting limits.
pub(crate) fn parse(sql: &str) -> Result<DfStatement> {
    check_size(sql)?;
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(&GenericDialect {})
        .with_recursion_limit(PARSER_RECURSION_LIMIT)
        .build()?
        .parse_statements()
        .map_err(|e| match e {
            DataFusionError::SQL(e, _) if matches!(*e, ParserError::RecursionLimitExceeded) => {
                HedfError::Invalid(format!(
                    "the statement nests more than {PARSER_RECURSION_LIMIT} levels deep \
                     (parentheses, subqueries); flatten it"
                ))
            }
            other => other.into(),
        })?;
    match (statements.pop_front(), statements.is_empty()) {
        (Some(statement), true) => Ok(statement),
        (None, _) => Err(HedfError::Invalid("no SQL statement".into())),
        (Some(_), false) => Err(HedfError::Invalid(
            "one statement at a time: send each statement on its own".into(),
        )),
    }
}

/// A query, or EXPLAIN (ANALYZE) of one.
pub(crate) fn is_query(statement: &DfStatement) -> bool {
    match statement {
        DfStatement::Statement(s) => matches!(s.as_ref(), Statement::Query(_)),
        DfStatement::Explain(explain) => is_query(&explain.statement),
        _ => false,
    }
}

/// Refuses statements over [`MAX_SQL_BYTES`] or [`MAX_SQL_TOKENS`] before anything builds a
/// tree of them (the tokenizer is a loop).
fn check_size(sql: &str) -> Result<()> {
    let too_long = |what: String| {
        Err(HedfError::Invalid(format!(
            "the statement is too long ({what}); split it or use IN lists and joins"
        )))
    };
    if sql.len() > MAX_SQL_BYTES {
        return too_long(format!("{} bytes, at most {MAX_SQL_BYTES}", sql.len()));
    }
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| HedfError::Invalid(format!("SQL error: {e}")))?;
    let tokens = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .count();
    if tokens > MAX_SQL_TOKENS {
        return too_long(format!("{tokens} tokens, at most {MAX_SQL_TOKENS}"));
    }
    Ok(())
}

fn drop_table(statement: &DfStatement) -> Result<Option<Planned>> {
    let DfStatement::Statement(s) = statement else {
        return Ok(None);
    };
    let Statement::Drop {
        object_type: ObjectType::Table,
        if_exists,
        names,
        ..
    } = s.as_ref()
    else {
        return Ok(None);
    };
    let [name] = names.as_slice() else {
        return Err(HedfError::Invalid("DROP TABLE takes one table".into()));
    };
    let reference = datafusion::sql::planner::object_name_to_table_reference(name.clone(), true)?;
    Ok(Some(Planned::DropTable {
        name: own_table(&reference)?,
        if_exists: *if_exists,
    }))
}

fn refused() -> HedfError {
    HedfError::Invalid(
        "only queries (SELECT, EXPLAIN) and DROP TABLE run here; tables are created by bulk \
         ingest of encrypted data"
            .into(),
    )
}

/// Refuses a plan with any node that writes, defines or changes state, at any depth: EXPLAIN
/// ANALYZE runs its input, so `EXPLAIN ANALYZE COPY ... TO '/path'` would write a file. The
/// statement check above already keeps such SQL out; this holds whatever the parser and
/// planner turn a query into.
fn refuse_side_effects(plan: &LogicalPlan) -> Result<()> {
    let mut found = None;
    plan.apply_with_subqueries(|node| {
        let what = match node {
            LogicalPlan::Dml(_) => "data changes (INSERT, UPDATE, DELETE)",
            LogicalPlan::Ddl(_) => "definitions (CREATE, DROP, ...)",
            LogicalPlan::Copy(_) => "COPY",
            LogicalPlan::Statement(_) => "session statements (SET, PREPARE, ...)",
            LogicalPlan::Extension(_) => "extension plans",
            _ => return Ok(TreeNodeRecursion::Continue),
        };
        found = Some(what);
        Ok(TreeNodeRecursion::Stop)
    })?;
    match found {
        Some(what) => Err(HedfError::Invalid(format!(
            "{what} cannot run here, not even under EXPLAIN; {}",
            refused()
        ))),
        None => Ok(()),
    }
}

/// A table reference's table name, if it points into the tenant's catalog and schema.
pub fn own_table(reference: &TableReference) -> Result<String> {
    let catalog_ok = reference.catalog().is_none_or(|c| c == CATALOG);
    let schema_ok = reference.schema().is_none_or(|s| s == SCHEMA);
    if catalog_ok && schema_ok {
        Ok(reference.table().to_string())
    } else {
        Err(HedfError::NoSuchTable(reference.to_string()))
    }
}

/// Runs one statement to completion: a query's schema and batches, or an empty result for a
/// `DROP TABLE`.
pub async fn run(tenant: &Tenant, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    match plan(tenant, sql).await? {
        Planned::Query {
            ctx, plan, tables, ..
        } => {
            let frame = ctx.execute_logical_plan(plan).await?;
            let schema = Arc::new(frame.schema().as_arrow().clone());
            let batches = frame.collect().await?;
            drop(tables); // the snapshot kept the files read until here
            Ok((schema, batches))
        }
        Planned::DropTable { name, if_exists } => {
            tenant.drop_table(&name, if_exists)?;
            Ok((Arc::new(arrow::datatypes::Schema::empty()), Vec::new()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever wraps them, plans that write or define are refused.
    #[tokio::test]
    async fn side_effects_are_found_at_any_depth() {
        let ctx = SessionContext::new();
        for sql in [
            "EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '/tmp/never.csv' STORED AS CSV",
            "EXPLAIN COPY (SELECT 1 AS x) TO '/tmp/never.csv' STORED AS CSV",
            "EXPLAIN CREATE VIEW v AS SELECT 1",
            "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
            "EXPLAIN SET datafusion.execution.target_partitions = 1",
            "EXPLAIN PREPARE p AS SELECT 1",
        ] {
            let plan = ctx.state().create_logical_plan(sql).await.unwrap();
            let e = refuse_side_effects(&plan).unwrap_err().to_string();
            assert!(e.contains("cannot run here"), "{sql}: {e}");
        }
        for sql in [
            "EXPLAIN ANALYZE SELECT 1",
            "WITH t AS (SELECT 1 AS x) SELECT * FROM t WHERE x IN (SELECT 1)",
        ] {
            let plan = ctx.state().create_logical_plan(sql).await.unwrap();
            refuse_side_effects(&plan).unwrap();
        }
        assert!(!std::path::Path::new("/tmp/never.csv").exists());
    }
}
