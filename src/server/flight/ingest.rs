//! Bulk ingest (`DoPut(CommandStatementIngest)`) as an explicit pipeline: wait for the schema,
//! stream validated batches into a new segment on a blocking thread, then finish with one
//! outcome. The table changes only if the client completed the stream ([`StreamEnd`]): an
//! error, hedf's abort marker, a reset (cancel, deadline) or a dropped connection leaves the old
//! table.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::sql::server::PeekableFlightDataStream;
use arrow_flight::sql::{CommandStatementIngest, TableExistsOption, TableNotExistOption};
use futures::{StreamExt, TryStreamExt};
use tonic::{Request, Status};

use super::stream_end::StreamEnd;
use crate::engine::session::{CATALOG, SCHEMA};
use crate::error::{HedfError, Result};
use crate::protocol::{IfExists, IngestMode, UploadOptions, ABORT_UPLOAD, ALLOW_PLAINTEXT_OPTION};
use crate::server::catalog::Tenant;

/// Runs one upload into `tenant`; returns the rows committed.
pub async fn ingest(
    tenant: Arc<Tenant>,
    command: CommandStatementIngest,
    request: Request<PeekableFlightDataStream>,
    max_upload_bytes: u64,
) -> Result<i64> {
    let end = request.extensions().get::<Arc<StreamEnd>>().cloned();
    let (mode, options) = ingest_command(&command)?;
    let mut batches = upload_batches(request.into_inner(), max_upload_bytes);

    // Waiting for the schema: the first batch, or the schema of an empty upload.
    let first = next_batch(&mut batches).await?;
    let schema = match (&first, batches.schema()) {
        (Some(batch), _) => batch.schema(),
        (None, Some(schema)) => schema.clone(),
        (None, None) => return Err(HedfError::Invalid("the upload carried no schema".into())),
    };
    let upload = tenant.begin_upload(&command.table, mode, options, &schema)?;

    // Writing: batches go to a blocking thread, which commits only when told to.
    let (batch_tx, mut batch_rx) = tokio::sync::mpsc::channel::<RecordBatch>(2);
    let (commit_tx, commit_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::task::spawn_blocking(move || {
        let mut upload = upload;
        // A panic while validating malformed data fails this upload, not the server.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            while let Some(batch) = batch_rx.blocking_recv() {
                upload.write(&batch)?;
            }
            Ok(())
        }))
        .unwrap_or_else(|_| Err(malformed_upload()))?;
        match commit_rx.blocking_recv() {
            Ok(()) => upload.commit(),
            Err(_) => Err(HedfError::Cancelled(UPLOAD_CANCELLED)),
        }
    });
    let received: Result<()> = async {
        let mut next = first;
        while let Some(batch) = next {
            check_row_count(&batch)?;
            if batch_tx.send(batch).await.is_err() {
                return Ok(()); // the writer failed; its error is the outcome
            }
            next = next_batch(&mut batches).await?;
        }
        Ok(())
    }
    .await;
    drop(batch_tx);

    // Finishing: commit only a stream the client completed. hyper reports a reset with
    // NO_ERROR as a clean end of the body; it also drops a handler whose stream was reset
    // while the handler waits, so wait once before deciding.
    tokio::task::yield_now().await;
    // Without the tracking layer (see `serve`) nothing says the body completed: never commit.
    let completed = end.as_ref().is_some_and(|end| end.completed());
    if received.is_ok() && completed {
        let _ = commit_tx.send(());
    } else {
        drop(commit_tx);
    }
    let written = writer.await.map_err(HedfError::internal);
    received?;
    if !completed {
        return Err(HedfError::Cancelled(UPLOAD_CANCELLED));
    }
    Ok(written?? as i64)
}

const UPLOAD_CANCELLED: &str =
    "upload cancelled before the client completed it; the table is unchanged";

