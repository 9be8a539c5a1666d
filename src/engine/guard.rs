//! Refuses plans which would treat ciphertexts as plaintext.
//!
//! DataFusion would happily compare, sort, group, hash or compute on the cell and sum bytes and
//! return meaningless answers. An encrypted column may only be selected as it is, summed
//! (`SUM`/`he_sum`) or counted; anything else is a planning error that says so. Two checks:
//! [`CiphertextGuard`], an analyzer rule over the whole plan, and [`OperatorGuard`], which sees
//! operators (`SUM(x) > 10`, `x - y`) as the SQL planner builds them, before DataFusion's type
//! coercion fails on binary operands with a message about types. The one operator allowed is
//! `x * w` with `w` plaintext, which [`OperatorGuard`] plans as `he_weight(x, w)` for `SUM` to
//! sum (see [`crate::udaf::weight`]).

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{plan_err, Column, DFSchema};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::logical_expr::expr::{AggregateFunction, ScalarFunction};
use datafusion::logical_expr::planner::{ExprPlanner, PlannerResult, RawBinaryExpr};
use datafusion::logical_expr::{Distinct, Expr, LogicalPlan, ScalarUDF};
use datafusion::optimizer::AnalyzerRule;
use datafusion::scalar::ScalarValue;
use datafusion::sql::sqlparser::ast::BinaryOperator;

use crate::crypto::cell::{KIND_CELL, KIND_SUM, MAX_WEIGHT_SCALE, META_KIND};
use crate::crypto::encoding::parse_decimal;
use crate::udaf::weight::{he_weight_udf, HE_WEIGHT};
use crate::udaf::{HE_SUM, IN_A_CLIENT};

#[derive(Debug, Default)]
pub struct CiphertextGuard;

impl AnalyzerRule for CiphertextGuard {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.apply_with_subqueries(|node| {
            check_node(node)?;
            Ok(TreeNodeRecursion::Continue)
        })?;
        Ok(plan)
    }

    fn name(&self) -> &str {
        "hedf_ciphertext_guard"
    }
}

/// Plans `x * w` (an encrypted column times a plaintext number) as `he_weight(x, w)`, and
/// refuses any other binary operator with an encrypted operand: a column, a weighted column or
/// a sum.
#[derive(Debug)]
pub struct OperatorGuard {
    weight: Arc<ScalarUDF>,
}

impl Default for OperatorGuard {
    fn default() -> Self {
        OperatorGuard {
            weight: Arc::new(he_weight_udf()),
        }
    }
}

impl OperatorGuard {
    /// `x * w` as a weighting, when `x` is an encrypted column or already weighted (then
    /// `he_weight` multiplies the weights, checked) and `w` is plaintext.
    fn weighted(&self, x: &Expr, w: &Expr, schema: &DFSchema) -> Option<Expr> {
        if is_encrypted_operand(w, schema) {
            return None;
        }
        let cells = match x {
            Expr::ScalarFunction(f) => f.func.name() == HE_WEIGHT,
            Expr::Column(c) => schema
                .qualified_field_from_column(c)
                .is_ok_and(|(_, f)| f.metadata().get(META_KIND).is_some_and(|k| k == KIND_CELL)),
            _ => false,
        };
        cells.then(|| {
            Expr::ScalarFunction(ScalarFunction::new_udf(
                self.weight.clone(),
                vec![x.clone(), exact_literal(w)],
            ))
        })
    }
}

/// A float constant as the decimal it was written as (`0.05` is DataFusion's Float64, which
/// cannot weight a ciphertext exactly); anything else as it is.
fn exact_literal(e: &Expr) -> Expr {
    if let Expr::Literal(ScalarValue::Float64(Some(v)), _) = e {
        let text = v.to_string();
        let scale = text.split_once('.').map_or(0, |(_, f)| f.len());
        if scale <= MAX_WEIGHT_SCALE as usize {
            if let Ok(unscaled) = parse_decimal(&text, scale as i8) {
                return Expr::Literal(
                    ScalarValue::Decimal128(Some(unscaled as i128), 38, scale as i8),
                    None,
                );
            }
        }
    }
    e.clone()
}

