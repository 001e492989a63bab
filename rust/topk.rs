//! Exact top-k cosine similarity of query vectors against a dense corpus.
//!
//! The corpus is read once: rayon splits it into cache-sized blocks of rows and every query is
//! scored against a block while it is hot. Each thread keeps a bounded heap per query; the heaps
//! are merged at the end. Scores are `dot(q / |q|, c) / |c|`; zero vectors score 0.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use half::f16;
use half::slice::HalfFloatSliceExt;
use ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::errors::{Error, Result};

/// Bytes of corpus rows scored per block: small enough to stay in L2 while every query visits it.
const BLOCK_BYTES: usize = 96 * 1024;
/// Queries scored together per pass over a block row, sharing each load of the row.
const QUERY_TILE: usize = 4;
/// f32 lanes per accumulator: two AVX vectors, or four SSE ones.
const LANES: usize = 16;
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
}

impl Best {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::new(),
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
    }

    fn merge(&mut self, other: Best) {
        for hit in other.heap {
            self.offer(hit);
        }
    }
}

/// Per-thread state: one `Best` per query plus scratch buffers reused across blocks.
struct Partial {
    best: Vec<Best>,
    rows_f32: Vec<f32>,
    inv_norms: Vec<f32>,
    dots: Vec<f32>,
    transposed: Vec<f32>,
}

impl Partial {
    fn new(queries: usize, k: usize) -> Self {
        Self {
            best: (0..queries).map(|_| Best::new(k)).collect(),
            rows_f32: Vec::new(),
            inv_norms: Vec::new(),
            dots: Vec::new(),
            transposed: Vec::new(),
        }
    }

    fn merge(mut self, other: Partial) -> Self {
        for (mine, theirs) in self.best.iter_mut().zip(other.best) {
            mine.merge(theirs);
        }
        self
    }
}

/// Exact cosine top-k of each query (`[queries.len() / dim, dim]`) against `corpus`
/// (`[corpus.len() / dim, dim]`), best first, ties broken by lower corpus index.
pub fn top_k_cosine(queries: &[f32], corpus: Corpus<'_>, dim: usize, k: usize) -> Result<TopK> {
    if k == 0 {
        return Err(Error::argument("k", "at least 1", k));
    }
    let (Some(n_queries), Some(n_rows)) = (
        queries.len().checked_div(dim),
        corpus.len().checked_div(dim),
    ) else {
        return Err(Error::array(
            "queries",
            "vectors must have at least one dimension",
        ));
    };
    let units = unit_queries(queries, dim)?;
    let k = k.min(n_rows);
    let block_rows = (BLOCK_BYTES / (dim * size_of::<f32>())).max(1);
    let n_blocks = n_rows.div_ceil(block_rows);

    let partial = (0..n_blocks)
        .into_par_iter()
        .try_fold(
            || Partial::new(n_queries, k),
            |mut partial, block| {
                let first = block * block_rows;
                let last = (first + block_rows).min(n_rows);
                score_block(&mut partial, &units, corpus, dim, first..last)?;
                Ok(partial)
            },
        )
        .try_reduce(|| Partial::new(n_queries, k), |a, b| Ok(a.merge(b)))?;

    let mut indices = Array2::zeros((n_queries, k));
    let mut scores = Array2::zeros((n_queries, k));
    for (q, best) in partial.best.into_iter().enumerate() {
        for (rank, hit) in best.heap.into_sorted_vec().into_iter().enumerate() {
            indices[[q, rank]] = hit.index as i64;
            scores[[q, rank]] = hit.score;
        }
    }
    Ok(TopK { indices, scores })
}

/// Queries scaled to unit length (zero stays zero), computed in f64 so no input overflows.
fn unit_queries(queries: &[f32], dim: usize) -> Result<Vec<f32>> {
    let mut units = Vec::with_capacity(queries.len());
    for (row, query) in queries.chunks_exact(dim).enumerate() {
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
        units.extend(query.iter().map(|&v| (f64::from(v) * scale) as f32));
    }
    Ok(units)
}