/// What an ingest command asks for: its mode and options. Temporary tables, transactions and
/// other catalogs are refused.
fn ingest_command(command: &CommandStatementIngest) -> Result<(IngestMode, UploadOptions)> {
    if command.temporary || command.transaction_id.is_some() {
        return Err(HedfError::Invalid(
            "temporary tables and transactions are not supported".into(),
        ));
    }
    if command.catalog.as_deref().is_some_and(|c| c != CATALOG)
        || command.schema.as_deref().is_some_and(|s| s != SCHEMA)
    {
        return Err(HedfError::Invalid(format!(
            "tables live in catalog {CATALOG:?}, schema {SCHEMA:?}"
        )));
    }
    // Other clients' options are theirs to send; an unknown hedf option is a mistake to report.
    let mut upload = UploadOptions::default();
    for (key, value) in &command.options {
        match (key.as_str(), value.as_str()) {
            (ALLOW_PLAINTEXT_OPTION, "true") => upload.allow_plaintext = true,
            (ALLOW_PLAINTEXT_OPTION, "false") => upload.allow_plaintext = false,
            (key, _) if !key.starts_with("hedf.") => {}
            _ => {
                return Err(HedfError::Invalid(format!(
                    "unknown ingest option {key}={value} (hedf knows {ALLOW_PLAINTEXT_OPTION}=true|false)"
                )))
            }
        }
    }
    let options = command.table_definition_options.unwrap_or_default();
    let create_if_missing = match TableNotExistOption::try_from(options.if_not_exist) {
        Ok(TableNotExistOption::Create) => true,
        Ok(TableNotExistOption::Fail) => false,
        _ => {
            return Err(HedfError::Invalid(
                "ingest must say what to do if the table is missing".into(),
            ))
        }
    };
    let if_exists = match TableExistsOption::try_from(options.if_exists) {
        Ok(TableExistsOption::Fail) => IfExists::Fail,
        Ok(TableExistsOption::Append) => IfExists::Append,
        Ok(TableExistsOption::Replace) => IfExists::Replace,
        _ => {
            return Err(HedfError::Invalid(
                "ingest must say what to do if the table exists".into(),
            ))
        }
    };
    let mode = IngestMode {
        create_if_missing,
        if_exists,
    };
    Ok((mode, upload))
}

/// The batches of an upload stream, with the size limit and the abort marker applied. The
/// limit counts the bytes a message decodes to (compressed buffers by their declared length),
/// so a small compressed message cannot make the decoder allocate without bound.
fn upload_batches(request: PeekableFlightDataStream, limit: u64) -> FlightRecordBatchStream {
    let mut received: u64 = 0;
    let data = request.map(move |message| {
        let message = message?;
        if message.app_metadata.as_ref() == ABORT_UPLOAD {
            return Err(Status::cancelled("the client abandoned the upload"));
        }
        let decoded = decoded_body_bytes(&message.data_header, &message.data_body)
            .map_err(|why| Status::invalid_argument(format!("malformed upload: {why}")))?;
        if decoded > MAX_DECODED_MESSAGE_BYTES {
            return Err(Status::resource_exhausted(format!(
                "an upload message decodes to {decoded} bytes; the limit is \
                 {MAX_DECODED_MESSAGE_BYTES} per message"
            )));
        }
        received += message.data_header.len() as u64 + decoded;
        if received > limit {
            return Err(Status::resource_exhausted(format!(
                "upload exceeds the server's limit of {limit} bytes"
            )));
        }
        Ok(message)
    });
    FlightRecordBatchStream::new_from_flight_data(data.map_err(FlightError::from))
}

/// The next batch of an upload. A panic of the decoder on malformed input becomes an error for
/// this upload instead of taking the connection down.
async fn next_batch(batches: &mut FlightRecordBatchStream) -> Result<Option<RecordBatch>> {
    let polled = futures::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batches.poll_next_unpin(cx)))
        {
            Ok(polled) => polled.map(Ok),
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    })
    .await;
    match polled {
        Ok(Some(batch)) => batch.map(Some).map_err(flight_to_hedf),
        Ok(None) => Ok(None),
        Err(()) => Err(malformed_upload()),
    }
}

