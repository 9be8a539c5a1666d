//! The he_sum group accumulator: per group, a row count, the limb body sums and one mask sum
//! (N coefficients) that all limbs share, since they share their rows' common mask. Adds are
//! wrapping u64 on the torus; nothing here needs a key.
//!
//! Row `j` of a chunk with mask polynomial `a` is the LWE sample extracted at position `j`, whose mask
//! is `v_j[i] = w[j - i]` with `w[t] = a[t]` for `t >= 0` and `w[t] = -a[N + t]` for `t < 0`.
//! With `R` the reversed prefix sums of `w` (built once per chunk, O(N)), a run of consecutive
//! positions `j0..=j1` of one group adds `R[N-1-j1+i] - R[N-j0+i]` to coefficient `i`: O(N) for the
//! whole run, however long. Clustered data costs O(N) per chunk; scattered rows O(N) per row,
//! with a chunk's rows sorted by (group, position) and each group's rows added 64 coefficients at a
//! time, so its accumulator is read and written once per chunk.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, LargeBinaryArray, LargeBinaryBuilder};
use datafusion::error::Result;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};

use crate::crypto::cell::{write_sum, CellRef, ColumnCrypto, SumRef};
use crate::crypto::mask::MaskGenerator;
use crate::crypto::params::POLYNOMIAL_SIZE as N;
use crate::error::HedfError;

/// State tag of a single cell sent as partial state (cheap `convert_to_state`).
const CELL_STATE_TAG: &[u8; 4] = b"HCEL";
/// Chunk tables kept; rows arrive in chunk order, so a few suffice.
const CACHED_CHUNKS: usize = 4;

/// What one chunk contributes, precomputed once per (seed, chunk):
/// `prefix` (2N+1, reversed prefix sums of `w`) for runs, `single` (2N, `w` reversed) for
/// lone rows, which then cost one load per coefficient instead of two.
struct ChunkTables {
    seed: u128,
    chunk: u64,
    prefix: Vec<u64>,
    single: Vec<u64>,
}

/// Chunk tables keyed by (seed, chunk). Rows arrive in chunk order, so a few entries suffice.
struct ChunkCache {
    masks: MaskGenerator,
    entries: Vec<ChunkTables>,
    next_victim: usize,
}

impl ChunkCache {
    fn new() -> Self {
        ChunkCache {
            masks: MaskGenerator::default(),
            entries: Vec::new(),
            next_victim: 0,
        }
    }

    fn get(&mut self, seed: u128, chunk: u64) -> &ChunkTables {
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.seed == seed && e.chunk == chunk)
        {
            return &self.entries[i];
        }
        let slot = if self.entries.len() < CACHED_CHUNKS {
            self.entries.push(ChunkTables {
                seed,
                chunk,
                prefix: vec![0; 2 * N + 1],
                single: vec![0; 2 * N],
            });
            self.entries.len() - 1
        } else {
            self.next_victim = (self.next_victim + 1) % CACHED_CHUNKS;
            self.next_victim
        };
        let a = self.masks.generate(seed, chunk);
        let t = &mut self.entries[slot];
        (t.seed, t.chunk) = (seed, chunk);
        // w[k - N] for k in 0..2N; prefix[m] = P[2N - m] with P[k+1] = P[k] + w[k - N];
        // single[m] = w[N - 1 - m] = prefix[m] - prefix[m + 1].
        t.prefix[2 * N] = 0;
        let mut acc = 0u64;
        for k in 0..2 * N {
            let w = if k < N { a[k].wrapping_neg() } else { a[k - N] };
            acc = acc.wrapping_add(w);
            t.prefix[2 * N - (k + 1)] = acc;
            t.single[2 * N - 1 - k] = w;
        }
        &self.entries[slot]
    }
}

/// Coefficients of a group's accumulator kept in registers while its rows are added.
const TILE: usize = 64;

/// One group's rows in one chunk: lone rows as offsets into `ChunkTables::single`, runs as
/// (hi, lo) offsets into `ChunkTables::prefix`.
#[derive(Default)]
struct Windows {
    singles: Vec<usize>,
    runs: Vec<(usize, usize)>,
}

