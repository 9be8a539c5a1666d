//! Who may call the Flight SQL endpoint: users with Argon2id password hashes, and the bearer
//! tokens the handshake hands out.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::error::{HedfError, Result};

/// How long a token stays valid; clients handshake again after.
const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// Users and their password hashes (PHC strings, Argon2id with the crate's default cost).
#[derive(Default)]
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
            users.hashes.insert(name.to_string(), hash.to_string());
        }
        Ok(users)
    }

    /// Adds a user given a plaintext password (hashed at once; the password is not kept).
    /// An empty password is refused.
    pub fn add(&mut self, name: &str, password: &str) -> Result<()> {
        if name.is_empty() {
            return Err(HedfError::Invalid("a user needs a name".into()));
        }
        self.hashes
            .insert(name.to_string(), hash_password(password)?);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
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

/// Bearer tokens issued by the handshake: 256 random bits each, mapped to their user.
#[derive(Default)]
pub struct Tokens {
    live: Mutex<HashMap<String, (String, Instant)>>,
}

impl Tokens {
    pub fn issue(&self, user: &str) -> Result<String> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(HedfError::internal)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut live = self.live.lock().expect("token lock");
        let now = Instant::now();
        live.retain(|_, (_, expiry)| *expiry > now);
        live.insert(token.clone(), (user.to_string(), now + TOKEN_TTL));
        Ok(token)
    }

    /// The user a live token belongs to.
    pub fn user(&self, token: &str) -> Option<String> {
        let live = self.live.lock().expect("token lock");
        live.get(token)
            .filter(|(_, expiry)| *expiry > Instant::now())
            .map(|(user, _)| user.clone())
    }
}