/// Largest body one upload message may decode to. Batches of the hedf client and of stock
/// clients are far smaller (Flight encoders cut messages at a few MiB).
const MAX_DECODED_MESSAGE_BYTES: u64 = 256 << 20;

/// The bytes an IPC message's body decodes to: its length, or for a compressed record or
/// dictionary batch the sum of the uncompressed lengths its buffers declare (an 8-byte prefix
/// each, -1 for a buffer stored uncompressed). Read from the header before arrow allocates
/// anything.
fn decoded_body_bytes(header: &[u8], body: &[u8]) -> std::result::Result<u64, String> {
    if header.is_empty() {
        if !body.is_empty() {
            return Err("a message body without a header".into());
        }
        return Ok(0);
    }
    let message = arrow::ipc::root_as_message(header).map_err(|e| e.to_string())?;
    // arrow-flight passes a header of type NONE over as if it were metadata only: a batch
    // whose type byte was damaged would vanish from the upload without a word.
    if message.header_type() == arrow::ipc::MessageHeader::NONE {
        return Err("a message header of no type".into());
    }
    let batch = match message.header_type() {
        arrow::ipc::MessageHeader::RecordBatch => message.header_as_record_batch(),
        arrow::ipc::MessageHeader::DictionaryBatch => {
            message.header_as_dictionary_batch().and_then(|d| d.data())
        }
        _ => None,
    };
    let Some(batch) = batch else {
        return Ok(body.len() as u64);
    };
    // arrow's decoder slices the body at each buffer's offset and length and panics outside it.
    for buffer in batch.buffers().into_iter().flatten() {
        let end = u64::try_from(buffer.offset())
            .ok()
            .zip(u64::try_from(buffer.length()).ok())
            .and_then(|(offset, length)| offset.checked_add(length));
        if end.is_none_or(|end| end > body.len() as u64) {
            return Err("a buffer lies outside the message body".into());
        }
    }
    if batch.compression().is_none() {
        return Ok(body.len() as u64);
    }
    let mut total: u64 = 0;
    for buffer in batch.buffers().into_iter().flatten() {
        let (offset, length) = (buffer.offset(), buffer.length());
        if length == 0 {
            continue;
        }
        let start = usize::try_from(offset).map_err(|_| "negative buffer offset")?;
        let prefix = body
            .get(start..start + 8)
            .ok_or("a compressed buffer lies outside the message body")?;
        let declared = i64::from_le_bytes(prefix.try_into().expect("8 bytes"));
        total = total.saturating_add(if declared < 0 {
            length as u64
        } else {
            declared as u64
        });
    }
    Ok(total)
}

/// Refuses a batch claiming more rows than its bytes could hold: every real column costs at
/// least a bit per row, so only null or run-end-encoded columns could carry a billion rows in
/// a few bytes (and make a huge table of a tiny upload).
fn check_row_count(batch: &RecordBatch) -> Result<()> {
    let bytes = batch.get_array_memory_size() as u64;
    if batch.num_rows() as u64 > 8 * bytes + (1 << 16) {
        return Err(HedfError::Invalid(format!(
            "a batch claims {} rows but carries only {bytes} bytes of data",
            batch.num_rows()
        )));
    }
    Ok(())
}

fn malformed_upload() -> HedfError {
    HedfError::Invalid("malformed upload: a message is not valid Arrow IPC data".into())
}

fn flight_to_hedf(e: FlightError) -> HedfError {
    match e {
        FlightError::Tonic(status) => match status.code() {
            tonic::Code::ResourceExhausted => HedfError::TooLarge(status.message().to_string()),
            tonic::Code::Cancelled => HedfError::Cancelled(UPLOAD_CANCELLED),
            tonic::Code::DeadlineExceeded => {
                HedfError::TimedOut(format!("{}; the table is unchanged", status.message()))
            }
            _ => HedfError::Invalid(format!("upload interrupted: {}", status.message())),
        },
        FlightError::Arrow(e) => HedfError::Invalid(format!("malformed Arrow data: {e}")),
        other => HedfError::Invalid(format!("malformed upload: {other}")),
    }
}
