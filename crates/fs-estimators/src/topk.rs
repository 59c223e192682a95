//! The top `K` eigenpairs of the Fisher matrix without forming it: `F v = Aᵀ G (A v)` with
//! `A v` a batched JVP, `Aᵀ w` a batched VJP and `G` applied in `4·V·d_u` flops per vector.

use crate::eigensolver::{random_block, top_eigenpairs, EigensolverOptions};
use crate::gram::{matmul_into, weighted_mean_row};
use crate::{softmax, FsError, Matrix, Result, Scalar, SplitModel, Threads};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatRef};
use fs_traits::{OutputGram, Unembedding};

/// The Fisher matrix at one position as an operator, `F X` for blocks of vectors, never formed:
///
/// ```text
///     F v = Aᵀ G (A v),     G u = Σ_y p_y (s_y w_y − m) q_y,    q_y = (s_y w_y − m)ᵀ u,
///     m = Σ_y p_y s_y w_y,
/// ```
///
/// (`s_y = 1` without a final soft-cap, see [`SplitModel::final_logit_softcap`]). `A v` is
/// [`SplitModel::readout_jvp`], `Aᵀ w` is [`SplitModel::readout_vjp`], each batched over the
/// block — or, for a model without a native forward mode
/// ([`SplitModel::native_readout_jvp`]), `A` is formed once and both are `f64` host products.
/// `G` is applied in the centered form — `q_y = s_y (w_y · u) − m · u` in `f64` from the GEMM
/// products `W_U U` in the model's scalar, then `W_Uᵀ(p ∘ s ∘ q)` — with the unembedding
/// streamed in vocabulary chunks (both products of a chunk while it is in cache); since
/// `Σ_y p_y q_y = 0` exactly, the `−m Σ p_y q_y` term of the centered form only removes
/// round-off. The few rows with `p_y ≥ 10⁻²` are done entirely in `f64`: for a dominant token
/// (`p_y → 1`, common in language models) `q_y` is a small difference of two large numbers,
/// and the model's scalar would lose its digits exactly where the weight `p_y` is largest; the
/// error of every other row is bounded by `ε · p_y`, and those `p_y` sum to at most `1 − max p`.
/// Cost per vector: one JVP, one VJP, `4·V·d_u` flops. A model that applies `G` where it lives
/// ([`SplitModel::device_output_gram`]: a GPU model) does so instead of the host, with its own
/// arithmetic (candle: `f64` throughout), and the host never reads the unembedding.
pub struct FisherOperator<'a, M: SplitModel> {
    model: &'a M,
    ctx: &'a M::Context,
    position: usize,
    w_u: Unembedding<'a, M::Scalar>,
    /// `p`, normalised, `f64`.
    p: Vec<f64>,
    slopes: Option<Vec<f64>>,
    m: Vec<f64>,
    /// `A` (`d_u × d`, `f64`), formed once, for a model without a native forward mode.
    formed: Option<faer::Mat<f64>>,
    /// The rows with `p_y ≥ HEAVY_ROW` (at most `1/HEAVY_ROW` of them) and their `w_y`.
    heavy: Vec<usize>,
    heavy_rows: Matrix<M::Scalar>,
    vocab_chunk: usize,
    threads: Threads,
    applications: usize,
    seconds: OperatorSeconds,
    /// `G` applied by the model where it lives, when it offers that.
    device_gram: Option<Box<dyn OutputGram + 'a>>,
}

/// Where a [`FisherOperator`]'s time went (wall-clock seconds, summed over applications).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OperatorSeconds {
    /// Forming `A` once (models without a native forward mode).
    pub jacobian: f64,
    /// The JVPs `A V` (or their host products with a formed `A`).
    pub jvp: f64,
    /// The output-Gram products `G U`.
    pub gram: f64,
    /// The VJPs `Aᵀ W` (or their host products).
    pub vjp: f64,
}

impl<'a, M: SplitModel> FisherOperator<'a, M> {
    /// The operator of `model` at `position` of `ctx`: one logits evaluation, `p = softmax(z)`
    /// in `f64`, the soft-cap slopes, and `m`.
    pub fn new(model: &'a M, ctx: &'a M::Context, position: usize) -> Result<Self> {
        Self::build(model, ctx, position, !model.native_readout_jvp())
    }

