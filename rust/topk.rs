//! Exact top-k cosine similarity of query vectors against a dense corpus.
//!
//! The corpus is streamed from memory once per call: rayon splits it into a few large contiguous
//! chunks (sequential reads keep the hardware prefetchers busy), each thread walks its chunk in
//! cache-sized blocks, and every query tile passes over a block while it is in cache. The first
//! tile's pass also computes the rows' norms, so no second pass over the corpus is needed. Each
//! unit of work keeps a bounded heap per query that rejects most rows with one comparison; the
//! heaps are merged at the end. Scores are `dot(q / |q|, c) / |c|`; zero vectors score 0.

mod kernel;

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ops::Range;

use half::f16;
use ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::errors::{self, Error, Result};
use kernel::{tile_dots, Element, Isa, QUERY_ALIGN};

/// Bytes of corpus rows per block: the block stays in L1/L2 while every query tile passes over it.
const BLOCK_BYTES: usize = 48 * 1024;
/// Block row counts are a multiple of this, so the kernels' row steps (2, 3 or 4) divide them.
const BLOCK_ROW_MULTIPLE: usize = 12;
/// Work units per thread: enough for rayon to even out a busy core, few enough that each unit
/// streams a long contiguous run of the corpus.
const UNITS_PER_THREAD: usize = 4;
/// Fewest rows worth a unit of their own.
const MIN_UNIT_ROWS: usize = 2048;
/// Below this squared norm (or when it overflows f32) a row is scored in f64 instead.
const TINY_NORM_SQ: f32 = 1e-30;

/// Row-major corpus data, `rows * dim` values.
#[derive(Clone, Copy)]
pub enum Corpus<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl Corpus<'_> {
    fn len(&self) -> usize {
        match self {
            Corpus::F32(values) => values.len(),
            Corpus::F16(values) => values.len(),
        }
    }
}

/// Best-first results, `[queries, min(k, rows)]`.
#[derive(Debug)]
pub struct TopK {
    pub indices: Array2<i64>,
    pub scores: Array2<f32>,
}

/// A scored corpus row ordered so that the worse of two compares greater: lower score, or on an
/// equal score the higher index.
#[derive(Clone, Copy, Debug)]
struct Hit {
    score: f32,
    index: usize,
}

impl Ord for Hit {
    fn cmp(&self, other: &Self) -> Ordering {
        // Scores are finite (inputs are validated), so partial_cmp never fails; -0.0 ties 0.0.
        other
            .score
            .partial_cmp(&self.score)
            .unwrap_or(Ordering::Equal)
            .then(self.index.cmp(&other.index))
    }
}

impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Hit {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Hit {}

/// The `k` best hits seen so far; the heap's top is the worst of them.
struct Best {
    k: usize,
    heap: BinaryHeap<Hit>,
    /// Score a hit must reach to be offered: the worst kept score once `k` are kept. An equal
    /// score may still win on a lower index, so the filter is `>=`.
    threshold: f32,
}

impl Best {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
            threshold: f32::NEG_INFINITY,
        }
    }

    fn offer(&mut self, hit: Hit) {
        if self.heap.len() < self.k {
            self.heap.push(hit);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if hit < *worst {
                *worst = hit;
            }
        }
        if self.heap.len() == self.k {
            self.threshold = self
                .heap
                .peek()
                .map_or(f32::NEG_INFINITY, |worst| worst.score);
        }
    }

    /// Offers `first + r` for every row whose `dots[r] * inv_norms[r]` reaches the threshold.
    /// Rows with a NaN inverse norm never do; they are scored separately.
    #[allow(clippy::needless_bitwise_bool)]
    fn offer_block(&mut self, dots: &[f32], inv_norms: &[f32], first: usize) {
        const GROUP: usize = 16;
        for (g, (dots, inv_norms)) in dots.chunks(GROUP).zip(inv_norms.chunks(GROUP)).enumerate() {
            // Almost every group is rejected whole; `|` instead of `any` keeps this branch-free so
            // it compiles to a few vector compares.
            let threshold = self.threshold;
            let candidate = dots
                .iter()
                .zip(inv_norms)
                .fold(false, |seen, (&dot, &inv)| seen | (dot * inv >= threshold));
            if !candidate {
                continue;
            }
            for (offset, (&dot, &inv)) in dots.iter().zip(inv_norms).enumerate() {
                let score = dot * inv;
                if score >= self.threshold {
                    self.offer(Hit {
                        score,
                        index: first + g * GROUP + offset,
                    });
                }
            }
        }
    }

    fn merge(&mut self, other: Best) {
        for hit in other.heap {
            self.offer(hit);
        }
    }
}

