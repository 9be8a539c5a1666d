//! Answers on the wire: sums in one row that have the same mask sum send it once.
//!
//! Sums of several measures over the same rows of one table have byte-identical mask sums (a
//! table row's cells share one common mask), so a row of k sums would repeat the same N
//! coefficients (32 KiB) k times. [`share_masks`] keeps the first of equal masks in each row
//! and rewrites the others as mask-sharing sums that name the carrier's column (see
//! [`crate::crypto::cell`]); [`MaskResolver`] finds a sum's mask again when it is decrypted.
//! The masks are public: sharing them tells nobody anything the server did not know.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, LargeBinaryArray, LargeBinaryBuilder, RecordBatch};
use arrow::datatypes::DataType;

use crate::crypto::cell::{write_mask_sharing_sum, SumMask, SumRef, KIND_SUM, META_KIND};
use crate::crypto::mask_sum::{MaskSumRef, CHECK_BYTES};
use crate::error::{HedfError, Result};

/// The sum columns of `batch`: LargeBinary columns marked as sums.
fn sum_columns(batch: &RecordBatch) -> Vec<usize> {
    let schema = batch.schema();
    (0..batch.num_columns())
        .filter(|&c| {
            let field = schema.field(c);
            field.data_type() == &DataType::LargeBinary
                && field.metadata().get(META_KIND).map(String::as_str) == Some(KIND_SUM)
        })
        .collect()
}

/// `batch` with every sum whose mask equals an earlier sum's in the same row rewritten to
/// share that sum's mask. Values the rewrite does not recognise pass through unchanged.
pub fn share_masks(batch: &RecordBatch) -> Result<RecordBatch> {
    let columns = sum_columns(batch);
    if columns.len() < 2 || batch.num_columns() > u16::MAX as usize {
        return Ok(batch.clone());
    }
    let arrays: Vec<&LargeBinaryArray> = columns
        .iter()
        .map(|&c| batch.column(c).as_binary::<i64>())
        .collect();
    let mut builders: Vec<LargeBinaryBuilder> = arrays
        .iter()
        .map(|a| LargeBinaryBuilder::with_capacity(a.len(), a.value_data().len() / columns.len()))
        .collect();
    // (column, mask sum bytes, its check once a sum shares it)
    let mut carriers: Vec<(u16, MaskSumRef<'_>, Option<[u8; CHECK_BYTES]>)> =
        Vec::with_capacity(columns.len());
    let mut buffer = Vec::new();
    for row in 0..batch.num_rows() {
        carriers.clear();
        for ((&column, array), builder) in columns.iter().zip(&arrays).zip(&mut builders) {
            if array.is_null(row) {
                builder.append_null();
                continue;
            }
            let bytes = array.value(row);
            let Ok(sum) = SumRef::parse(bytes) else {
                builder.append_value(bytes);
                continue;
            };
            let SumMask::Inline(mask) = sum.mask else {
                builder.append_value(bytes);
                continue;
            };
            match carriers
                .iter_mut()
                .find(|(_, m, _)| m.bytes() == mask.bytes())
            {
                Some((carrier, carried, check)) => {
                    let check = check.get_or_insert_with(|| carried.check());
                    buffer.clear();
                    write_mask_sharing_sum(&sum, *carrier, check, &mut buffer);
                    builder.append_value(&buffer);
                }
                None => {
                    carriers.push((column as u16, mask, None));
                    builder.append_value(bytes);
                }
            }
        }
    }
    let mut out: Vec<ArrayRef> = batch.columns().to_vec();
    for (&c, mut builder) in columns.iter().zip(builders) {
        out[c] = Arc::new(builder.finish());
    }
    Ok(RecordBatch::try_new(batch.schema(), out)?)
}

/// Finds the mask of a sum in a batch, following a mask-sharing sum to its carrier.
pub struct MaskResolver<'a> {
    batch: &'a RecordBatch,
    /// Carriers by (row, column), each parsed and hashed once however many sums share it
    /// (`None`: not a full sum there).
    carriers: RefCell<HashMap<(usize, usize), Option<Carrier<'a>>>>,
}

/// A carrier's mask sum and its check.
type Carrier<'a> = (MaskSumRef<'a>, [u8; CHECK_BYTES]);

impl<'a> MaskResolver<'a> {
    pub fn new(batch: &'a RecordBatch) -> Self {
        MaskResolver {
            batch,
            carriers: RefCell::default(),
        }
    }

    /// The mask sum of `sum`, found in row `row` of column `column` (named for errors).
    pub fn mask(&self, sum: &SumRef<'a>, row: usize, column: &str) -> Result<MaskSumRef<'a>> {
        let (carrier, check) = match sum.mask {
            SumMask::Inline(mask) => return Ok(mask),
            SumMask::InColumn(c, check) => (c as usize, check),
        };
        let found = *self
            .carriers
            .borrow_mut()
            .entry((row, carrier))
            .or_insert_with(|| {
                let array = self.batch.columns().get(carrier)?.as_binary_opt::<i64>()?;
                if !array.is_valid(row) {
                    return None;
                }
                match SumRef::parse(array.value(row)).ok()?.mask {
                    SumMask::Inline(mask) => Some((mask, mask.check())),
                    SumMask::InColumn(..) => None,
                }
            });
        match found {
            Some((mask, carried)) if carried[..] == *check => Ok(mask),
            _ => Err(HedfError::Malformed(format!(
                "column {column:?}: its sum shares the mask of column {carrier} of the answer, \
                 which is not that sum there (columns dropped or reordered); keep the answer's \
                 columns together to decrypt it"
            ))),
        }
    }
}