    /// [`new`](Self::new), but with `A` formed once up front whatever the model's forward mode
    /// (one batched [`SplitModel::readout_jacobians`] pass of `d` tangents), so that every
    /// application runs on the host: `2·d_u·d + 4·V·d_u` flops, no pass through the model. The
    /// right choice when the operator is applied to many single vectors in sequence (conjugate
    /// gradients), where each native JVP/VJP pass would pay the model's per-pass costs (for
    /// weights kept in their stored precision: widening every weight of the upper half).
    pub fn with_formed_jacobian(
        model: &'a M,
        ctx: &'a M::Context,
        position: usize,
    ) -> Result<Self> {
        Self::build(model, ctx, position, true)
    }

    fn build(model: &'a M, ctx: &'a M::Context, position: usize, form: bool) -> Result<Self> {
        let dims = model.dims();
        let w_u = model.unembedding();
        w_u.check_shape(dims.vocab_size, dims.readout_dim)?;
        let z = model.logits(ctx, &[position])?;
        crate::exact::check_shape("logits", z.shape(), (1, dims.vocab_size))?;
        let p = softmax(z.row(0))?;
        let slopes = fs_traits::logit_slopes(model.final_logit_softcap(), z.row(0));
        let threads = Threads(0);
        let device_gram = model.device_output_gram(&p, slopes.as_deref())?;
        // The host's G needs m and the heavy rows; a device G keeps its own.
        let (m, heavy) = match device_gram {
            Some(_) => (vec![0.0; dims.readout_dim], Vec::new()),
            None => (
                weighted_mean_row(&w_u, &p, slopes.as_deref(), threads)?,
                (0..p.len()).filter(|&y| p[y] >= HEAVY_ROW).collect(),
            ),
        };
        let heavy_rows = w_u.gather(&heavy)?;
        let start = std::time::Instant::now();
        let formed = if !form {
            None
        } else {
            let a = fs_traits::single_readout_jacobian(model, ctx, position)?;
            fs_traits::check_finite("readout Jacobian A", a.as_slice())?;
            Some(faer::Mat::from_fn(a.rows(), a.cols(), |i, j| a.get(i, j).as_f64()))
        };
        let seconds =
            OperatorSeconds { jacobian: start.elapsed().as_secs_f64(), ..Default::default() };
        Ok(FisherOperator {
            model,
            ctx,
            position,
            w_u,
            p,
            slopes,
            m,
            formed,
            heavy,
            heavy_rows,
            vocab_chunk: OPERATOR_VOCAB_CHUNK,
            threads,
            applications: 0,
            seconds,
            device_gram,
        })
    }

    /// Where the time went so far.
    pub fn seconds(&self) -> OperatorSeconds {
        self.seconds
    }

    /// `d`, the dimension the operator acts on.
    pub fn dim(&self) -> usize {
        self.model.dims().d_model
    }

    /// The next-token probabilities `p` at this position (`f64`, normalised).
    pub fn probabilities(&self) -> &[f64] {
        &self.p
    }

    /// Vectors the operator has been applied to so far.
    pub fn applications(&self) -> usize {
        self.applications
    }

