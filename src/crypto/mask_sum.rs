//! A group's mask sum as sums and he_sum states carry it: its N coefficients, the list of the
//! rows it sums, or both.
//!
//! A sum decrypts as `body - <mask sum, key>`, where the mask sum is the sum of its rows'
//! extracted LWE masks (each times its weight). For a group with many rows, the N
//! coefficients (32 KiB) are the compact form. For a group of a few rows, the list of those
//! rows is (a few bytes a row): the client regenerates their chunks' masks from the public
//! seeds and gets `<mask sum, key>` as one FFT product per chunk and key, whatever the
//! number of groups (see [`crate::crypto::client`]). The server lists a group's rows while
//! they are at most [`LISTED_ROWS`] and adds them into coefficients beyond, so a group never
//! holds much more than one mask, and many small groups cost what their rows cost, not 32 KiB
//! each. Listing rows tells nobody anything new: the server grouped them, and the key holder
//! can decrypt every row anyway.
//!
//! Layout: `flags u8 (1: coefficients, 2: rows) | coefficient u64 x N | rows`, little endian,
//! where `rows` is `seeds u16 | seed u128 x seeds | count u32 | bytes u32 | per row: LEB128 of
//! its key minus the previous row's key, zigzag LEB128 of its weight`, with key `seed index
//! << 48 | row`. Rows are sorted by (seed, row, weight), so equal row sets are equal bytes
//! ([`crate::crypto::answer`] sends equal mask sums once). No flag: a zero mask sum.

use sha2::{Digest, Sha256};

use crate::crypto::params::POLYNOMIAL_SIZE as N;
use crate::error::{HedfError, Result};

/// Bytes of a mask sum's coefficients: N of 8 bytes.
pub const MASK_BYTES: usize = 8 * N;
/// Rows a group keeps listed before the server adds them into coefficients: as many bytes
/// in memory (8 a row; 16 with weights) as one coefficient vector.
pub const LISTED_ROWS: usize = MASK_BYTES / 8;
/// Bits of a listed row's key that hold its row number.
pub const ROW_BITS: u32 = 48;
/// Rows of one mask stream a list can name (2^48; a stream is never near that long).
pub const MAX_LISTED_ROW: u64 = 1 << ROW_BITS;
const COEFFICIENTS: u8 = 1;
const ROWS: u8 = 2;
/// Most mask streams one list names (its seed count is a u16).
pub const MAX_SEEDS: usize = u16::MAX as usize;
/// Bytes of a [`MaskSumRef::check`].
pub const CHECK_BYTES: usize = 16;

/// One row of a list: the mask stream's seed, the row (chunk `row / N`, position `row % N`)
/// and its weight (1 unless summed as `x * w`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListedRow {
    pub seed: u128,
    pub row: u64,
    pub weight: i64,
}

fn malformed(why: &str) -> HedfError {
    HedfError::Malformed(format!("mask sum: {why}"))
}

fn write_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A LEB128 number in its shortest form (anything else is not canonical: `None`).
fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        let bits = (b & 0x7f) as u64;
        if (shift == 63 && bits > 1) || (shift > 0 && b == 0) {
            return None;
        }
        v |= bits << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Writes a mask sum: `coefficients`, if any, plus `rows` (sorted here; may be empty).
