//! Common-mask GLWE encryption of one chunk, assembled from tfhe's parts so the mask-times-key
//! products can go through tfhe's FFT instead of its Karatsuba multiplication (43% of the CPU
//! time of `hedf encrypt`, measured with perf).
//!
//! For every body slot `s` the result is what tfhe's `encrypt_seeded_glwe_ciphertext` computes
//! under slot key `s`, all on one mask: body_s = mask * key_s + plaintext_s + noise_s (mod X^N + 1,
//! mod 2^64), the common-mask GLWE of tfhe's `core_crypto::experimental`
//! (`encrypt_cm_glwe_ciphertext`; see [`crate::crypto::slots`] for why sharing is sound). Every
//! part comes from tfhe: the mask is tfhe's seeded AES-CTR stream, which [`MaskGenerator`]
//! reads from tfhe-csprng's block cipher exactly as tfhe's decompression would (tested equal);
//! each body's noise is tfhe's Gaussian sampler on a
//! `RandomGenerator` seeded by tfhe's seeder; the products use tfhe's FFT.
//!
//! tfhe's f64 FFT would lose the low bits of a 64-bit product (2^20 and more, against a delta of
//! 2^18), so the mask is split into three 22-bit digits: each digit times a binary key has
//! coefficients below 2^34, which an f64 FFT of size 4096 yields exactly after rounding; the
//! three products are shifted back together with wrapping arithmetic, which is exact mod 2^64.
//! The digits' forward transforms are shared by all slots: a chunk costs 3 forward and
//! 3 x slots backward transforms. A test checks the product against tfhe's Karatsuba.

use tfhe::core_crypto::commons::math::random::RandomGenerator;
use tfhe::core_crypto::fft_impl::fft64::math::fft::Fft;
use tfhe::core_crypto::fft_impl::fft64::math::polynomial::FourierPolynomialOwned;
use tfhe::core_crypto::prelude::*;
use tfhe::core_crypto::seeders::new_seeder;

use crate::crypto::mask::MaskGenerator;
use crate::crypto::params::{NOISE_STD_DEV, POLYNOMIAL_SIZE};

/// The mask is split into digits of this many bits for the FFT product ("digits", not
/// "limbs": limbs are the parts a wide measure value is split into, see `encoding`).
const DIGIT_BITS: u32 = 22;
const DIGITS: usize = 64_u32.div_ceil(DIGIT_BITS) as usize;

/// The slot keys in the Fourier domain, scaled by 2^-64 so that tfhe's backward transform "as
/// torus" (which multiplies by 2^64 and wraps) returns the integer product. Shared by threads.
pub struct FourierKeys {
    fft: Fft,
    keys: Vec<FourierPolynomialOwned>,
}

impl FourierKeys {
    /// `keys`: one GLWE secret key per body slot, in slot order.
    pub fn new(keys: &[GlweSecretKeyOwned<u64>]) -> Self {
        let size = PolynomialSize(POLYNOMIAL_SIZE);
        let fft = Fft::new(size);
        let mut buffers = ComputationBuffers::new();
        buffers.resize(fft.as_view().forward_scratch().unaligned_bytes_required());
        let scale = (-64f64).exp2();
        let keys = keys
            .iter()
            .map(|k| {
                let mut key = FourierPolynomialOwned::new(size);
                fft.as_view().forward_as_integer(
                    key.as_mut_view(),
                    Polynomial::from_container(k.as_ref()),
                    buffers.stack(),
                );
                for c in key.data.iter_mut() {
                    *c *= scale;
                }
                key
            })
            .collect();
        FourierKeys { fft, keys }
    }

    pub fn slots(&self) -> usize {
        self.keys.len()
    }
}

/// Per-thread buffers for [`ChunkEncryptor::encrypt`].
pub struct ChunkEncryptor<'k> {
    keys: &'k FourierKeys,
    masks: MaskGenerator,
    buffers: ComputationBuffers,
    digit: Vec<u64>,
    product: Vec<u64>,
    body: Vec<u64>,
    digits: Vec<FourierPolynomialOwned>,
    fourier: FourierPolynomialOwned,
    noise: RandomGenerator<DefaultRandomGenerator>,
}

impl<'k> ChunkEncryptor<'k> {
    pub fn new(keys: &'k FourierKeys) -> Self {
        let fft = keys.fft.as_view();
        let mut buffers = ComputationBuffers::new();
        buffers.resize(
            fft.forward_scratch()
                .or(fft.backward_scratch())
                .unaligned_bytes_required(),
        );
        let size = PolynomialSize(POLYNOMIAL_SIZE);
        ChunkEncryptor {
            keys,
            masks: MaskGenerator::default(),
            buffers,
            digit: vec![0; POLYNOMIAL_SIZE],
            product: vec![0; POLYNOMIAL_SIZE],
            body: vec![0; POLYNOMIAL_SIZE],
            digits: (0..DIGITS)
                .map(|_| FourierPolynomialOwned::new(size))
                .collect(),
            fourier: FourierPolynomialOwned::new(size),
            // Seeded from tfhe's seeder, as tfhe seeds the noise of each encryption.
            noise: RandomGenerator::new(new_seeder().seed()),
        }
    }

