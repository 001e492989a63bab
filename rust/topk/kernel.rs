//! SIMD kernel: dot products of a tile of queries with a block of corpus rows, optionally fused
//! with the rows' squared norms so the corpus is read once however many queries there are.
//!
//! One generic kernel is written against the small [`Simd`] trait and compiled three times: for
//! AVX-512, for AVX2 + FMA + F16C, and portably. The x86 variants are entered through a
//! `#[target_feature]` function, into which every `#[inline(always)]` helper below is inlined, so
//! the intrinsics compile to single instructions. Each query × row pair is accumulated in the same
//! order whatever the tile or block it falls in, so scores (and hence ties) do not depend on how
//! the work was split.

#![allow(unsafe_code, clippy::inline_always)]

use half::f16;

/// Queries are stored with their rows zero-padded to a multiple of this many values, so query
/// loads never need a tail case (the widest vector holds 16 f32).
pub const QUERY_ALIGN: usize = 16;

/// How far ahead of the row being read the first pass prefetches.
const PREFETCH_BYTES: usize = 16384;

/// A hint to start loading the cache line at `p`; never faults, whatever the address.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint with no architectural effect, valid for any address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The instruction set the kernel runs with, detected once per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // VL lets the 128/256-bit ops of the final sums use all 32 registers; without it the
            // accumulators they read are confined to 16 and spill.
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return Self::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Every instruction set this CPU can run, for tests that compare them.
    #[cfg(test)]
    pub fn available() -> Vec<Self> {
        match Self::detect() {
            Self::Avx512 if Self::avx2_available() => {
                vec![Self::Avx512, Self::Avx2, Self::Portable]
            }
            Self::Avx512 => vec![Self::Avx512, Self::Portable],
            Self::Avx2 => vec![Self::Avx2, Self::Portable],
            Self::Portable => vec![Self::Portable],
        }
    }

    #[cfg(test)]
    fn avx2_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The most queries one kernel call scores together: as many as registers hold accumulators.
    pub fn max_tile(self) -> usize {
        match self {
            Self::Avx512 => 8,
            Self::Avx2 | Self::Portable => 4,
        }
    }
}

/// A corpus value type the kernel can load as f32 lanes.
pub trait Element: Copy + Send + Sync + 'static {
    const ZERO: Self;
    fn to_f32(self) -> f32;
    /// # Safety
    /// `S::LANES` values must be readable at `p`, and the CPU must support `S`.
    unsafe fn load<S: Simd>(p: *const Self) -> S::V;
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::V {
        S::load_f32(p)
    }
}

impl Element for f16 {
    const ZERO: Self = f16::ZERO;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::V {
        S::load_f16(p)
    }
}

/// The handful of vector operations the kernel needs.
pub trait Simd {
    const LANES: usize;
    type V: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn load_f32(p: *const f32) -> Self::V;
    unsafe fn load_f16(p: *const f16) -> Self::V;
    /// `a * b + acc`
    unsafe fn fmadd(a: Self::V, b: Self::V, acc: Self::V) -> Self::V;
    unsafe fn sum(v: Self::V) -> f32;
    /// The four sums of `v`, written to `out[..4]`: cheaper than four `sum`s, since the lanes of
    /// four vectors are folded together.
    unsafe fn sum4(v: [Self::V; 4], out: *mut f32);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256, __m512, _mm256_castps256_ps128, _mm256_cvtph_ps, _mm256_extractf128_ps,
        _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_loadu_si256, _mm256_setzero_ps, _mm512_add_ps,
        _mm512_castps512_ps128, _mm512_cvtph_ps, _mm512_fmadd_ps, _mm512_loadu_ps,
        _mm512_permute_ps, _mm512_permutexvar_ps, _mm512_reduce_add_ps, _mm512_setr_epi32,
        _mm512_setzero_ps, _mm512_shuffle_f32x4, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32,
        _mm_hadd_ps, _mm_loadu_si128, _mm_movehdup_ps, _mm_movehl_ps, _mm_storeu_ps,
    };

    use half::f16;

    use super::Simd;

    pub struct Avx512;
    pub struct Avx2;

    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_f32(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, acc: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        #[inline(always)]
        #[allow(clippy::many_single_char_names)]
        unsafe fn sum4([a, b, c, d]: [__m512; 4], out: *mut f32) {
            // Halves of a and b side by side, added: [a 8 lanes | b 8 lanes]; likewise c, d.
            let ab = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            );
            let cd = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(c, d),
                _mm512_shuffle_f32x4::<0xEE>(c, d),
            );
            // [a 4 | b 4 | c 4 | d 4], then each 128-bit lane summed within itself.
            let quads = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(ab, cd),
                _mm512_shuffle_f32x4::<0xDD>(ab, cd),
            );
            let pairs = _mm512_add_ps(quads, _mm512_permute_ps::<0b1011_0001>(quads));
            let sums = _mm512_add_ps(pairs, _mm512_permute_ps::<0b0100_1110>(pairs));
            let firsts = _mm512_permutexvar_ps(
                _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                sums,
            );
            _mm_storeu_ps(out, _mm512_castps512_ps128(firsts));
        }
    }

    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_f32(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m256, b: __m256, acc: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn sum(v: __m256) -> f32 {
            let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let odd = _mm_movehdup_ps(pair);
            let two = _mm_add_ps(pair, odd);
            _mm_cvtss_f32(_mm_add_ss(two, _mm_movehl_ps(odd, two)))
        }
        #[inline(always)]
        unsafe fn sum4(vectors: [__m256; 4], out: *mut f32) {
            let [first, second, third, fourth] = vectors
                .map(|v| _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)));
            let low = _mm_hadd_ps(first, second);
            let high = _mm_hadd_ps(third, fourth);
            _mm_storeu_ps(out, _mm_hadd_ps(low, high));
        }
    }
}

