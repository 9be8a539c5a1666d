//! How many uploads (DoPut calls) run at once, in all and per tenant. The slot is taken from
//! the call's headers, before a byte of its body is read (Flight SQL reads a DoPut's whole
//! first message, up to 64 MiB, to route it), and held until its answer is sent, so what
//! uploads buffer is bounded by the slots. An upload over its share is refused at once
//! (RESOURCE_EXHAUSTED), not queued: see [`Admission::uploads`].

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::time::Instant;
use tonic::body::Body;
use tower::{Layer, Service};

use super::access::Caller;
use super::holding::Holding;
use super::status::to_status;
use crate::server::admission::Admission;

pub const DO_PUT: &str = "/arrow.flight.protocol.FlightService/DoPut";

/// The tower layer that admits DoPut calls; it sits inside [`super::access::Access`], which
/// names the caller.
#[derive(Clone)]
pub struct UploadGate(Arc<Admission>);

impl UploadGate {
    pub fn new(max: usize, per_tenant: usize) -> UploadGate {
        UploadGate(Arc::new(Admission::uploads(max, per_tenant)))
    }
}

impl<S> Layer<S> for UploadGate {
    type Service = Gated<S>;
    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    gate: UploadGate,
}

impl<S> Service<http::Request<Body>> for Gated<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let tenant = match request.extensions().get::<Caller>() {
            Some(caller) if request.uri().path() == DO_PUT => caller.0.clone(),
            _ => return Box::pin(self.inner.call(request)),
        };
        // The service made ready for this call goes with it; the next call gets a clone.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let admission = self.gate.0.clone();
        Box::pin(async move {
            // No queue, so no wait: the deadline is never reached.
            let admitted = match admission.admit(&tenant, Instant::now()).await {
                Ok(admitted) => admitted,
                Err(e) => return Ok(to_status(e).into_http()),
            };
            Ok(Holding::wrap(inner.call(request).await?, admitted))
        })
    }
}
