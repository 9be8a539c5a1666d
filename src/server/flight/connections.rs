//! Connection limits: how many TCP connections the server holds, in all and per peer, and how
//! long one may stay without serving a call.
//!
//! HTTP/2 alone bounds what happens on a connection (streams, headers, windows), not how many
//! connections there are nor how long a silent one is kept: without this, one host opening
//! sockets and never speaking holds a file descriptor and a task each until the server runs out.
//! A connection over its peer's share is closed as soon as it is accepted; when the server is
//! full, a new connection evicts the oldest one that has not been served a call yet, so silent
//! sockets cannot lock logged-in users out. An admitted connection closes itself at its
//! deadline:
//! - before its first served call (a login that returned a token, or an authenticated call):
//!   the first-call deadline from accept, extended while a login is in progress by at most the
//!   time a login may take, whatever the logins on it do;
//! - after that: the idle time since its last call ended, and never while a call is open;
//! - in any case: its maximum age plus the grace its open calls get after tonic's GOAWAY.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::transport::server::Connected;
use tower::{Layer, Service};

use super::access::Caller;
use super::holding::Holding;

/// A refused or evicted connection is logged at most this often: a flood must not become a
/// log flood.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Evicted connections that have not closed yet, at most: past it, new connections are
/// refused instead.
const MAX_LEAVING: usize = 64;

/// How many connections the server holds and how long a quiet one stays.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Connections held at once, from everyone.
    pub total: usize,
    /// Connections held at once from one peer: an IPv4 address, or an IPv6 /64 (what one host
    /// is usually given). `None` when every client comes through one proxy.
    pub per_peer: Option<usize>,
    /// A connection that has not been served a call this long after accept is closed.
    pub first_call: Duration,
    /// A connection with no call open this long after its last one is closed.
    pub idle: Duration,
    /// A connection is asked to go away (HTTP/2 GOAWAY) after this long.
    pub max_age: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            total: 512,
            per_peer: Some(64),
            first_call: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            max_age: Duration::from_secs(3600),
        }
    }
}

/// The peer a connection (or a login) counts against: IPv6 addresses by their /64,
/// IPv4-mapped ones as IPv4.
pub(super) fn peer_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

#[derive(Default)]
struct Held {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
    /// Connections in accept order that may not have been served yet: eviction candidates.
    unserved: VecDeque<Weak<Activity>>,
    /// Evicted connections still open.
    leaving: usize,
    last_warning: Option<Instant>,
}

impl Held {
    /// Asks the oldest connection not yet served to close; false if there is none.
    fn evict_oldest_unserved(&mut self) -> bool {
        while let Some(candidate) = self.unserved.pop_front() {
            if let Some(activity) = candidate.upgrade().filter(|a| !a.served()) {
                activity.evict();
                self.leaving += 1;
                return true;
            }
        }
        false
    }

    /// Whether to log a refusal or eviction now: at most once per [`WARN_EVERY`].
    fn warn_now(&mut self) -> bool {
        let now = Instant::now();
        let due = self.last_warning.is_none_or(|t| now >= t + WARN_EVERY);
        if due {
            self.last_warning = Some(now);
        }
        due
    }
}

/// The connections the server holds now.
#[derive(Clone)]
pub(super) struct Connections {
    limits: Arc<ConnectionLimits>,
    /// How long a login may take: a connection's first-call deadline stretches by at most
    /// this while one is in progress.
    login: Duration,
    /// What open calls get after the GOAWAY at the maximum age, before the connection is cut.
    grace: Duration,
    held: Arc<Mutex<Held>>,
}

impl Connections {
    pub(super) fn new(limits: ConnectionLimits, login: Duration, grace: Duration) -> Connections {
        Connections {
            limits: Arc::new(limits),
            login,
            grace,
            held: Arc::default(),
        }
    }