pub fn write_mask_sum(
    coefficients: Option<&[u64]>,
    rows: &mut [ListedRow],
    out: &mut Vec<u8>,
) -> Result<()> {
    let flags = if coefficients.is_some() {
        COEFFICIENTS
    } else {
        0
    } | if rows.is_empty() { 0 } else { ROWS };
    out.push(flags);
    if let Some(coefficients) = coefficients {
        debug_assert_eq!(coefficients.len(), N);
        for c in coefficients {
            out.extend_from_slice(&c.to_le_bytes());
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    rows.sort_unstable();
    let mut seeds: Vec<u128> = rows.iter().map(|r| r.seed).collect();
    seeds.dedup();
    if seeds.len() > MAX_SEEDS {
        return Err(malformed(&format!(
            "a group's rows come from {} mask streams, more than {MAX_SEEDS}",
            seeds.len()
        )));
    }
    let count = u32::try_from(rows.len())
        .map_err(|_| malformed("more than 2^32 listed rows in one group"))?;
    out.extend_from_slice(&(seeds.len() as u16).to_le_bytes());
    for seed in &seeds {
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.extend_from_slice(&count.to_le_bytes());
    let len_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let (mut seed_index, mut previous) = (0u64, 0u64);
    for r in rows.iter() {
        if r.row >= MAX_LISTED_ROW {
            return Err(malformed(&format!("row {} is beyond 2^{ROW_BITS}", r.row)));
        }
        while seeds[seed_index as usize] != r.seed {
            seed_index += 1;
        }
        let key = seed_index << ROW_BITS | r.row;
        write_varint(key - previous, out);
        write_varint(((r.weight << 1) ^ (r.weight >> 63)) as u64, out);
        previous = key;
    }
    let len = u32::try_from(out.len() - len_at - 4)
        .map_err(|_| malformed("a group's row list is over 4 GiB"))?;
    out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// The rows of a mask sum, validated when parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListedRows<'a> {
    seeds: &'a [u8],
    count: u32,
    encoded: &'a [u8],
}

impl<'a> ListedRows<'a> {
    const EMPTY: ListedRows<'static> = ListedRows {
        seeds: &[],
        count: 0,
        encoded: &[],
    };

    fn seed(&self, index: usize) -> Option<u128> {
        let bytes = self.seeds.get(16 * index..16 * index + 16)?;
        Some(u128::from_le_bytes(bytes.try_into().expect("16 bytes")))
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn iter(&self) -> ListedRowIter<'a> {
        ListedRowIter {
            rows: *self,
            at: 0,
            key: 0,
            left: self.count,
        }
    }

    /// Decodes every row once and checks the form [`write_mask_sum`] writes, the only one
    /// with equal bytes for equal rows: seeds ascending and each one used, rows in order,
    /// shortest varints, the bytes used up exactly.
    fn validate(&self) -> Result<()> {
        let seeds: Vec<u128> = (0..self.seeds.len() / 16)
            .map(|i| self.seed(i).expect("in range"))
            .collect();
        if seeds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(malformed("seeds out of order"));
        }
        let mut iter = self.iter();
        let mut previous: Option<(u64, ListedRow)> = None;
        for _ in 0..self.count {
            let (key, row) = iter.decode().ok_or_else(|| malformed("bad row list"))?;
            let seed_index = key >> ROW_BITS;
            let next_seed = previous.map_or(0, |(k, _)| (k >> ROW_BITS) + 1);
            if previous.is_some_and(|p| p > (key, row)) || seed_index > next_seed {
                return Err(malformed("rows out of order or a seed unused"));
            }
            previous = Some((key, row));
        }
        if previous.is_some_and(|(k, _)| (k >> ROW_BITS) as usize + 1 != seeds.len()) {
            return Err(malformed("a seed unused"));
        }
        if iter.at != self.encoded.len() {
            return Err(malformed("row list has trailing bytes"));
        }
        Ok(())
    }
}

/// The rows of a [`ListedRows`], in order.
pub struct ListedRowIter<'a> {
    rows: ListedRows<'a>,
    at: usize,
    key: u64,
    left: u32,
}

impl ListedRowIter<'_> {
    /// The next row and its key, `None` if the bytes do not hold one.
    fn decode(&mut self) -> Option<(u64, ListedRow)> {
        let delta = read_varint(self.rows.encoded, &mut self.at)?;
        let zigzag = read_varint(self.rows.encoded, &mut self.at)?;
        self.key = self.key.checked_add(delta)?;
        let seed = self.rows.seed((self.key >> ROW_BITS) as usize)?;
        let weight = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
        let row = self.key & (MAX_LISTED_ROW - 1);
        Some((self.key, ListedRow { seed, row, weight }))
    }
}

impl Iterator for ListedRowIter<'_> {
    type Item = ListedRow;

    fn next(&mut self) -> Option<ListedRow> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(self.decode().expect("validated when parsed").1)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

impl ExactSizeIterator for ListedRowIter<'_> {}

/// A borrowed, validated view of one serialised mask sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskSumRef<'a> {
    coefficients: Option<&'a [u8]>,
    rows: Option<ListedRows<'a>>,
    bytes: &'a [u8],
}