/// Unit queries, each zero-padded to `stride` values for the kernel.
struct Queries {
    values: Vec<f32>,
    dim: usize,
    stride: usize,
}

impl Queries {
    fn count(&self) -> usize {
        self.values.len() / self.stride
    }

    fn get(&self, range: Range<usize>) -> &[f32] {
        &self.values[range.start * self.stride..range.end * self.stride]
    }

    fn unpadded(&self, index: usize) -> &[f32] {
        &self.values[index * self.stride..index * self.stride + self.dim]
    }
}

/// Exact cosine top-k of each query (`[queries.len() / dim, dim]`) against `corpus`
/// (`[corpus.len() / dim, dim]`), best first, ties broken by lower corpus index.
pub fn top_k_cosine(queries: &[f32], corpus: Corpus<'_>, dim: usize, k: usize) -> Result<TopK> {
    if k == 0 {
        return Err(Error::argument("k", "at least 1", k));
    }
    let Some(n_rows) = corpus.len().checked_div(dim) else {
        return Err(Error::array(
            "queries",
            "vectors must have at least one dimension",
        ));
    };
    let queries = unit_queries(queries, dim)?;
    let n_queries = queries.count();
    let k = k.min(n_rows);
    let mut best: Vec<Best> = (0..n_queries).map(|_| Best::new(k)).collect();
    if k > 0 && n_queries > 0 {
        let isa = Isa::detect();
        let plan = Plan::new(isa, n_queries, n_rows);
        let partials = plan
            .units()
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(group, rows)| {
                let scan = Scan::new(isa, &queries, group.clone(), k);
                Ok((group, scan.run(corpus, rows)?))
            })
            .collect::<Result<Vec<_>>>()?;
        for (group, partial) in partials {
            for (mine, theirs) in best[group].iter_mut().zip(partial) {
                mine.merge(theirs);
            }
        }
    }

    let mut indices = Array2::zeros((n_queries, k));
    let mut scores = Array2::zeros((n_queries, k));
    for (q, best) in best.into_iter().enumerate() {
        for (rank, hit) in best.heap.into_sorted_vec().into_iter().enumerate() {
            indices[[q, rank]] = hit.index as i64;
            scores[[q, rank]] = hit.score;
        }
    }
    Ok(TopK { indices, scores })
}

/// How the work is cut: the corpus into contiguous row chunks, and, when there are too few chunks
/// to occupy every thread, the queries into groups. A unit is one group against one chunk.
struct Plan {
    n_rows: usize,
    chunks: usize,
    group_size: usize,
    n_queries: usize,
}

impl Plan {
    fn new(isa: Isa, n_queries: usize, n_rows: usize) -> Self {
        let wanted = rayon::current_num_threads() * UNITS_PER_THREAD;
        let chunks = (n_rows / MIN_UNIT_ROWS).clamp(1, wanted);
        let tile = isa.max_tile();
        let groups = (wanted / chunks).clamp(1, n_queries.div_ceil(tile));
        let group_size = n_queries.div_ceil(groups).next_multiple_of(tile);
        Self {
            n_rows,
            chunks,
            group_size,
            n_queries,
        }
    }

    fn units(&self) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + '_ {
        let groups = (0..self.n_queries)
            .step_by(self.group_size)
            .map(|start| start..(start + self.group_size).min(self.n_queries));
        groups.flat_map(move |group| {
            (0..self.chunks).map(move |c| {
                let rows = c * self.n_rows / self.chunks..(c + 1) * self.n_rows / self.chunks;
                (group.clone(), rows)
            })
        })
    }
}

/// One unit of work: a group of queries against a run of corpus rows, with its scratch buffers.
struct Scan<'a> {
    isa: Isa,
    queries: &'a Queries,
    group: Range<usize>,
    best: Vec<Best>,
    dots: Vec<f32>,
    norms_sq: Vec<f32>,
    inv_norms: Vec<f32>,
    extreme: Vec<usize>,
}

