//! Backoff for password guessing: failed logins per user name and per peer network earn
//! exponentially growing waits, and a login asked for during its wait is refused without
//! running Argon2, so a flood costs the server almost nothing.
//!
//! A failure counts once Argon2 has said no. Logins being checked are counted too: a subject
//! may have a bounded number in flight (a client's connection pool logs in at once), and once
//! over its free failures only one at a time, so parallel guesses cannot slip past a wait.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::connections::peer_of;

/// Failed logins without a wait: per user name, and per peer (a NAT or a proxy may hide many
/// users).
const FREE_PER_USER: u32 = 5;
const FREE_PER_PEER: u32 = 20;
/// Logins of one subject being checked at once, while it is within its free failures.
const IN_FLIGHT_PER_USER: u32 = 32;
const IN_FLIGHT_PER_PEER: u32 = 64;
/// The first wait; each further failure doubles it, up to the cap.
const FIRST_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(300);
/// A subject without a failure for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Records kept at most: names are the caller's choice, so memory must not be.
const MAX_RECORDS: usize = 100_000;

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Subject {
    User(String),
    /// An IPv4 address, or the /64 network of an IPv6 one (one host's usual allocation).
    Peer(IpAddr),
}

impl Subject {
    fn peer(ip: IpAddr) -> Subject {
        Subject::Peer(peer_of(ip))
    }

    /// Free failures and logins in flight.
    fn allowance(&self) -> (u32, u32) {
        match self {
            Subject::User(_) => (FREE_PER_USER, IN_FLIGHT_PER_USER),
            Subject::Peer(_) => (FREE_PER_PEER, IN_FLIGHT_PER_PEER),
        }
    }
}

#[derive(Default)]
struct Record {
    failures: u32,
    last_failure: Option<Instant>,
    in_flight: u32,
}

impl Record {
    /// How long a new login of this subject must wait; zero if it may go now.
    fn wait(&self, subject: &Subject, now: Instant) -> Duration {
        let (free, parallel) = subject.allowance();
        if self.failures < free {
            return if self.in_flight < parallel {
                Duration::ZERO
            } else {
                FIRST_WAIT
            };
        }
        let until = self
            .last_failure
            .map_or(now, |last| last + wait(self.failures, free));
        match until.checked_duration_since(now) {
            Some(wait) if !wait.is_zero() => wait,
            _ if self.in_flight > 0 => FIRST_WAIT,
            _ => Duration::ZERO,
        }
    }

    fn is_quiet(&self, now: Instant) -> bool {
        self.in_flight == 0
            && self
                .last_failure
                .is_none_or(|last| now.duration_since(last) >= FORGET_AFTER)
    }
}

/// Failed-login records of one server.
#[derive(Default)]
pub struct LoginThrottle {
    records: Mutex<HashMap<Subject, Record>>,
}

/// The wait after `failures` failed logins of a subject allowed `free` of them.
fn wait(failures: u32, free: u32) -> Duration {
    match failures.checked_sub(free) {
        None => Duration::ZERO,
        Some(over) => FIRST_WAIT
            .checked_mul(1 << over.min(16))
            .map_or(MAX_WAIT, |w| w.min(MAX_WAIT)),
    }
}

/// A login being checked; tell it how the check ended. Dropped without an outcome before
/// [`Attempt::checking`] (the server was too busy, the caller went away while queued), it
/// counts as nothing; after it, as a failure: a caller must not get free guesses by
/// cancelling its logins once their passwords are being checked.
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    subjects: Vec<Subject>,
    checking: bool,
}

impl LoginThrottle {
    /// Starts checking a login, or says how long the caller must wait first.
    pub fn attempt(
        &self,
        user: &str,
        peer: Option<IpAddr>,
        now: Instant,
    ) -> Result<Attempt<'_>, Duration> {
        let subjects = subjects(user, peer);
        let mut records = self.records.lock().expect("throttle lock");
        let wait = subjects
            .iter()
            .filter_map(|s| {
                let record = records.get_mut(s)?;
                if record.is_quiet(now) {
                    *record = Record::default();
                }
                Some(record.wait(s, now))
            })
            .max()
            .unwrap_or_default();
        if !wait.is_zero() {
            return Err(wait);
        }
        if records.len() + subjects.len() > MAX_RECORDS {
            make_room(&mut records, now);
        }
        for subject in &subjects {
            records.entry(subject.clone()).or_default().in_flight += 1;
        }
        Ok(Attempt {
            throttle: self,
            subjects,
            checking: false,
        })
    }
}

