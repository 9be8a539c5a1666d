//! Client-side encryption and decryption of Arrow data. Depends on tfhe and arrow only.
//!
//! [`Encryptor`] turns plaintext batches into encrypted ones: dimension columns pass through,
//! measure columns become cells (see [`crate::crypto::cell`]). [`decrypt_batch`] turns any result batch
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

use crate::crypto::cell::{write_cell, CellRef, ColumnCrypto, ColumnKind, ColumnMarking, SumRef};
use crate::crypto::encoding::{parse_decimal, MeasureSpec, MAX_PRECISION};
use crate::crypto::glwe::{ChunkEncryptor, FourierKey};
use crate::crypto::keys::{ClientKey, KeyId};
use crate::crypto::mask::MaskGenerator;
use crate::crypto::params::{GLWE_DIMENSION, LOG2_DELTA, PLAINTEXT_BITS, POLYNOMIAL_SIZE};
use crate::error::{HedfError, Result};

/// A measure column to encrypt: its name, decimal scale and (optionally) declared precision.
#[derive(Clone, Debug)]
pub struct MeasureColumn {
    pub name: String,
    pub scale: i8,
    /// Digits of DECIMAL(precision, scale). `None` infers it from the data: the digit count of
    /// the largest |value|, which the server then learns as it would learn a declared type.
    pub precision: Option<u8>,
}

impl MeasureColumn {
    pub fn new(name: impl Into<String>, scale: i8) -> Self {
        MeasureColumn {
            name: name.into(),
            scale,
            precision: None,
        }
    }

    pub fn with_precision(mut self, precision: u8) -> Self {
        self.precision = Some(precision);
        self
    }
}

enum Plan {
    Plain,
    Measure {
        crypto: ColumnCrypto,
        seeds: Vec<u128>,
    },
}

/// Encrypts a stream of batches of one schema as one segment (one fresh seed per measure limb).
pub struct Encryptor {
    schema: SchemaRef,
    plans: Vec<Plan>,
    /// The key in tfhe's Fourier domain, for the chunks' mask-times-key products.
    fourier: FourierKey,
    next_chunk: u64,
    /// Rows encrypted so far, so errors name a row of the whole input.
    rows: usize,
}

