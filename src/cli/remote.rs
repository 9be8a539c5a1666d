//! A Flight SQL client for a hedf server: log in, upload encrypted tables, run SQL, list tables.
//! It moves ciphertext only; decryption stays with [`crate::crypto::client`].

use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::IpcWriteOptions;
use arrow::ipc::CompressionType;
use arrow::record_batch::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::TableDefinitionOptions;
use arrow_flight::sql::{
    CommandGetTables, CommandStatementIngest, DoPutUpdateResult, ProstMessageExt,
};
use arrow_flight::sql::{TableExistsOption, TableNotExistOption};
use arrow_flight::{FlightData, FlightDescriptor, FlightInfo, HandshakeRequest};
use futures::{SinkExt, Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{with_causes, ErrorKind, HedfError, Result};
use crate::protocol::{
    IfExists, IngestMode, UploadOptions, ABORT_UPLOAD, ALLOW_PLAINTEXT_OPTION, ERROR_KIND_HEADER,
    MAX_MESSAGE_BYTES, WINDOW_BYTES,
};

/// How a client reaches an `https://` server, and whether it may send a password in the clear.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// PEM certificates of the CAs the server's certificate must chain to; `None`: the
    /// system's roots.
    pub ca: Option<Vec<u8>>,
    /// PEM certificate and key presented to a server that asks for one (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Log in over `http://` to a host that is not this machine (the network sees the password).
    pub insecure_plaintext: bool,
}

impl ClientTls {
    /// `endpoint` for `url`: TLS for `https://`, never falling back to plaintext; `http://`
    /// only without TLS options, and with a password only to this machine unless allowed.
    fn apply(&self, endpoint: Endpoint, url: &str, login: bool) -> Result<Endpoint> {
        let uri = endpoint.uri();
        match uri.scheme_str() {
            Some("https") => {
                let mut config = ClientTlsConfig::new();
                config = match &self.ca {
                    Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
                    None => config.with_native_roots(),
                };
                if let Some((cert, key)) = &self.identity {
                    config = config.identity(Identity::from_pem(cert, key));
                }
                endpoint
                    .tls_config(config)
                    .map_err(|e| HedfError::Invalid(format!("TLS for {url}: {}", with_causes(&e))))
            }
            Some("http") => {
                if self.ca.is_some() || self.identity.is_some() {
                    return Err(HedfError::Invalid(format!(
                        "TLS options need an https:// server URL, not {url}"
                    )));
                }
                let host = uri.host().unwrap_or_default();
                if login && !self.insecure_plaintext && !is_loopback(host) {
                    return Err(HedfError::Invalid(format!(
                        "{url} would carry the password in plaintext: use https:// (or \
                         --insecure-plaintext on a network you trust)"
                    )));
                }
                Ok(endpoint)
            }
            _ => Err(HedfError::Invalid(format!(
                "server URL {url:?}: expected http:// or https://"
            ))),
        }
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A connection to a hedf Flight SQL server. Clones share the channel and the login.
#[derive(Clone)]
pub struct Remote {
    client: FlightSqlServiceClient<Channel>,
}

impl Remote {
    /// Connects to `url` (e.g. `https://db.example:50051`) and, given credentials, logs in
    /// with the Flight handshake (Basic user:password, answered with a bearer token).
    pub async fn connect(url: &str, login: Option<(&str, &str)>, tls: &ClientTls) -> Result<Self> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| HedfError::Invalid(format!("bad server URL {url:?}: {e}")))?;
        let channel = tls
            .apply(endpoint, url, login.is_some())?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(WINDOW_BYTES))
            .initial_connection_window_size(Some(2 * WINDOW_BYTES))
            .connect()
            .await
            .map_err(|e| HedfError::Unavailable(format!("{url}: {}", with_causes(&e))))?;
        let inner = arrow_flight::flight_service_client::FlightServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut client = FlightSqlServiceClient::new_from_inner(inner);
        if let Some((user, password)) = login {
            // Called directly rather than through `FlightSqlServiceClient::handshake`, which
            // turns a refusal into a generic error and loses its status code.
            let mut request =
                tonic::Request::new(futures::stream::iter([HandshakeRequest::default()]));
            let basic = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("{user}:{password}"),
            );
            let value = format!("Basic {basic}")
                .parse()
                .map_err(|_| HedfError::Invalid("credentials are not a valid header".into()))?;
            request.metadata_mut().insert("authorization", value);
            let response = client
                .inner_mut()
                .handshake(request)
                .await
                .map_err(status_error)?;
            let token = response
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| HedfError::internal("the server issued no token"))?
                .to_string();
            client.set_token(token);
        }
        Ok(Remote { client })
    }

    /// Runs a query; returns the result schema (with hedf's column metadata) and batches.
    pub async fn query(&mut self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let info = self
            .client
            .execute(sql.to_string(), None)
            .await
            .map_err(flight_error)?;
        self.fetch(info).await
    }

    async fn fetch(&mut self, info: FlightInfo) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let schema = std::sync::Arc::new(info.clone().try_decode_schema()?);
        let mut batches = Vec::new();
        for endpoint in info.endpoint {
            let ticket = endpoint.ticket.ok_or_else(|| {
                HedfError::internal("the server sent an endpoint without a ticket")
            })?;
            let stream = self.client.do_get(ticket).await.map_err(flight_error)?;
            batches.extend(stream.try_collect::<Vec<_>>().await.map_err(flight_error)?);
        }
        Ok((schema, batches))
    }

    /// Runs a statement that returns no rows (`DROP TABLE`).
    pub async fn execute(&mut self, sql: &str) -> Result<i64> {
        self.client
            .execute_update(sql.to_string(), None)
            .await
            .map_err(flight_error)
    }

    /// Uploads encrypted batches (engine cells or stored parts) with Flight SQL bulk ingest;
    /// returns the row count the server committed. If `batches` fails midway, the call is
    /// aborted so the server discards the partial upload.
    pub async fn upload<S>(
        &mut self,
        table: &str,
        mode: IngestMode,
        options: UploadOptions,
        schema: SchemaRef,
        batches: S,
    ) -> Result<i64>
    where
        S: Stream<Item = Result<RecordBatch>> + Send + 'static,
    {
        let mut command = CommandStatementIngest {
            table_definition_options: Some(table_options(mode)),
            table: table.to_string(),
            ..Default::default()
        };
        if options.allow_plaintext {
            command
                .options
                .insert(ALLOW_PLAINTEXT_OPTION.into(), "true".into());
        }
        let descriptor = FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
        // LZ4 shrinks the row and seed columns to almost nothing; ciphertext bodies do not
        // compress and go raw (Arrow IPC keeps a buffer uncompressed when that is smaller).
        let options =
            IpcWriteOptions::default().try_with_compression(Some(CompressionType::LZ4_FRAME))?;
        let mut encoded = FlightDataEncoderBuilder::new()
            .with_options(options)
            .with_schema(schema)
            .with_flight_descriptor(Some(descriptor))
            .build(batches.map_err(|e| FlightError::ExternalError(Box::new(e))));
        let (mut sender, receiver) = futures::channel::mpsc::channel::<FlightData>(2);
        // The source's own error is the answer when it fails, not the server's CANCELLED for
        // the abort that follows (which of the two arrives first is a race).
        let source_error = std::sync::Arc::new(std::sync::Mutex::new(None));
        let feed_error = source_error.clone();
        let feed = async move {
            while let Some(data) = encoded.next().await {
                let data = match data {
                    Ok(data) => data,
                    Err(e) => {
                        *feed_error.lock().expect("source error") = Some(flight_error(e));
                        // Ending the stream would look like a complete upload: say it is not.
                        let abort = FlightData::new().with_app_metadata(ABORT_UPLOAD);
                        let _ = sender.send(abort).await;
                        return Err(HedfError::Cancelled("upload aborted"));
                    }
                };
                if sender.send(data).await.is_err() {
                    break; // the call ended early; its status says why
                }
            }
            Ok::<_, HedfError>(())
        };
        let call = async {
            let mut results = self.client.do_put(receiver).await.map_err(flight_error)?;
            let result = results
                .message()
                .await
                .map_err(status_error)?
                .ok_or_else(|| HedfError::internal("the server returned no ingest result"))?;
            let result =
                DoPutUpdateResult::decode(result.app_metadata).map_err(HedfError::internal)?;
            Ok::<_, HedfError>(result.record_count)
        };
        let outcome = futures::try_join!(call, feed);
        if let Some(e) = source_error.lock().expect("source error").take() {
            return Err(e);
        }
        let (rows, ()) = outcome?;
        Ok(rows)
    }

    /// The caller's tables with their schemas.
    pub async fn tables(&mut self) -> Result<Vec<(String, SchemaRef)>> {
        let info = self
            .client
            .get_tables(CommandGetTables {
                include_schema: true,
                ..Default::default()
            })
            .await
            .map_err(flight_error)?;
        let (_, batches) = self.fetch(info).await?;
        let mut tables = Vec::new();
        for batch in batches {
            use arrow::array::AsArray;
            let names = batch
                .column_by_name("table_name")
                .ok_or_else(|| HedfError::internal("GetTables answer without table_name"))?
                .as_string::<i32>()
                .clone();
            let schemas = batch
                .column_by_name("table_schema")
                .ok_or_else(|| HedfError::internal("GetTables answer without table_schema"))?
                .as_binary::<i32>()
                .clone();
            for (name, schema) in names.iter().zip(schemas.iter()) {
                let (Some(name), Some(schema)) = (name, schema) else {
                    continue;
                };
                let schema = arrow::ipc::convert::try_schema_from_ipc_buffer(schema)?;
                tables.push((name.to_string(), std::sync::Arc::new(schema)));
            }
        }
        Ok(tables)
    }
}