fn score_block(
    partial: &mut Partial,
    units: &[f32],
    corpus: Corpus<'_>,
    dim: usize,
    rows: std::ops::Range<usize>,
) -> Result<()> {
    let first = rows.start;
    let values = rows.start * dim..rows.end * dim;
    let block: &[f32] = match corpus {
        Corpus::F32(all) => &all[values],
        Corpus::F16(all) => {
            partial.rows_f32.resize(values.len(), 0.0);
            all[values].convert_to_f32_slice(&mut partial.rows_f32);
            &partial.rows_f32
        }
    };
    let n_rows = block.len() / dim;
    partial.inv_norms.clear();
    for (offset, row) in block.chunks_exact(dim).enumerate() {
        partial.inv_norms.push(inverse_norm(row, first + offset)?);
    }
    partial.dots.resize(QUERY_TILE * n_rows, 0.0);
    // With many queries the block is reused enough to pay for a transpose into the layout the
    // broadcast kernel wants; a lone query just streams rows.
    let broadcast = units.len() / dim >= QUERY_TILE;
    if broadcast {
        transpose_padded(block, dim, &mut partial.transposed);
    }
    for (tile_index, tile) in units.chunks(QUERY_TILE * dim).enumerate() {
        let tile_queries = tile.len() / dim;
        if broadcast {
            broadcast_tile(tile, &partial.transposed, dim, n_rows, &mut partial.dots);
        } else {
            dot_tile(tile, block, dim, &mut partial.dots);
        }
        for t in 0..tile_queries {
            let query = &tile[t * dim..(t + 1) * dim];
            let best = &mut partial.best[tile_index * QUERY_TILE + t];
            let dots = &partial.dots[t * n_rows..(t + 1) * n_rows];
            for (offset, (&dot, &inv)) in dots.iter().zip(&partial.inv_norms).enumerate() {
                let score = if inv.is_nan() {
                    extreme_row_score(query, &block[offset * dim..(offset + 1) * dim])
                } else {
                    dot * inv
                };
                best.offer(Hit {
                    score,
                    index: first + offset,
                });
            }
        }
    }
    Ok(())
}

/// `1 / |row|`, or NaN when the row's squared norm under- or overflows f32 and must be scored in
/// f64 (see `extreme_row_score`). Rejects non-finite values.
fn inverse_norm(row: &[f32], index: usize) -> Result<f32> {
    let norm_sq = sum_of_squares(row);
    if norm_sq.is_finite() && norm_sq >= TINY_NORM_SQ {
        return Ok(norm_sq.sqrt().recip());
    }
    if row.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            name: "corpus",
            row: index,
        });
    }
    Ok(f32::NAN)
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

fn sum_of_squares(row: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v * v;
        }
    }
    horizontal_sum(acc) + tail
}

