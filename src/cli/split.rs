//! Plain SQL in a hedf client: the server runs what it can on ciphertext (sums and counts by
//! group), the client decrypts and finishes the rest (AVG, ORDER BY, HAVING and arithmetic on
//! sums, window functions over them, CTEs and subqueries over aggregated results).
//!
//! A statement the server can run as written (its ciphertext guard accepts it, checked here on
//! the tables' schemas) goes as written. Otherwise the client plans it on the tables' plaintext
//! schemas (an encrypted column reads as `DECIMAL(18, scale)`, the widest a measure can be) and
//! cuts the plan at each lowest aggregation. That node goes to the server as SQL (DataFusion's
//! unparser), with `SUM(x)` and `COUNT(x)` for each sum or average of an encrypted column `x`,
//! and becomes a scan of the decrypted answer in the client's plan, which DataFusion runs here.
//! A plan that reads a table's rows outside an aggregation is refused rather than answered by
//! downloading them: the split only ever fetches aggregated rows. (The key's owner may still
//! fetch cells on purpose, `SELECT v FROM t`, which the server runs as written.)

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Decimal128Array, RecordBatch, StringArray};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Decimal128Type, Field, Int64Type, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{plan_err, Column};
use datafusion::datasource::empty::EmptyTable;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{provider_as_source, TableProvider, TableType};
use datafusion::error::Result as DfResult;
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::unparser::plan_to_sql;

use crate::cli::connection::Connection;
use crate::crypto::cell::ColumnMarking;
use crate::crypto::client::decrypt_batch;
use crate::crypto::encoding::MAX_PRECISION;
use crate::crypto::keys::ClientKey;
use crate::engine::{session, statement};
use crate::error::{HedfError, Result};

/// Field metadata of the client's plaintext view marking a column the server holds encrypted.
const ENCRYPTED: &str = "hedf.client.encrypted";

/// Runs `sql` over `connection`: on the server as written when the server can, otherwise
/// split between the server and this client. Results of a split are decrypted; those of a
/// statement run as written are what the server sent (ciphertext sums and cells included).
pub async fn query(
    mut connection: Connection,
    key: Arc<ClientKey>,
    sql: String,
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let statement = statement::parse(&sql)?;
    let (explain, query) = match &statement {
        DfStatement::Explain(e) => (true, e.statement.as_ref().clone()),
        other => (false, other.clone()),
    };
    if !statement::is_query(&query) {
        return connection.query(&sql).await;
    }
    let tables = connection.tables().await?;
    if server_plan(&tables, query.clone()).await.is_ok() {
        return connection.query(&sql).await;
    }
    let ctx = plain_context(&tables)?;
    // A statement that does not plan on plaintext either (a typo, an unknown table) gets the
    // server's own answer.
    let Ok(plan) = ctx.state().statement_to_plan(query).await else {
        return connection.query(&sql).await;
    };
    let mut cut = Cut {
        connection,
        key,
        server_sql: Vec::new(),
    };
    let plan = cut.plan(plan)?;
    if explain {
        return Ok(explanation(&cut.server_sql, &plan));
    }
    let frame = ctx.execute_logical_plan(plan).await?;
    let schema = Arc::new(frame.schema().as_arrow().clone());
    Ok((schema, frame.collect().await?))
}

/// Plans `query` as the server would (its guard included) on the tables' real schemas.
async fn server_plan(tables: &[(String, SchemaRef)], query: DfStatement) -> Result<()> {
    let ctx = session::new_context();
    for (name, schema) in tables {
        ctx.register_table(name, Arc::new(EmptyTable::new(schema.clone())))?;
    }
    let state = ctx.state();
    state.optimize(&state.statement_to_plan(query).await?)?;
    Ok(())
}

/// A session over the tables' plaintext view, in which `he_sum` is `SUM`.
fn plain_context(tables: &[(String, SchemaRef)]) -> Result<SessionContext> {
    let ctx = SessionContext::new();
    ctx.register_udaf(sum_udaf().as_ref().clone().with_aliases(["he_sum"]));
    for (name, schema) in tables {
        let table = EmptyTable::new(plaintext_view(schema)?);
        ctx.register_table(name, Arc::new(table))?;
    }
    Ok(ctx)
}

