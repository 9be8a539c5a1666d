//! The naive baseline: SUM of 1,000 values as tfhe `FheUint64`s with the default parameter set
//! (`PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128`, 128-bit security per Zama's estimate),
//! added on the "server" with the server key. Prints the time per addition and per value so
//! hedf's additive-GLWE `he_sum` can be compared with it.
//!
//! cargo run --release -p hedf-baseline [VALUES]

use std::time::Instant;

use tfhe::prelude::*;
use tfhe::{generate_keys, set_server_key, ConfigBuilder, FheUint64};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|v| v.parse().expect("VALUES must be a number"))
        .unwrap_or(1000);
    let started = Instant::now();
    let (client_key, server_key) = generate_keys(ConfigBuilder::default());
    println!("keygen: {:.1} s", started.elapsed().as_secs_f64());

    // Deterministic values like the engine bench's: DECIMAL(10, 1) as fixed-point integers.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let values: Vec<u64> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % 200_000
        })
        .collect();

    let started = Instant::now();
    let encrypted: Vec<FheUint64> = values
        .iter()
        .map(|v| FheUint64::encrypt(*v, &client_key))
        .collect();
    let encrypt = started.elapsed();
    let size = tfhe::safe_serialization::safe_serialized_size(&encrypted[0]).expect("serializable");

    set_server_key(server_key);
    let started = Instant::now();
    let sum = encrypted
        .iter()
        .skip(1)
        .fold(encrypted[0].clone(), |acc, v| acc + v);
    let add = started.elapsed();

    let decrypted: u64 = sum.decrypt(&client_key);
    let expected: u64 = values.iter().sum();
    assert_eq!(
        decrypted, expected,
        "FheUint64 sum differs from the plaintext sum"
    );
    println!(
        "FheUint64 sum of {n} values: {:.1} s ({:.3} s per addition), exact ({expected})",
        add.as_secs_f64(),
        add.as_secs_f64() / (n - 1) as f64
    );
    println!(
        "encrypt: {:.2} ms per value; ciphertext {size} bytes per value",
        encrypt.as_secs_f64() * 1e3 / n as f64
    );
}
