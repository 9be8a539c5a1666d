//! How much work the server takes on at once: bounded gates with a bounded queue in front, so
//! a burst waits its turn and a flood is refused at once (RESOURCE_EXHAUSTED) instead of
//! piling up memory and latency for everyone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::{HedfError, Result};

/// A queue holds this many callers per slot before refusing newcomers.
const QUEUE_PER_SLOT: usize = 4;

/// At most `limit` holders at once and `queue` waiting.
pub struct Gate {
    what: &'static str,
    permits: Arc<Semaphore>,
    limit: usize,
    queue: usize,
    waiting: AtomicUsize,
}

impl Gate {
    /// `what` names the work in refusals ("queries", "logins").
    pub fn new(what: &'static str, permits: usize, queue: usize) -> Gate {
        let limit = permits.max(1);
        Gate {
            what,
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            queue,
            waiting: AtomicUsize::new(0),
        }
    }

    /// A permit, waiting in line until `deadline` at the latest. Dropping the permit frees it.
    pub async fn enter(&self, deadline: Instant) -> Result<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queued = Queued::join(&self.waiting, self.queue).ok_or_else(|| {
            let queue = if self.queue == 0 {
                ""
            } else {
                ", the queue is full"
            };
            HedfError::Throttled(format!(
                "too many {} at once ({} running{queue}); retry later",
                self.what, self.limit
            ))
        })?;
        let permit = tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                HedfError::Throttled(format!(
                    "too many {} at once ({} running); waited in the queue until the time \
                     limit, retry later",
                    self.what, self.limit
                ))
            })?
            .map_err(HedfError::internal)?;
        drop(queued);
        Ok(permit)
    }
}

/// A place in a gate's queue, given back when the wait ends or is abandoned.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn join(waiting: &'a AtomicUsize, capacity: usize) -> Option<Queued<'a>> {
        waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < capacity).then_some(n + 1)
            })
            .ok()
            .map(|_| Queued(waiting))
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Calls of one kind (queries, uploads) running at once: a limit for the whole server and a
/// smaller one per tenant, so one tenant's burst cannot take every slot.
pub struct Admission {
    /// What the work is called in refusals: the server's and one tenant's.
    what: (&'static str, &'static str),
    server: Gate,
    per_tenant: usize,
    queue_per_slot: usize,
    tenants: Mutex<HashMap<String, Arc<Gate>>>,
}

/// Both permits of an admitted call; it holds them until it ends.
pub struct Admitted {
    _tenant: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
}

impl Admission {
    /// Queries wait in a queue of `QUEUE_PER_SLOT` callers per slot.
    pub fn queries(server: usize, per_tenant: usize) -> Admission {
        Admission::new(
            ("queries", "queries for this user"),
            server,
            per_tenant,
            QUEUE_PER_SLOT,
        )
    }

    /// Uploads do not wait: a queued upload's data would sit unread in its connection's
    /// HTTP/2 window and hold back the data of the uploads running on that connection.
    pub fn uploads(server: usize, per_tenant: usize) -> Admission {
        Admission::new(("uploads", "uploads for this user"), server, per_tenant, 0)
    }

    fn new(
        what: (&'static str, &'static str),
        server: usize,
        per_tenant: usize,
        queue_per_slot: usize,
    ) -> Admission {
        Admission {
            what,
            server: Gate::new(what.0, server, server * queue_per_slot),
            per_tenant,
            queue_per_slot,
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one call of `tenant`, first within the tenant's share, then the server's.
    pub async fn admit(&self, tenant: &str, deadline: Instant) -> Result<Admitted> {
        let gate = self
            .tenants
            .lock()
            .expect("admission lock")
            .entry(tenant.to_string())
            .or_insert_with(|| {
                Arc::new(Gate::new(
                    self.what.1,
                    self.per_tenant,
                    self.per_tenant * self.queue_per_slot,
                ))
            })
            .clone();
        let tenant = gate.enter(deadline).await?;
        let server = self.server.enter(deadline).await?;
        Ok(Admitted {
            _tenant: tenant,
            _server: server,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::ErrorKind;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(50)
    }

    #[tokio::test]
    async fn a_full_gate_queues_then_refuses() {
        let gate = Gate::new("queries", 1, 4);
        let held = gate.enter(soon()).await.unwrap();
        // One permit, four may wait: four waiters time out in the queue, the fifth is turned
        // away at once.
        let waiters: Vec<_> = (0..4).map(|_| gate.enter(soon())).collect();
        let fifth = gate.enter(soon());
        let (waited, fifth) = tokio::join!(futures::future::join_all(waiters), fifth);
        let fifth = fifth.expect_err("queue full");
        assert!(fifth.to_string().contains("queue is full"), "{fifth}");
        for w in waited {
            let e = w.expect_err("timed out in the queue");
            assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
            assert!(e.to_string().contains("waited"), "{e}");
        }
        assert_eq!(gate.waiting.load(Ordering::Acquire), 0);
        drop(held);
        drop(gate.enter(soon()).await.unwrap());
    }

    #[tokio::test]
    async fn a_waiter_gets_the_permit_when_it_is_freed() {
        let gate = Arc::new(Gate::new("queries", 1, 4));
        let held = gate.enter(soon()).await.unwrap();
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.enter(Instant::now() + Duration::from_secs(10))
                    .await
                    .map(|_| ())
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn one_tenant_cannot_take_every_slot() {
        let admission = Admission::queries(3, 2);
        let _a1 = admission.admit("alice", soon()).await.unwrap();
        let _a2 = admission.admit("alice", soon()).await.unwrap();
        let e = admission.admit("alice", soon()).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        let _b1 = admission.admit("bob", soon()).await.unwrap();
        // The server's three slots are taken: bob's second query waits, then is refused.
        assert!(admission.admit("bob", soon()).await.is_err());
    }

    #[tokio::test]
    async fn uploads_past_the_share_are_refused_at_once() {
        let admission = Admission::uploads(8, 1);
        let _held = admission.admit("alice", soon()).await.unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let e = tokio::time::timeout(Duration::from_secs(1), admission.admit("alice", far))
            .await
            .expect("an upload waited in a queue")
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        assert!(
            e.to_string()
                .contains("too many uploads for this user at once (1 running)"),
            "{e}"
        );
    }
}