    /// Encrypts chunk `chunk` of the mask stream `seed`: `plaintexts` holds the chunk's rows
    /// (at most N) with one already-scaled plaintext per slot each, row-major; `out` (same
    /// shape) receives the bodies. Rows past the input encrypt 0 and are not returned.
    pub fn encrypt(&mut self, seed: u128, chunk: u64, plaintexts: &[u64], out: &mut [u64]) {
        let slots = self.keys.slots();
        debug_assert_eq!(plaintexts.len(), out.len());
        let mask = self.masks.generate(seed, chunk);
        forward_digits(
            self.keys,
            mask,
            &mut self.digit,
            &mut self.digits,
            &mut self.buffers,
        );
        let noise = DynamicDistribution::new_gaussian_from_std_dev(StandardDev(NOISE_STD_DEV));
        for slot in 0..slots {
            let body = &mut self.body;
            self.noise
                .fill_slice_with_random_from_distribution_custom_mod(
                    body,
                    noise,
                    CiphertextModulus::new_native(),
                );
            for (b, p) in body
                .iter_mut()
                .zip(plaintexts.iter().skip(slot).step_by(slots))
            {
                *b = b.wrapping_add(*p);
            }
            add_products(
                self.keys,
                slot,
                &self.digits,
                &mut self.fourier,
                &mut self.product,
                &mut self.buffers,
                body,
            );
            for (o, b) in out.iter_mut().skip(slot).step_by(slots).zip(body.iter()) {
                *o = *b;
            }
        }
    }
}

/// The forward transforms of the mask's digits.
fn forward_digits(
    keys: &FourierKeys,
    mask: &[u64],
    digit: &mut [u64],
    digits: &mut [FourierPolynomialOwned],
    buffers: &mut ComputationBuffers,
) {
    let fft = keys.fft.as_view();
    for (d, fourier) in digits.iter_mut().enumerate() {
        let shift = d as u32 * DIGIT_BITS;
        for (x, m) in digit.iter_mut().zip(mask) {
            *x = (m >> shift) & ((1 << DIGIT_BITS) - 1);
        }
        fft.forward_as_integer(
            fourier.as_mut_view(),
            Polynomial::from_container(&*digit),
            buffers.stack(),
        );
    }
}

/// Adds mask * key_slot (negacyclic, mod 2^64) to `acc`, exactly, digit by digit.
fn add_products(
    keys: &FourierKeys,
    slot: usize,
    digits: &[FourierPolynomialOwned],
    fourier: &mut FourierPolynomialOwned,
    product: &mut [u64],
    buffers: &mut ComputationBuffers,
    acc: &mut [u64],
) {
    let fft = keys.fft.as_view();
    let key = &keys.keys[slot];
    for (d, digit) in digits.iter().enumerate() {
        for ((c, x), k) in fourier
            .data
            .iter_mut()
            .zip(digit.data.iter())
            .zip(key.data.iter())
        {
            *c = *x * *k;
        }
        fft.backward_as_torus(
            Polynomial::from_container(&mut *product),
            fourier.as_view(),
            buffers.stack(),
        );
        let shift = d as u32 * DIGIT_BITS;
        for (a, p) in acc.iter_mut().zip(product.iter()) {
            *a = a.wrapping_add(p.wrapping_shl(shift));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfhe::core_crypto::algorithms::polynomial_algorithms::polynomial_wrapping_add_mul_assign;

    /// The FFT route equals tfhe's Karatsuba product coefficient for coefficient, for random
    /// binary keys and uniform masks, including the all-ones extremes, for every slot.
    #[test]
    fn fft_product_equals_tfhes_karatsuba_exactly() {
        let mut rng = RandomGenerator::<DefaultRandomGenerator>::new(new_seeder().seed());
        for trial in 0..8 {
            let mut keys = vec![vec![0u64; POLYNOMIAL_SIZE]; 2];
            let mut mask = vec![0u64; POLYNOMIAL_SIZE];
            if trial == 0 {
                keys[0].fill(1);
                mask.fill(u64::MAX);
            } else {
                rng.fill_slice_with_random_uniform(&mut mask);
            }
            rng.fill_slice_with_random_uniform_binary(&mut keys[1]);
            let glwe: Vec<_> = keys
                .iter()
                .map(|k| {
                    GlweSecretKeyOwned::from_container(k.clone(), PolynomialSize(POLYNOMIAL_SIZE))
                })
                .collect();
            let fourier = FourierKeys::new(&glwe);
            let mut enc = ChunkEncryptor::new(&fourier);
            forward_digits(
                &fourier,
                &mask,
                &mut enc.digit,
                &mut enc.digits,
                &mut enc.buffers,
            );
            for (slot, bits) in keys.iter().enumerate() {
                let mut fast = vec![0u64; POLYNOMIAL_SIZE];
                add_products(
                    &fourier,
                    slot,
                    &enc.digits,
                    &mut enc.fourier,
                    &mut enc.product,
                    &mut enc.buffers,
                    &mut fast,
                );
                let mut exact = Polynomial::new(0u64, PolynomialSize(POLYNOMIAL_SIZE));
                polynomial_wrapping_add_mul_assign(
                    &mut exact,
                    &Polynomial::from_container(mask.as_slice()),
                    &Polynomial::from_container(bits.as_slice()),
                );
                assert_eq!(fast, exact.as_ref(), "trial {trial}, slot {slot}");
            }
        }
    }
}
