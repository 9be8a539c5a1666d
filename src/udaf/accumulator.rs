//! The he_sum group accumulator, for one column or several fused ones: per group and column, a
//! row count and the limb body sums; per group, one shared mask sum (listed rows or N
//! coefficients, see below) of the rows
//! whose cells all share one common mask (a table row's measures, none NULL), and per column
//! and group that needs it, a mask sum of the column's other rows. Adds are wrapping u64 on the
//! torus; nothing here needs a key.
//!
//! Row `j` of a chunk with mask polynomial `a` is the LWE sample extracted at position `j`, whose mask
//! is `v_j[i] = w[j - i]` with `w[t] = a[t]` for `t >= 0` and `w[t] = -a[N + t]` for `t < 0`.
//! With `R` the reversed prefix sums of `w` (built once per chunk, O(N)), a run of consecutive
//! positions `j0..=j1` of one group adds `R[N-1-j1+i] - R[N-j0+i]` to coefficient `i`: O(N) for the
//! whole run, however long. Clustered data costs O(N) per chunk; scattered rows O(N) per row,
//! with a chunk's rows sorted by (group, position) and each group's rows added 64 coefficients at a
//! time, so its accumulator is read and written once per chunk. A group with many rows in a chunk
//! (at least [`DENSE_WINDOWS`] runs and lone rows) takes its mask sum as one exact FFT product
//! instead: the chunk's mask times the group's row polynomial (see [`Dense`]), a constant cost.
//!
//! A weighted column (`SUM(x * w)`, see [`crate::udaf::weight`]) adds `w` times each row's
//! bodies and mask, always to its own sums. A group's rows in a chunk are sorted by (weight,
//! position), each weight's rows (runs included) summed as above and multiplied once: O(N) per
//! row plus O(N) per distinct weight (TPC-H Q6 has three).
//!
//! A group's mask sum starts as a list of its rows (see [`crate::crypto::mask_sum`]): O(1) per
//! row, 8 bytes each (16 with a weight). Past [`LISTED_ROWS`] rows the group takes coefficients, and its listed
//! rows are added into them later, many groups' at once in chunk order (once more than
//! [`PENDING_ROWS`] wait, and before any emit). So a group holds at most one list of up to
//! [`LISTED_ROWS`] rows or one set of coefficients (32 KiB each), and many small groups (10^5
//! groups of 10 rows) cost their rows, not 32 KiB each; the client finishes a listed mask sum
//! with one FFT product per chunk (see `crypto::client`).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeBinaryArray, LargeBinaryArray,
    LargeBinaryBuilder,
};
use datafusion::error::Result;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};

use crate::crypto::cell::{
    mask_words, parse_weighted_cell, write_bundle, write_sum, BundlePart, BundleRef, CellRef,
    ColumnCrypto, SumRef,
};
use crate::crypto::mask::MaskGenerator;
use crate::crypto::mask_sum::{
    write_mask_sum, ListedRow, MaskSumRef, LISTED_ROWS, MAX_LISTED_ROW, MAX_SEEDS, ROW_BITS,
};
use crate::crypto::params::{weighted_rows, POLYNOMIAL_SIZE as N};
use crate::crypto::product::{MaskProduct, MAX_SMALL_L1};
use crate::error::HedfError;

/// State tag of one row's cells sent as partial state (cheap `convert_to_state`): then per
/// part, a presence byte and, if present, the cell.
const CELLS_STATE_TAG: &[u8; 4] = b"HCLS";
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

    /// The index in `entries` of the chunk's tables, built if not cached.
    fn ensure(&mut self, seed: u128, chunk: u64) -> usize {
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.seed == seed && e.chunk == chunk)
        {
            return i;
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
        slot
    }
}

/// Coefficients of a group's accumulator kept in registers while its rows are added.
const TILE: usize = 64;

/// One group's rows in one chunk: lone rows as offsets into `ChunkTables::single`, runs as
/// (hi, lo) offsets into `ChunkTables::prefix`. Weighted rows likewise, ordered by weight:
/// `weights` holds each distinct weight with where its singles and runs end.
#[derive(Default)]
struct Windows {
    singles: Vec<usize>,
    runs: Vec<(usize, usize)>,
    weights: Vec<(u64, usize, usize)>,
    weighted_singles: Vec<usize>,
    weighted_runs: Vec<(usize, usize)>,
}

impl Windows {
    fn clear(&mut self) {
        self.singles.clear();
        self.runs.clear();
        self.weights.clear();
        self.weighted_singles.clear();
        self.weighted_runs.clear();
    }
}

/// Adds the windows `singles` and `runs` to `tile`, the coefficients from `base` on.
#[inline(always)]
fn add_tile(
    tile: &mut [u64; TILE],
    base: usize,
    singles: &[usize],
    runs: &[(usize, usize)],
    single: &[u64],
    prefix: &[u64],
) {
    for &o in singles {
        let x = &single[o + base..o + base + TILE];
        for i in 0..TILE {
            tile[i] = tile[i].wrapping_add(x[i]);
        }
    }
    for &(h, l) in runs {
        let (hi, lo) = (
            &prefix[h + base..h + base + TILE],
            &prefix[l + base..l + base + TILE],
        );
        for i in 0..TILE {
            tile[i] = tile[i].wrapping_add(hi[i].wrapping_sub(lo[i]));
        }
    }
}

