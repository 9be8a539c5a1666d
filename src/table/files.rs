//! Encrypting CSV and Parquet files into encrypted tables, streaming: two passes over the file
//! when a precision must be inferred, one otherwise; memory stays bounded by one batch.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::AsArray;
use arrow::csv::reader::Format;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::crypto::cell::ColumnMarking;
use crate::crypto::client::{infer_precisions, Encryptor, MeasureColumn};
use crate::crypto::keys::ClientKey;
use crate::error::{HedfError, Result};
use crate::table::{EncryptedTable, SegmentWriter, StorageLayout, UploadFormat};

const BATCH_ROWS: usize = 65_536;

/// Batches read from a file, one at a time.
pub type BatchStream = Box<dyn Iterator<Item = Result<RecordBatch>> + Send>;

/// Opens `path`, naming it in the error.
fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| HedfError::Invalid(format!("cannot open {}: {e}", path.display())))
}

/// Plaintext batches of a `.csv` (with header) or `.parquet` file. CSV measure columns are read
/// as text so decimals are parsed exactly, never through a float.
pub fn read_file(path: &Path, measures: &[MeasureColumn]) -> Result<(SchemaRef, BatchStream)> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => {
            let format = Format::default().with_header(true);
            let (inferred, _) = format.infer_schema(open(path)?, Some(10_000))?;
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
                .build(open(path)?)?;
            Ok((schema, Box::new(reader.map(|b| b.map_err(HedfError::from)))))
        }
        Some("parquet") => {
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(open(path)?)?.with_batch_size(BATCH_ROWS);
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

/// The measures to encrypt when the user did not say: `names`, else every numeric column;
/// `scale`, else per column the most decimal places any value is written with. Inferring the
/// scale reads the file once and also fixes each column's precision.
pub fn resolve_measures(
    input: &Path,
    names: Option<&[String]>,
    scale: Option<i8>,
) -> Result<Vec<MeasureColumn>> {
    let names: Vec<String> = match names {
        Some(names) => names.iter().map(|n| n.trim().to_string()).collect(),
        None => {
            let (schema, _) = read_file(input, &[])?;
            schema
                .fields()
                .iter()
                .filter(|f| f.data_type().is_numeric())
                .map(|f| f.name().clone())
                .collect()
        }
    };
    if names.is_empty() {
        return Err(HedfError::Invalid(format!(
            "{}: no numeric columns to encrypt; name them with --measures",
            input.display()
        )));
    }
    let as_text: Vec<MeasureColumn> = names.iter().map(|n| MeasureColumn::new(n, 0)).collect();
    let Some(scale) = scale else {
        return infer_scales(input, &as_text);
    };
    Ok(names
        .into_iter()
        .map(|n| MeasureColumn::new(n, scale))
        .collect())
}

/// One pass: each measure's scale (most significant decimals) and precision.
fn infer_scales(input: &Path, measures: &[MeasureColumn]) -> Result<Vec<MeasureColumn>> {
    let (schema, batches) = read_file(input, measures)?;
    let columns: Vec<usize> = measures
        .iter()
        .map(|m| {
            schema
                .index_of(&m.name)
                .map_err(|_| HedfError::Invalid(format!("no column {:?} to encrypt", m.name)))
        })
        .collect::<Result<_>>()?;
    let mut shapes = vec![(0usize, 0usize); measures.len()];
    let mut row0 = 0;
    for batch in batches {
        let batch = batch?;
        for ((m, &col), (int_max, frac_max)) in measures.iter().zip(&columns).zip(&mut shapes) {
            let text = arrow::compute::cast(batch.column(col), &DataType::Utf8)?;
            for (r, value) in text.as_string::<i32>().iter().enumerate() {
                let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
                    continue;
                };
                let (int, frac) = decimal_shape(value).ok_or_else(|| HedfError::Encoding {
                    column: m.name.clone(),
                    row: row0 + r,
                    why: format!("{value:?} is not a decimal number"),
                })?;
                *int_max = (*int_max).max(int);
                *frac_max = (*frac_max).max(frac);
            }
        }
        row0 += batch.num_rows();
    }
    measures
        .iter()
        .zip(shapes)
        .map(|(m, (int, frac))| {
            let precision = u8::try_from((int + frac).max(1)).unwrap_or(u8::MAX);
            let scale = i8::try_from(frac).unwrap_or(i8::MAX);
            Ok(MeasureColumn::new(m.name.clone(), scale).with_precision(precision))
        })
        .collect()
}