impl Attempt<'_> {
    /// The password is being checked from now on.
    pub fn checking(&mut self) {
        self.checking = true;
    }

    /// The password was wrong: every subject's failures grow.
    pub fn failed(mut self, now: Instant) {
        let subjects = std::mem::take(&mut self.subjects);
        self.throttle.finish(&subjects, |_, record| {
            record.failures += 1;
            record.last_failure = Some(now);
        });
    }

    /// The password was right: the user starts afresh; the peer keeps its failures.
    pub fn succeeded(mut self) {
        let subjects = std::mem::take(&mut self.subjects);
        self.throttle.finish(&subjects, |subject, record| {
            if let Subject::User(_) = subject {
                record.failures = 0;
                record.last_failure = None;
            }
        });
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let (checking, now) = (self.checking, Instant::now());
        self.throttle.finish(&self.subjects, |_, record| {
            if checking {
                record.failures += 1;
                record.last_failure = Some(now);
            }
        });
    }
}

impl LoginThrottle {
    /// Ends one login of each of `subjects`; records left with nothing to remember go.
    fn finish(&self, subjects: &[Subject], outcome: impl Fn(&Subject, &mut Record)) {
        let mut records = self.records.lock().expect("throttle lock");
        for subject in subjects {
            let Some(record) = records.get_mut(subject) else {
                continue;
            };
            record.in_flight = record.in_flight.saturating_sub(1);
            outcome(subject, record);
            if record.in_flight == 0 && record.failures == 0 {
                records.remove(subject);
            }
        }
    }
}

fn subjects(user: &str, peer: Option<IpAddr>) -> Vec<Subject> {
    let mut subjects = vec![Subject::User(user.to_string())];
    subjects.extend(peer.map(Subject::peer));
    subjects
}

