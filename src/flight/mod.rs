//! The Arrow Flight SQL endpoint: stores, queries and drops encrypted tables for authenticated
//! tenants. It holds no secret key; results leave with their ciphertext columns intact.
//!
//! Statements are stateless: a ticket or prepared-statement handle is the SQL text itself, run
//! under the tenant of whoever presents it, so a handle leaked to another user reveals nothing.

pub mod auth;
mod stream_end;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow::record_batch::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, CommandStatementIngest, CommandStatementQuery,
    CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    SqlSupportedTransaction, TicketStatementQuery,
};
use arrow_flight::sql::{TableExistsOption, TableNotExistOption};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use base64::Engine;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::{Catalog, IfExists, IngestMode, Tenant, UploadOptions};
use crate::error::{HedfError, Result};
use crate::session::{CATALOG, SCHEMA};
use crate::statement::{plan, Planned};
use auth::{Tokens, Users};
use stream_end::{StreamEnd, TrackStreamEnd};

/// `app_metadata` of a FlightData message by which a client abandons its upload: a stream that
/// merely ends is a complete upload, so a client whose source fails must say so.
pub const ABORT_UPLOAD: &[u8] = b"hedf.abort-upload";
/// The tenant every caller shares when authentication is off.
const ANONYMOUS: &str = "anonymous";
/// Largest single gRPC message accepted or sent (uploads arrive as many such messages).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// HTTP/2 flow-control window per stream (the connection gets twice this).
pub const WINDOW_BYTES: u32 = 16 << 20;
/// Result batches are cut into Flight messages of about this size.
const FLIGHT_DATA_BYTES: usize = 4 << 20;
/// Ingest option (`CommandStatementIngest.options`) by which a client stores a table without
/// any encrypted column on purpose; the value must be "true".
pub const ALLOW_PLAINTEXT_OPTION: &str = "hedf.allow_plaintext";

/// How a server runs.
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// `None` turns authentication off (local demos only).
    pub users: Option<Users>,
    /// Largest upload accepted, in bytes of Arrow IPC data.
    pub max_upload_bytes: u64,
}

/// The Flight SQL service over a [`Catalog`].
pub struct HedfFlightService {
    catalog: Catalog,
    users: Option<Users>,
    tokens: Tokens,
    max_upload_bytes: u64,
}

type FlightDataStream =
    Pin<Box<dyn Stream<Item = std::result::Result<arrow_flight::FlightData, Status>> + Send>>;

impl HedfFlightService {
    pub fn new(config: ServerConfig) -> Result<Self> {
        Ok(HedfFlightService {
            catalog: Catalog::open(&config.data_dir)?,
            users: config.users,
            tokens: Tokens::default(),
            max_upload_bytes: config.max_upload_bytes,
        })
    }

    /// The caller's tenant, from the bearer token the handshake issued.
    #[allow(clippy::result_large_err)]
    fn tenant<T>(&self, request: &Request<T>) -> std::result::Result<Arc<Tenant>, Status> {
        let user = match &self.users {
            None => ANONYMOUS.to_string(),
            Some(_) => {
                let header = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let token = header.strip_prefix("Bearer ").ok_or_else(|| {
                    Status::unauthenticated(
                        "missing bearer token: authenticate with the Flight handshake (Basic user:password)",
                    )
                })?;
                self.tokens
                    .user(token)
                    .ok_or_else(|| Status::unauthenticated("invalid or expired token"))?
            }
        };
        self.catalog.tenant(&user).map_err(to_status)
    }

    /// FlightInfo for a statement: its result schema and a ticket carrying the SQL. A DROP
    /// runs here (nothing to fetch after).
    async fn statement_info(
        &self,
        tenant: &Tenant,
        sql: &str,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo> {
        let schema = match plan(tenant, sql).await? {
            Planned::Query { plan, .. } => plan.schema().as_arrow().clone(),
            Planned::DropTable { name, if_exists } => {
                tenant.drop_table(&name, if_exists)?;
                return Ok(FlightInfo::new()
                    .try_with_schema(&Schema::empty())?
                    .with_descriptor(descriptor));
            }
        };
        let ticket = TicketStatementQuery {
            statement_handle: sql.as_bytes().to_vec().into(),
        };
        let endpoint =
            FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
        Ok(FlightInfo::new()
            .try_with_schema(&schema)?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor))
    }

    /// Runs a statement for DoGet: its result batches, ciphertext columns untouched.
    async fn statement_stream(&self, tenant: &Tenant, sql: &str) -> Result<FlightDataStream> {
        let Planned::Query { ctx, plan, tables } = plan(tenant, sql).await? else {
            return Err(HedfError::Invalid(
                "this statement returns no rows; run it with executeUpdate".into(),
            ));
        };
        let stream: SendableRecordBatchStream = ctx
            .execute_logical_plan(plan)
            .await?
            .execute_stream()
            .await?;
        let schema = stream.schema();
        // The snapshot travels with the stream: the files it reads stay until it is done.
        let batches = stream.map(move |batch| {
            let _files = &tables;
            batch.map_err(|e| FlightError::Tonic(Box::new(to_status(HedfError::from(e)))))
        });
        Ok(encode(schema, batches))
    }

