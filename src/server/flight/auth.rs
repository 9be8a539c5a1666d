//! Who may call the Flight SQL endpoint: users with Argon2id password hashes, and the bearer
//! tokens the handshake hands out.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::error::{HedfError, Result};

/// How long a token stays valid; clients handshake again after.
const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// Users and their password hashes (PHC strings, Argon2id with the crate's default cost).
#[derive(Default, Clone)]
pub struct Users {
    hashes: HashMap<String, String>,
}

impl Users {
    /// Reads a users file: one `name:$argon2id$...` line per user (see `hedf hash-password`);
    /// blank lines and `#` comments are skipped.
    pub fn load(path: &Path) -> Result<Self> {
        let mut users = Users::default();
        let text = std::fs::read_to_string(path)?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || {
                HedfError::Invalid(format!(
                    "{}:{}: expected name:$argon2id$...",
                    path.display(),
                    i + 1
                ))
            };
            let (name, hash) = line.split_once(':').ok_or_else(bad)?;
            PasswordHash::new(hash).map_err(|_| bad())?;
            check_name(name).map_err(|_| bad())?;
            users.hashes.insert(name.to_string(), hash.to_string());
        }
        Ok(users)
    }

    /// Adds a user given a plaintext password (hashed at once; the password is not kept).
    /// An empty password is refused.
    pub fn add(&mut self, name: &str, password: &str) -> Result<()> {
        check_name(name)?;
        self.hashes
            .insert(name.to_string(), hash_password(password)?);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    fn hash(&self, name: &str) -> Option<&str> {
        self.hashes.get(name).map(String::as_str)
    }

    /// Adds `other`'s users, replacing any of the same name.
    pub fn merge(&mut self, other: &Users) {
        self.hashes.extend(other.hashes.clone());
    }

    /// Checks a password. An unknown user costs as much as a wrong password, so timing does not
    /// tell which names exist.
    pub fn verify(&self, name: &str, password: &str) -> bool {
        if password.is_empty() {
            return false;
        }
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let (hash, known) = match self.hashes.get(name) {
            Some(h) => (h.as_str(), true),
            None => (
                DUMMY
                    .get_or_init(|| hash_password("hedf-dummy").unwrap_or_default())
                    .as_str(),
                false,
            ),
        };
        let ok = PasswordHash::new(hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false);
        ok && known
    }
}

/// User names are 1 to 256 bytes; the server refuses longer ones before looking them up.
pub const MAX_USER_NAME_BYTES: usize = 256;

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_USER_NAME_BYTES {
        return Err(HedfError::Invalid(format!(
            "a user name is 1 to {MAX_USER_NAME_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The users a server accepts now: replaced whole when the operator reloads the users file,
/// and a removed user's tokens stop working with it.
pub struct Directory {
    current: RwLock<Arc<Users>>,
}

impl Directory {
    pub fn new(users: Users) -> Directory {
        Directory {
            current: RwLock::new(Arc::new(users)),
        }
    }

    pub fn current(&self) -> Arc<Users> {
        self.current.read().expect("users lock").clone()
    }

    pub fn replace(&self, users: Users) {
        *self.current.write().expect("users lock") = Arc::new(users);
    }
}

/// An Argon2id PHC string for `password` with a fresh random salt. An empty password is
/// refused: it would let anyone who knows the user name in.
pub fn hash_password(password: &str) -> Result<String> {
    if password.is_empty() {
        return Err(HedfError::Invalid(
            "empty password: choose a password".into(),
        ));
    }
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(HedfError::internal)?;
    let salt = SaltString::encode_b64(&salt).map_err(HedfError::internal)?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(HedfError::internal)
}

/// Bearer tokens issued by the handshake: 256 random bits each, mapped to their user and the
/// password hash they logged in with, so a removed user or a changed password ends them.
#[derive(Default)]
pub struct Tokens {
    live: Mutex<HashMap<String, Login>>,
}

struct Login {
    user: String,
    hash: String,
    expiry: Instant,
}

impl Tokens {
    /// A token for `user`, who has just logged in as one of `users`.
    pub fn issue(&self, user: &str, users: &Users) -> Result<String> {
        let hash = users
            .hash(user)
            .ok_or_else(|| HedfError::internal("a token for an unknown user"))?
            .to_string();
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(HedfError::internal)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut live = self.live.lock().expect("token lock");
        let now = Instant::now();
        live.retain(|_, login| login.expiry > now);
        live.insert(
            token.clone(),
            Login {
                user: user.to_string(),
                hash,
                expiry: now + TOKEN_TTL,
            },
        );
        Ok(token)
    }

    /// The user a live token belongs to, if that user still has the password of the login.
    pub fn user(&self, token: &str, users: &Users) -> Option<String> {
        let live = self.live.lock().expect("token lock");
        live.get(token)
            .filter(|login| login.expiry > Instant::now())
            .filter(|login| users.hash(&login.user) == Some(login.hash.as_str()))
            .map(|login| login.user.clone())
    }
}
