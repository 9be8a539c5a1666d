//! Exact negacyclic products of a 64-bit mask polynomial with small-integer polynomials,
//! through tfhe's f64 FFT.
//!
//! tfhe's f64 FFT would lose the low bits of a 64-bit product, so the mask is split into three
//! 22-bit digits. The f64 FFT's rounding error grows with the factors' Euclidean norms:
//! about `|digit|_2 * |small|_2 * 2^-53 * log2(N)`, at most `2^28 * 2^14 * 2^-53 * 12`, under
//! 2^-7, for a small factor whose coefficients' absolute values sum to at most
//! [`MAX_SMALL_L1`] = 2^14 (binary keys: 2^12), so every coefficient (below 2^36) rounds to the
//! exact integer; the three products
//! are shifted back together with wrapping arithmetic, which is exact mod 2^64. The digits'
//! forward transforms are computed once per mask and shared by every product with it.
//! Encryption multiplies by binary keys ([`crate::crypto::glwe`]); he_sum by a group's row
//! weights, to add many rows' masks of one chunk at once (`udaf::accumulator`). Tests check
//! both against tfhe's Karatsuba.

use tfhe::core_crypto::fft_impl::fft64::math::fft::Fft;
use tfhe::core_crypto::fft_impl::fft64::math::polynomial::FourierPolynomialOwned;
use tfhe::core_crypto::prelude::*;

use crate::crypto::keys::wipe;
use crate::crypto::params::POLYNOMIAL_SIZE;

/// The mask is split into digits of this many bits ("digits", not "limbs": limbs are the
/// parts a wide measure value is split into, see `encoding`).
const DIGIT_BITS: u32 = 22;
const DIGITS: usize = 64_u32.div_ceil(DIGIT_BITS) as usize;
/// The largest sum of |coefficient| of a small factor (see the module comment).
pub const MAX_SMALL_L1: u64 = 1 << 14;

/// A mask's digit transforms and the scratch to multiply them.
pub struct MaskProduct {
    fft: Fft,
    buffers: ComputationBuffers,
    digit: Vec<u64>,
    digits: Vec<FourierPolynomialOwned>,
    small: FourierPolynomialOwned,
    fourier: FourierPolynomialOwned,
    product: Vec<u64>,
}

impl Default for MaskProduct {
    fn default() -> Self {
        let size = PolynomialSize(POLYNOMIAL_SIZE);
        let fft = Fft::new(size);
        let mut buffers = ComputationBuffers::new();
        let view = fft.as_view();
        buffers.resize(
            view.forward_scratch()
                .or(view.backward_scratch())
                .unaligned_bytes_required(),
        );
        MaskProduct {
            fft,
            buffers,
            digit: vec![0; POLYNOMIAL_SIZE],
            digits: (0..DIGITS)
                .map(|_| FourierPolynomialOwned::new(size))
                .collect(),
            small: FourierPolynomialOwned::new(size),
            fourier: FourierPolynomialOwned::new(size),
            product: vec![0; POLYNOMIAL_SIZE],
        }
    }
}

impl Drop for MaskProduct {
    /// A product with a secret key is secret (`a * s` with a public `a` gives `s` away).
    fn drop(&mut self) {
        wipe(&mut self.product);
        wipe(&mut self.fourier.data);
        wipe(&mut self.small.data);
    }
}

impl MaskProduct {
    /// The transform of a small polynomial (coefficients read as i64), scaled by 2^-64 so that
    /// the backward transform "as torus" (which multiplies by 2^64 and wraps) returns the
    /// integer product.
    pub fn transform(&mut self, small: &[u64]) -> FourierPolynomialOwned {
        let mut out = FourierPolynomialOwned::new(PolynomialSize(POLYNOMIAL_SIZE));
        self.transform_into(small, &mut out);
        out
    }

    fn transform_into(&mut self, small: &[u64], out: &mut FourierPolynomialOwned) {
        self.fft.as_view().forward_as_integer(
            out.as_mut_view(),
            Polynomial::from_container(small),
            self.buffers.stack(),
        );
        let scale = (-64f64).exp2();
        for c in out.data.iter_mut() {
            *c *= scale;
        }
    }

