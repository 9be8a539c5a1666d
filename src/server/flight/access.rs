//! Who may reach the service at all. Every call but the handshake must carry a live bearer
//! token, and this layer checks it from the headers before a byte of the request body is
//! decoded: a caller who has not logged in cannot make the server parse a message. A
//! handshake's body is dropped here unread (its credentials are in its headers), which also
//! frees whatever HTTP/2 had buffered of it while the login waits for Argon2. Handlers take the
//! caller from the request's extensions ([`Caller`]); nothing else decides who a call belongs
//! to.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{ready, Either, Ready};
use tonic::body::Body;
use tower::{Layer, Service};

use super::audit::Audit;
use super::auth::{Directory, Tokens};
use super::status::status;
use crate::error::ErrorKind;
use crate::protocol::ANONYMOUS;

const HANDSHAKE: &str = "/arrow.flight.protocol.FlightService/Handshake";

/// The user a call was authenticated as.
#[derive(Clone, Debug)]
pub struct Caller(pub String);

/// The users and live tokens calls are checked against; `users: None` lets everyone in as
/// the anonymous tenant (`--insecure-no-auth`).
#[derive(Clone)]
pub struct Access {
    pub users: Option<Arc<Directory>>,
    pub tokens: Arc<Tokens>,
}

impl Access {
    /// The caller of a call to `path`; `Ok(None)` for a handshake, which authenticates itself.
    #[allow(clippy::result_large_err)]
    fn caller(
        &self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<Caller>, tonic::Status> {
        let Some(users) = &self.users else {
            return Ok(Some(Caller(ANONYMOUS.to_string())));
        };
        if path == HANDSHAKE {
            return Ok(None);
        }
        let header = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let token = header.strip_prefix("Bearer ").ok_or_else(|| {
            status(
                ErrorKind::Unauthenticated,
                "missing bearer token: authenticate with the Flight handshake (Basic user:password)",
            )
        })?;
        self.tokens
            .user(token, &users.current())
            .map(|user| Some(Caller(user)))
            .ok_or_else(|| status(ErrorKind::Unauthenticated, "invalid or expired token"))
    }
}

impl<S> Layer<S> for Access {
    type Service = Gated<S>;
    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            access: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    access: Access,
}

impl<S> Service<http::Request<Body>> for Gated<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<http::Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match self.access.caller(request.uri().path(), request.headers()) {
            Ok(Some(caller)) => {
                if let Some(audit) = request.extensions().get::<Arc<Audit>>() {
                    audit.tenant(&caller.0);
                }
                request.extensions_mut().insert(caller);
                Either::Right(self.inner.call(request))
            }
            Ok(None) => {
                *request.body_mut() = Body::empty();
                Either::Right(self.inner.call(request))
            }
            Err(refused) => Either::Left(ready(Ok(refused.into_http()))),
        }
    }
}
