//! Byte layouts of the two ciphertext kinds the engine moves around, and their field metadata.
//!
//! Every column's bytes start with the same 15-byte header: `key_id u64 | params u8 | limbs u8 |
//! limb_bits u8 | scale i8 | log2_delta u8 | slot u16`, little endian. Limb `l` of the column
//! is encrypted under the secret key of body slot `slot + l` (see [`crate::crypto::slots`]).
//!
//! * A **cell** is one encrypted measure value as the engine sees it (Arrow `FixedSizeBinary`):
//!   `header | row u64 | seed u128 | body u64 x limbs`. `(seed, row)` names the mask: chunk
//!   `row / N` of the AES-CTR stream seeded by `seed`, extracted at position `row % N`. Every
//!   column and limb of a row shares that mask (common mask); each body is an LWE ciphertext
//!   under its slot's key, decryptable on its own. On disk the engine keeps only the 8-byte
//!   bodies per value; seeds and rows are kept once per table row (see `table::storage`).
//! * A **weighted cell** is a cell times a public integer `w`, as `SUM(x * w)` sums it with `w`
//!   a plaintext column or constant (see [`crate::udaf::weight`]): `cell | w i64`. It lives
//!   only between the weighting and he_sum (never stored, never sent): he_sum adds `w` times
//!   the cell's bodies and mask, which needs no key.
//! * A **sum** is what `he_sum` returns per group (Arrow `LargeBinary`): `"HSUM" | version u8 |
//!   header | count u64 | body u64 x limbs | mask sum` (coefficients, listed rows or both: see
//!   [`crate::crypto::mask_sum`]): the limbs' bodies on one mask sum,
//!   plus the rows it holds, so the client can check the budget again before it trusts a
//!   decryption. A value weighted by `w` counts as
//!   [`weighted_rows`](crate::crypto::params::weighted_rows)`(w)` rows (see there).
//! * A **mask-sharing sum** is a sum sent beside another sum of the same row whose mask sum is
//!   the same bytes (two measures summed over the same rows share their rows' common masks):
//!   `"HSRF" | version u8 | header | count u64 | body u64 x limbs | carrier u16 | check`, where
//!   `carrier` is the index, in the same batch, of the column whose sum in the same row
//!   carries the mask and `check` is that mask sum's [check](MaskSumRef::check), so an answer whose columns
//!   were reordered is refused rather than decrypted with another sum's mask. See
//!   [`crate::crypto::answer`].
//! * A **bundle** is the engine's internal state of several fused he_sums (never stored, never
//!   sent): `"HBUN" | version u8 | parts u8 | per part (header | count u64 | own u8 | body u64 x
//!   limbs) | shared mask sum | own mask sum per part whose `own` is 1`. Part `p`'s
//!   mask sum is the shared one plus its own: rows where every part had a value on one mask
//!   are added once to the shared sum, the others to each present part's own sum.

use std::collections::HashMap;

use crate::crypto::encoding::MeasureSpec;
use crate::crypto::keys::{ClientKey, KeyId};
use crate::crypto::mask_sum::{write_mask_sum, ListedRow, MaskSumRef, CHECK_BYTES};
use crate::crypto::params::PARAMS_ID;
use crate::crypto::slots::MAX_SLOTS;
use crate::error::{HedfError, Result};

/// Field metadata key naming what a binary column holds: [`KIND_CELL`] or [`KIND_SUM`].
pub const META_KIND: &str = "hedf.kind";
pub const META_KEY_ID: &str = "hedf.key_id";
pub const META_PARAMS: &str = "hedf.params";
pub const META_SCALE: &str = "hedf.scale";
pub const META_LIMBS: &str = "hedf.limbs";
pub const META_LIMB_BITS: &str = "hedf.limb_bits";
pub const META_LOG2_DELTA: &str = "hedf.log2_delta";
pub const META_SLOT: &str = "hedf.slot";
/// Decimal places of the weights a weighted cell, or a sum of them, was multiplied by: the
/// decrypted sum's scale is the column's plus this. Set by the server as it plans the
/// weighting, so not covered by the tag.
pub const META_WEIGHT_SCALE: &str = "hedf.weight_scale";
pub const META_LAYOUT: &str = "hedf.layout";
/// The key holder's tag over the column's public parameters (see [`ColumnMarking`]).
pub const META_TAG: &str = "hedf.tag";
pub const KIND_CELL: &str = "cell";
pub const KIND_SUM: &str = "sum";
pub const KIND_WEIGHTED: &str = "weighted";
/// Version of the byte layouts described in this module. Version 2: common masks.
pub const LAYOUT_VERSION: u8 = 2;
/// Version of sums, mask-sharing sums and bundles (answers and states, never stored).
/// Version 3: mask sums may list rows.
pub const SUM_VERSION: u8 = 3;

