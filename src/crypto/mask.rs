//! Mask regeneration: the public half of a seeded GLWE ciphertext, rebuilt from its seed.
//!
//! A table segment draws one 128-bit seed from tfhe's seeder; all its columns and limbs share
//! the masks (common mask, see [`crate::crypto::slots`]). Chunk `c` (rows
//! `c*N .. (c+1)*N`) is a seeded GLWE ciphertext whose mask is the AES-CTR stream of that seed
//! from byte `c * N * 8` on: consecutive, non-overlapping windows of one stream, so no mask is
//! ever used twice. The stream is tfhe's own, the one its seeded-GLWE decompression draws (the
//! tests check both agree for random seeds and chunks, and pin it with a known answer), both
//! when a chunk is encrypted ([`crate::crypto::glwe`]) and whenever its mask is needed again.
//! It is read straight from tfhe-csprng's AES-128 block cipher (the one tfhe's default
//! generator wraps, with its key and counter layout for `SeedKind::Ctr`): the generator's
//! byte-at-a-time iterator made a chunk's mask cost 322 us; reading the blocks costs 10.5.

use tfhe::core_crypto::commons::math::random::{CompressionSeed, Seed};
use tfhe_csprng::generators::aes_ctr::{
    Aes128Key, AesBlockCipher, AesCtrParams, TableIndex, AES_CALLS_PER_BATCH, BYTES_PER_AES_CALL,
    BYTES_PER_BATCH,
};
use tfhe_csprng::generators::default::DefaultAes128BlockCipher;
use tfhe_csprng::seeders::SeedKind;

use crate::crypto::params::{GLWE_DIMENSION, POLYNOMIAL_SIZE};

/// Bytes of the AES-CTR stream one chunk's mask consumes (N uniform u64).
const CHUNK_STREAM_BYTES: u128 = (POLYNOMIAL_SIZE * 8) as u128;

/// tfhe's compression seed for chunk `chunk` of the segment seeded by `seed`.
pub fn chunk_compression_seed(seed: u128, chunk: u64) -> CompressionSeed {
    CompressionSeed::from(AesCtrParams {
        seed: SeedKind::Ctr(Seed(seed)),
        first_index: TableIndex::FIRST.increased(chunk as u128 * CHUNK_STREAM_BYTES),
    })
}

/// AES calls (16 bytes each) of one chunk's window of the stream.
const CALLS_PER_CHUNK: u128 = CHUNK_STREAM_BYTES / BYTES_PER_AES_CALL as u128;
// A chunk's window holds exactly one mask polynomial (k = 1; a larger k would make windows
// overlap), and whole batches of AES calls.
const _: () = assert!(GLWE_DIMENSION == 1);
const _: () = assert!((GLWE_DIMENSION * POLYNOMIAL_SIZE * 8).is_multiple_of(BYTES_PER_BATCH));

/// Regenerates chunk masks with reusable buffers.
pub struct MaskGenerator {
    /// The cipher keyed for the last seed asked for.
    cipher: Option<(u128, DefaultAes128BlockCipher)>,
    out: Vec<u64>,
}

impl Default for MaskGenerator {
    fn default() -> Self {
        MaskGenerator {
            cipher: None,
            out: vec![0; POLYNOMIAL_SIZE * GLWE_DIMENSION],
        }
    }
}

impl MaskGenerator {
    /// The N mask coefficients of chunk `chunk` under `seed`: the AES-CTR stream keyed by the
    /// seed (as tfhe keys `SeedKind::Ctr`) from AES index `chunk * N * 8 / 16`, read as
    /// little-endian u64s.
    pub fn generate(&mut self, seed: u128, chunk: u64) -> &[u64] {
        if self.cipher.as_ref().map(|(s, _)| *s) != Some(seed) {
            let key = Aes128Key::new(u128::from_le(seed));
            self.cipher = Some((seed, DefaultAes128BlockCipher::new(key)));
        }
        let (_, cipher) = self.cipher.as_mut().expect("keyed above");
        let first = chunk as u128 * CALLS_PER_CHUNK;
        for (batch, out) in self.out.chunks_exact_mut(BYTES_PER_BATCH / 8).enumerate() {
            let base = first + (batch * AES_CALLS_PER_BATCH) as u128;
            let bytes = cipher.generate_batch(std::array::from_fn(|i| {
                base.wrapping_add(i as u128).to_le()
            }));
            for (o, word) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            }
        }
        &self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use tfhe::core_crypto::commons::math::random::RandomGenerator;
    use tfhe::core_crypto::prelude::*;
    use tfhe::core_crypto::seeders::new_seeder;

