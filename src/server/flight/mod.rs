//! The Arrow Flight SQL endpoint: stores, queries and drops encrypted tables for authenticated
//! tenants. It holds no secret key; results leave with their ciphertext columns intact.
//!
//! Statements are stateless: a ticket or prepared-statement handle is the SQL text itself, run
//! under the tenant of whoever presents it, so a handle leaked to another user reveals nothing.

mod access;
mod audit;
pub mod auth;
mod connections;
mod holding;
mod ingest;
mod status;
mod stream_end;
mod throttle;
mod uploads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow::record_batch::RecordBatch;
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
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use base64::Engine;
use datafusion::execution::SendableRecordBatchStream;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::crypto::answer::share_masks;
use crate::engine::session::{CATALOG, SCHEMA};
use crate::engine::statement::{plan, Planned};
use crate::error::{with_causes, ErrorKind, HedfError, Result};
use crate::protocol::{MAX_MESSAGE_BYTES, WINDOW_BYTES};
use crate::server::admission::{Admission, Admitted, Gate};
use crate::server::catalog::{Catalog, Tenant};
use access::{Access, Caller};
use audit::{Audit, AuditLog};
use auth::{Directory, Tokens, MAX_USER_NAME_BYTES};
pub use connections::ConnectionLimits;
use connections::{Connections, CountCalls, Link};
use status::status;
pub use status::to_status;
use stream_end::TrackStreamEnd;
use throttle::LoginThrottle;
use uploads::UploadGate;

/// Result batches are cut into Flight messages of about this size.
const FLIGHT_DATA_BYTES: usize = 4 << 20;
/// Concurrent calls on one connection: a client needs a few, an attacker's thousands would be
/// free to open on one socket.
const STREAMS_PER_CONNECTION: u32 = 64;
/// Request headers (a bearer token, a Basic header, gRPC's own) fit easily in this.
const HEADER_BYTES: u32 = 16 << 10;
/// Dead peers are found by HTTP/2 pings and TCP keepalive instead of holding their streams.
const KEEPALIVE: Duration = Duration::from_secs(60);
const KEEPALIVE_ACK: Duration = Duration::from_secs(20);
/// Logins waiting for an Argon2 worker, and for how long, before they are refused as too many.
const LOGIN_QUEUE: usize = 256;
const LOGIN_QUEUE_WAIT: Duration = Duration::from_secs(10);
/// A peer that has not finished its TLS handshake by then is dropped.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// How long a login may take on a connection that has none yet: the queue wait, then Argon2.
const LOGIN_TIME: Duration = Duration::from_secs(15);

/// How a server runs.
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// `None` turns authentication off (local demos only).
    pub users: Option<Arc<Directory>>,
    /// Largest upload accepted, in bytes of Arrow IPC data.
    pub max_upload_bytes: u64,
    /// Memory all queries together may hold, in bytes; `None`: no limit.
    pub memory_limit: Option<usize>,
    pub limits: Limits,
    pub connections: ConnectionLimits,
    /// `None`: plaintext HTTP/2, refused with users on a non-loopback address unless
    /// `insecure_plaintext` (a TLS-terminating proxy in front, say).
    pub tls: Option<ServerTls>,
    pub insecure_plaintext: bool,
}

/// What a TLS server presents (PEM certificate chain and key) and, for mutual TLS, the CA
/// every client certificate must chain to.
pub struct ServerTls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

impl ServerTls {
    fn config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .timeout(TLS_HANDSHAKE);
        match &self.client_ca {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// How much one query, one tenant and everyone together may ask at once.
pub struct Limits {
    /// A query (planning, queueing and streaming its answer) is stopped after this long.
    pub query_timeout: Duration,
    /// Queries running at once, in all and per tenant; more wait in a short queue.
    pub max_queries: usize,
    pub max_queries_per_tenant: usize,
    /// Uploads running at once, in all and per tenant; more are refused at once.
    pub max_uploads: usize,
    pub max_uploads_per_tenant: usize,
    /// A call whose client sends nothing this long while the server waits for its data (an
    /// upload that stops midway) fails.
    pub stall: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            query_timeout: Duration::from_secs(300),
            max_queries: 16,
            max_queries_per_tenant: 4,
            max_uploads: 8,
            max_uploads_per_tenant: 2,
            stall: Duration::from_secs(60),
        }
    }
}

/// The Flight SQL service over a [`Catalog`].
pub struct HedfFlightService {
    catalog: Catalog,
    users: Option<Arc<Directory>>,
    tokens: Arc<Tokens>,
    max_upload_bytes: u64,
    query_timeout: Duration,
    queries: Admission,
    logins: LoginThrottle,
    /// Argon2 runs on blocking threads, at most half the cores at once: a login flood must
    /// not take the async workers every query runs on.
    argon2: Gate,
}