/// Adds every window to `acc`, one tile at a time, so the accumulator is read and written once
/// per group and chunk however many rows the group has there.
#[inline(always)]
fn add_windows_generic(acc: &mut [u64], w: &Windows, single: &[u64], prefix: &[u64]) {
    for (t, out) in acc.chunks_exact_mut(TILE).enumerate() {
        let base = t * TILE;
        let mut tile = [0u64; TILE];
        tile.copy_from_slice(out);
        add_tile(&mut tile, base, &w.singles, &w.runs, single, prefix);
        let (mut singles, mut runs) = (0, 0);
        for &(weight, singles_end, runs_end) in &w.weights {
            let mut part = [0u64; TILE];
            add_tile(
                &mut part,
                base,
                &w.weighted_singles[singles..singles_end],
                &w.weighted_runs[runs..runs_end],
                single,
                prefix,
            );
            for i in 0..TILE {
                tile[i] = tile[i].wrapping_add(weight.wrapping_mul(part[i]));
            }
            (singles, runs) = (singles_end, runs_end);
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
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;

/// Runs and lone rows of one group in one chunk from which [`Dense`] takes over: about the cost
/// of its four FFTs (tens of microseconds) against a window's N adds (about 0.3 us).
const DENSE_WINDOWS: usize = 128;

/// A group's mask sum in one chunk as one product. With `B[o]` the summed weight (1 unweighted)
/// of the rows at offset `o` of `ChunkTables::single` (position `N - 1 - o`), the windows add
/// `sum_o B[o] * single[o + i]` to coefficient `i`, which is coefficient `N - 1 - i` of the
/// negacyclic product of the chunk's mask with `B`: exact through [`MaskProduct`] while the
/// weights' absolute values sum to at most [`MAX_SMALL_L1`]. Costs four FFTs per group and
/// chunk, plus three per chunk for the mask, whatever the group's row count.
struct Dense {
    /// Allocated on first use (about 250 KiB): most accumulators never need it.
    product: Option<Box<MaskProduct>>,
    /// The (seed, chunk) whose mask `product` holds.
    mask: Option<(u128, u64)>,
    /// Groups with fewer windows take the direct path.
    min_windows: usize,
    small: Vec<u64>,
    out: Vec<u64>,
}

/// Bytes of a [`Dense`] in use, for the memory pool: its product's transforms and buffers.
const DENSE_BYTES: usize = 256 * 1024;

impl Dense {
    /// Adds the windows' mask sum to `acc` as one product, when they are many and their
    /// weights small enough for an exact product; `false` (nothing added) otherwise.
    fn try_add(&mut self, acc: &mut [u64], w: &Windows, tables: &ChunkTables) -> bool {
        let windows =
            w.singles.len() + w.runs.len() + w.weighted_singles.len() + w.weighted_runs.len();
        if windows < self.min_windows {
            return false;
        }
        let rows = |singles: &[usize], runs: &[(usize, usize)]| -> u128 {
            singles.len() as u128 + runs.iter().map(|&(h, l)| (l - h) as u128).sum::<u128>()
        };
        let mut l1 = rows(&w.singles, &w.runs);
        let (mut singles, mut runs) = (0, 0);
        for &(weight, singles_end, runs_end) in &w.weights {
            let count = rows(
                &w.weighted_singles[singles..singles_end],
                &w.weighted_runs[runs..runs_end],
            );
            l1 += (weight as i64).unsigned_abs() as u128 * count;
            (singles, runs) = (singles_end, runs_end);
        }
        if l1 > MAX_SMALL_L1 as u128 {
            return false;
        }
        let small = &mut self.small;
        small.clear();
        small.resize(N, 0);
        let mut add = |singles: &[usize], runs: &[(usize, usize)], weight: u64| {
            for &o in singles {
                small[o] = small[o].wrapping_add(weight);
            }
            for &(h, l) in runs {
                for b in &mut small[h..l] {
                    *b = b.wrapping_add(weight);
                }
            }
        };
        add(&w.singles, &w.runs, 1);
        let (mut singles, mut runs) = (0, 0);
        for &(weight, singles_end, runs_end) in &w.weights {
            add(
                &w.weighted_singles[singles..singles_end],
                &w.weighted_runs[runs..runs_end],
                weight,
            );
            (singles, runs) = (singles_end, runs_end);
        }
        let product = self.product.get_or_insert_with(Box::default);
        self.out.resize(N, 0);
        if self.mask != Some((tables.seed, tables.chunk)) {
            // The mask is `single` reversed: single[N - 1 - t] = a[t].
            for (t, a) in self.out.iter_mut().enumerate() {
                *a = tables.single[N - 1 - t];
            }
            product.set_mask(&self.out);
            self.mask = Some((tables.seed, tables.chunk));
        }
        self.out.fill(0);
        product.add_product(&self.small, &mut self.out);
        for (a, p) in acc.iter_mut().zip(self.out.iter().rev()) {
            *a = a.wrapping_add(*p);
        }
        true
    }
}

/// Listed rows waiting to be added into their groups' coefficients, past which they are.
const PENDING_ROWS: usize = 1 << 16;

/// What adding masks needs besides the sums: chunk tables, kernels and scratch, shared by
/// every [`MaskSums`] of one accumulator.
struct Adder {
    /// The mask streams of listed rows: a [`Listed`] key holds an index into it.
    seeds: Vec<u128>,
    seed_indices: HashMap<u128, u64>,
    /// Mask streams listed rows may come from, past which rows take coefficients at once
    /// ([`MAX_SEEDS`]; settable by tests).
    max_seeds: usize,
    /// Rows a group keeps listed before it takes coefficients (settable by tests).
    max_listed: usize,
    chunks: ChunkCache,
    kernels: Kernels,
    dense: Dense,
    /// Scratch: one group's windows in the chunk being added.
    windows: Windows,
    /// Scratch: one serialised mask sum, decoded.
    words: Vec<u64>,
}

impl Adder {
    /// The index of `seed` in [`Adder::seeds`]; `None` once a listed row's key could not
    /// hold another, when rows take coefficients instead.
    fn seed_index(&mut self, seed: u128) -> Option<u64> {
        if self.seeds.last() == Some(&seed) {
            return Some(self.seeds.len() as u64 - 1);
        }
        if let Some(&i) = self.seed_indices.get(&seed) {
            return Some(i);
        }
        if self.seeds.len() >= self.max_seeds {
            return None;
        }
        self.seeds.push(seed);
        self.seed_indices.insert(seed, self.seeds.len() as u64 - 1);
        Some(self.seeds.len() as u64 - 1)
    }

    fn listed_row(&self, listed: Listed) -> ListedRow {
        ListedRow {
            seed: self.seeds[(listed.key >> ROW_BITS) as usize],
            row: listed.key & (MAX_LISTED_ROW - 1),
            weight: listed.weight,
        }
    }
}

/// One listed row of a group: `seed index << 48 | row` (see [`Adder::seeds`]) and its weight.
#[derive(Clone, Copy)]
struct Listed {
    key: u64,
    weight: i64,
}

/// Row `i` of a list (see [`MaskSums::listed`]).
fn listed_at(list: &[u64], weighted: bool, i: usize) -> Listed {
    if weighted {
        Listed {
            key: list[2 * i],
            weight: list[2 * i + 1] as i64,
        }
    } else {
        Listed {
            key: list[i],
            weight: 1,
        }
    }
}

/// Marks a group without a mask sum of its own in [`Sums::index`].
const NONE: u32 = u32::MAX;

/// Mask sums of any number of groups, N coefficients each, allocated on a group's first row:
/// a column's own sums (see [`HeSumGroupsAccumulator`]) exist only for the groups that need them.
#[derive(Default)]
struct Sums {
    /// Per group, where its sum starts in `pool` (in units of N), or [`NONE`].
    index: Vec<u32>,
    pool: Vec<u64>,
    /// Places in `pool` whose groups were emitted, zeroed for reuse.
    free: Vec<u32>,
}

impl Sums {
    fn get_mut(&mut self, group: usize) -> &mut [u64] {
        if self.index[group] == NONE {
            self.index[group] = self.free.pop().unwrap_or_else(|| {
                self.pool.resize(self.pool.len() + N, 0);
                (self.pool.len() / N - 1) as u32
            });
        }
        let at = self.index[group] as usize * N;
        &mut self.pool[at..at + N]
    }

    /// `group`'s sum, if it has one.
    fn get(&self, group: usize) -> Option<&[u64]> {
        let at = self.index[group];
        (at != NONE).then(|| &self.pool[at as usize * N..(at as usize + 1) * N])
    }

    /// Forgets the first `groups` groups' sums; their space is zeroed for reuse, or given
    /// back when no group is left.
    fn release(&mut self, groups: usize) {
        for at in self.index.drain(..groups) {
            if at != NONE {
                self.pool[at as usize * N..(at as usize + 1) * N].fill(0);
                self.free.push(at);
            }
        }
        if self.index.is_empty() {
            self.pool = Vec::new();
            self.free.clear();
        }
    }
}

/// Per group, a list of words if it has one: 4 bytes a group without.
#[derive(Default)]
struct Lists {
    /// Per group, where its list is in `lists`, or [`NONE`].
    index: Vec<u32>,
    lists: Vec<Vec<u64>>,
    /// Places in `lists` whose groups gave their lists up, for reuse.
    free: Vec<u32>,
    /// Bytes the lists' words take, for `size`.
    bytes: usize,
}

impl Lists {
    fn get(&self, group: usize) -> &[u64] {
        match self.index[group] {
            NONE => &[],
            at => &self.lists[at as usize],
        }
    }

    /// `group`'s list, made if it has none.
    fn get_mut(&mut self, group: usize) -> &mut Vec<u64> {
        if self.index[group] == NONE {
            self.index[group] = self.free.pop().unwrap_or_else(|| {
                self.lists.push(Vec::new());
                self.lists.len() as u32 - 1
            });
        }
        &mut self.lists[self.index[group] as usize]
    }

    /// Removes `group`'s list and returns it.
    fn take(&mut self, group: usize) -> Option<Vec<u64>> {
        let at = std::mem::replace(&mut self.index[group], NONE);
        if at == NONE {
            return None;
        }
        self.free.push(at);
        let list = std::mem::take(&mut self.lists[at as usize]);
        self.bytes -= 8 * list.capacity();
        Some(list)
    }

    /// Forgets the first `groups` groups' lists.
    fn release(&mut self, groups: usize) {
        for group in 0..groups {
            self.take(group);
        }
        self.index.drain(..groups);
        if self.index.is_empty() {
            self.lists = Vec::new();
            self.free.clear();
        }
    }

    fn size(&self) -> usize {
        4 * (self.index.capacity() + self.free.capacity()) + 24 * self.lists.capacity() + self.bytes
    }
}

/// Appends the windows of `rows` (sorted, of one group and weight; `key` gives each one's sort
/// key) to `singles` and `runs`: consecutive positions form one run, a position alone is a single.
fn push_windows<T>(
    rows: &[T],
    key: impl Fn(&T) -> u64,
    singles: &mut Vec<usize>,
    runs: &mut Vec<(usize, usize)>,
) {
    let mut i = 0;
    while i < rows.len() {
        let first = key(&rows[i]);
        let mut last = first;
        while i + 1 < rows.len() && key(&rows[i + 1]) == last + 1 && last & SLOT_MASK != SLOT_MASK {
            i += 1;
            last += 1;
        }
        i += 1;
        let (j0, j1) = ((first & SLOT_MASK) as usize, (last & SLOT_MASK) as usize);
        if j0 == j1 {
            singles.push(N - 1 - j0);
        } else {
            runs.push((N - 1 - j1, N - j0));
        }
    }
}

/// Mask sums of any number of groups, fed row by row. Rows are collected per chunk and, on
/// [`MaskSums::flush`] (when the chunk changes), listed or added to coefficients.
#[derive(Default)]
struct MaskSums {
    /// Coefficients of the groups that have them.
    sums: Sums,
    /// Per group without coefficients, its listed rows: each row's key, then its weight if
    /// the sums are `weighted`.
    listed: Lists,
    /// Whether listed rows keep a weight (a weighted column's own sums); every other list's
    /// rows weigh 1 and take one word each.
    weighted: bool,
    /// Listed rows of groups that took coefficients, not yet added: (group, row).
    pending: Vec<(u32, Listed)>,
    /// Sort keys (group << SLOT_BITS | position) of the pending rows of chunk `current`.
    keys: Vec<u64>,
    /// The same for weighted rows, with their weights (two's complement).
    weighted_keys: Vec<(u64, u64)>,
    current: Option<(u128, u64)>,
}

impl MaskSums {
    fn with_groups(groups: usize, weighted: bool) -> Self {
        let mut sums = MaskSums {
            weighted,
            ..MaskSums::default()
        };
        sums.resize(groups);
        sums
    }

    /// Words a listed row takes.
    fn stride(&self) -> usize {
        1 + self.weighted as usize
    }

    fn resize(&mut self, groups: usize) {
        self.sums.index.resize(groups, NONE);
        self.listed.index.resize(groups, NONE);
    }

    /// Lists `rows` in `group` if it has no coefficients, stays within the list's limit and,
    /// unless the sums are weighted, every row weighs 1.
    fn list(
        &mut self,
        max_listed: usize,
        group: usize,
        rows: impl ExactSizeIterator<Item = Listed> + Clone,
    ) -> bool {
        let stride = self.stride();
        let words = self.listed.get(group).len();
        if self.sums.index[group] != NONE
            || words / stride + rows.len() > max_listed
            || (!self.weighted && rows.clone().any(|r| r.weight != 1))
        {
            return false;
        }
        if rows.len() == 0 {
            return true;
        }
        let weighted = self.weighted;
        let listed = self.listed.get_mut(group);
        let (before, need) = (listed.capacity(), words + rows.len() * stride);
        if need > before {
            // Doubling, but never past the list's limit.
            listed.reserve_exact(need.max(2 * before).min(max_listed * stride) - words);
        }
        for r in rows {
            listed.push(r.key);
            if weighted {
                listed.push(r.weight as u64);
            }
        }
        let grown = 8 * (listed.capacity() - before);
        self.listed.bytes += grown;
        true
    }

    /// Forgets `group`'s list, returning its rows.
    fn take_list(&mut self, group: usize) -> Option<impl Iterator<Item = Listed>> {
        let listed = self.listed.take(group)?;
        let weighted = self.weighted;
        Some((0..listed.len() / self.stride()).map(move |i| listed_at(&listed, weighted, i)))
    }

    /// Gives `group` coefficients, its listed rows pending to be added into them.
    fn coefficients(&mut self, group: usize) -> &mut [u64] {
        if let Some(listed) = self.take_list(group) {
            self.pending.extend(listed.map(|l| (group as u32, l)));
        }
        self.sums.get_mut(group)
    }

    /// Adds the pending listed rows into their groups' coefficients, in chunk order, through
    /// the same path as new rows: their groups have coefficients, so nothing is listed again.
    fn add_pending(&mut self, adder: &mut Adder) {
        self.flush(adder);
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_unstable_by_key(|&(_, l)| l.key);
        for &(group, listed) in &pending {
            let ListedRow { seed, row, weight } = adder.listed_row(listed);
            if weight == 1 {
                self.push(adder, group as usize, seed, row);
            } else {
                self.push_weighted(adder, group as usize, seed, row, weight);
            }
        }
        self.flush(adder);
    }

    /// Adds a serialised mask sum (coefficients, listed rows or both) to `group`'s.
    fn add_mask_sum(&mut self, adder: &mut Adder, group: usize, mask: &MaskSumRef<'_>) {
        if let Some(c) = mask.coefficients() {
            self.add(adder, group, c);
        }
        let mut rows = Vec::with_capacity(mask.listed().len());
        for r in mask.listed() {
            match adder.seed_index(r.seed) {
                Some(seed) => rows.push(Listed {
                    key: seed << ROW_BITS | r.row,
                    weight: r.weight,
                }),
                None => self.push_weighted(adder, group, r.seed, r.row, r.weight),
            }
        }
        // Rows this list cannot keep are added, weights and all, as pending rows.
        if !self.list(adder.max_listed, group, rows.iter().copied()) {
            self.coefficients(group);
            self.pending
                .extend(rows.into_iter().map(|l| (group as u32, l)));
        }
    }

    /// Whether `group` has a mask sum here.
    fn has(&self, group: usize) -> bool {
        self.sums.index[group] != NONE || self.listed.index[group] != NONE
    }

    /// Serialises `group`'s mask sum.
    fn write(&self, adder: &Adder, group: usize, out: &mut Vec<u8>) -> Result<()> {
        let mut rows: Vec<ListedRow> = self.listed_rows(adder, group).collect();
        Ok(write_mask_sum(self.sums.get(group), &mut rows, out)?)
    }

    /// `group`'s listed rows, as they are serialised.
    fn listed_rows<'a>(
        &'a self,
        adder: &'a Adder,
        group: usize,
    ) -> impl Iterator<Item = ListedRow> + 'a {
        let list = self.listed.get(group);
        (0..list.len() / self.stride())
            .map(move |i| adder.listed_row(listed_at(list, self.weighted, i)))
    }

    /// Forgets the first `groups` groups.
    fn release(&mut self, groups: usize) {
        self.sums.release(groups);
        self.listed.release(groups);
    }

    /// Adds row `row` of the mask stream `seed` to `group`'s sum.
    #[inline]
    fn push(&mut self, adder: &mut Adder, group: usize, seed: u128, row: u64) {
        let key = self.key(adder, group, seed, row);
        self.keys.push(key);
    }

    /// Adds `weight` times row `row` of the mask stream `seed` to `group`'s sum.
    #[inline]
    fn push_weighted(
        &mut self,
        adder: &mut Adder,
        group: usize,
        seed: u128,
        row: u64,
        weight: i64,
    ) {
        let key = self.key(adder, group, seed, row);
        self.weighted_keys.push((key, weight as u64));
    }

    /// The sort key of a row, after flushing the pending rows if it starts another chunk.
    #[inline]
    fn key(&mut self, adder: &mut Adder, group: usize, seed: u128, row: u64) -> u64 {
        let chunk = row / N as u64;
        if self.current != Some((seed, chunk)) {
            self.flush(adder);
            self.current = Some((seed, chunk));
        }
        ((group as u64) << SLOT_BITS) | (row % N as u64)
    }

    /// Adds the pending rows. Sorting by (group, position) turns interleaved rows into runs
    /// and keeps one group's accumulator hot while its rows are added.
    fn flush(&mut self, adder: &mut Adder) {
        let Some((seed, chunk)) = self.current.take() else {
            return;
        };
        let first_row = chunk * N as u64;
        let listed_base = adder.seed_index(seed).map(|s| s << ROW_BITS | first_row);
        let listed = |key: u64, weight: u64| {
            listed_base.map(|base| Listed {
                key: base | (key & SLOT_MASK),
                weight: weight as i64,
            })
        };
        let mut keys = std::mem::take(&mut self.keys);
        let mut weighted_keys = std::mem::take(&mut self.weighted_keys);
        keys.sort_unstable();
        weighted_keys.sort_unstable_by_key(|&(key, weight)| (key >> SLOT_BITS, weight, key));
        let max_listed = adder.max_listed;
        let Adder {
            chunks,
            kernels,
            dense,
            windows,
            ..
        } = adder;
        // Built only if some group of the chunk takes coefficients.
        let mut slot = None;
        let mut i = 0;
        while i < keys.len() {
            let group = keys[i] >> SLOT_BITS;
            let end = i + keys[i..].partition_point(|k| k >> SLOT_BITS == group);
            if listed_base.is_some()
                && self.list(
                    max_listed,
                    group as usize,
                    keys[i..end].iter().map(|&k| listed(k, 1).expect("base")),
                )
            {
                i = end;
                continue;
            }
            windows.clear();
            push_windows(
                &keys[i..end],
                |&k| k,
                &mut windows.singles,
                &mut windows.runs,
            );
            i = end;
            let at = *slot.get_or_insert_with(|| chunks.ensure(seed, chunk));
            let tables = &chunks.entries[at];
            let acc = self.coefficients(group as usize);
            if !dense.try_add(acc, windows, tables) {
                (kernels.add_windows)(acc, windows, &tables.single, &tables.prefix);
            }
        }
        keys.clear();
        self.keys = keys;
        let keys = &weighted_keys;
        let mut i = 0;
        while i < keys.len() {
            let group = keys[i].0 >> SLOT_BITS;
            let end = i + keys[i..].partition_point(|&(k, _)| k >> SLOT_BITS == group);
            if listed_base.is_some()
                && self.list(
                    max_listed,
                    group as usize,
                    keys[i..end]
                        .iter()
                        .map(|&(k, w)| listed(k, w).expect("base")),
                )
            {
                i = end;
                continue;
            }
            windows.clear();
            while i < keys.len() && keys[i].0 >> SLOT_BITS == group {
                let weight = keys[i].1;
                let end =
                    i + keys[i..].partition_point(|&(k, w)| k >> SLOT_BITS == group && w == weight);
                push_windows(
                    &keys[i..end],
                    |&(k, _)| k,
                    &mut windows.weighted_singles,
                    &mut windows.weighted_runs,
                );
                i = end;
                let ends = (windows.weighted_singles.len(), windows.weighted_runs.len());
                windows.weights.push((weight, ends.0, ends.1));
            }
            let at = *slot.get_or_insert_with(|| chunks.ensure(seed, chunk));
            let tables = &chunks.entries[at];
            let acc = self.coefficients(group as usize);
            if !dense.try_add(acc, windows, tables) {
                (kernels.add_windows)(acc, windows, &tables.single, &tables.prefix);
            }
        }
        weighted_keys.clear();
        self.weighted_keys = weighted_keys;
    }

    /// Adds serialised coefficients to `group`'s.
    fn add(&mut self, adder: &mut Adder, group: usize, coefficients: &[u8]) {
        adder.words.clear();
        adder.words.extend(mask_words(coefficients));
        (adder.kernels.add)(self.coefficients(group), &adder.words);
    }

    fn size(&self) -> usize {
        8 * (self.sums.pool.capacity() + self.keys.capacity())
            + 16 * self.weighted_keys.capacity()
            + 24 * self.pending.capacity()
            + 4 * (self.sums.index.capacity() + self.sums.free.capacity())
            + self.listed.size()
    }
}

/// One summed column of an accumulator: its row counts, limb body sums and, when some of its
/// rows could not share the accumulator's mask sums, a mask sum of its own.
struct Part {
    column: String,
    crypto: ColumnCrypto,
    /// Takes weighted cells (`x * w`); its rows always go to its own sums.
    weighted: bool,
    limbs: usize,
    counts: Vec<u64>,
    bodies: Vec<u64>,
    own: Option<MaskSums>,
}

impl Part {
    /// Width of one of this part's input cells.
    fn cell_width(&self) -> usize {
        if self.weighted {
            self.crypto.weighted_cell_width()
        } else {
            self.crypto.cell_width()
        }
    }

    /// One input cell and its weight (1 when unweighted).
    fn parse<'a>(&self, bytes: &'a [u8]) -> Result<(CellRef<'a>, i64)> {
        let (cell, weight) = if self.weighted {
            parse_weighted_cell(bytes, &self.crypto)?
        } else {
            (CellRef::parse(bytes, &self.crypto)?, 1)
        };
        // Listed rows hold 48-bit row numbers; the storage never numbers a row beyond.
        if cell.row() >= MAX_LISTED_ROW {
            return Err(HedfError::Malformed(format!(
                "he_sum({}): cell row number {} is beyond 2^48",
                self.column,
                cell.row()
            ))
            .into());
        }
        Ok((cell, weight))
    }

    /// Why this part's budget is what it is.
    fn budget_reason(&self) -> String {
        let reason = self.crypto.spec.budget_reason();
        if self.weighted {
            format!("{reason}; a value weighted by w counts as w^2 rows")
        } else {
            reason
        }
    }

    fn add_bodies(&mut self, group: usize, body: impl Fn(usize) -> u64) {
        for limb in 0..self.limbs {
            let b = &mut self.bodies[group * self.limbs + limb];
            *b = b.wrapping_add(body(limb));
        }
    }

    /// Checks that a partial state of this part was made with the same crypto.
    fn check_state(&self, crypto: &ColumnCrypto) -> Result<()> {
        if *crypto == self.crypto {
            return Ok(());
        }
        Err(if crypto.key_id != self.crypto.key_id {
            HedfError::MixedKeys {
                first: self.crypto.key_id.to_string(),
                second: crypto.key_id.to_string(),
            }
        } else {
            HedfError::Malformed(format!(
                "he_sum({}) state has a different encoding",
                self.column
            ))
        }
        .into())
    }
}

