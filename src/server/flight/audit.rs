//! The audit log: one structured line per RPC (tracing target `hedf::audit`), written when the
//! call ends: answered, refused, or abandoned by its client. It says who (tenant), what (RPC,
//! and the table of an upload or DROP, or the tables a query reads), how much (rows, bytes in and out), how long and with
//! which gRPC status code. It never carries SQL, values, keys, passwords or tokens.
//!
//! The layer counts bytes and reads the status from the response itself, so every call is
//! logged, including those refused before a handler ran; handlers add what only they know
//! through the [`Audit`] record in the request's extensions.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};

/// What a handler knows of its call and the log should say.
#[derive(Debug, Default)]
pub struct Audit {
    tenant: OnceLock<String>,
    table: OnceLock<String>,
    rows: AtomicU64,
    bytes_in: AtomicU64,
}

impl Audit {
    /// The record of the call `request` belongs to (a detached one outside `serve`'s layers).
    pub fn of<T>(request: &tonic::Request<T>) -> Arc<Audit> {
        request
            .extensions()
            .get::<Arc<Audit>>()
            .cloned()
            .unwrap_or_default()
    }

    pub fn tenant(&self, name: &str) {
        let _ = self.tenant.set(name.to_string());
    }

    /// The table a call touches (several: comma-separated). Names are the caller's words: at
    /// most 128 characters of one go to the log (and every
    /// text field is written quoted, so none can pose as another field).
    pub fn table(&self, name: &str) {
        let _ = self.table.set(name.chars().take(128).collect());
    }

    pub fn add_rows(&self, rows: usize) {
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
    }
}

/// The tower layer that writes the audit line of every call.
#[derive(Clone, Copy, Debug, Default)]
pub struct AuditLog;

impl<S> Layer<S> for AuditLog {
    type Service = Audited<S>;
    fn layer(&self, inner: S) -> Audited<S> {
        Audited(inner)
    }
}

#[derive(Clone, Debug)]
pub struct Audited<S>(S);

impl<S> Service<http::Request<Body>> for Audited<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let audit = Arc::new(Audit::default());
        let rpc = method(request.uri().path());
        let start = Instant::now();
        // tonic's own timeout, outside this layer, drops the call when the client's deadline
        // passes: then the client was told DEADLINE_EXCEEDED, not that it cancelled.
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout)
            .map(|timeout| start + timeout);
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(audit.clone());
        let body = Body::new(CountedIn {
            inner: body,
            audit: audit.clone(),
        });
        let call = self.0.call(http::Request::from_parts(parts, body));
        let mut entry = Entry {
            audit,
            rpc,
            start,
            deadline,
            code: None,
            bytes_out: 0,
            written: false,
        };
        Box::pin(async move {
            let response = call.await?;
            // A refusal is "trailers-only": its status is in the headers and the body is empty.
            entry.code = grpc_status(response.headers());
            let (parts, body) = response.into_parts();
            Ok(http::Response::from_parts(
                parts,
                Body::new(CountedOut { inner: body, entry }),
            ))
        })
    }
}

/// The Flight method a path calls, from a fixed list: the path is the caller's to choose.
fn method(path: &str) -> &'static str {
    const METHODS: [&str; 10] = [
        "Handshake",
        "ListFlights",
        "GetFlightInfo",
        "PollFlightInfo",
        "GetSchema",
        "DoGet",
        "DoPut",
        "DoExchange",
        "DoAction",
        "ListActions",
    ];
    path.strip_prefix("/arrow.flight.protocol.FlightService/")
        .and_then(|name| METHODS.into_iter().find(|m| *m == name))
        .unwrap_or("unknown")
}

/// A `grpc-timeout` header value: at most 8 digits and a unit.
fn grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from)
}

/// One call's line, written once: when its answer ends, or when the answer is dropped unsent
/// (the client went away).
struct Entry {
    audit: Arc<Audit>,
    rpc: &'static str,
    start: Instant,
    deadline: Option<Instant>,
    code: Option<tonic::Code>,
    bytes_out: u64,
    written: bool,
}

impl Entry {
    fn write(&mut self, ended: bool) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let code = match (self.code, ended) {
            (Some(code), _) => code,
            (None, true) => tonic::Code::Ok,
            (None, false) if self.deadline.is_some_and(|d| Instant::now() >= d) => {
                tonic::Code::DeadlineExceeded
            }
            (None, false) => tonic::Code::Cancelled,
        };
        let audit = &self.audit;
        tracing::info!(
            target: "hedf::audit",
            tenant = audit.tenant.get().map_or("-", String::as_str),
            rpc = self.rpc,
            table = audit.table.get().map_or("-", String::as_str),
            rows = audit.rows.load(Ordering::Relaxed),
            bytes_in = audit.bytes_in.load(Ordering::Relaxed),
            bytes_out = self.bytes_out,
            ms = self.start.elapsed().as_secs_f64() * 1e3,
            code = ?code,
        );
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.write(false);
    }
}

struct CountedIn {
    inner: Body,
    audit: Arc<Audit>,
}

impl HttpBody for CountedIn {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.audit
                    .bytes_in
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct CountedOut {
    inner: Body,
    entry: Entry,
}

impl HttpBody for CountedOut {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.entry.bytes_out += data.len() as u64;
                } else if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.entry.code = Some(code);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                self.entry.code = Some(status.code());
                self.entry.write(true);
            }
            Poll::Ready(None) => self.entry.write(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