    /// The listener's connections, each admitted or closed at once; admitted ones close
    /// themselves at their deadline.
    pub(super) fn guard(
        self,
        incoming: impl Stream<Item = io::Result<TcpStream>>,
    ) -> impl Stream<Item = io::Result<Guarded>> {
        incoming.filter_map(move |accepted| {
            let admitted = match accepted {
                Ok(tcp) => self.admit(tcp).map(Ok),
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(admitted)
        })
    }

    /// `None` (the socket dropped, so closed) when a limit is reached.
    fn admit(&self, tcp: TcpStream) -> Option<Guarded> {
        let remote = tcp.peer_addr().ok()?;
        let peer = peer_of(remote.ip());
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let of_peer = held.by_peer.get(&peer).copied().unwrap_or(0);
        if self.limits.per_peer.is_some_and(|limit| of_peer >= limit) {
            if held.warn_now() {
                drop(held);
                tracing::warn!(%peer, "refusing connections over the per-peer limit");
            }
            return None;
        }
        let full = held.total >= self.limits.total;
        if full && (held.leaving >= MAX_LEAVING || !held.evict_oldest_unserved()) {
            if held.warn_now() {
                drop(held);
                tracing::warn!("refusing connections: the server's connection limit is reached");
            }
            return None;
        }
        held.total += 1;
        *held.by_peer.entry(peer).or_default() += 1;
        let activity = Arc::new(Activity::new(&self.limits, self.login, self.grace));
        if held.unserved.len() > 2 * self.limits.total {
            held.unserved
                .retain(|a| a.upgrade().is_some_and(|a| !a.served()));
        }
        held.unserved.push_back(Arc::downgrade(&activity));
        if full && held.warn_now() {
            drop(held);
            tracing::warn!(
                "the server's connection limit is reached: closing connections that have not \
                 been served a call, oldest first"
            );
        }
        Some(Guarded {
            timer: Box::pin(tokio::time::sleep_until(activity.deadline())),
            link: Link {
                remote,
                activity: activity.clone(),
            },
            _slot: Slot {
                held: self.held.clone(),
                peer,
                activity,
            },
            io: tcp,
        })
    }
}

/// A connection's place in the count, given back when it closes.
struct Slot {
    held: Arc<Mutex<Held>>,
    peer: IpAddr,
    activity: Arc<Activity>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.total -= 1;
        if self.activity.evicted.load(Ordering::Acquire) {
            held.leaving -= 1;
        }
        if let Some(count) = held.by_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                held.by_peer.remove(&self.peer);
            }
        }
    }
}

/// What a connection has served, which sets its deadline.
struct Activity {
    accepted: Instant,
    first_call: Duration,
    login: Duration,
    idle: Duration,
    /// The maximum age plus the grace after GOAWAY.
    cut: Instant,
    calls: Mutex<Calls>,
    evicted: AtomicBool,
    /// The connection's task, to wake when its deadline moves earlier.
    waker: AtomicWaker,
}

struct Calls {
    open: usize,
    served: bool,
    last_ended: Instant,
}

