//! `he_sum`: SQL SUM over encrypted cells, computed without any key.
//!
//! Input: a cell column (marked `hedf.kind = cell`), or a weighted one (`x * w`, see
//! [`weight`]). Output per group: a `LargeBinary` sum (see
//! [`crate::crypto::cell`]) marked `hedf.kind = sum`, NULL when the group has no non-NULL value, exactly
//! like SQL SUM. The partial state has the same layout (a bundle for fused sums, see [`fused`]);
//! a single row's state is its tagged cells.
//! A group whose row count exceeds the column's budget is refused at evaluation.

mod accumulator;
pub mod builtin;
pub mod fused;
pub mod weight;

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{plan_err, ScalarValue};
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};

pub use accumulator::HeSumGroupsAccumulator;

use crate::crypto::cell::{ColumnKind, ColumnMarking, META_KEY_ID, META_KIND};

/// The registered name of the aggregate.
pub const HE_SUM: &str = "he_sum";

/// Ends each refusal of what only plaintext sums can answer: where such a query runs instead.
pub const IN_A_CLIENT: &str = "a hedf client (hedf sql, or hedf::cli::split::query) runs such \
     a query: the server sums, the client decrypts and finishes";

/// The `he_sum` aggregate, ready to register in a `SessionContext`.
pub fn he_sum_udaf() -> AggregateUDF {
    AggregateUDF::from(HeSum {
        signature: Signature::any(1, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct HeSum {
    signature: Signature,
}

/// The marking of he_sum's argument, or a planning error saying why it cannot be summed.
pub(crate) fn argument_marking(field: &Field) -> Result<ColumnMarking> {
    let meta = field.metadata();
    if meta.contains_key(META_KIND) && !meta.contains_key(META_KEY_ID) {
        // DataFusion drops metadata values that differ between UNION inputs.
        return plan_err!(
            "mixed keys: {} combines encrypted columns of different keys; a sum needs one key",
            field.name()
        );
    }
    match ColumnMarking::from_metadata(field.metadata())? {
        Some(marking) if marking.kind != ColumnKind::Sum => Ok(marking),
        Some(_) => plan_err!(
            "{} is already a sum: SUM and he_sum take an encrypted column; sums of sums are \
             computed on the client after decrypting",
            field.name()
        ),
        None => plan_err!(
            "he_sum({0}): {0} is a plaintext {1} column; he_sum sums encrypted columns (use SUM for plaintext)",
            field.name(),
            field.data_type()
        ),
    }
}

impl AggregateUDFImpl for HeSum {
    fn name(&self) -> &str {
        HE_SUM
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::LargeBinary)
    }

    fn return_field(&self, arg_fields: &[FieldRef]) -> Result<FieldRef> {
        // The sum keeps the column's tag, so the client can check it as it decrypts.
        let marking = argument_marking(&arg_fields[0])?.with_kind(ColumnKind::Sum);
        Ok(Arc::new(
            Field::new(HE_SUM, DataType::LargeBinary, true).with_metadata(marking.metadata()),
        ))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, "he_sum"),
            DataType::LargeBinary,
            true,
        ))])
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(SingleGroup(new_accumulator(&args)?)))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(new_accumulator(&args)?))
    }
}

fn new_accumulator(args: &AccumulatorArgs) -> Result<HeSumGroupsAccumulator> {
    let field = &args.expr_fields[0];
    let marking = argument_marking(field)?;
    let column = (field.name().clone(), marking.crypto);
    Ok(match marking.kind {
        ColumnKind::Weighted => HeSumGroupsAccumulator::weighted(column),
        _ => HeSumGroupsAccumulator::new(vec![column]),
    })
}

/// he_sum (or fused he_sums) without GROUP BY: the group accumulator with one group.
#[derive(Debug)]
struct SingleGroup(HeSumGroupsAccumulator);

fn single_value(array: ArrayRef) -> Result<ScalarValue> {
    ScalarValue::try_from_array(&array, 0)
}

impl Accumulator for SingleGroup {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.0
            .update_batch(values, &vec![0; values[0].len()], None, 1)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.0.resize(1);
        single_value(self.0.evaluate(EmitTo::All)?)
    }

    fn size(&self) -> usize {
        self.0.size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.0.resize(1);
        Ok(vec![single_value(self.0.state(EmitTo::All)?.remove(0))?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.0.merge_batch(states, &vec![0; states[0].len()], 1)
    }
}