    /// `F X` for the rows of `x` (`b × d`, `f64`): rows in, rows out. The vectors are rounded to
    /// the model's scalar for the JVP; `G` runs as described on [`FisherOperator`].
    pub fn apply(&mut self, x: &Matrix<f64>) -> Result<Matrix<f64>> {
        let dims = self.model.dims();
        fs_traits::check_len("operator input rows (d)", x.cols(), dims.d_model)?;
        fs_traits::check_finite("operator input", x.as_slice())?;
        let b = x.rows();
        if b == 0 {
            return Ok(Matrix::zeros(0, dims.d_model));
        }
        let clock = std::time::Instant::now;
        let out = match &self.formed {
            Some(a) => {
                // A formed once: A v and Aᵀ w as f64 products on the host.
                let t = clock();
                let xm = MatRef::from_row_major_slice(x.as_slice(), b, dims.d_model);
                let mut u = faer::Mat::<f64>::zeros(b, dims.readout_dim);
                matmul(u.as_mut(), Accum::Replace, xm, a.transpose(), 1.0, self.threads.par());
                let u = Matrix::from_fn(b, dims.readout_dim, |i, k| u[(i, k)]);
                let t = lap(&mut self.seconds, t, |s| &mut s.jvp);
                let gu = self.apply_g(&u)?;
                let t = lap(&mut self.seconds, t, |s| &mut s.gram);
                let gm = MatRef::from_row_major_slice(gu.as_slice(), b, dims.readout_dim);
                let mut out = faer::Mat::<f64>::zeros(b, dims.d_model);
                matmul(out.as_mut(), Accum::Replace, gm, a.as_ref(), 1.0, self.threads.par());
                lap(&mut self.seconds, t, |s| &mut s.vjp);
                Matrix::from_fn(b, dims.d_model, |i, j| out[(i, j)])
            }
            None => {
                let t = clock();
                let tangents = x.map(M::Scalar::round_from_f64);
                let u = self.model.readout_jvp(self.ctx, self.position, tangents.view())?;
                crate::exact::check_shape("readout JVP A V", u.shape(), (b, dims.readout_dim))?;
                fs_traits::check_finite("readout JVP A V", u.as_slice())?;
                let t = lap(&mut self.seconds, t, |s| &mut s.jvp);
                let cot = self.apply_g(&u)?.map(M::Scalar::round_from_f64);
                let t = lap(&mut self.seconds, t, |s| &mut s.gram);
                let g = self.model.readout_vjp(self.ctx, self.position, cot.view())?;
                crate::exact::check_shape("readout VJP Aᵀ W", g.shape(), (b, dims.d_model))?;
                fs_traits::check_finite("readout VJP Aᵀ W", g.as_slice())?;
                lap(&mut self.seconds, t, |s| &mut s.vjp);
                g.map(|v| v.as_f64())
            }
        };
        self.applications += b;
        Ok(out)
    }

    /// `G U` for the rows of `u` (`b × d_u`), in `f64` (see the type's docs).
    fn apply_g<U: Scalar>(&self, u: &Matrix<U>) -> Result<Matrix<f64>> {
        let du = self.w_u.cols();
        let b = u.rows();
        if let Some(g) = &self.device_gram {
            let gu = g.apply(&u.map(|x| x.as_f64()))?;
            crate::exact::check_shape("device G U", gu.shape(), (b, du))?;
            return Ok(gu);
        }
        let slope = |y: usize| self.slopes.as_ref().map_or(1.0, |s| s[y]);
        // mᵀu per vector, in f64.
        let mu: Vec<f64> = (0..b)
            .map(|i| u.row(i).iter().zip(&self.m).map(|(a, m)| a.as_f64() * m).sum())
            .collect();
        let ut = u.transpose().map(|x| M::Scalar::round_from_f64(x.as_f64())); // d_u × b, in the model's scalar
        let mut acc = vec![0.0f64; b * du];
        let mut pq_sum = vec![0.0f64; b];
        let chunk = self.vocab_chunk.max(1);
        // Rows holding a probability ≥ HEAVY_ROW in f64: for a dominant token (p_y → 1) the
        // product w_y·u in the model's scalar loses the digits of the small centered q_y.
        for (h, &y) in self.heavy.iter().enumerate() {
            let (py, sy) = (self.p[y], slope(y));
            let w_y = self.heavy_rows.row(h);
            let c: Vec<f64> = w_y.iter().zip(&self.m).map(|(w, m)| sy * w.as_f64() - m).collect();
            for i in 0..b {
                let q: f64 = c.iter().zip(u.row(i)).map(|(c, x)| c * x.as_f64()).sum();
                pq_sum[i] += py * q;
                let scale = py * sy * q;
                for (a, w) in acc[i * du..(i + 1) * du].iter_mut().zip(w_y) {
                    *a += scale * w.as_f64();
                }
            }
        }
        let mut z = vec![<M::Scalar as Default>::default(); chunk * b];
        let mut r = vec![<M::Scalar as Default>::default(); chunk * b];
        let mut part = vec![<M::Scalar as Default>::default(); b * du];
        self.w_u.for_each_chunk(chunk, |start, w| {
            let rows = w.len() / du.max(1);
            // Z = W_chunk U (rows × b)
            matmul_into(&mut z[..rows * b], w, ut.as_slice(), (rows, du, b), self.threads);
            for y in 0..rows {
                // R is written transposed (b × rows), ready for the second product.
                if self.p[start + y] >= HEAVY_ROW {
                    (0..b).for_each(|i| r[i * rows + y] = <M::Scalar as Default>::default());
                    continue;
                }
                let (py, sy) = (self.p[start + y], slope(start + y));
                for i in 0..b {
                    let q = sy * z[y * b + i].as_f64() - mu[i];
                    pq_sum[i] += py * q;
                    r[i * rows + y] = M::Scalar::round_from_f64(py * sy * q);
                }
            }
            // part = Rᵀ W_chunk (b × d_u)
            matmul_into(&mut part, &r[..b * rows], w, (b, rows, du), self.threads);
            acc.iter_mut().zip(&part).for_each(|(a, x)| *a += x.as_f64());
            Ok(())
        })?;
        // The centered form's second term: − m Σ_y p_y q_y (zero up to round-off).
        for i in 0..b {
            for (a, m) in acc[i * du..(i + 1) * du].iter_mut().zip(&self.m) {
                *a -= m * pq_sum[i];
            }
        }
        Matrix::from_vec(b, du, acc)
    }
}