impl ExprPlanner for OperatorGuard {
    fn plan_binary_op(
        &self,
        expr: RawBinaryExpr,
        schema: &DFSchema,
    ) -> Result<PlannerResult<RawBinaryExpr>> {
        if expr.op == BinaryOperator::Multiply {
            let weighted = self
                .weighted(&expr.left, &expr.right, schema)
                .or_else(|| self.weighted(&expr.right, &expr.left, schema));
            if let Some(weighted) = weighted {
                return Ok(PlannerResult::Planned(weighted));
            }
        }
        let encrypted = [&expr.left, &expr.right]
            .into_iter()
            .find(|e| is_encrypted_operand(e, schema));
        match encrypted {
            Some(operand) => {
                let (name, sum) = match operand {
                    Expr::Column(c) => (
                        c.name.clone(),
                        schema.qualified_field_from_column(c).is_ok_and(|(_, f)| {
                            f.metadata().get(META_KIND).is_some_and(|k| k == KIND_SUM)
                        }),
                    ),
                    weighted @ Expr::ScalarFunction(_) => match weighted_column(weighted) {
                        Some((Expr::Column(c), _)) => (c.name.clone(), false),
                        _ => (weighted.schema_name().to_string(), false),
                    },
                    other => (other.schema_name().to_string(), true),
                };
                let hint = client_hint(sum);
                plan_err!(
                    "{name} is encrypted: `{}` needs its plaintext, which only the key's owner \
                     has; on the server an encrypted column can only be selected, summed (SUM) \
                     or counted, and computing on the sums happens after the client decrypts \
                     them{hint}",
                    expr.op
                )
            }
            None => Ok(PlannerResult::Original(expr)),
        }
    }
}

/// An encrypted column or a sum of one. Decided without typing the operand: the planner asks
/// for every operator of an expression, and typing a deep operand each time would cost the
/// square of its depth (a 5,000-term chain). Nested operators were checked as they were built;
/// other wrappers around a ciphertext fail in type checking or in [`CiphertextGuard`].
fn is_encrypted_operand(e: &Expr, schema: &DFSchema) -> bool {
    let encrypted_column = |e: &Expr| match e {
        Expr::Column(c) => schema
            .qualified_field_from_column(c)
            .is_ok_and(|(_, f)| f.metadata().contains_key(META_KIND)),
        _ => false,
    };
    let weighted = |e: &Expr| matches!(e, Expr::ScalarFunction(f) if f.func.name() == HE_WEIGHT);
    match e {
        Expr::AggregateFunction(f) => {
            // Only sums of ciphertext are ciphertext; COUNT(enc) is a plaintext count.
            matches!(f.func.name(), "sum" | HE_SUM)
                && f.params
                    .args
                    .iter()
                    .any(|a| encrypted_column(a) || weighted(a))
        }
        other => encrypted_column(other) || weighted(other),
    }
}

/// The encrypted columns of `schemas`, each with whether it holds sums (which a client can
/// finish on) rather than cells (which only a download could use row by row).
fn encrypted_columns(schemas: &[&DFSchema]) -> HashMap<Column, bool> {
    schemas
        .iter()
        .flat_map(|s| s.iter())
        .filter_map(|(qualifier, field)| {
            let kind = field.metadata().get(META_KIND)?;
            Some((
                Column::new(qualifier.cloned(), field.name()),
                kind == KIND_SUM,
            ))
        })
        .collect()
}

fn check_node(node: &LogicalPlan) -> Result<()> {
    refuse_encrypted_subqueries(node)?;
    let inputs: Vec<&DFSchema> = node.inputs().iter().map(|p| p.schema().as_ref()).collect();
    let encrypted = encrypted_columns(&inputs);
    if encrypted.is_empty() {
        return Ok(());
    }
    match node {
        LogicalPlan::Projection(p) => p
            .expr
            .iter()
            .filter(|e| !is_bare_column(e))
            .try_for_each(|e| refuse_use(e, &encrypted, "computed on")),
        LogicalPlan::Aggregate(a) => {
            a.group_expr
                .iter()
                .try_for_each(|e| refuse_use(e, &encrypted, "grouped by"))?;
            for e in &a.aggr_expr {
                if let Expr::AggregateFunction(f) = e.clone().unalias_nested().data {
                    if let Some(filter) = &f.params.filter {
                        refuse_use(filter, &encrypted, "compared in a FILTER clause")?;
                    }
                    for (_, weights) in f.params.args.iter().filter_map(weighted_column) {
                        for weight in weights {
                            refuse_use(weight, &encrypted, "used as a weight")?;
                        }
                    }
                }
                if !is_allowed_aggregate(e) {
                    refuse_use(e, &encrypted, "aggregated with")?;
                }
            }
            Ok(())
        }
        LogicalPlan::Union(u) => {
            // The output keeps one marking per column: inputs whose markings differ (sums of
            // different weights, say) would be decrypted under the wrong one.
            let first = u.inputs[0].schema();
            for (i, field) in first.fields().iter().enumerate() {
                let differs = u.inputs.iter().any(|input| {
                    let other = input.schema().field(i);
                    (field.metadata().contains_key(META_KIND)
                        || other.metadata().contains_key(META_KIND))
                        && other.metadata() != field.metadata()
                });
                if differs {
                    return plan_err!(
                        "{} is encrypted, and differently in the inputs of this UNION (other \
                         keys, columns or weights); a column of a UNION must be encrypted \
                         alike in every input",
                        field.name()
                    );
                }
            }
            Ok(())
        }
        LogicalPlan::Distinct(Distinct::All(_)) => match encrypted.keys().next() {
            Some(col) => plan_err!(
                "{} is encrypted: DISTINCT would compare ciphertexts",
                col.name
            ),
            None => Ok(()),
        },
        LogicalPlan::Sort(_) => node
            .expressions()
            .iter()
            .try_for_each(|e| refuse_use(e, &encrypted, "ordered by")),
        LogicalPlan::Filter(_) => node
            .expressions()
            .iter()
            .try_for_each(|e| refuse_use(e, &encrypted, "compared in a filter")),
        LogicalPlan::Join(_) => node
            .expressions()
            .iter()
            .try_for_each(|e| refuse_use(e, &encrypted, "joined on")),
        _ => node
            .expressions()
            .iter()
            .try_for_each(|e| refuse_use(e, &encrypted, "used in")),
    }
}

