//! Client-side encryption and decryption of Arrow data. Depends on tfhe and arrow only.
//!
//! [`Encryptor`] turns plaintext batches into encrypted ones: dimension columns pass through,
//! measure columns become cells (see [`crate::crypto::cell`]), all on one common mask per row. [`decrypt_batch`] turns any result batch
//! back into plaintext: he_sum results and raw cells become `Decimal128(38, scale)`.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Decimal128Array, FixedSizeBinaryArray, LargeBinaryArray,
};
use arrow::buffer::{Buffer, NullBuffer};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use rayon::prelude::*;
use tfhe::core_crypto::prelude::*;
use tfhe::core_crypto::seeders::new_seeder;

use crate::crypto::answer::MaskResolver;
use crate::crypto::cell::{
    mask_words, write_cell, CellRef, ColumnCrypto, ColumnKind, ColumnMarking, SumMask, SumRef,
};
use crate::crypto::encoding::{parse_decimal, precision_limit, MeasureSpec, MAX_PRECISION};
use crate::crypto::glwe::{ChunkEncryptor, FourierKeys};
use crate::crypto::keys::{wipe, ClientKey, KeyId, SlotKey};
use crate::crypto::mask::MaskGenerator;
use crate::crypto::mask_sum::{MaskSumRef, MAX_LISTED_ROW, ROW_BITS};
use crate::crypto::params::{DEFAULT_MAX_ROWS_PER_SUM, GLWE_DIMENSION, POLYNOMIAL_SIZE};
use crate::crypto::product::MaskProduct;
use crate::crypto::slots::SlotMap;
use crate::error::{HedfError, Result};
use tfhe::core_crypto::fft_impl::fft64::math::polynomial::FourierPolynomialOwned;

/// A measure column to encrypt: its name, decimal scale and (optionally) declared precision.
#[derive(Clone, Debug)]
pub struct MeasureColumn {
    pub name: String,
    pub scale: i8,
    /// Digits of DECIMAL(precision, scale). `None` infers it from the data: the digit count of
    /// the largest |value|, which the server then learns as it would learn a declared type.
    pub precision: Option<u8>,
    /// Rows one sum of this column may hold and still decrypt exactly; more rows per sum cost
    /// more limbs (8 bytes each per value). See [`MeasureSpec::for_precision`].
    pub max_rows_per_sum: u64,
}

impl MeasureColumn {
    pub fn new(name: impl Into<String>, scale: i8) -> Self {
        MeasureColumn {
            name: name.into(),
            scale,
            precision: None,
            max_rows_per_sum: DEFAULT_MAX_ROWS_PER_SUM,
        }
    }

    pub fn with_precision(mut self, precision: u8) -> Self {
        self.precision = Some(precision);
        self
    }

    pub fn with_max_rows_per_sum(mut self, rows: u64) -> Self {
        self.max_rows_per_sum = rows;
        self
    }
}

/// Encrypts a stream of batches of one schema as one segment: one fresh mask stream for the
/// whole segment, every measure limb a body slot on it.
pub struct Encryptor {
    schema: SchemaRef,
    /// The measure columns: (input column, crypto, largest |value| the precision allows).
    measures: Vec<(usize, ColumnCrypto, u64)>,
    /// The slot keys in tfhe's Fourier domain, for the chunks' mask-times-key products.
    fourier: FourierKeys,
    seed: u128,
    next_chunk: u64,
    /// Rows encrypted so far, so errors name a row of the whole input.
    rows: usize,
}

impl Encryptor {
    /// `measures` must all have a precision; see [`encrypt_batches`] to infer it from data.
    pub fn new(key: &ClientKey, input: &Schema, measures: &[MeasureColumn]) -> Result<Self> {
        let mut slots = SlotMap::default();
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut planned = Vec::with_capacity(measures.len());
        // Slots follow the input's column order, so listing the measures in another order
        // gives the same table (an append must match the table's slots).
        let mut ordered: Vec<&MeasureColumn> = measures.iter().collect();
        ordered.sort_by_key(|m| input.index_of(&m.name).unwrap_or(usize::MAX));
        for m in ordered {
            let (idx, field) = input.column_with_name(&m.name).ok_or_else(|| {
                HedfError::Invalid(format!(
                    "no column {:?} to encrypt; the input has {:?}",
                    m.name,
                    input.fields().iter().map(|f| f.name()).collect::<Vec<_>>()
                ))
            })?;
            if planned.iter().any(|(i, _, _)| *i == idx) {
                return Err(HedfError::Invalid(format!(
                    "column {:?} is named twice as a measure",
                    m.name
                )));
            }
            let precision = m.precision.ok_or_else(|| {
                HedfError::Invalid(format!("column {:?} needs a declared precision", m.name))
            })?;
            let spec = MeasureSpec::for_precision(precision, m.scale, m.max_rows_per_sum)?;
            let crypto = ColumnCrypto {
                key_id: key.id(),
                spec,
                slot: slots.assign(&spec)?,
            };
            fields[idx] = Field::new(
                field.name(),
                DataType::FixedSizeBinary(crypto.cell_width() as i32),
                true,
            )
            .with_metadata(ColumnMarking::new(ColumnKind::Cell, crypto, key).metadata());
            let limit = precision_limit(precision).min(spec.max_abs() as u64);
            planned.push((idx, crypto, limit));
        }
        let slot_keys: Vec<_> = planned
            .iter()
            .flat_map(|(_, c, _)| (0..c.spec.limbs as u16).map(|l| key.slot_key(c.slot + l)))
            .collect();
        Ok(Encryptor {
            schema: Arc::new(Schema::new(fields)),
            measures: planned,
            fourier: FourierKeys::new(&slot_keys),
            seed: new_seeder().seed().0,
            next_chunk: 0,
            rows: 0,
        })
    }

