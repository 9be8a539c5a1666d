//! The on-disk layout of an encrypted table and its conversion to and from engine cells.
//!
//! Per measure column `m` a Parquet file holds `m` (the limb bodies, 8 bytes a limb, PLAIN,
//! uncompressed: ciphertext does not compress). All measures of a row share one mask (common
//! mask, see `crypto::slots`), named once per row by `__hedf_row__` (its position in the mask
//! stream, DELTA_BINARY_PACKED: consecutive rows cost ~0 bytes) and `__hedf_seed__` (the
//! segment's mask seed, dictionary-encoded: one entry per row group). So a value costs its
//! 8-byte bodies and the rest is shared by the row and the chunk. Field metadata (`hedf.*`) on
//! `m` makes the file self-describing for any Parquet reader.

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
use tempfile::NamedTempFile;

use crate::crypto::cell::{
    assemble_cell, CellRef, ColumnCrypto, ColumnKind, ColumnMarking, SEED_BYTES,
};
use crate::crypto::keys::{is_key_material, KeyId};
use crate::crypto::params::POLYNOMIAL_SIZE;
use crate::crypto::slots::check_disjoint;
use crate::error::{HedfError, Result};

/// The row's position in its segment's mask stream, and that stream's seed.
const ROW_COLUMN: &str = "__hedf_row__";
const SEED_COLUMN: &str = "__hedf_seed__";
/// Rows per Parquet row group: a whole number of chunks.
const ROW_GROUP_ROWS: usize = 16 * POLYNOMIAL_SIZE;

