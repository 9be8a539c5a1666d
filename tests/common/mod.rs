//! Helpers shared by the integration tests.

/// Asserts that `out` reproduces all 56 rows of numbers the seed's README printed for its three
/// aggregations, digit for digit.
pub fn assert_seed_rows_reproduced(out: &str) {
    let seed = include_str!("../fixtures/seed_readme.txt");
    let number = |s: &str| -> Vec<String> {
        s.split_whitespace()
            .filter(|w| w.contains('.') && w.parse::<f64>().is_ok())
            .map(String::from)
            .collect()
    };
    let start = seed.find("aggregate by area and decrypt:").unwrap();
    let end = seed.find("aggregate with invalid param:").unwrap();
    let want: Vec<Vec<String>> = seed[start..end]
        .lines()
        .map(number)
        .filter(|v| v.len() == 5)
        .collect();
    assert_eq!(want.len(), 56);
    let lines: Vec<Vec<String>> = out.lines().map(number).collect();
    for row in &want {
        assert!(
            lines
                .iter()
                .any(|l| l.windows(5).any(|w| w == row.as_slice())),
            "seed row {row:?} missing from:\n{out}"
        );
    }
}
