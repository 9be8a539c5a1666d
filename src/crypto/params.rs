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
//! Plaintexts are scaled by delta = 2^18, leaving 46 plaintext bits (sign included). A sum of
//! `n` cells decrypts exactly when its noise stays below delta/2 and its value fits the plaintext
//! space; [`max_rows`] turns both into a row budget with failure probability below 2^-40.

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
/// log2 of the plaintext scaling factor.
pub const LOG2_DELTA: u32 = 18;
/// Plaintext bits available to a sum, sign included.
pub const PLAINTEXT_BITS: u32 = 64 - LOG2_DELTA;
/// Tail bound: P(|Z| > 7.2) = 6.0e-13 < 2^-40 for a standard normal Z.
const Z_FAIL: f64 = 7.2;
/// Widest limb: with 25-bit limbs a sum over 2^20 rows still fits the 46 plaintext bits.
pub const MAX_LIMB_BITS: u32 = 25;

/// Rows a sum may have before its noise could exceed delta/2 with probability 2^-40.
///
/// tfhe samples a continuous Gaussian and rounds it to the integer torus, so the per-cell
/// variance is sigma^2 + 1/12; noises of distinct cells are independent and add up.
pub fn noise_max_rows() -> u64 {
    let sigma = NOISE_STD_DEV * 2f64.powi(64);
    let sd = (sigma * sigma + 1.0 / 12.0).sqrt();
    let half_delta = 2f64.powi(LOG2_DELTA as i32 - 1);
    let root = half_delta / (Z_FAIL * sd);
    (root * root).floor() as u64
}

/// Rows a sum of limbs bounded by `|limb| < 2^limb_bits` may have and still decrypt exactly.
pub fn max_rows(limb_bits: u32) -> u64 {
    let plaintext_room = ((1u64 << (PLAINTEXT_BITS - 1)) - 1) / ((1u64 << limb_bits) - 1);
    plaintext_room.min(noise_max_rows())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_meets_the_2_pow_20_rows_floor_for_every_limb_width() {
        assert!(
            noise_max_rows() > 1 << 24,
            "noise budget {}",
            noise_max_rows()
        );
        for bits in 1..=MAX_LIMB_BITS {
            assert!(max_rows(bits) >= 1 << 20, "{bits} bits: {}", max_rows(bits));
        }
        assert!(max_rows(MAX_LIMB_BITS + 1) < 1 << 20);
    }

    #[test]
    fn std_dev_is_two_to_minus_62() {
        assert_eq!(NOISE_STD_DEV * 2f64.powi(64), 4.0);
    }
}