/// Plain Rust lanes, for CPUs without the x86 extensions above.
pub struct Portable;

impl Simd for Portable {
    const LANES: usize = 8;
    type V = [f32; 8];
    #[inline(always)]
    unsafe fn zero() -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> [f32; 8] {
        p.cast::<[f32; 8]>().read_unaligned()
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> [f32; 8] {
        p.cast::<[f16; 8]>().read_unaligned().map(f16::to_f32)
    }
    #[inline(always)]
    unsafe fn fmadd(a: [f32; 8], b: [f32; 8], acc: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i] + acc[i])
    }
    #[inline(always)]
    unsafe fn sum(v: [f32; 8]) -> f32 {
        let quad: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
        (quad[0] + quad[2]) + (quad[1] + quad[3])
    }
    #[inline(always)]
    unsafe fn sum4(v: [[f32; 8]; 4], out: *mut f32) {
        for (i, &x) in v.iter().enumerate() {
            *out.add(i) = Self::sum(x);
        }
    }
}

/// Where one kernel call reads and writes; pointers are checked against lengths in [`tile_dots`].
#[derive(Clone, Copy)]
struct Tile<E> {
    /// `Q` queries, `stride` values apart.
    queries: *const f32,
    stride: usize,
    rows: *const E,
    n_rows: usize,
    dim: usize,
    /// `out[t * n_rows + r] = dot(query t, row r)`.
    out: *mut f32,
    /// `norms[r] = |row r|²`, written when the kernel's `NORMS` is set.
    norms: *mut f32,
}

/// Adds one column step (`S::LANES` values of each of the `R` rows) to the accumulators.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn accumulate<S: Simd, const Q: usize, const R: usize, const NORMS: bool>(
    values: [S::V; R],
    queries: *const f32,
    stride: usize,
    acc: &mut [[S::V; R]; Q],
    squares: &mut [S::V; R],
) {
    // Index loops with constant bounds unroll fully, so every accumulator becomes a register.
    if NORMS {
        for i in 0..R {
            squares[i] = S::fmadd(values[i], values[i], squares[i]);
        }
    }
    for t in 0..Q {
        let query = S::load_f32(queries.add(t * stride));
        for i in 0..R {
            acc[t][i] = S::fmadd(query, values[i], acc[t][i]);
        }
    }
}

/// The `len < QUERY_ALIGN` values at `p`, zero-padded. Copied with a fixed-length loop rather than
/// `copy_nonoverlapping`: a `memcpy` call clobbers every vector register, and the kernels'
/// accumulators, live across it, would be spilled to the stack inside the hot loop.
#[inline(always)]
unsafe fn padded_tail<E: Element>(p: *const E, len: usize) -> [E; QUERY_ALIGN] {
    let mut padded = [E::ZERO; QUERY_ALIGN];
    for (j, value) in padded.iter_mut().enumerate() {
        if j < len {
            *value = *p.add(j);
        }
    }
    padded
}