impl<'a> MaskSumRef<'a> {
    /// The mask sum at the start of `bytes`, and the bytes after it.
    pub fn parse_prefix(bytes: &'a [u8]) -> Result<(Self, &'a [u8])> {
        let truncated = || malformed("truncated");
        let take = |rest: &mut &'a [u8], n: usize| -> Result<&'a [u8]> {
            if rest.len() < n {
                return Err(truncated());
            }
            let (head, tail) = rest.split_at(n);
            *rest = tail;
            Ok(head)
        };
        let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let (&flags, mut rest) = bytes.split_first().ok_or_else(truncated)?;
        if flags & !(COEFFICIENTS | ROWS) != 0 {
            return Err(malformed("unknown flags"));
        }
        let coefficients = if flags & COEFFICIENTS != 0 {
            Some(take(&mut rest, MASK_BYTES)?)
        } else {
            None
        };
        let rows = if flags & ROWS != 0 {
            let seeds = take(&mut rest, 2)?;
            let seeds = u16::from_le_bytes([seeds[0], seeds[1]]) as usize;
            let seeds = take(&mut rest, 16 * seeds)?;
            let count = u32_at(take(&mut rest, 4)?);
            let len = u32_at(take(&mut rest, 4)?) as usize;
            let encoded = take(&mut rest, len)?;
            if seeds.is_empty() || count == 0 {
                return Err(malformed("empty row list"));
            }
            let rows = ListedRows {
                seeds,
                count,
                encoded,
            };
            rows.validate()?;
            Some(rows)
        } else {
            None
        };
        let used = bytes.len() - rest.len();
        Ok((
            MaskSumRef {
                coefficients,
                rows,
                bytes: &bytes[..used],
            },
            rest,
        ))
    }

    /// A mask sum that is the whole of `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let (mask, rest) = Self::parse_prefix(bytes)?;
        if !rest.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        Ok(mask)
    }

    /// The serialised mask sum.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Its N little-endian u64 coefficients, if it has any.
    pub fn coefficients(&self) -> Option<&'a [u8]> {
        self.coefficients
    }

    /// Its listed rows (none if it has only coefficients).
    pub fn listed(&self) -> ListedRowIter<'a> {
        self.rows.unwrap_or(ListedRows::EMPTY).iter()
    }

    /// 16 bytes by which a sum that shares this mask sum checks it found the right one: its
    /// bytes' SHA-256, truncated.
    pub fn check(&self) -> [u8; CHECK_BYTES] {
        Sha256::digest(self.bytes)[..CHECK_BYTES]
            .try_into()
            .expect("16 of 32 bytes")
    }
}