/// Vocabulary rows per chunk of `G`'s two products: 256 rows of a 2048-wide `W_U` are 2 MB of
/// f32, which stay in cache between the two products.
const OPERATOR_VOCAB_CHUNK: usize = 256;

/// Rows of `W_U` whose probability is at least this are applied in `f64` (see
/// [`FisherOperator`]).
const HEAVY_ROW: f64 = 1e-2;

/// Add the time since `since` to one counter of `seconds`; returns the new start.
fn lap(
    seconds: &mut OperatorSeconds,
    since: std::time::Instant,
    field: impl Fn(&mut OperatorSeconds) -> &mut f64,
) -> std::time::Instant {
    let now = std::time::Instant::now();
    *field(seconds) += (now - since).as_secs_f64();
    now
}

/// How [`top_k_fisher`] reports `tr F`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceMode {
    /// Hutch++-style: exact on the final Krylov basis `Q`, Hutchinson with this many Rademacher
    /// probes (≥ 2) on its orthogonal complement; reported with one standard error.
    Estimate {
        /// Probes on the complement (operator applications).
        probes: usize,
    },
    /// `Σ_i e_iᵀ F e_i`: `d` more operator applications.
    Exact,
}

/// The trace of `F` as [`top_k_fisher`] obtained it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TraceEstimate {
    /// The estimate (or the exact value).
    pub value: f64,
    /// One standard error of the estimate; `None` when exact (`TraceMode::Exact`, or an
    /// estimate whose eigensolver basis came to span all of `R^d`).
    pub std_error: Option<f64>,
    /// Operator applications the trace cost beyond the eigensolver.
    pub applications: usize,
}

/// Options of [`top_k_fisher`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopKOptions {
    /// The eigensolver's settings (`k`, block, tolerance, seed, limits). The default tolerance
    /// here is `1e-5`: ten times below the `1e-4` the estimator is tested to, and above the
    /// `f32` operator's round-off.
    pub solver: EigensolverOptions,
    /// How the trace is obtained.
    pub trace: TraceMode,
}

impl Default for TopKOptions {
    fn default() -> Self {
        TopKOptions {
            solver: EigensolverOptions { tolerance: 1e-5, ..EigensolverOptions::default() },
            trace: TraceMode::Estimate { probes: 16 },
        }
    }
}