/// Scores `R` consecutive rows starting at `first` against the tile's `Q` queries.
#[inline(always)]
unsafe fn micro<S: Simd, E: Element, const Q: usize, const R: usize, const NORMS: bool>(
    tile: Tile<E>,
    first: usize,
) {
    let dim = tile.dim;
    let rows = tile.rows.add(first * dim);
    let mut acc = [[S::zero(); R]; Q];
    let mut squares = [S::zero(); R];
    let whole = dim - dim % S::LANES;
    let mut col = 0;
    while col < whole {
        if NORMS {
            // The first pass over a block is the one that reads it from memory: ask for the rows
            // ahead early, so the loads overlap the arithmetic instead of alternating with it.
            for i in 0..R {
                prefetch(
                    rows.wrapping_add(i * dim + col)
                        .cast::<u8>()
                        .wrapping_add(PREFETCH_BYTES),
                );
            }
        }
        let values: [S::V; R] = std::array::from_fn(|i| E::load::<S>(rows.add(i * dim + col)));
        accumulate::<S, Q, R, NORMS>(
            values,
            tile.queries.add(col),
            tile.stride,
            &mut acc,
            &mut squares,
        );
        col += S::LANES;
    }
    if col < dim {
        // The rows' last values go through a zero-padded copy; the queries are padded already.
        let mut values = [S::zero(); R];
        for (i, value) in values.iter_mut().enumerate() {
            *value = E::load::<S>(padded_tail(rows.add(i * dim + col), dim - col).as_ptr());
        }
        accumulate::<S, Q, R, NORMS>(
            values,
            tile.queries.add(col),
            tile.stride,
            &mut acc,
            &mut squares,
        );
    }
    for (t, row_acc) in acc.iter().enumerate() {
        store_sums::<S>(row_acc, tile.out.add(t * tile.n_rows + first));
    }
    if NORMS {
        store_sums::<S>(&squares, tile.norms.add(first));
    }
}

/// `out[i] = sum(v[i])`, four at a time where it can.
#[inline(always)]
unsafe fn store_sums<S: Simd>(v: &[S::V], out: *mut f32) {
    let mut quads = v.chunks_exact(4);
    let mut i = 0;
    for quad in quads.by_ref() {
        S::sum4([quad[0], quad[1], quad[2], quad[3]], out.add(i));
        i += 4;
    }
    for &x in quads.remainder() {
        *out.add(i) = S::sum(x);
        i += 1;
    }
}

/// All rows of the tile, `R` at a time, then the remainder one at a time.
#[inline(always)]
unsafe fn rows<S: Simd, E: Element, const Q: usize, const R: usize, const NORMS: bool>(
    tile: Tile<E>,
) {
    let mut first = 0;
    while first + R <= tile.n_rows {
        micro::<S, E, Q, R, NORMS>(tile, first);
        first += R;
    }
    while first < tile.n_rows {
        micro::<S, E, Q, 1, NORMS>(tile, first);
        first += 1;
    }
}

/// Picks the monomorphised kernel for `q` queries (1, 2, 4 or the ISA's widest) and whether norms
/// are wanted; `$shape` maps each query count to the rows per step its registers allow.
macro_rules! dispatch {
    ($simd:ty, $tile:expr, $q:expr, $norms:expr, [$($queries:literal => $rows:literal),+]) => {
        match ($q, $norms) {
            $(
                ($queries, true) => rows::<$simd, E, $queries, $rows, true>($tile),
                ($queries, false) => rows::<$simd, E, $queries, $rows, false>($tile),
            )+
            _ => unreachable!("tile of {} queries", $q),
        }
    };
}