type FlightDataStream =
    Pin<Box<dyn Stream<Item = std::result::Result<arrow_flight::FlightData, Status>> + Send>>;

impl HedfFlightService {
    /// Only `serve` builds one: ingest commits only with `serve`'s `TrackStreamEnd` layer.
    fn new(config: ServerConfig) -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let limits = config.limits;
        Ok(HedfFlightService {
            catalog: Catalog::open(&config.data_dir, config.memory_limit)?,
            users: config.users,
            tokens: Arc::default(),
            max_upload_bytes: config.max_upload_bytes,
            query_timeout: limits.query_timeout,
            queries: Admission::queries(limits.max_queries, limits.max_queries_per_tenant),
            logins: LoginThrottle::default(),
            argon2: Gate::new("logins", cores / 2, LOGIN_QUEUE),
        })
    }

    /// Runs `work` (planning, or a DROP) as one admitted query within the time limit.
    async fn limited<T>(
        &self,
        tenant: &Tenant,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let (_admitted, deadline) = self.admit(tenant).await?;
        self.within(deadline, work).await
    }

    /// A query's slot, and the deadline its time limit sets (the queue wait counts).
    async fn admit(&self, tenant: &Tenant) -> Result<(Admitted, Instant)> {
        let deadline = Instant::now() + self.query_timeout;
        Ok((self.queries.admit(tenant.name(), deadline).await?, deadline))
    }

    async fn within<T>(
        &self,
        deadline: Instant,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| timed_out(self.query_timeout))?
    }

    /// Checks a login's password unless the caller must wait first; Argon2 runs off the async
    /// workers.
    async fn verify_login(
        &self,
        users: &Directory,
        user: &str,
        password: &str,
        peer: Option<std::net::IpAddr>,
    ) -> Result<bool> {
        let mut attempt = self
            .logins
            .attempt(user, peer, std::time::Instant::now())
            .map_err(|wait| {
                HedfError::Throttled(format!(
                    "too many failed logins; retry in {} s",
                    wait.as_secs_f64().ceil()
                ))
            })?;
        let permit = self.argon2.enter(Instant::now() + LOGIN_QUEUE_WAIT).await?;
        attempt.checking();
        let (users, name, password) = (users.current(), user.to_string(), password.to_string());
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            users.verify(&name, &password)
        })
        .await
        .map_err(HedfError::internal)?;
        if ok {
            attempt.succeeded();
        } else {
            attempt.failed(std::time::Instant::now());
        }
        Ok(ok)
    }

    /// The caller's tenant, as [`Access`] authenticated the call.
    #[allow(clippy::result_large_err)]
    fn tenant<T>(&self, request: &Request<T>) -> std::result::Result<Arc<Tenant>, Status> {
        let caller = request.extensions().get::<Caller>().ok_or_else(|| {
            status(
                ErrorKind::Unauthenticated,
                "authenticate with the Flight handshake (Basic user:password)",
            )
        })?;
        self.catalog.tenant(&caller.0).map_err(to_status)
    }

    /// FlightInfo for a statement: its result schema and a ticket carrying the SQL. A DROP
    /// runs here (nothing to fetch after).
    async fn statement_info(
        &self,
        tenant: &Tenant,
        sql: &str,
        descriptor: FlightDescriptor,
        audit: &Audit,
    ) -> Result<FlightInfo> {
        let schema = self
            .limited(tenant, async {
                Ok(match plan(tenant, sql).await? {
                    Planned::Query { plan, reads, .. } => {
                        audit.table(&reads.join(","));
                        Some(plan.schema().as_arrow().clone())
                    }
                    Planned::DropTable { name, if_exists } => {
                        audit.table(&name);
                        tenant.drop_table(&name, if_exists)?;
                        None
                    }
                })
            })
            .await?;
        let Some(schema) = schema else {
            return Ok(FlightInfo::new()
                .try_with_schema(&Schema::empty())?
                .with_descriptor(descriptor));
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

    /// Runs a statement for DoGet: its result batches, ciphertext columns untouched. The
    /// query's admission and time limit last until its last batch is sent.
    async fn statement_stream(
        &self,
        tenant: &Tenant,
        sql: &str,
        audit: Arc<Audit>,
    ) -> Result<FlightDataStream> {
        let (admitted, deadline) = self.admit(tenant).await?;
        let start = async {
            let Planned::Query {
                ctx,
                plan,
                tables,
                reads,
            } = plan(tenant, sql).await?
            else {
                return Err(HedfError::Invalid(
                    "this statement returns no rows; run it with executeUpdate".into(),
                ));
            };
            audit.table(&reads.join(","));
            let stream: SendableRecordBatchStream = ctx
                .execute_logical_plan(plan)
                .await?
                .execute_stream()
                .await?;
            Ok((stream, tables))
        };
        let (stream, tables) = self.within(deadline, start).await?;
        let schema = stream.schema();
        // The snapshot travels with the stream: the files it reads stay until it is done.
        // A row's sums that share one mask sum send it once.
        let batches = stream.map(move |batch| {
            let _files = &tables;
            if let Ok(batch) = &batch {
                audit.add_rows(batch.num_rows());
            }
            batch
                .map_err(HedfError::from)
                .and_then(|b| share_masks(&b))
                .map_err(|e| FlightError::Tonic(Box::new(to_status(e))))
        });
        Ok(until_deadline(
            encode(schema, batches),
            deadline,
            self.query_timeout,
            admitted,
        ))
    }

    async fn update(&self, tenant: &Tenant, sql: &str, audit: &Audit) -> Result<i64> {
        self.limited(tenant, async {
            match plan(tenant, sql).await? {
                Planned::DropTable { name, if_exists } => {
                    audit.table(&name);
                    tenant.drop_table(&name, if_exists)?;
                    Ok(0)
                }
                Planned::Query { .. } => Err(HedfError::Invalid(
                    "a query returns rows; run it with execute, not executeUpdate".into(),
                )),
            }
        })
        .await
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

    fn tables_batch(&self, tenant: &Tenant, query: CommandGetTables) -> Result<RecordBatch> {
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
    let tls = match &config.tls {
        Some(tls) => Some(tls.config()),
        None if config.users.is_some()
            && !listen.ip().is_loopback()
            && !config.insecure_plaintext =>
        {
            return Err(HedfError::Invalid(format!(
                "refusing to take passwords in plaintext on {listen}: give --tls-cert and \
                 --tls-key, or --insecure-plaintext if a TLS proxy in front terminates TLS"
            )))
        }
        None => None,
    };
    // Past its maximum age a connection gets GOAWAY from tonic (given no grace, which would
    // make tonic cut it without one); the cut after the grace is the connection's own.
    let max_age = config.connections.max_age;
    let limits = &config.limits;
    let uploads = UploadGate::new(limits.max_uploads, limits.max_uploads_per_tenant);
    let track = TrackStreamEnd {
        stall: limits.stall,
    };
    let connections = Connections::new(
        config.connections.clone(),
        LOGIN_TIME,
        config.limits.query_timeout,
    );
    let service = HedfFlightService::new(config)?;
    let access = Access {
        users: service.users.clone(),
        tokens: service.tokens.clone(),
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| {
            HedfError::Invalid(format!("TLS certificate or key: {}", with_causes(&e)))
        })?;
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    bound(listener.local_addr()?);
    let server = FlightServiceServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    builder
        .initial_stream_window_size(Some(WINDOW_BYTES))
        .initial_connection_window_size(Some(2 * WINDOW_BYTES))
        .max_concurrent_streams(Some(STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(HEADER_BYTES))
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE_ACK))
        .max_connection_age(max_age)
        .layer(AuditLog)
        .layer(access)
        .layer(CountCalls)
        .layer(uploads)
        .layer(track)
        .add_service(server)
        .serve_with_incoming_shutdown(
            connections.guard(
                TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(KEEPALIVE)),
            ),
            shutdown,
        )
        .await
        .map_err(HedfError::internal)
}

/// The span an RPC's work and logs run in: which call, for which tenant.
fn rpc_span(rpc: &'static str, tenant: &Tenant) -> tracing::Span {
    tracing::info_span!("rpc", rpc, tenant = tenant.name())
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

fn timed_out(limit: Duration) -> HedfError {
    HedfError::TimedOut(format!(
        "query stopped after the server's time limit of {} s",
        limit.as_secs_f64()
    ))
}

/// `stream` until `deadline`, run by a task of its own so that a client that stops reading
/// cannot hold the query's slot and memory past it: then the query is dropped (cancelling its
/// DataFusion tasks) and the client gets DEADLINE_EXCEEDED after what was sent, never a
/// silently shortened answer.
fn until_deadline(
    mut stream: FlightDataStream,
    deadline: Instant,
    limit: Duration,
    admitted: Admitted,
) -> FlightDataStream {
    let (batches, receiver) = tokio::sync::mpsc::channel(2);
    let (end, ended) = tokio::sync::oneshot::channel::<Option<Status>>();
    let query = async move {
        let _admitted = admitted;
        let outcome = loop {
            let item = tokio::select! {
                item = stream.next() => item,
                () = tokio::time::sleep_until(deadline) => break Some(to_status(timed_out(limit))),
                // The client went away: stop at once.
                () = batches.closed() => return,
            };
            match item {
                None => break None,
                Some(Err(status)) => break Some(status),
                Some(Ok(data)) => match tokio::time::timeout_at(deadline, batches.send(data)).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => break Some(to_status(timed_out(limit))),
                },
            }
        };
        drop(stream);
        let _ = end.send(outcome);
    };
    tokio::spawn(query.in_current_span());
    Box::pin(futures::stream::unfold(
        Some((receiver, ended)),
        |state| async move {
            let (mut receiver, ended) = state?;
            if let Some(data) = receiver.recv().await {
                return Some((Ok(data), Some((receiver, ended))));
            }
            match ended.await {
                Ok(None) => None,
                Ok(Some(status)) => Some((Err(status), None)),
                Err(_) => Some((
                    Err(to_status(HedfError::internal("a query's task ended early"))),
                    None,
                )),
            }
        },
    ))
}

fn one_batch(batch: RecordBatch) -> FlightDataStream {
    let schema = batch.schema();
    encode(schema, futures::stream::once(async { Ok(batch) }))
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

#[allow(clippy::result_large_err)]
fn sql_text(bytes: &[u8]) -> std::result::Result<&str, Status> {
    std::str::from_utf8(bytes).map_err(|_| {
        status(
            ErrorKind::InvalidArgument,
            "statement handle is not UTF-8 SQL",
        )
    })
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
        let peer = request
            .extensions()
            .get::<Link>()
            .map(|link| link.remote.ip());
        let audit = Audit::of(&request);
        let Some(users) = &self.users else {
            let output = futures::stream::iter(vec![Ok(HandshakeResponse::default())]);
            return Ok(Response::new(Box::pin(output)));
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let refused = || status(ErrorKind::Unauthenticated, "wrong user name or password");
        let encoded = header.strip_prefix("Basic ").ok_or_else(|| {
            status(
                ErrorKind::Unauthenticated,
                "handshake needs Basic credentials",
            )
        })?;
        let decoded = BASIC_CREDENTIALS
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(refused)?;
        let (user, password) = decoded
            .split_once(':')
            .filter(|(user, _)| user.len() <= MAX_USER_NAME_BYTES)
            .ok_or_else(refused)?;
        if !self
            .verify_login(users, user, password, peer)
            .await
            .map_err(|e| {
                tracing::debug!(rpc = "handshake", user, ?peer, "refused login: {e}");
                to_status(e)
            })?
        {
            tracing::info!(rpc = "handshake", user, ?peer, "refused login");
            return Err(refused());
        }
        // Only now: a name that failed may be a password typed in the wrong field.
        audit.tenant(user);
        let token = self
            .tokens
            .issue(user, &users.current())
            .map_err(to_status)?;
        let output = futures::stream::iter(vec![Ok(HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into(),
        })]);
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(output));
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| to_status(HedfError::internal("token is not a header value")))?;
        response.metadata_mut().insert("authorization", value);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let tenant = self.tenant(&request)?;
        let audit = Audit::of(&request);
        self.statement_info(&tenant, &query.query, request.into_inner(), &audit)
            .instrument(rpc_span("get_flight_info_statement", &tenant))
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
        let audit = Audit::of(&request);
        self.statement_info(&tenant, &sql, request.into_inner(), &audit)
            .instrument(rpc_span("get_flight_info_prepared_statement", &tenant))
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
        self.statement_stream(&tenant, sql, Audit::of(&request))
            .instrument(rpc_span("do_get_statement", &tenant))
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
        self.statement_stream(&tenant, sql, Audit::of(&request))
            .instrument(rpc_span("do_get_prepared_statement", &tenant))
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
        let batch = self.tables_batch(&tenant, query).map_err(to_status)?;
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
        self.update(&tenant, &command.query, &Audit::of(&request))
            .instrument(rpc_span("do_put_statement_update", &tenant))
            .await
            .map_err(to_status)
    }

    async fn do_put_statement_ingest(
        &self,
        command: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> std::result::Result<i64, Status> {
        let tenant = self.tenant(&request)?;
        let span = rpc_span("do_put_statement_ingest", &tenant);
        let audit = Audit::of(&request);
        audit.table(&command.table);
        let rows = ingest::ingest(tenant, command, request, self.max_upload_bytes)
            .instrument(span)
            .await
            .map_err(to_status)?;
        audit.add_rows(rows.try_into().unwrap_or_default());
        Ok(rows)
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
                return Err(status(
                    ErrorKind::InvalidArgument,
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
        self.update(&tenant, &sql, &Audit::of(&request))
            .instrument(rpc_span("do_put_prepared_statement_update", &tenant))
            .await
            .map_err(to_status)
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
            return Err(status(
                ErrorKind::InvalidArgument,
                "transactions are not supported",
            ));
        }
        let planned = self
            .limited(&tenant, plan(&tenant, &query.query))
            .instrument(rpc_span("create_prepared_statement", &tenant))
            .await
            .map_err(to_status)?;
        let schema = match planned {
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