impl Encryptor {
    /// `measures` must all have a precision; see [`encrypt_batches`] to infer it from data.
    pub fn new(key: &ClientKey, input: &Schema, measures: &[MeasureColumn]) -> Result<Self> {
        let mut seeder = new_seeder();
        let mut plans: Vec<Plan> = input.fields().iter().map(|_| Plan::Plain).collect();
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        for m in measures {
            let (idx, field) = input.column_with_name(&m.name).ok_or_else(|| {
                HedfError::Invalid(format!(
                    "no column {:?} to encrypt; the input has {:?}",
                    m.name,
                    input.fields().iter().map(|f| f.name()).collect::<Vec<_>>()
                ))
            })?;
            let precision = m.precision.ok_or_else(|| {
                HedfError::Invalid(format!("column {:?} needs a declared precision", m.name))
            })?;
            let crypto = ColumnCrypto {
                key_id: key.id(),
                spec: MeasureSpec::for_precision(precision, m.scale)?,
            };
            let seeds = (0..crypto.spec.limbs).map(|_| seeder.seed().0).collect();
            fields[idx] = Field::new(
                field.name(),
                DataType::FixedSizeBinary(crypto.cell_width() as i32),
                true,
            )
            .with_metadata(ColumnMarking::new(ColumnKind::Cell, crypto, key).metadata());
            plans[idx] = Plan::Measure { crypto, seeds };
        }
        Ok(Encryptor {
            schema: Arc::new(Schema::new(fields)),
            plans,
            fourier: FourierKey::new(key.bits()),
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
        // Columns are independent: encrypt them in parallel (chunks inside are parallel too).
        let columns = self
            .plans
            .par_iter()
            .enumerate()
            .map(|(idx, plan)| {
                let column = batch.column(idx);
                let Plan::Measure { crypto, seeds } = plan else {
                    return Ok(column.clone());
                };
                let name = self.schema.field(idx).name();
                let values = fixed_point_values(column, crypto.spec.scale, name, self.rows)?;
                let too_large = |v: &Option<i64>| v.is_some_and(|v| v.unsigned_abs() > crypto.spec.max_abs() as u64);
                if let Some(row) = values.iter().position(too_large) {
                    return Err(HedfError::Encoding {
                        column: name.clone(),
                        row: self.rows + row,
                        why: format!(
                            "|value| exceeds what the declared precision allows (at most {} in fixed point)",
                            crypto.spec.max_abs()
                        ),
                    });
                }
                Ok(Arc::new(encrypt_column(&self.fourier, crypto, seeds, &values, first_chunk)) as ArrayRef)
            })
            .collect::<Result<Vec<_>>>()?;
        self.next_chunk += batch.num_rows().div_ceil(POLYNOMIAL_SIZE) as u64;
        self.rows += batch.num_rows();
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

/// Encrypts one column: per limb, each chunk of N rows is one seeded GLWE ciphertext.
fn encrypt_column(
    fourier: &FourierKey,
    crypto: &ColumnCrypto,
    seeds: &[u128],
    values: &[Option<i64>],
    first_chunk: u64,
) -> FixedSizeBinaryArray {
    let limbs = crypto.spec.limbs as usize;
    let mut limb_values = vec![0i64; values.len() * limbs];
    for (v, out) in values.iter().zip(limb_values.chunks_exact_mut(limbs)) {
        crypto.spec.split(v.unwrap_or(0), out);
    }
    let mut bodies = vec![0u64; values.len() * limbs];
    for (limb, &seed) in seeds.iter().enumerate() {
        let mut limb_bodies = vec![0u64; values.len()];
        limb_bodies
            .par_chunks_mut(POLYNOMIAL_SIZE)
            .enumerate()
            .for_each_init(
                || ChunkEncryptor::new(fourier),
                |encryptor, (c, out)| {
                    let values = (0..out.len())
                        .map(|j| limb_values[(c * POLYNOMIAL_SIZE + j) * limbs + limb]);
                    encryptor.encrypt(seed, first_chunk + c as u64, values, out);
                },
            );
        for (r, b) in limb_bodies.into_iter().enumerate() {
            bodies[r * limbs + limb] = b;
        }
    }
    let width = crypto.cell_width();
    let mut bytes = vec![0u8; values.len() * width];
    bytes
        .par_chunks_exact_mut(width)
        .enumerate()
        .for_each(|(r, cell)| {
            let row = (first_chunk as usize * POLYNOMIAL_SIZE + r) as u64;
            write_cell(
                cell,
                crypto,
                row,
                seeds,
                &bodies[r * limbs..(r + 1) * limbs],
            );
        });
    let nulls = NullBuffer::from_iter(values.iter().map(Option::is_some));
    let nulls = (nulls.null_count() > 0).then_some(nulls);
    FixedSizeBinaryArray::new(width as i32, Buffer::from_vec(bytes), nulls)
}

/// Rounds a phase to the nearest multiple of delta and reads it as a signed plaintext.
fn decode(phase: u64) -> i64 {
    let rounded = phase.wrapping_add(1 << (LOG2_DELTA - 1)) >> LOG2_DELTA;
    ((rounded << (64 - PLAINTEXT_BITS)) as i64) >> (64 - PLAINTEXT_BITS)
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
/// verified) to its exact fixed-point total.
pub fn decrypt_sum(
    key: &ClientKey,
    bytes: &[u8],
    expect: &ColumnCrypto,
    column: &str,
) -> Result<i128> {
    let sum = SumRef::parse(bytes)?;
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
    let mut limb_sums = [0i64; 3];
    for (limb, out) in limb_sums.iter_mut().enumerate().take(spec.limbs as usize) {
        *out = decode(sum_phase(key, &sum, limb));
    }
    Ok(spec.join(&limb_sums[..spec.limbs as usize]))
}

/// body - <mask, key> of one limb of a sum: its plaintext times delta plus the summed noise.
pub(crate) fn sum_phase(key: &ClientKey, sum: &SumRef<'_>, limb: usize) -> u64 {
    let mut buffer: Vec<u64> = sum.mask(limb).collect();
    buffer.push(sum.body(limb));
    let ct = LweCiphertext::from_container(buffer.as_slice(), CiphertextModulus::new_native());
    decrypt_lwe_ciphertext(&key.glwe().as_lwe_secret_key(), &ct).0
}

/// Decrypts single cells, regenerating each chunk's mask once.
struct CellDecryptor<'k> {
    key: &'k ClientKey,
    masks: MaskGenerator,
    chunk: Option<(u128, u64)>,
    glwe: GlweCiphertextOwned<u64>,
    lwe: LweCiphertextOwned<u64>,
}

impl<'k> CellDecryptor<'k> {
    fn new(key: &'k ClientKey) -> Self {
        let size = PolynomialSize(POLYNOMIAL_SIZE);
        CellDecryptor {
            key,
            masks: MaskGenerator::default(),
            chunk: None,
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

    fn limb(&mut self, seed: u128, row: u64, body: u64) -> i64 {
        decode(self.phase(seed, row, body))
    }

    /// body - <mask, key>: the plaintext times delta plus noise.
    fn phase(&mut self, seed: u128, row: u64, body: u64) -> u64 {
        let chunk = row / POLYNOMIAL_SIZE as u64;
        let slot = (row % POLYNOMIAL_SIZE as u64) as usize;
        if self.chunk != Some((seed, chunk)) {
            let mask = self.masks.generate(seed, chunk).to_vec();
            self.glwe.get_mut_mask().as_mut().copy_from_slice(&mask);
            self.chunk = Some((seed, chunk));
        }
        self.glwe.get_mut_body().as_mut()[slot] = body;
        extract_lwe_sample_from_glwe_ciphertext(&self.glwe, &mut self.lwe, MonomialDegree(slot));
        decrypt_lwe_ciphertext(&self.key.glwe().as_lwe_secret_key(), &self.lwe).0
    }
}

/// Decrypts one hedf column (sums or cells, as `marking` says) into `Decimal128(38, scale)`,
/// after checking that `key` made the marking.
fn decrypt_column(
    key: &ClientKey,
    name: &str,
    marking: &ColumnMarking,
    column: &ArrayRef,
) -> Result<Decimal128Array> {
    let crypto = &marking.crypto;
    check_key(key, crypto.key_id, &format!("column {name:?}"))?;
    marking.verify(key, name)?;
    let values: Decimal128Array = match (marking.kind, column.data_type()) {
        (ColumnKind::Sum, DataType::LargeBinary) => column
            .as_any()
            .downcast_ref::<LargeBinaryArray>()
            .expect("type checked")
            .iter()
            .map(|v| {
                v.map(|bytes| decrypt_sum(key, bytes, crypto, name))
                    .transpose()
            })
            .collect::<Result<_>>()?,
        (ColumnKind::Cell, DataType::FixedSizeBinary(_)) => {
            let mut dec = CellDecryptor::new(key);
            column
                .as_fixed_size_binary()
                .iter()
                .map(|v| {
                    v.map(|bytes| {
                        let cell = CellRef::parse(bytes, crypto)?;
                        let limbs: Vec<i64> = (0..crypto.spec.limbs as usize)
                            .map(|l| dec.limb(cell.seed(l), cell.row(), cell.body(l)))
                            .collect();
                        Ok(crypto.spec.join(&limbs))
                    })
                    .transpose()
                })
                .collect::<Result<_>>()?
        }
        (kind, t) => {
            return Err(HedfError::Malformed(format!(
                "column {name:?} is marked {} but has type {t}",
                kind.as_str()
            )))
        }
    };
    Ok(values.with_precision_and_scale(38, crypto.spec.scale)?)
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
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let Some(marking) = ColumnMarking::from_metadata(field.metadata())? else {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
            continue;
        };
        let decrypted = match key {
            Some(key) => match decrypt_column(key, field.name(), &marking, column) {
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
        let (_, encrypted) = encrypt_batches(key, &[zeros], &[measure]).unwrap();
        let crypto = ColumnCrypto {
            key_id: key.id(),
            spec: MeasureSpec::for_precision(1, 0).unwrap(),
        };
        (crypto, encrypted[0].column(0).clone())
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

    pub(crate) use super::sum_phase;
}

#[cfg(test)]
mod tests {
    use super::test_support::encrypted_zeros;
    use super::*;
    use arrow::array::Int64Array;

    /// Encrypting zeros and reading the raw phases measures the noise tfhe actually added: it
    /// must match the parameter set's standard deviation (4.0 on the u64 torus), centred on 0.
    #[test]
    fn encryption_noise_matches_the_parameter_set() {
        let key = ClientKey::generate();
        let n = 4 * POLYNOMIAL_SIZE;
        let (crypto, cells) = encrypted_zeros(&key, n);
        let cells = cells.as_fixed_size_binary();
        let mut dec = CellDecryptor::new(&key);
        let noise: Vec<f64> = (0..n)
            .map(|i| {
                let cell = CellRef::parse(cells.value(i), &crypto).unwrap();
                dec.phase(cell.seed(0), cell.row(), cell.body(0)) as i64 as f64
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
        let delta = 1u64 << LOG2_DELTA;
        assert_eq!(decode(5 * delta + delta / 2 - 1), 5);
        assert_eq!(
            decode(
                (-7i64 as u64)
                    .wrapping_mul(delta)
                    .wrapping_sub(delta / 2 - 1)
            ),
            -7
        );
        assert_eq!(
            decode(((1u64 << (PLAINTEXT_BITS - 1)) - 1) * delta),
            (1 << (PLAINTEXT_BITS - 1)) - 1
        );
    }
}
