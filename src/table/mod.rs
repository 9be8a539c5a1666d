//! `EncryptedTable`: a DataFusion `TableProvider` over a folder of encrypted Parquet files.
//!
//! Plaintext dimension columns are ordinary Parquet columns, so DataFusion prunes and filters
//! them as usual; measure columns are stored compactly (see the `storage` module) and re-assembled into
//! cells on the fly by `CellAssembleExec`, one batch at a time. The provider holds no key.

mod exec;
pub mod files;
pub(crate) mod storage;
mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::table_schema::TableSchema;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::Result as DfResult;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::crypto::keys::KeyId;
use crate::error::{HedfError, Result};
use exec::CellAssembleExec;
use storage::ColumnLayout;
pub(crate) use storage::StorageLayout;
pub use storage::{SegmentWriter, UploadFormat};
pub use store::SegmentStore;

/// One Parquet file of a table, as the table knows it: where the engine reads it, where it is on
/// disk, and the size and rows it must have. A missing, short or replaced file is an error
/// naming the table, never a silently smaller answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentFile {
    /// The file's path in the table's object store.
    pub location: object_store::path::Path,
    /// The same file on the local disk.
    pub local: PathBuf,
    pub bytes: u64,
    pub rows: u64,
}

impl SegmentFile {
    /// Describes a segment from the file as it is now (its size and footer row count).
    pub fn measure(location: object_store::path::Path, local: &Path) -> Result<Self> {
        let file = std::fs::File::open(local)?;
        let bytes = file.metadata()?.len();
        let footer = ParquetRecordBatchReaderBuilder::try_new(file)?;
        Ok(SegmentFile {
            location,
            local: local.to_path_buf(),
            bytes,
            rows: footer.metadata().file_metadata().num_rows() as u64,
        })
    }

    /// Why this segment no longer is what the table recorded, if it is not.
    fn damage(&self) -> Option<String> {
        let name = self.location.filename().unwrap_or_default();
        match std::fs::metadata(&self.local) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(format!("segment {name} is missing"))
            }
            Err(e) => Some(format!("segment {name} cannot be read ({})", e.kind())),
            Ok(m) if m.len() != self.bytes => Some(format!(
                "segment {name} has {} bytes, {} were written",
                m.len(),
                self.bytes
            )),
            Ok(_) => None,
        }
    }
}

/// An encrypted table stored as Parquet segments.
#[derive(Debug)]
pub struct EncryptedTable {
    /// The table's name, for errors.
    name: String,
    layout: Arc<StorageLayout>,
    store: ObjectStoreUrl,
    segments: Vec<SegmentFile>,
    rows: u64,
}

impl EncryptedTable {
    /// Creates the table folder and writes `batches` (encrypted, see [`crate::crypto::client::Encryptor`])
    /// as its first file. Fails if the folder already holds a table.
    pub fn create(dir: &Path, schema: SchemaRef, batches: &[RecordBatch]) -> Result<Self> {
        Self::create_streaming(dir, schema, batches.iter().cloned().map(Ok))
    }

    /// Like [`Self::create`], writing batches as they come: memory stays bounded by one batch,
    /// e.g. with an [`crate::crypto::client::Encryptor`] mapped over a file reader (see [`crate::table::files`]).
    pub fn create_streaming<I>(dir: &Path, schema: SchemaRef, batches: I) -> Result<Self>
    where
        I: IntoIterator<Item = Result<RecordBatch>>,
    {
        let layout = Arc::new(StorageLayout::from_engine(&schema)?);
        std::fs::create_dir_all(dir)?;
        if data_files(dir)?.next().is_some() {
            return Err(HedfError::Invalid(format!(
                "a table already exists in {}",
                dir.display()
            )));
        }
        let mut writer =
            SegmentWriter::create(&dir.join("part-00000.parquet"), layout, UploadFormat::Cells)?;
        for batch in batches {
            writer.write(&batch?)?;
        }
        writer.finish()?;
        Self::open(dir)
    }

    /// Opens a table folder written by [`Self::create`], read through DataFusion's local file
    /// system store (the embedded API: the process owns the folder).
    pub fn open(dir: &Path) -> Result<Self> {
        let segments = data_files(dir)?
            .map(|file| {
                let file = file.canonicalize()?;
                let location = object_store::path::Path::from_absolute_path(&file)
                    .map_err(|e| HedfError::Invalid(format!("{}: {e}", file.display())))?;
                SegmentFile::measure(location, &file)
            })
            .collect::<Result<Vec<_>>>()?;
        if segments.is_empty() {
            return Err(HedfError::Invalid(format!("no table in {}", dir.display())));
        }
        let name = dir.display().to_string();
        Self::from_segments(&name, ObjectStoreUrl::local_filesystem(), segments)
    }