    /// The encrypted batches' schema: measures as marked `FixedSizeBinary` cell columns.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Encrypts one batch. Each batch starts at a fresh chunk so no mask is ever reused.
    pub fn encrypt(&mut self, batch: &RecordBatch) -> Result<RecordBatch> {
        let first_chunk = self.next_chunk;
        let n = batch.num_rows();
        let slots = self.fourier.slots();
        let values = self
            .measures
            .par_iter()
            .map(|(idx, crypto, limit)| {
                let name = self.schema.field(*idx).name();
                let values = fixed_point_values(batch.column(*idx), crypto.spec.scale, name, self.rows)?;
                let too_large = |v: &Option<i64>| v.is_some_and(|v| v.unsigned_abs() > *limit);
                if let Some(row) = values.iter().position(too_large) {
                    return Err(HedfError::Encoding {
                        column: name.clone(),
                        row: self.rows + row,
                        why: format!(
                            "|value| exceeds what the declared precision allows (at most {limit} in fixed point)"
                        ),
                    });
                }
                Ok(values)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut bodies = vec![0u64; n * slots];
        let seed = self.seed;
        let measures = &self.measures;
        bodies
            .par_chunks_mut(POLYNOMIAL_SIZE * slots.max(1))
            .enumerate()
            .for_each_init(
                || (ChunkEncryptor::new(&self.fourier), Vec::new()),
                |(encryptor, plain), (c, out)| {
                    chunk_plaintexts(
                        measures,
                        &values,
                        c * POLYNOMIAL_SIZE,
                        slots,
                        out.len(),
                        plain,
                    );
                    encryptor.encrypt(seed, first_chunk + c as u64, plain, out)
                },
            );
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for ((idx, crypto, _), values) in self.measures.iter().zip(&values) {
            columns[*idx] = Arc::new(cell_column(
                crypto,
                seed,
                first_chunk,
                &bodies,
                slots,
                values,
            ));
        }
        self.next_chunk += n.div_ceil(POLYNOMIAL_SIZE) as u64;
        self.rows += n;
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// Encrypts in-memory batches, inferring undeclared precisions from the data first.
pub fn encrypt_batches(
    key: &ClientKey,
    batches: &[RecordBatch],
    measures: &[MeasureColumn],
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .ok_or_else(|| HedfError::Invalid("nothing to encrypt: no batches".into()))?;
    let resolved = infer_precisions(&schema, measures, batches.iter().cloned().map(Ok))?;
    let mut encryptor = Encryptor::new(key, &schema, &resolved)?;
    let out = batches
        .iter()
        .map(|b| encryptor.encrypt(b))
        .collect::<Result<_>>()?;
    Ok((encryptor.schema(), out))
}

/// Fills in every undeclared precision with the digit count of the column's largest |value|
/// in `batches` (one pass; nothing is kept).
pub fn infer_precisions<I>(
    schema: &Schema,
    measures: &[MeasureColumn],
    batches: I,
) -> Result<Vec<MeasureColumn>>
where
    I: IntoIterator<Item = Result<RecordBatch>>,
{
    let mut resolved = measures.to_vec();
    let pending: Vec<(usize, usize)> = resolved
        .iter()
        .enumerate()
        .filter(|(_, m)| m.precision.is_none())
        .map(|(i, m)| {
            schema
                .index_of(&m.name)
                .map(|col| (i, col))
                .map_err(|_| HedfError::Invalid(format!("no column {:?} to encrypt", m.name)))
        })
        .collect::<Result<_>>()?;
    if pending.is_empty() {
        return Ok(resolved);
    }
    let mut max = vec![0u64; pending.len()];
    let mut row0 = 0;
    for batch in batches {
        let batch = batch?;
        for (slot, &(i, col)) in pending.iter().enumerate() {
            let m = &resolved[i];
            let values = fixed_point_values(batch.column(col), m.scale, &m.name, row0)?;
            max[slot] = values
                .iter()
                .flatten()
                .fold(max[slot], |acc, v| acc.max(v.unsigned_abs()));
        }
        row0 += batch.num_rows();
    }
    for (&(i, _), max) in pending.iter().zip(max) {
        let digits = max.checked_ilog10().map_or(1, |d| d + 1) as u8;
        resolved[i].precision = Some(digits.max(resolved[i].scale as u8).clamp(1, MAX_PRECISION));
    }
    Ok(resolved)
}

/// Converts a numeric or decimal-string column to exact fixed-point integers.
/// `row0` is the input row of the array's first value, for error messages.
fn fixed_point_values(
    array: &ArrayRef,
    scale: i8,
    column: &str,
    row0: usize,
) -> Result<Vec<Option<i64>>> {
    let err = |row: usize, why: String| HedfError::Encoding {
        column: column.to_string(),
        row: row0 + row,
        why,
    };
    let factor = 10i64.pow(scale as u32);
    let from_text = |row: usize, text: Option<&str>| -> Result<Option<i64>> {
        match text.map(str::trim) {
            None | Some("") => Ok(None),
            Some(t) => parse_decimal(t, scale)
                .map(Some)
                .map_err(|why| err(row, why)),
        }
    };
    match array.data_type() {
        DataType::Utf8 => array
            .as_string::<i32>()
            .iter()
            .enumerate()
            .map(|(r, t)| from_text(r, t))
            .collect(),
        DataType::LargeUtf8 => array
            .as_string::<i64>()
            .iter()
            .enumerate()
            .map(|(r, t)| from_text(r, t))
            .collect(),
        DataType::Utf8View => array
            .as_string_view()
            .iter()
            .enumerate()
            .map(|(r, t)| from_text(r, t))
            .collect(),
        // Shortest round-trip text of a float is the decimal a person wrote; parse that exactly.
        DataType::Float16 | DataType::Float32 | DataType::Float64 => {
            let floats = arrow::compute::cast(array, &DataType::Float64)?;
            floats
                .as_primitive::<arrow::datatypes::Float64Type>()
                .iter()
                .enumerate()
                .map(|(r, v)| match v {
                    None => Ok(None),
                    Some(v) if !v.is_finite() => Err(err(r, format!("{v} is not a finite number"))),
                    Some(v) => from_text(r, Some(&v.to_string())),
                })
                .collect()
        }
        DataType::Decimal128(_, s) => {
            let s = *s;
            array
                .as_primitive::<arrow::datatypes::Decimal128Type>()
                .iter()
                .enumerate()
                .map(|(r, v)| {
                    let Some(v) = v else { return Ok(None) };
                    let scaled = if s <= scale {
                        v.checked_mul(10i128.pow((scale - s) as u32))
                    } else {
                        let div = 10i128.pow((s - scale) as u32);
                        if v % div != 0 {
                            return Err(err(r, format!("has more than {scale} decimal places")));
                        }
                        Some(v / div)
                    };
                    scaled
                        .and_then(|x| i64::try_from(x).ok())
                        .map(Some)
                        .ok_or_else(|| err(r, "out of the i64 fixed-point range".into()))
                })
                .collect()
        }
        t if t.is_integer() => {
            let ints = arrow::compute::cast(array, &DataType::Int64)
                .map_err(|_| err(0, format!("{t} values do not fit i64")))?;
            ints.as_primitive::<Int64Type>()
                .iter()
                .enumerate()
                .map(|(r, v)| match v {
                    None => Ok(None),
                    Some(v) => v
                        .checked_mul(factor)
                        .map(Some)
                        .ok_or_else(|| err(r, "out of the i64 fixed-point range".into())),
                })
                .collect()
        }
        t => Err(HedfError::Invalid(format!(
            "column {column:?} of type {t} cannot be a measure"
        ))),
    }
}

/// The row-major plaintexts (one per slot, scaled by each column's delta) of the `len / slots`
/// rows from `first`: what one chunk encrypts.
fn chunk_plaintexts(
    measures: &[(usize, ColumnCrypto, u64)],
    values: &[Vec<Option<i64>>],
    first: usize,
    slots: usize,
    len: usize,
    out: &mut Vec<u64>,
) {
    out.clear();
    out.resize(len, 0);
    let mut limbs = [0i64; crate::crypto::encoding::MAX_LIMBS as usize];
    for ((_, crypto, _), values) in measures.iter().zip(values) {
        let spec = &crypto.spec;
        let (slot, count) = (crypto.slot as usize, spec.limbs as usize);
        for (row, v) in out.chunks_exact_mut(slots).zip(&values[first..]) {
            spec.split(v.unwrap_or(0), &mut limbs[..count]);
            for (p, limb) in row[slot..slot + count].iter_mut().zip(&limbs[..count]) {
                *p = (*limb as u64).wrapping_shl(spec.log2_delta as u32);
            }
        }
    }
}

/// One column's cells: each row's seed and position on the common mask, and its limbs' bodies
/// from the row-major `bodies` of all slots.
fn cell_column(
    crypto: &ColumnCrypto,
    seed: u128,
    first_chunk: u64,
    bodies: &[u64],
    slots: usize,
    values: &[Option<i64>],
) -> FixedSizeBinaryArray {
    let (first, limbs) = (crypto.slot as usize, crypto.spec.limbs as usize);
    let width = crypto.cell_width();
    let mut bytes = vec![0u8; values.len() * width];
    bytes
        .par_chunks_exact_mut(width)
        .enumerate()
        .for_each(|(r, cell)| {
            let row = first_chunk * POLYNOMIAL_SIZE as u64 + r as u64;
            let at = r * slots + first;
            write_cell(cell, crypto, row, seed, &bodies[at..at + limbs]);
        });
    let nulls = NullBuffer::from_iter(values.iter().map(Option::is_some));
    let nulls = (nulls.null_count() > 0).then_some(nulls);
    FixedSizeBinaryArray::new(width as i32, Buffer::from_vec(bytes), nulls)
}

/// Rounds a phase to the nearest multiple of 2^log2_delta and reads it as a signed plaintext.
fn decode(phase: u64, log2_delta: u8) -> i64 {
    let d = log2_delta as u32;
    let rounded = phase.wrapping_add(1 << (d - 1)) >> d;
    ((rounded << d) as i64) >> d
}

/// The secret keys of a column's slots, derived once per column.
fn column_keys(key: &ClientKey, crypto: &ColumnCrypto) -> Vec<SlotKey> {
    (0..crypto.spec.limbs as u16)
        .map(|l| key.slot_key(crypto.slot + l))
        .collect()
}

fn check_key(key: &ClientKey, found: KeyId, what: &str) -> Result<()> {
    if found == key.id() {
        Ok(())
    } else {
        Err(HedfError::KeyMismatch {
            what: what.into(),
            found: found.to_string(),
            loaded: key.id().to_string(),
        })
    }
}

/// Decrypts one serialised he_sum result of a column marked `expect` (whose marking the caller
/// verified) to its exact fixed-point total. The sum must carry its mask (see
/// [`crate::crypto::answer`] for sums that share one).
pub fn decrypt_sum(
    key: &ClientKey,
    bytes: &[u8],
    expect: &ColumnCrypto,
    column: &str,
) -> Result<i128> {
    let sum = SumRef::parse(bytes)?;
    let SumMask::Inline(mask) = sum.mask else {
        return Err(HedfError::Invalid(format!(
            "column {column:?}: this sum shares its mask with another sum of its answer; \
             decrypt the whole answer (decrypt_batch)"
        )));
    };
    let slot_keys = column_keys(key, expect);
    let listed = listed_phases(&slot_keys, &[Some(mask)]);
    decrypt_sum_with(key, &slot_keys, &sum, mask, &listed, expect, column)
}

/// [`decrypt_sum`] with the column's slot keys, the sum's mask sum and, per limb, its listed
/// rows' `<mask, key>` (see [`listed_phases`]) at hand.
fn decrypt_sum_with(
    key: &ClientKey,
    slot_keys: &[SlotKey],
    sum: &SumRef<'_>,
    mask: MaskSumRef<'_>,
    listed: &[u64],
    expect: &ColumnCrypto,
    column: &str,
) -> Result<i128> {
    check_key(key, sum.crypto.key_id, &format!("column {column:?}"))?;
    if sum.crypto != *expect {
        return Err(HedfError::Malformed(format!(
            "column {column:?}: a sum's parameters differ from its column's marking"
        )));
    }
    let spec = sum.crypto.spec;
    // The server checks this too; the client does not trust it to.
    if sum.count > spec.max_rows() {
        return Err(HedfError::BudgetExceeded {
            column: column.into(),
            rows: sum.count,
            max_rows: spec.max_rows(),
            why: spec.budget_reason(),
        });
    }
    let mut buffer: Option<Vec<u64>> = mask.coefficients().map(|c| {
        let mut lwe: Vec<u64> = mask_words(c).collect();
        lwe.push(0);
        lwe
    });
    let limb_sums: Vec<i64> = slot_keys
        .iter()
        .enumerate()
        .map(|(limb, secret)| {
            let body = sum.body(limb).wrapping_sub(listed[limb]);
            let phase = match &mut buffer {
                Some(lwe) => sum_phase(secret, lwe, body),
                None => body,
            };
            decode(phase, spec.log2_delta)
        })
        .collect();
    Ok(spec.join(&limb_sums))
}

/// Chunks with fewer listed rows than this take each row's inner product directly (N
/// vectorised adds per key) rather than one product per key (three backward FFTs of the
/// mask's digits): the two cost about the same at this many rows.
const DIRECT_BELOW: usize = 64;
/// Listed rows decrypted together (24 bytes each): bounds the client's memory per batch.
const LISTED_WINDOW: usize = 1 << 22;

/// For each mask sum of `masks`, per slot key, `<mask sum of its listed rows, key>`: the
/// part of the phase its coefficients do not hold (`masks.len() x keys` values, 0 for a
/// mask sum without rows). Row `j` of a chunk with mask `a` is the LWE sample extracted at
/// `j`, and `<extracted mask, s>` is coefficient `j` of the negacyclic product `a * s`: so
/// the rows of all the mask sums are taken in chunk order, and each chunk costs one mask
/// regeneration and one exact FFT product per key ([`MaskProduct`]), then one
/// multiply-add per row and key; a chunk of a few rows takes their inner products directly.
fn listed_phases(keys: &[SlotKey], masks: &[Option<MaskSumRef<'_>>]) -> Vec<u64> {
    listed_phases_with(keys, masks, DIRECT_BELOW, LISTED_WINDOW)
}

fn listed_phases_with(
    keys: &[SlotKey],
    masks: &[Option<MaskSumRef<'_>>],
    direct_below: usize,
    window: usize,
) -> Vec<u64> {
    let mut phases = vec![0u64; masks.len() * keys.len()];
    let mut seeds: HashMap<u128, u64> = HashMap::new();
    // Every listed row as (key, weight, mask index), keys numbered by seed on first sight
    // (the same numbering on every pass).
    let for_each_row = |seeds: &mut HashMap<u128, u64>, f: &mut dyn FnMut(ListedKey)| {
        for (index, mask) in masks.iter().enumerate() {
            let mut last: Option<(u128, u64)> = None;
            for r in mask.iter().flat_map(|m| m.listed()) {
                // A mask sum's rows come sorted by seed: the last one usually matches.
                let seed = match last {
                    Some((s, i)) if s == r.seed => i,
                    _ => {
                        let next = seeds.len() as u64;
                        let i = *seeds.entry(r.seed).or_insert(next);
                        last = Some((r.seed, i));
                        i
                    }
                };
                f(ListedKey {
                    key: seed << ROW_BITS | r.row,
                    weight: r.weight,
                    mask: index as u32,
                });
            }
        }
    };
    let chunk_of = |key: u64| key / POLYNOMIAL_SIZE as u64;
    let total: usize = masks.iter().flatten().map(|m| m.listed().len()).sum();
    // Ranges of chunks of at most `window` rows each, so no chunk's products are computed
    // twice: one range unless the answer lists more rows than that.
    let mut ranges = vec![(0, u64::MAX)];
    if total > window {
        let mut counts: HashMap<u64, usize> = HashMap::new();
        for_each_row(&mut seeds, &mut |r| {
            *counts.entry(chunk_of(r.key)).or_default() += 1
        });
        let mut counts: Vec<(u64, usize)> = counts.into_iter().collect();
        counts.sort_unstable();
        ranges.clear();
        let (mut start, mut rows) = (0, 0);
        for (chunk, n) in counts {
            if rows > 0 && rows + n > window {
                ranges.push((start, chunk));
                (start, rows) = (chunk, 0);
            }
            rows += n;
        }
        ranges.push((start, u64::MAX));
    }
    let mut chunks = ChunkPhases::new(keys);
    let mut rows: Vec<ListedKey> = Vec::with_capacity(total.min(window));
    for (start, end) in ranges {
        for_each_row(&mut seeds, &mut |r| {
            if (start..end).contains(&chunk_of(r.key)) {
                rows.push(r);
            }
        });
        chunks.add(&mut rows, &seeds, &mut phases, direct_below);
    }
    phases
}

/// A listed row while phases are computed: `seed index << 48 | row`, weight, mask sum.
struct ListedKey {
    key: u64,
    weight: i64,
    mask: u32,
}

/// What [`listed_phases`] needs per chunk: the mask, its products with the keys.
struct ChunkPhases<'k> {
    keys: &'k [SlotKey],
    product: Option<(MaskProduct, Vec<FourierPolynomialOwned>)>,
    generator: MaskGenerator,
    products: Vec<Vec<u64>>,
}

impl Drop for ChunkPhases<'_> {
    /// `a * s` with a public `a` gives `s` away: the products and the keys' transforms are
    /// wiped.
    fn drop(&mut self) {
        for product in &mut self.products {
            wipe(product);
        }
        if let Some((_, transformed)) = &mut self.product {
            for key in transformed {
                wipe(&mut key.data);
            }
        }
    }
}

impl<'k> ChunkPhases<'k> {
    fn new(keys: &'k [SlotKey]) -> Self {
        ChunkPhases {
            keys,
            product: None,
            generator: MaskGenerator::default(),
            products: vec![vec![0u64; POLYNOMIAL_SIZE]; keys.len()],
        }
    }

    /// Adds the phases of `rows` (then cleared) to `phases`.
    fn add(
        &mut self,
        rows: &mut Vec<ListedKey>,
        seeds: &HashMap<u128, u64>,
        phases: &mut [u64],
        direct_below: usize,
    ) {
        let n = POLYNOMIAL_SIZE as u64;
        let keys = self.keys.len();
        let mut by_index = vec![0u128; seeds.len()];
        for (&seed, &i) in seeds {
            by_index[i as usize] = seed;
        }
        rows.sort_unstable_by_key(|r| r.key);
        let mut i = 0;
        while i < rows.len() {
            let chunk_key = rows[i].key / n;
            let end = i + rows[i..].partition_point(|r| r.key / n == chunk_key);
            let seed = by_index[(rows[i].key >> ROW_BITS) as usize];
            let chunk = (rows[i].key & (MAX_LISTED_ROW - 1)) / n;
            let mask = self.generator.generate(seed, chunk);
            let add = |phase: &mut u64, weight: i64, dot: u64| {
                *phase = phase.wrapping_add((weight as u64).wrapping_mul(dot));
            };
            if end - i < direct_below {
                for r in &rows[i..end] {
                    let at = (r.key % n) as usize;
                    let phases = &mut phases[r.mask as usize * keys..][..keys];
                    for (phase, key) in phases.iter_mut().zip(self.keys) {
                        add(phase, r.weight, extracted_dot(mask, key.as_ref(), at));
                    }
                }
            } else {
                let (product, transformed) = self.product.get_or_insert_with(|| {
                    let mut product = MaskProduct::default();
                    let t = self
                        .keys
                        .iter()
                        .map(|k| product.transform(k.as_ref()))
                        .collect();
                    (product, t)
                });
                product.set_mask(mask);
                for (out, key) in self.products.iter_mut().zip(transformed.iter()) {
                    out.fill(0);
                    product.add_product_transformed(key, out);
                }
                for r in &rows[i..end] {
                    let at = (r.key % n) as usize;
                    let phases = &mut phases[r.mask as usize * keys..][..keys];
                    for (phase, out) in phases.iter_mut().zip(&self.products) {
                        add(phase, r.weight, out[at]);
                    }
                }
            }
            i = end;
        }
        rows.clear();
    }
}

/// `<mask of the sample extracted at j from a chunk of mask a, s>` = coefficient `j` of the
/// negacyclic product `a * s`: `sum_{i <= j} a[j-i] s[i] - sum_{i > j} a[N+j-i] s[i]`. The key
/// is binary, so each term is `a & -s` (branch-free, vectorised).
fn extracted_dot(a: &[u64], s: &[u64], j: usize) -> u64 {
    let dot = |a: &[u64], s: &[u64]| {
        a.iter()
            .rev()
            .zip(s)
            .fold(0u64, |acc, (a, s)| acc.wrapping_add(a & s.wrapping_neg()))
    };
    dot(&a[..=j], &s[..=j]).wrapping_sub(dot(&a[j + 1..], &s[j + 1..]))
}

/// body - <mask, key> of one limb of a sum (`lwe`: the sum's mask, then room for the body):
/// its plaintext times delta plus the summed noise.
pub(crate) fn sum_phase(secret: &GlweSecretKeyOwned<u64>, lwe: &mut [u64], body: u64) -> u64 {
    *lwe.last_mut().expect("mask and body") = body;
    let ct = LweCiphertext::from_container(&*lwe, CiphertextModulus::new_native());
    decrypt_lwe_ciphertext(&secret.as_lwe_secret_key(), &ct).0
}

/// Decrypts single cells of one column, regenerating each chunk's mask once.
struct CellDecryptor {
    slot_keys: Vec<SlotKey>,
    masks: MaskGenerator,
    chunk: Option<(u128, u64)>,
    /// The (seed, row) whose sample `lwe` holds: a cell's limbs share it, so it is extracted
    /// once per cell.
    extracted: Option<(u128, u64)>,
    glwe: GlweCiphertextOwned<u64>,
    lwe: LweCiphertextOwned<u64>,
}

impl CellDecryptor {
    fn new(key: &ClientKey, crypto: &ColumnCrypto) -> Self {
        let size = PolynomialSize(POLYNOMIAL_SIZE);
        CellDecryptor {
            slot_keys: column_keys(key, crypto),
            masks: MaskGenerator::default(),
            chunk: None,
            extracted: None,
            glwe: GlweCiphertext::new(
                0,
                GlweSize(GLWE_DIMENSION + 1),
                size,
                CiphertextModulus::new_native(),
            ),
            lwe: LweCiphertext::new(
                0,
                LweSize(POLYNOMIAL_SIZE + 1),
                CiphertextModulus::new_native(),
            ),
        }
    }

    /// body - <mask, key of the limb's slot>: the limb times delta plus noise.
    fn phase(&mut self, seed: u128, row: u64, limb: usize, body: u64) -> u64 {
        if self.extracted != Some((seed, row)) {
            let chunk = row / POLYNOMIAL_SIZE as u64;
            let at = (row % POLYNOMIAL_SIZE as u64) as usize;
            if self.chunk != Some((seed, chunk)) {
                let mask = self.masks.generate(seed, chunk).to_vec();
                self.glwe.get_mut_mask().as_mut().copy_from_slice(&mask);
                self.chunk = Some((seed, chunk));
            }
            extract_lwe_sample_from_glwe_ciphertext(&self.glwe, &mut self.lwe, MonomialDegree(at));
            self.extracted = Some((seed, row));
        }
        *self.lwe.get_mut_body().data = body;
        decrypt_lwe_ciphertext(&self.slot_keys[limb].as_lwe_secret_key(), &self.lwe).0
    }

    fn value(&mut self, cell: &CellRef<'_>, spec: &MeasureSpec) -> i128 {
        let limbs: Vec<i64> = (0..spec.limbs as usize)
            .map(|l| {
                let phase = self.phase(cell.seed(), cell.row(), l, cell.body(l));
                decode(phase, spec.log2_delta)
            })
            .collect();
        spec.join(&limbs)
    }
}

/// Decrypts one hedf column (sums or cells, as `marking` says) into `Decimal128(38, scale)`
/// (the column's scale plus its weights'), after checking that `key` made the marking.
fn decrypt_column<'a>(
    key: &ClientKey,
    name: &str,
    marking: &ColumnMarking,
    column: &'a ArrayRef,
    masks: &MaskResolver<'a>,
    phases: &ListedPhaseTable,
) -> Result<Decimal128Array> {
    let crypto = &marking.crypto;
    check_key(key, crypto.key_id, &format!("column {name:?}"))?;
    marking.verify(key, name)?;
    let values: Decimal128Array = match (marking.kind, column.data_type()) {
        (ColumnKind::Sum, DataType::LargeBinary) => {
            let slot_keys = column_keys(key, crypto);
            let limbs = slot_keys.len();
            column
                .as_any()
                .downcast_ref::<LargeBinaryArray>()
                .expect("type checked")
                .iter()
                .enumerate()
                .map(|(row, v)| {
                    v.map(|bytes| {
                        let sum = SumRef::parse(bytes)?;
                        let mask = masks.mask(&sum, row, name)?;
                        let listed: Vec<u64> = (0..limbs as u16)
                            .map(|l| phases.phase(&mask, crypto.slot + l))
                            .collect();
                        decrypt_sum_with(key, &slot_keys, &sum, mask, &listed, crypto, name)
                    })
                    .transpose()
                })
                .collect::<Result<_>>()?
        }
        (ColumnKind::Cell, DataType::FixedSizeBinary(_)) => {
            let mut dec = CellDecryptor::new(key, crypto);
            column
                .as_fixed_size_binary()
                .iter()
                .map(|v| {
                    v.map(|bytes| Ok(dec.value(&CellRef::parse(bytes, crypto)?, &crypto.spec)))
                        .transpose()
                })
                .collect::<Result<_>>()?
        }
        (ColumnKind::Weighted, _) => {
            return Err(HedfError::Malformed(format!(
                "column {name:?} holds weighted cells, which are only ever summed on the server"
            )))
        }
        (kind, t) => {
            return Err(HedfError::Malformed(format!(
                "column {name:?} is marked {} but has type {t}",
                kind.as_str()
            )))
        }
    };
    Ok(values.with_precision_and_scale(38, marking.value_scale())?)
}

/// Decrypts every hedf column of a result batch (sums and cells) into `Decimal128(38, scale)`;
/// plaintext columns pass through. A column of another key is an error.
pub fn decrypt_batch(key: &ClientKey, batch: &RecordBatch) -> Result<RecordBatch> {
    let (batch, refused) = decrypt_readable(Some(key), batch)?;
    match refused.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(batch),
    }
}

/// What a person is shown of a result batch: hedf columns of `key` decrypted, those of any
/// other key (or all of them, without a key) replaced by the text `<encrypted>`. Also returns
/// one key-mismatch error per column that a loaded key could not decrypt.
pub fn decrypt_readable(
    key: Option<&ClientKey>,
    batch: &RecordBatch,
) -> Result<(RecordBatch, Vec<HedfError>)> {
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    let mut refused = Vec::new();
    let masks = MaskResolver::new(batch);
    let phases = match key {
        Some(key) => ListedPhaseTable::new(key, batch, &masks),
        None => ListedPhaseTable::default(),
    };
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let Some(marking) = ColumnMarking::from_metadata(field.metadata())? else {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
            continue;
        };
        let decrypted = match key {
            Some(key) => match decrypt_column(key, field.name(), &marking, column, &masks, &phases)
            {
                Ok(values) => Some(values),
                Err(e @ HedfError::KeyMismatch { .. }) => {
                    refused.push(e);
                    None
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        let column: ArrayRef = match decrypted {
            Some(values) => Arc::new(values),
            None => Arc::new(
                (0..column.len())
                    .map(|r| column.is_valid(r).then_some(ENCRYPTED))
                    .collect::<arrow::array::StringArray>(),
            ),
        };
        fields.push(Field::new(field.name(), column.data_type().clone(), true));
        columns.push(column);
    }
    let metadata: HashMap<String, String> = batch.schema().metadata().clone();
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(fields, metadata)),
        columns,
    )?;
    Ok((batch, refused))
}

/// The listed rows' phases of every sum in a batch that `key` can decrypt, computed together:
/// a mask sum that several columns share (mask-sharing sums) is decoded and sorted once, for
/// all their keys. Bytes this cannot read are skipped here and refused when decrypted.
#[derive(Default)]
struct ListedPhaseTable {
    slots: Vec<u16>,
    /// Mask sums by the address of their bytes in the batch (the carrier's, for sharing sums).
    masks: HashMap<usize, usize>,
    /// Per mask sum, per slot.
    phases: Vec<u64>,
}

impl ListedPhaseTable {
    fn new<'a>(key: &ClientKey, batch: &'a RecordBatch, resolver: &MaskResolver<'a>) -> Self {
        let mut slots = std::collections::BTreeSet::new();
        let mut masks: HashMap<usize, usize> = HashMap::new();
        let mut listed: Vec<Option<MaskSumRef<'_>>> = Vec::new();
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            let Ok(Some(marking)) = ColumnMarking::from_metadata(field.metadata()) else {
                continue;
            };
            let crypto = marking.crypto;
            let Some(array) = column.as_binary_opt::<i64>() else {
                continue;
            };
            if marking.kind != ColumnKind::Sum || crypto.key_id != key.id() {
                continue;
            }
            slots.extend(crypto.slot..crypto.slot + crypto.spec.limbs as u16);
            for (row, bytes) in array.iter().enumerate() {
                let Some(Ok(sum)) = bytes.map(SumRef::parse) else {
                    continue;
                };
                let Ok(mask) = resolver.mask(&sum, row, field.name()) else {
                    continue;
                };
                if mask.listed().len() > 0 {
                    masks
                        .entry(mask.bytes().as_ptr() as usize)
                        .or_insert_with(|| {
                            listed.push(Some(mask));
                            listed.len() - 1
                        });
                }
            }
        }
        let slots: Vec<u16> = slots.into_iter().collect();
        if listed.is_empty() {
            return ListedPhaseTable::default();
        }
        let keys: Vec<_> = slots.iter().map(|&s| key.slot_key(s)).collect();
        ListedPhaseTable {
            phases: listed_phases(&keys, &listed),
            slots,
            masks,
        }
    }