/// Where one engine column lives in the storage schema.
#[derive(Clone, Debug)]
pub(crate) enum ColumnLayout {
    Plain {
        storage: usize,
    },
    /// `row` and `seed` are the table's shared mask columns.
    Cell {
        marking: ColumnMarking,
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

impl StorageLayout {
    /// Whether `name` is one of hedf's own stored columns (rows and seeds of a measure).
    pub fn is_reserved(name: &str) -> bool {
        name.starts_with("__hedf_")
    }

    /// Validates an encrypted (engine) schema: distinct non-empty names, marked and
    /// well-formed cell columns, one key id, no key material in metadata.
    pub fn from_engine(engine: &Schema) -> Result<Self> {
        let mut storage_fields = Vec::new();
        let mut columns = Vec::new();
        let mut key_id = None;
        refuse_key_material_in_metadata("the schema", engine.metadata())?;
        let mut names = std::collections::HashSet::new();
        for field in engine.fields() {
            if field.name().trim().is_empty() {
                return Err(HedfError::Invalid(
                    "a column has an empty name; name every column".into(),
                ));
            }
            if !names.insert(field.name()) {
                return Err(HedfError::Invalid(format!(
                    "two columns are named {:?}; column names must be distinct",
                    field.name()
                )));
            }
            if Self::is_reserved(field.name()) {
                return Err(HedfError::Invalid(format!(
                    "column name {:?} is reserved",
                    field.name()
                )));
            }
            refuse_key_material_in_field(field)?;
            match ColumnMarking::from_metadata(field.metadata())? {
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
                Some(marking) => {
                    let crypto = marking.crypto;
                    if marking.kind != ColumnKind::Cell
                        || field.data_type()
                            != &DataType::FixedSizeBinary(crypto.cell_width() as i32)
                    {
                        return Err(HedfError::Invalid(format!(
                            "column {:?} is marked {} but is not a {}-byte cell column",
                            field.name(),
                            marking.kind.as_str(),
                            crypto.cell_width()
                        )));
                    }
                    if *key_id.get_or_insert(crypto.key_id) != crypto.key_id {
                        return Err(HedfError::MixedKeys {
                            first: key_id.unwrap().to_string(),
                            second: crypto.key_id.to_string(),
                        });
                    }
                    columns.push(ColumnLayout::Cell {
                        marking,
                        body: storage_fields.len(),
                        row: usize::MAX,
                        seed: usize::MAX,
                    });
                    storage_fields.push(
                        Field::new(
                            field.name(),
                            DataType::FixedSizeBinary(crypto.bodies_width() as i32),
                            true,
                        )
                        .with_metadata(field.metadata().clone()),
                    );
                }
            }
        }
        check_disjoint(columns.iter().filter_map(|c| match c {
            ColumnLayout::Cell { marking, .. } => Some(marking.crypto.slots()),
            ColumnLayout::Plain { .. } => None,
        }))?;
        if key_id.is_some() {
            let (row_at, seed_at) = (storage_fields.len(), storage_fields.len() + 1);
            for c in columns.iter_mut() {
                if let ColumnLayout::Cell { row, seed, .. } = c {
                    (*row, *seed) = (row_at, seed_at);
                }
            }
            storage_fields.push(Field::new(ROW_COLUMN, DataType::UInt64, true));
            storage_fields.push(Field::new(
                SEED_COLUMN,
                DataType::FixedSizeBinary(SEED_BYTES as i32),
                true,
            ));
        }
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
            .filter(|f| !Self::is_reserved(f.name()))
            .map(|f| match ColumnMarking::from_metadata(f.metadata()) {
                Ok(Some(marking)) => Ok(Field::new(
                    f.name(),
                    DataType::FixedSizeBinary(marking.crypto.cell_width() as i32),
                    true,
                )
                .with_metadata(f.metadata().clone())),
                Ok(None) => Ok(f.as_ref().clone()),
                Err(e) => Err(e),
            })
            .collect::<Result<_>>()?;
        let layout = Self::from_engine(&Schema::new_with_metadata(
            engine_fields,
            storage.metadata().clone(),
        ))?;
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

    /// Splits a batch of engine cells into stored parts (bodies, then the rows' shared mask
    /// row and seed), validating every cell against its column. The cells of one row must
    /// share their mask, as a hedf client encrypts them.
    pub fn split_cells(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        if batch.schema().fields().len() != self.engine.fields().len() {
            return Err(HedfError::Invalid(
                "batch does not match the table's schema".into(),
            ));
        }
        let n = batch.num_rows();
        let mut out: Vec<ArrayRef> = Vec::with_capacity(self.storage.fields().len());
        let mut masks: Vec<Option<(u64, &[u8])>> = vec![None; n];
        for (layout, column) in self.columns.iter().zip(batch.columns()) {
            let ColumnLayout::Cell { marking, .. } = layout else {
                out.push(column.clone());
                continue;
            };
            let crypto = &marking.crypto;
            let cells = column
                .as_fixed_size_binary_opt()
                .ok_or_else(|| HedfError::Invalid("cell column is not FixedSizeBinary".into()))?;
            let body_width = crypto.bodies_width();
            let mut bodies = Vec::with_capacity(n * body_width);
            for (i, mask) in masks.iter_mut().enumerate() {
                if cells.is_null(i) {
                    bodies.resize(bodies.len() + body_width, 0);
                    continue;
                }
                let cell = CellRef::parse(cells.value(i), crypto)?;
                bodies.extend_from_slice(cell.body_bytes());
                let this = (cell.row(), cell.seed_bytes());
                match mask {
                    None => *mask = Some(this),
                    Some(first) if *first == this => {}
                    Some(_) => {
                        return Err(HedfError::Invalid(format!(
                            "row {i}: the encrypted values of one row come from different \
                             encryptions (their masks differ); upload rows as a hedf client \
                             encrypted them, not columns combined from several tables"
                        )))
                    }
                }
            }
            out.push(Arc::new(FixedSizeBinaryArray::new(
                body_width as i32,
                Buffer::from_vec(bodies),
                cells.nulls().cloned(),
            )));
        }
        if self.key_id.is_some() {
            let rows: UInt64Array = masks.iter().map(|m| m.map(|(row, _)| row)).collect();
            let seeds = FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                masks.iter().map(|m| m.map(|(_, seed)| seed)),
                SEED_BYTES as i32,
            )?;
            out.push(Arc::new(rows));
            out.push(Arc::new(seeds));
        }
        Ok(RecordBatch::try_new(self.storage.clone(), out)?)
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
            let is_cipher = ColumnMarking::from_metadata(field.metadata())
                .ok()
                .flatten()
                .is_some();
            if is_cipher || name == SEED_COLUMN || name == ROW_COLUMN {
                // Random bytes: compression and statistics cost CPU and save nothing.
                props = props
                    .set_column_compression(path.clone(), Compression::UNCOMPRESSED)
                    .set_column_statistics_enabled(path.clone(), EnabledStatistics::None);
            }
            if is_cipher {
                props = props
                    .set_column_dictionary_enabled(path.clone(), false)
                    .set_column_encoding(path, Encoding::PLAIN);
            } else if name == ROW_COLUMN {
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
        if uploaded
            .fields()
            .iter()
            .any(|f| Self::is_reserved(f.name()))
        {
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
                                ColumnLayout::Cell { marking: x, .. },
                                ColumnLayout::Cell { marking: y, .. },
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

    /// Validates a batch that already holds stored parts and gives it this layout's schema:
    /// every present body has its row and seed, plaintext columns hold no secret key.
    pub fn validate_parts(&self, batch: &RecordBatch) -> Result<RecordBatch> {
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

    /// The stored parts of an uploaded batch in `format`, validated.
    pub fn stored_parts(&self, format: UploadFormat, batch: &RecordBatch) -> Result<RecordBatch> {
        match format {
            UploadFormat::Cells => {
                for (layout, column) in self.columns.iter().zip(batch.columns()) {
                    if let ColumnLayout::Plain { storage } = layout {
                        refuse_key_material(self.storage.field(*storage).name(), column)?;
                    }
                }
                self.split_cells(batch)
            }
            UploadFormat::Stored => self.validate_parts(batch),
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
            ColumnLayout::Cell { marking, .. } => format!(
                "{} encrypted(key {}, scale {}, {} limbs)",
                f.name(),
                marking.crypto.key_id,
                marking.crypto.spec.scale,
                marking.crypto.spec.limbs
            ),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Refuses a plaintext column holding a serialized client key anywhere in its bytes, nested
/// types (lists, structs, maps, dictionaries, views) included: the server must never store one.
fn refuse_key_material(name: &str, column: &ArrayRef) -> Result<()> {
    if holds_key_material(&column.to_data()) {
        return Err(HedfError::Invalid(format!(
            "column {name:?} contains secret key material (a hedf client key); the server never \
             stores keys: upload only the encrypted table"
        )));
    }
    Ok(())
}

/// Whether any buffer of `data` or of its children holds a key's magic. Scanning raw buffers
/// covers every type that can carry bytes without a case per type.
fn holds_key_material(data: &arrow::array::ArrayData) -> bool {
    data.buffers().iter().any(|b| is_key_material(b.as_slice()))
        || data.child_data().iter().any(holds_key_material)
}

/// Refuses key material in the metadata of `field` or of any field nested in its type.
fn refuse_key_material_in_field(field: &Field) -> Result<()> {
    refuse_key_material_in_metadata(field.name(), field.metadata())?;
    let children: Vec<&Field> = match field.data_type() {
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => vec![f.as_ref()],
        DataType::Struct(fields) => fields.iter().map(|f| f.as_ref()).collect(),
        DataType::Union(fields, _) => fields.iter().map(|(_, f)| f.as_ref()).collect(),
        DataType::RunEndEncoded(ends, values) => vec![ends.as_ref(), values.as_ref()],
        _ => Vec::new(),
    };
    children
        .into_iter()
        .try_for_each(refuse_key_material_in_field)
}

fn refuse_key_material_in_metadata(
    what: &str,
    metadata: &std::collections::HashMap<String, String>,
) -> Result<()> {
    let found = metadata
        .iter()
        .any(|(k, v)| is_key_material(k.as_bytes()) || is_key_material(v.as_bytes()));
    if found {
        return Err(HedfError::Invalid(format!(
            "metadata of {what} contains secret key material (a hedf client key); the server \
             never stores keys"
        )));
    }
    Ok(())
}

/// Writes one immutable Parquet segment atomically: a temporary file (fresh random name, opened
/// exclusively, mode 0600) in the target's folder, fsync, rename, fsync of the folder. Dropped
/// before [`SegmentWriter::finish`], it removes the temporary file.
pub struct SegmentWriter {
    layout: Arc<StorageLayout>,
    format: UploadFormat,
    path: PathBuf,
    writer: ArrowWriter<NamedTempFile>,
    rows: usize,
}

impl SegmentWriter {
    pub(crate) fn create(
        path: &Path,
        layout: Arc<StorageLayout>,
        format: UploadFormat,
    ) -> Result<Self> {
        let tmp = NamedTempFile::new_in(parent_dir(path))?;
        let props = layout.writer_properties();
        let writer = ArrowWriter::try_new(tmp, layout.storage.clone(), Some(props))?;
        Ok(SegmentWriter {
            layout,
            format,
            path: path.to_path_buf(),
            writer,
            rows: 0,
        })
    }

    /// Validates and appends one batch in the writer's upload format.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let stored = self.layout.stored_parts(self.format, batch)?;
        self.rows += stored.num_rows();
        self.writer.write(&stored)?;
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn layout(&self) -> &Arc<StorageLayout> {
        &self.layout
    }

    /// Makes the segment durable under its final name; returns its row count.
    pub fn finish(self) -> Result<usize> {
        let tmp = self.writer.into_inner()?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path)
            .map_err(|e| HedfError::Io(e.error))?;
        File::open(parent_dir(&self.path))?.sync_all()?;
        Ok(self.rows)
    }
}

/// The folder a file lives in; a bare file name's parent is "", the current folder.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
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
    let (body_width, seed_width) = (crypto.bodies_width(), SEED_BYTES);
    if bodies.value_length() as usize != body_width || seeds.value_length() as usize != seed_width {
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
            let seed = &seed_bytes[i * seed_width..(i + 1) * seed_width];
            assemble_cell(
                cell,
                &header,
                rows.value(i),
                seed,
                &body_bytes[i * body_width..(i + 1) * body_width],
            );
        }
    }
    Ok(FixedSizeBinaryArray::new(
        width as i32,
        Buffer::from_vec(out),
        bodies.nulls().cloned(),
    ))
}