    async fn update(&self, tenant: &Tenant, sql: &str) -> Result<i64> {
        match plan(tenant, sql).await? {
            Planned::DropTable { name, if_exists } => {
                tenant.drop_table(&name, if_exists)?;
                Ok(0)
            }
            Planned::Query { .. } => Err(HedfError::Invalid(
                "a query returns rows; run it with execute, not executeUpdate".into(),
            )),
        }
    }

    /// Bulk ingest as a pipeline: wait for the schema, stream validated batches into a new
    /// segment on a blocking thread, then finish with one outcome. The table changes only if
    /// the client completed the stream (see [`StreamEnd`]): an error, an abort marker, a reset
    /// (cancel, deadline) or a dropped connection leaves the old table.
    async fn ingest(
        &self,
        tenant: Arc<Tenant>,
        command: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64> {
        let end = request.extensions().get::<Arc<StreamEnd>>().cloned();
        let (mode, options) = ingest_command(&command)?;
        let mut batches = self.upload_batches(request.into_inner());

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
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                while let Some(batch) = batch_rx.blocking_recv() {
                    upload.write(&batch)?;
                }
                Ok(())
            }))
            .unwrap_or_else(|_| Err(malformed_upload()))?;
            match commit_rx.blocking_recv() {
                Ok(()) => upload.commit(),
                Err(_) => Err(HedfError::Cancelled),
            }
        });
        let received: Result<()> = async {
            let mut next = first;
            while let Some(batch) = next {
                if batch_tx.send(batch).await.is_err() {
                    return Ok(()); // the writer failed; its error is the outcome
                }
                next = next_batch(&mut batches).await?;
            }
            Ok(())
        }
        .await;
        drop(batch_tx);

        // Finishing: commit only a stream the client completed.
        let completed = end.as_ref().is_none_or(|end| end.completed());
        if received.is_ok() && completed {
            let _ = commit_tx.send(());
        } else {
            drop(commit_tx);
        }
        let written = writer
            .await
            .map_err(|e| HedfError::Io(std::io::Error::other(e)));
        received?;
        if !completed {
            return Err(HedfError::Invalid(
                "the upload was cancelled before the client completed it; the table is unchanged"
                    .into(),
            ));
        }
        Ok(written?? as i64)
    }

    /// The batches of an upload stream, with the size limit and the abort marker applied.
    fn upload_batches(&self, request: PeekableFlightDataStream) -> FlightRecordBatchStream {
        let limit = self.max_upload_bytes;
        let mut received: u64 = 0;
        let data = request.map(move |message| {
            let message = message?;
            if message.app_metadata.as_ref() == ABORT_UPLOAD {
                return Err(Status::cancelled("the client abandoned the upload"));
            }
            received += (message.data_header.len() + message.data_body.len()) as u64;
            if received > limit {
                return Err(Status::resource_exhausted(format!(
                    "upload exceeds the server's limit of {limit} bytes"
                )));
            }
            Ok(message)
        });
        FlightRecordBatchStream::new_from_flight_data(data.map_err(FlightError::from))
    }

    /// FlightInfo for a metadata call, for an authenticated caller: its ticket is the command.
    #[allow(clippy::result_large_err)]
    fn metadata_info(
        &self,
        request: Request<FlightDescriptor>,
        command: impl ProstMessageExt,
        schema: &Schema,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.tenant(&request)?;
        let ticket = Ticket::new(command.as_any().encode_to_vec());
        FlightInfo::new()
            .try_with_schema(schema)
            .map(|info| {
                Response::new(
                    info.with_endpoint(FlightEndpoint::new().with_ticket(ticket))
                        .with_descriptor(request.into_inner()),
                )
            })
            .map_err(|e| to_status(e.into()))
    }

    async fn tables_batch(&self, tenant: &Tenant, query: CommandGetTables) -> Result<RecordBatch> {
        let mut builder = query.into_builder();
        for (name, version) in tenant.snapshot().iter() {
            builder.append(CATALOG, SCHEMA, name, "TABLE", &version.schema())?;
        }
        Ok(builder.build()?)
    }
}

