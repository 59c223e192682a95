//! Weighted Gram matrices and sandwiches: the dense kernels under every estimator.

use crate::{probs::normalized_probabilities, FsError, Matrix, MatrixRef, Result, Scalar, Threads};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{matmul as triangular_matmul, BlockStructure};
use faer::{Accum, Mat, MatMut, MatRef};
use fs_traits::{TypedSlice, TypedSliceMut, Unembedding};
use rayon::prelude::*;

/// The scalars faer multiplies: the kernels below are written once for both of
/// [`Scalar`]'s types and reached through [`Scalar::typed`], so callers name only `Scalar`.
trait Element: Scalar + faer::traits::RealField {}
impl<T: Scalar + faer::traits::RealField> Element for T {}

/// Accumulates `Σ_chunks XᵀX` for row blocks `X` (`n × dim`, scalar `S`): each block's lower
/// triangle is one symmetric rank-`n` update (faer's triangular matmul, half the flops of a full
/// product) computed in the blocks' own scalar type, then added into an `f64` accumulator.
pub(crate) struct GramAccumulator {
    dim: usize,
    acc: Vec<f64>,
    block_f32: Option<Mat<f32>>,
    block_f64: Option<Mat<f64>>,
    threads: Threads,
}

impl GramAccumulator {
    pub(crate) fn new(dim: usize, threads: Threads) -> Self {
        GramAccumulator {
            dim,
            acc: vec![0.0; dim * dim],
            block_f32: None,
            block_f64: None,
            threads,
        }
    }

    /// Add `XᵀX` for a row-major block `x` with `dim` columns.
    pub(crate) fn add_rows<S: Scalar>(&mut self, x: &[S]) {
        let n = x.len() / self.dim.max(1);
        if n == 0 || self.dim == 0 {
            return;
        }
        let dim = self.dim;
        match S::typed(x) {
            TypedSlice::F32(x) => {
                let block = self.block_f32.get_or_insert_with(|| Mat::zeros(dim, dim));
                lower_gram_into(block, x, n, self.threads, &mut self.acc);
            }
            TypedSlice::F64(x) => {
                let block = self.block_f64.get_or_insert_with(|| Mat::zeros(dim, dim));
                lower_gram_into(block, x, n, self.threads, &mut self.acc);
            }
        }
    }

    /// The accumulated sum as a full symmetric matrix.
    pub(crate) fn finish(self) -> Matrix<f64> {
        symmetric_from_lower(self.dim, self.acc)
    }
}

/// `acc += lower(XᵀX)` for the row-major `n × dim` block `x`, through `block` (`dim × dim`,
/// scratch) in `E`.
fn lower_gram_into<E: Element>(
    block: &mut Mat<E>,
    x: &[E],
    n: usize,
    threads: Threads,
    acc: &mut [f64],
) {
    let dim = block.nrows();
    let x = MatRef::from_row_major_slice(x, n, dim);
    triangular_matmul(
        block.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        x.transpose(),
        BlockStructure::Rectangular,
        x,
        BlockStructure::Rectangular,
        E::one(),
        threads.par(),
    );
    for j in 0..dim {
        let col = block.col(j);
        for i in j..dim {
            acc[i * dim + j] += col[i].as_f64();
        }
    }
}

/// `out = w · a` for row-major `w` (`rows × inner`), `a` (`inner × cols`) and `out`
/// (`rows × cols`), in the scalar's own precision (faer's GEMM).
pub(crate) fn matmul_into<S: Scalar>(
    out: &mut [S],
    w: &[S],
    a: &[S],
    (rows, inner, cols): (usize, usize, usize),
    threads: Threads,
) {
    fn typed<E: Element>(
        out: &mut [E],
        w: &[E],
        a: &[E],
        (m, k, n): (usize, usize, usize),
        threads: Threads,
    ) {
        let w = MatRef::from_row_major_slice(w, m, k);
        let a = MatRef::from_row_major_slice(a, k, n);
        let out = MatMut::from_row_major_slice_mut(out, m, n);
        matmul(out, Accum::Replace, w, a, E::one(), threads.par());
    }
    let shape = (rows, inner, cols);
    match (S::typed_mut(out), S::typed(w), S::typed(a)) {
        (TypedSliceMut::F32(o), TypedSlice::F32(w), TypedSlice::F32(a)) => {
            typed(o, w, a, shape, threads)
        }
        (TypedSliceMut::F64(o), TypedSlice::F64(w), TypedSlice::F64(a)) => {
            typed(o, w, a, shape, threads)
        }
        _ => unreachable!("the three slices share one scalar type"),
    }
}