/// What an accumulator emits per group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// One column's sum (he_sum).
    Sum,
    /// A bundle of several columns' sums (fused he_sums; see `udaf::fused`).
    Bundle,
}

/// he_sum's per-partition state for any number of groups (a `GroupsAccumulator`), for one
/// column or several fused ones. A row whose present cells all share one mask (the usual
/// case: measures of one table row, all non-NULL) adds that mask once, to the shared sums;
/// any other row adds each present cell's mask to its part's own sums.
pub struct HeSumGroupsAccumulator {
    parts: Vec<Part>,
    output: Output,
    groups: usize,
    shared: MaskSums,
    adder: Adder,
}

impl std::fmt::Debug for HeSumGroupsAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let columns: Vec<&str> = self.parts.iter().map(|p| p.column.as_str()).collect();
        f.debug_struct("HeSumGroupsAccumulator")
            .field("columns", &columns)
            .field("groups", &self.groups)
            .finish()
    }
}

impl HeSumGroupsAccumulator {
    /// An accumulator of `columns` (name, crypto): one emits sums, several emit bundles.
    pub fn new(columns: Vec<(String, ColumnCrypto)>) -> Self {
        let output = if columns.len() == 1 {
            Output::Sum
        } else {
            Output::Bundle
        };
        let parts = columns
            .into_iter()
            .map(|(column, crypto)| Part {
                column,
                limbs: crypto.spec.limbs as usize,
                crypto,
                weighted: false,
                counts: Vec::new(),
                bodies: Vec::new(),
                own: None,
            })
            .collect();
        HeSumGroupsAccumulator {
            parts,
            output,
            groups: 0,
            shared: MaskSums::default(),
            adder: Adder {
                seeds: Vec::new(),
                seed_indices: HashMap::new(),
                max_seeds: MAX_SEEDS,
                max_listed: LISTED_ROWS,
                chunks: ChunkCache::new(),
                kernels: Kernels::detect(),
                dense: Dense {
                    product: None,
                    mask: None,
                    min_windows: DENSE_WINDOWS,
                    small: Vec::new(),
                    out: Vec::new(),
                },
                windows: Windows::default(),
                words: Vec::with_capacity(N),
            },
        }
    }