/// The top-K eigenpairs of one position's Fisher matrix, computed matrix-free.
#[derive(Clone, Debug, PartialEq)]
pub struct TopKFisher {
    /// `λ_1 ≥ … ≥ λ_K`.
    pub eigenvalues: Vec<f64>,
    /// Unit eigenvectors as columns, `d × K` (sign as [`spectrum`](crate::spectrum)).
    pub eigenvectors: Matrix<f64>,
    /// `‖F v_i − λ_i v_i‖ / λ_1` per pair.
    pub residuals: Vec<f64>,
    /// Operator applications (vectors: one JVP + one VJP each) spent by the eigensolver.
    pub applications: usize,
    /// Whether every residual met the tolerance.
    pub converged: bool,
    /// `tr F`, estimated or exact.
    pub trace: TraceEstimate,
    /// Where the operator's time went (eigensolver and trace together).
    pub seconds: OperatorSeconds,
}

/// The top `opts.solver.k` eigenpairs of the Fisher matrix `F_t` of `model` at `position` of
/// `ctx`, without forming `A`, `J` or `F`: [`FisherOperator`] inside
/// [`top_eigenpairs`](crate::top_eigenpairs), then the trace by `opts.trace`.
///
/// Cost: `applications` JVPs and VJPs of the single-position upper half (in blocks of
/// `k + max(4, k/2)`) and `4·V·d_u` flops per application — against `d` tangents and `V·d_u²`
/// flops for the exact estimator. Errors as [`exact_fisher`](crate::exact_fisher), plus the
/// eigensolver's option checks.
pub fn top_k_fisher<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    position: usize,
    opts: &TopKOptions,
) -> Result<TopKFisher> {
    if let TraceMode::Estimate { probes } = opts.trace {
        if probes < 2 {
            return Err(FsError::invalid("trace probes", probes, "at least 2"));
        }
    }
    let mut op = FisherOperator::new(model, ctx, position)?;
    let d = op.dim();
    let pairs = top_eigenpairs(d, |x| op.apply(x), &opts.solver)?;
    let trace = match opts.trace {
        TraceMode::Exact => {
            let b = opts.solver.block.unwrap_or(32).clamp(1, d);
            let mut total = 0.0;
            for start in (0..d).step_by(b) {
                let n = b.min(d - start);
                let e = Matrix::from_fn(n, d, |i, j| if j == start + i { 1.0 } else { 0.0 });
                let fe = op.apply(&e)?;
                total += (0..n).map(|i| fe.get(i, start + i)).sum::<f64>();
            }
            TraceEstimate { value: total, std_error: None, applications: d }
        }
        TraceMode::Estimate { probes } => {
            complement_trace(&mut op, &pairs.basis, pairs.basis_trace, probes, opts.solver.seed)?
        }
    };
    Ok(TopKFisher {
        eigenvalues: pairs.eigenvalues,
        eigenvectors: pairs.eigenvectors,
        residuals: pairs.residuals,
        applications: pairs.applications,
        converged: pairs.converged,
        trace,
        seconds: op.seconds(),
    })
}

