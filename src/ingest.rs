//! Encrypting CSV and Parquet files into encrypted tables, streaming: two passes over the file
//! when a precision must be inferred, one otherwise; memory stays bounded by one batch.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::csv::reader::Format;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::client::{infer_precisions, Encryptor, MeasureColumn};
use crate::error::{HedfError, Result};
use crate::keys::ClientKey;
use crate::table::{EncryptedTable, SegmentWriter, StorageLayout, UploadFormat};

const BATCH_ROWS: usize = 65_536;

/// Batches read from a file, one at a time.
pub type BatchStream = Box<dyn Iterator<Item = Result<RecordBatch>> + Send>;

/// Plaintext batches of a `.csv` (with header) or `.parquet` file. CSV measure columns are read
/// as text so decimals are parsed exactly, never through a float.
pub fn read_file(path: &Path, measures: &[MeasureColumn]) -> Result<(SchemaRef, BatchStream)> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => {
            let format = Format::default().with_header(true);
            let (inferred, _) = format.infer_schema(File::open(path)?, Some(10_000))?;
            let fields: Vec<Field> = inferred
                .fields()
                .iter()
                .map(|f| {
                    let measure = measures.iter().any(|m| &m.name == f.name());
                    Field::new(
                        f.name(),
                        if measure {
                            DataType::Utf8
                        } else {
                            f.data_type().clone()
                        },
                        true,
                    )
                })
                .collect();
            let schema = Arc::new(Schema::new(fields));
            let reader = arrow::csv::ReaderBuilder::new(schema.clone())
                .with_format(format)
                .with_batch_size(BATCH_ROWS)
                .build(File::open(path)?)?;
            Ok((schema, Box::new(reader.map(|b| b.map_err(HedfError::from)))))
        }
        Some("parquet") => {
            let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?
                .with_batch_size(BATCH_ROWS);
            let schema = builder.schema().clone();
            Ok((
                schema,
                Box::new(builder.build()?.map(|b| b.map_err(HedfError::from))),
            ))
        }
        _ => Err(HedfError::Invalid(format!(
            "{}: expected a .csv or .parquet file",
            path.display()
        ))),
    }
}

/// An encryptor for `input`'s measures; a first pass over the file infers any precision not
/// given.
fn file_encryptor<'k>(
    key: &'k ClientKey,
    input: &Path,
    measures: &[MeasureColumn],
) -> Result<Encryptor<'k>> {
    let (schema, batches) = read_file(input, measures)?;
    let resolved = if measures.iter().any(|m| m.precision.is_none()) {
        infer_precisions(&schema, measures, batches)?
    } else {
        measures.to_vec()
    };
    Encryptor::new(key, &schema, &resolved)
}

/// Encrypts `input`'s `measures` into one Parquet file in hedf's stored layout (what a server
/// keeps and what `hedf upload` or any Flight SQL client can ingest). Returns the row count.
pub fn encrypt_to_parquet(
    key: &ClientKey,
    input: &Path,
    measures: &[MeasureColumn],
    out: &Path,
) -> Result<usize> {
    let mut encryptor = file_encryptor(key, input, measures)?;
    let layout = Arc::new(StorageLayout::from_engine(&encryptor.schema())?);
    let mut writer = SegmentWriter::create(out, layout, UploadFormat::Cells)?;
    let (_, batches) = read_file(input, measures)?;
    for batch in batches {
        writer.write(&encryptor.encrypt(&batch?)?)?;
    }
    writer.finish()
}

/// Reads an encrypted Arrow file (`.parquet`, or `.arrow` IPC file or stream) as batches.
pub fn read_encrypted(path: &Path) -> Result<(SchemaRef, BatchStream)> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => read_file(path, &[]),
        Some("arrow" | "arrows" | "ipc" | "feather") => {
            if let Ok(reader) = arrow::ipc::reader::FileReader::try_new(File::open(path)?, None) {
                let schema = reader.schema();
                return Ok((schema, Box::new(reader.map(|b| b.map_err(HedfError::from)))));
            }
            let reader = arrow::ipc::reader::StreamReader::try_new(
                std::io::BufReader::new(File::open(path)?),
                None,
            )?;
            let schema = reader.schema();
            Ok((schema, Box::new(reader.map(|b| b.map_err(HedfError::from)))))
        }
        _ => Err(HedfError::Invalid(format!(
            "{}: expected a .parquet or .arrow file",
            path.display()
        ))),
    }
}

/// Encrypts `input`'s `measures` (other columns stay plaintext) into a new table at `table_dir`.
pub fn encrypt_file(
    key: &ClientKey,
    input: &Path,
    measures: &[MeasureColumn],
    table_dir: &Path,
) -> Result<EncryptedTable> {
    let mut encryptor = file_encryptor(key, input, measures)?;
    let (_, batches) = read_file(input, measures)?;
    EncryptedTable::create_streaming(
        table_dir,
        encryptor.schema(),
        batches.map(move |b| encryptor.encrypt(&b?)),
    )
}
