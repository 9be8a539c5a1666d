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
use crate::table::EncryptedTable;

const BATCH_ROWS: usize = 65_536;

/// Batches read from a file, one at a time.
pub type BatchStream = Box<dyn Iterator<Item = Result<RecordBatch>>>;

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

/// Encrypts `input`'s `measures` (other columns stay plaintext) into a new table at `table_dir`.
pub fn encrypt_file(
    key: &ClientKey,
    input: &Path,
    measures: &[MeasureColumn],
    table_dir: &Path,
) -> Result<EncryptedTable> {
    let (schema, batches) = read_file(input, measures)?;
    let resolved = if measures.iter().any(|m| m.precision.is_none()) {
        infer_precisions(&schema, measures, batches)?
    } else {
        measures.to_vec()
    };
    let mut encryptor = Encryptor::new(key, &schema, &resolved)?;
    let (_, batches) = read_file(input, measures)?;
    EncryptedTable::create_streaming(
        table_dir,
        encryptor.schema(),
        batches.map(move |b| encryptor.encrypt(&b?)),
    )
}