/// Bytes of the header every cell and sum carries.
pub const HEADER_LEN: usize = 15;
const CELL_ROW_AT: usize = HEADER_LEN;
const CELL_SEED_AT: usize = CELL_ROW_AT + 8;
const CELL_BODIES_AT: usize = CELL_SEED_AT + SEED_BYTES;
/// Bytes of one limb's body (an LWE body, u64) and of a row's mask seed (u128).
pub const BODY_BYTES: usize = 8;
pub const SEED_BYTES: usize = 16;
const WEIGHT_BYTES: usize = 8;
const SUM_MAGIC: &[u8; 4] = b"HSUM";
const SUM_REF_MAGIC: &[u8; 4] = b"HSRF";
const BUNDLE_MAGIC: &[u8; 4] = b"HBUN";
/// Most sums one bundle holds (its part count is one byte).
pub const MAX_BUNDLE_PARTS: usize = 255;
const SUM_HEADER_LEN: usize = 4 + 1 + HEADER_LEN + 8;
/// Where a sum keeps its row count (the budget both server and client check).
pub const SUM_COUNT_AT: std::ops::Range<usize> = SUM_HEADER_LEN - 8..SUM_HEADER_LEN;
/// Domain separation of the tagged message.
const TAG_DOMAIN: &[u8] = b"hedf column parameters v2";

/// Everything public about an encrypted column: whose key, which parameters, which encoding,
/// which body slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnCrypto {
    pub key_id: KeyId,
    pub spec: MeasureSpec,
    /// Limb `l` is the body of slot `slot + l` on its row's mask.
    pub slot: u16,
}

impl ColumnCrypto {
    pub fn cell_width(&self) -> usize {
        cell_width(self.spec.limbs)
    }

    pub fn weighted_cell_width(&self) -> usize {
        self.cell_width() + WEIGHT_BYTES
    }

    /// Bytes of one value's bodies, all limbs, as storage keeps them.
    pub fn bodies_width(&self) -> usize {
        BODY_BYTES * self.spec.limbs as usize
    }

    /// The header bytes every cell and sum of this column carries.
    pub(crate) fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&self.key_id.0.to_le_bytes());
        h[8] = PARAMS_ID;
        h[9] = self.spec.limbs;
        h[10] = self.spec.limb_bits;
        h[11] = self.spec.scale as u8;
        h[12] = self.spec.log2_delta;
        h[13..].copy_from_slice(&self.slot.to_le_bytes());
        h
    }

    /// Reads and validates a header.
    fn from_header(h: &[u8]) -> Result<Self> {
        if h[8] != PARAMS_ID {
            return Err(HedfError::Malformed(format!(
                "unknown parameter set {} (this hedf uses {PARAMS_ID})",
                h[8]
            )));
        }
        let spec = MeasureSpec {
            limbs: h[9],
            limb_bits: h[10],
            scale: h[11] as i8,
            log2_delta: h[12],
        };
        let crypto = ColumnCrypto {
            key_id: KeyId(u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))),
            spec,
            slot: u16::from_le_bytes([h[13], h[14]]),
        };
        crypto.validate()?;
        Ok(crypto)
    }

    /// Checks crypto read from untrusted bytes or metadata: a valid encoding on slots that
    /// exist.
    pub fn validate(&self) -> Result<()> {
        self.spec.validate()?;
        if self.slot as usize + self.spec.limbs as usize > MAX_SLOTS {
            return Err(HedfError::Malformed(format!(
                "body slots {}.. are beyond the last slot {}",
                self.slot,
                MAX_SLOTS - 1
            )));
        }
        Ok(())
    }

    /// The slots `(first, count)` this column's limbs use.
    pub fn slots(&self) -> (u16, u8) {
        (self.slot, self.spec.limbs)
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
    /// One weighted cell per row (Arrow `FixedSizeBinary`), only ever summed.
    Weighted,
}

