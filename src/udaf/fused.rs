//! Fused he_sums: several `he_sum` calls of one aggregation, over the same rows (same FILTER),
//! summed by one accumulator that adds each row's common mask once for all of them.
//!
//! The engine's optimizer rule ([`crate::engine::fusion`]) rewrites
//! `he_sum(a), he_sum(b), ...` into one `he_sum_fused(a, b, ...)`, whose value per group is a
//! bundle (see [`crate::crypto::cell`]), and a projection of `he_sum_part(bundle, i)` for each
//! original call: exactly the sum `he_sum` would have returned, with the same name and field
//! metadata. Neither function is registered under its name: SQL cannot call them, only the
//! rule builds them.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, LargeBinaryBuilder};
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{exec_err, internal_err, ScalarValue};
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, GroupsAccumulator, ReturnFieldArgs,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use super::{argument_marking, HeSumGroupsAccumulator, SingleGroup};
use crate::crypto::cell::{write_sum_on, BundleRef, ColumnCrypto, ColumnKind, MAX_BUNDLE_PARTS};
use crate::crypto::mask_sum::write_mask_sum_of;

/// Name of the fused aggregate, as plans show it.
pub const HE_SUM_FUSED: &str = "he_sum_fused";
/// Name of the part extractor, as plans show it.
pub const HE_SUM_PART: &str = "he_sum_part";

/// The fused aggregate over any number of encrypted columns.
pub fn he_sum_fused_udaf() -> AggregateUDF {
    AggregateUDF::from(HeSumFused {
        signature: Signature::variadic_any(Volatility::Immutable),
    })
}

/// `he_sum_part(bundle, i)`: part `i`'s sum out of a bundle.
pub fn he_sum_part_udf() -> ScalarUDF {
    ScalarUDF::from(HeSumPart {
        signature: Signature::exact(
            vec![DataType::LargeBinary, DataType::Int64],
            Volatility::Immutable,
        ),
    })
}

/// Field metadata key prefix under which a bundle carries part `i`'s sum marking.
fn part_prefix(i: usize) -> String {
    format!("hedf.part.{i}.")
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct HeSumFused {
    signature: Signature,
}

fn accumulator_of(args: &AccumulatorArgs) -> Result<HeSumGroupsAccumulator> {
    if args.expr_fields.len() > MAX_BUNDLE_PARTS {
        return internal_err!("{HE_SUM_FUSED} takes at most {MAX_BUNDLE_PARTS} columns");
    }
    let columns = args
        .expr_fields
        .iter()
        .map(|f| match argument_marking(f)? {
            m if m.kind == ColumnKind::Cell => Ok((f.name().clone(), m.crypto)),
            _ => internal_err!("{HE_SUM_FUSED} sums unweighted cells only"),
        })
        .collect::<Result<Vec<(String, ColumnCrypto)>>>()?;
    Ok(HeSumGroupsAccumulator::new(columns))
}

impl AggregateUDFImpl for HeSumFused {
    fn name(&self) -> &str {
        HE_SUM_FUSED
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::LargeBinary)
    }

    fn return_field(&self, arg_fields: &[FieldRef]) -> Result<FieldRef> {
        let mut metadata = HashMap::new();
        for (i, field) in arg_fields.iter().enumerate() {
            let marking = argument_marking(field)?.with_kind(ColumnKind::Sum);
            let prefix = part_prefix(i);
            metadata.extend(
                marking
                    .metadata()
                    .into_iter()
                    .map(|(k, v)| (format!("{prefix}{k}"), v)),
            );
        }
        Ok(Arc::new(
            Field::new(HE_SUM_FUSED, DataType::LargeBinary, true).with_metadata(metadata),
        ))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, HE_SUM_FUSED),
            DataType::LargeBinary,
            true,
        ))])
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(SingleGroup(accumulator_of(&args)?)))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(accumulator_of(&args)?))
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct HeSumPart {
    signature: Signature,
}

