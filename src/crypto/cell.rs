//! Byte layouts of the two ciphertext kinds the engine moves around, and their field metadata.
//!
//! * A **cell** is one encrypted measure value as the engine sees it (Arrow `FixedSizeBinary`):
//!   `key_id u64 | params u8 | limbs u8 | limb_bits u8 | scale i8 | row u64 | seed u128 x limbs |
//!   body u64 x limbs`, little endian. `(seed, row)` names the mask: chunk `row / N` of the
//!   AES-CTR stream seeded by `seed`, extracted at slot `row % N`. A cell is therefore an LWE
//!   ciphertext in compressed form, decryptable on its own. On disk the engine keeps only the
//!   8-byte bodies per value; seeds and rows are shared per column chunk (see `table::storage`).
//! * A **sum** is what `he_sum` returns per group (Arrow `LargeBinary`): `"HSUM" | version u8 |
//!   params u8 | limbs u8 | limb_bits u8 | scale i8 | key_id u64 | count u64 | body u64 x limbs |
//!   mask u64 x (limbs * N)`: one uncompressed LWE ciphertext per limb plus the row count, so the
//!   client can check the budget again before it trusts a decryption.

use std::collections::HashMap;

use crate::crypto::encoding::MeasureSpec;
use crate::crypto::keys::{ClientKey, KeyId};
use crate::crypto::params::{PARAMS_ID, POLYNOMIAL_SIZE};
use crate::error::{HedfError, Result};

/// Field metadata key naming what a binary column holds: [`KIND_CELL`] or [`KIND_SUM`].
pub const META_KIND: &str = "hedf.kind";
pub const META_KEY_ID: &str = "hedf.key_id";
pub const META_PARAMS: &str = "hedf.params";
pub const META_SCALE: &str = "hedf.scale";
pub const META_LIMBS: &str = "hedf.limbs";
pub const META_LIMB_BITS: &str = "hedf.limb_bits";
pub const META_LAYOUT: &str = "hedf.layout";
/// The key holder's tag over the column's public parameters (see [`ColumnMarking`]).
pub const META_TAG: &str = "hedf.tag";
pub const KIND_CELL: &str = "cell";
pub const KIND_SUM: &str = "sum";
/// Version of the byte layouts described in this module.
pub const LAYOUT_VERSION: u8 = 1;

const CELL_HEADER_LEN: usize = 20;
/// Bytes of one limb's body (an LWE body, u64) and of one limb's seed (u128).
pub const BODY_BYTES: usize = 8;
pub const SEED_BYTES: usize = 16;
const SUM_MAGIC: &[u8; 4] = b"HSUM";
const SUM_HEADER_LEN: usize = 4 + 1 + 1 + 1 + 1 + 1 + 8 + 8;
/// Domain separation of the tagged message.
const TAG_DOMAIN: &[u8] = b"hedf column parameters v1";

/// Everything public about an encrypted column: whose key, which parameters, which encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnCrypto {
    pub key_id: KeyId,
    pub spec: MeasureSpec,
}

impl ColumnCrypto {
    pub fn cell_width(&self) -> usize {
        cell_width(self.spec.limbs)
    }

    /// Bytes of one value's bodies, all limbs, as storage keeps them.
    pub fn bodies_width(&self) -> usize {
        BODY_BYTES * self.spec.limbs as usize
    }

    /// Bytes of one value's seeds, all limbs, as storage keeps them.
    pub fn seeds_width(&self) -> usize {
        SEED_BYTES * self.spec.limbs as usize
    }

    pub fn sum_len(&self) -> usize {
        SUM_HEADER_LEN + self.spec.limbs as usize * (8 + 8 * POLYNOMIAL_SIZE)
    }

    /// The 12 header bytes every cell of this column starts with.
    pub(crate) fn header(&self) -> [u8; 12] {
        let mut h = [0u8; 12];
        h[..8].copy_from_slice(&self.key_id.0.to_le_bytes());
        h[8] = PARAMS_ID;
        h[9] = self.spec.limbs;
        h[10] = self.spec.limb_bits;
        h[11] = self.spec.scale as u8;
        h
    }