impl ColumnKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ColumnKind::Cell => KIND_CELL,
            ColumnKind::Sum => KIND_SUM,
            ColumnKind::Weighted => KIND_WEIGHTED,
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
    /// Decimal places of the weights the values were multiplied by (0 when unweighted); see
    /// [`META_WEIGHT_SCALE`].
    pub weight_scale: u8,
}

impl ColumnMarking {
    /// The marking `key` gives a column it encrypts with `crypto`.
    pub fn new(kind: ColumnKind, crypto: ColumnCrypto, key: &ClientKey) -> Self {
        ColumnMarking {
            kind,
            crypto,
            tag: key.tag(&crypto.tag_message()),
            weight_scale: 0,
        }
    }

    /// Decimal places of a decrypted value of this column: the column's plus its weights'.
    pub fn value_scale(&self) -> i8 {
        self.crypto.spec.scale + self.weight_scale as i8
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
        let mut meta = HashMap::from([
            (META_KIND.to_string(), self.kind.as_str().to_string()),
            (META_KEY_ID.to_string(), self.crypto.key_id.to_string()),
            (META_PARAMS.to_string(), PARAMS_ID.to_string()),
            (META_SCALE.to_string(), self.crypto.spec.scale.to_string()),
            (META_LIMBS.to_string(), self.crypto.spec.limbs.to_string()),
            (
                META_LIMB_BITS.to_string(),
                self.crypto.spec.limb_bits.to_string(),
            ),
            (
                META_LOG2_DELTA.to_string(),
                self.crypto.spec.log2_delta.to_string(),
            ),
            (META_SLOT.to_string(), self.crypto.slot.to_string()),
            (META_LAYOUT.to_string(), LAYOUT_VERSION.to_string()),
            (META_TAG.to_string(), tag),
        ]);
        if self.weight_scale != 0 {
            meta.insert(META_WEIGHT_SCALE.into(), self.weight_scale.to_string());
        }
        meta
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
            KIND_WEIGHTED => ColumnKind::Weighted,
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
            return Err(HedfError::Malformed(format!(
                "column uses an unknown parameter set or layout version (this hedf reads \
                 layout {LAYOUT_VERSION}, common masks); re-encrypt the table with this hedf"
            )));
        }
        let spec = MeasureSpec {
            scale: num(META_SCALE, get(META_SCALE)?)?,
            limbs: num(META_LIMBS, get(META_LIMBS)?)?,
            limb_bits: num(META_LIMB_BITS, get(META_LIMB_BITS)?)?,
            log2_delta: num(META_LOG2_DELTA, get(META_LOG2_DELTA)?)?,
        };
        let key_id = get(META_KEY_ID)?.parse()?;
        let crypto = ColumnCrypto {
            key_id,
            spec,
            slot: num(META_SLOT, get(META_SLOT)?)?,
        };
        crypto.validate()?;
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
        let weight_scale = match meta.get(META_WEIGHT_SCALE) {
            // Untagged, so never taken from a stored or uploaded column: only the server's
            // weighting and the sums of it carry one.
            Some(_) if kind == ColumnKind::Cell => {
                return Err(HedfError::Malformed(format!(
                    "{META_WEIGHT_SCALE} on a column of cells: cells are never weighted"
                )))
            }
            Some(v) => num(META_WEIGHT_SCALE, v)?,
            None => 0,
        };
        if weight_scale > MAX_WEIGHT_SCALE {
            return Err(HedfError::Malformed(format!(
                "{META_WEIGHT_SCALE} {weight_scale} exceeds {MAX_WEIGHT_SCALE}"
            )));
        }
        Ok(Some(ColumnMarking {
            kind,
            crypto,
            tag,
            weight_scale,
        }))
    }
}

/// Most decimal places a weight may have: a column's scale (at most 18) plus this stays within
/// Decimal128's 38.
pub const MAX_WEIGHT_SCALE: u8 = 18;

