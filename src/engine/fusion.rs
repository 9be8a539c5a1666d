//! Fuses the he_sums of one aggregation that read the same rows into one accumulator, so each
//! row's common mask is added once for all of them instead of once per measure.
//!
//! `SELECT g, SUM(a), he_sum(b), SUM(c) FILTER (WHERE p), SUM(d) FILTER (WHERE p) ... GROUP BY g`
//! plans as `Projection(g, he_sum_part(__hedf_fused_0, 0) AS "sum(a)", ...)` over
//! `Aggregate(g; he_sum_fused(a, b) AS __hedf_fused_0,
//! he_sum_fused(c, d) FILTER (WHERE p) AS __hedf_fused_1)`: one fused call per distinct FILTER
//! with two or more encrypted sums (at most [`MAX_BUNDLE_PARTS`] each). A volatile FILTER is
//! evaluated once per call, so its sums are left alone. The projection gives back every original
//! column with its name and marking, so nothing above notices. See [`crate::udaf::fused`].

use std::sync::Arc;

use datafusion::common::tree_node::Transformed;
use datafusion::common::Column;
use datafusion::error::Result;
use datafusion::logical_expr::expr::{AggregateFunction, ScalarFunction};
use datafusion::logical_expr::ExprSchemable;
use datafusion::logical_expr::{
    lit, Aggregate, AggregateUDF, Expr, LogicalPlan, Projection, ScalarUDF,
};
use datafusion::optimizer::optimizer::ApplyOrder;
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

use crate::crypto::cell::{ColumnKind, MAX_BUNDLE_PARTS};
use crate::udaf::fused::{he_sum_fused_udaf, he_sum_part_udf};
use crate::udaf::{argument_marking, HE_SUM};

/// The optimizer rule (see the module comment).
#[derive(Debug)]
pub struct FuseHeSums {
    fused: Arc<AggregateUDF>,
    part: Arc<ScalarUDF>,
}

impl Default for FuseHeSums {
    fn default() -> Self {
        FuseHeSums {
            fused: Arc::new(he_sum_fused_udaf()),
            part: Arc::new(he_sum_part_udf()),
        }
    }
}

/// The FILTER of an aggregate call that sums one encrypted column (he_sum, or SUM of an
/// encrypted column), `Some(filter)`; `None` for any other call.
fn encrypted_sum(expr: &Expr, aggregate: &Aggregate) -> Option<Option<Box<Expr>>> {
    let Expr::AggregateFunction(AggregateFunction { func, params }) = unaliased(expr) else {
        return None;
    };
    let plain = params.distinct
        || params.filter.as_ref().is_some_and(|f| f.is_volatile())
        || !params.order_by.is_empty()
        || params.null_treatment.is_some()
        || params.args.len() != 1
        || !matches!(func.name(), HE_SUM | "sum");
    if plain {
        return None;
    }
    let (_, field) = params.args[0].to_field(aggregate.input.schema()).ok()?;
    let marking = argument_marking(&field).ok()?;
    (marking.kind == ColumnKind::Cell).then(|| params.filter.clone())
}

/// The expression under any aliases.
fn unaliased(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(alias) => unaliased(&alias.expr),
        other => other,
    }
}

impl OptimizerRule for FuseHeSums {
    fn name(&self) -> &str {
        "hedf_fuse_he_sums"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Aggregate(aggregate) = &plan else {
            return Ok(Transformed::no(plan));
        };
        if aggregate
            .group_expr
            .iter()
            .any(|e| matches!(e, Expr::GroupingSet(_)))
        {
            return Ok(Transformed::no(plan));
        }
        // Calls to fuse, by FILTER: (filter, indices into aggr_expr).
        let mut fusions: Vec<(Option<Box<Expr>>, Vec<usize>)> = Vec::new();
        for (i, expr) in aggregate.aggr_expr.iter().enumerate() {
            let Some(filter) = encrypted_sum(expr, aggregate) else {
                continue;
            };
            match fusions.iter_mut().find(|(f, _)| *f == filter) {
                Some((_, calls)) => calls.push(i),
                None => fusions.push((filter, vec![i])),
            }
        }
        let fusions: Vec<(Option<Box<Expr>>, Vec<usize>)> = fusions
            .into_iter()
            .flat_map(|(filter, calls)| {
                calls
                    .chunks(MAX_BUNDLE_PARTS)
                    .filter(|chunk| chunk.len() > 1)
                    .map(|chunk| (filter.clone(), chunk.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect();
        if fusions.is_empty() {
            return Ok(Transformed::no(plan));
        }
        // Where each original call's sum now comes from: (fused call, part).
        let mut source = vec![None; aggregate.aggr_expr.len()];
        let mut aggr_expr: Vec<Expr> = aggregate
            .aggr_expr
            .iter()
            .enumerate()
            .filter(|(i, _)| !fusions.iter().any(|(_, calls)| calls.contains(i)))
            .map(|(_, e)| e.clone())
            .collect();
        let mut bundles = Vec::with_capacity(fusions.len());
        for (n, (filter, calls)) in fusions.into_iter().enumerate() {
            let args = calls
                .iter()
                .enumerate()
                .map(|(part, &i)| {
                    source[i] = Some((n, part));
                    let Expr::AggregateFunction(call) = unaliased(&aggregate.aggr_expr[i]) else {
                        unreachable!("encrypted_sum accepted only aggregate calls");
                    };
                    call.params.args[0].clone()
                })
                .collect();
            let name = format!("__hedf_fused_{n}");
            aggr_expr.push(
                Expr::AggregateFunction(AggregateFunction::new_udf(
                    self.fused.clone(),
                    args,
                    false,
                    filter,
                    vec![],
                    None,
                ))
                .alias(&name),
            );
            bundles.push(name);
        }
        let fused = Aggregate::try_new(
            aggregate.input.clone(),
            aggregate.group_expr.clone(),
            aggr_expr,
        )?;
        let groups = aggregate.schema.fields().len() - aggregate.aggr_expr.len();
        let columns = aggregate
            .schema
            .iter()
            .enumerate()
            .map(|(i, (qualifier, field))| {
                let original = Expr::Column(Column::from((qualifier, field)));
                match i.checked_sub(groups).and_then(|a| source[a]) {
                    None => original,
                    Some((n, part)) => Expr::ScalarFunction(ScalarFunction::new_udf(
                        self.part.clone(),
                        vec![
                            Expr::Column(Column::from_name(&bundles[n])),
                            lit(part as i64),
                        ],
                    ))
                    .alias_qualified(qualifier.cloned(), field.name()),
                }
            })
            .collect();
        let projection = Projection::try_new(columns, Arc::new(LogicalPlan::Aggregate(fused)))?;
        Ok(Transformed::yes(LogicalPlan::Projection(projection)))
    }
}
