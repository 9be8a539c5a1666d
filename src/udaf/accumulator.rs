//! The he_sum group accumulator: per group, a row count, the limb body sums and the limb mask
//! sums (N coefficients each). Adds are wrapping u64 on the torus; nothing here needs a key.
//!
//! Row `j` of a chunk with mask polynomial `a` is the LWE sample extracted at slot `j`, whose mask
//! is `v_j[i] = w[j - i]` with `w[t] = a[t]` for `t >= 0` and `w[t] = -a[N + t]` for `t < 0`.
//! With `R` the reversed prefix sums of `w` (built once per chunk, O(N)), a run of consecutive
//! slots `j0..=j1` of one group adds `R[N-1-j1+i] - R[N-j0+i]` to coefficient `i`: O(N) for the
//! whole run, however long. Clustered data costs O(N) per chunk; scattered rows O(N) per row.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, LargeBinaryArray, LargeBinaryBuilder};
use datafusion::error::Result;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};

use crate::cell::{write_sum, CellRef, ColumnCrypto, SumRef};
use crate::error::HedfError;
use crate::mask::MaskGenerator;
use crate::params::POLYNOMIAL_SIZE as N;

/// State tag of a single cell sent as partial state (cheap `convert_to_state`).
const CELL_STATE_TAG: &[u8; 4] = b"HCEL";
/// Chunks whose prefix sums stay cached; rows arrive in chunk order, so a few suffice.
const CACHED_CHUNKS: usize = 4;

/// Reversed prefix sums of chunk masks, keyed by (seed, chunk).
struct PrefixCache {
    masks: MaskGenerator,
    entries: Vec<(u128, u64, Vec<u64>)>,
    next_victim: usize,
}

impl PrefixCache {
    fn new() -> Self {
        PrefixCache {
            masks: MaskGenerator::default(),
            entries: Vec::new(),
            next_victim: 0,
        }
    }

    fn get(&mut self, seed: u128, chunk: u64) -> &[u64] {
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.0 == seed && e.1 == chunk)
        {
            return &self.entries[i].2;
        }
        let slot = if self.entries.len() < CACHED_CHUNKS {
            self.entries.push((seed, chunk, vec![0u64; 2 * N + 1]));
            self.entries.len() - 1
        } else {
            self.next_victim = (self.next_victim + 1) % CACHED_CHUNKS;
            self.next_victim
        };
        let a = self.masks.generate(seed, chunk);
        let entry = &mut self.entries[slot];
        entry.0 = seed;
        entry.1 = chunk;
        // P[k+1] = P[k] + w[k - N], stored reversed: R[m] = P[2N - m].
        let r = &mut entry.2;
        r[2 * N] = 0;
        let mut acc = 0u64;
        for k in 0..2 * N {
            let w = if k < N { a[k].wrapping_neg() } else { a[k - N] };
            acc = acc.wrapping_add(w);
            r[2 * N - (k + 1)] = acc;
        }
        &self.entries[slot].2
    }
}

/// A run of consecutive slots of one chunk, all in one group.
struct Run {
    group: usize,
    row_start: u64,
    row_end: u64,
    seeds_at: usize,
}

pub struct HeSumAccumulator {
    column: String,
    crypto: ColumnCrypto,
    limbs: usize,
    counts: Vec<u64>,
    bodies: Vec<u64>,
    masks: Vec<u64>,
    prefixes: PrefixCache,
}

impl std::fmt::Debug for HeSumAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeSumAccumulator")
            .field("column", &self.column)
            .field("groups", &self.counts.len())
            .finish()
    }
}

impl HeSumAccumulator {
    pub fn new(column: String, crypto: ColumnCrypto) -> Self {
        HeSumAccumulator {
            column,
            limbs: crypto.spec.limbs as usize,
            crypto,
            counts: Vec::new(),
            bodies: Vec::new(),
            masks: Vec::new(),
            prefixes: PrefixCache::new(),
        }
    }