pub fn cell_width(limbs: u8) -> usize {
    CELL_BODIES_AT + BODY_BYTES * limbs as usize
}

/// Assembles a cell from its stored parts (`seed`: 16 bytes, `bodies`: 8 bytes a limb).
pub fn assemble_cell(
    out: &mut [u8],
    header: &[u8; HEADER_LEN],
    row: u64,
    seed: &[u8],
    bodies: &[u8],
) {
    out[..HEADER_LEN].copy_from_slice(header);
    out[CELL_ROW_AT..CELL_SEED_AT].copy_from_slice(&row.to_le_bytes());
    out[CELL_SEED_AT..CELL_BODIES_AT].copy_from_slice(seed);
    out[CELL_BODIES_AT..].copy_from_slice(bodies);
}

/// Writes a cell into `out` (exactly `cell_width` bytes).
pub fn write_cell(out: &mut [u8], crypto: &ColumnCrypto, row: u64, seed: u128, bodies: &[u64]) {
    out[..HEADER_LEN].copy_from_slice(&crypto.header());
    out[CELL_ROW_AT..CELL_SEED_AT].copy_from_slice(&row.to_le_bytes());
    out[CELL_SEED_AT..CELL_BODIES_AT].copy_from_slice(&seed.to_le_bytes());
    for (out, body) in out[CELL_BODIES_AT..]
        .chunks_exact_mut(BODY_BYTES)
        .zip(bodies)
    {
        out.copy_from_slice(&body.to_le_bytes());
    }
}

/// Writes a weighted cell: `cell` (already checked) times `weight`.
pub fn write_weighted_cell(out: &mut [u8], cell: &[u8], weight: i64) {
    let (head, tail) = out.split_at_mut(cell.len());
    head.copy_from_slice(cell);
    tail.copy_from_slice(&weight.to_le_bytes());
}

/// A weighted cell's cell and weight, the cell checked against its column.
pub fn parse_weighted_cell<'a>(
    bytes: &'a [u8],
    expect: &ColumnCrypto,
) -> Result<(CellRef<'a>, i64)> {
    if bytes.len() != expect.weighted_cell_width() {
        return Err(HedfError::Malformed(format!(
            "weighted cell has {} bytes, expected {}",
            bytes.len(),
            expect.weighted_cell_width()
        )));
    }
    let (cell, weight) = bytes.split_at(expect.cell_width());
    Ok((
        CellRef::parse(cell, expect)?,
        i64::from_le_bytes(weight.try_into().expect("8 bytes")),
    ))
}

/// A borrowed, validated view of one cell.
#[derive(Clone, Copy)]
pub struct CellRef<'a> {
    bytes: &'a [u8],
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
        if bytes[..HEADER_LEN] != expect.header() {
            let found = KeyId(u64::from_le_bytes(bytes[..8].try_into().unwrap()));
            if found != expect.key_id {
                return Err(HedfError::MixedKeys {
                    first: expect.key_id.to_string(),
                    second: found.to_string(),
                });
            }
            return Err(HedfError::Malformed(
                "cell header (parameters, limbs, scale or slots) differs from its column's".into(),
            ));
        }
        Ok(CellRef { bytes })
    }

    /// The whole cell, as stored.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn row(&self) -> u64 {
        u64::from_le_bytes(self.bytes[CELL_ROW_AT..CELL_SEED_AT].try_into().unwrap())
    }

    pub fn seed(&self) -> u128 {
        u128::from_le_bytes(self.seed_bytes().try_into().unwrap())
    }

    /// The mask seed, as stored (16 bytes).
    pub fn seed_bytes(&self) -> &'a [u8] {
        &self.bytes[CELL_SEED_AT..CELL_BODIES_AT]
    }

    /// The bodies of all limbs, as stored (8 bytes each).
    pub fn body_bytes(&self) -> &'a [u8] {
        &self.bytes[CELL_BODIES_AT..]
    }

    pub fn body(&self, limb: usize) -> u64 {
        let at = BODY_BYTES * limb;
        u64::from_le_bytes(self.body_bytes()[at..at + BODY_BYTES].try_into().unwrap())
    }
}

