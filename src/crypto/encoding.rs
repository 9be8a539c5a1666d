//! Fixed-point encoding of decimal measures and their split into limbs.
//!
//! A measure with scale `s` is stored as the integer `value * 10^s`. Its declared precision `p`
//! (digits, as in DECIMAL(p, s)) bounds every value by 10^p - 1, which fixes how many limbs a
//! value takes: a narrow column is one ciphertext per value; a wide one (up to DECIMAL(18, s), the
//! i64 range) is split into 25-bit limbs so every limb sum over 2^20 rows still fits the
//! plaintext space. The client recombines limb sums exactly.

use crate::crypto::params::{max_rows, MAX_LIMB_BITS, PLAINTEXT_BITS};
use crate::error::{HedfError, Result};

/// Largest declared precision: DECIMAL(18, s) spans the i64 range.
pub const MAX_PRECISION: u8 = 18;
/// Largest scale hedf accepts.
pub const MAX_SCALE: i8 = 18;

/// How one measure column is encoded; public, carried in field metadata and every cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeasureSpec {
    /// Decimal places: the stored integer is `value * 10^scale`.
    pub scale: i8,
    /// Ciphertexts per value.
    pub limbs: u8,
    /// Every limb satisfies |limb| < 2^limb_bits.
    pub limb_bits: u8,
}

impl MeasureSpec {
    /// The encoding for values of DECIMAL(precision, scale).
    pub fn for_precision(precision: u8, scale: i8) -> Result<Self> {
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
        let max_abs = 10u64.pow(precision as u32) - 1;
        let bits = 64 - max_abs.leading_zeros();
        let (limbs, limb_bits) = if bits <= MAX_LIMB_BITS {
            (1, bits)
        } else {
            // One bit more than the magnitude so the signed top limb stays below 2^25.
            ((bits + 1).div_ceil(MAX_LIMB_BITS), MAX_LIMB_BITS)
        };
        Ok(MeasureSpec {
            scale,
            limbs: limbs as u8,
            limb_bits: limb_bits as u8,
        })
    }

    /// Checks a spec read from untrusted metadata or cells.
    pub fn validate(&self) -> Result<()> {
        let ok = (0..=MAX_SCALE).contains(&self.scale)
            && (1..=3).contains(&self.limbs)
            && (1..=MAX_LIMB_BITS as u8).contains(&self.limb_bits)
            && (self.limbs == 1 || self.limb_bits as u32 == MAX_LIMB_BITS);
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
        if self.limbs == 1 {
            (1i64 << self.limb_bits) - 1
        } else {
            i64::MAX
        }
    }

    /// Rows one sum of this column may have and still decrypt exactly (failure < 2^-40).
    pub fn max_rows(&self) -> u64 {
        max_rows(self.limb_bits as u32)
    }

    /// Why [`Self::max_rows`] is what it is, for error messages.
    pub fn budget_reason(&self) -> String {
        format!(
            "{} limb(s) of |x| < 2^{} in {PLAINTEXT_BITS} plaintext bits, noise failure < 2^-40",
            self.limbs, self.limb_bits
        )
    }

    /// Splits `v` into limbs: the low ones unsigned base-2^25 digits, the top one signed.
    pub fn split(&self, v: i64, out: &mut [i64]) {
        debug_assert_eq!(out.len(), self.limbs as usize);
        let last = out.len() - 1;
        for (i, limb) in out.iter_mut().enumerate() {
            let shifted = v >> (MAX_LIMB_BITS as usize * i);
            *limb = if i == last {
                shifted
            } else {
                shifted & ((1 << MAX_LIMB_BITS) - 1)
            };
        }
    }

    /// Recombines decrypted limb sums into the exact total.
    pub fn join(&self, limb_sums: &[i64]) -> i128 {
        limb_sums
            .iter()
            .enumerate()
            .map(|(i, &s)| (s as i128) << (MAX_LIMB_BITS as usize * i))
            .sum()
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

    #[test]
    fn narrow_columns_take_one_ciphertext_wide_ones_limbs() {
        let demo = MeasureSpec::for_precision(6, 1).unwrap();
        assert_eq!((demo.limbs, demo.limb_bits), (1, 20));
        assert!(demo.max_rows() >= 1 << 24);
        let wide = MeasureSpec::for_precision(18, 2).unwrap();
        assert_eq!((wide.limbs, wide.limb_bits), (3, 25));
        assert!(wide.max_rows() >= 1 << 20);
        assert_eq!(MeasureSpec::for_precision(9, 0).unwrap().limbs, 2);
        assert!(MeasureSpec::for_precision(19, 0).is_err());
        assert!(MeasureSpec::for_precision(3, 4).is_err());
    }

    #[test]
    fn limbs_split_and_join_exactly_at_the_extremes() {
        let spec = MeasureSpec::for_precision(18, 0).unwrap();
        for v in [
            0,
            1,
            -1,
            i64::MAX,
            i64::MIN,
            999_999_999_999_999_999,
            -(1 << 50) - 7,
        ] {
            let mut limbs = [0i64; 3];
            spec.split(v, &mut limbs);
            assert!(limbs.iter().all(|l| l.abs() < 1 << 25), "{v}: {limbs:?}");
            assert!(limbs[..2].iter().all(|&l| l >= 0));
            assert_eq!(spec.join(&limbs), v as i128);
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
