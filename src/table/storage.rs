//! The on-disk layout of an encrypted table and its conversion to and from engine cells.
//!
//! Per measure column `m` a Parquet file holds `m` (the limb bodies, 8 bytes a limb, PLAIN,
//! uncompressed: ciphertext does not compress), `__hedf_row__m` (row numbers, DELTA_BINARY_PACKED:
//! consecutive rows cost ~0 bytes) and `__hedf_seed__m` (segment seeds, dictionary-encoded: one
//! entry per row group). So a value costs its 8-byte body and the rest is shared per chunk.
//! Field metadata (`hedf.*`) on `m` makes the file self-describing for any Parquet reader.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeBinaryArray, UInt64Array};
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;

use crate::cell::{assemble_cell, CellRef, ColumnCrypto, KIND_CELL};
use crate::error::{HedfError, Result};
use crate::keys::{is_key_material, KeyId};
use crate::params::POLYNOMIAL_SIZE;

const ROW_PREFIX: &str = "__hedf_row__";
const SEED_PREFIX: &str = "__hedf_seed__";
/// Rows per Parquet row group: a whole number of chunks.
const ROW_GROUP_ROWS: usize = 16 * POLYNOMIAL_SIZE;

/// Where one engine column lives in the storage schema.
#[derive(Clone, Debug)]
pub(crate) enum ColumnLayout {
    Plain {
        storage: usize,
    },
    Cell {
        crypto: ColumnCrypto,
        body: usize,
        row: usize,
        seed: usize,
    },
}

/// The engine schema (cells), the storage schema (bodies, rows, seeds) and how they map.
#[derive(Debug)]
pub(crate) struct StorageLayout {
    pub engine: SchemaRef,
    pub storage: SchemaRef,
    pub columns: Vec<ColumnLayout>,
    pub key_id: Option<KeyId>,
}

fn is_reserved(name: &str) -> bool {
    name.starts_with("__hedf_")
}

impl StorageLayout {
    /// Validates an encrypted (engine) schema: marked, well-formed cell columns, one key id.
    pub fn from_engine(engine: &Schema) -> Result<Self> {
        let mut storage_fields = Vec::new();
        let mut extra = Vec::new();
        let mut columns = Vec::new();
        let mut key_id = None;
        for field in engine.fields() {
            if is_reserved(field.name()) {
                return Err(HedfError::Invalid(format!(
                    "column name {:?} is reserved",
                    field.name()
                )));
            }
            match ColumnCrypto::from_metadata(field.metadata())? {
                None => {
                    if matches!(field.data_type(), DataType::FixedSizeBinary(_)) {
                        // An unmarked binary column could be ciphertext that lost its marking.
                        return Err(HedfError::Invalid(format!(
                            "column {:?} is FixedSizeBinary without hedf metadata; encrypted columns must be marked",
                            field.name()
                        )));
                    }
                    columns.push(ColumnLayout::Plain {
                        storage: storage_fields.len(),
                    });
                    storage_fields.push(field.as_ref().clone());
                }
                Some((kind, crypto)) => {
                    if kind != KIND_CELL
                        || field.data_type()
                            != &DataType::FixedSizeBinary(crypto.cell_width() as i32)
                    {
                        return Err(HedfError::Invalid(format!(
                            "column {:?} is marked {kind} but is not a {}-byte cell column",
                            field.name(),
                            crypto.cell_width()
                        )));
                    }
                    if *key_id.get_or_insert(crypto.key_id) != crypto.key_id {
                        return Err(HedfError::MixedKeys {
                            first: key_id.unwrap().to_string(),
                            second: crypto.key_id.to_string(),
                        });
                    }
                    let limbs = crypto.spec.limbs as i32;
                    columns.push(ColumnLayout::Cell {
                        crypto,
                        body: storage_fields.len(),
                        row: usize::MAX,
                        seed: usize::MAX,
                    });
                    storage_fields.push(
                        Field::new(field.name(), DataType::FixedSizeBinary(8 * limbs), true)
                            .with_metadata(field.metadata().clone()),
                    );
                    extra.push(Field::new(
                        format!("{ROW_PREFIX}{}", field.name()),
                        DataType::UInt64,
                        true,
                    ));
                    extra.push(Field::new(
                        format!("{SEED_PREFIX}{}", field.name()),
                        DataType::FixedSizeBinary(16 * limbs),
                        true,
                    ));
                }
            }
        }
        let mut next = storage_fields.len();
        for c in columns.iter_mut() {
            if let ColumnLayout::Cell { row, seed, .. } = c {
                (*row, *seed) = (next, next + 1);
                next += 2;
            }
        }
        storage_fields.extend(extra);
        Ok(StorageLayout {
            engine: Arc::new(Schema::new(engine.fields().clone())),
            storage: Arc::new(Schema::new(storage_fields)),
            columns,
            key_id,
        })
    }