// Rows per step: accumulators (Q × R + R norms) plus R row vectors fit in 32 zmm / 16 ymm registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn tile_avx512<E: Element>(tile: Tile<E>, q: usize, norms: bool) {
    dispatch!(x86::Avx512, tile, q, norms, [1 => 4, 2 => 4, 4 => 4, 8 => 3]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<E: Element>(tile: Tile<E>, q: usize, norms: bool) {
    dispatch!(x86::Avx2, tile, q, norms, [1 => 4, 2 => 3, 4 => 2]);
}

unsafe fn tile_portable<E: Element>(tile: Tile<E>, q: usize, norms: bool) {
    dispatch!(Portable, tile, q, norms, [1 => 4, 2 => 3, 4 => 2]);
}

/// `dots[t * n + r] = dot(query t, row r)` for the `queries.len() / stride` queries of the tile
/// (1, 2, 4 or `isa.max_tile()`) and the `n = rows.len() / dim` rows; with `norms`, also
/// `norms[r] = |row r|²`. Queries are `stride` values apart, zero-padded past `dim`.
///
/// # Panics
/// If the slices are too short or the tile's size is not one the kernel is built for.
pub fn tile_dots<E: Element>(
    isa: Isa,
    queries: &[f32],
    stride: usize,
    rows: &[E],
    dim: usize,
    dots: &mut [f32],
    norms: Option<&mut [f32]>,
) {
    assert!(dim > 0 && stride >= dim.next_multiple_of(QUERY_ALIGN));
    let q = queries.len() / stride;
    let n_rows = rows.len() / dim;
    assert!(q <= isa.max_tile() && q.is_power_of_two());
    assert!(dots.len() >= q * n_rows);
    let want_norms = norms.is_some();
    let norms = norms.map_or(std::ptr::null_mut(), |n| {
        assert!(n.len() >= n_rows);
        n.as_mut_ptr()
    });
    let tile = Tile {
        queries: queries.as_ptr(),
        stride,
        rows: rows.as_ptr(),
        n_rows,
        dim,
        out: dots.as_mut_ptr(),
        norms,
    };
    // SAFETY: the asserts above keep every access in bounds: query loads stay below
    // `q * stride` (stride is padded to the widest vector), row loads below `n_rows * dim` (the
    // last vector of a row is read through a zero-padded copy), and writes below `q * n_rows`
    // and `n_rows`. Each ISA's function is called only when `Isa::detect` found it supported.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => tile_avx512(tile, q, want_norms),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => tile_avx2(tile, q, want_norms),
            _ => tile_portable(tile, q, want_norms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_isa_matches_f64_for_every_tile_shape_and_tail() {
        for isa in Isa::available() {
            for dim in [1usize, 7, 8, 16, 17, 37, 384] {
                let stride = dim.next_multiple_of(QUERY_ALIGN);
                for q in [1, 2, 4, 8].into_iter().filter(|&q| q <= isa.max_tile()) {
                    let n_rows = 11;
                    let rows = values(n_rows * dim, 3);
                    let mut queries = vec![0.0; q * stride];
                    for t in 0..q {
                        queries[t * stride..t * stride + dim]
                            .copy_from_slice(&values(dim, 7 + t as u32));
                    }
                    let mut dots = vec![f32::NAN; q * n_rows];
                    let mut norms = vec![f32::NAN; n_rows];
                    tile_dots(
                        isa,
                        &queries,
                        stride,
                        &rows,
                        dim,
                        &mut dots,
                        Some(&mut norms),
                    );
                    let halves: Vec<f16> = rows.iter().map(|&v| f16::from_f32(v)).collect();
                    let mut half_dots = vec![f32::NAN; q * n_rows];
                    tile_dots(isa, &queries, stride, &halves, dim, &mut half_dots, None);
                    for r in 0..n_rows {
                        let row = &rows[r * dim..(r + 1) * dim];
                        let square: f64 = row.iter().map(|&v| f64::from(v).powi(2)).sum();
                        assert!(
                            (f64::from(norms[r]) - square).abs() < 1e-3,
                            "{isa:?} dim {dim}"
                        );
                        for t in 0..q {
                            let query = &queries[t * stride..t * stride + dim];
                            let exact: f64 = query
                                .iter()
                                .zip(row)
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum();
                            let half: f64 = query
                                .iter()
                                .zip(&halves[r * dim..(r + 1) * dim])
                                .map(|(&a, &b)| f64::from(a) * f64::from(b.to_f32()))
                                .sum();
                            assert!(
                                (f64::from(dots[t * n_rows + r]) - exact).abs() < 1e-3,
                                "{isa:?} dim {dim} q {q}"
                            );
                            assert!((f64::from(half_dots[t * n_rows + r]) - half).abs() < 1e-3);
                        }
                    }
                }
            }
        }
    }
}