    /// What a column's tag vouches for: key id, parameter set, layout and encoding.
    fn tag_message(&self) -> Vec<u8> {
        [TAG_DOMAIN, &self.header(), &[LAYOUT_VERSION]].concat()
    }
}

/// What a hedf column holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// One encrypted value per row (Arrow `FixedSizeBinary`).
    Cell,
    /// One he_sum result per row (Arrow `LargeBinary`).
    Sum,
}

impl ColumnKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ColumnKind::Cell => KIND_CELL,
            ColumnKind::Sum => KIND_SUM,
        }
    }
}

/// How an encrypted column is marked in Arrow field metadata: its kind, its public crypto and
/// a tag by which the key's holder vouches for that crypto. The server cannot make or check a
/// tag (it has no key) but carries it from the uploaded column to every sum; the client
/// checks it before decrypting, so metadata altered after encryption (a scale edited in a
/// stored file, say) is an error instead of silently scaled sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnMarking {
    pub kind: ColumnKind,
    pub crypto: ColumnCrypto,
    pub tag: [u8; 16],
}

impl ColumnMarking {
    /// The marking `key` gives a column it encrypts with `crypto`.
    pub fn new(kind: ColumnKind, crypto: ColumnCrypto, key: &ClientKey) -> Self {
        ColumnMarking {
            kind,
            crypto,
            tag: key.tag(&crypto.tag_message()),
        }
    }

    /// The same column marked as another kind (he_sum turns cells into sums).
    pub fn with_kind(self, kind: ColumnKind) -> Self {
        ColumnMarking { kind, ..self }
    }

    /// Checks that `key` made this marking, i.e. that the parameters are the ones it
    /// encrypted with. Call after checking the key id.
    pub fn verify(&self, key: &ClientKey, column: &str) -> Result<()> {
        if key.tag(&self.crypto.tag_message()) == self.tag {
            Ok(())
        } else {
            Err(HedfError::Malformed(format!(
                "column {column:?}: its encryption parameters (scale {}, {} limb(s)) are not \
                 the ones the key encrypted it with: the column's metadata was altered after \
                 encryption",
                self.crypto.spec.scale, self.crypto.spec.limbs
            )))
        }
    }

    /// Field metadata for this marking.
    pub fn metadata(&self) -> HashMap<String, String> {
        let tag: String = self.tag.iter().map(|b| format!("{b:02x}")).collect();
        HashMap::from([
            (META_KIND.to_string(), self.kind.as_str().to_string()),
            (META_KEY_ID.to_string(), self.crypto.key_id.to_string()),
            (META_PARAMS.to_string(), PARAMS_ID.to_string()),
            (META_SCALE.to_string(), self.crypto.spec.scale.to_string()),
            (META_LIMBS.to_string(), self.crypto.spec.limbs.to_string()),
            (
                META_LIMB_BITS.to_string(),
                self.crypto.spec.limb_bits.to_string(),
            ),
            (META_LAYOUT.to_string(), LAYOUT_VERSION.to_string()),
            (META_TAG.to_string(), tag),
        ])
    }