/// Adds every window to `acc`, one tile at a time, so the accumulator is read and written once
/// per group and chunk however many rows the group has there.
#[inline(always)]
fn add_windows_generic(acc: &mut [u64], w: &Windows, single: &[u64], prefix: &[u64]) {
    for (t, out) in acc.chunks_exact_mut(TILE).enumerate() {
        let base = t * TILE;
        let mut tile = [0u64; TILE];
        tile.copy_from_slice(out);
        for &o in &w.singles {
            let x = &single[o + base..o + base + TILE];
            for i in 0..TILE {
                tile[i] = tile[i].wrapping_add(x[i]);
            }
        }
        for &(h, l) in &w.runs {
            let (hi, lo) = (
                &prefix[h + base..h + base + TILE],
                &prefix[l + base..l + base + TILE],
            );
            for i in 0..TILE {
                tile[i] = tile[i].wrapping_add(hi[i].wrapping_sub(lo[i]));
            }
        }
        out.copy_from_slice(&tile);
    }
}

#[inline(always)]
fn add_generic(acc: &mut [u64], x: &[u64]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a = a.wrapping_add(v);
    }
}

/// The hot path's kernels, compiled for the best instruction set present.
#[derive(Clone, Copy)]
struct Kernels {
    /// The instruction set, for tests and benchmarks.
    #[cfg_attr(not(test), allow(dead_code))]
    name: &'static str,
    add_windows: fn(&mut [u64], &Windows, &[u64], &[u64]),
    add: fn(&mut [u64], &[u64]),
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Windows;

    #[target_feature(enable = "avx2")]
    fn add_windows_avx2(acc: &mut [u64], w: &Windows, single: &[u64], prefix: &[u64]) {
        super::add_windows_generic(acc, w, single, prefix)
    }
    #[target_feature(enable = "avx2")]
    fn add_avx2(acc: &mut [u64], x: &[u64]) {
        super::add_generic(acc, x)
    }
    #[target_feature(enable = "avx512f")]
    fn add_windows_avx512(acc: &mut [u64], w: &Windows, single: &[u64], prefix: &[u64]) {
        super::add_windows_generic(acc, w, single, prefix)
    }
    #[target_feature(enable = "avx512f")]
    fn add_avx512(acc: &mut [u64], x: &[u64]) {
        super::add_generic(acc, x)
    }

    /// The kernels compiled for each instruction set this CPU has, best first.
    pub(super) fn available() -> Vec<super::Kernels> {
        let mut levels = Vec::new();
        if std::arch::is_x86_feature_detected!("avx512f") {
            levels.push(super::Kernels {
                name: "avx512",
                // SAFETY: selected only after the line above found AVX-512F on this CPU, the
                // one requirement of these `target_feature` functions.
                add_windows: |a, w, s, p| unsafe { add_windows_avx512(a, w, s, p) },
                // SAFETY: as above.
                add: |a, x| unsafe { add_avx512(a, x) },
            });
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            levels.push(super::Kernels {
                name: "avx2",
                // SAFETY: selected only after the line above found AVX2 on this CPU, the one
                // requirement of these `target_feature` functions.
                add_windows: |a, w, s, p| unsafe { add_windows_avx2(a, w, s, p) },
                // SAFETY: as above.
                add: |a, x| unsafe { add_avx2(a, x) },
            });
        }
        levels
    }
}

impl Kernels {
    const GENERIC: Kernels = Kernels {
        name: "generic",
        add_windows: add_windows_generic,
        add: add_generic,
    };

    /// Every kernel level this CPU can run, best first, the portable one last.
    fn available() -> Vec<Kernels> {
        #[cfg(target_arch = "x86_64")]
        let mut levels = x86::available();
        #[cfg(not(target_arch = "x86_64"))]
        let mut levels = Vec::new();
        levels.push(Kernels::GENERIC);
        levels
    }

    fn detect() -> Self {
        Self::available()[0]
    }
}

/// Bits of a sort key that hold the slot; the group index takes the bits above.
const SLOT_BITS: u32 = N.trailing_zeros();

/// he_sum's per-partition state for any number of groups (a `GroupsAccumulator`).
pub struct HeSumGroupsAccumulator {
    column: String,
    crypto: ColumnCrypto,
    limbs: usize,
    counts: Vec<u64>,
    bodies: Vec<u64>,
    masks: Vec<u64>,
    chunks: ChunkCache,
    kernels: Kernels,
    /// Scratch: sort keys (group << SLOT_BITS | slot) of one chunk's rows in a batch.
    keys: Vec<u64>,
    /// Scratch: one group's windows in the chunk being added.
    windows: Windows,
}

impl std::fmt::Debug for HeSumGroupsAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeSumGroupsAccumulator")
            .field("column", &self.column)
            .field("groups", &self.counts.len())
            .finish()
    }
}

