//! The one parameter set hedf encrypts with, and the budget it implies.
//!
//! GLWE part of tfhe 1.8.2's
//! `tfhe::shortint::parameters::v1_4::V1_4_PARAM_MESSAGE_2_CARRY_3_KS_PBS_GAUSSIAN_2M128`:
//! GLWE dimension k = 1, polynomial size N = 4096, Gaussian noise with standard deviation
//! 2.168404344971009e-19 on the torus (= 2^-62, i.e. 4.0 on the u64 torus), binary secret key,
//! native 2^64 ciphertext modulus. Zama publishes every tfhe parameter set as 128-bit secure
//! (estimated with the lattice estimator); hedf uses this GLWE instance unchanged and adds no
//! key switching or bootstrapping, so the security of stored and summed ciphertexts is that of
//! this instance: 128 bits.
//!
//! Plaintexts are scaled by delta = 2^log2_delta, chosen per column from the rows one sum may
//! hold ([`log2_delta_for`]) and carried in its metadata, leaving 64 - log2_delta plaintext bits
//! (sign included). A sum of `n` cells
//! decrypts exactly when its noise stays below delta/2 and its value fits the plaintext space;
//! [`max_rows`] turns both into a row budget with failure probability below 2^-40.

/// Identifies this parameter set in every cell, result and key file.
pub const PARAMS_ID: u8 = 1;
/// Human-readable name, printed in errors, metadata and the README.
pub const PARAMS_NAME: &str = "hedf-glwe-4096-gauss-2m62 (GLWE of tfhe V1_4_PARAM_MESSAGE_2_CARRY_3_KS_PBS_GAUSSIAN_2M128, 128-bit)";
/// GLWE polynomial size N: one seeded GLWE ciphertext encrypts a chunk of N values.
pub const POLYNOMIAL_SIZE: usize = 4096;
/// GLWE dimension k.
pub const GLWE_DIMENSION: usize = 1;
/// Noise standard deviation relative to the torus, as tfhe states it.
pub const NOISE_STD_DEV: f64 = 2.168404344971009e-19;
/// The scaling factors a column may declare: enough noise room below, a plaintext bit above.
pub const LOG2_DELTA_RANGE: std::ops::RangeInclusive<u32> = 12..=40;
/// Tail bound: P(|Z| > 7.2) = 6.0e-13 < 2^-40 for a standard normal Z.
const Z_FAIL: f64 = 7.2;
/// Widest limb hedf splits values into.
pub const MAX_LIMB_BITS: u32 = 25;
/// Rows one sum may hold unless the table asks otherwise: 2^27 (134 million), for any
/// DECIMAL(18, s).
pub const DEFAULT_MAX_ROWS_PER_SUM: u64 = 1 << 27;
/// The most rows per sum a table may ask for.
pub const MAX_ROWS_PER_SUM: u64 = 1 << 31;

/// Rows a sum may have before its noise could exceed delta/2 with probability 2^-40.
///
/// tfhe samples a continuous Gaussian and rounds it to the integer torus, so the per-cell
/// variance is sigma^2 + 1/12; noises of distinct cells are independent and add up.
pub fn noise_max_rows(log2_delta: u32) -> u64 {
    let sigma = NOISE_STD_DEV * 2f64.powi(64);
    let sd = (sigma * sigma + 1.0 / 12.0).sqrt();
    let half_delta = 2f64.powi(log2_delta as i32 - 1);
    let root = half_delta / (Z_FAIL * sd);
    (root * root).floor() as u64
}

/// Rows a sum of limbs bounded by `|limb| < 2^limb_bits`, scaled by 2^log2_delta, may have and
/// still decrypt exactly.
pub fn max_rows(limb_bits: u32, log2_delta: u32) -> u64 {
    let plaintext_room = ((1u64 << (63 - log2_delta)) - 1) / ((1u64 << limb_bits) - 1);
    plaintext_room.min(noise_max_rows(log2_delta))
}

/// How many rows of a sum's budget one value weighted by the public integer `w` uses: `w^2`,
/// at least 1. Both bounds of [`max_rows`] then hold for a weighted sum whose values use at
/// most `max_rows` rows in all: its noise is the sum of `w * e`, of variance `sum w^2 * sd^2`,
/// and its plaintext `|sum w * m| <= sum |w| * max|m| <= sum w^2 * max|m|` for integers `w`.
/// Unweighted values (`w = 1`) count one row each.
pub fn weighted_rows(w: i64) -> u64 {
    let a = w.unsigned_abs();
    a.saturating_mul(a).max(1)
}

/// The smallest scaling factor whose noise room holds sums of `rows` rows.
pub fn log2_delta_for(rows: u64) -> Option<u32> {
    LOG2_DELTA_RANGE
        .into_iter()
        .find(|&d| noise_max_rows(d) >= rows)
}

/// The widest limb a sum of `rows` rows scaled by 2^log2_delta still holds exactly.
pub fn limb_bits_for(rows: u64, log2_delta: u32) -> Option<u32> {
    (1..=MAX_LIMB_BITS)
        .rev()
        .find(|&bits| max_rows(bits, log2_delta) >= rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_at_delta_2_pow_18_meets_2_pow_20_rows_for_every_limb_width() {
        const LOG2_DELTA: u32 = 18;
        let noise = noise_max_rows(LOG2_DELTA);
        assert!(noise > 1 << 24, "noise budget {noise}");
        for bits in 1..=MAX_LIMB_BITS {
            let rows = max_rows(bits, LOG2_DELTA);
            assert!(rows >= 1 << 20, "{bits} bits: {rows}");
        }
        assert!(max_rows(MAX_LIMB_BITS + 1, LOG2_DELTA) < 1 << 20);
        // Two more bits of delta give 16 times the noise room.
        assert!(noise_max_rows(LOG2_DELTA + 2) >= 16 * noise - 16);
    }

    /// The figures README's budget table quotes.
    #[test]
    fn budgets_by_rows_per_sum() {
        let at = |rows: u64| {
            let d = log2_delta_for(rows).unwrap();
            (d, limb_bits_for(rows, d).unwrap())
        };
        assert_eq!(at(1 << 20), (16, 25));
        assert_eq!(at(1 << 24), (18, 21));
        assert_eq!(at(DEFAULT_MAX_ROWS_PER_SUM), (20, 16));
        assert_eq!(at(MAX_ROWS_PER_SUM), (22, 10));
        for rows in [1, 1000, 1 << 27, MAX_ROWS_PER_SUM] {
            let (d, bits) = at(rows);
            assert!(max_rows(bits, d) >= rows && noise_max_rows(d) >= rows);
            assert!(d == *LOG2_DELTA_RANGE.start() || noise_max_rows(d - 1) < rows);
        }
    }

    #[test]
    fn std_dev_is_two_to_minus_62() {
        assert_eq!(NOISE_STD_DEV * 2f64.powi(64), 4.0);
    }
}
