//! Client key material: one master secret, the GLWE secret keys derived from it, and the
//! key's public id.
//!
//! Common-mask ciphertexts (see [`crate::crypto::slots`]) put many bodies on one mask, each
//! under its own independent secret key: the key of body slot `s` is a binary GLWE secret key
//! that tfhe's secret generator (`SecretRandomGenerator`, AES-CTR) draws from the seed
//! HMAC-SHA256(master, "hedf slot key v1" || s). HMAC-SHA256 is a PRF, so the slot keys are
//! independent uniform binary keys to anyone without the master secret, as the Matrix-LWE
//! argument of common-mask encryption requires; the file stores only the 32-byte master.
//!
//! Only the data owner's client holds a [`ClientKey`]. The server side of hedf (table provider,
//! he_sum) never takes one: it sees key ids, seeds and ciphertexts only.

use std::fmt;
use std::io::Write;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tfhe::core_crypto::commons::generators::SecretRandomGenerator;
use tfhe::core_crypto::commons::math::random::Seed;
use tfhe::core_crypto::prelude::*;
use tfhe::core_crypto::seeders::new_seeder;

use crate::crypto::params::{GLWE_DIMENSION, PARAMS_ID, POLYNOMIAL_SIZE};
use crate::error::{HedfError, Result};

/// Public identifier of a client key, carried by every ciphertext so keys are never mixed.
/// Random, so it says nothing about the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct KeyId(pub u64);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for KeyId {
    type Err = HedfError;
    /// Exactly the 16 lowercase or uppercase hex digits `Display` writes.
    fn from_str(s: &str) -> Result<Self> {
        let hex = s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
        hex.then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
            .map(KeyId)
            .ok_or_else(|| HedfError::Malformed(format!("bad key id {s:?}")))
    }
}

/// Bytes of the master secret.
const MASTER_LEN: usize = 32;

/// The secret that encrypts measures and decrypts sums.
pub struct ClientKey {
    id: KeyId,
    master: [u8; MASTER_LEN],
}

impl fmt::Debug for ClientKey {
    // Never print secret material, even in debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for ClientKey {
    fn drop(&mut self) {
        // Best effort: the master does not outlive the key in this struct.
        wipe(&mut self.master);
    }
}

/// Overwrites secret words with zeros, in a way the optimiser keeps. Best effort: copies
/// made by tfhe's generators, FFT scratch or the allocator are out of reach.
pub(crate) fn wipe<T: Default + Copy>(secret: &mut [T]) {
    secret.fill(T::default());
    std::hint::black_box(&*secret);
}

/// The binary GLWE secret key of one body slot (derived from the master, see
/// [`ClientKey::slot_key`]), wiped when dropped.
pub(crate) struct SlotKey(GlweSecretKeyOwned<u64>);