/// Mirror the lower triangle of a row-major `n × n` buffer into the upper one.
fn symmetric_from_lower(n: usize, mut data: Vec<f64>) -> Matrix<f64> {
    for i in 0..n {
        for j in (i + 1)..n {
            data[i * n + j] = data[j * n + i];
        }
    }
    Matrix::from_vec(n, n, data).expect("n*n buffer")
}

/// Default number of vocabulary rows per chunk of the weighted Gram: large enough for the GEMM
/// to run at full speed, small enough (a few MB) to stay in the last-level cache's vicinity.
pub const DEFAULT_VOCAB_CHUNK: usize = 2048;

/// The output Gram `G = W_Uᵀ(diag p − p pᵀ)W_U` in the centered form
///
/// ```text
///     G = Σ_y p_y (w_y − m)(w_y − m)ᵀ,    m = W_Uᵀ p = Σ_y p_y w_y,
/// ```
///
/// where `w_y` is row `y` of the unembedding `w_u` (`V × d_u`). Both forms are equal because
/// `Σ p_y = 1`; the centered one is a sum of PSD terms, so nothing cancels when `p` is peaked.
///
/// `m` and the centered rows `√p_y (w_y − m)` are formed in `f64` and rounded once to `S`; the
/// symmetric rank-`chunk_rows` updates run in `S` over vocabulary chunks and are accumulated in
/// `f64`. Rows with `p_y = 0` are skipped. `p` must be a probability vector (validated, then
/// renormalised in `f64`). Returns the full symmetric `d_u × d_u` matrix.
pub fn centered_output_gram<'a, S: Scalar>(
    w_u: impl Into<Unembedding<'a, S>>,
    p: &[f64],
    chunk_rows: usize,
    threads: Threads,
) -> Result<Matrix<f64>> {
    centered_output_gram_with_slopes(w_u, p, None, chunk_rows, threads)
}

/// [`centered_output_gram`] of a model with soft-capped logits `z = c·tanh(W_U u / c)`, whose
/// logit Jacobian rows are `s_y w_y` (`s_y = 1 − (z_y/c)²`, [`fs_traits::logit_slopes`]):
///
/// ```text
///     G = Σ_y p_y (s_y w_y − m)(s_y w_y − m)ᵀ,    m = Σ_y p_y s_y w_y,
/// ```
///
/// still the centered form (a sum of PSD terms, nothing cancels). `slopes = None` is
/// [`centered_output_gram`]; otherwise it has one entry per vocabulary row.
///
/// `W_U` is read twice in chunks of `chunk_rows` rows (once for `m`, once for the Gram), so an
/// unembedding held in a narrower stored form is never widened whole.
pub fn centered_output_gram_with_slopes<'a, S: Scalar>(
    w_u: impl Into<Unembedding<'a, S>>,
    p: &[f64],
    slopes: Option<&[f64]>,
    chunk_rows: usize,
    threads: Threads,
) -> Result<Matrix<f64>> {
    let w_u = w_u.into();
    let (v, du) = w_u.shape();
    if let Some(s) = slopes {
        fs_traits::check_len("soft-cap slopes (one per vocabulary row of W_U)", s.len(), v)?;
    }
    let slope = |y: usize| slopes.map_or(1.0, |s| s[y]);
    fs_traits::check_len("probabilities (one per vocabulary row of W_U)", p.len(), v)?;
    let p = normalized_probabilities("probabilities", p)?;
    let chunk_rows = chunk_rows.max(1);

    let m = weighted_mean_row(&w_u, &p, slopes, threads)?;

    // Centered, scaled rows √p_y (w_y − m) of the tokens with p_y > 0, built chunk by chunk (rows
    // in parallel) and added as symmetric rank-k updates.
    let mut acc = GramAccumulator::new(du, threads);
    let mut block: Vec<S> = Vec::with_capacity(chunk_rows.min(v) * du);
    w_u.for_each_chunk(chunk_rows, |start, rows| {
        let ys: Vec<usize> =
            (start..start + rows.len() / du.max(1)).filter(|&y| p[y] > 0.0).collect();
        block.resize(ys.len() * du, S::zero());
        let center = |(out, &y): (&mut [S], &usize)| {
            let (s, sy) = (p[y].sqrt(), slope(y));
            let w = &rows[(y - start) * du..(y - start + 1) * du];
            for ((o, w), mi) in out.iter_mut().zip(w).zip(&m) {
                *o = S::round_from_f64(s * (sy * w.as_f64() - mi));
            }
        };
        if threads.0 > 1 {
            block.par_chunks_mut(du.max(1)).zip(ys.par_iter()).for_each(center);
        } else {
            block.chunks_mut(du.max(1)).zip(ys.iter()).for_each(center);
        }
        acc.add_rows(&block);
        Ok(())
    })?;
    Ok(acc.finish())
}