    /// An accumulator of one weighted column (name, crypto), which emits sums.
    pub fn weighted(column: (String, ColumnCrypto)) -> Self {
        let mut acc = Self::new(vec![column]);
        acc.parts[0].weighted = true;
        acc
    }

    /// Makes room for `groups` groups (new ones start empty).
    pub(crate) fn resize(&mut self, groups: usize) {
        self.groups = groups;
        self.shared.resize(groups);
        for p in &mut self.parts {
            p.counts.resize(groups, 0);
            p.bodies.resize(groups * p.limbs, 0);
            if let Some(own) = &mut p.own {
                own.resize(groups);
            }
        }
    }

    /// Adds one row's cells and weights (`None` for NULL), one per part, to `group`.
    #[inline]
    fn add_row(&mut self, group: usize, cells: &[Option<(CellRef<'_>, i64)>]) {
        let mut lead = None;
        let mut shared = true;
        for (part, cell) in self.parts.iter_mut().zip(cells) {
            let Some((cell, weight)) = cell else {
                shared = false;
                continue;
            };
            part.counts[group] = part.counts[group].saturating_add(weighted_rows(*weight));
            if part.weighted {
                shared = false;
                let w = *weight as u64;
                part.add_bodies(group, |limb| w.wrapping_mul(cell.body(limb)));
            } else {
                part.add_bodies(group, |limb| cell.body(limb));
            }
            let mask = (cell.seed(), cell.row());
            match lead {
                None => lead = Some(mask),
                Some(l) if l != mask => shared = false,
                Some(_) => {}
            }
        }
        if shared {
            if let Some((seed, row)) = lead {
                self.shared.push(&mut self.adder, group, seed, row);
            }
            return;
        }
        for (part, cell) in self.parts.iter_mut().zip(cells) {
            if let Some((cell, weight)) = cell {
                let groups = self.groups;
                let weighted = part.weighted;
                let own = part
                    .own
                    .get_or_insert_with(|| MaskSums::with_groups(groups, weighted));
                if part.weighted {
                    own.push_weighted(&mut self.adder, group, cell.seed(), cell.row(), *weight);
                } else {
                    own.push(&mut self.adder, group, cell.seed(), cell.row());
                }
            }
        }
    }

    fn flush(&mut self) {
        self.shared.flush(&mut self.adder);
        for own in self.parts.iter_mut().filter_map(|p| p.own.as_mut()) {
            own.flush(&mut self.adder);
        }
    }

    fn pending_rows(&self) -> usize {
        let own = self.parts.iter().filter_map(|p| p.own.as_ref());
        std::iter::once(&self.shared)
            .chain(own)
            .map(|s| s.pending.len())
            .sum()
    }

    /// Flushes, and adds listed rows into coefficients where more than `at_least` are pending.
    fn add_pending(&mut self, at_least: usize) {
        self.flush();
        let sums = std::iter::once(&mut self.shared)
            .chain(self.parts.iter_mut().filter_map(|p| p.own.as_mut()));
        for sums in sums {
            if sums.pending.len() > at_least {
                sums.add_pending(&mut self.adder);
            }
        }
    }

    /// The cell arrays of `values`, one per part, checked against the parts' cell widths.
    fn cell_arrays<'a>(&self, values: &'a [ArrayRef]) -> Result<Vec<&'a FixedSizeBinaryArray>> {
        self.parts
            .iter()
            .zip(values)
            .map(|(part, v)| {
                let Some(array) = v.as_fixed_size_binary_opt() else {
                    return Err(HedfError::Malformed(format!(
                        "he_sum({}) got {}, expected cells",
                        part.column,
                        v.data_type()
                    ))
                    .into());
                };
                let width = part.cell_width();
                if array.value_length() as usize != width {
                    return Err(HedfError::Malformed(format!(
                        "he_sum({}) got {}-byte cells, expected {width}",
                        part.column,
                        array.value_length()
                    ))
                    .into());
                }
                Ok(array)
            })
            .collect()
    }