impl std::ops::Deref for SlotKey {
    type Target = GlweSecretKeyOwned<u64>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for SlotKey {
    fn drop(&mut self) {
        wipe(self.0.as_mut());
    }
}

const MAGIC: &[u8; 8] = b"HEDFKEY\0";
/// Version 3: a master secret for common-mask slot keys. Versions 1 and 2 (one GLWE key) are
/// refused with a message naming them.
const FORMAT_VERSION: u8 = 3;
const HEADER_LEN: usize = 8 + 1 + 1 + 8;
/// Trailing check value: the first bytes of SHA-256 over everything before it, so a damaged
/// file is refused instead of decrypting to garbage.
const CHECK_LEN: usize = 8;
/// Domain separation of the derived secrets.
const TAG_KEY_DOMAIN: &[u8] = b"hedf column-metadata tag key v1";
const SLOT_KEY_DOMAIN: &[u8] = b"hedf slot key v1";

/// Whether `bytes` hold a serialized client key (its magic anywhere in them), so code that
/// must never store keys (the server) can refuse them.
pub fn is_key_material(bytes: &[u8]) -> bool {
    memchr::memmem::find(bytes, MAGIC).is_some()
}

impl ClientKey {
    /// A fresh key: a 256-bit master secret and a 64-bit id, both from tfhe's seeder (rdseed or
    /// the OS entropy source).
    pub fn generate() -> Self {
        let mut seeder = new_seeder();
        let mut master = [0u8; MASTER_LEN];
        for half in master.chunks_exact_mut(16) {
            half.copy_from_slice(&seeder.seed().0.to_le_bytes());
        }
        let id = KeyId(seeder.seed().0 as u64);
        ClientKey { id, master }
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    fn prf(&self, domain: &[u8], message: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.master).expect("any key length");
        mac.update(domain);
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    /// The binary GLWE secret key of body slot `slot`, drawn by tfhe's secret generator from a
    /// seed only the master determines.
    pub(crate) fn slot_key(&self, slot: u16) -> SlotKey {
        let mut prf = self.prf(SLOT_KEY_DOMAIN, &slot.to_le_bytes());
        let seed = u128::from_le_bytes(prf[..16].try_into().expect("16 of 32 bytes"));
        wipe(&mut prf);
        let mut generator = SecretRandomGenerator::<DefaultRandomGenerator>::new(Seed(seed));
        SlotKey(allocate_and_generate_new_binary_glwe_secret_key(
            GlweDimension(GLWE_DIMENSION),
            PolynomialSize(POLYNOMIAL_SIZE),
            &mut generator,
        ))
    }

    /// A keyed tag (HMAC-SHA256, truncated to 128 bits) of public bytes, e.g. a column's
    /// encryption parameters: only the key's holder can make one, so the client can tell
    /// metadata it wrote from metadata altered on the way (see `cell::ColumnMarking`).
    pub fn tag(&self, message: &[u8]) -> [u8; 16] {
        self.prf(TAG_KEY_DOMAIN, message)[..16]
            .try_into()
            .expect("16 of 32 bytes")
    }

    /// Serialises the key: magic, version, parameter id, key id, master secret, check value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + MASTER_LEN + CHECK_LEN);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.push(PARAMS_ID);
        out.extend_from_slice(&self.id.0.to_le_bytes());
        out.extend_from_slice(&self.master);
        let check = check_value(&out);
        out.extend_from_slice(&check);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |why: &str| HedfError::KeyFile(why.to_string());
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(bad("not a hedf key file"));
        }
        if bytes[8] != FORMAT_VERSION {
            return Err(bad(&format!(
                "key format version {} is not supported (this hedf reads version \
                 {FORMAT_VERSION}); generate a new key with `hedf keygen` and re-encrypt",
                bytes[8]
            )));
        }
        if bytes[9] != PARAMS_ID {
            return Err(bad(&format!("unknown parameter set id {}", bytes[9])));
        }
        if bytes.len() != HEADER_LEN + MASTER_LEN + CHECK_LEN {
            return Err(bad("key length does not match the format"));
        }
        let (body, check) = bytes.split_at(bytes.len() - CHECK_LEN);
        if check != check_value(body) {
            return Err(bad(
                "the key file is damaged (its check value does not match); restore it from a backup",
            ));
        }
        let id = KeyId(u64::from_le_bytes(bytes[10..18].try_into().unwrap()));
        let master = body[HEADER_LEN..].try_into().expect("length checked");
        Ok(ClientKey { id, master })
    }

    /// Writes the key file with mode 0600; refuses to replace an existing file unless `force`.
    /// The file appears whole or not at all: written beside its place, then renamed.
    pub fn save(&self, path: &Path, force: bool) -> Result<()> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // tempfile creates the file with mode 0600.
        let mut file = tempfile::NamedTempFile::new_in(dir)?;
        file.write_all(&self.to_bytes())?;
        file.as_file().sync_all()?;
        let persisted = if force {
            file.persist(path)
        } else {
            file.persist_noclobber(path)
        };
        persisted.map_err(|e| match e.error.kind() {
            std::io::ErrorKind::AlreadyExists => HedfError::KeyFile(format!(
                "{} exists; pass --force to overwrite it",
                path.display()
            )),
            _ => HedfError::Io(e.error),
        })?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| HedfError::KeyFile(format!("cannot read {}: {e}", path.display())))?;
        Self::from_bytes(&bytes)
            .map_err(|e| HedfError::KeyFile(format!("{}: {}", path.display(), key_file_why(e))))
    }
}

fn key_file_why(e: HedfError) -> String {
    match e {
        HedfError::KeyFile(why) => why,
        other => other.to_string(),
    }
}