    /// Opens a table made of `segments` (all written with one layout), read from the object
    /// store the session knows as `store`. Every segment is checked against what was recorded:
    /// present, same size, same row count.
    pub fn from_segments(
        name: &str,
        store: ObjectStoreUrl,
        segments: Vec<SegmentFile>,
    ) -> Result<Self> {
        let damaged = |why: String| HedfError::Damaged {
            table: name.to_string(),
            why,
        };
        let mut layout: Option<Arc<StorageLayout>> = None;
        let mut rows = 0u64;
        for segment in &segments {
            if let Some(why) = segment.damage() {
                return Err(damaged(why));
            }
            let file = std::fs::File::open(&segment.local)?;
            let footer = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| {
                damaged(format!(
                    "segment {} is not a readable Parquet file ({e})",
                    segment.location
                ))
            })?;
            let found = footer.metadata().file_metadata().num_rows() as u64;
            if found != segment.rows {
                return Err(damaged(format!(
                    "segment {} holds {found} rows, {} were written",
                    segment.location, segment.rows
                )));
            }
            rows += found;
            let stored = StorageLayout::from_storage(footer.schema())?;
            match &layout {
                None => layout = Some(Arc::new(stored)),
                Some(first) => first.check_compatible(&stored).map_err(|_| {
                    damaged(format!(
                        "segment {} has other columns than the table",
                        segment.location
                    ))
                })?,
            }
        }
        let layout =
            layout.ok_or_else(|| HedfError::Invalid("a table needs at least one file".into()))?;
        Ok(EncryptedTable {
            name: name.to_string(),
            layout,
            store,
            segments,
            rows,
        })
    }

    /// Rows in all of the table's files.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The table's segments, as recorded.
    pub fn segments(&self) -> &[SegmentFile] {
        &self.segments
    }

    /// The layout of this table's stored parts.
    pub(crate) fn layout(&self) -> &Arc<StorageLayout> {
        &self.layout
    }

    /// The key id every encrypted column of this table carries.
    pub fn key_id(&self) -> Option<KeyId> {
        self.layout.key_id
    }

    /// The Parquet scan of the stored columns `stored`, with `filters` (on plaintext columns)
    /// as a pruning predicate; the segments are spread over the session's target partitions.
    async fn scan_segments(
        &self,
        state: &dyn Session,
        stored: Vec<usize>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if let Some(why) = self.segments.iter().find_map(SegmentFile::damage) {
            return Err(HedfError::Damaged {
                table: self.name.clone(),
                why,
            }
            .into());
        }
        let format = ParquetFormat::default();
        let mut source = format.file_source(TableSchema::from(self.layout.storage.clone()));
        // Filters name the table as the query did; the stored schema has bare names.
        let unqualified = filters
            .iter()
            .map(|f| {
                f.clone()
                    .transform(|e| match e {
                        Expr::Column(c) => {
                            Ok(Transformed::yes(Expr::Column(Column::from_name(c.name))))
                        }
                        other => Ok(Transformed::no(other)),
                    })
                    .map(|t| t.data)
            })
            .collect::<DfResult<Vec<_>>>()?;
        if let Some(predicate) = conjunction(unqualified) {
            let schema = DFSchema::try_from(self.layout.storage.as_ref().clone())?;
            let predicate = state.create_physical_expr(predicate, &schema)?;
            if let Some(parquet) = source.downcast_ref::<ParquetSource>() {
                source = Arc::new(parquet.with_predicate(predicate));
            }
        }
        let partitions = state.config().target_partitions().max(1);
        let per_group = self.segments.len().div_ceil(partitions).max(1);
        let groups = self
            .segments
            .chunks(per_group)
            .map(|chunk| {
                FileGroup::new(
                    chunk
                        .iter()
                        .map(|s| PartitionedFile::new(s.location.to_string(), s.bytes))
                        .collect(),
                )
            })
            .collect();
        let config = FileScanConfigBuilder::new(self.store.clone(), source)
            .with_file_groups(groups)
            .with_projection_indices(Some(stored))?
            .with_limit(limit)
            .build();
        format.create_physical_plan(state, config).await
    }
}

fn data_files(dir: &Path) -> Result<impl Iterator<Item = PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    Ok(files.into_iter())
}

#[async_trait]
impl TableProvider for EncryptedTable {
    fn schema(&self) -> SchemaRef {
        self.layout.engine.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Filters on plaintext columns go to the Parquet scan (row-group pruning); DataFusion
    /// re-applies them. Filters touching ciphertext never reach here (see `guard`).
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                let plain = f.column_refs().iter().all(|c| {
                    self.layout
                        .engine
                        .index_of(&c.name)
                        .is_ok_and(|i| matches!(self.layout.columns[i], ColumnLayout::Plain { .. }))
                });
                if plain {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let projection: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..self.layout.engine.fields().len()).collect());
        let mut stored: Vec<usize> = Vec::new();
        let mut position = |i: usize| match stored.iter().position(|&s| s == i) {
            Some(p) => p,
            None => {
                stored.push(i);
                stored.len() - 1
            }
        };
        let columns: Vec<ColumnLayout> = projection
            .iter()
            .map(|&i| match &self.layout.columns[i] {
                ColumnLayout::Plain { storage } => ColumnLayout::Plain {
                    storage: position(*storage),
                },
                ColumnLayout::Cell {
                    marking,
                    body,
                    row,
                    seed,
                } => ColumnLayout::Cell {
                    marking: *marking,
                    body: position(*body),
                    row: position(*row),
                    seed: position(*seed),
                },
            })
            .collect();
        let input = self.scan_segments(state, stored, filters, limit).await?;
        let schema = Arc::new(self.layout.engine.project(&projection)?);
        Ok(Arc::new(CellAssembleExec::new(input, schema, columns)))
    }
}