    /// Makes room for `groups` groups (new ones start empty).
    pub(crate) fn resize(&mut self, groups: usize) {
        self.counts.resize(groups, 0);
        self.bodies.resize(groups * self.limbs, 0);
        self.masks.resize(groups * self.limbs * N, 0);
    }

    /// Adds the masks of `run` (all limbs) to its group.
    fn flush(&mut self, run: &Run, cells: &[u8], width: usize) {
        let cell = CellRef::parse(
            &cells[run.seeds_at * width..(run.seeds_at + 1) * width],
            &self.crypto,
        )
        .expect("validated when the run was built");
        let chunk = run.row_start / N as u64;
        let j0 = (run.row_start % N as u64) as usize;
        let j1 = (run.row_end % N as u64) as usize;
        for limb in 0..self.limbs {
            let r = self.prefixes.get(cell.seed(limb), chunk);
            let (hi, lo) = (&r[N - 1 - j1..2 * N - 1 - j1], &r[N - j0..2 * N - j0]);
            let at = (run.group * self.limbs + limb) * N;
            for ((acc, &h), &l) in self.masks[at..at + N].iter_mut().zip(hi).zip(lo) {
                *acc = acc.wrapping_add(h.wrapping_sub(l));
            }
        }
    }

    /// Accumulates the valid cells of `cells` (row i into group `groups[i]`).
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
        let seeds_len = 16 * self.limbs;
        let mut run: Option<Run> = None;
        for (i, &group) in groups.iter().enumerate() {
            if array.is_null(i) || filter.is_some_and(|f| !f.is_valid(i) || !f.value(i)) {
                continue;
            }
            let bytes = &cells[i * width..(i + 1) * width];
            let cell = CellRef::parse(bytes, &self.crypto)?;
            self.counts[group] += 1;
            for limb in 0..self.limbs {
                let b = &mut self.bodies[group * self.limbs + limb];
                *b = b.wrapping_add(cell.body(limb));
            }
            let row = cell.row();
            if let Some(r) = run.as_mut() {
                let same_seeds = cells
                    [r.seeds_at * width + 20..r.seeds_at * width + 20 + seeds_len]
                    == bytes[20..20 + seeds_len];
                if r.group == group && row == r.row_end + 1 && row % N as u64 != 0 && same_seeds {
                    r.row_end = row;
                    continue;
                }
                let done = run.take().expect("present");
                self.flush(&done, cells, width);
            }
            run = Some(Run {
                group,
                row_start: row,
                row_end: row,
                seeds_at: i,
            });
        }
        if let Some(done) = run {
            self.flush(&done, cells, width);
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
            let at = (group * self.limbs + limb) * N;
            for (acc, m) in self.masks[at..at + N].iter_mut().zip(sum.mask(limb)) {
                *acc = acc.wrapping_add(m);
            }
        }
        Ok(())
    }

    /// Emits sums (or partial states) for the groups `emit_to` names and forgets them.
    fn emit(&mut self, emit_to: EmitTo, check_budget: bool) -> Result<ArrayRef> {
        let counts = emit_to.take_needed(&mut self.counts);
        let n = counts.len();
        let bodies: Vec<u64> = self.bodies.drain(..n * self.limbs).collect();
        let masks: Vec<u64> = self.masks.drain(..n * self.limbs * N).collect();
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
            let limbs = g * self.limbs..(g + 1) * self.limbs;
            write_sum(
                &self.crypto,
                count,
                &bodies[limbs.clone()],
                &masks[limbs.start * N..limbs.end * N],
                &mut buffer,
            );
            builder.append_value(&buffer);
        }
        Ok(Arc::new(builder.finish()))
    }
}

impl GroupsAccumulator for HeSumAccumulator {
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
            + CACHED_CHUNKS * 8 * (2 * N + 1)
    }
}