/// Forgets quiet records, then if still full the tenth whose last failure is oldest.
fn make_room(records: &mut HashMap<Subject, Record>, now: Instant) {
    records.retain(|_, r| !r.is_quiet(now));
    if records.len() < MAX_RECORDS {
        return;
    }
    let mut by_age: Vec<(Option<Instant>, Subject)> = records
        .iter()
        .filter(|(_, r)| r.in_flight == 0)
        .map(|(s, r)| (r.last_failure, s.clone()))
        .collect();
    let cut = (by_age.len() / 10).max(1).min(by_age.len());
    if cut == 0 {
        return;
    }
    by_age.select_nth_unstable_by_key(cut - 1, |(last, _)| *last);
    for (_, subject) in &by_age[..cut] {
        records.remove(subject);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    const PEER: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    fn fail(throttle: &LoginThrottle, user: &str, now: Instant) {
        throttle.attempt(user, PEER, now).unwrap().failed(now);
    }

    #[test]
    fn waits_double_after_the_free_attempts_up_to_the_cap() {
        let waits: Vec<u64> = (0..8).map(|n| wait(n, 5).as_secs()).collect();
        assert_eq!(waits, [0, 0, 0, 0, 0, 1, 2, 4]);
        assert_eq!(wait(20, 5), MAX_WAIT);
        assert_eq!(wait(u32::MAX, 5), MAX_WAIT);
    }

    #[test]
    fn a_user_is_throttled_after_five_failures_until_the_wait_passes() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            fail(&throttle, "alice", t0);
        }
        assert_eq!(throttle.attempt("alice", PEER, t0).err(), Some(FIRST_WAIT));
        // Another user from the same peer is not held up by alice's record.
        throttle.attempt("bob", PEER, t0).unwrap().succeeded();
        let later = t0 + FIRST_WAIT;
        fail(&throttle, "alice", later);
        assert_eq!(
            throttle.attempt("alice", PEER, later).err(),
            Some(2 * FIRST_WAIT)
        );
        // An hour without failures: a fresh start.
        let much_later = later + FORGET_AFTER;
        throttle
            .attempt("alice", PEER, much_later)
            .unwrap()
            .failed(much_later);
        throttle.attempt("alice", PEER, much_later).unwrap();
    }

    #[test]
    fn a_login_abandoned_while_its_password_is_checked_counts_as_failed() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        drop(throttle.attempt("alice", PEER, t0).unwrap());
        assert!(throttle.records.lock().unwrap().is_empty());
        let mut abandoned = throttle.attempt("alice", PEER, t0).unwrap();
        abandoned.checking();
        drop(abandoned);
        let records = throttle.records.lock().unwrap();
        assert_eq!(records[&Subject::peer(PEER.unwrap())].failures, 1);
    }

    #[test]
    fn parallel_logins_are_bounded_and_only_one_at_a_time_past_the_free_failures() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        // A connection pool logging in at once is fine, up to a bound.
        let pool: Vec<_> = (0..IN_FLIGHT_PER_USER)
            .map(|_| throttle.attempt("alice", None, t0).unwrap())
            .collect();
        assert!(throttle.attempt("alice", None, t0).is_err());
        pool.into_iter().for_each(Attempt::succeeded);
        assert!(throttle.records.lock().unwrap().is_empty());
        for _ in 0..5 {
            throttle.attempt("alice", None, t0).unwrap().failed(t0);
        }
        let later = t0 + FIRST_WAIT;
        let checking = throttle.attempt("alice", None, later).unwrap();
        assert!(throttle.attempt("alice", None, later).is_err());
        drop(checking);
        throttle.attempt("alice", None, later).unwrap();
    }

    #[test]
    fn success_clears_the_user_and_leaves_the_peers_failures() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        for _ in 0..4 {
            fail(&throttle, "alice", t0);
        }
        throttle.attempt("alice", PEER, t0).unwrap().succeeded();
        let records = throttle.records.lock().unwrap();
        assert!(!records.contains_key(&Subject::User("alice".into())));
        assert_eq!(records[&Subject::peer(PEER.unwrap())].failures, 4);
    }

    #[test]
    fn an_abandoned_check_counts_as_nothing() {
        let throttle = LoginThrottle::default();
        for _ in 0..100 {
            drop(throttle.attempt("alice", PEER, Instant::now()).unwrap());
        }
        assert!(throttle.records.lock().unwrap().is_empty());
    }

    #[test]
    fn a_peer_spraying_many_names_is_throttled() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        for i in 0..FREE_PER_PEER {
            fail(&throttle, &format!("user{i}"), t0);
        }
        assert_eq!(
            throttle.attempt("someone", PEER, t0).err(),
            Some(FIRST_WAIT)
        );
        // A login without a known peer is still limited per user name.
        throttle.attempt("someone", None, t0).unwrap();
    }

    #[test]
    fn ipv6_hosts_of_one_network_share_a_record_and_mapped_ipv4_is_ipv4() {
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Subject::peer(a.into()), Subject::peer(b.into()));
        assert_ne!(Subject::peer(a.into()), Subject::peer(other.into()));
        let mapped: Ipv6Addr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            Subject::peer(mapped.into()),
            Subject::Peer("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn records_stay_bounded_and_quiet_ones_are_forgotten() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        for i in 0..MAX_RECORDS + 10 {
            throttle
                .attempt(&format!("u{i}"), None, t0)
                .unwrap()
                .failed(t0);
        }
        assert!(throttle.records.lock().unwrap().len() <= MAX_RECORDS);
        let later = t0 + FORGET_AFTER + Duration::from_secs(1);
        for i in 0..MAX_RECORDS {
            throttle
                .attempt(&format!("v{i}"), None, later)
                .unwrap()
                .failed(later);
        }
        let records = throttle.records.lock().unwrap();
        assert!(records.len() <= MAX_RECORDS);
        assert!(!records.contains_key(&Subject::User("u0".into())));
    }
}
