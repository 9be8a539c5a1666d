//! `hedf sql`: an interactive SQL shell (and script runner) that decrypts results on the way
//! to the screen. SQL runs where the [`Connection`] points; the key stays in this process.
//!
//! Input is SQL ending in `;` (possibly over several lines) or a backslash command at the
//! start of a statement, as in psql and datafusion-cli.

mod command;

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use rustyline::error::ReadlineError;

pub use command::Command;

use crate::cli::connection::Connection;
use crate::cli::display::{self, Format};
use crate::cli::split;
use crate::crypto::cell::{ColumnCrypto, ColumnMarking};
use crate::crypto::client::decrypt_readable;
use crate::crypto::keys::ClientKey;
use crate::error::{HedfError, Result};

/// What the shell does after an input.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Quit,
}

/// A shell session: where SQL runs, the key results are decrypted with, output settings.
pub struct Session {
    connection: Connection,
    key: Option<Arc<ClientKey>>,
    format: Format,
    /// The format `\pivot` returns to.
    unpivoted: Format,
    timing: bool,
    /// Row counts after tables (interactive use only; scripts get bare output).
    footer: bool,
    warned_no_key: bool,
}

type Step<'a> = Pin<Box<dyn Future<Output = Result<Flow>> + 'a>>;

impl Session {
    pub fn new(connection: Connection, key: Option<ClientKey>, format: Format) -> Self {
        Session {
            connection,
            key: key.map(Arc::new),
            format,
            unpivoted: if format == Format::Pivot {
                Format::Table
            } else {
                format
            },
            timing: false,
            footer: false,
            warned_no_key: false,
        }
    }

    /// The banner line an interactive session starts with.
    pub fn banner(&self) -> String {
        let key = match &self.key {
            Some(key) => format!("key {}", key.id()),
            None => "no key loaded: encrypted values show as <encrypted>".into(),
        };
        format!(
            "hedf sql: {} ({key}). \\? for help, \\q to quit.",
            self.connection.label()
        )
    }