/// A warning if the key file at `path` can be read or written by other users (as ssh warns
/// of a private key with loose permissions); `None` when only its owner can.
pub fn permission_warning(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Some(format!(
                "{} has mode {mode:03o}: other users may read your secret key; run chmod 600 on it",
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    None
}

fn check_value(bytes: &[u8]) -> [u8; CHECK_LEN] {
    Sha256::digest(bytes)[..CHECK_LEN]
        .try_into()
        .expect("8 of 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips_and_rejects_garbage() {
        let key = ClientKey::generate();
        let bytes = key.to_bytes();
        assert_eq!(bytes.len(), HEADER_LEN + MASTER_LEN + CHECK_LEN);
        let back = ClientKey::from_bytes(&bytes).unwrap();
        assert_eq!(back.id(), key.id());
        assert_eq!(back.slot_key(3).as_ref(), key.slot_key(3).as_ref());
        assert!(ClientKey::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut wrong = bytes.clone();
        wrong[9] = 99;
        assert!(ClientKey::from_bytes(&wrong)
            .unwrap_err()
            .to_string()
            .contains("parameter set"));
        assert!(!format!("{key:?}").contains("secret"));
    }

    /// A flipped bit anywhere in the secret part is caught by the check value, not silently
    /// loaded as another key; the previous format is refused with its version named.
    #[test]
    fn damaged_and_old_key_files_are_refused() {
        let bytes = ClientKey::generate().to_bytes();
        for at in [HEADER_LEN, HEADER_LEN + 20, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            let e = ClientKey::from_bytes(&damaged).unwrap_err().to_string();
            assert!(e.contains("damaged"), "byte {at}: {e}");
        }
        for version in [1, 2] {
            let mut old = bytes.clone();
            old[8] = version;
            let e = ClientKey::from_bytes(&old).unwrap_err().to_string();
            assert!(e.contains(&format!("key format version {version}")), "{e}");
        }
    }

    /// Slot keys are binary, reproducible from the file, distinct per slot and per key, and
    /// about half ones (a uniform binary key).
    #[test]
    fn slot_keys_are_distinct_reproducible_binary_keys() {
        let (a, b) = (ClientKey::generate(), ClientKey::generate());
        let keys: Vec<Vec<u64>> = (0..4).map(|s| a.slot_key(s).as_ref().to_vec()).collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(k.iter().all(|&bit| bit <= 1));
            let ones = k.iter().sum::<u64>() as usize;
            assert!((1800..2300).contains(&ones), "slot {i}: {ones} ones");
            for other in &keys[i + 1..] {
                assert_ne!(k, other);
            }
        }
        assert_ne!(keys[0], b.slot_key(0).as_ref());
        let again = ClientKey::from_bytes(&a.to_bytes()).unwrap();
        assert_eq!(again.slot_key(2).as_ref(), &keys[2][..]);
    }

    /// Known answer: a key file holds only the master secret, so a change in tfhe's secret
    /// generator would silently turn every saved key into another one. This fails first.
    #[test]
    fn slot_keys_derive_as_saved_keys_expect() {
        let key = ClientKey {
            id: KeyId(1),
            master: std::array::from_fn(|i| i as u8),
        };
        let mut hash = Sha256::new();
        for slot in [0, 1, 1023] {
            for bit in key.slot_key(slot).as_ref() {
                hash.update([*bit as u8]);
            }
        }
        hash.update(key.tag(b"x"));
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "55da1602ed5e2de2726e78f0eb8973a1d949e903b1306ab4c94e5f3a065c8a67"
        );
    }

    /// What a slot key's drop runs leaves only zeros.
    #[test]
    fn wiping_a_slot_key_leaves_zeros() {
        let mut key = ClientKey::generate().slot_key(1);
        assert!(key.as_ref().contains(&1));
        wipe(key.0.as_mut());
        assert!(key.as_ref().iter().all(|&b| b == 0));
    }

    #[test]
    fn tags_depend_on_the_key_and_the_message() {
        let (a, b) = (ClientKey::generate(), ClientKey::generate());
        assert_eq!(a.tag(b"x"), a.tag(b"x"));
        assert_ne!(a.tag(b"x"), a.tag(b"y"));
        assert_ne!(a.tag(b"x"), b.tag(b"x"));
        let again = ClientKey::from_bytes(&a.to_bytes()).unwrap();
        assert_eq!(again.tag(b"x"), a.tag(b"x"));
    }

    #[test]
    fn save_refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.key");
        let key = ClientKey::generate();
        key.save(&path, false).unwrap();
        assert!(ClientKey::generate()
            .save(&path, false)
            .unwrap_err()
            .to_string()
            .contains("--force"));
        assert_eq!(
            ClientKey::load(&path).unwrap().id(),
            key.id(),
            "refused save changed it"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "a refused save left a temporary file");
        #[cfg(unix)]
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        ClientKey::generate().save(&path, true).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert_eq!(permission_warning(&path), None);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(permission_warning(&path).unwrap().contains("mode 644"));
        }
    }
}
