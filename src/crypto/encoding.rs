//! Fixed-point encoding of decimal measures and their split into limbs.
//!
//! A measure with scale `s` is stored as the integer `value * 10^s`. Its declared precision `p`
//! (digits, as in DECIMAL(p, s)) bounds every value by 10^p - 1; the rows one sum may hold
//! (2^27 unless the table asks otherwise) fix the scaling factor (noise room) and the widest
//! limb (plaintext room). Together they fix how many limbs a value takes: a value that fits
//! one limb is one body; a wider one is split into equal limbs, each summed exactly, which the
//! client recombines.

use crate::crypto::params::{
    limb_bits_for, log2_delta_for, max_rows, LOG2_DELTA_RANGE, MAX_LIMB_BITS, MAX_ROWS_PER_SUM,
};
use crate::error::{HedfError, Result};

/// Largest declared precision: DECIMAL(18, s) spans the i64 range.
pub const MAX_PRECISION: u8 = 18;
/// Largest scale hedf accepts.
pub const MAX_SCALE: i8 = 18;
/// Most limbs a value may be split into.
pub const MAX_LIMBS: u8 = 8;

/// How one measure column is encoded; public, carried in field metadata and every cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeasureSpec {
    /// Decimal places: the stored integer is `value * 10^scale`.
    pub scale: i8,
    /// Ciphertexts per value.
    pub limbs: u8,
    /// Every limb satisfies |limb| < 2^limb_bits; the low limbs are base-2^limb_bits digits.
    pub limb_bits: u8,
    /// Plaintexts are scaled by 2^log2_delta before encryption.
    pub log2_delta: u8,
}

impl MeasureSpec {
    /// The encoding for values of DECIMAL(precision, scale) whose sums hold up to `rows` rows.
    pub fn for_precision(precision: u8, scale: i8, rows: u64) -> Result<Self> {
        if !(1..=MAX_PRECISION).contains(&precision) {
            return Err(HedfError::Invalid(format!(
                "precision {precision} is outside 1..={MAX_PRECISION}"
            )));
        }
        if !(0..=MAX_SCALE).contains(&scale) || scale as u8 > precision {
            return Err(HedfError::Invalid(format!(
                "scale {scale} must be in 0..=precision ({precision})"
            )));
        }
        let unreachable = || {
            HedfError::Invalid(format!(
                "rows per sum must be in 1..={MAX_ROWS_PER_SUM}, not {rows}"
            ))
        };
        if !(1..=MAX_ROWS_PER_SUM).contains(&rows) {
            return Err(unreachable());
        }
        let log2_delta = log2_delta_for(rows).ok_or_else(unreachable)?;
        let widest = limb_bits_for(rows, log2_delta).ok_or_else(unreachable)?;
        let bits = 64 - precision_limit(precision).leading_zeros();
        let (limbs, limb_bits) = if bits <= widest {
            (1, bits)
        } else {
            // One bit more than the magnitude so the signed top limb stays below 2^limb_bits;
            // equal limbs, each as narrow as the count allows, leave the most room.
            let limbs = (bits + 1).div_ceil(widest);
            (limbs, (bits + 1).div_ceil(limbs))
        };
        if limbs > MAX_LIMBS as u32 {
            return Err(unreachable());
        }
        Ok(MeasureSpec {
            scale,
            limbs: limbs as u8,
            limb_bits: limb_bits as u8,
            log2_delta: log2_delta as u8,
        })
    }

    /// Bytes one value of this encoding takes on disk.
    pub fn bytes_per_value(&self) -> usize {
        8 * self.limbs as usize
    }

    /// Checks a spec read from untrusted metadata or cells.
    pub fn validate(&self) -> Result<()> {
        let ok = (0..=MAX_SCALE).contains(&self.scale)
            && (1..=MAX_LIMBS).contains(&self.limbs)
            && (1..=MAX_LIMB_BITS as u8).contains(&self.limb_bits)
            && LOG2_DELTA_RANGE.contains(&(self.log2_delta as u32))
            // join shifts i128 limb sums (< 2^66 in all) by up to (limbs - 1) * limb_bits.
            && (self.limbs as u32 - 1) * self.limb_bits as u32 <= 60
            && self.max_rows() > 0;
        if ok {
            Ok(())
        } else {
            Err(HedfError::Malformed(format!(
                "invalid measure encoding {self:?}"
            )))
        }
    }

