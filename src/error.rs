//! The crate's one error type. The engine converts it to `DataFusionError` at its boundary.

/// Everything that can go wrong in hedf, each with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum HedfError {
    #[error("key mismatch: {what} was encrypted with key id {found}; the loaded key is {loaded}")]
    KeyMismatch {
        what: String,
        found: String,
        loaded: String,
    },
    #[error(
        "mixed keys: he_sum got ciphertexts of key ids {first} and {second}; a sum needs one key"
    )]
    MixedKeys { first: String, second: String },
    #[error("malformed ciphertext: {0}")]
    Malformed(String),
    #[error(
        "sum budget exceeded for {column}: a group has {rows} rows but this column's ciphertexts \
         decrypt exactly only up to {max_rows} rows per sum ({why}); split the query (e.g. finer \
         GROUP BY or WHERE) or re-encrypt the column with a wider declared precision"
    )]
    BudgetExceeded {
        column: String,
        rows: u64,
        max_rows: u64,
        why: String,
    },
    /// `row` counts from 0; the message counts data rows from 1, as a spreadsheet would.
    #[error("bad value in column {column}, data row {}: {why}", row + 1)]
    Encoding {
        column: String,
        row: usize,
        why: String,
    },
    #[error("no such table: {0}")]
    NoSuchTable(String),
    #[error("table {0} already exists")]
    TableExists(String),
    /// A stored table no longer matches what was committed (a file lost, cut short or replaced
    /// under the server). Only that table is affected.
    #[error("table {table} is damaged: {why}; drop it or upload it again with --mode replace")]
    Damaged { table: String, why: String },
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    #[error("upload too large: {0}")]
    TooLarge(String),
    #[error("server error ({code}): {message}")]
    Remote { code: String, message: String },
    #[error("query cancelled")]
    Cancelled,
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("invalid key file: {0}")]
    KeyFile(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("Arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[cfg(feature = "engine")]
    #[error("Parquet error: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[cfg(feature = "engine")]
    #[error("Flight error: {0}")]
    Flight(#[from] arrow_flight::error::FlightError),
    #[cfg(feature = "engine")]
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),
}

pub type Result<T, E = HedfError> = std::result::Result<T, E>;

impl HedfError {
    /// The error as one line for a person: hedf's own errors unwrapped from DataFusion's
    /// wrapping, backtraces dropped, line breaks folded.
    pub fn user_message(&self) -> String {
        let text = match self {
            #[cfg(feature = "engine")]
            HedfError::DataFusion(e) => match e.find_root() {
                datafusion::error::DataFusionError::External(inner) => {
                    match inner.downcast_ref::<HedfError>() {
                        Some(h) => return h.user_message(),
                        None => inner.to_string(),
                    }
                }
                root => root.strip_backtrace(),
            },
            other => other.to_string(),
        };
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

#[cfg(feature = "engine")]
impl From<HedfError> for datafusion::error::DataFusionError {
    fn from(e: HedfError) -> Self {
        match e {
            HedfError::DataFusion(e) => e,
            other => datafusion::error::DataFusionError::External(Box::new(other)),
        }
    }
}