/// Binds `listen` and serves until `shutdown` resolves. Returns the bound address through
/// `bound` first (useful with port 0).
pub async fn serve(
    config: ServerConfig,
    listen: SocketAddr,
    bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let service = HedfFlightService::new(config)?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    bound(listener.local_addr()?);
    let server = FlightServiceServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Results carry 32 KiB per encrypted sum: HTTP/2's default 64 KiB windows would stall
    // every large answer on flow-control round trips.
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(WINDOW_BYTES))
        .initial_connection_window_size(Some(2 * WINDOW_BYTES))
        .layer(TrackStreamEnd)
        .add_service(server)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| HedfError::Io(std::io::Error::other(e)))
}

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

fn malformed_upload() -> HedfError {
    HedfError::Invalid("malformed upload: a message is not valid Arrow IPC data".into())
}

fn encode(
    schema: SchemaRef,
    batches: impl Stream<Item = std::result::Result<RecordBatch, FlightError>> + Send + 'static,
) -> FlightDataStream {
    Box::pin(
        FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_max_flight_data_size(FLIGHT_DATA_BYTES)
            .build(batches)
            .map_err(Status::from),
    )
}

fn one_batch(batch: RecordBatch) -> FlightDataStream {
    let schema = batch.schema();
    encode(schema, futures::stream::once(async { Ok(batch) }))
}

fn flight_to_hedf(e: FlightError) -> HedfError {
    match e {
        FlightError::Tonic(status) => match status.code() {
            tonic::Code::ResourceExhausted => HedfError::TooLarge(status.message().to_string()),
            _ => HedfError::Invalid(format!("upload interrupted: {}", status.message())),
        },
        FlightError::Arrow(e) => HedfError::Invalid(format!("malformed Arrow data: {e}")),
        other => HedfError::Invalid(format!("malformed upload: {other}")),
    }
}

/// The gRPC code of an error the caller caused (and may see in full); `None` for internal ones.
fn user_code(e: &HedfError) -> Option<tonic::Code> {
    use tonic::Code;
    use HedfError::*;
    Some(match e {
        NoSuchTable(_) => Code::NotFound,
        TableExists(_) => Code::AlreadyExists,
        Damaged { .. } => Code::DataLoss,
        Cancelled => Code::Cancelled,
        Unauthenticated(_) => Code::Unauthenticated,
        TooLarge(_) => Code::ResourceExhausted,
        KeyMismatch { .. }
        | MixedKeys { .. }
        | Malformed(_)
        | BudgetExceeded { .. }
        | Encoding { .. }
        | Invalid(_) => Code::InvalidArgument,
        _ => return None,
    })
}

/// Maps an error to its gRPC status. User mistakes keep their message; anything else is logged
/// here and returned without internals.
pub fn to_status(e: HedfError) -> Status {
    if let Some(code) = user_code(&e) {
        return Status::new(code, e.to_string());
    }
    match e {
        HedfError::DataFusion(df) => datafusion_status(df),
        other => internal(&other),
    }
}

fn datafusion_status(e: DataFusionError) -> Status {
    let message = e.strip_backtrace();
    match e.find_root() {
        DataFusionError::Plan(_)
        | DataFusionError::SQL(..)
        | DataFusionError::SchemaError(..)
        | DataFusionError::NotImplemented(_)
        | DataFusionError::Configuration(_) => Status::invalid_argument(message),
        DataFusionError::ResourcesExhausted(_) => Status::resource_exhausted(message),
        DataFusionError::External(inner) => match inner.downcast_ref::<HedfError>() {
            Some(h) => match user_code(h) {
                Some(code) => Status::new(code, h.to_string()),
                None => internal(&e),
            },
            None => internal(&e),
        },
        _ => internal(&e),
    }
}

fn internal(e: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal("internal error (details are in the server log)")
}

/// Base64 of Basic credentials, padded or not: RFC 7617 pads, but the stock ADBC driver (Go)
/// sends unpadded base64, so both are accepted.
const BASIC_CREDENTIALS: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn sql_info() -> &'static SqlInfoData {
    static INFO: OnceLock<SqlInfoData> = OnceLock::new();
    INFO.get_or_init(|| {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "hedf");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        b.append(SqlInfo::FlightSqlServerReadOnly, false);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        b.append(
            SqlInfo::FlightSqlServerTransaction,
            SqlSupportedTransaction::None as i32,
        );
        b.append(SqlInfo::FlightSqlServerCancel, false);
        b.append(SqlInfo::FlightSqlServerBulkIngestion, true);
        b.append(SqlInfo::FlightSqlServerIngestTransactionsSupported, false);
        b.build().expect("static SqlInfo")
    })
}

fn sql_text(bytes: &[u8]) -> std::result::Result<&str, Status> {
    std::str::from_utf8(bytes)
        .map_err(|_| Status::invalid_argument("statement handle is not UTF-8 SQL"))
}