/// `tr F = tr(Q F Qᵀ) + tr(P F P)`, `P = I − QᵀQ`: the first term exact from the basis, the
/// second by Hutchinson with `probes` Rademacher vectors projected onto the complement;
/// standard error = sample standard deviation / √probes.
fn complement_trace<M: SplitModel>(
    op: &mut FisherOperator<'_, M>,
    basis: &Matrix<f64>,
    basis_trace: f64,
    probes: usize,
    seed: u64,
) -> Result<TraceEstimate> {
    let d = basis.cols();
    if basis.rows() >= d {
        // The basis spans R^d: tr(QFQᵀ) is the trace itself, exactly.
        return Ok(TraceEstimate { value: basis_trace, std_error: None, applications: 0 });
    }
    let signs = random_block(probes, d, seed ^ 0x7472_6163_6521);
    let mut z = signs.map(|g| if g < 0.0 { -1.0 } else { 1.0 });
    for i in 0..probes {
        for _ in 0..2 {
            let row = z.row(i).to_vec();
            for j in 0..basis.rows() {
                let q = basis.row(j);
                let c: f64 = row.iter().zip(q).map(|(a, b)| a * b).sum();
                z.row_mut(i).iter_mut().zip(q).for_each(|(a, b)| *a -= c * b);
            }
        }
    }
    let fz = op.apply(&z)?;
    let samples: Vec<f64> =
        (0..probes).map(|i| z.row(i).iter().zip(fz.row(i)).map(|(a, b)| a * b).sum()).collect();
    let mean = samples.iter().sum::<f64>() / probes as f64;
    let var = samples.iter().map(|s| (s - mean) * (s - mean)).sum::<f64>() / (probes - 1) as f64;
    Ok(TraceEstimate {
        value: basis_trace + mean,
        std_error: Some((var / probes as f64).sqrt()),
        applications: probes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytic::TanhModel;
    use crate::{exact_fisher, spectrum, ExactOptions};

    fn rel(a: &Matrix<f64>, b: &Matrix<f64>) -> f64 {
        crate::relative_frobenius(a, b)
    }

    /// `F X` by the dense reference.
    fn dense_apply(f: &Matrix<f64>, x: &Matrix<f64>) -> Matrix<f64> {
        let d = f.rows();
        Matrix::from_fn(x.rows(), d, |i, j| (0..d).map(|c| f.get(j, c) * x.get(i, c)).sum())
    }

    #[test]
    fn operator_is_the_exact_fisher_applied() {
        // f64: to round-off; f32: to the f32 estimators' own precision.
        let model = TanhModel::<f64>::random(60, 24, 20, 8, 1.5, 3);
        let ctx = model.lower(&[1, 5, 7, 2], 0).unwrap();
        let x = random_block(7, 24, 9);
        for t in 0..4 {
            let known = model.known_fisher(&ctx, t).unwrap();
            let got = FisherOperator::new(&model, &ctx, t).unwrap().apply(&x).unwrap();
            let e = rel(&got, &dense_apply(&known, &x));
            assert!(e < 1e-12, "f64 position {t}: {e:e}");
            let m32 = model.cast::<f32>();
            let ctx32 = m32.lower(&[1, 5, 7, 2], 0).unwrap();
            let mut op = FisherOperator::new(&m32, &ctx32, t).unwrap();
            let got = op.apply(&x).unwrap();
            let e = rel(&got, &dense_apply(&known, &x));
            assert!(e < 1e-5, "f32 position {t}: {e:e}");
            assert_eq!(op.applications(), 7);
        }
    }

    #[test]
    fn peaked_distributions_keep_their_digits_in_f32() {
        // W₂ scaled up until 1 − max p reaches 5e-11: the f32 operator stays within 2× the f32
        // exact estimator's own error (measured: 0.8–1.3×). Without the f64 treatment of the
        // dominant rows it was 100× (2.0e-4 against 2.0e-6 at 1 − max p = 5e-11).
        let mut most_peaked: f64 = 1.0;
        for w_std in [2.0, 6.0, 12.0] {
            let model = TanhModel::<f64>::random(80, 16, 16, 4, w_std, 21);
            let ctx = model.lower(&[3, 1, 4, 1], 0).unwrap();
            let m32 = model.cast::<f32>();
            let ctx32 = m32.lower(&[3, 1, 4, 1], 0).unwrap();
            let x = random_block(5, 16, 2);
            for t in 0..4 {
                let known = model.known_fisher(&ctx, t).unwrap();
                let mut op = FisherOperator::new(&m32, &ctx32, t).unwrap();
                let tail = 1.0 - op.probabilities().iter().cloned().fold(0.0, f64::max);
                most_peaked = most_peaked.min(tail);
                let e = rel(&op.apply(&x).unwrap(), &dense_apply(&known, &x));
                let exact = exact_fisher(&m32, &ctx32, &[t], &ExactOptions::default()).unwrap();
                let e_exact = rel(&exact[0], &known);
                assert!(
                    e <= 2.0 * e_exact + 1e-7,
                    "w {w_std} position {t} (1 − max p {tail:e}): operator {e:e}, exact {e_exact:e}"
                );
            }
        }
        assert!(most_peaked < 1e-9, "the weights were meant to peak p: {most_peaked:e}");
    }

    #[test]
    fn top_k_matches_the_exact_spectrum_and_trace() {
        let d = 150;
        let model = TanhModel::<f64>::random(300, d, d, 6, 1.0, 17);
        let ctx = model.lower(&[4, 8, 15, 16, 23], 0).unwrap();
        let exact = exact_fisher(&model, &ctx, &[4], &ExactOptions::default()).unwrap();
        let want = spectrum(&exact[0], Some(6)).unwrap();
        let opts = TopKOptions {
            solver: EigensolverOptions { k: 6, tolerance: 1e-10, ..Default::default() },
            trace: TraceMode::Exact,
        };
        let got = top_k_fisher(&model, &ctx, 4, &opts).unwrap();
        assert!(got.converged);
        for i in 0..6 {
            let (a, b) = (got.eigenvalues[i], want.eigenvalues[i]);
            assert!((a - b).abs() <= 1e-9 * want.eigenvalues[0], "λ{i}: {a} vs {b}");
            let cos: f64 =
                (0..d).map(|r| got.eigenvectors.get(r, i) * want.eigenvectors.get(r, i)).sum();
            assert!(cos > 1.0 - 1e-9, "v{i}: cos {cos}");
            assert!(got.residuals[i] <= 1e-10);
        }
        assert_eq!(got.trace.std_error, None);
        assert!((got.trace.value - want.trace).abs() <= 1e-10 * want.trace);

        // The estimate: exact on the basis, Hutchinson on the rest, within 4 standard errors of
        // the truth, and tighter than the top-K sum alone would be.
        let loose = EigensolverOptions { tolerance: 1e-4, ..opts.solver };
        let est = top_k_fisher(
            &model,
            &ctx,
            4,
            &TopKOptions { solver: loose, trace: TraceMode::Estimate { probes: 16 } },
        )
        .unwrap();
        assert!(
            est.applications < d,
            "{} applications: the basis must not fill R^d",
            est.applications
        );
        let se = est.trace.std_error.unwrap();
        assert!(se > 0.0 && se < 0.05 * want.trace, "standard error {se} of {}", want.trace);
        assert!(
            (est.trace.value - want.trace).abs() <= 4.0 * se,
            "{:?} vs {}",
            est.trace,
            want.trace
        );
        assert_eq!(est.trace.applications, 16);
        assert!(top_k_fisher(
            &model,
            &ctx,
            4,
            &TopKOptions { trace: TraceMode::Estimate { probes: 1 }, ..opts }
        )
        .is_err());
    }

    #[test]
    fn a_basis_spanning_the_space_gives_the_exact_trace() {
        let model = TanhModel::<f64>::random(40, 6, 6, 4, 1.0, 2);
        let ctx = model.lower(&[1, 2, 3], 0).unwrap();
        let want = spectrum(&model.known_fisher(&ctx, 2).unwrap(), None).unwrap().trace;
        let solver = EigensolverOptions { k: 2, tolerance: 1e-12, ..Default::default() };
        let got =
            top_k_fisher(&model, &ctx, 2, &TopKOptions { solver, ..Default::default() }).unwrap();
        assert_eq!(got.trace.std_error, None, "a basis of all of R^6 leaves nothing to estimate");
        assert_eq!(got.trace.applications, 0);
        assert!((got.trace.value - want).abs() <= 1e-12 * want, "{} vs {want}", got.trace.value);
    }

    #[test]
    fn bad_positions_and_inputs_are_errors() {
        let model = TanhModel::<f64>::random(20, 6, 6, 4, 1.0, 1);
        let ctx = model.lower(&[1, 2], 0).unwrap();
        assert!(FisherOperator::new(&model, &ctx, 2).is_err());
        let mut op = FisherOperator::new(&model, &ctx, 1).unwrap();
        assert!(op.apply(&Matrix::zeros(2, 5)).is_err());
        let nan = Matrix::from_fn(1, 6, |_, _| f64::NAN);
        assert!(matches!(op.apply(&nan), Err(FsError::NonFinite { .. })));
        assert_eq!(op.apply(&Matrix::zeros(0, 6)).unwrap().shape(), (0, 6));
    }
}