impl Activity {
    fn new(limits: &ConnectionLimits, login: Duration, grace: Duration) -> Activity {
        let accepted = Instant::now();
        Activity {
            accepted,
            first_call: limits.first_call,
            login,
            idle: limits.idle,
            cut: accepted + limits.max_age + grace,
            calls: Mutex::new(Calls {
                open: 0,
                served: false,
                last_ended: accepted,
            }),
            evicted: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn served(&self) -> bool {
        self.calls().served
    }

    /// When the connection closes if nothing changes.
    fn deadline(&self) -> Instant {
        if self.evicted.load(Ordering::Acquire) {
            return self.accepted;
        }
        let calls = self.calls();
        let deadline = match (calls.open, calls.served) {
            (0, false) => self.accepted + self.first_call,
            (_, false) => self.accepted + self.first_call + self.login,
            (0, true) => calls.last_ended + self.idle,
            _ => self.cut,
        };
        deadline.min(self.cut)
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn open(self: &Arc<Self>, served: bool) -> OpenCall {
        let mut calls = self.calls();
        calls.open += 1;
        calls.served |= served;
        OpenCall(self.clone())
    }
}

/// One call in progress on a connection; it ends when its response body is dropped.
struct OpenCall(Arc<Activity>);

impl OpenCall {
    fn served(&self) {
        self.0.calls().served = true;
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        let mut calls = self.0.calls();
        calls.open -= 1;
        calls.last_ended = Instant::now();
        drop(calls);
        // The deadline may be earlier now than the timer is set for.
        self.0.waker.wake();
    }
}

/// What tonic puts in every request's extensions about its connection, in place of
/// `TcpConnectInfo`: `Request::remote_addr`, `local_addr` and `peer_certs` are `None`, so take
/// the address from here (and a TLS client's certificates from `TlsConnectInfo<Link>`).
#[derive(Clone)]
pub struct Link {
    pub remote: SocketAddr,
    activity: Arc<Activity>,
}

/// An admitted TCP connection that fails its reads and writes once its deadline has passed,
/// which makes hyper close it.
pub(super) struct Guarded {
    io: TcpStream,
    link: Link,
    timer: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl Guarded {
    /// Whether the deadline has passed; otherwise the timer is set to wake the connection's
    /// task at the deadline, and the activity to wake it when the deadline moves.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let activity = &self.link.activity;
        activity.waker.register(cx.waker());
        loop {
            let deadline = activity.deadline();
            if deadline <= Instant::now() {
                return true;
            }
            if deadline != self.timer.deadline() {
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection closed at its deadline")
}

impl Connected for Guarded {
    type ConnectInfo = Link;

    fn connect_info(&self) -> Link {
        self.link.clone()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The tower layer that tells each connection when a call starts and ends. It sits inside
/// [`super::access::Access`], so only calls that passed it count, and a call counts as served
/// only when authenticated or when it is a login that returned a token.
#[derive(Clone, Copy, Debug, Default)]
pub struct CountCalls;

impl<S> Layer<S> for CountCalls {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted(inner)
    }
}

#[derive(Clone, Debug)]
pub struct Counted<S>(S);

impl<S> Service<http::Request<Body>> for Counted<S>
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
        let call = request.extensions().get::<Link>().map(|link| {
            let authenticated = request.extensions().get::<Caller>().is_some();
            link.activity.open(authenticated)
        });
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            let Some(call) = call else {
                return Ok(response);
            };
            if response.headers().contains_key("authorization") {
                call.served();
            }
            Ok(Holding::wrap(response, call))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            first_call: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            max_age: Duration::from_secs(3600),
            ..ConnectionLimits::default()
        }
    }

    const LOGIN: Duration = Duration::from_secs(15);
    const GRACE: Duration = Duration::from_secs(300);

    #[test]
    fn deadlines_follow_calls() {
        let limits = limits();
        let activity = Arc::new(Activity::new(&limits, LOGIN, GRACE));
        let first = activity.accepted + limits.first_call;
        assert_eq!(activity.deadline(), first);
        // A login in progress stretches the first-call deadline, by a bounded time only.
        let login = activity.open(false);
        assert_eq!(activity.deadline(), first + LOGIN);
        drop(login);
        assert_eq!(activity.deadline(), first);
        // An authenticated call holds the connection up to its maximum age and grace.
        let call = activity.open(true);
        assert_eq!(activity.deadline(), activity.cut);
        assert_eq!(activity.cut, activity.accepted + limits.max_age + GRACE);
        drop(call);
        assert!(activity.deadline() >= activity.accepted + limits.idle);
        // A login that returned a token serves the connection too.
        let fresh = Arc::new(Activity::new(&limits, LOGIN, GRACE));
        let login = fresh.open(false);
        login.served();
        drop(login);
        assert!(fresh.deadline() >= fresh.accepted + limits.idle);
        fresh.evict();
        assert!(fresh.deadline() <= Instant::now());
    }

    #[test]
    fn a_full_server_evicts_the_oldest_connection_not_logged_in() {
        let limits = limits();
        let mut held = Held::default();
        let (served, old, young) = (
            Arc::new(Activity::new(&limits, LOGIN, GRACE)),
            Arc::new(Activity::new(&limits, LOGIN, GRACE)),
            Arc::new(Activity::new(&limits, LOGIN, GRACE)),
        );
        drop(served.open(true));
        for activity in [&served, &old, &young] {
            held.unserved.push_back(Arc::downgrade(activity));
        }
        assert!(held.evict_oldest_unserved());
        assert!(!served.evicted.load(Ordering::Acquire));
        assert!(old.evicted.load(Ordering::Acquire));
        assert!(!young.evicted.load(Ordering::Acquire));
        drop(young);
        assert!(
            !held.evict_oldest_unserved(),
            "a closed connection was evicted"
        );
        assert_eq!(held.leaving, 1);
    }
}