    /// Recovers the layout from a stored file's schema.
    pub fn from_storage(storage: &Schema) -> Result<Self> {
        let engine_fields: Vec<Field> = storage
            .fields()
            .iter()
            .filter(|f| !is_reserved(f.name()))
            .map(|f| match ColumnCrypto::from_metadata(f.metadata()) {
                Ok(Some((_, crypto))) => Ok(Field::new(
                    f.name(),
                    DataType::FixedSizeBinary(crypto.cell_width() as i32),
                    true,
                )
                .with_metadata(f.metadata().clone())),
                Ok(None) => Ok(f.as_ref().clone()),
                Err(e) => Err(e),
            })
            .collect::<Result<_>>()?;
        let layout = Self::from_engine(&Schema::new(engine_fields))?;
        let matches = layout.storage.fields().len() == storage.fields().len()
            && layout
                .storage
                .fields()
                .iter()
                .zip(storage.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        if !matches {
            return Err(HedfError::Malformed(
                "stored table's columns do not follow the hedf layout".into(),
            ));
        }
        Ok(layout)
    }

    /// Splits cells into stored parts, validating every cell against its column.
    pub fn to_storage(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        if batch.schema().fields().len() != self.engine.fields().len() {
            return Err(HedfError::Invalid(
                "batch does not match the table's schema".into(),
            ));
        }
        let mut plain: Vec<ArrayRef> = Vec::new();
        let mut extra: Vec<ArrayRef> = Vec::new();
        for (layout, column) in self.columns.iter().zip(batch.columns()) {
            let ColumnLayout::Cell { crypto, .. } = layout else {
                plain.push(column.clone());
                continue;
            };
            let cells = column
                .as_fixed_size_binary_opt()
                .ok_or_else(|| HedfError::Invalid("cell column is not FixedSizeBinary".into()))?;
            let limbs = crypto.spec.limbs as usize;
            let (mut bodies, mut seeds, mut rows) = (
                Vec::with_capacity(cells.len() * 8 * limbs),
                Vec::with_capacity(cells.len() * 16 * limbs),
                Vec::with_capacity(cells.len()),
            );
            for i in 0..cells.len() {
                if cells.is_null(i) {
                    bodies.resize(bodies.len() + 8 * limbs, 0);
                    seeds.resize(seeds.len() + 16 * limbs, 0);
                    rows.push(0);
                    continue;
                }
                let cell = CellRef::parse(cells.value(i), crypto)?;
                bodies.extend_from_slice(cell.body_bytes());
                seeds.extend_from_slice(cell.seed_bytes());
                rows.push(cell.row());
            }
            let nulls = cells.nulls().cloned();
            plain.push(Arc::new(FixedSizeBinaryArray::new(
                8 * limbs as i32,
                Buffer::from_vec(bodies),
                nulls.clone(),
            )));
            extra.push(Arc::new(UInt64Array::new(rows.into(), nulls.clone())));
            extra.push(Arc::new(FixedSizeBinaryArray::new(
                16 * limbs as i32,
                Buffer::from_vec(seeds),
                nulls,
            )));
        }
        plain.extend(extra);
        Ok(RecordBatch::try_new(self.storage.clone(), plain)?)
    }

    fn writer_properties(&self) -> WriterProperties {
        // Parquet 2.0: the first version that dictionary-encodes fixed-length seeds.
        let mut props = WriterProperties::builder()
            .set_writer_version(WriterVersion::PARQUET_2_0)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_compression(Compression::SNAPPY);
        for field in self.storage.fields().iter() {
            let name = field.name();
            let path = ColumnPath::from(name.as_str());
            let is_cipher = ColumnCrypto::from_metadata(field.metadata())
                .ok()
                .flatten()
                .is_some();
            if is_cipher || name.starts_with(SEED_PREFIX) || name.starts_with(ROW_PREFIX) {
                // Random bytes: compression and statistics cost CPU and save nothing.
                props = props
                    .set_column_compression(path.clone(), Compression::UNCOMPRESSED)
                    .set_column_statistics_enabled(path.clone(), EnabledStatistics::None);
            }
            if is_cipher {
                props = props
                    .set_column_dictionary_enabled(path.clone(), false)
                    .set_column_encoding(path, Encoding::PLAIN);
            } else if name.starts_with(ROW_PREFIX) {
                props = props
                    .set_column_dictionary_enabled(path.clone(), false)
                    .set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
            }
        }
        props.build()
    }

    /// Recovers the layout of an upload: stored parts (bodies, rows, seeds, as written by
    /// [`SegmentWriter`]) when the schema has hedf's reserved columns, engine cells otherwise.
    pub fn from_upload(uploaded: &Schema) -> Result<(Self, UploadFormat)> {
        if uploaded.fields().iter().any(|f| is_reserved(f.name())) {
            Ok((Self::from_storage(uploaded)?, UploadFormat::Stored))
        } else {
            Ok((Self::from_engine(uploaded)?, UploadFormat::Cells))
        }
    }

    /// Checks that `other` holds the same columns with the same encryption, so its rows can
    /// join this table's.
    pub fn check_compatible(&self, other: &StorageLayout) -> Result<()> {
        let same = self.engine.fields().len() == other.engine.fields().len()
            && self
                .engine
                .fields()
                .iter()
                .zip(other.engine.fields())
                .zip(self.columns.iter().zip(&other.columns))
                .all(|((a, b), (ca, cb))| {
                    a.name() == b.name()
                        && a.data_type() == b.data_type()
                        && match (ca, cb) {
                            (ColumnLayout::Plain { .. }, ColumnLayout::Plain { .. }) => true,
                            (
                                ColumnLayout::Cell { crypto: x, .. },
                                ColumnLayout::Cell { crypto: y, .. },
                            ) => x == y,
                            _ => false,
                        }
                });
        if same {
            Ok(())
        } else {
            Err(HedfError::Invalid(format!(
                "appended rows do not match the table: table columns are [{}], upload has [{}]",
                describe(self),
                describe(other)
            )))
        }
    }

    /// Validates a batch of stored parts and gives it this layout's schema: every present body
    /// has its row and seed, plaintext binary and text hold no secret key.
    pub fn check_stored(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let fields = self.storage.fields();
        if batch.num_columns() != fields.len()
            || batch
                .columns()
                .iter()
                .zip(fields)
                .any(|(c, f)| c.data_type() != f.data_type())
        {
            return Err(HedfError::Invalid(
                "batch does not match the table's stored columns".into(),
            ));
        }
        for layout in &self.columns {
            match layout {
                ColumnLayout::Cell {
                    body, row, seed, ..
                } => {
                    let (b, r, s) = (batch.column(*body), batch.column(*row), batch.column(*seed));
                    let orphan =
                        (0..b.len()).any(|i| b.is_valid(i) && (r.is_null(i) || s.is_null(i)));
                    if orphan {
                        return Err(HedfError::Malformed(format!(
                            "column {:?}: a ciphertext body lacks its row or seed",
                            fields[*body].name()
                        )));
                    }
                }
                ColumnLayout::Plain { storage } => {
                    refuse_key_material(fields[*storage].name(), batch.column(*storage))?
                }
            }
        }
        Ok(RecordBatch::try_new(
            self.storage.clone(),
            batch.columns().to_vec(),
        )?)
    }

    /// Converts a batch in `format` to stored parts, validating it.
    pub fn to_stored(&self, format: UploadFormat, batch: &RecordBatch) -> Result<RecordBatch> {
        match format {
            UploadFormat::Cells => {
                for (layout, column) in self.columns.iter().zip(batch.columns()) {
                    if let ColumnLayout::Plain { storage } = layout {
                        refuse_key_material(self.storage.field(*storage).name(), column)?;
                    }
                }
                self.to_storage(batch)
            }
            UploadFormat::Stored => self.check_stored(batch),
        }
    }
}

/// How an uploaded batch carries its ciphertexts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadFormat {
    /// Engine cells, e.g. an encrypted batch straight from the client or a `SELECT *` download.
    Cells,
    /// Stored parts: bodies, rows, seeds (what a hedf Parquet file holds).
    Stored,
}