    /// Accumulates the rows of `values` (row i into group `groups[i]`) that `filter` keeps.
    fn add_cells(
        &mut self,
        values: &[ArrayRef],
        groups: &[usize],
        filter: Option<&BooleanArray>,
    ) -> Result<()> {
        let arrays = self.cell_arrays(values)?;
        let mut cells = Vec::with_capacity(arrays.len());
        for (i, &group) in groups.iter().enumerate() {
            if filter.is_some_and(|f| !f.is_valid(i) || !f.value(i)) {
                continue;
            }
            cells.clear();
            for (part, array) in self.parts.iter().zip(&arrays) {
                cells.push(if array.is_null(i) {
                    None
                } else {
                    Some(part.parse(array.value(i))?)
                });
            }
            self.add_row(group, &cells);
        }
        self.add_pending(PENDING_ROWS);
        Ok(())
    }

    /// Adds one partial state (a row's cells, a sum or a bundle) to `group`.
    fn merge_state(&mut self, bytes: &[u8], group: usize) -> Result<()> {
        let malformed = || HedfError::Malformed("he_sum partial state is malformed".into());
        if let Some(mut rest) = bytes.strip_prefix(CELLS_STATE_TAG) {
            let mut cells = Vec::with_capacity(self.parts.len());
            for part in &self.parts {
                let (&present, tail) = rest.split_first().ok_or_else(malformed)?;
                if present == 0 {
                    cells.push(None);
                    rest = tail;
                    continue;
                }
                let width = part.cell_width();
                if tail.len() < width {
                    return Err(malformed().into());
                }
                cells.push(Some(part.parse(&tail[..width])?));
                rest = &tail[width..];
            }
            if !rest.is_empty() {
                return Err(malformed().into());
            }
            self.add_row(group, &cells);
            return Ok(());
        }
        match self.output {
            Output::Sum => {
                let sum = SumRef::parse(bytes)?;
                let part = &mut self.parts[0];
                part.check_state(&sum.crypto)?;
                part.counts[group] = part.counts[group].saturating_add(sum.count);
                part.add_bodies(group, |limb| sum.body(limb));
                self.shared
                    .add_mask_sum(&mut self.adder, group, &sum.inline_mask()?);
            }
            Output::Bundle => {
                let bundle = BundleRef::parse(bytes)?;
                if bundle.parts.len() != self.parts.len() {
                    return Err(malformed().into());
                }
                for (part, state) in self.parts.iter_mut().zip(&bundle.parts) {
                    part.check_state(&state.crypto)?;
                    part.counts[group] = part.counts[group].saturating_add(state.count);
                    part.add_bodies(group, |limb| state.body(limb));
                    if let Some(own) = state.own {
                        let groups = self.groups;
                        let weighted = part.weighted;
                        part.own
                            .get_or_insert_with(|| MaskSums::with_groups(groups, weighted))
                            .add_mask_sum(&mut self.adder, group, &own);
                    }
                }
                self.shared
                    .add_mask_sum(&mut self.adder, group, &bundle.shared);
            }
        }
        Ok(())
    }