/// Sums lanes by halving, so the adds are vector-wide instead of a serial chain of 15 scalar adds
/// (which, once per row and query, would cost more than the dot product itself).
#[allow(clippy::inline_always)]
#[inline(always)]
fn horizontal_sum(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// `block` (`[rows, dim]`) as `[dim, padded rows]`, rows zero-padded to a multiple of `LANES`.
fn transpose_padded(block: &[f32], dim: usize, out: &mut Vec<f32>) {
    let stride = (block.len() / dim).next_multiple_of(LANES);
    out.clear();
    out.resize(dim * stride, 0.0);
    for (r, row) in block.chunks_exact(dim).enumerate() {
        for (d, &value) in row.iter().enumerate() {
            out[d * stride + r] = value;
        }
    }
}

/// Like `dot_tile`, from a transposed block: each step broadcasts one query value against
/// `LANES` rows, so accumulators stay in registers and no horizontal sums are needed.
fn broadcast_tile(tile: &[f32], transposed: &[f32], dim: usize, n_rows: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        unsafe {
            return broadcast_tile_avx2_fma(tile, transposed, dim, n_rows, out);
        }
    }
    broadcast_tile_portable::<false>(tile, transposed, dim, n_rows, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
unsafe fn broadcast_tile_avx2_fma(
    tile: &[f32],
    transposed: &[f32],
    dim: usize,
    n_rows: usize,
    out: &mut [f32],
) {
    broadcast_tile_portable::<true>(tile, transposed, dim, n_rows, out);
}

#[allow(clippy::inline_always)]
#[inline(always)]
fn broadcast_tile_portable<const FUSED: bool>(
    tile: &[f32],
    transposed: &[f32],
    dim: usize,
    n_rows: usize,
    out: &mut [f32],
) {
    match tile.len() / dim {
        4 => broadcast_kernel::<4, FUSED>(tile, transposed, dim, n_rows, out),
        3 => broadcast_kernel::<3, FUSED>(tile, transposed, dim, n_rows, out),
        2 => broadcast_kernel::<2, FUSED>(tile, transposed, dim, n_rows, out),
        _ => broadcast_kernel::<1, FUSED>(tile, transposed, dim, n_rows, out),
    }
}

#[allow(clippy::inline_always)]
#[inline(always)]
fn broadcast_kernel<const Q: usize, const FUSED: bool>(
    tile: &[f32],
    transposed: &[f32],
    dim: usize,
    n_rows: usize,
    out: &mut [f32],
) {
    let stride = transposed.len() / dim;
    for first in (0..stride).step_by(LANES) {
        let mut acc = [[0.0f32; LANES]; Q];
        for d in 0..dim {
            let Some(values) = transposed[d * stride + first..].first_chunk::<LANES>() else {
                continue;
            };
            for (t, a) in acc.iter_mut().enumerate() {
                let weight = tile[t * dim + d];
                for lane in 0..LANES {
                    a[lane] = if FUSED {
                        weight.mul_add(values[lane], a[lane])
                    } else {
                        a[lane] + weight * values[lane]
                    };
                }
            }
        }
        let kept = LANES.min(n_rows - first);
        for (t, a) in acc.iter().enumerate() {
            out[t * n_rows + first..t * n_rows + first + kept].copy_from_slice(&a[..kept]);
        }
    }
}

/// `out[t * rows + r] = dot(tile[t], block[r])` for the (up to `QUERY_TILE`) queries in `tile`.
fn dot_tile(tile: &[f32], block: &[f32], dim: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        unsafe {
            return dot_tile_avx2_fma(tile, block, dim, out);
        }
    }
    dot_tile_portable::<false>(tile, block, dim, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
unsafe fn dot_tile_avx2_fma(tile: &[f32], block: &[f32], dim: usize, out: &mut [f32]) {
    dot_tile_portable::<true>(tile, block, dim, out);
}

/// Dispatches on the tile's query count so the kernel's loops have constant trip counts.
// Inlined so the kernel is compiled with the caller's target features (AVX2/FMA or baseline).
#[allow(clippy::inline_always)]
#[inline(always)]
fn dot_tile_portable<const FUSED: bool>(tile: &[f32], block: &[f32], dim: usize, out: &mut [f32]) {
    match tile.len() / dim {
        4 => dot_kernel::<4, FUSED>(tile, block, dim, out),
        3 => dot_kernel::<3, FUSED>(tile, block, dim, out),
        2 => dot_kernel::<2, FUSED>(tile, block, dim, out),
        _ => dot_kernel::<1, FUSED>(tile, block, dim, out),
    }
}

/// Written as fixed-width lane arrays so LLVM vectorises it for whatever target it compiles for.
#[allow(clippy::inline_always)]
#[inline(always)]
fn dot_kernel<const Q: usize, const FUSED: bool>(
    tile: &[f32],
    block: &[f32],
    dim: usize,
    out: &mut [f32],
) {
    let n_rows = block.len() / dim;
    let queries: [(&[[f32; LANES]], &[f32]); Q] =
        std::array::from_fn(|t| tile[t * dim..(t + 1) * dim].as_chunks());
    for (r, row) in block.chunks_exact(dim).enumerate() {
        let (row_body, row_tail) = row.as_chunks::<LANES>();
        let mut acc = [[0.0f32; LANES]; Q];
        for (c, values) in row_body.iter().enumerate() {
            for (a, (query_body, _)) in acc.iter_mut().zip(&queries) {
                let weights = &query_body[c];
                for lane in 0..LANES {
                    a[lane] = if FUSED {
                        weights[lane].mul_add(values[lane], a[lane])
                    } else {
                        a[lane] + weights[lane] * values[lane]
                    };
                }
            }
        }
        for (t, (a, (_, query_tail))) in acc.iter().zip(&queries).enumerate() {
            let tail: f32 = query_tail.iter().zip(row_tail).map(|(q, c)| q * c).sum();
            out[t * n_rows + r] = horizontal_sum(*a) + tail;
        }
    }
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
        py.detach(|| top_k_cosine(&queries, Corpus::F32(&corpus), q_dim, k))
    } else if let Some(corpus) = typed::<f16>(corpus) {
        let corpus = contiguous(&corpus);
        py.detach(|| top_k_cosine(&queries, Corpus::F16(&corpus), q_dim, k))
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