#[tonic::async_trait]
impl FlightSqlService for HedfFlightService {
    type FlightService = HedfFlightService;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<
        Response<
            Pin<Box<dyn Stream<Item = std::result::Result<HandshakeResponse, Status>> + Send>>,
        >,
        Status,
    > {
        let Some(users) = &self.users else {
            let output = futures::stream::iter(vec![Ok(HandshakeResponse::default())]);
            return Ok(Response::new(Box::pin(output)));
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let refused = || Status::unauthenticated("wrong user name or password");
        let encoded = header
            .strip_prefix("Basic ")
            .ok_or_else(|| Status::unauthenticated("handshake needs Basic credentials"))?;
        let decoded = BASIC_CREDENTIALS
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(refused)?;
        let (user, password) = decoded.split_once(':').ok_or_else(refused)?;
        if !users.verify(user, password) {
            return Err(refused());
        }
        let token = self.tokens.issue(user).map_err(to_status)?;
        let output = futures::stream::iter(vec![Ok(HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into(),
        })]);
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(output));
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Status::internal("token is not a header value"))?;
        response.metadata_mut().insert("authorization", value);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let tenant = self.tenant(&request)?;
        self.statement_info(&tenant, &query.query, request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let tenant = self.tenant(&request)?;
        let sql = sql_text(&query.prepared_statement_handle)?.to_string();
        self.statement_info(&tenant, &sql, request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.metadata_info(request, query, &schema)
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_info(request, query, &schema)
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_info(request, query, &schema)
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.metadata_info(request, query, &schema)
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(sql_info()).schema();
        self.metadata_info(request, query, &schema)
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let tenant = self.tenant(&request)?;
        let sql = sql_text(&ticket.statement_handle)?;
        self.statement_stream(&tenant, sql)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let tenant = self.tenant(&request)?;
        let sql = sql_text(&query.prepared_statement_handle)?;
        self.statement_stream(&tenant, sql)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.tenant(&request)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        Ok(Response::new(one_batch(
            builder.build().map_err(|e| to_status(e.into()))?,
        )))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.tenant(&request)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        Ok(Response::new(one_batch(
            builder.build().map_err(|e| to_status(e.into()))?,
        )))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let tenant = self.tenant(&request)?;
        let batch = self.tables_batch(&tenant, query).await.map_err(to_status)?;
        Ok(Response::new(one_batch(batch)))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.tenant(&request)?;
        let mut builder = query.into_builder();
        builder.append("TABLE");
        Ok(Response::new(one_batch(
            builder.build().map_err(|e| to_status(e.into()))?,
        )))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.tenant(&request)?;
        let batch = query
            .into_builder(sql_info())
            .build()
            .map_err(|e| to_status(e.into()))?;
        Ok(Response::new(one_batch(batch)))
    }

    async fn do_put_statement_update(
        &self,
        command: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> std::result::Result<i64, Status> {
        let tenant = self.tenant(&request)?;
        self.update(&tenant, &command.query)
            .await
            .map_err(to_status)
    }

    async fn do_put_statement_ingest(
        &self,
        command: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> std::result::Result<i64, Status> {
        let tenant = self.tenant(&request)?;
        self.ingest(tenant, command, request)
            .await
            .map_err(to_status)
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> std::result::Result<DoPutPreparedStatementResult, Status> {
        self.tenant(&request)?;
        let mut stream = request.into_inner();
        while let Some(message) = stream.next().await {
            if !message?.data_body.is_empty() {
                return Err(Status::invalid_argument(
                    "hedf statements take no parameters",
                ));
            }
        }
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn do_put_prepared_statement_update(
        &self,
        command: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> std::result::Result<i64, Status> {
        let tenant = self.tenant(&request)?;
        let sql = sql_text(&command.prepared_statement_handle)?.to_string();
        self.update(&tenant, &sql).await.map_err(to_status)
    }

    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        Err(Status::unimplemented(format!(
            "action {:?} is not supported",
            request.get_ref().r#type
        )))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> std::result::Result<ActionCreatePreparedStatementResult, Status> {
        let tenant = self.tenant(&request)?;
        if query.transaction_id.is_some() {
            return Err(Status::invalid_argument("transactions are not supported"));
        }
        let schema = match plan(&tenant, &query.query).await.map_err(to_status)? {
            Planned::Query { plan, .. } => plan.schema().as_arrow().clone(),
            Planned::DropTable { .. } => Schema::empty(),
        };
        let options = IpcWriteOptions::default();
        let IpcMessage(dataset_schema) = SchemaAsIpc::new(&schema, &options)
            .try_into()
            .map_err(|e: arrow::error::ArrowError| to_status(e.into()))?;
        let IpcMessage(parameter_schema) = SchemaAsIpc::new(&Schema::empty(), &options)
            .try_into()
            .map_err(|e: arrow::error::ArrowError| to_status(e.into()))?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema,
            parameter_schema,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> std::result::Result<(), Status> {
        // Handles are stateless: nothing to free.
        self.tenant(&request)?;
        Ok(())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