    /// Makes `mask` the polynomial later products multiply.
    pub fn set_mask(&mut self, mask: &[u64]) {
        let fft = self.fft.as_view();
        for (d, fourier) in self.digits.iter_mut().enumerate() {
            let shift = d as u32 * DIGIT_BITS;
            for (x, m) in self.digit.iter_mut().zip(mask) {
                *x = (m >> shift) & ((1 << DIGIT_BITS) - 1);
            }
            fft.forward_as_integer(
                fourier.as_mut_view(),
                Polynomial::from_container(&*self.digit),
                self.buffers.stack(),
            );
        }
    }

    /// Adds mask * small (negacyclic, mod 2^64) to `acc`, exactly, for a small polynomial
    /// (coefficients read as i64) whose |coefficients| sum to at most [`MAX_SMALL_L1`].
    pub fn add_product(&mut self, small: &[u64], acc: &mut [u64]) {
        let mut fourier = std::mem::replace(
            &mut self.small,
            FourierPolynomialOwned::new(PolynomialSize(0)),
        );
        self.transform_into(small, &mut fourier);
        self.add_product_transformed(&fourier, acc);
        self.small = fourier;
    }

    /// [`Self::add_product`] with the small factor already [`Self::transform`]ed.
    pub fn add_product_transformed(&mut self, small: &FourierPolynomialOwned, acc: &mut [u64]) {
        let fft = self.fft.as_view();
        for (d, digit) in self.digits.iter().enumerate() {
            for ((c, x), k) in self
                .fourier
                .data
                .iter_mut()
                .zip(digit.data.iter())
                .zip(small.data.iter())
            {
                *c = *x * *k;
            }
            fft.backward_as_torus(
                Polynomial::from_container(&mut *self.product),
                self.fourier.as_view(),
                self.buffers.stack(),
            );
            let shift = d as u32 * DIGIT_BITS;
            for (a, p) in acc.iter_mut().zip(self.product.iter()) {
                *a = a.wrapping_add(p.wrapping_shl(shift));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfhe::core_crypto::algorithms::polynomial_algorithms::polynomial_wrapping_add_mul_assign;
    use tfhe::core_crypto::commons::math::random::RandomGenerator;
    use tfhe::core_crypto::seeders::new_seeder;

    fn karatsuba(mask: &[u64], small: &[u64]) -> Vec<u64> {
        let mut exact = Polynomial::new(0u64, PolynomialSize(POLYNOMIAL_SIZE));
        polynomial_wrapping_add_mul_assign(
            &mut exact,
            &Polynomial::from_container(mask),
            &Polynomial::from_container(small),
        );
        exact.as_ref().to_vec()
    }

    /// The FFT product equals tfhe's Karatsuba for uniform and all-ones masks and small
    /// factors of every shape allowed: binary, signed, and at the L1 limit concentrated in
    /// one coefficient or spread over all, of both signs.
    #[test]
    fn products_with_small_polynomials_equal_tfhes_karatsuba_exactly() {
        let n = POLYNOMIAL_SIZE;
        let mut rng = RandomGenerator::<DefaultRandomGenerator>::new(new_seeder().seed());
        let mut product = MaskProduct::default();
        let limit = MAX_SMALL_L1 as i64;
        let spread = limit / n as i64;
        let mut binary = vec![0u64; n];
        rng.fill_slice_with_random_uniform_binary(&mut binary);
        let mut signed = vec![0u64; n];
        for (i, s) in signed.iter_mut().enumerate() {
            *s = ((i as i64 % 9) - 4) as u64;
        }
        let mut one = vec![0u64; n];
        one[n / 3] = (-limit) as u64;
        let smalls = [
            vec![1u64; n],
            binary,
            signed,
            one,
            vec![spread as u64; n],
            vec![(-spread) as u64; n],
        ];
        for trial in 0..3 {
            let mut mask = vec![u64::MAX; n];
            if trial > 0 {
                rng.fill_slice_with_random_uniform(&mut mask);
            }
            product.set_mask(&mask);
            for (i, small) in smalls.iter().enumerate() {
                let l1: u64 = small.iter().map(|&c| (c as i64).unsigned_abs()).sum();
                assert!(l1 <= MAX_SMALL_L1, "case {i}: {l1}");
                let mut fast = vec![0u64; n];
                product.add_product(small, &mut fast);
                assert_eq!(fast, karatsuba(&mask, small), "trial {trial}, case {i}");
            }
        }
    }
}