    /// Known answer: stored tables hold only seeds, so a dependency bump that changed tfhe's
    /// mask stream would leave every stored table undecryptable. This fails first.
    #[test]
    fn the_mask_stream_is_the_one_stored_tables_were_encrypted_on() {
        let mut gen = MaskGenerator::default();
        let mut hash = Sha256::new();
        for chunk in [0, 1, 1 << 40] {
            for c in gen.generate(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210, chunk) {
                hash.update(c.to_le_bytes());
            }
        }
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "512c73cad6382964a0b477613e8c24daf105e0259dd0fb58994b23dc886c7eb0"
        );
    }

    /// The mask tfhe's own seeded-GLWE decompression gives for chunk `chunk` of `seed`.
    fn tfhe_mask(seed: u128, chunk: u64) -> Vec<u64> {
        let seeded = SeededGlweCiphertext::new(
            0u64,
            GlweSize(GLWE_DIMENSION + 1),
            PolynomialSize(POLYNOMIAL_SIZE),
            chunk_compression_seed(seed, chunk),
            CiphertextModulus::new_native(),
        );
        let mut out = GlweCiphertext::new(
            0u64,
            GlweSize(GLWE_DIMENSION + 1),
            PolynomialSize(POLYNOMIAL_SIZE),
            CiphertextModulus::new_native(),
        );
        decompress_seeded_glwe_ciphertext::<_, _, _, DefaultRandomGenerator>(&mut out, &seeded);
        out.as_ref()[..POLYNOMIAL_SIZE * GLWE_DIMENSION].to_vec()
    }

    /// The block-cipher read gives exactly tfhe's decompressed masks, for random seeds and
    /// chunks (the first, late ones, and the last a u64 chunk number can name).
    #[test]
    fn masks_are_the_ones_tfhe_decompresses() {
        let mut rng = RandomGenerator::<DefaultRandomGenerator>::new(new_seeder().seed());
        let mut gen = MaskGenerator::default();
        for _ in 0..8 {
            let seed: u128 = rng.random_uniform();
            for chunk in [0, 1, rng.random_uniform::<u64>() >> 20, u64::MAX] {
                assert_eq!(gen.generate(seed, chunk), &tfhe_mask(seed, chunk)[..]);
            }
        }
    }

    #[test]
    fn chunks_are_consecutive_disjoint_windows_of_one_stream() {
        let mut gen = MaskGenerator::default();
        let c0 = gen.generate(7, 0).to_vec();
        let c1 = gen.generate(7, 1).to_vec();
        let other_seed = gen.generate(8, 0).to_vec();
        assert_ne!(c0, c1);
        assert_ne!(c0, other_seed);
        // One polynomial twice as long, from the same seed, must be chunk 0 followed by chunk 1.
        let double = SeededGlweCiphertext::new(
            0u64,
            GlweSize(2),
            PolynomialSize(2 * POLYNOMIAL_SIZE),
            chunk_compression_seed(7, 0),
            CiphertextModulus::new_native(),
        );
        let mut out = GlweCiphertext::new(
            0u64,
            GlweSize(2),
            PolynomialSize(2 * POLYNOMIAL_SIZE),
            CiphertextModulus::new_native(),
        );
        decompress_seeded_glwe_ciphertext::<_, _, _, DefaultRandomGenerator>(&mut out, &double);
        let stream = &out.as_ref()[..2 * POLYNOMIAL_SIZE];
        assert_eq!(&stream[..POLYNOMIAL_SIZE], &c0[..]);
        assert_eq!(&stream[POLYNOMIAL_SIZE..], &c1[..]);
    }
}