/// `schema` with each encrypted column as the decimal it encrypts.
fn plaintext_view(schema: &Schema) -> Result<SchemaRef> {
    let fields = schema
        .fields()
        .iter()
        .map(|field| {
            Ok(match ColumnMarking::from_metadata(field.metadata())? {
                Some(marking) => Field::new(
                    field.name(),
                    DataType::Decimal128(MAX_PRECISION, marking.crypto.spec.scale),
                    true,
                )
                .with_metadata([(ENCRYPTED.to_string(), String::new())].into()),
                None => field.as_ref().clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(Schema::new(fields)))
}

/// Rewrites a client plan so that each lowest aggregation runs on the server.
struct Cut {
    connection: Connection,
    key: Arc<ClientKey>,
    /// What each server part sends, in the order the plan was cut.
    server_sql: Vec<String>,
}

impl Cut {
    fn plan(&mut self, plan: LogicalPlan) -> Result<LogicalPlan> {
        let plan = plan.transform_down_with_subqueries(|node| match node {
            LogicalPlan::Aggregate(aggregate) if is_lowest(&aggregate)? => {
                let scan = self.server_part(aggregate)?;
                Ok(Transformed::new(scan, true, TreeNodeRecursion::Jump))
            }
            LogicalPlan::TableScan(scan) => plan_err!(
                "this query reads the rows of {} outside an aggregation; a hedf client leaves \
                 only aggregations (SUM, AVG, COUNT by group) to the server and does not \
                 download a table's rows to finish a query: aggregate {0} in that part of the \
                 query, or query its rows on their own",
                scan.table_name
            ),
            other => Ok(Transformed::no(other)),
        })?;
        Ok(plan.data)
    }

    /// The server's half of `aggregate`: its groups with a SUM and COUNT for each sum or
    /// average of an encrypted column and every other aggregate as it is, each output named
    /// by position; then a scan of the decrypted, finished answer under the node's own names.
    fn server_part(&mut self, aggregate: Aggregate) -> DfResult<LogicalPlan> {
        if has_outer_reference(&LogicalPlan::Aggregate(aggregate.clone()))? {
            return plan_err!(
                "a correlated subquery over an aggregation is not split between server and \
                 client yet; aggregate in a CTE and join it instead"
            );
        }
        if aggregate
            .group_expr
            .iter()
            .any(|e| matches!(e, Expr::GroupingSet(_)))
        {
            return plan_err!(
                "GROUPING SETS, ROLLUP and CUBE are not split between server and client yet; \
                 write one GROUP BY per grouping"
            );
        }
        let input = aggregate.input.schema().clone();
        let groups = aggregate.group_expr.len();
        // Each aggregate the server computes, once: AVG(x) next to SUM(x) or COUNT(x) shares
        // their columns (an aggregation cannot name one output twice).
        let mut server: Vec<Expr> = Vec::new();
        let mut position = |e: Expr| {
            groups
                + server.iter().position(|s| *s == e).unwrap_or_else(|| {
                    server.push(e);
                    server.len() - 1
                })
        };
        let mut finish = Vec::new();
        for e in &aggregate.aggr_expr {
            let e = e.clone().unalias_nested().data;
            let total = match &e {
                Expr::AggregateFunction(f)
                    if matches!(f.func.name(), "sum" | "avg")
                        && !f.params.distinct
                        && f.params.order_by.is_empty()
                        && matches!(f.params.args.as_slice(), [arg]
                            if arg.column_refs().into_iter().any(|c| input
                                .qualified_field_from_column(c)
                                .is_ok_and(|(_, f)| f.metadata().contains_key(ENCRYPTED)))) =>
                {
                    Some(f.clone())
                }
                _ => None,
            };
            finish.push(match total {
                Some(f) => {
                    let [sum, count] = [sum_udaf(), count_udaf()].map(|func| {
                        position(Expr::AggregateFunction(AggregateFunction::new_udf(
                            func,
                            f.params.args.clone(),
                            false,
                            f.params.filter.clone(),
                            Vec::new(),
                            None,
                        )))
                    });
                    if f.func.name() == "avg" {
                        Finish::Average { sum, count }
                    } else {
                        Finish::Sum { sum, count }
                    }
                }
                None => Finish::AsSent(position(e)),
            });
        }
        let sent = Aggregate::try_new(aggregate.input.clone(), aggregate.group_expr, server)?;
        let sent = LogicalPlan::Aggregate(sent);
        let positional: Vec<Expr> = sent
            .schema()
            .columns()
            .into_iter()
            .enumerate()
            .map(|(i, c)| Expr::Column(c).alias(format!("c{i}")))
            .collect();
        let sent = LogicalPlanBuilder::from(sent)
            .project(positional)?
            .build()?;
        let sql = plan_to_sql(&sent)?.to_string();

        let output = aggregate.schema;
        let part = ServerPart {
            sql: sql.clone(),
            schema: Arc::new(Schema::new(
                output
                    .fields()
                    .iter()
                    .enumerate()
                    .map(|(i, f)| f.as_ref().clone().with_name(format!("c{i}")))
                    .collect::<Vec<_>>(),
            )),
            groups,
            finish,
            connection: self.connection.clone(),
            key: self.key.clone(),
        };
        let name = format!("server_part_{}", self.server_sql.len() + 1);
        self.server_sql.push(sql);
        let named = output.iter().enumerate().map(|(i, (qualifier, field))| {
            Expr::Column(Column::new(Some(name.clone()), format!("c{i}")))
                .alias_qualified(qualifier.cloned(), field.name())
        });
        LogicalPlanBuilder::scan(name.clone(), provider_as_source(Arc::new(part)), None)?
            .project(named)?
            .build()
    }
}

/// An aggregation with no other below it, in its input or in a subquery there.
fn is_lowest(aggregate: &Aggregate) -> DfResult<bool> {
    let mut lowest = true;
    aggregate.input.apply_with_subqueries(|node| {
        lowest = !matches!(node, LogicalPlan::Aggregate(_));
        Ok(if lowest {
            TreeNodeRecursion::Continue
        } else {
            TreeNodeRecursion::Stop
        })
    })?;
    Ok(lowest)
}

/// Whether `plan` refers to a column of an enclosing query, which SQL sent on its own cannot.
fn has_outer_reference(plan: &LogicalPlan) -> DfResult<bool> {
    let mut found = false;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            found = e.exists(|x| Ok(matches!(x, Expr::OuterReferenceColumn(..))))?;
            Ok(if found {
                TreeNodeRecursion::Stop
            } else {
                TreeNodeRecursion::Continue
            })
        })
    })?;
    Ok(found)
}

