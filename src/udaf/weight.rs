//! Weighting: `x * w` with `x` an encrypted column and `w` a plaintext integer or decimal
//! (a column, a constant or an expression of them), as in TPC-H Q6's
//! `SUM(l_extendedprice * l_discount)`.
//!
//! Multiplying a ciphertext by a public integer needs no key: `w * (a, b)` encrypts `w * m`
//! with noise `w * e`. The SQL planner turns `x * w` into `he_weight(x, w)` (see
//! `engine::guard`), which pairs each cell with its weight's unscaled integer (a weighted
//! cell, see [`crate::crypto::cell`]); `x * a * b` is `he_weight(he_weight(x, a), b)`, whose
//! weights multiply with overflow checks (as plaintext DataFusion multiplies `(x * a) * b` in
//! decimals), never wrapping in the weights' own integer type. he_sum then adds `w` times each cell's bodies and mask,
//! and the decrypted sum's scale is the column's plus the weight's. A weighted value costs
//! `w^2` rows of the column's budget ([`crate::crypto::params::weighted_rows`]), so the
//! engine and the client refuse a weighted sum whose noise or plaintext could overflow.
//! A weighted cell can only be summed or counted: the ciphertext guard refuses any other use.
//! The function is not registered under its name; SQL reaches it through `*` only.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeBinaryBuilder};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Decimal128Type, Field, FieldRef, Int64Type};
use datafusion::common::{exec_datafusion_err, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};

use crate::crypto::cell::{
    parse_weighted_cell, write_weighted_cell, CellRef, ColumnKind, ColumnMarking, MAX_WEIGHT_SCALE,
};

/// The function's name, as EXPLAIN shows it.
pub const HE_WEIGHT: &str = "he_weight";

/// The weighting function (see the module comment).
pub fn he_weight_udf() -> ScalarUDF {
    ScalarUDF::from(HeWeight {
        signature: Signature::any(2, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct HeWeight {
    signature: Signature,
}

/// Decimal places of a weight of type `t`, or a planning error for a type that is not an exact
/// number.
fn weight_scale(column: &str, t: &DataType) -> Result<u8> {
    match t {
        DataType::Null
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => Ok(0),
        DataType::Decimal32(_, s)
        | DataType::Decimal64(_, s)
        | DataType::Decimal128(_, s)
        | DataType::Decimal256(_, s)
            if (0..=MAX_WEIGHT_SCALE as i8).contains(s) =>
        {
            Ok(*s as u8)
        }
        other => plan_err!(
            "{column} is encrypted and can only be multiplied by an exact number (an integer or \
             a decimal of at most {MAX_WEIGHT_SCALE} places), not by a {other}; write \
             CAST(... AS DECIMAL(p, s)) around the other operand"
        ),
    }
}

impl ScalarUDFImpl for HeWeight {
    fn name(&self) -> &str {
        HE_WEIGHT
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        // Only called without fields; the width comes from the cell column in
        // `return_field_from_args`.
        plan_err!("{HE_WEIGHT} needs its arguments' fields")
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let [cells, weights] = args.arg_fields else {
            return plan_err!("{HE_WEIGHT} takes a cell column and a weight");
        };
        let marking = match ColumnMarking::from_metadata(cells.metadata())? {
            Some(m) if m.kind != ColumnKind::Sum && *cells.data_type() == input_type(&m) => m,
            _ => {
                return plan_err!(
                    "{}: only an encrypted column (not a sum) can be weighted",
                    cells.name()
                )
            }
        };
        let scale = marking.weight_scale + weight_scale(cells.name(), weights.data_type())?;
        if scale > MAX_WEIGHT_SCALE {
            return plan_err!(
                "{}: its weights have {scale} decimal places in all, more than \
                 {MAX_WEIGHT_SCALE}; round them (CAST(... AS DECIMAL(p, s)))",
                cells.name()
            );
        }
        let weighted = ColumnMarking {
            kind: ColumnKind::Weighted,
            weight_scale: scale,
            ..marking
        };
        let width = weighted.crypto.weighted_cell_width() as i32;
        Ok(Arc::new(
            Field::new(cells.name(), DataType::FixedSizeBinary(width), true)
                .with_metadata(weighted.metadata()),
        ))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let Some(marking) = ColumnMarking::from_metadata(args.arg_fields[0].metadata())? else {
            return exec_err!("{HE_WEIGHT} takes an encrypted column");
        };
        let crypto = marking.crypto;
        let input = args.args[0].to_array(args.number_rows)?;
        let weights = weights(&args.args[1].to_array(args.number_rows)?)?;
        let Some(cells) = input.as_fixed_size_binary_opt() else {
            return exec_err!("{HE_WEIGHT} takes cells, not {}", input.data_type());
        };
        let width = crypto.weighted_cell_width();
        let mut out = FixedSizeBinaryBuilder::with_capacity(cells.len(), width as i32);
        let mut buffer = vec![0u8; width];
        for (cell, weight) in cells.iter().zip(weights) {
            let (Some(bytes), Some(weight)) = (cell, weight) else {
                out.append_null();
                continue;
            };
            let (cell, weight) = match marking.kind {
                ColumnKind::Weighted => {
                    let (cell, inner) = parse_weighted_cell(bytes, &crypto)?;
                    let Some(product) = inner.checked_mul(weight) else {
                        return exec_err!(
                            "the weights of an encrypted column multiply to more than 64 bits \
                             (as an integer without its decimal point); hedf multiplies \
                             ciphertexts by 64-bit integers"
                        );
                    };
                    (cell, product)
                }
                _ => (CellRef::parse(bytes, &crypto)?, weight),
            };
            write_weighted_cell(&mut buffer, cell.bytes(), weight);
            out.append_value(&buffer)?;
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// The Arrow type of the cells or weighted cells `marking` describes.
fn input_type(marking: &ColumnMarking) -> DataType {
    let width = match marking.kind {
        ColumnKind::Weighted => marking.crypto.weighted_cell_width(),
        _ => marking.crypto.cell_width(),
    };
    DataType::FixedSizeBinary(width as i32)
}

/// Each weight's unscaled integer (the decimal's digits without its point), or an error for
/// one that does not fit 64 bits.
fn weights(array: &ArrayRef) -> Result<Vec<Option<i64>>> {
    let too_wide = || {
        exec_datafusion_err!(
            "a weight of an encrypted column does not fit 64 bits (as an integer without its \
             decimal point); hedf multiplies ciphertexts by 64-bit integers"
        )
    };
    let strict = CastOptions {
        safe: false,
        ..Default::default()
    };
    match array.data_type() {
        DataType::Null => Ok(vec![None; array.len()]),
        DataType::Decimal32(_, s) | DataType::Decimal64(_, s) | DataType::Decimal128(_, s) => {
            let wide = cast_with_options(array, &DataType::Decimal128(38, *s), &strict)?;
            wide.as_primitive::<Decimal128Type>()
                .iter()
                .map(|v| v.map(i64::try_from).transpose().map_err(|_| too_wide()))
                .collect()
        }
        DataType::Decimal256(_, s) => {
            let narrow = cast_with_options(array, &DataType::Decimal128(38, *s), &strict)
                .map_err(|_| too_wide())?;
            weights(&narrow)
        }
        _ => {
            let ints =
                cast_with_options(array, &DataType::Int64, &strict).map_err(|_| too_wide())?;
            Ok(ints.as_primitive::<Int64Type>().iter().collect())
        }
    }
}