impl HeSumGroupsAccumulator {
    pub fn new(column: String, crypto: ColumnCrypto) -> Self {
        HeSumGroupsAccumulator {
            column,
            limbs: crypto.spec.limbs as usize,
            crypto,
            counts: Vec::new(),
            bodies: Vec::new(),
            masks: Vec::new(),
            chunks: ChunkCache::new(),
            kernels: Kernels::detect(),
            keys: Vec::new(),
            windows: Windows::default(),
        }
    }

    /// Makes room for `groups` groups (new ones start empty).
    pub(crate) fn resize(&mut self, groups: usize) {
        self.counts.resize(groups, 0);
        self.bodies.resize(groups * self.limbs, 0);
        self.masks.resize(groups * N, 0);
    }

    /// Adds the masks of the rows in `self.keys` (all in chunk `chunk` of the mask stream
    /// `seed`) to their groups. Sorting by (group, slot) turns interleaved rows into runs and
    /// keeps one group's accumulator hot while its rows are added.
    fn add_chunk_rows(&mut self, seed: &[u8], chunk: u64) {
        self.keys.sort_unstable();
        let slot_mask = (1u64 << SLOT_BITS) - 1;
        let seed = u128::from_le_bytes(seed.try_into().expect("16-byte seed"));
        {
            let tables = self.chunks.get(seed, chunk);
            let mut i = 0;
            while i < self.keys.len() {
                let group = (self.keys[i] >> SLOT_BITS) as usize;
                self.windows.singles.clear();
                self.windows.runs.clear();
                while i < self.keys.len() && (self.keys[i] >> SLOT_BITS) as usize == group {
                    let first = self.keys[i];
                    let mut last = first;
                    while i + 1 < self.keys.len()
                        && self.keys[i + 1] == last + 1
                        && last & slot_mask != slot_mask
                    {
                        i += 1;
                        last += 1;
                    }
                    i += 1;
                    let (j0, j1) = ((first & slot_mask) as usize, (last & slot_mask) as usize);
                    if j0 == j1 {
                        self.windows.singles.push(N - 1 - j0);
                    } else {
                        self.windows.runs.push((N - 1 - j1, N - j0));
                    }
                }
                let at = group * N;
                (self.kernels.add_windows)(
                    &mut self.masks[at..at + N],
                    &self.windows,
                    &tables.single,
                    &tables.prefix,
                );
            }
        }
        self.keys.clear();
    }

    /// Accumulates the valid cells of `array` (row i into group `groups[i]`).
    fn add_cells(
        &mut self,
        array: &arrow::array::FixedSizeBinaryArray,
        groups: &[usize],
        filter: Option<&BooleanArray>,
    ) -> Result<()> {
        let width = self.crypto.cell_width();
        if array.value_length() as usize != width {
            return Err(HedfError::Malformed(format!(
                "he_sum({}) got {}-byte cells, expected {width}",
                self.column,
                array.value_length()
            ))
            .into());
        }
        let cells = array.value_data();
        // The chunk whose rows are being collected: (its seeds, as a cell holds them; chunk).
        let mut current: Option<(&[u8], u64)> = None;
        for (i, &group) in groups.iter().enumerate() {
            if array.is_null(i) || filter.is_some_and(|f| !f.is_valid(i) || !f.value(i)) {
                continue;
            }
            let cell = CellRef::parse(&cells[i * width..(i + 1) * width], &self.crypto)?;
            self.counts[group] += 1;
            for limb in 0..self.limbs {
                let b = &mut self.bodies[group * self.limbs + limb];
                *b = b.wrapping_add(cell.body(limb));
            }
            let (row, chunk) = (cell.row(), cell.row() / N as u64);
            if let Some((seeds, c)) = current {
                if c != chunk || cell.seed_bytes() != seeds {
                    self.add_chunk_rows(seeds, c);
                    current = None;
                }
            }
            current.get_or_insert((cell.seed_bytes(), chunk));
            self.keys
                .push(((group as u64) << SLOT_BITS) | (row % N as u64));
        }
        if let Some((seeds, c)) = current {
            self.add_chunk_rows(seeds, c);
        }
        Ok(())
    }