/// How the client turns the server's columns (by position) into one aggregate's values.
#[derive(Clone, Copy, Debug)]
enum Finish {
    /// The server's column, as it is.
    AsSent(usize),
    /// The decrypted sum, NULL where the count of values is 0.
    Sum { sum: usize, count: usize },
    /// The decrypted sum over the count, as DataFusion's AVG of a decimal computes it: scaled
    /// to the result's scale, then divided, truncating.
    Average { sum: usize, count: usize },
}

/// One aggregation the server runs, as a table of its decrypted, finished answer.
struct ServerPart {
    sql: String,
    /// The aggregation's output (types, nullability), its columns named by position.
    schema: SchemaRef,
    groups: usize,
    finish: Vec<Finish>,
    connection: Connection,
    key: Arc<ClientKey>,
}

impl fmt::Debug for ServerPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerPart")
            .field("sql", &self.sql)
            .finish()
    }
}

impl ServerPart {
    fn finish(&self, sent: &RecordBatch) -> Result<RecordBatch> {
        let plain = decrypt_batch(&self.key, sent)?;
        let target = |i: usize| self.schema.field(i).data_type();
        let mut columns: Vec<ArrayRef> = (0..self.groups)
            .map(|i| exact_cast(plain.column(i), target(i)))
            .collect::<Result<_>>()?;
        for (j, finish) in self.finish.iter().enumerate() {
            let to = target(self.groups + j);
            columns.push(match *finish {
                Finish::AsSent(i) => exact_cast(plain.column(i), to)?,
                Finish::Sum { sum, count } => {
                    let (sums, counts) = sums_and_counts(&plain, sum, count)?;
                    let sums: Decimal128Array = sums
                        .iter()
                        .zip(counts.iter())
                        .map(|(s, n)| s.filter(|_| *n > 0))
                        .collect();
                    let scale = sent_scale(&plain, sum)?;
                    exact_cast(
                        &(Arc::new(sums.with_precision_and_scale(38, scale)?) as _),
                        to,
                    )?
                }
                Finish::Average { sum, count } => Arc::new(average(&plain, sum, count, to)?),
            });
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

fn sums_and_counts(
    plain: &RecordBatch,
    sum: usize,
    count: usize,
) -> Result<(&Decimal128Array, Vec<i64>)> {
    let sums = plain
        .column(sum)
        .as_primitive_opt::<Decimal128Type>()
        .ok_or_else(|| HedfError::internal("the server's sum is not a decrypted decimal"))?;
    let counts = plain
        .column(count)
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(|| HedfError::internal("the server's count is not an Int64"))?;
    Ok((sums, counts.iter().map(|n| n.unwrap_or(0)).collect()))
}

fn sent_scale(plain: &RecordBatch, i: usize) -> Result<i8> {
    match plain.column(i).data_type() {
        DataType::Decimal128(_, scale) => Ok(*scale),
        other => Err(HedfError::internal(format!(
            "the server's sum decrypted to {other}"
        ))),
    }
}

/// AVG as DataFusion computes it for `DECIMAL(p, s)`: `sum * 10^(s' - s) / count` in
/// `DECIMAL(p', s')`, truncating toward zero; NULL for no values.
fn average(
    plain: &RecordBatch,
    sum: usize,
    count: usize,
    to: &DataType,
) -> Result<Decimal128Array> {
    let DataType::Decimal128(precision, scale) = *to else {
        return Err(HedfError::internal(format!("AVG of a decimal typed {to}")));
    };
    let (sums, counts) = sums_and_counts(plain, sum, count)?;
    let shift = 10i128.pow((scale - sent_scale(plain, sum)?) as u32);
    let values = sums
        .iter()
        .zip(counts)
        .map(|(sum, n)| match sum {
            Some(sum) if n > 0 => sum
                .checked_mul(shift)
                .map(|scaled| Some(scaled / n as i128))
                .ok_or_else(|| HedfError::Invalid("AVG overflows DECIMAL(38)".into())),
            _ => Ok(None),
        })
        .collect::<Result<Decimal128Array>>()?
        .with_precision_and_scale(precision, scale)?;
    values.validate_decimal_precision(precision)?;
    Ok(values)
}

/// `array` as `to`, an error (never a wrapped or truncated value) where it does not fit.
fn exact_cast(array: &ArrayRef, to: &DataType) -> Result<ArrayRef> {
    let options = CastOptions {
        safe: false,
        ..Default::default()
    };
    Ok(cast_with_options(array, to, &options)?)
}

#[async_trait]
impl TableProvider for ServerPart {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let (_, sent) = self.connection.query(&self.sql).await?;
        let finished = sent
            .iter()
            .map(|batch| self.finish(batch))
            .collect::<Result<Vec<_>>>()?;
        Ok(MemorySourceConfig::try_new_exec(
            &[finished],
            self.schema.clone(),
            projection.cloned(),
        )?)
    }
}

/// EXPLAIN of a split statement: the SQL each server part sends, then the client's plan.
fn explanation(server_sql: &[String], plan: &LogicalPlan) -> (SchemaRef, Vec<RecordBatch>) {
    let (parts, plans): (Vec<String>, Vec<String>) = server_sql
        .iter()
        .enumerate()
        .map(|(i, sql)| (format!("server_part_{} (server)", i + 1), sql.clone()))
        .chain([("client".to_string(), plan.display_indent().to_string())])
        .unzip();
    let schema = Arc::new(Schema::new(vec![
        Field::new("plan_type", DataType::Utf8, false),
        Field::new("plan", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(parts)),
            Arc::new(StringArray::from(plans)),
        ],
    )
    .expect("two string columns of equal length");
    (schema, vec![batch])
}