    /// Largest |value| (fixed-point integer) the limbs can carry.
    pub fn max_abs(&self) -> i64 {
        // Several limbs keep a bit of margin so the signed top limb stays below 2^limb_bits.
        let bits = match self.limbs {
            1 => self.limb_bits as u32,
            n => n as u32 * self.limb_bits as u32 - 1,
        };
        if bits >= 63 {
            i64::MAX
        } else {
            (1i64 << bits) - 1
        }
    }

    /// Rows one sum of this column may have and still decrypt exactly (failure < 2^-40).
    pub fn max_rows(&self) -> u64 {
        max_rows(self.limb_bits as u32, self.log2_delta as u32)
    }

    /// Why [`Self::max_rows`] is what it is, for error messages.
    pub fn budget_reason(&self) -> String {
        format!(
            "{} limb(s) of |x| < 2^{} in {} plaintext bits, noise failure < 2^-40",
            self.limbs,
            self.limb_bits,
            64 - self.log2_delta as u32
        )
    }

    /// Splits `v` (|v| <= [`Self::max_abs`]) into limbs: the low ones unsigned
    /// base-2^limb_bits digits, the top one signed.
    pub fn split(&self, v: i64, out: &mut [i64]) {
        debug_assert_eq!(out.len(), self.limbs as usize);
        let bits = self.limb_bits as u32;
        let last = out.len() - 1;
        for (i, limb) in out.iter_mut().enumerate() {
            let shifted = v.checked_shr(bits * i as u32).unwrap_or(v >> 63);
            *limb = if i == last {
                shifted
            } else {
                shifted & ((1 << bits) - 1)
            };
        }
    }

    /// Recombines decrypted limb sums into the exact total.
    pub fn join(&self, limb_sums: &[i64]) -> i128 {
        limb_sums
            .iter()
            .enumerate()
            .map(|(i, &s)| (s as i128) << (self.limb_bits as usize * i))
            .sum()
    }
}

/// The largest |value| (fixed point) DECIMAL(precision, s) holds: 10^precision - 1, except that
/// DECIMAL(18, s) spans the whole i64 range.
pub fn precision_limit(precision: u8) -> u64 {
    if precision >= MAX_PRECISION {
        i64::MAX as u64
    } else {
        10u64.pow(precision as u32) - 1
    }
}

/// Parses a decimal string exactly into `value * 10^scale`. Extra decimals must be zeros:
/// "1.50" is fine at scale 1, "1.55" is an error, never a rounding.
pub fn parse_decimal(text: &str, scale: i8) -> std::result::Result<i64, String> {
    let s = text.trim();
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    let valid = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty()) || !valid(int_part) || !valid(frac_part) {
        return Err(format!("{text:?} is not a decimal number"));
    }
    let scale = scale as usize;
    if frac_part.len() > scale && frac_part[scale..].bytes().any(|b| b != b'0') {
        return Err(format!("{text:?} has more than {scale} decimal places"));
    }
    let overflow = || format!("{text:?} is too large for the i64 fixed-point range");
    let mut acc: i64 = 0;
    let frac_digits = frac_part.bytes().chain(std::iter::repeat(b'0')).take(scale);
    for b in int_part.bytes().chain(frac_digits) {
        acc = acc
            .checked_mul(10)
            .and_then(|a| a.checked_add((b - b'0') as i64))
            .ok_or_else(overflow)?;
    }
    Ok(if negative { -acc } else { acc })
}