    fn merge_sum(&mut self, sum: &SumRef<'_>, group: usize) -> Result<()> {
        if sum.crypto != self.crypto {
            return Err(if sum.crypto.key_id != self.crypto.key_id {
                HedfError::MixedKeys {
                    first: self.crypto.key_id.to_string(),
                    second: sum.crypto.key_id.to_string(),
                }
            } else {
                HedfError::Malformed(format!(
                    "he_sum({}) state has a different encoding",
                    self.column
                ))
            }
            .into());
        }
        self.counts[group] += sum.count;
        for limb in 0..self.limbs {
            let b = &mut self.bodies[group * self.limbs + limb];
            *b = b.wrapping_add(sum.body(limb));
        }
        let mask: Vec<u64> = sum.mask().collect();
        (self.kernels.add)(&mut self.masks[group * N..(group + 1) * N], &mask);
        Ok(())
    }

    /// Emits sums (or partial states) for the groups `emit_to` names and forgets them.
    fn emit(&mut self, emit_to: EmitTo, check_budget: bool) -> Result<ArrayRef> {
        let counts = emit_to.take_needed(&mut self.counts);
        let n = counts.len();
        let bodies: Vec<u64> = self.bodies.drain(..n * self.limbs).collect();
        let masks: Vec<u64> = self.masks.drain(..n * N).collect();
        let max_rows = self.crypto.spec.max_rows();
        let mut builder = LargeBinaryBuilder::with_capacity(n, n * self.crypto.sum_len());
        let mut buffer = Vec::with_capacity(self.crypto.sum_len());
        for (g, &count) in counts.iter().enumerate() {
            if count == 0 {
                builder.append_null();
                continue;
            }
            if check_budget && count > max_rows {
                return Err(HedfError::BudgetExceeded {
                    column: self.column.clone(),
                    rows: count,
                    max_rows,
                    why: self.crypto.spec.budget_reason(),
                }
                .into());
            }
            buffer.clear();
            write_sum(
                &self.crypto,
                count,
                &bodies[g * self.limbs..(g + 1) * self.limbs],
                &masks[g * N..(g + 1) * N],
                &mut buffer,
            );
            builder.append_value(&buffer);
        }
        Ok(Arc::new(builder.finish()))
    }
}