fn describe(layout: &StorageLayout) -> String {
    layout
        .engine
        .fields()
        .iter()
        .zip(&layout.columns)
        .map(|(f, c)| match c {
            ColumnLayout::Plain { .. } => format!("{} {}", f.name(), f.data_type()),
            ColumnLayout::Cell { crypto, .. } => format!(
                "{} encrypted(key {}, scale {}, {} limbs)",
                f.name(),
                crypto.key_id,
                crypto.spec.scale,
                crypto.spec.limbs
            ),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Refuses a plaintext column holding a serialized client key: the server must never store one.
fn refuse_key_material(name: &str, column: &ArrayRef) -> Result<()> {
    let found = match column.data_type() {
        DataType::Binary => column
            .as_binary::<i32>()
            .iter()
            .flatten()
            .any(is_key_material),
        DataType::LargeBinary => column
            .as_binary::<i64>()
            .iter()
            .flatten()
            .any(is_key_material),
        DataType::BinaryView => column
            .as_binary_view()
            .iter()
            .flatten()
            .any(is_key_material),
        DataType::Utf8 => column
            .as_string::<i32>()
            .iter()
            .flatten()
            .any(|v| is_key_material(v.as_bytes())),
        DataType::LargeUtf8 => column
            .as_string::<i64>()
            .iter()
            .flatten()
            .any(|v| is_key_material(v.as_bytes())),
        DataType::Utf8View => column
            .as_string_view()
            .iter()
            .flatten()
            .any(|v| is_key_material(v.as_bytes())),
        _ => false,
    };
    if found {
        return Err(HedfError::Invalid(format!(
            "column {name:?} contains secret key material (a hedf client key); the server never \
             stores keys: upload only the encrypted table"
        )));
    }
    Ok(())
}

/// Writes one immutable Parquet segment atomically: a temporary file, fsync, rename, fsync of
/// the folder. Dropped before [`SegmentWriter::finish`], it removes the temporary file.
pub struct SegmentWriter {
    layout: Arc<StorageLayout>,
    format: UploadFormat,
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<ArrowWriter<File>>,
    rows: usize,
}

impl SegmentWriter {
    pub(crate) fn create(
        path: &Path,
        layout: Arc<StorageLayout>,
        format: UploadFormat,
    ) -> Result<Self> {
        let tmp = path.with_extension("parquet.tmp");
        let file = File::create(&tmp)?;
        let props = layout.writer_properties();
        let writer = ArrowWriter::try_new(file, layout.storage.clone(), Some(props));
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        Ok(SegmentWriter {
            layout,
            format,
            path: path.to_path_buf(),
            tmp,
            writer: Some(writer),
            rows: 0,
        })
    }

    /// Validates and appends one batch in the writer's upload format.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let stored = self.layout.to_stored(self.format, batch)?;
        self.rows += stored.num_rows();
        self.writer
            .as_mut()
            .expect("writer is open until finish")
            .write(&stored)?;
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn layout(&self) -> &Arc<StorageLayout> {
        &self.layout
    }

    /// Makes the segment durable under its final name; returns its row count.
    pub fn finish(mut self) -> Result<usize> {
        let writer = self.writer.take().expect("finish runs once");
        writer.into_inner()?.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)?;
        // A bare file name's parent is "", the current folder.
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
        Ok(self.rows)
    }
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Rebuilds one cell column from its stored parts.
pub(crate) fn assemble_cells(
    crypto: &ColumnCrypto,
    bodies: &ArrayRef,
    rows: &ArrayRef,
    seeds: &ArrayRef,
) -> Result<FixedSizeBinaryArray> {
    let malformed = || HedfError::Malformed("stored ciphertext parts have unexpected types".into());
    let bodies = bodies.as_fixed_size_binary_opt().ok_or_else(malformed)?;
    let seeds = seeds.as_fixed_size_binary_opt().ok_or_else(malformed)?;
    let rows = rows
        .as_primitive_opt::<arrow::datatypes::UInt64Type>()
        .ok_or_else(malformed)?;
    let limbs = crypto.spec.limbs as usize;
    if bodies.value_length() as usize != 8 * limbs || seeds.value_length() as usize != 16 * limbs {
        return Err(malformed());
    }
    let width = crypto.cell_width();
    let header = crypto.header();
    let mut out = vec![0u8; bodies.len() * width];
    let (body_bytes, seed_bytes) = (bodies.value_data(), seeds.value_data());
    for (i, cell) in out.chunks_exact_mut(width).enumerate() {
        if bodies.is_valid(i) {
            if seeds.is_null(i) || rows.is_null(i) {
                return Err(HedfError::Malformed(
                    "stored cell lacks its row or seed".into(),
                ));
            }
            let seed = &seed_bytes[i * 16 * limbs..(i + 1) * 16 * limbs];
            assemble_cell(
                cell,
                &header,
                rows.value(i),
                seed,
                &body_bytes[i * 8 * limbs..(i + 1) * 8 * limbs],
            );
        }
    }
    Ok(FixedSizeBinaryArray::new(
        width as i32,
        Buffer::from_vec(out),
        bodies.nulls().cloned(),
    ))
}