/// Formats a fixed-point integer with `scale` decimals.
pub fn format_decimal(v: i128, scale: i8) -> String {
    if scale <= 0 {
        return v.to_string();
    }
    let digits = v.unsigned_abs().to_string();
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{}{int}.{frac}", if v < 0 { "-" } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::params::DEFAULT_MAX_ROWS_PER_SUM;

    /// Limbs by precision and rows per sum, as README's budget table quotes them.
    #[test]
    fn limbs_follow_the_precision_and_the_rows_per_sum() {
        let spec = |p, rows| MeasureSpec::for_precision(p, 0, rows).unwrap();
        let shape = |s: MeasureSpec| (s.limbs, s.limb_bits, s.log2_delta);
        assert_eq!(shape(spec(6, 1 << 24)), (1, 20, 18));
        assert_eq!(shape(spec(6, DEFAULT_MAX_ROWS_PER_SUM)), (2, 11, 20));
        assert_eq!(shape(spec(4, DEFAULT_MAX_ROWS_PER_SUM)), (1, 14, 20));
        assert_eq!(shape(spec(18, DEFAULT_MAX_ROWS_PER_SUM)), (4, 16, 20));
        assert_eq!(shape(spec(18, MAX_ROWS_PER_SUM)), (7, 10, 22));
        assert_eq!(shape(spec(18, 1 << 24)), (4, 16, 18));
        assert_eq!(shape(spec(9, 1 << 20)), (2, 16, 16));
        for p in 1..=MAX_PRECISION {
            for rows in [1, 1 << 20, DEFAULT_MAX_ROWS_PER_SUM, MAX_ROWS_PER_SUM] {
                let s = spec(p, rows);
                s.validate().unwrap();
                assert!(s.max_rows() >= rows, "p {p}, rows {rows}");
                assert!(
                    s.max_abs() as u64 >= precision_limit(p),
                    "p {p}, rows {rows}"
                );
            }
        }
        assert!(MeasureSpec::for_precision(19, 0, 1).is_err());
        assert!(MeasureSpec::for_precision(3, 4, 1).is_err());
        assert!(MeasureSpec::for_precision(6, 0, 0).is_err());
        assert!(MeasureSpec::for_precision(6, 0, MAX_ROWS_PER_SUM + 1).is_err());
    }

    #[test]
    fn limbs_split_and_join_exactly_at_the_extremes() {
        for rows in [1 << 20, DEFAULT_MAX_ROWS_PER_SUM, MAX_ROWS_PER_SUM] {
            let spec = MeasureSpec::for_precision(18, 0, rows).unwrap();
            let n = spec.limbs as usize;
            let bound = 1i64 << spec.limb_bits;
            for v in [
                0,
                1,
                -1,
                spec.max_abs(),
                -spec.max_abs(),
                i64::MAX,
                -i64::MAX,
                -(1 << 50) - 7,
            ] {
                let mut limbs = [0i64; MAX_LIMBS as usize];
                spec.split(v, &mut limbs[..n]);
                assert!(limbs.iter().all(|l| l.abs() < bound), "{v}: {limbs:?}");
                assert!(limbs[..n - 1].iter().all(|&l| l >= 0));
                assert_eq!(spec.join(&limbs[..n]), v as i128);
            }
        }
    }

    #[test]
    fn decimals_parse_exactly_or_fail() {
        assert_eq!(parse_decimal("2807.1", 1), Ok(28071));
        assert_eq!(parse_decimal("-0.5", 2), Ok(-50));
        assert_eq!(parse_decimal("12", 1), Ok(120));
        assert_eq!(parse_decimal("1.50", 1), Ok(15));
        assert_eq!(parse_decimal(".5", 1), Ok(5));
        assert!(parse_decimal("1.55", 1)
            .unwrap_err()
            .contains("more than 1 decimal"));
        assert!(parse_decimal("abc", 1).is_err());
        assert!(parse_decimal("-", 1).is_err());
        assert!(parse_decimal("99999999999999999999", 0).is_err());
        assert_eq!(format_decimal(-5, 1), "-0.5");
        assert_eq!(format_decimal(137100, 1), "13710.0");
        assert_eq!(format_decimal(7, 3), "0.007");
        assert_eq!(format_decimal(42, 0), "42");
    }
}
