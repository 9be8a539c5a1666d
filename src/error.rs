//! The crate's one error type, and the kind of each error: what the caller can do about it.
//! The server maps a kind to a gRPC code (and sends it along, see
//! [`crate::protocol::ERROR_KIND_HEADER`]); the client rebuilds it; DataFusion carries hedf's
//! errors as `External` and [`HedfError::kind`] finds them again.

use std::fmt;

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
    /// A limit on how often or how much a caller may ask (failed logins, concurrent queries).
    #[error("{0}")]
    Throttled(String),
    /// A query ran past the server's time limit and was stopped.
    #[error("{0}")]
    TimedOut(String),
    /// A server's refusal, with the kind it sent.
    #[error("{}{message}", remote_prefix(*kind))]
    Remote { kind: ErrorKind, message: String },
    /// The server could not be reached (what follows names it and says why).
    #[error("cannot reach {0}")]
    Unavailable(String),
    /// What was cancelled, and what that left.
    #[error("{0}")]
    Cancelled(&'static str),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("invalid key file: {0}")]
    KeyFile(String),
    /// A failure that is not the caller's doing (a task that died, no randomness, ...).
    #[error("internal error: {0}")]
    Internal(String),
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

/// `e` and each error under it, joined by ": ". Transport errors (tonic's, rustls') say only
/// "transport error" at the top; what went wrong is further down.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// What a server's refusal is prefixed with: the server's messages say what went wrong, the
/// kinds a person might not guess from that say what kind of failure it is.
fn remote_prefix(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Unauthenticated => "authentication failed: ",
        ErrorKind::Internal => "server error: ",
        _ => "",
    }
}

/// What kind of failure an error is, from the caller's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    /// The request is wrong: bad SQL, bad data, misuse of a ciphertext, a budget exceeded.
    InvalidArgument,
    Unauthenticated,
    ResourceExhausted,
    /// A time limit passed.
    DeadlineExceeded,
    /// Stored data was lost or damaged.
    DataLoss,
    Cancelled,
    Unavailable,
    /// Not the caller's doing; the details stay in the server's log.
    Internal,
}

impl ErrorKind {
    const ALL: [ErrorKind; 10] = [
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::InvalidArgument,
        ErrorKind::Unauthenticated,
        ErrorKind::ResourceExhausted,
        ErrorKind::DeadlineExceeded,
        ErrorKind::DataLoss,
        ErrorKind::Cancelled,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::ResourceExhausted => "resource-exhausted",
            ErrorKind::DeadlineExceeded => "deadline-exceeded",
            ErrorKind::DataLoss => "data-loss",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }

    /// The kind named `name` (as [`Self::as_str`] writes it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl HedfError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use HedfError::*;
        match self {
            KeyMismatch { .. }
            | MixedKeys { .. }
            | Malformed(_)
            | BudgetExceeded { .. }
            | Encoding { .. }
            | Invalid(_)
            | KeyFile(_) => ErrorKind::InvalidArgument,
            NoSuchTable(_) => ErrorKind::NotFound,
            TableExists(_) => ErrorKind::AlreadyExists,
            Damaged { .. } => ErrorKind::DataLoss,
            Unauthenticated(_) => ErrorKind::Unauthenticated,
            TooLarge(_) | Throttled(_) => ErrorKind::ResourceExhausted,
            TimedOut(_) => ErrorKind::DeadlineExceeded,
            Remote { kind, .. } => *kind,
            Unavailable(_) => ErrorKind::Unavailable,
            Cancelled(_) => ErrorKind::Cancelled,
            Arrow(e) => arrow_kind(e),
            Internal(_) | Io(_) => ErrorKind::Internal,
            #[cfg(feature = "engine")]
            Parquet(_) | Flight(_) => ErrorKind::Internal,
            #[cfg(feature = "engine")]
            DataFusion(e) => datafusion_kind(e),
        }
    }

    /// An internal error from anything displayable (a join error, a failed random source).
    pub fn internal(e: impl fmt::Display) -> Self {
        HedfError::Internal(e.to_string())
    }

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

/// Errors a query or a file can cause by its values (a division by zero, a bad cast, a number
/// that does not parse) are the caller's; the rest (I/O, memory) are internal.
fn arrow_kind(e: &arrow::error::ArrowError) -> ErrorKind {
    use arrow::error::ArrowError::*;
    match e {
        DivideByZero
        | CastError(_)
        | ComputeError(_)
        | ArithmeticOverflow(_)
        | ParseError(_)
        | InvalidArgumentError(_)
        | CsvError(_)
        | JsonError(_)
        | SchemaError(_)
        | IpcError(_) => ErrorKind::InvalidArgument,
        _ => ErrorKind::Internal,
    }
}

#[cfg(feature = "engine")]
fn datafusion_kind(e: &datafusion::error::DataFusionError) -> ErrorKind {
    use datafusion::error::DataFusionError::*;
    match e.find_root() {
        Plan(_) | SQL(..) | SchemaError(..) | NotImplemented(_) | Configuration(_) => {
            ErrorKind::InvalidArgument
        }
        ResourcesExhausted(_) => ErrorKind::ResourceExhausted,
        ArrowError(e, _) => arrow_kind(e),
        External(inner) => inner
            .downcast_ref::<HedfError>()
            .map_or(ErrorKind::Internal, HedfError::kind),
        _ => ErrorKind::Internal,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_name() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::parse("teapot"), None);
    }

    #[cfg(feature = "engine")]
    #[test]
    fn kinds_survive_datafusion_wrapping() {
        let wrapped: datafusion::error::DataFusionError = HedfError::NoSuchTable("t".into()).into();
        let e = HedfError::DataFusion(datafusion::error::DataFusionError::Context(
            "planning".into(),
            Box::new(wrapped),
        ));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.user_message(), "no such table: t");
    }
}
