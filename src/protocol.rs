//! What a hedf client and server agree on beyond Flight SQL itself: upload modes and options,
//! the abort marker, message and window sizes, the anonymous tenant, and how an error's kind
//! travels. Both sides import these from here, so neither depends on the other.

/// What an upload does when its table is missing or already there (Flight SQL's
/// `TableDefinitionOptions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngestMode {
    pub create_if_missing: bool,
    pub if_exists: IfExists,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfExists {
    Fail,
    Append,
    Replace,
}

impl IngestMode {
    pub const CREATE: IngestMode = IngestMode {
        create_if_missing: true,
        if_exists: IfExists::Fail,
    };
    pub const APPEND: IngestMode = IngestMode {
        create_if_missing: false,
        if_exists: IfExists::Append,
    };
    pub const REPLACE: IngestMode = IngestMode {
        create_if_missing: true,
        if_exists: IfExists::Replace,
    };
}

/// What an upload may contain beyond the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadOptions {
    /// Accept a table without any encrypted column (every value stored in clear). Off unless
    /// the user says so: a file that was never encrypted is a mistake far more often than not.
    pub allow_plaintext: bool,
}

/// Ingest option (`CommandStatementIngest.options`) carrying
/// [`UploadOptions::allow_plaintext`]; the value is "true" or "false".
pub const ALLOW_PLAINTEXT_OPTION: &str = "hedf.allow_plaintext";

/// `app_metadata` of a FlightData message by which a client abandons its upload: a stream that
/// merely ends is a complete upload, so a client whose source fails must say so (or reset the
/// call).
pub const ABORT_UPLOAD: &[u8] = b"hedf.abort-upload";

/// The tenant every caller shares when the server runs without authentication, and the one a
/// local data folder is opened as when no user is named.
pub const ANONYMOUS: &str = "anonymous";

/// Largest single gRPC message either side sends or accepts (uploads arrive as many).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// HTTP/2 flow-control window per stream (connections get twice this). Results carry 32 KiB
/// per encrypted sum: the default 64 KiB windows would stall every large answer on
/// flow-control round trips.
pub const WINDOW_BYTES: u32 = 16 << 20;

/// gRPC metadata key of a refusal's [`crate::error::ErrorKind`], so the client rebuilds the
/// kind without reading the message.
pub const ERROR_KIND_HEADER: &str = "hedf-error-kind";