/// Serialises one group's sum: the limbs' body sums on one mask sum (`coefficients` and
/// `rows`, see [`crate::crypto::mask_sum`]).
pub fn write_sum(
    crypto: &ColumnCrypto,
    count: u64,
    bodies: &[u64],
    coefficients: Option<&[u64]>,
    rows: &mut [ListedRow],
    out: &mut Vec<u8>,
) -> Result<()> {
    write_sum_prefix(SUM_MAGIC, crypto, count, bodies, out);
    write_mask_sum(coefficients, rows, out)
}

/// Serialises one group's sum on a serialised mask sum.
pub fn write_sum_on(
    crypto: &ColumnCrypto,
    count: u64,
    bodies: &[u64],
    mask: &[u8],
    out: &mut Vec<u8>,
) {
    write_sum_prefix(SUM_MAGIC, crypto, count, bodies, out);
    out.extend_from_slice(mask);
}

fn write_sum_prefix(
    magic: &[u8; 4],
    crypto: &ColumnCrypto,
    count: u64,
    bodies: &[u64],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(magic);
    out.push(SUM_VERSION);
    out.extend_from_slice(&crypto.header());
    out.extend_from_slice(&count.to_le_bytes());
    write_words(bodies, out);
}

fn write_words(words: &[u64], out: &mut Vec<u8>) {
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

fn read_word(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Little-endian u64 coefficients of a mask sum's bytes.
pub fn mask_words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
}

/// Rewrites the full sum `sum` as a mask-sharing sum whose mask is carried by the sum in
/// column `carrier` of the same row.
/// `check` is the carrier's mask sum's [check](MaskSumRef::check), computed once per carrier.
pub fn write_mask_sharing_sum(
    sum: &SumRef<'_>,
    carrier: u16,
    check: &[u8; CHECK_BYTES],
    out: &mut Vec<u8>,
) {
    let bodies: Vec<u64> = (0..sum.crypto.spec.limbs as usize)
        .map(|l| sum.body(l))
        .collect();
    write_sum_prefix(SUM_REF_MAGIC, &sum.crypto, sum.count, &bodies, out);
    out.extend_from_slice(&carrier.to_le_bytes());
    out.extend_from_slice(check);
}

/// Where a sum's mask sum is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SumMask<'a> {
    /// In the sum itself.
    Inline(MaskSumRef<'a>),
    /// In the sum of the same row in this column of the batch, whose mask sum has this
    /// [check](MaskSumRef::check).
    InColumn(u16, &'a [u8]),
}

/// A borrowed, validated view of one serialised sum.
pub struct SumRef<'a> {
    pub crypto: ColumnCrypto,
    pub count: u64,
    pub mask: SumMask<'a>,
    bytes: &'a [u8],
}

impl<'a> SumRef<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let bad = |why: &str| HedfError::Malformed(format!("he_sum result: {why}"));
        if bytes.len() < SUM_HEADER_LEN
            || (&bytes[..4] != SUM_MAGIC && &bytes[..4] != SUM_REF_MAGIC)
        {
            return Err(bad("not a hedf sum"));
        }
        if bytes[4] != SUM_VERSION {
            return Err(bad(&format!(
                "sum version {}, this hedf reads version {SUM_VERSION}",
                bytes[4]
            )));
        }
        let crypto = ColumnCrypto::from_header(&bytes[5..5 + HEADER_LEN])?;
        let count = u64::from_le_bytes(bytes[SUM_COUNT_AT].try_into().unwrap());
        let mask_at = SUM_HEADER_LEN + crypto.bodies_width();
        if bytes.len() <= mask_at {
            return Err(bad("truncated"));
        }
        let mask = if &bytes[..4] == SUM_MAGIC {
            SumMask::Inline(MaskSumRef::parse(&bytes[mask_at..])?)
        } else {
            let expected = mask_at + 2 + CHECK_BYTES;
            if bytes.len() != expected {
                return Err(bad(&format!("{} bytes, expected {expected}", bytes.len())));
            }
            SumMask::InColumn(
                u16::from_le_bytes([bytes[mask_at], bytes[mask_at + 1]]),
                &bytes[mask_at + 2..],
            )
        };
        Ok(SumRef {
            crypto,
            count,
            mask,
            bytes,
        })
    }

    pub fn body(&self, limb: usize) -> u64 {
        read_word(self.bytes, SUM_HEADER_LEN + BODY_BYTES * limb)
    }

    /// The mask sum all limbs share, when the sum carries it.
    pub fn inline_mask(&self) -> Result<MaskSumRef<'a>> {
        match self.mask {
            SumMask::Inline(bytes) => Ok(bytes),
            SumMask::InColumn(c, _) => Err(HedfError::Malformed(format!(
                "he_sum result: its mask is carried by column {c} of the answer it came in; \
                 only a full sum can be summed again"
            ))),
        }
    }
}