    /// Emits sums, bundles or partial states for the groups `emit_to` names and forgets them.
    fn emit(&mut self, emit_to: EmitTo, check_budget: bool) -> Result<ArrayRef> {
        self.add_pending(0);
        let n = match emit_to {
            EmitTo::All => self.groups,
            EmitTo::First(n) => n,
        };
        self.groups -= n;
        let mut taken = Vec::with_capacity(self.parts.len());
        for part in &mut self.parts {
            let counts = emit_to.take_needed(&mut part.counts);
            let bodies: Vec<u64> = part.bodies.drain(..n * part.limbs).collect();
            if check_budget {
                let max_rows = part.crypto.spec.max_rows();
                if let Some(&rows) = counts.iter().find(|&&c| c > max_rows) {
                    return Err(HedfError::BudgetExceeded {
                        column: part.column.clone(),
                        rows,
                        max_rows,
                        why: part.budget_reason(),
                    }
                    .into());
                }
            }
            taken.push((counts, bodies));
        }
        // Listed mask sums are small: the values' bytes are not known in advance.
        let mut builder = LargeBinaryBuilder::with_capacity(n, 0);
        let mut buffer = Vec::new();
        let (mut shared_bytes, mut own_bytes) = (Vec::new(), vec![Vec::new(); self.parts.len()]);
        let mut mask = vec![0u64; N];
        let add = self.adder.kernels.add;
        let adder = &self.adder;
        for g in 0..n {
            buffer.clear();
            match self.output {
                Output::Sum => {
                    let (part, (counts, bodies)) = (&self.parts[0], &taken[0]);
                    if counts[g] == 0 {
                        builder.append_null();
                        continue;
                    }
                    let own = part.own.as_ref();
                    let coefficients =
                        match (self.shared.sums.get(g), own.and_then(|o| o.sums.get(g))) {
                            (None, None) => None,
                            (Some(x), None) | (None, Some(x)) => Some(x),
                            (Some(x), Some(y)) => {
                                mask.copy_from_slice(x);
                                add(&mut mask, y);
                                Some(&mask[..])
                            }
                        };
                    let mut rows: Vec<ListedRow> = self.shared.listed_rows(adder, g).collect();
                    if let Some(own) = own {
                        rows.extend(own.listed_rows(adder, g));
                    }
                    let bodies = &bodies[g * part.limbs..(g + 1) * part.limbs];
                    write_sum(
                        &part.crypto,
                        counts[g],
                        bodies,
                        coefficients,
                        &mut rows,
                        &mut buffer,
                    )?;
                }
                Output::Bundle => {
                    if taken.iter().all(|(counts, _)| counts[g] == 0) {
                        builder.append_null();
                        continue;
                    }
                    shared_bytes.clear();
                    self.shared.write(adder, g, &mut shared_bytes)?;
                    let mut has_own = Vec::with_capacity(self.parts.len());
                    for (part, out) in self.parts.iter().zip(&mut own_bytes) {
                        out.clear();
                        let own = part.own.as_ref().filter(|o| o.has(g));
                        if let Some(own) = own {
                            own.write(adder, g, out)?;
                        }
                        has_own.push(own.is_some());
                    }
                    let parts: Vec<BundlePart<'_>> = self
                        .parts
                        .iter()
                        .zip(&taken)
                        .zip(&own_bytes)
                        .zip(has_own)
                        .map(|(((part, (counts, bodies)), own), has_own)| BundlePart {
                            crypto: &part.crypto,
                            count: counts[g],
                            bodies: &bodies[g * part.limbs..(g + 1) * part.limbs],
                            own: has_own.then_some(&own[..]),
                        })
                        .collect();
                    write_bundle(&parts, &shared_bytes, &mut buffer);
                }
            }
            builder.append_value(&buffer);
        }
        self.shared.release(n);
        for own in self.parts.iter_mut().filter_map(|p| p.own.as_mut()) {
            own.release(n);
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
        self.add_cells(values, group_indices, opt_filter)
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
        for (i, &group) in group_indices.iter().enumerate() {
            if states.is_valid(i) {
                self.merge_state(states.value(i), group)?;
                // States can bring many listed rows: keep what waits bounded.
                if self.pending_rows() > PENDING_ROWS {
                    self.add_pending(PENDING_ROWS);
                }
            }
        }
        self.add_pending(PENDING_ROWS);
        Ok(())
    }

    /// One row's state is its cells, tagged: no mask is expanded until rows meet in a group.
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let arrays = self.cell_arrays(values)?;
        let rows = values.first().map_or(0, |v| v.len());
        let states: LargeBinaryArray = (0..rows)
            .map(|i| {
                let keep = opt_filter.is_none_or(|f| f.is_valid(i) && f.value(i))
                    && arrays.iter().any(|a| a.is_valid(i));
                keep.then(|| {
                    let mut state = CELLS_STATE_TAG.to_vec();
                    for a in &arrays {
                        state.push(a.is_valid(i) as u8);
                        if a.is_valid(i) {
                            state.extend_from_slice(a.value(i));
                        }
                    }
                    state
                })
            })
            .collect();
        Ok(vec![Arc::new(states)])
    }

