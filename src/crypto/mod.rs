//! Client-side cryptography: everything that touches the secret key or the byte layouts of
//! ciphertexts, on tfhe and arrow alone (no DataFusion, tokio or tonic), so a client can be
//! built without the engine (`cargo build --no-default-features`).
//!
//! [`params`] names the tfhe parameter set and derives the exact-sum budget; [`keys`] holds
//! the secret key; [`encoding`] turns decimals into fixed-point limbs; [`cell`] defines the
//! byte layouts and field metadata; [`slots`] numbers the bodies that share a common mask;
//! [`mask`] regenerates public masks from seeds; [`mask_sum`] lays out a group's mask sum;
//! [`product`] multiplies a mask by small
//! polynomials exactly; [`glwe`] encrypts one chunk; [`client`]
//! encrypts Arrow batches and decrypts results; [`answer`] sends a row's shared mask sum once.

pub mod answer;
pub mod cell;
pub mod client;
pub mod encoding;
pub mod glwe;
pub mod keys;
pub mod mask;
pub mod mask_sum;
pub mod params;
pub mod product;
pub mod slots;