    /// Runs a script: statements and backslash commands, stopping at the first error.
    pub fn run_script<'a>(&'a mut self, text: &'a str, out: &'a mut dyn Write) -> Step<'a> {
        Box::pin(async move {
            let (inputs, rest) = split_inputs(text);
            for input in inputs.iter().map(String::as_str).chain(Some(rest.trim())) {
                if !input.is_empty() && self.run(input, out).await? == Flow::Quit {
                    return Ok(Flow::Quit);
                }
            }
            Ok(Flow::Continue)
        })
    }

    /// Runs one complete input: a backslash command or one SQL statement.
    pub async fn run(&mut self, input: &str, out: &mut dyn Write) -> Result<Flow> {
        let input = input.trim();
        if let Some(command) = input.strip_prefix('\\') {
            return self.execute(command.parse()?, out).await;
        }
        self.sql(input.trim_end_matches(';'), out).await?;
        Ok(Flow::Continue)
    }

    async fn sql(&mut self, sql: &str, out: &mut dyn Write) -> Result<()> {
        let started = Instant::now();
        // The query runs as a task: inside one, DataFusion's operators yield to the scheduler
        // (tokio's cooperative budget), so aborting it stops a local plan mid-way and resets a
        // server call. With a key, what the server cannot do on ciphertext is finished here.
        let mut task = match &self.key {
            Some(key) => tokio::spawn(split::query(
                self.connection.clone(),
                key.clone(),
                sql.to_string(),
            )),
            None => tokio::spawn(self.connection.query(sql)),
        };
        let (schema, batches) = tokio::select! {
            result = &mut task => result.map_err(HedfError::internal)??,
            _ = tokio::signal::ctrl_c() => {
                task.abort();
                return Err(HedfError::Cancelled("query cancelled"));
            }
        };
        let elapsed = started.elapsed();
        if schema.fields().is_empty() {
            if matches!(self.format, Format::Table | Format::Pivot) {
                writeln!(out, "OK")?;
            }
        } else {
            self.show(&schema, batches, out)?;
        }
        if self.timing {
            writeln!(out, "Time: {:.3} ms", elapsed.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }

    /// Decrypts what the loaded key can, prints, then reports columns it could not decrypt.
    fn show(
        &mut self,
        schema: &SchemaRef,
        mut batches: Vec<RecordBatch>,
        out: &mut dyn Write,
    ) -> Result<()> {
        if batches.is_empty() {
            batches.push(RecordBatch::new_empty(schema.clone()));
        }
        let mut shown = Vec::with_capacity(batches.len());
        let mut refused = Vec::new();
        for batch in &batches {
            let (batch, mismatches) = decrypt_readable(self.key.as_deref(), batch)?;
            shown.push(batch);
            refused.extend(mismatches);
        }
        display::write(out, self.format, schema, &shown)?;
        let rows: usize = shown.iter().map(RecordBatch::num_rows).sum();
        if self.footer && matches!(self.format, Format::Table | Format::Pivot) {
            writeln!(out, "({rows} {})", if rows == 1 { "row" } else { "rows" })?;
        }
        if self.key.is_none() && !self.warned_no_key && is_encrypted(schema) {
            self.warned_no_key = true;
            eprintln!("note: no key loaded (--key DIR), so encrypted values are not shown");
        }
        let more = refused.len().saturating_sub(1);
        match refused.into_iter().next() {
            Some(HedfError::KeyMismatch {
                what,
                found,
                loaded,
            }) if more > 0 => Err(HedfError::KeyMismatch {
                what: format!("{what} (and {more} more)"),
                found,
                loaded,
            }),
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs one backslash command.
    pub async fn execute(&mut self, command: Command, out: &mut dyn Write) -> Result<Flow> {
        match command {
            Command::Quit => return Ok(Flow::Quit),
            Command::Help => writeln!(out, "{}", Command::help())?,
            Command::ListTables => {
                let tables = self.connection.tables().await?;
                let listing = list_tables(&tables)?;
                display::write(out, self.plain_format(), &listing.schema(), &[listing])?;
            }
            Command::Describe(table) => {
                let tables = self.connection.tables().await?;
                let (_, schema) = tables
                    .iter()
                    .find(|(name, _)| *name == table)
                    .ok_or(HedfError::NoSuchTable(table))?;
                let columns = describe_table(schema, self.key.as_deref())?;
                display::write(out, self.plain_format(), &columns.schema(), &[columns])?;
            }
            Command::Timing(on) => {
                self.timing = on.unwrap_or(!self.timing);
                writeln!(out, "Timing is {}.", if self.timing { "on" } else { "off" })?;
            }
            Command::Format(format) => {
                if let Some(format) = format {
                    self.format = format;
                    if format != Format::Pivot {
                        self.unpivoted = format;
                    }
                }
                writeln!(out, "Output format is {}.", format_name(self.format))?;
            }
            Command::Pivot => {
                self.format = if self.format == Format::Pivot {
                    self.unpivoted
                } else {
                    Format::Pivot
                };
                writeln!(out, "Output format is {}.", format_name(self.format))?;
            }
            Command::Include(file) => {
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    HedfError::Invalid(format!("cannot read {}: {e}", file.display()))
                })?;
                return self.run_script(&text, out).await;
            }
        }
        Ok(Flow::Continue)
    }

    /// Listings have no measures to pivot.
    fn plain_format(&self) -> Format {
        match self.format {
            Format::Pivot => Format::Table,
            f => f,
        }
    }

    /// Reads input from the terminal until `\q` or Ctrl-D. Errors are printed on one line and
    /// the session goes on.
    /// `ready_in` (key load and connection) is reported in the banner.
    pub async fn interactive(&mut self, history: Option<&Path>, ready_in: Duration) -> Result<()> {
        self.footer = true;
        let mut editor = rustyline::DefaultEditor::new()
            .map_err(|e| HedfError::internal(format!("cannot start the line editor: {e}")))?;
        if let Some(path) = history {
            let _ = editor.load_history(path);
        }
        eprintln!("{} Ready in {} ms.", self.banner(), ready_in.as_millis());
        let mut buffer = String::new();
        loop {
            let prompt = if buffer.is_empty() {
                "hedf> "
            } else {
                "   -> "
            };
            match editor.readline(prompt) {
                Ok(line) => {
                    buffer.push_str(&line);
                    buffer.push('\n');
                    let (inputs, rest) = split_inputs(&buffer);
                    if inputs.is_empty() {
                        if rest.trim().is_empty() {
                            buffer.clear();
                        }
                        continue;
                    }
                    let _ = editor.add_history_entry(buffer.trim());
                    buffer = if rest.trim().is_empty() {
                        String::new()
                    } else {
                        rest
                    };
                    for input in inputs {
                        let mut stdout = std::io::stdout().lock();
                        match self.run(&input, &mut stdout).await {
                            Ok(Flow::Quit) => return save_history(&mut editor, history),
                            Ok(Flow::Continue) => {}
                            Err(e) => eprintln!("error: {}", e.user_message()),
                        }
                    }
                }
                // Ctrl-C at the prompt drops the statement being typed.
                Err(ReadlineError::Interrupted) => buffer.clear(),
                Err(ReadlineError::Eof) => return save_history(&mut editor, history),
                Err(e) => return Err(HedfError::internal(format!("terminal: {e}"))),
            }
        }
    }
}

fn save_history(editor: &mut rustyline::DefaultEditor, history: Option<&Path>) -> Result<()> {
    if let Some(path) = history {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = editor.save_history(path);
    }
    Ok(())
}

/// Where the shell keeps its history: `$HEDF_HISTORY`, else under `$XDG_STATE_HOME` or
/// `~/.local/state`.
pub fn history_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("HEDF_HISTORY") {
        return Some(PathBuf::from(path));
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))?;
    Some(state.join("hedf").join("history"))
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Table => "table",
        Format::Csv => "csv",
        Format::Json => "json",
        Format::Pivot => "pivot",
    }
}

