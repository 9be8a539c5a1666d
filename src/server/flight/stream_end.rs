//! How a request stream ended, as the transport saw it.
//!
//! tonic's decoder ends a request stream that the client reset with CANCEL (what every gRPC
//! library sends when a call is cancelled or its deadline passes) exactly as if the client had
//! finished it. For an upload that difference is everything: a finished stream is a complete
//! table, a reset one is a fragment. This layer wraps each request body and records whether it
//! ended with the client's END_STREAM or with an error or reset; handlers read the record from
//! the request's extensions ([`StreamEnd`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};

const OPEN: u8 = 0;
const COMPLETED: u8 = 1;
const BROKEN: u8 = 2;

/// Whether a request body has ended, and how.
#[derive(Debug)]
pub struct StreamEnd(AtomicU8);

impl Default for StreamEnd {
    fn default() -> Self {
        StreamEnd(AtomicU8::new(OPEN))
    }
}

impl StreamEnd {
    /// True once the client ended the stream itself (END_STREAM) and nothing broke it before.
    pub fn completed(&self) -> bool {
        self.0.load(Ordering::Acquire) == COMPLETED
    }

    fn set(&self, state: u8) {
        // A broken stream stays broken.
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s != BROKEN).then_some(state)
            });
    }
}

/// The tower layer that tracks every request body's end.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackStreamEnd;

impl<S> Layer<S> for TrackStreamEnd {
    type Service = Tracking<S>;
    fn layer(&self, inner: S) -> Tracking<S> {
        Tracking(inner)
    }
}

#[derive(Clone, Debug)]
pub struct Tracking<S>(S);

impl<S> Service<http::Request<Body>> for Tracking<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let end = Arc::new(StreamEnd::default());
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(end.clone());
        let body = Body::new(Tracked { inner: body, end });
        self.0.call(http::Request::from_parts(parts, body))
    }
}

struct Tracked {
    inner: Body,
    end: Arc<StreamEnd>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.end.set(COMPLETED),
            Poll::Ready(Some(Err(_))) => self.end.set(BROKEN),
            _ => {}
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