/// `m = Σ_y p_y s_y w_y` (`s_y = 1` without `slopes`) in `f64`, for a normalised `p`: partial
/// sums over fixed row blocks (in parallel), added in block order, so the result does not
/// depend on the number of threads.
pub(crate) fn weighted_mean_row<S: Scalar>(
    w_u: &Unembedding<'_, S>,
    p: &[f64],
    slopes: Option<&[f64]>,
    threads: Threads,
) -> Result<Vec<f64>> {
    let du = w_u.cols();
    let slope = |y: usize| slopes.map_or(1.0, |s| s[y]);
    const M_BLOCK: usize = 4096;
    let mut m = vec![0.0f64; du];
    w_u.for_each_chunk(4 * M_BLOCK, |start, rows| {
        let partial = |block: usize| {
            let mut part = vec![0.0f64; du];
            let first = block * M_BLOCK;
            let n = (rows.len() / du.max(1)).saturating_sub(first).min(M_BLOCK);
            for i in first..first + n {
                let y = start + i;
                if p[y] > 0.0 {
                    let ps = p[y] * slope(y);
                    for (mi, w) in part.iter_mut().zip(&rows[i * du..(i + 1) * du]) {
                        *mi += ps * w.as_f64();
                    }
                }
            }
            part
        };
        let blocks = (rows.len() / du.max(1)).div_ceil(M_BLOCK);
        let partials: Vec<Vec<f64>> = if threads.0 > 1 {
            (0..blocks).into_par_iter().map(partial).collect()
        } else {
            (0..blocks).map(partial).collect()
        };
        for part in partials {
            m.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        Ok(())
    })?;
    Ok(m)
}

/// The sandwich `F = Aᵀ G A` for `A` (`d_u × d`, scalar `S`) and symmetric `G` (`d_u × d_u`,
/// `f64`), computed in `f64` (`2 d_u² d + d_u d²` flops; the upper triangle is mirrored from the
/// lower one, so the result is exactly symmetric).
pub fn sandwich<S: Scalar>(
    a: MatrixRef<'_, S>,
    g: &Matrix<f64>,
    threads: Threads,
) -> Result<Matrix<f64>> {
    let (du, d) = a.shape();
    if g.shape() != (du, du) {
        return Err(FsError::DimensionMismatch {
            what: "G in Aᵀ G A (must be d_u × d_u with d_u = rows of A)".to_string(),
            expected: du * du,
            got: g.rows() * g.cols(),
        });
    }
    let a64 = Mat::<f64>::from_fn(du, d, |i, j| a.get(i, j).as_f64());
    let g64 = MatRef::from_row_major_slice(g.as_slice(), du, du);
    let mut ga = Mat::<f64>::zeros(du, d);
    matmul(ga.as_mut(), Accum::Replace, g64, a64.as_ref(), 1.0, threads.par());
    let mut f = Mat::<f64>::zeros(d, d);
    triangular_matmul(
        f.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        a64.transpose(),
        BlockStructure::Rectangular,
        ga.as_ref(),
        BlockStructure::Rectangular,
        1.0,
        threads.par(),
    );
    let mut out = vec![0.0; d * d];
    for j in 0..d {
        for i in j..d {
            out[i * d + j] = f[(i, j)];
        }
    }
    Ok(symmetric_from_lower(d, out))
}

/// The empirical second moment `(1/n) Σ_i g_i g_iᵀ` of the rows `g_i` of `scores` (`n × d`),
/// in `f64`. This is the sampled Fisher estimate when the rows are score gradients `∇_h log p_y`
/// at tokens `y ~ p`.
pub fn outer_product_mean<S: Scalar>(scores: MatrixRef<'_, S>) -> Result<Matrix<f64>> {
    let (n, d) = scores.shape();
    if n == 0 {
        return Err(FsError::invalid("number of score rows", 0, "at least 1"));
    }
    fs_traits::check_finite("score gradients", scores.as_slice())?;
    let rows: Vec<f64> = scores.as_slice().iter().map(|v| v.as_f64()).collect();
    let mut acc = GramAccumulator::new(d, Threads(1));
    acc.add_rows(&rows);
    let mut out = acc.finish();
    let inv = 1.0 / n as f64;
    out.as_mut_slice().iter_mut().for_each(|x| *x *= inv);
    Ok(out)
}

/// Relative Frobenius distance `‖a − b‖_F / ‖b‖_F` (`b` is the reference; if `‖b‖_F = 0`, the
/// absolute distance). Panics only if the shapes differ (a programming error in a test).
pub fn relative_frobenius(a: &Matrix<f64>, b: &Matrix<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "relative_frobenius: shapes differ");
    let diff: f64 =
        a.as_slice().iter().zip(b.as_slice()).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let norm: f64 = b.as_slice().iter().map(|y| y * y).sum::<f64>().sqrt();
    if norm > 0.0 {
        diff / norm
    } else {
        diff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_g(w: &Matrix<f64>, p: &[f64]) -> Matrix<f64> {
        let (v, du) = w.shape();
        Matrix::from_fn(du, du, |i, j| {
            let s: f64 = (0..v).map(|y| p[y] * w.get(y, i) * w.get(y, j)).sum();
            let mi: f64 = (0..v).map(|y| p[y] * w.get(y, i)).sum();
            let mj: f64 = (0..v).map(|y| p[y] * w.get(y, j)).sum();
            s - mi * mj
        })
    }

    #[test]
    fn centered_gram_matches_two_term_form_in_f64() {
        let w = Matrix::from_fn(7, 3, |i, j| ((i * 3 + j) as f64 * 0.37).sin());
        let p = crate::softmax(&[0.1f64, 2.0, -1.0, 0.3, 0.0, 1.5, -0.2]).unwrap();
        for chunk in [1, 2, 3, 7, 100] {
            let g = centered_output_gram(w.view(), &p, chunk, Threads(1)).unwrap();
            assert!(relative_frobenius(&g, &naive_g(&w, &p)) < 1e-13, "chunk {chunk}");
        }
    }

    #[test]
    fn sandwich_is_at_g_a() {
        let a = Matrix::from_fn(3, 2, |i, j| (i + 2 * j) as f64 - 1.0);
        let g = Matrix::from_fn(3, 3, |i, j| 1.0 / (1 + i + j) as f64);
        let f = sandwich(a.view(), &g, Threads(1)).unwrap();
        let expected = Matrix::from_fn(2, 2, |i, j| {
            let mut s = 0.0;
            for k in 0..3 {
                for l in 0..3 {
                    s += a.get(k, i) * g.get(k, l) * a.get(l, j);
                }
            }
            s
        });
        assert!(relative_frobenius(&f, &expected) < 1e-14);
        assert!(sandwich(a.view(), &Matrix::zeros(2, 2), Threads(1)).is_err());
    }

    #[test]
    fn outer_product_mean_small() {
        let s = Matrix::from_vec(2, 2, vec![1.0f32, 2.0, 3.0, -1.0]).unwrap();
        let m = outer_product_mean(s.view()).unwrap();
        assert_eq!(m.as_slice(), &[5.0, -0.5, -0.5, 2.5]);
    }
}
