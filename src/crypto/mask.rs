//! Mask regeneration: the public half of a seeded GLWE ciphertext, rebuilt from its seed.
//!
//! A table segment draws one 128-bit seed from tfhe's seeder; all its columns and limbs share
//! the masks (common mask, see [`crate::crypto::slots`]). Chunk `c` (rows
//! `c*N .. (c+1)*N`) is a seeded GLWE ciphertext whose mask is the AES-CTR stream of that seed
//! from byte `c * N * 8` on: consecutive, non-overlapping windows of one stream, so no mask is
//! ever used twice. The stream comes from tfhe's own seeded-GLWE decompression, both when a
//! chunk is encrypted ([`crate::crypto::glwe`]) and whenever its mask is needed again.

use tfhe::core_crypto::commons::math::random::{CompressionSeed, Seed};
use tfhe::core_crypto::prelude::*;
use tfhe_csprng::generators::aes_ctr::{AesCtrParams, TableIndex};
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

/// Regenerates chunk masks with reusable buffers.
pub struct MaskGenerator {
    seeded: Option<SeededGlweCiphertextOwned<u64>>,
    out: GlweCiphertextOwned<u64>,
}

impl Default for MaskGenerator {
    fn default() -> Self {
        MaskGenerator {
            seeded: Some(SeededGlweCiphertext::new(
                0u64,
                GlweSize(GLWE_DIMENSION + 1),
                PolynomialSize(POLYNOMIAL_SIZE),
                chunk_compression_seed(0, 0),
                CiphertextModulus::new_native(),
            )),
            out: GlweCiphertext::new(
                0u64,
                GlweSize(GLWE_DIMENSION + 1),
                PolynomialSize(POLYNOMIAL_SIZE),
                CiphertextModulus::new_native(),
            ),
        }
    }
}

impl MaskGenerator {
    /// The N mask coefficients of chunk `chunk` under `seed`.
    pub fn generate(&mut self, seed: u128, chunk: u64) -> &[u64] {
        let container = self.seeded.take().expect("buffer present").into_container();
        let seeded = SeededGlweCiphertext::from_container(
            container,
            GlweSize(GLWE_DIMENSION + 1),
            chunk_compression_seed(seed, chunk),
            CiphertextModulus::new_native(),
        );
        decompress_seeded_glwe_ciphertext::<_, _, _, DefaultRandomGenerator>(
            &mut self.out,
            &seeded,
        );
        self.seeded = Some(seeded);
        &self.out.as_ref()[..POLYNOMIAL_SIZE * GLWE_DIMENSION]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

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