/// An ingest mode as Flight SQL's `TableDefinitionOptions`.
pub fn table_options(mode: IngestMode) -> TableDefinitionOptions {
    TableDefinitionOptions {
        if_not_exist: if mode.create_if_missing {
            TableNotExistOption::Create
        } else {
            TableNotExistOption::Fail
        } as i32,
        if_exists: match mode.if_exists {
            IfExists::Fail => TableExistsOption::Fail,
            IfExists::Append => TableExistsOption::Append,
            IfExists::Replace => TableExistsOption::Replace,
        } as i32,
    }
}

/// A server's refusal as an error of the kind the server sent (or, from a server that sends
/// none, the kind of its gRPC code).
fn status_error(status: tonic::Status) -> HedfError {
    use tonic::Code;
    let sent = status
        .metadata()
        .get(ERROR_KIND_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorKind::parse);
    let kind = sent.unwrap_or(match status.code() {
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            ErrorKind::InvalidArgument
        }
        Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Unauthenticated,
        Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        Code::DataLoss => ErrorKind::DataLoss,
        Code::Cancelled => ErrorKind::Cancelled,
        Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        Code::Unavailable => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    });
    HedfError::Remote {
        kind,
        message: status.message().to_string(),
    }
}

fn flight_error(e: FlightError) -> HedfError {
    match e {
        FlightError::Tonic(status) => status_error(*status),
        FlightError::Arrow(e) => HedfError::Arrow(e),
        FlightError::ExternalError(e) => match e.downcast::<HedfError>() {
            Ok(h) => *h,
            Err(e) => HedfError::internal(e),
        },
        other => HedfError::internal(other),
    }
}