    /// `<listed rows of mask, key of slot>` (0 for a mask sum without listed rows).
    fn phase(&self, mask: &MaskSumRef<'_>, slot: u16) -> u64 {
        let Some(&index) = self.masks.get(&(mask.bytes().as_ptr() as usize)) else {
            return 0;
        };
        let at = self
            .slots
            .binary_search(&slot)
            .expect("slots of every listed sum");
        self.phases[index * self.slots.len() + at]
    }
}

/// How a value that cannot be decrypted here is shown.
pub const ENCRYPTED: &str = "<encrypted>";

/// Helpers for tests here and in the engine's accumulator (which checks its sums against
/// tfhe's own extraction).
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use arrow::array::Int64Array;

    /// `n` encrypted zeros of a DECIMAL(1, 0) column, and that column's crypto.
    pub(crate) fn encrypted_zeros(key: &ClientKey, n: usize) -> (ColumnCrypto, ArrayRef) {
        let zeros = RecordBatch::try_from_iter([(
            "v",
            Arc::new(Int64Array::from(vec![0i64; n])) as ArrayRef,
        )])
        .unwrap();
        let measure = MeasureColumn::new("v", 0).with_precision(1);
        let (schema, encrypted) = encrypt_batches(key, &[zeros], &[measure]).unwrap();
        let marking = ColumnMarking::from_metadata(schema.field(0).metadata())
            .unwrap()
            .unwrap();
        (marking.crypto, encrypted[0].column(0).clone())
    }

    /// The phase of a sum's limb `limb` under `key`, whatever its mask sum holds.
    pub(crate) fn sum_limb_phase(key: &ClientKey, sum: &SumRef<'_>, limb: usize) -> u64 {
        let mask = sum.inline_mask().unwrap();
        let secret = key.slot_key(sum.crypto.slot + limb as u16);
        let listed = listed_phases(std::slice::from_ref(&secret), &[Some(mask)])[0];
        let body = sum.body(limb).wrapping_sub(listed);
        match mask.coefficients() {
            Some(c) => {
                let mut lwe: Vec<u64> = mask_words(c).collect();
                lwe.push(0);
                sum_phase(&secret, &mut lwe, body)
            }
            None => body,
        }
    }

    /// A mask sum's coefficients with its listed rows' masks (extracted by tfhe) added.
    pub(crate) fn mask_sum_coefficients(mask: &MaskSumRef<'_>) -> Vec<u64> {
        let mut sum: Vec<u64> = match mask.coefficients() {
            Some(c) => mask_words(c).collect(),
            None => vec![0; POLYNOMIAL_SIZE],
        };
        let mut masks = MaskGenerator::default();
        for r in mask.listed() {
            for (s, m) in sum
                .iter_mut()
                .zip(extracted_mask(&mut masks, r.seed, r.row))
            {
                *s = s.wrapping_add((r.weight as u64).wrapping_mul(m));
            }
        }
        sum
    }

    /// The LWE mask of the cell at `row` under `seed`, extracted by tfhe from the chunk's
    /// regenerated GLWE ciphertext.
    pub(crate) fn extracted_mask(masks: &mut MaskGenerator, seed: u128, row: u64) -> Vec<u64> {
        let size = PolynomialSize(POLYNOMIAL_SIZE);
        let modulus = CiphertextModulus::new_native();
        let mut glwe = GlweCiphertext::new(0u64, GlweSize(GLWE_DIMENSION + 1), size, modulus);
        glwe.get_mut_mask()
            .as_mut()
            .copy_from_slice(masks.generate(seed, row / POLYNOMIAL_SIZE as u64));
        let mut lwe = LweCiphertext::new(0u64, LweSize(POLYNOMIAL_SIZE + 1), modulus);
        let slot = MonomialDegree((row % POLYNOMIAL_SIZE as u64) as usize);
        extract_lwe_sample_from_glwe_ciphertext(&glwe, &mut lwe, slot);
        lwe.get_mask().as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::encrypted_zeros;
    use super::*;
    use arrow::array::Int64Array;

    /// Listed rows' inner products with a key, by FFT product per chunk and directly, in one
    /// pass or in windows of a few chunks, equal the inner products of the masks tfhe
    /// extracts, with weights and two mask streams.
    #[test]
    fn listed_phases_equal_the_inner_products_of_extracted_masks() {
        use super::test_support::extracted_mask;
        use crate::crypto::mask_sum::{write_mask_sum, ListedRow};
        let key = ClientKey::generate();
        let keys = vec![key.slot_key(0), key.slot_key(3)];
        let n = POLYNOMIAL_SIZE as u64;
        let mut rows: Vec<ListedRow> = (0..300u64)
            .map(|i| ListedRow {
                seed: [11, 1 << 100][(i % 2) as usize],
                row: (i * 7919) % (3 * n) + [0, 1][(i % 3 == 0) as usize],
                weight: [1, -5, 1 << 40][(i % 3) as usize],
            })
            .collect();
        let mut bytes = Vec::new();
        write_mask_sum(None, &mut rows, &mut bytes).unwrap();
        let mask = MaskSumRef::parse(&bytes).unwrap();
        let mut masks = MaskGenerator::default();
        let want: Vec<u64> = keys
            .iter()
            .map(|k| {
                rows.iter().fold(0u64, |acc, r| {
                    let m = extracted_mask(&mut masks, r.seed, r.row);
                    let dot = m
                        .iter()
                        .zip(k.as_ref())
                        .fold(0u64, |d, (m, s)| d.wrapping_add(m.wrapping_mul(*s)));
                    acc.wrapping_add((r.weight as u64).wrapping_mul(dot))
                })
            })
            .collect();
        for (direct_below, window) in [(0, usize::MAX), (usize::MAX, usize::MAX), (0, 7)] {
            let got = listed_phases_with(&keys, &[None, Some(mask)], direct_below, window);
            assert_eq!(
                got,
                [vec![0, 0], want.clone()].concat(),
                "direct below {direct_below}, window {window}"
            );
        }
    }

    /// Encrypting zeros and reading the raw phases measures the noise tfhe actually added: it
    /// must match the parameter set's standard deviation (4.0 on the u64 torus), centred on 0.
    #[test]
    fn encryption_noise_matches_the_parameter_set() {
        let key = ClientKey::generate();
        let n = 4 * POLYNOMIAL_SIZE;
        let (crypto, cells) = encrypted_zeros(&key, n);
        let cells = cells.as_fixed_size_binary();
        let mut dec = CellDecryptor::new(&key, &crypto);
        let noise: Vec<f64> = (0..n)
            .map(|i| {
                let cell = CellRef::parse(cells.value(i), &crypto).unwrap();
                dec.phase(cell.seed(), cell.row(), 0, cell.body(0)) as i64 as f64
            })
            .collect();
        let mean = noise.iter().sum::<f64>() / n as f64;
        let sd = (noise.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!(mean.abs() < 0.2, "mean {mean}");
        assert!((3.85..4.2).contains(&sd), "sd {sd}");
    }

    #[test]
    fn values_beyond_the_declared_precision_are_refused_even_i64_min() {
        let key = ClientKey::generate();
        for bad in [1_048_576i64, -1_048_576, i64::MIN] {
            let batch = RecordBatch::try_from_iter([(
                "v",
                Arc::new(Int64Array::from(vec![1, bad])) as ArrayRef,
            )])
            .unwrap();
            let err = encrypt_batches(
                &key,
                &[batch],
                &[MeasureColumn::new("v", 0).with_precision(6)],
            )
            .unwrap_err();
            assert!(
                err.to_string().contains("column v, data row 2"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn decoding_rounds_to_the_nearest_multiple_of_delta_and_keeps_the_sign() {
        for log2_delta in [12u8, 18, 20, 40] {
            let delta = 1u64 << log2_delta;
            let top = (1i64 << (63 - log2_delta)) - 1;
            assert_eq!(decode(5 * delta + delta / 2 - 1, log2_delta), 5);
            let minus_seven = (-7i64 as u64)
                .wrapping_mul(delta)
                .wrapping_sub(delta / 2 - 1);
            assert_eq!(decode(minus_seven, log2_delta), -7);
            assert_eq!(decode(top as u64 * delta, log2_delta), top);
            assert_eq!(decode((-top - 1) as u64 * delta, log2_delta), -top - 1);
        }
    }

    /// Every measure and limb of a row shares one mask (seed and row), each on its own slot,
    /// and a body decrypts only under its own slot's key.
    #[test]
    fn measures_share_one_mask_on_distinct_slots() {
        let key = ClientKey::generate();
        let batch = RecordBatch::try_from_iter([
            ("a", Arc::new(Int64Array::from(vec![5, -3, 7])) as ArrayRef),
            (
                "b",
                Arc::new(Int64Array::from(vec![999_999_999_999_999_999, -1, 0])) as ArrayRef,
            ),
        ])
        .unwrap();
        let measures = [
            MeasureColumn::new("a", 0).with_precision(2),
            MeasureColumn::new("b", 0).with_precision(18),
        ];
        let (schema, out) = encrypt_batches(&key, &[batch], &measures).unwrap();
        let crypto: Vec<ColumnCrypto> = schema
            .fields()
            .iter()
            .map(|f| {
                ColumnMarking::from_metadata(f.metadata())
                    .unwrap()
                    .unwrap()
                    .crypto
            })
            .collect();
        assert_eq!((crypto[0].slot, crypto[1].slot), (0, 1));
        assert!(crypto[1].spec.limbs > 1);
        for r in 0..3 {
            let a = CellRef::parse(out[0].column(0).as_fixed_size_binary().value(r), &crypto[0])
                .unwrap();
            let b = CellRef::parse(out[0].column(1).as_fixed_size_binary().value(r), &crypto[1])
                .unwrap();
            assert_eq!((a.seed(), a.row()), (b.seed(), b.row()));
        }
        let plain = decrypt_batch(&key, &out[0]).unwrap();
        let b = plain
            .column(1)
            .as_primitive::<arrow::datatypes::Decimal128Type>();
        assert_eq!(b.value(0), 999_999_999_999_999_999);
        assert_eq!(b.value(1), -1);
        // Under the wrong slot's key the phase is uniform, not a small multiple of delta.
        let cell =
            CellRef::parse(out[0].column(0).as_fixed_size_binary().value(0), &crypto[0]).unwrap();
        let mut right = CellDecryptor::new(&key, &crypto[0]);
        let mut wrong = CellDecryptor::new(&key, &crypto[1]);
        let noise = |p: u64| (p.wrapping_sub(5 << crypto[0].spec.log2_delta) as i64).unsigned_abs();
        assert!(noise(right.phase(cell.seed(), cell.row(), 0, cell.body(0))) < 100);
        assert!(noise(wrong.phase(cell.seed(), cell.row(), 0, cell.body(0))) > 1 << 40);
    }
}
