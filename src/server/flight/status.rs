//! Errors at the gRPC boundary: each [`HedfError`] becomes a status whose code comes from its
//! [`ErrorKind`], which also travels as metadata ([`ERROR_KIND_HEADER`]) so a hedf client
//! rebuilds it without reading the message. Internal errors are logged here and leave as a bare
//! INTERNAL: their details may name server paths or state.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::error::{ErrorKind, HedfError};
use crate::protocol::ERROR_KIND_HEADER;

/// The gRPC code of an error kind.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The status a caller receives for `e`.
pub fn to_status(e: HedfError) -> Status {
    let kind = e.kind();
    let mut status = if kind == ErrorKind::Internal {
        tracing::error!(error = %e.user_message(), "internal error");
        Status::internal("internal error (details are in the server log)")
    } else {
        Status::new(code(kind), e.user_message())
    };
    status
        .metadata_mut()
        .insert(ERROR_KIND_HEADER, MetadataValue::from_static(kind.as_str()));
    status
}

/// A status of `kind` with `message`, marked like [`to_status`] marks them.
pub fn status(kind: ErrorKind, message: impl Into<String>) -> Status {
    let mut status = Status::new(code(kind), message.into());
    status
        .metadata_mut()
        .insert(ERROR_KIND_HEADER, MetadataValue::from_static(kind.as_str()));
    status
}