impl<'a> Scan<'a> {
    fn new(isa: Isa, queries: &'a Queries, group: Range<usize>, k: usize) -> Self {
        Self {
            isa,
            queries,
            best: group.clone().map(|_| Best::new(k)).collect(),
            group,
            dots: Vec::new(),
            norms_sq: Vec::new(),
            inv_norms: Vec::new(),
            extreme: Vec::new(),
        }
    }

    fn run(self, corpus: Corpus<'_>, rows: Range<usize>) -> Result<Vec<Best>> {
        match corpus {
            Corpus::F32(values) => self.run_typed(values, rows),
            Corpus::F16(values) => self.run_typed(values, rows),
        }
    }

    fn run_typed<E: Element>(mut self, corpus: &[E], rows: Range<usize>) -> Result<Vec<Best>> {
        let dim = self.queries.dim;
        let block_rows = (BLOCK_BYTES / (dim * size_of::<E>()))
            .next_multiple_of(BLOCK_ROW_MULTIPLE)
            .max(BLOCK_ROW_MULTIPLE);
        self.dots.resize(self.isa.max_tile() * block_rows, 0.0);
        self.norms_sq.resize(block_rows, 0.0);
        for first in rows.clone().step_by(block_rows) {
            let last = (first + block_rows).min(rows.end);
            self.block(&corpus[first * dim..last * dim], first)?;
        }
        Ok(self.best)
    }

    fn block<E: Element>(&mut self, block: &[E], first: usize) -> Result<()> {
        let dim = self.queries.dim;
        let n = block.len() / dim;
        let mut start = self.group.start;
        while start < self.group.end {
            let width = tile_width(self.group.end - start, self.isa.max_tile());
            let tile = start..start + width;
            let norms = (start == self.group.start).then_some(&mut self.norms_sq[..n]);
            let with_norms = norms.is_some();
            let dots = &mut self.dots[..width * n];
            tile_dots(
                self.isa,
                self.queries.get(tile.clone()),
                self.queries.stride,
                block,
                dim,
                dots,
                norms,
            );
            if with_norms {
                self.inverse_norms(block, first)?;
            }
            for (t, query) in tile.clone().enumerate() {
                let best = &mut self.best[query - self.group.start];
                best.offer_block(&self.dots[t * n..(t + 1) * n], &self.inv_norms, first);
                for &offset in &self.extreme {
                    let row: Vec<f32> = block[offset * dim..(offset + 1) * dim]
                        .iter()
                        .map(|v| v.to_f32())
                        .collect();
                    best.offer(Hit {
                        score: extreme_row_score(self.queries.unpadded(query), &row),
                        index: first + offset,
                    });
                }
            }
            start = tile.end;
        }
        Ok(())
    }

    /// `1 / |row|` from the squared norms the kernel produced. A row whose squared norm under- or
    /// overflows f32 gets NaN and is listed in `extreme`, to be scored in f64 (see
    /// `extreme_row_score`). Rejects non-finite values.
    fn inverse_norms<E: Element>(&mut self, block: &[E], first: usize) -> Result<()> {
        let dim = self.queries.dim;
        let n = block.len() / dim;
        self.inv_norms.clear();
        self.extreme.clear();
        for (offset, &norm_sq) in self.norms_sq[..n].iter().enumerate() {
            if norm_sq.is_finite() && norm_sq >= TINY_NORM_SQ {
                self.inv_norms.push(norm_sq.sqrt().recip());
                continue;
            }
            let row = &block[offset * dim..(offset + 1) * dim];
            if row.iter().any(|v| !v.to_f32().is_finite()) {
                return Err(Error::NonFinite {
                    name: "corpus",
                    row: first + offset,
                });
            }
            self.inv_norms.push(f32::NAN);
            self.extreme.push(offset);
        }
        Ok(())
    }
}

/// Queries per kernel call: the widest tile that fits, else the largest power of two that does.
fn tile_width(left: usize, max_tile: usize) -> usize {
    if left >= max_tile {
        max_tile
    } else {
        1 << left.ilog2()
    }
}