/// The part index of a `he_sum_part` call: a non-negative constant.
fn part_index(arg: Option<&ScalarValue>) -> Result<usize> {
    match arg {
        Some(ScalarValue::Int64(Some(i))) if *i >= 0 => Ok(*i as usize),
        _ => internal_err!("{HE_SUM_PART} takes a constant part index"),
    }
}

impl ScalarUDFImpl for HeSumPart {
    fn name(&self) -> &str {
        HE_SUM_PART
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::LargeBinary)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let prefix = part_prefix(part_index(args.scalar_arguments[1])?);
        let metadata: HashMap<String, String> = args.arg_fields[0]
            .metadata()
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v.clone())))
            .collect();
        Ok(Arc::new(
            Field::new(HE_SUM_PART, DataType::LargeBinary, true).with_metadata(metadata),
        ))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let index = match &args.args[1] {
            ColumnarValue::Scalar(s) => part_index(Some(s))?,
            ColumnarValue::Array(_) => part_index(None)?,
        };
        let bundles = args.args[0].to_array(args.number_rows)?;
        let Some(bundles) = bundles.as_binary_opt::<i64>() else {
            return internal_err!("{HE_SUM_PART} takes a bundle");
        };
        let mut builder = LargeBinaryBuilder::new();
        let (mut mask, mut buffer) = (Vec::new(), Vec::new());
        for bytes in bundles.iter() {
            let Some(bytes) = bytes else {
                builder.append_null();
                continue;
            };
            let bundle = BundleRef::parse(bytes)?;
            let Some(part) = bundle.parts.get(index) else {
                return exec_err!("{HE_SUM_PART}: the bundle has no part {index}");
            };
            if part.count == 0 {
                builder.append_null();
                continue;
            }
            mask.clear();
            match &part.own {
                Some(own) => write_mask_sum_of(&bundle.shared, own, &mut mask)?,
                None => mask.extend_from_slice(bundle.shared.bytes()),
            }
            let bodies: Vec<u64> = (0..part.crypto.spec.limbs as usize)
                .map(|l| part.body(l))
                .collect();
            buffer.clear();
            write_sum_on(&part.crypto, part.count, &bodies, &mask, &mut buffer);
            builder.append_value(&buffer);
        }
        let sums: ArrayRef = Arc::new(builder.finish());
        Ok(ColumnarValue::Array(sums))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, BooleanArray, Int64Array, RecordBatch};
    use datafusion::config::ConfigOptions;
    use datafusion::logical_expr::{EmitTo, GroupsAccumulator};

    use crate::crypto::cell::ColumnMarking;
    use crate::crypto::client::{encrypt_batches, MeasureColumn};
    use crate::crypto::keys::ClientKey;

    /// Three measures with different NULL patterns and limb counts, encrypted together, and a
    /// fourth column holding the first one's cells except every third row, which comes from
    /// another encryption (another mask stream, as a join would bring).
    fn columns(key: &ClientKey, rows: usize) -> Vec<(ColumnCrypto, ArrayRef)> {
        let int = |f: &dyn Fn(usize) -> Option<i64>| {
            Arc::new((0..rows).map(f).collect::<Int64Array>()) as ArrayRef
        };
        let batch = RecordBatch::try_from_iter([
            ("a", int(&|i| Some(i as i64 - 500))),
            ("b", int(&|i| (i % 7 != 3).then_some(i as i64 * 1_000_003))),
            ("c", int(&|i| (i % 5 != 1).then_some(-(i as i64)))),
        ])
        .unwrap();
        let measures = [
            MeasureColumn::new("a", 0).with_precision(6),
            MeasureColumn::new("b", 0).with_precision(18),
            MeasureColumn::new("c", 0).with_precision(4),
        ];
        let encrypt = || {
            let (schema, cells) =
                encrypt_batches(key, std::slice::from_ref(&batch), &measures).unwrap();
            let crypto = |i: usize| {
                ColumnMarking::from_metadata(schema.field(i).metadata())
                    .unwrap()
                    .unwrap()
                    .crypto
            };
            (0..3)
                .map(|i| (crypto(i), cells[0].column(i).clone()))
                .collect::<Vec<_>>()
        };
        let (mut out, other) = (encrypt(), encrypt());
        let (first, second) = (
            out[0].1.as_fixed_size_binary(),
            other[0].1.as_fixed_size_binary(),
        );
        let mixed = arrow::array::FixedSizeBinaryArray::try_from_iter((0..rows).map(|i| {
            if i % 3 == 0 {
                second.value(i)
            } else {
                first.value(i)
            }
        }))
        .unwrap();
        out.push((out[0].0, Arc::new(mixed) as ArrayRef));
        out
    }

    fn part_sums(bundles: &ArrayRef, part: usize) -> ArrayRef {
        let field = Arc::new(Field::new("b", DataType::LargeBinary, true));
        let args = ScalarFunctionArgs {
            args: vec![
                ColumnarValue::Array(bundles.clone()),
                ColumnarValue::Scalar(ScalarValue::Int64(Some(part as i64))),
            ],
            arg_fields: vec![
                field.clone(),
                Arc::new(Field::new("i", DataType::Int64, false)),
            ],
            number_rows: bundles.len(),
            return_field: field,
            config_options: Arc::new(ConfigOptions::default()),
        };
        he_sum_part_udf()
            .invoke_with_args(args)
            .unwrap()
            .to_array(bundles.len())
            .unwrap()
    }

    /// Fused sums, through partial states, row states, merges and a partial emit, under a
    /// FILTER, are byte for byte the sums each column's own he_sum gives: shared masks where a
    /// row's cells share one, own masks for NULLs and for the cells of another encryption.
    #[test]
    fn fused_sums_equal_each_columns_own_sum() {
        let key = ClientKey::generate();
        let rows = 2 * crate::crypto::params::POLYNOMIAL_SIZE + 700;
        let cols = columns(&key, rows);
        let groups: Vec<usize> = (0..rows).map(|i| (i * 31 + i / 97) % 9).collect();
        let filter: BooleanArray = (0..rows).map(|i| Some(i % 11 != 4)).collect();
        let (values, cryptos): (Vec<ArrayRef>, Vec<_>) = cols
            .iter()
            .map(|(crypto, cells)| (cells.clone(), ("x".to_string(), *crypto)))
            .unzip();
        let cut = rows / 3;
        let slice = |r: std::ops::Range<usize>| -> Vec<ArrayRef> {
            values.iter().map(|v| v.slice(r.start, r.len())).collect()
        };
        // Partial A takes the first third; its state merges into B, which updates the middle
        // and merges the last third as row states.
        let mut a = HeSumGroupsAccumulator::new(cryptos.clone());
        let f = filter.slice(0, cut);
        a.update_batch(&slice(0..cut), &groups[..cut], Some(&f), 9)
            .unwrap();
        let mut b = HeSumGroupsAccumulator::new(cryptos.clone());
        let f = filter.slice(cut, cut);
        b.update_batch(&slice(cut..2 * cut), &groups[cut..2 * cut], Some(&f), 9)
            .unwrap();
        b.merge_batch(
            &a.state(EmitTo::All).unwrap(),
            &(0..9).collect::<Vec<_>>(),
            9,
        )
        .unwrap();
        let f = filter.slice(2 * cut, rows - 2 * cut);
        let row_states = b.convert_to_state(&slice(2 * cut..rows), Some(&f)).unwrap();
        b.merge_batch(&row_states, &groups[2 * cut..], 9).unwrap();
        // Emitted in two steps, as a streaming aggregation would.
        let first = b.evaluate(EmitTo::First(4)).unwrap();
        let rest = b.evaluate(EmitTo::All).unwrap();
        let bundles = arrow::compute::concat(&[first.as_ref(), rest.as_ref()]).unwrap();

        for (part, (crypto, cells)) in cols.iter().enumerate() {
            let mut own = HeSumGroupsAccumulator::new(vec![("x".into(), *crypto)]);
            own.update_batch(std::slice::from_ref(cells), &groups, Some(&filter), 9)
                .unwrap();
            let want = own.evaluate(EmitTo::All).unwrap();
            assert_eq!(
                part_sums(&bundles, part).as_binary::<i64>(),
                want.as_binary::<i64>(),
                "part {part}"
            );
        }
    }
}
