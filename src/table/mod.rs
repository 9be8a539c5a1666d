//! `EncryptedTable`: a DataFusion `TableProvider` over a folder of encrypted Parquet files.
//!
//! Plaintext dimension columns are ordinary Parquet columns, so DataFusion prunes and filters
//! them as usual; measure columns are stored compactly (see [`storage`]) and re-assembled into
//! cells on the fly by `CellAssembleExec`, one batch at a time. The provider holds no key.

mod exec;
pub(crate) mod storage;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{HedfError, Result};
use crate::keys::KeyId;
use exec::CellAssembleExec;
use storage::ColumnLayout;
pub(crate) use storage::StorageLayout;
pub use storage::{SegmentWriter, UploadFormat};

/// An encrypted table stored as Parquet files in one folder.
#[derive(Debug)]
pub struct EncryptedTable {
    layout: Arc<StorageLayout>,
    files: ListingTable,
    rows: u64,
}

impl EncryptedTable {
    /// Creates the table folder and writes `batches` (encrypted, see [`crate::client::Encryptor`])
    /// as its first file. Fails if the folder already holds a table.
    pub fn create(dir: &Path, schema: SchemaRef, batches: &[RecordBatch]) -> Result<Self> {
        Self::create_streaming(dir, schema, batches.iter().cloned().map(Ok))
    }

    /// Like [`Self::create`], writing batches as they come: memory stays bounded by one batch,
    /// e.g. with an [`crate::client::Encryptor`] mapped over a file reader (see [`crate::ingest`]).
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

    /// Opens a table folder written by [`Self::create`].
    pub fn open(dir: &Path) -> Result<Self> {
        let files: Vec<PathBuf> = data_files(dir)?.collect();
        if files.is_empty() {
            return Err(HedfError::Invalid(format!("no table in {}", dir.display())));
        }
        Self::from_files(&files)
    }

    /// Opens a table made of the given Parquet segments (all written with one layout).
    pub fn from_files(files: &[PathBuf]) -> Result<Self> {
        let first = files
            .first()
            .ok_or_else(|| HedfError::Invalid("a table needs at least one file".into()))?;
        let stored = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(first)?)?
            .schema()
            .clone();
        let mut rows = 0u64;
        for file in files {
            let footer = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file)?)?;
            rows += footer.metadata().file_metadata().num_rows() as u64;
        }
        let layout = Arc::new(StorageLayout::from_storage(&stored)?);
        let urls = files
            .iter()
            .map(|f| {
                ListingTableUrl::parse(f.canonicalize()?.display().to_string())
                    .map_err(HedfError::from)
            })
            .collect::<Result<Vec<_>>>()?;
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(layout.storage.clone());
        Ok(EncryptedTable {
            files: ListingTable::try_new(config)?,
            layout,
            rows,
        })
    }

    /// Rows in all of the table's files.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The layout of this table's stored parts.
    pub(crate) fn layout(&self) -> &Arc<StorageLayout> {
        &self.layout
    }

    /// The key id every encrypted column of this table carries.
    pub fn key_id(&self) -> Option<KeyId> {
        self.layout.key_id
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
                    crypto,
                    body,
                    row,
                    seed,
                } => ColumnLayout::Cell {
                    crypto: *crypto,
                    body: position(*body),
                    row: position(*row),
                    seed: position(*seed),
                },
            })
            .collect();
        let input = self
            .files
            .scan(state, Some(&stored), filters, limit)
            .await?;
        let schema = Arc::new(self.layout.engine.project(&projection)?);
        Ok(Arc::new(CellAssembleExec::new(input, schema, columns)))
    }
}