/// Queries scaled to unit length (zero stays zero), computed in f64 so no input overflows.
fn unit_queries(queries: &[f32], dim: usize) -> Result<Queries> {
    let stride = dim.next_multiple_of(QUERY_ALIGN);
    let mut values = vec![0.0; queries.len() / dim * stride];
    for (row, (query, unit)) in queries
        .chunks_exact(dim)
        .zip(values.chunks_exact_mut(stride))
        .enumerate()
    {
        if query.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                name: "queries",
                row,
            });
        }
        let norm = query
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        let scale = if norm > 0.0 { norm.recip() } else { 0.0 };
        for (u, &v) in unit.iter_mut().zip(query) {
            *u = (f64::from(v) * scale) as f32;
        }
    }
    Ok(Queries {
        values,
        dim,
        stride,
    })
}

fn extreme_row_score(unit_query: &[f32], row: &[f32]) -> f32 {
    let norm = row
        .iter()
        .map(|&v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return 0.0;
    }
    let dot: f64 = unit_query
        .iter()
        .zip(row)
        .map(|(&q, &c)| f64::from(q) * f64::from(c))
        .sum();
    (dot / norm) as f32
}

fn dims(name: &'static str, array: &Bound<'_, PyUntypedArray>) -> Result<(usize, usize)> {
    match array.shape() {
        &[rows, dim] => Ok((rows, dim)),
        shape => Err(Error::array(
            name,
            format!("expected a 2-D array, got shape {shape:?}"),
        )),
    }
}

fn contiguous<'a, T: numpy::Element + Copy>(array: &'a PyReadonlyArray2<'_, T>) -> Cow<'a, [T]> {
    match array.as_slice() {
        Ok(slice) => Cow::Borrowed(slice),
        Err(_) => Cow::Owned(array.as_array().iter().copied().collect()),
    }
}

fn typed<'py, T: numpy::Element>(
    array: &Bound<'py, PyUntypedArray>,
) -> Option<PyReadonlyArray2<'py, T>> {
    array
        .cast::<numpy::PyArray2<T>>()
        .ok()
        .map(PyArrayMethods::readonly)
}

/// `(indices, scores)` as numpy arrays.
type TopKArrays<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);