fn is_encrypted(schema: &Schema) -> bool {
    schema
        .fields()
        .iter()
        .any(|f| matches!(ColumnMarking::from_metadata(f.metadata()), Ok(Some(_))))
}

fn strings(values: Vec<String>) -> ArrayRef {
    Arc::new(StringArray::from(values))
}

fn text_batch(columns: Vec<(&str, Vec<String>)>) -> Result<RecordBatch> {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, _)| Field::new(*name, DataType::Utf8, false))
        .collect();
    let arrays = columns.into_iter().map(|(_, v)| strings(v)).collect();
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
}

/// `\d`: one row per table with its column counts and key ids.
fn list_tables(tables: &[(String, SchemaRef)]) -> Result<RecordBatch> {
    let mut names = Vec::new();
    let mut plain = Vec::new();
    let mut encrypted = Vec::new();
    let mut keys = Vec::new();
    for (name, schema) in tables {
        let crypto = column_crypto(schema)?;
        let mut key_ids: Vec<String> = crypto
            .iter()
            .flatten()
            .map(|c| c.key_id.to_string())
            .collect();
        key_ids.dedup();
        names.push(name.clone());
        plain.push(crypto.iter().filter(|c| c.is_none()).count().to_string());
        encrypted.push(crypto.iter().filter(|c| c.is_some()).count().to_string());
        keys.push(key_ids.join(", "));
    }
    text_batch(vec![
        ("table", names),
        ("plaintext columns", plain),
        ("encrypted columns", encrypted),
        ("key id", keys),
    ])
}