/// A subquery's encrypted output may be selected as it is (a scalar subquery projected bare),
/// never compared: `x IN (SELECT enc ...)` or `(SELECT enc ...) = y` would compare ciphertext.
fn refuse_encrypted_subqueries(node: &LogicalPlan) -> Result<()> {
    let bare = |e: &Expr| {
        matches!(node, LogicalPlan::Projection(_))
            && matches!(e.clone().unalias_nested().data, Expr::ScalarSubquery(_))
    };
    for e in node.expressions() {
        let mut refused = None;
        e.apply(|x| {
            let output = match x {
                Expr::InSubquery(s) => Some(s.subquery.subquery.schema()),
                Expr::ScalarSubquery(s) if !bare(&e) => Some(s.subquery.schema()),
                _ => None,
            };
            if let Some(field) = output.and_then(|schema| {
                schema
                    .fields()
                    .iter()
                    .find(|f| f.metadata().contains_key(META_KIND))
            }) {
                refused = Some(field.name().clone());
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        if let Some(name) = refused {
            return plan_err!(
                "{name} is encrypted and cannot be compared as a subquery's result on the \
                 server; encrypted columns can only be selected, summed (SUM) or counted"
            );
        }
    }
    Ok(())
}

fn is_bare_column(e: &Expr) -> bool {
    matches!(e.clone().unalias_nested().data, Expr::Column(_))
}

/// he_sum(col), SUM(col) or COUNT(col), without DISTINCT or ORDER BY (both compare values).
fn is_allowed_aggregate(e: &Expr) -> bool {
    match e.clone().unalias_nested().data {
        Expr::AggregateFunction(AggregateFunction { func, params }) => {
            let name = func.name();
            // SUM of an encrypted column is he_sum (see `udaf::builtin`).
            (name == HE_SUM || name == "sum" || name == "count")
                && !params.distinct
                && params.order_by.is_empty()
                && params.args.iter().all(|a| {
                    is_bare_column(a)
                        || matches!(a, Expr::Literal(..))
                        || weighted_column(a).is_some_and(|(x, _)| is_bare_column(x))
                })
        }
        _ => false,
    }
}

/// The column and weights of a weighting `he_weight(... he_weight(x, w1) ..., wn)`.
fn weighted_column(e: &Expr) -> Option<(&Expr, Vec<&Expr>)> {
    match e {
        Expr::ScalarFunction(f) if f.func.name() == HE_WEIGHT => {
            let (column, mut weights) =
                weighted_column(&f.args[0]).unwrap_or((&f.args[0], Vec::new()));
            weights.push(&f.args[1]);
            Some((column, weights))
        }
        _ => None,
    }
}

fn refuse_use(e: &Expr, encrypted: &HashMap<Column, bool>, how: &str) -> Result<()> {
    let Some((col, sum)) = e
        .column_refs()
        .into_iter()
        .find_map(|c| encrypted.get_key_value(c))
    else {
        return Ok(());
    };
    let hint = client_hint(*sum);
    plan_err!(
        "{} is encrypted and cannot be {how} on the server; encrypted columns can only be \
         selected, summed (SUM) or counted{hint}",
        col.name
    )
}

/// Where a refused use of a sum can run instead; nothing for a cell, which a client would have
/// to download row by row.
fn client_hint(sum: bool) -> String {
    if sum {
        format!("; {IN_A_CLIENT}")
    } else {
        String::new()
    }
}