#[pyfunction]
#[pyo3(signature = (queries, corpus, k))]
pub fn topk_cosine<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    corpus: &Bound<'py, PyAny>,
    k: i64,
) -> PyResult<TopKArrays<'py>> {
    let queries = queries
        .cast::<PyUntypedArray>()
        .map_err(|_| Error::array("queries", "expected a numpy array"))?;
    let corpus = corpus
        .cast::<PyUntypedArray>()
        .map_err(|_| Error::array("corpus", "expected a numpy array"))?;
    let (_, q_dim) = dims("queries", queries)?;
    let (_, c_dim) = dims("corpus", corpus)?;
    if q_dim != c_dim {
        return Err(Error::array(
            "corpus",
            format!("dimension {c_dim} does not match the queries' {q_dim}"),
        )
        .into());
    }
    let k = usize::try_from(k).map_err(|_| Error::argument("k", "at least 1", k))?;
    let queries =
        typed::<f32>(queries).ok_or_else(|| Error::array("queries", "expected dtype float32"))?;
    let queries = contiguous(&queries);
    let result = if let Some(corpus) = typed::<f32>(corpus) {
        let corpus = contiguous(&corpus);
        errors::detach(py, || {
            top_k_cosine(&queries, Corpus::F32(&corpus), q_dim, k)
        })
    } else if let Some(corpus) = typed::<f16>(corpus) {
        let corpus = contiguous(&corpus);
        errors::detach(py, || {
            top_k_cosine(&queries, Corpus::F16(&corpus), q_dim, k)
        })
    } else {
        return Err(Error::array("corpus", "expected dtype float32 or float16").into());
    }?;
    Ok((
        result.indices.into_pyarray(py),
        result.scores.into_pyarray(py),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Scores every row in f64 and sorts (score desc, index asc).
    fn brute_force(
        queries: &[f32],
        corpus: &[f32],
        dim: usize,
        k: usize,
    ) -> Vec<Vec<(usize, f64)>> {
        let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        queries
            .chunks_exact(dim)
            .map(|q| {
                let mut scored: Vec<(usize, f64)> = corpus
                    .chunks_exact(dim)
                    .enumerate()
                    .map(|(i, c)| {
                        let dot: f64 = q
                            .iter()
                            .zip(c)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum();
                        let denom = norm(q) * norm(c);
                        (i, if denom == 0.0 { 0.0 } else { dot / denom })
                    })
                    .collect();
                scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                scored.truncate(k);
                scored
            })
            .collect()
    }

    #[test]
    fn matches_brute_force_across_tiles_and_blocks() {
        for (n_queries, n_rows, dim, k) in [
            (1, 1000, 384, 10),
            (7, 3001, 37, 5),
            (5, 50, 16, 50),
            (9, 1, 3, 4),
        ] {
            let queries = pseudo_random(n_queries * dim, 1);
            let corpus = pseudo_random(n_rows * dim, 2);
            let result = top_k_cosine(&queries, Corpus::F32(&corpus), dim, k).unwrap();
            let expected = brute_force(&queries, &corpus, dim, k);
            assert_eq!(result.indices.shape(), &[n_queries, k.min(n_rows)]);
            for (q, want) in expected.iter().enumerate() {
                for (rank, &(index, score)) in want.iter().enumerate() {
                    assert!((f64::from(result.scores[[q, rank]]) - score).abs() < 1e-5);
                    assert_eq!(
                        result.indices[[q, rank]],
                        index as i64,
                        "query {q} rank {rank}"
                    );
                }
            }
        }
    }

    #[test]
    fn ties_prefer_lower_index_and_zero_rows_score_zero() {
        let dim = 3;
        let corpus = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let result = top_k_cosine(&[2.0, 0.0, 0.0], Corpus::F32(&corpus), dim, 10).unwrap();
        assert_eq!(result.indices.row(0).to_vec(), vec![1, 3, 0, 2]);
        assert_eq!(result.scores.row(0).to_vec(), vec![1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn empty_corpus_gives_empty_rows() {
        let result = top_k_cosine(&[1.0, 2.0], Corpus::F32(&[]), 2, 3).unwrap();
        assert_eq!(result.indices.shape(), &[1, 0]);
    }

    #[test]
    fn rejects_non_finite_and_bad_k() {
        let corpus = [1.0, f32::NAN, 0.0, 1.0];
        assert_eq!(
            top_k_cosine(&[1.0, 0.0], Corpus::F32(&corpus), 2, 1).unwrap_err(),
            Error::NonFinite {
                name: "corpus",
                row: 0
            }
        );
        assert!(top_k_cosine(&[f32::INFINITY, 0.0], Corpus::F32(&[1.0, 0.0]), 2, 1).is_err());
        assert!(top_k_cosine(&[1.0, 0.0], Corpus::F32(&[1.0, 0.0]), 2, 0).is_err());
    }

    #[test]
    fn extreme_magnitudes_score_like_their_direction() {
        let corpus = [f32::MAX, f32::MAX, 1e-30, 1e-30, 1e-45, 0.0];
        let result = top_k_cosine(&[1.0, 1.0], Corpus::F32(&corpus), 2, 3).unwrap();
        assert_eq!(result.indices.row(0).to_vec(), vec![0, 1, 2]);
        for score in result.scores.row(0).iter().take(2) {
            assert!((score - 1.0).abs() < 1e-6);
        }
        assert!((result.scores[[0, 2]] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    }

    #[test]
    fn float16_corpus_matches_float32_of_same_values() {
        let dim = 24;
        let corpus32: Vec<f32> = pseudo_random(200 * dim, 3)
            .into_iter()
            .map(|v| f16::from_f32(v).to_f32())
            .collect();
        let corpus16: Vec<f16> = corpus32.iter().map(|&v| f16::from_f32(v)).collect();
        let queries = pseudo_random(3 * dim, 4);
        let a = top_k_cosine(&queries, Corpus::F32(&corpus32), dim, 7).unwrap();
        let b = top_k_cosine(&queries, Corpus::F16(&corpus16), dim, 7).unwrap();
        assert_eq!(a.indices, b.indices);
        assert_eq!(a.scores, b.scores);
    }
}