    /// Reads field metadata; `Ok(None)` for a plaintext column, an error for a broken marking.
    /// Numbers must parse as their exact types: `hedf.limbs=257` is an error, not 1.
    pub fn from_metadata(meta: &HashMap<String, String>) -> Result<Option<Self>> {
        let Some(kind) = meta.get(META_KIND) else {
            return Ok(None);
        };
        let kind = match kind.as_str() {
            KIND_CELL => ColumnKind::Cell,
            KIND_SUM => ColumnKind::Sum,
            other => {
                return Err(HedfError::Malformed(format!(
                    "unknown {META_KIND} {other:?} in field metadata"
                )))
            }
        };
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| HedfError::Malformed(format!("field metadata lacks {k}")))
        };
        fn num<T: std::str::FromStr>(k: &str, v: &str) -> Result<T> {
            v.parse()
                .map_err(|_| HedfError::Malformed(format!("bad {k} {v:?} in field metadata")))
        }
        if num::<u8>(META_PARAMS, get(META_PARAMS)?)? != PARAMS_ID
            || num::<u8>(META_LAYOUT, get(META_LAYOUT)?)? != LAYOUT_VERSION
        {
            return Err(HedfError::Malformed(
                "column uses an unknown parameter set or layout version".into(),
            ));
        }
        let spec = MeasureSpec {
            scale: num(META_SCALE, get(META_SCALE)?)?,
            limbs: num(META_LIMBS, get(META_LIMBS)?)?,
            limb_bits: num(META_LIMB_BITS, get(META_LIMB_BITS)?)?,
        };
        spec.validate()?;
        let key_id = get(META_KEY_ID)?.parse()?;
        let tag = get(META_TAG)?;
        let tag = (tag.len() == 32)
            .then(|| {
                tag.as_bytes()
                    .chunks(2)
                    .map(|pair| {
                        std::str::from_utf8(pair)
                            .ok()
                            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    })
                    .collect::<Option<Vec<u8>>>()
            })
            .flatten()
            .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
            .ok_or_else(|| HedfError::Malformed(format!("bad {META_TAG} in field metadata")))?;
        Ok(Some(ColumnMarking {
            kind,
            crypto: ColumnCrypto { key_id, spec },
            tag,
        }))
    }
}

pub fn cell_width(limbs: u8) -> usize {
    CELL_HEADER_LEN + (SEED_BYTES + BODY_BYTES) * limbs as usize
}

/// Limb `limb`'s seed in a value's seeds (as [`CellRef::seed_bytes`] returns them).
pub fn seed_of(seeds: &[u8], limb: usize) -> u128 {
    u128::from_le_bytes(
        seeds[SEED_BYTES * limb..SEED_BYTES * (limb + 1)]
            .try_into()
            .expect("16 bytes"),
    )
}

/// Assembles a cell from its stored parts (`seeds`: 16 bytes a limb, `bodies`: 8 bytes a limb).
pub fn assemble_cell(out: &mut [u8], header: &[u8; 12], row: u64, seeds: &[u8], bodies: &[u8]) {
    out[..12].copy_from_slice(header);
    out[12..CELL_HEADER_LEN].copy_from_slice(&row.to_le_bytes());
    out[CELL_HEADER_LEN..CELL_HEADER_LEN + seeds.len()].copy_from_slice(seeds);
    out[CELL_HEADER_LEN + seeds.len()..].copy_from_slice(bodies);
}

/// Writes a cell into `out` (exactly `cell_width` bytes).
pub fn write_cell(out: &mut [u8], crypto: &ColumnCrypto, row: u64, seeds: &[u128], bodies: &[u64]) {
    out[..12].copy_from_slice(&crypto.header());
    out[12..CELL_HEADER_LEN].copy_from_slice(&row.to_le_bytes());
    let (seed_bytes, body_bytes) = out[CELL_HEADER_LEN..].split_at_mut(SEED_BYTES * seeds.len());
    for (out, seed) in seed_bytes.chunks_exact_mut(SEED_BYTES).zip(seeds) {
        out.copy_from_slice(&seed.to_le_bytes());
    }
    for (out, body) in body_bytes.chunks_exact_mut(BODY_BYTES).zip(bodies) {
        out.copy_from_slice(&body.to_le_bytes());
    }
}

/// A borrowed, validated view of one cell.
#[derive(Clone, Copy)]
pub struct CellRef<'a> {
    bytes: &'a [u8],
    limbs: usize,
}