/// `\d NAME`: each column, whether it is encrypted, its scale and key id.
fn describe_table(schema: &Schema, key: Option<&ClientKey>) -> Result<RecordBatch> {
    let crypto = column_crypto(schema)?;
    let mut rows: [Vec<String>; 6] = Default::default();
    for (field, crypto) in schema.fields().iter().zip(crypto) {
        let [name, ty, encrypted, scale, key_id, budget] = &mut rows;
        name.push(field.name().clone());
        match crypto {
            Some(c) => {
                ty.push(format!("DECIMAL(38, {})", c.spec.scale));
                encrypted.push("yes".into());
                scale.push(c.spec.scale.to_string());
                let loaded = key.is_some_and(|k| k.id() == c.key_id);
                key_id.push(format!(
                    "{}{}",
                    c.key_id,
                    if loaded { " (loaded)" } else { "" }
                ));
                budget.push(c.spec.max_rows().to_string());
            }
            None => {
                ty.push(field.data_type().to_string());
                encrypted.push("no".into());
                for v in [&mut *scale, &mut *key_id, &mut *budget] {
                    v.push(String::new());
                }
            }
        }
    }
    let [name, ty, encrypted, scale, key_id, budget] = rows;
    text_batch(vec![
        ("column", name),
        ("type", ty),
        ("encrypted", encrypted),
        ("scale", scale),
        ("key id", key_id),
        ("max rows per sum", budget),
    ])
}

fn column_crypto(schema: &Schema) -> Result<Vec<Option<ColumnCrypto>>> {
    schema
        .fields()
        .iter()
        .map(|f| Ok(ColumnMarking::from_metadata(f.metadata())?.map(|m| m.crypto)))
        .collect()
}

/// Splits input into complete statements and backslash commands, returning what remains
/// (an unfinished statement). A statement ends at a `;` outside quotes; comments are dropped;
/// a backslash command is a line of its own at the start of a statement.
pub fn split_inputs(text: &str) -> (Vec<String>, String) {
    let mut inputs = Vec::new();
    let mut current = String::new();
    let (mut quote, mut block_comment) = (None::<char>, false);
    for line in text.split_inclusive('\n') {
        let at_start = current.trim().is_empty() && quote.is_none() && !block_comment;
        if at_start && line.trim_start().starts_with('\\') {
            inputs.push(line.trim().to_string());
            current.clear();
            continue;
        }
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            let next = chars.peek().copied();
            match quote {
                Some(q) => {
                    current.push(c);
                    if c == q {
                        quote = None;
                    }
                }
                None if block_comment => {
                    if c == '*' && next == Some('/') {
                        chars.next();
                        block_comment = false;
                    }
                }
                None => match c {
                    '-' if next == Some('-') => {
                        current.push('\n');
                        break;
                    }
                    '/' if next == Some('*') => {
                        chars.next();
                        block_comment = true;
                    }
                    ';' => {
                        current.push(';');
                        let statement = current.trim();
                        if statement.len() > 1 {
                            inputs.push(statement.to_string());
                        }
                        current.clear();
                    }
                    _ => {
                        if c == '\'' || c == '"' {
                            quote = Some(c);
                        }
                        current.push(c);
                    }
                },
            }
        }
    }
    (inputs, current)
}

#[cfg(test)]
mod tests {
    use super::split_inputs;

    #[test]
    fn statements_end_at_semicolons_outside_quotes_and_comments() {
        let (inputs, rest) = split_inputs(
            "SELECT 'a;b', \"c;\" FROM t; -- x;\n\\d\nSELECT 1 /* ; */\n  ;\n\\d t\nSELECT",
        );
        assert_eq!(
            inputs,
            vec![
                "SELECT 'a;b', \"c;\" FROM t;",
                "\\d",
                "SELECT 1 \n  ;",
                "\\d t"
            ]
        );
        assert_eq!(rest, "SELECT");
    }
}