    fn size(&self) -> usize {
        let parts: usize = self
            .parts
            .iter()
            .map(|p| {
                8 * (p.counts.capacity() + p.bodies.capacity())
                    + p.own.as_ref().map_or(0, MaskSums::size)
            })
            .sum();
        let dense = if self.adder.dense.product.is_some() {
            DENSE_BYTES
        } else {
            0
        };
        parts + self.shared.size() + CACHED_CHUNKS * 8 * (4 * N + 1) + dense
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::client::test_support::{
        encrypted_zeros, extracted_mask, mask_sum_coefficients, sum_limb_phase,
    };
    use crate::crypto::keys::ClientKey;
    use tfhe::core_crypto::commons::math::random::RandomGenerator;
    use tfhe::core_crypto::prelude::DefaultRandomGenerator;
    use tfhe::core_crypto::seeders::new_seeder;

    /// Rows a group may list in the tests that try every way a mask sum can be kept: all
    /// listed, none, and listed rows added into coefficients later (pending).
    const MAX_LISTED: [usize; 3] = [LISTED_ROWS, 0, 50];

    /// The accumulator's mask sums (runs by prefix sums, lone rows, any interleaving of groups,
    /// listed rows) equal the naive sum of the LWE masks tfhe extracts row by row.
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
        for max_listed in MAX_LISTED {
            let mut acc = HeSumGroupsAccumulator::new(vec![("v".into(), crypto)]);
            acc.adder.max_listed = max_listed;
            acc.update_batch(std::slice::from_ref(&cells), &groups, None, 7)
                .unwrap();
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
                let mask = sum.inline_mask().unwrap();
                assert_eq!(
                    (mask.coefficients().is_some(), mask.listed().len() > 0),
                    (
                        max_listed < sum.count as usize,
                        max_listed >= sum.count as usize
                    ),
                    "group {g} listed at most {max_listed}"
                );
                assert_eq!(&mask_sum_coefficients(&mask), want, "group {g}");
            }
        }
    }

    /// Partial states of every kind (listed rows, coefficients, both; rows of two mask
    /// streams) merged in any order by an accumulator that lists few rows, emitted in two
    /// steps (so listed rows wait to be added at the first), equal the naive sums; also when
    /// its seed table is full and rows of a new stream must take coefficients at once.
    #[test]
    fn merged_states_of_every_kind_equal_the_naive_sums() {
        let key = ClientKey::generate();
        let rows = N + 700;
        let (crypto, a) = encrypted_zeros(&key, rows);
        let (_, b) = encrypted_zeros(&key, rows);
        let cells = arrow::compute::concat(&[&a, &b]).unwrap();
        let fixed = cells.as_fixed_size_binary();
        let mut rng = RandomGenerator::<DefaultRandomGenerator>::new(new_seeder().seed());
        let groups: Vec<usize> = (0..2 * rows)
            .map(|_| (rng.random_uniform::<u64>() % 5) as usize)
            .collect();
        let mut naive = vec![vec![0u64; N]; 5];
        let (mut bodies, mut counts) = ([0u64; 5], [0u64; 5]);
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
            bodies[g] = bodies[g].wrapping_add(cell.body(0));
            counts[g] += 1;
        }
        // Three partial accumulators over interleaved slices, each keeping mask sums its way.
        let mut states = Vec::new();
        for (part, max_listed) in MAX_LISTED.into_iter().enumerate() {
            let take: Vec<u32> = (part..2 * rows).step_by(3).map(|i| i as u32).collect();
            let take = arrow::array::UInt32Array::from(take);
            let slice = arrow::compute::take(&cells, &take, None).unwrap();
            let slice_groups: Vec<usize> =
                take.values().iter().map(|&i| groups[i as usize]).collect();
            let mut acc = HeSumGroupsAccumulator::new(vec![("v".into(), crypto)]);
            acc.adder.max_listed = max_listed;
            acc.update_batch(&[slice], &slice_groups, None, 5).unwrap();
            states.push(acc.state(EmitTo::All).unwrap().remove(0));
        }
        for max_seeds in [MAX_SEEDS, 1] {
            let mut acc = HeSumGroupsAccumulator::new(vec![("v".into(), crypto)]);
            (acc.adder.max_listed, acc.adder.max_seeds) = (900, max_seeds);
            for state in states.iter().rev() {
                acc.merge_batch(std::slice::from_ref(state), &[4, 3, 2, 1, 0], 5)
                    .unwrap();
            }
            let first = acc.evaluate(EmitTo::First(2)).unwrap();
            let rest = acc.evaluate(EmitTo::All).unwrap();
            let sums: Vec<Vec<u8>> = [first, rest]
                .iter()
                .flat_map(|a| {
                    let a = a.as_binary::<i64>();
                    (0..a.len())
                        .map(|i| a.value(i).to_vec())
                        .collect::<Vec<_>>()
                })
                .collect();
            for (merged, bytes) in sums.iter().enumerate() {
                let g = 4 - merged;
                let sum = SumRef::parse(bytes).unwrap();
                assert_eq!((sum.count, sum.body(0)), (counts[g], bodies[g]));
                let mask = sum.inline_mask().unwrap();
                assert_eq!(
                    mask_sum_coefficients(&mask),
                    naive[g],
                    "group {g}, {max_seeds} seeds"
                );
            }
        }
    }

    /// A weighted column's sums equal `sum w * body` and `sum w * mask` over tfhe's extracted
    /// samples, with runs of equal weights (taken as windows), lone rows, negative, zero and
    /// huge weights, and its count is the rows its weights use (saturating, then refused).
    #[test]
    fn weighted_sums_equal_the_naive_weighted_sums_of_extracted_samples() {
        let key = ClientKey::generate();
        let rows = N + 500;
        let (crypto, cells) = encrypted_zeros(&key, rows);
        let fixed = cells.as_fixed_size_binary();
        let mut rng = RandomGenerator::<DefaultRandomGenerator>::new(new_seeder().seed());
        let choices = [-3i64, 0, 1, 2, 7, -1 << 40];
        let (mut groups, mut weights) = (Vec::new(), Vec::new());
        while groups.len() < rows {
            let group = (rng.random_uniform::<u64>() % 5) as usize;
            let weight = choices[(rng.random_uniform::<u64>() % 6) as usize];
            let run = (1 + (rng.random_uniform::<u64>() % 30) as usize).min(rows - groups.len());
            groups.extend(std::iter::repeat_n(group, run));
            weights.extend(std::iter::repeat_n(weight, run));
        }
        let weighted = weighted_cells(&crypto, fixed, &weights);
        let (mut mask, mut body, mut count) = (vec![vec![0u64; N]; 6], [0u64; 6], [0u64; 6]);
        let mut masks = MaskGenerator::default();
        for (i, (&g, &w)) in groups.iter().zip(&weights).enumerate() {
            let cell = CellRef::parse(fixed.value(i), &crypto).unwrap();
            for (n, m) in
                mask[g]
                    .iter_mut()
                    .zip(extracted_mask(&mut masks, cell.seed(), cell.row()))
            {
                *n = n.wrapping_add((w as u64).wrapping_mul(m));
            }
            body[g] = body[g].wrapping_add((w as u64).wrapping_mul(cell.body(0)));
            let rows = (w.unsigned_abs() as u128).pow(2).clamp(1, u64::MAX as u128);
            count[g] = count[g].saturating_add(rows as u64);
        }
        for max_listed in MAX_LISTED {
            let mut acc = HeSumGroupsAccumulator::weighted(("v".into(), crypto));
            acc.adder.max_listed = max_listed;
            acc.update_batch(std::slice::from_ref(&weighted), &groups, None, 6)
                .unwrap();
            let states = acc.state(EmitTo::All).unwrap().remove(0);
            let states = states.as_binary::<i64>();
            for g in 0..6 {
                if !groups.contains(&g) {
                    assert!(states.is_null(g));
                    continue;
                }
                let sum = SumRef::parse(states.value(g)).unwrap();
                assert_eq!((sum.count, sum.body(0)), (count[g], body[g]), "group {g}");
                let got = mask_sum_coefficients(&sum.inline_mask().unwrap());
                assert_eq!(got, mask[g], "group {g}, listed at most {max_listed}");
            }
        }
        // A group of weight 2^40 uses 2^80 rows: over any budget, refused when evaluated.
        let mut acc = HeSumGroupsAccumulator::weighted(("v".into(), crypto));
        let one = weighted_cells(&crypto, &fixed.slice(0, 1), &[1 << 40]);
        acc.update_batch(&[one], &[0], None, 1).unwrap();
        let err = acc.evaluate(EmitTo::All).unwrap_err().to_string();
        assert!(err.contains("counts as w^2 rows"), "{err}");
    }

    /// `cells` each weighted by its weight.
    fn weighted_cells(
        crypto: &ColumnCrypto,
        cells: &FixedSizeBinaryArray,
        weights: &[i64],
    ) -> ArrayRef {
        use crate::crypto::cell::write_weighted_cell;
        let width = crypto.weighted_cell_width();
        let mut builder = arrow::array::FixedSizeBinaryBuilder::new(width as i32);
        let mut buffer = vec![0u8; width];
        for (i, &w) in weights.iter().enumerate() {
            write_weighted_cell(&mut buffer, cells.value(i), w);
            builder.append_value(&buffer).unwrap();
        }
        Arc::new(builder.finish())
    }

    /// The dense path (a group's mask sum in a chunk as one FFT product) gives the direct
    /// path's sums bit for bit: three groups with lone rows, runs and repeated rows, unweighted
    /// and weighted, with weights small enough for a product and (in some chunks) too large,
    /// where it must fall back.
    #[test]
    fn dense_groups_sum_exactly_as_the_direct_path() {
        let key = ClientKey::generate();
        let rows = 2 * N + 100;
        let (crypto, cells) = encrypted_zeros(&key, rows);
        let fixed = cells.as_fixed_size_binary();
        let mut rng = RandomGenerator::<DefaultRandomGenerator>::new(new_seeder().seed());
        let mut random = |n: u64| rng.random_uniform::<u64>() % n;
        // Row i, or its predecessor again (a join's repeated row); runs where group repeats.
        let order: Vec<u32> = (0..rows as u32)
            .map(|i| if i > 0 && random(10) == 0 { i - 1 } else { i })
            .collect();
        let take: ArrayRef = Arc::new(arrow::array::UInt32Array::from(order));
        let cells = arrow::compute::take(fixed, &take, None).unwrap();
        let fixed = cells.as_fixed_size_binary();
        let groups: Vec<usize> = (0..rows)
            .map(|i| if i % 50 < 10 { 2 } else { random(3) as usize })
            .collect();
        let small: Vec<i64> = (0..rows)
            .map(|_| [-3, 1, 2, 7][random(4) as usize])
            .collect();
        let large: Vec<i64> = (0..rows)
            .map(|i| {
                if i > N && random(100) == 0 {
                    1 << 20
                } else {
                    5
                }
            })
            .collect();
        let state = |acc: &mut HeSumGroupsAccumulator, values: &ArrayRef, min_windows: usize| {
            acc.adder.dense.min_windows = min_windows;
            acc.adder.max_listed = 0;
            acc.update_batch(std::slice::from_ref(values), &groups, None, 3)
                .unwrap();
            let states = acc.state(EmitTo::All).unwrap().remove(0);
            (0..3)
                .map(|g| states.as_binary::<i64>().value(g).to_vec())
                .collect::<Vec<_>>()
        };
        let plain = || HeSumGroupsAccumulator::new(vec![("v".into(), crypto)]);
        let weighted = || HeSumGroupsAccumulator::weighted(("v".into(), crypto));
        assert_eq!(
            state(&mut plain(), &cells, 0),
            state(&mut plain(), &cells, usize::MAX)
        );
        for weights in [small, large] {
            let values = weighted_cells(&crypto, fixed, &weights);
            assert_eq!(
                state(&mut weighted(), &values, 0),
                state(&mut weighted(), &values, usize::MAX)
            );
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
            weights: vec![(5, 1, 1), (u64::MAX, 3, 1), (1 << 40, 3, 2)],
            weighted_singles: vec![3, N - 1, 11],
            weighted_runs: vec![(7, 800), (0, N)],
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
        // The generic kernel against the windows' definition, coefficient by coefficient.
        let mut naive = start.clone();
        for i in 0..N {
            let run = |h: usize, l: usize| prefix[h + i].wrapping_sub(prefix[l + i]);
            let mut v = naive[i].wrapping_add(x[i]);
            v = windows
                .singles
                .iter()
                .fold(v, |v, &o| v.wrapping_add(single[o + i]));
            v = windows
                .runs
                .iter()
                .fold(v, |v, &(h, l)| v.wrapping_add(run(h, l)));
            for (w, o) in [(5, 3), (u64::MAX, N - 1), (u64::MAX, 11)] {
                v = v.wrapping_add(w.wrapping_mul(single[o + i]));
            }
            for (w, (h, l)) in [(5u64, (7, 800)), (1 << 40, (0, N))] {
                v = v.wrapping_add(w.wrapping_mul(run(h, l)));
            }
            naive[i] = v;
        }
        assert_eq!(reference, naive);
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
        let mut acc = HeSumGroupsAccumulator::new(vec![("v".into(), crypto)]);
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