/// One fused he_sum's part of a bundle, as [`write_bundle`] takes it.
pub struct BundlePart<'a> {
    pub crypto: &'a ColumnCrypto,
    pub count: u64,
    pub bodies: &'a [u64],
    /// This part's own serialised mask sum (rows not in the shared one), if it has any.
    pub own: Option<&'a [u8]>,
}

/// Serialises one group's state of fused he_sums (see the module comment) on the serialised
/// mask sum `shared`.
pub fn write_bundle(parts: &[BundlePart<'_>], shared: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(BUNDLE_MAGIC);
    out.push(SUM_VERSION);
    // The fusion rule never builds more than MAX_BUNDLE_PARTS parts.
    out.push(u8::try_from(parts.len()).expect("at most MAX_BUNDLE_PARTS parts"));
    for p in parts {
        out.extend_from_slice(&p.crypto.header());
        out.extend_from_slice(&p.count.to_le_bytes());
        out.push(p.own.is_some() as u8);
        write_words(p.bodies, out);
    }
    out.extend_from_slice(shared);
    for own in parts.iter().filter_map(|p| p.own) {
        out.extend_from_slice(own);
    }
}

/// A validated view of one part of a serialised bundle.
pub struct BundlePartRef<'a> {
    pub crypto: ColumnCrypto,
    pub count: u64,
    bodies: &'a [u8],
    /// The part's own mask sum, when it has one.
    pub own: Option<MaskSumRef<'a>>,
}

impl BundlePartRef<'_> {
    pub fn body(&self, limb: usize) -> u64 {
        read_word(self.bodies, BODY_BYTES * limb)
    }
}

/// A borrowed, validated view of one serialised bundle.
pub struct BundleRef<'a> {
    pub parts: Vec<BundlePartRef<'a>>,
    /// The mask sum of the rows every part shares.
    pub shared: MaskSumRef<'a>,
}

impl<'a> BundleRef<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let bad = |why: &str| HedfError::Malformed(format!("fused he_sum state: {why}"));
        if bytes.len() < 6 || &bytes[..4] != BUNDLE_MAGIC || bytes[4] != SUM_VERSION {
            return Err(bad("not a hedf bundle of this version"));
        }
        let mut at = 6;
        let mut heads = Vec::with_capacity(bytes[5] as usize);
        for _ in 0..bytes[5] {
            let head_end = at + HEADER_LEN + 8 + 1;
            if bytes.len() < head_end {
                return Err(bad("truncated"));
            }
            let crypto = ColumnCrypto::from_header(&bytes[at..at + HEADER_LEN])?;
            let count = read_word(bytes, at + HEADER_LEN);
            let has_own = match bytes[head_end - 1] {
                0 => false,
                1 => true,
                _ => return Err(bad("bad own-mask flag")),
            };
            let bodies_end = head_end + crypto.bodies_width();
            if bytes.len() < bodies_end {
                return Err(bad("truncated"));
            }
            heads.push((crypto, count, &bytes[head_end..bodies_end], has_own));
            at = bodies_end;
        }
        let (shared, mut rest) = MaskSumRef::parse_prefix(&bytes[at..])?;
        let mut parts = Vec::with_capacity(heads.len());
        for (crypto, count, bodies, has_own) in heads {
            let own = if has_own {
                let (own, tail) = MaskSumRef::parse_prefix(rest)?;
                rest = tail;
                Some(own)
            } else {
                None
            };
            parts.push(BundlePartRef {
                crypto,
                count,
                bodies,
                own,
            });
        }
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(BundleRef { parts, shared })
    }
}
