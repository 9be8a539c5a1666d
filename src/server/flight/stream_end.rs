//! How a request stream ended, as the transport saw it, and the limits it runs under.
//!
//! tonic's decoder ends a request stream that the client reset with CANCEL (what every gRPC
//! library sends when a call is cancelled or its deadline passes) exactly as if the client had
//! finished it. For an upload that difference is everything: a finished stream is a complete
//! table, a reset one is a fragment. This layer wraps each request body and records whether it
//! ended with the client's END_STREAM or with an error or reset; handlers read the record from
//! the request's extensions ([`StreamEnd`]).
//!
//! It also ends a request stream whose client sends nothing for the stall time while the handler
//! waits for data (DEADLINE_EXCEEDED, and the stream counts as broken): an upload that stops
//! midway must not hold its buffers and its slot until the connection's maximum age. And only
//! uploads may be large: any other call's request (a statement, a ticket, an action) over
//! [`MAX_REQUEST_BYTES`] is RESOURCE_EXHAUSTED, since tonic reserves a message's declared size
//! (up to the 64 MiB message limit) as soon as it reads its header.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};

use super::uploads::DO_PUT;

/// Largest request of a call other than DoPut: a statement is at most 1 MiB of SQL.
const MAX_REQUEST_BYTES: u64 = 2 << 20;

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

/// The tower layer that tracks every request body's end, and ends those that stall.
#[derive(Clone, Copy, Debug)]
pub struct TrackStreamEnd {
    /// How long a handler waits for its client's next bytes.
    pub stall: Duration,
}

impl<S> Layer<S> for TrackStreamEnd {
    type Service = Tracking<S>;
    fn layer(&self, inner: S) -> Tracking<S> {
        Tracking(inner, self.stall)
    }
}

#[derive(Clone, Debug)]
pub struct Tracking<S>(S, Duration);

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
        let limit = (parts.uri.path() != DO_PUT).then_some(MAX_REQUEST_BYTES);
        let body = Body::new(Tracked {
            inner: body,
            end,
            limit,
            received: 0,
            stall: self.1,
            timer: None,
            waiting: false,
        });
        self.0.call(http::Request::from_parts(parts, body))
    }
}

struct Tracked {
    inner: Body,
    end: Arc<StreamEnd>,
    /// Bytes the request may carry (`None`: an upload, bounded by its own limits).
    limit: Option<u64>,
    received: u64,
    stall: Duration,
    /// When the handler's current wait for data fails, if it is waiting. Only waits count, so
    /// a handler busy with what it already has is never the client's stall.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl Tracked {
    /// Pending until the client sends more, unless the stall time has passed since the
    /// handler began waiting.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let deadline = Instant::now() + self.stall;
        let timer = match (self.timer.take(), self.waiting) {
            (Some(timer), true) => timer,
            (Some(mut timer), false) => {
                timer.as_mut().reset(deadline);
                timer
            }
            (None, _) => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let timer = self.timer.insert(timer);
        if timer.as_mut().poll(cx).is_pending() {
            self.waiting = true;
            return Poll::Pending;
        }
        self.waiting = false;
        let stall = self.stall;
        self.end.set(BROKEN);
        Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
            "the client sent nothing for {} s while the server waited for its data",
            stall.as_secs_f64()
        )))))
    }
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
            Poll::Pending => return self.wait(cx),
            Poll::Ready(None) => self.end.set(COMPLETED),
            Poll::Ready(Some(Err(_))) => self.end.set(BROKEN),
            Poll::Ready(Some(Ok(frame))) => {
                self.received += frame.data_ref().map_or(0, |d| d.len() as u64);
                if let Some(limit) = self.limit.filter(|&l| self.received > l) {
                    self.end.set(BROKEN);
                    return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                        "a request other than an upload is at most {} MiB",
                        limit >> 20
                    )))));
                }
            }
        }
        self.waiting = false;
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