/// Writes the mask sum `a + b`: coefficients added, rows joined.
pub fn write_mask_sum_of(a: &MaskSumRef<'_>, b: &MaskSumRef<'_>, out: &mut Vec<u8>) -> Result<()> {
    let words = |c: &[u8]| -> Vec<u64> {
        c.chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect()
    };
    let coefficients = match (a.coefficients(), b.coefficients()) {
        (None, None) => None,
        (Some(x), None) | (None, Some(x)) => Some(words(x)),
        (Some(x), Some(y)) => {
            let mut sum = words(x);
            for (s, w) in sum.iter_mut().zip(words(y)) {
                *s = s.wrapping_add(w);
            }
            Some(sum)
        }
    };
    let mut rows: Vec<ListedRow> = a.listed().chain(b.listed()).collect();
    write_mask_sum(coefficients.as_deref(), &mut rows, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_sums_round_trip_in_canonical_order() {
        let coefficients: Vec<u64> = (0..N as u64).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
        let rows = vec![
            ListedRow {
                seed: 7,
                row: 5,
                weight: 1,
            },
            ListedRow {
                seed: 3,
                row: MAX_LISTED_ROW - 1,
                weight: -2,
            },
            ListedRow {
                seed: 7,
                row: 5,
                weight: i64::MIN,
            },
            ListedRow {
                seed: 3,
                row: 0,
                weight: i64::MAX,
            },
        ];
        for coefficients in [None, Some(&coefficients[..])] {
            let mut out = Vec::new();
            write_mask_sum(coefficients, &mut rows.clone(), &mut out).unwrap();
            let mut reversed = rows.clone();
            reversed.reverse();
            let mut again = Vec::new();
            write_mask_sum(coefficients, &mut reversed, &mut again).unwrap();
            assert_eq!(out, again, "the bytes do not depend on the rows' order");
            let parsed = MaskSumRef::parse(&out).unwrap();
            let mut sorted = rows.clone();
            sorted.sort();
            assert_eq!(parsed.listed().collect::<Vec<_>>(), sorted);
            assert_eq!(
                parsed.coefficients().map(|c| c.len()),
                coefficients.map(|_| MASK_BYTES)
            );
            assert_eq!(parsed.bytes(), &out[..]);
            for cut in 0..out.len() {
                assert!(MaskSumRef::parse(&out[..cut]).is_err(), "cut at {cut}");
            }
        }
        let mut zero = Vec::new();
        write_mask_sum(None, &mut [], &mut zero).unwrap();
        let parsed = MaskSumRef::parse(&zero).unwrap();
        assert_eq!((parsed.coefficients(), parsed.listed().len()), (None, 0));
        let mut beyond = vec![ListedRow {
            seed: 1,
            row: MAX_LISTED_ROW,
            weight: 1,
        }];
        assert!(write_mask_sum(None, &mut beyond, &mut Vec::new()).is_err());
    }

    /// Only the canonical form parses: seeds ascending and used, shortest varints.
    #[test]
    fn non_canonical_row_lists_are_refused() {
        let rows = |seeds: &[u128], encoded: &[u8], count: u32| {
            let mut out = vec![ROWS];
            out.extend_from_slice(&(seeds.len() as u16).to_le_bytes());
            for s in seeds {
                out.extend_from_slice(&s.to_le_bytes());
            }
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
            out.extend_from_slice(encoded);
            out
        };
        // Row 3 weight 1 under seed 5: key delta 3, zigzag(1) = 2.
        assert!(MaskSumRef::parse(&rows(&[5], &[3, 2], 1)).is_ok());
        assert!(
            MaskSumRef::parse(&rows(&[5], &[0x83, 0x00, 2], 1)).is_err(),
            "long varint"
        );
        assert!(
            MaskSumRef::parse(&rows(&[5, 4], &[3, 2], 1)).is_err(),
            "seeds unsorted"
        );
        assert!(
            MaskSumRef::parse(&rows(&[4, 5], &[3, 2], 1)).is_err(),
            "seed 5 unused"
        );
        let skip = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 2];
        assert!(
            MaskSumRef::parse(&rows(&[4, 5, 6], &skip, 1)).is_err(),
            "seed 4 skipped"
        );
        assert!(MaskSumRef::parse(&rows(&[5], &[3, 2], 2)).is_err(), "count");
        assert!(
            MaskSumRef::parse(&rows(&[5], &[3, 2, 0], 1)).is_err(),
            "trailing"
        );
    }

    #[test]
    fn checks_tell_different_row_lists_apart() {
        let write = |row| {
            let mut out = Vec::new();
            write_mask_sum(
                None,
                &mut [ListedRow {
                    seed: 1,
                    row,
                    weight: 1,
                }],
                &mut out,
            )
            .unwrap();
            out
        };
        let (a, b) = (write(1), write(2));
        let (a, b) = (
            MaskSumRef::parse(&a).unwrap(),
            MaskSumRef::parse(&b).unwrap(),
        );
        assert_ne!(a.check(), b.check());
        assert_eq!(a.check(), a.check());
    }

    #[test]
    fn the_sum_of_two_mask_sums_adds_coefficients_and_joins_rows() {
        let (x, y) = (vec![u64::MAX; N], vec![2u64; N]);
        let row = |row| ListedRow {
            seed: 9,
            row,
            weight: 1,
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write_mask_sum(Some(&x), &mut [row(4)], &mut a).unwrap();
        write_mask_sum(Some(&y), &mut [row(2), row(4)], &mut b).unwrap();
        let mut sum = Vec::new();
        let (a, b) = (
            MaskSumRef::parse(&a).unwrap(),
            MaskSumRef::parse(&b).unwrap(),
        );
        write_mask_sum_of(&a, &b, &mut sum).unwrap();
        let sum = MaskSumRef::parse(&sum).unwrap();
        assert!(sum
            .coefficients()
            .unwrap()
            .chunks(8)
            .all(|w| w == 1u64.to_le_bytes()));
        assert_eq!(
            sum.listed().collect::<Vec<_>>(),
            vec![row(2), row(4), row(4)]
        );
    }
}
