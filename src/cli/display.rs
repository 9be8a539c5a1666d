//! How results are shown to a person: a bordered table, CSV, JSON, or the seed's grouped
//! layout (group keys as an index, measures side by side).

use std::io::Write;

use arrow::datatypes::Schema;
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::crypto::cell::META_KIND;
use crate::error::Result;

/// An output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
    /// Group keys as an index, measures side by side, as the original prototype printed.
    Pivot,
}

/// Writes `batches` (already decrypted) in `format`. `encrypted` is the schema as the server
/// sent it: its leading plaintext columns are the pivot's index.
pub fn write(
    out: &mut dyn Write,
    format: Format,
    encrypted: &Schema,
    batches: &[RecordBatch],
) -> Result<()> {
    match format {
        Format::Table => writeln!(
            out,
            "{}",
            arrow::util::pretty::pretty_format_batches(batches)?
        )?,
        Format::Csv => {
            let mut writer = arrow::csv::Writer::new(out);
            for batch in batches {
                writer.write(batch)?;
            }
        }
        Format::Json => {
            let mut writer = arrow::json::ArrayWriter::new(out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            writeln!(writer.into_inner())?;
        }
        Format::Pivot => {
            let keys = encrypted
                .fields()
                .iter()
                .take_while(|f| !f.metadata().contains_key(META_KIND))
                .count();
            if keys == 0 || keys == encrypted.fields().len() {
                return write(out, Format::Table, encrypted, batches);
            }
            write!(out, "{}", format_grouped(batches, keys)?)?;
        }
    }
    Ok(())
}

/// Prints grouped results the way pandas printed the seed's tables: the index columns on the
/// left (a repeated outer label left blank), one right-aligned column per measure.
pub fn format_grouped(batches: &[RecordBatch], key_columns: usize) -> Result<String> {
    let Some(first) = batches.first() else {
        return Ok(String::new());
    };
    let schema = first.schema();
    let names: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let options = FormatOptions::default().with_null("NaN");
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for r in 0..batch.num_rows() {
            rows.push(formatters.iter().map(|f| f.value(r).to_string()).collect());
        }
    }
    let width = |c: usize| {
        rows.iter()
            .map(|r| r[c].len())
            .chain([names[c].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..names.len()).map(width).collect();
    let key_width: usize = widths[..key_columns].iter().map(|w| w + 1).sum();
    let mut out = format!("{:key_width$}", "");
    for c in key_columns..names.len() {
        out += &format!("{:>w$}", names[c], w = widths[c] + 2);
    }
    out += "\n";
    out += &(0..key_columns)
        .map(|c| format!("{:w$}", names[c], w = widths[c]))
        .collect::<Vec<_>>()
        .join(" ");
    out += "\n";
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for c in 0..key_columns {
            let repeated =
                i > 0 && (0..=c).all(|k| rows[i - 1][k] == row[k]) && c + 1 < key_columns;
            line += &format!("{:w$} ", if repeated { "" } else { &row[c] }, w = widths[c]);
        }
        for c in key_columns..names.len() {
            line += &format!("{:>w$}", row[c], w = widths[c] + 2);
        }
        out += line.trim_end();
        out += "\n";
    }
    Ok(out)
}