impl GroupsAccumulator for HeSumGroupsAccumulator {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.resize(total_num_groups);
        self.add_cells(values[0].as_fixed_size_binary(), group_indices, opt_filter)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        self.emit(emit_to, true)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![self.emit(emit_to, false)?])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.resize(total_num_groups);
        let states = values[0].as_binary::<i64>();
        let width = self.crypto.cell_width();
        for (i, &group) in group_indices.iter().enumerate() {
            if states.is_null(i) {
                continue;
            }
            let bytes = states.value(i);
            if let Some(cell) = bytes.strip_prefix(CELL_STATE_TAG) {
                let single =
                    arrow::array::FixedSizeBinaryArray::try_from_iter(std::iter::once(cell))?;
                if single.value_length() as usize != width {
                    return Err(HedfError::Malformed(
                        "he_sum partial state has a malformed cell".into(),
                    )
                    .into());
                }
                self.add_cells(&single, &[group], None)?;
            } else {
                self.merge_sum(&SumRef::parse(bytes)?, group)?;
            }
        }
        Ok(())
    }

    /// One row's state is its cell, tagged: no mask is expanded until rows meet in a group.
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let cells = values[0].as_fixed_size_binary();
        let states: LargeBinaryArray = (0..cells.len())
            .map(|i| {
                let keep =
                    cells.is_valid(i) && opt_filter.is_none_or(|f| f.is_valid(i) && f.value(i));
                keep.then(|| [CELL_STATE_TAG.as_slice(), cells.value(i)].concat())
            })
            .collect();
        Ok(vec![Arc::new(states)])
    }

    fn size(&self) -> usize {
        8 * (self.counts.capacity() + self.bodies.capacity() + self.masks.capacity())
            + CACHED_CHUNKS * 8 * (4 * N + 1)
            + 8 * self.keys.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::client::test_support::{encrypted_zeros, extracted_mask, sum_limb_phase};
    use crate::crypto::keys::ClientKey;
    use tfhe::core_crypto::commons::math::random::RandomGenerator;
    use tfhe::core_crypto::prelude::DefaultRandomGenerator;
    use tfhe::core_crypto::seeders::new_seeder;

    /// The accumulator's mask sums (runs by prefix sums, lone rows, any interleaving of groups)
    /// equal the naive sum of the LWE masks tfhe extracts row by row.
    #[test]
    fn mask_sums_equal_the_naive_sum_of_extracted_samples() {
        let key = ClientKey::generate();
        let rows = 2 * N + 300;
        let (crypto, cells) = encrypted_zeros(&key, rows);
        let fixed = cells.as_fixed_size_binary();
        // Runs of 1 to 40 rows, consecutive slots of one group, then a group change; some
        // groups revisited; a run crossing the chunk boundary at N.
        let mut rng = RandomGenerator::<DefaultRandomGenerator>::new(new_seeder().seed());
        let mut groups = Vec::with_capacity(rows);
        while groups.len() < rows {
            let group = (rng.random_uniform::<u64>() % 7) as usize;
            let run = 1 + (rng.random_uniform::<u64>() % 40) as usize;
            groups.extend(std::iter::repeat_n(group, run.min(rows - groups.len())));
        }
        let mut acc = HeSumGroupsAccumulator::new("v".into(), crypto);
        acc.update_batch(std::slice::from_ref(&cells), &groups, None, 7)
            .unwrap();
        let mut naive = vec![vec![0u64; N]; 7];
        let mut masks = MaskGenerator::default();
        for (i, &g) in groups.iter().enumerate() {
            let cell = CellRef::parse(fixed.value(i), &crypto).unwrap();
            for (n, m) in
                naive[g]
                    .iter_mut()
                    .zip(extracted_mask(&mut masks, cell.seed(), cell.row()))
            {
                *n = n.wrapping_add(m);
            }
        }
        let sums = acc.evaluate(EmitTo::All).unwrap();
        let sums = sums.as_binary::<i64>();
        for (g, want) in naive.iter().enumerate() {
            if !groups.contains(&g) {
                assert!(sums.is_null(g));
                continue;
            }
            let sum = SumRef::parse(sums.value(g)).unwrap();
            assert_eq!(
                sum.count as usize,
                groups.iter().filter(|&&x| x == g).count()
            );
            assert_eq!(&sum.mask().collect::<Vec<_>>(), want, "group {g}");
        }
    }

    /// Every kernel level this CPU has gives the generic kernel's results, bit for bit.
    #[test]
    fn every_kernel_level_gives_identical_results() {
        let mut rng = RandomGenerator::<DefaultRandomGenerator>::new(new_seeder().seed());
        let mut random = |n: usize| -> Vec<u64> { (0..n).map(|_| rng.random_uniform()).collect() };
        let (single, prefix, start, x) = (random(2 * N), random(2 * N + 1), random(N), random(N));
        let windows = Windows {
            singles: vec![0, 17, N - 1],
            runs: vec![(5, 900), (0, N), (N - 3, N)],
        };
        let levels = Kernels::available();
        assert_eq!(levels.last().unwrap().name, "generic");
        let run = |k: &Kernels| {
            let mut acc = start.clone();
            (k.add_windows)(&mut acc, &windows, &single, &prefix);
            (k.add)(&mut acc, &x);
            acc
        };
        let reference = run(&Kernels::GENERIC);
        for level in &levels {
            assert_eq!(run(level), reference, "{}", level.name);
        }
    }

    /// The budget assumes per-cell noises are independent and add up: a sum of n cells must have
    /// noise standard deviation sqrt(n) * 4. Sums of 64 encrypted zeros, summed by this
    /// accumulator, measured over 256 groups (sd estimate within ~5%, bound 30%).
    #[test]
    fn sum_noise_grows_as_the_square_root_of_the_row_count() {
        let key = ClientKey::generate();
        let (groups, per_group) = (256usize, 64usize);
        let n = groups * per_group;
        let (crypto, cells) = encrypted_zeros(&key, n);
        let mut acc = HeSumGroupsAccumulator::new("v".into(), crypto);
        let group_of: Vec<usize> = (0..n).map(|i| (i * 7919) % groups).collect();
        acc.update_batch(&[cells], &group_of, None, groups).unwrap();
        let sums = acc.evaluate(EmitTo::All).unwrap();
        let sums = sums.as_binary::<i64>();
        let noise: Vec<f64> = (0..groups)
            .map(|g| {
                let sum = SumRef::parse(sums.value(g)).unwrap();
                assert_eq!(sum.count, per_group as u64);
                sum_limb_phase(&key, &sum, 0) as i64 as f64
            })
            .collect();
        let sd = (noise.iter().map(|e| e * e).sum::<f64>() / groups as f64).sqrt();
        let expected = (per_group as f64).sqrt() * 4.0;
        assert!(
            (0.7 * expected..1.3 * expected).contains(&sd),
            "sd {sd}, expected {expected}"
        );
    }
}
