//! Body slots of a common mask: which secret key each column and limb encrypts under.
//!
//! hedf encrypts common-mask (CM) ciphertexts: every row of a table segment has one mask,
//! shared by all its encrypted columns and limbs, each under its own independent secret key,
//! `b_s = <a, s_s> + delta * m_s + e_s`. With independent keys, k bodies on one mask are as hard
//! to attack as k separate RLWE samples (Matrix-LWE; Bergerat, Bonte, Curtis, Orfila, Paillier,
//! Tap, "Sharing the Mask: TFHE Bootstrapping on Packed Messages", TCHES 2025(4); tfhe 1.8.2
//! implements the same format in `core_crypto::experimental` (`CmGlweCiphertext`,
//! `encrypt_cm_glwe_ciphertext`)). Two bodies under the *same* key on one mask would leak the
//! difference of their plaintexts, so the slots of one segment must be distinct: a [`SlotMap`]
//! is the only way to number them, and it never hands out a slot twice.

use crate::crypto::encoding::MeasureSpec;
use crate::error::{HedfError, Result};

/// Slots one mask carries at most: each is one 8-byte body per row.
pub const MAX_SLOTS: usize = 1024;

/// Hands out disjoint slot ranges, one per encrypted column (one slot per limb).
#[derive(Debug, Default)]
pub struct SlotMap {
    next: usize,
}

impl SlotMap {
    /// The first slot of a new column of `spec.limbs` slots, after every range handed out.
    pub fn assign(&mut self, spec: &MeasureSpec) -> Result<u16> {
        let base = self.next;
        let end = base + spec.limbs as usize;
        if end > MAX_SLOTS {
            return Err(HedfError::Invalid(format!(
                "a table may hold at most {MAX_SLOTS} encrypted limbs (sum of all measures' \
                 limbs); encrypt the measures as several tables"
            )));
        }
        self.next = end;
        Ok(base as u16)
    }
}

/// Checks that the slot ranges `(base, limbs)` of one table's columns are disjoint and within
/// [`MAX_SLOTS`]: what a [`SlotMap`] produces. Tables read or uploaded with overlapping slots
/// are refused, whoever made them.
pub fn check_disjoint(ranges: impl IntoIterator<Item = (u16, u8)>) -> Result<()> {
    let mut used = vec![false; MAX_SLOTS];
    for (base, limbs) in ranges {
        for slot in base as usize..base as usize + limbs as usize {
            match used.get_mut(slot) {
                Some(taken) if !*taken => *taken = true,
                Some(_) => {
                    return Err(HedfError::Malformed(format!(
                        "two encrypted columns use body slot {slot} on the same mask; a hedf \
                         client never encrypts so"
                    )))
                }
                None => {
                    return Err(HedfError::Malformed(format!(
                        "body slot {slot} is beyond the last slot {}",
                        MAX_SLOTS - 1
                    )))
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigned_ranges_are_disjoint_and_overlaps_are_refused() {
        let wide = MeasureSpec::for_precision(18, 2, 1 << 20).unwrap();
        let narrow = MeasureSpec::for_precision(6, 1, 1 << 20).unwrap();
        let mut map = SlotMap::default();
        let ranges: Vec<(u16, u8)> = [wide, narrow, wide, narrow]
            .iter()
            .map(|s| (map.assign(s).unwrap(), s.limbs))
            .collect();
        assert_eq!(ranges, [(0, 3), (3, 1), (4, 3), (7, 1)]);
        check_disjoint(ranges.iter().copied()).unwrap();
        let e = check_disjoint([(0, 3), (2, 1)]).unwrap_err().to_string();
        assert!(e.contains("slot 2"), "{e}");
        assert!(check_disjoint([(MAX_SLOTS as u16 - 1, 2)]).is_err());
        let mut full = SlotMap::default();
        let many = (0..MAX_SLOTS)
            .filter(|_| full.assign(&narrow).is_ok())
            .count();
        assert_eq!(many, MAX_SLOTS);
        assert!(full.assign(&narrow).is_err());
    }
}