/// Integer digits (leading zeros dropped) and written decimal places of a plain decimal:
/// `-012.50` -> (2, 2), so a column written with one decimal keeps scale 1 even where it is 0.
fn decimal_shape(text: &str) -> Option<(usize, usize)> {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    Some((int.trim_start_matches('0').len(), frac.len()))
}

/// An encryptor for `input`'s measures; a first pass over the file infers any precision not
/// given.
fn file_encryptor(key: &ClientKey, input: &Path, measures: &[MeasureColumn]) -> Result<Encryptor> {
    let (schema, batches) = read_file(input, measures)?;
    let resolved = if measures.iter().any(|m| m.precision.is_none()) {
        infer_precisions(&schema, measures, batches)?
    } else {
        measures.to_vec()
    };
    Encryptor::new(key, &schema, &resolved)
}

/// Encrypts `input`'s `measures` into one Parquet file in hedf's stored layout (what a server
/// keeps and what `hedf upload` or any Flight SQL client can ingest), calling `on_progress`
/// with the rows done after each batch. Returns the row count.
pub fn encrypt_to_parquet(
    key: &ClientKey,
    input: &Path,
    measures: &[MeasureColumn],
    out: &Path,
    on_progress: &mut dyn FnMut(usize),
) -> Result<usize> {
    let mut encryptor = file_encryptor(key, input, measures)?;
    let layout = Arc::new(StorageLayout::from_engine(&encryptor.schema())?);
    let mut writer = SegmentWriter::create(out, layout, UploadFormat::Cells)?;
    let (_, batches) = read_file(input, measures)?;
    // Parsing runs on its own thread, ahead of encryption by up to two batches: parsing alone
    // took as long as encrypting on both cores.
    std::thread::scope(|scope| {
        let (sender, receiver) = std::sync::mpsc::sync_channel(2);
        scope.spawn(move || {
            for batch in batches {
                if sender.send(batch).is_err() {
                    break;
                }
            }
        });
        for batch in receiver {
            writer.write(&encryptor.encrypt(&batch?)?)?;
            on_progress(writer.rows());
        }
        Ok::<_, HedfError>(())
    })?;
    writer.finish()
}

/// One line per encrypted column of a Parquet file written by [`encrypt_to_parquet`]: its limbs,
/// stored bytes per value and the rows a sum of it may hold.
pub fn encoding_report(path: &Path) -> Result<String> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?;
    let lines: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .filter_map(|f| {
            ColumnMarking::from_metadata(f.metadata())
                .transpose()
                .map(|m| (f.name(), m))
        })
        .map(|(name, marking)| {
            let spec = marking?.crypto.spec;
            Ok(format!(
                "{name}: {} limb(s) of {} bits, delta 2^{}, {} B/value, sums of up to {} rows",
                spec.limbs,
                spec.limb_bits,
                spec.log2_delta,
                spec.bytes_per_value(),
                spec.max_rows()
            ))
        })
        .collect::<Result<_>>()?;
    Ok(lines.join("\n"))
}

/// The row count of a Parquet file from its footer; `None` for other files.
pub fn parquet_rows(path: &Path) -> Option<u64> {
    if path.extension().and_then(|e| e.to_str()) != Some("parquet") {
        return None;
    }
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).ok()?).ok()?;
    u64::try_from(builder.metadata().file_metadata().num_rows()).ok()
}

/// Reads an encrypted Arrow file (`.parquet`, or `.arrow` IPC file or stream) as batches.
pub fn read_encrypted(path: &Path) -> Result<(SchemaRef, BatchStream)> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => read_file(path, &[]),
        Some("arrow" | "arrows" | "ipc" | "feather") => {
            if let Ok(reader) = arrow::ipc::reader::FileReader::try_new(open(path)?, None) {
                let schema = reader.schema();
                return Ok((schema, Box::new(reader.map(|b| b.map_err(HedfError::from)))));
            }
            let reader = arrow::ipc::reader::StreamReader::try_new(
                std::io::BufReader::new(open(path)?),
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