impl<'a> CellRef<'a> {
    /// Checks the cell against the column it is supposed to belong to.
    pub fn parse(bytes: &'a [u8], expect: &ColumnCrypto) -> Result<Self> {
        if bytes.len() != expect.cell_width() {
            return Err(HedfError::Malformed(format!(
                "cell has {} bytes, expected {}",
                bytes.len(),
                expect.cell_width()
            )));
        }
        if bytes[..12] != expect.header() {
            let found = KeyId(u64::from_le_bytes(bytes[..8].try_into().unwrap()));
            if found != expect.key_id {
                return Err(HedfError::MixedKeys {
                    first: expect.key_id.to_string(),
                    second: found.to_string(),
                });
            }
            return Err(HedfError::Malformed(
                "cell header (parameters, limbs or scale) differs from its column's".into(),
            ));
        }
        Ok(CellRef {
            bytes,
            limbs: expect.spec.limbs as usize,
        })
    }

    pub fn row(&self) -> u64 {
        u64::from_le_bytes(self.bytes[12..CELL_HEADER_LEN].try_into().unwrap())
    }

    pub fn seed(&self, limb: usize) -> u128 {
        seed_of(self.seed_bytes(), limb)
    }

    /// The seeds of all limbs, as stored (16 bytes each).
    pub fn seed_bytes(&self) -> &'a [u8] {
        &self.bytes[CELL_HEADER_LEN..CELL_HEADER_LEN + SEED_BYTES * self.limbs]
    }

    /// The bodies of all limbs, as stored (8 bytes each).
    pub fn body_bytes(&self) -> &'a [u8] {
        &self.bytes[CELL_HEADER_LEN + SEED_BYTES * self.limbs..]
    }

    pub fn body(&self, limb: usize) -> u64 {
        let at = BODY_BYTES * limb;
        u64::from_le_bytes(self.body_bytes()[at..at + BODY_BYTES].try_into().unwrap())
    }
}

/// Serialises one group's sum. `masks` holds `limbs * N` coefficients, limb-major.
pub fn write_sum(
    crypto: &ColumnCrypto,
    count: u64,
    bodies: &[u64],
    masks: &[u64],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(SUM_MAGIC);
    out.push(LAYOUT_VERSION);
    out.extend_from_slice(&crypto.header()[8..12]);
    out.extend_from_slice(&crypto.key_id.0.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    for b in bodies {
        out.extend_from_slice(&b.to_le_bytes());
    }
    for m in masks {
        out.extend_from_slice(&m.to_le_bytes());
    }
}

/// A borrowed, validated view of one serialised sum.
pub struct SumRef<'a> {
    pub crypto: ColumnCrypto,
    pub count: u64,
    bytes: &'a [u8],
}

impl<'a> SumRef<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let bad = |why: &str| HedfError::Malformed(format!("he_sum result: {why}"));
        if bytes.len() < SUM_HEADER_LEN || &bytes[..4] != SUM_MAGIC {
            return Err(bad("not a hedf sum"));
        }
        if bytes[4] != LAYOUT_VERSION || bytes[5] != PARAMS_ID {
            return Err(bad("unknown layout version or parameter set"));
        }
        let spec = MeasureSpec {
            limbs: bytes[6],
            limb_bits: bytes[7],
            scale: bytes[8] as i8,
        };
        spec.validate()?;
        let key_id = KeyId(u64::from_le_bytes(bytes[9..17].try_into().unwrap()));
        let count = u64::from_le_bytes(bytes[17..25].try_into().unwrap());
        let crypto = ColumnCrypto { key_id, spec };
        if bytes.len() != crypto.sum_len() {
            return Err(bad(&format!(
                "{} bytes, expected {}",
                bytes.len(),
                crypto.sum_len()
            )));
        }
        Ok(SumRef {
            crypto,
            count,
            bytes,
        })
    }

    pub fn body(&self, limb: usize) -> u64 {
        let at = SUM_HEADER_LEN + 8 * limb;
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().unwrap())
    }

    /// The mask of `limb`, as N little-endian u64 coefficients.
    pub fn mask(&self, limb: usize) -> impl Iterator<Item = u64> + 'a {
        let start =
            SUM_HEADER_LEN + 8 * self.crypto.spec.limbs as usize + 8 * POLYNOMIAL_SIZE * limb;
        self.bytes[start..start + 8 * POLYNOMIAL_SIZE]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
    }
}
