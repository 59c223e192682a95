//! The top `K` eigenpairs of the Fisher matrix without forming it: `F v = Aᵀ G (A v)` with
//! `A v` a batched JVP, `Aᵀ w` a batched VJP and `G` applied in `4·V·d_u` flops per vector.

use crate::eigensolver::{random_block, top_eigenpairs_from, EigensolverOptions};
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
        // The host's G needs the heavy rows; a device G keeps its own and hands back m.
        let (m, heavy) = match &device_gram {
            Some(g) => (g.mean_row()?, Vec::new()),
            None => (
                weighted_mean_row(&w_u, &p, slopes.as_deref(), threads)?,
                (0..p.len()).filter(|&y| p[y] >= HEAVY_ROW).collect(),
            ),
        };
        fs_traits::check_len("m = Σ p s w (d_u)", m.len(), dims.readout_dim)?;
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

    /// The score vectors `∇_h log p_y = Aᵀ(s_y w_y − m)` of the tokens `ids` as rows
    /// (`n × d`, `f64`): one batched VJP of the centred unembedding rows (rounded to the model's
    /// scalar), or a host product with a formed `A`. `F = Σ_y p_y ∇log p_y ∇log p_yᵀ`, so the
    /// scores of the most probable tokens span most of `F`'s top eigenspace. Not counted as
    /// applications; the time goes to the VJP counter.
    pub fn score_vectors(&mut self, ids: &[usize]) -> Result<Matrix<f64>> {
        let dims = self.model.dims();
        let (d, du) = (dims.d_model, dims.readout_dim);
        if let Some(&bad) = ids.iter().find(|&&y| y >= self.p.len()) {
            return Err(FsError::invalid("token id", bad, "below the vocabulary size"));
        }
        if ids.is_empty() {
            return Ok(Matrix::zeros(0, d));
        }
        let rows = self.w_u.gather(ids)?;
        let slope = |y: usize| self.slopes.as_ref().map_or(1.0, |s| s[y]);
        let centred = Matrix::from_fn(ids.len(), du, |i, j| {
            slope(ids[i]) * rows.get(i, j).as_f64() - self.m[j]
        });
        let t = std::time::Instant::now();
        let out = match &self.formed {
            Some(a) => {
                let c = MatRef::from_row_major_slice(centred.as_slice(), ids.len(), du);
                let mut out = faer::Mat::<f64>::zeros(ids.len(), d);
                matmul(out.as_mut(), Accum::Replace, c, a.as_ref(), 1.0, self.threads.par());
                Matrix::from_fn(ids.len(), d, |i, j| out[(i, j)])
            }
            None => {
                let cot = centred.map(M::Scalar::round_from_f64);
                let g = self.model.readout_vjp(self.ctx, self.position, cot.view())?;
                crate::exact::check_shape("readout VJP Aᵀ W", g.shape(), (ids.len(), d))?;
                fs_traits::check_finite("score vectors", g.as_slice())?;
                g.map(|v| v.as_f64())
            }
        };
        lap(&mut self.seconds, t, |s| &mut s.vjp);
        Ok(out)
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

/// The eigensolver's first block in [`top_k_fisher`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TopKStart {
    /// The score vectors `∇_h log p_y` of the `b` most probable tokens
    /// ([`FisherOperator::score_vectors`], one batched VJP): `F = Σ_y p_y ∇log p_y ∇log p_yᵀ`,
    /// so where `p` is concentrated they nearly span the top eigenspace already.
    #[default]
    ProbableTokenScores,
    /// Gaussian rows (the plain [`top_eigenpairs`](crate::top_eigenpairs) start).
    Random,
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
    /// The first block.
    pub start: TopKStart,
}

impl Default for TopKOptions {
    fn default() -> Self {
        TopKOptions {
            solver: EigensolverOptions { tolerance: 1e-5, ..EigensolverOptions::default() },
            trace: TraceMode::Estimate { probes: 16 },
            start: TopKStart::default(),
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
    /// Score vectors computed for the first block (one VJP each, no JVP, no `G`); 0 with
    /// [`TopKStart::Random`].
    pub start_vectors: usize,
    /// Whether every residual met the tolerance.
    pub converged: bool,
    /// `tr F`, estimated or exact.
    pub trace: TraceEstimate,
    /// Where the operator's time went (eigensolver and trace together).
    pub seconds: OperatorSeconds,
}

/// The top `opts.solver.k` eigenpairs of the Fisher matrix `F_t` of `model` at `position` of
/// `ctx`, without forming `A`, `J` or `F`: [`FisherOperator`] inside
/// [`top_eigenpairs_from`](crate::top_eigenpairs_from), started as `opts.start` says (by
/// default from the score vectors of the `b` most probable tokens), then the trace by
/// `opts.trace` (an estimate's probes ride in the first block).
///
/// Cost: `start_vectors` VJPs, then `applications` (+ the probes) JVPs and VJPs of the
/// single-position upper half — a first block of `b = k + max(4, k/2)` (+ probes), later blocks
/// of at most `k` — and `4·V·d_u` flops per application; against `d` tangents and `V·d_u²`
/// flops for the exact estimator. On a CPU each block is one pass over the upper half's weights
/// each way and one over `W_U`, so for big models the number of blocks, not of vectors, sets the
/// time (see `docs/PERFORMANCE.md`). Errors as [`exact_fisher`](crate::exact_fisher), plus the
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
    let start = match opts.start {
        TopKStart::Random => Matrix::zeros(0, d),
        TopKStart::ProbableTokenScores => {
            let p = op.probabilities();
            let mut ids: Vec<usize> = (0..p.len()).collect();
            ids.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            ids.truncate(opts.solver.first_block(d));
            op.score_vectors(&ids)?
        }
    };
    // The Hutchinson probes ride along in the first block (their rows appended to it), so the
    // trace estimate costs no pass of its own; their part on the complement of the final basis
    // is taken afterwards from the stored images (see `complement_trace`).
    // A first block of all of R^d makes the trace exact from the basis: no probes then.
    let mut probes = match opts.trace {
        TraceMode::Estimate { probes } if opts.solver.first_block(d) < d => {
            Some(rademacher(probes, d, opts.solver.seed))
        }
        _ => None,
    };
    let mut probe_images: Option<(Matrix<f64>, Matrix<f64>)> = None;
    let pairs = top_eigenpairs_from(
        d,
        &start,
        |x| match probes.take() {
            Some(z) => {
                let (b, n) = (x.rows(), z.rows());
                let mut stacked = x.as_slice().to_vec();
                stacked.extend_from_slice(z.as_slice());
                let images = op.apply(&Matrix::from_vec(b + n, d, stacked)?)?;
                let (fx, fz) = images.as_slice().split_at(b * d);
                probe_images = Some((z, Matrix::from_vec(n, d, fz.to_vec())?));
                Matrix::from_vec(b, d, fx.to_vec())
            }
            None => op.apply(x),
        },
        &opts.solver,
    )?;
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
        TraceMode::Estimate { .. } => match probe_images {
            Some((z, fz)) => complement_trace(&pairs, &z, &fz)?,
            None if pairs.basis.rows() >= d => {
                TraceEstimate { value: pairs.basis_trace, std_error: None, applications: 0 }
            }
            None => {
                return Err(FsError::LinearAlgebra(
                    "the eigensolver made no operator application".into(),
                ))
            }
        },
    };
    Ok(TopKFisher {
        eigenvalues: pairs.eigenvalues,
        eigenvectors: pairs.eigenvectors,
        residuals: pairs.residuals,
        applications: pairs.applications,
        start_vectors: start.rows(),
        converged: pairs.converged,
        trace,
        seconds: op.seconds(),
    })
}

/// `n` Rademacher rows (signs of [`random_block`]'s Gaussians, stream of `seed ^ "trace!"`).
fn rademacher(n: usize, d: usize, seed: u64) -> Matrix<f64> {
    random_block(n, d, seed ^ 0x7472_6163_6521).map(|g| if g < 0.0 { -1.0 } else { 1.0 })
}

/// `tr F = tr(Q F Qᵀ) + tr(P F P)`, `P = I − QᵀQ` for the eigensolver's final orthonormal
/// basis `Q` (`m × d`, rows): the first term exact (`tr T`), the second by Hutchinson with the
/// Rademacher probes `z` whose images `F z` were computed in the first block. Each sample is
/// `(Pz)ᵀ F (Pz) = zᵀFz − 2 aᵀ(Q F z) + aᵀ T a` with `a = Q z` and `T = Q F Qᵀ` (from the stored
/// images `F Q`, symmetrised): the same number as applying `F` to the projected probe, with no
/// further application. Standard error = sample standard deviation / √probes.
fn complement_trace(
    pairs: &crate::Eigenpairs,
    z: &Matrix<f64>,
    fz: &Matrix<f64>,
) -> Result<TraceEstimate> {
    let (q, fq) = (&pairs.basis, &pairs.basis_images);
    let (m, d) = (q.rows(), q.cols());
    let probes = z.rows();
    if m >= d {
        // The basis spans R^d: tr(QFQᵀ) is the trace itself, exactly.
        return Ok(TraceEstimate {
            value: pairs.basis_trace,
            std_error: None,
            applications: probes,
        });
    }
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let t =
        Matrix::from_fn(m, m, |i, j| 0.5 * (dot(q.row(i), fq.row(j)) + dot(q.row(j), fq.row(i))));
    let samples: Vec<f64> = (0..probes)
        .map(|i| {
            let a: Vec<f64> = (0..m).map(|j| dot(q.row(j), z.row(i))).collect();
            let qfz: Vec<f64> = (0..m).map(|j| dot(q.row(j), fz.row(i))).collect();
            let tat: f64 = (0..m).map(|r| a[r] * dot(t.row(r), &a)).sum();
            dot(z.row(i), fz.row(i)) - 2.0 * dot(&a, &qfz) + tat
        })
        .collect();
    let mean = samples.iter().sum::<f64>() / probes as f64;
    let var = samples.iter().map(|s| (s - mean) * (s - mean)).sum::<f64>() / (probes - 1) as f64;
    Ok(TraceEstimate {
        value: pairs.basis_trace + mean,
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
            start: TopKStart::ProbableTokenScores,
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
            &TopKOptions { solver: loose, trace: TraceMode::Estimate { probes: 16 }, ..opts },
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
    fn score_vectors_are_the_log_probability_gradients() {
        // Σ_y p_y s_y s_yᵀ over every token is F itself, and each s_y is Aᵀ(w_y − m) from the
        // formed readout Jacobian — with a native VJP (f64 model) and with a formed A.
        let model = TanhModel::<f64>::random(40, 12, 10, 4, 2.0, 8);
        let ctx = model.lower(&[3, 9, 1], 0).unwrap();
        let known = model.known_fisher(&ctx, 2).unwrap();
        let ids: Vec<usize> = (0..40).collect();
        for formed in [false, true] {
            let mut op = if formed {
                FisherOperator::with_formed_jacobian(&model, &ctx, 2).unwrap()
            } else {
                FisherOperator::new(&model, &ctx, 2).unwrap()
            };
            let s = op.score_vectors(&ids).unwrap();
            let p = op.probabilities().to_vec();
            let sum = Matrix::from_fn(12, 12, |i, j| {
                (0..40).map(|y| p[y] * s.get(y, i) * s.get(y, j)).sum()
            });
            let e = rel(&sum, &known);
            assert!(e < 1e-12, "formed A {formed}: Σ p s sᵀ vs F: {e:e}");
            assert_eq!(op.applications(), 0, "score vectors are not operator applications");
            assert!(op.score_vectors(&[40]).is_err(), "a token id past the vocabulary");
        }
    }

    #[test]
    fn the_complement_trace_equals_the_projected_probes_applied() {
        // (Pz)ᵀF(Pz) from the first-block images equals applying F to the projected probe.
        let d = 40;
        let model = TanhModel::<f64>::random(90, d, d, 4, 1.0, 4);
        let ctx = model.lower(&[2, 7, 1, 8], 0).unwrap();
        let f = model.known_fisher(&ctx, 3).unwrap();
        let solver = EigensolverOptions { k: 3, tolerance: 1e-6, ..Default::default() };
        let pairs = crate::top_eigenpairs(d, |x| Ok(dense_apply(&f, x)), &solver).unwrap();
        assert!(pairs.basis.rows() < d);
        let z = rademacher(8, d, 3);
        let est = complement_trace(&pairs, &z, &dense_apply(&f, &z)).unwrap();
        let q = &pairs.basis;
        let pz = Matrix::from_fn(8, d, |i, j| {
            let a = |r: usize| (0..d).map(|c| q.get(r, c) * z.get(i, c)).sum::<f64>();
            z.get(i, j) - (0..q.rows()).map(|r| a(r) * q.get(r, j)).sum::<f64>()
        });
        let fpz = dense_apply(&f, &pz);
        let samples: Vec<f64> =
            (0..8).map(|i| pz.row(i).iter().zip(fpz.row(i)).map(|(a, b)| a * b).sum()).collect();
        let mean = samples.iter().sum::<f64>() / 8.0;
        let want = pairs.basis_trace + mean;
        assert!((est.value - want).abs() <= 1e-12 * want, "{} vs {want}", est.value);
        let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / 7.0;
        let se = est.std_error.unwrap();
        assert!((se - (var / 8.0).sqrt()).abs() <= 1e-9 * se, "{se} vs {}", (var / 8.0).sqrt());
        assert_eq!(est.applications, 8);
    }

    #[test]
    fn the_score_start_needs_fewer_applications_on_a_peaked_distribution() {
        // W₂ scaled so that p is concentrated (as a trained model's usually is): the first
        // block of probable-token scores needs fewer applications than a random one, and both
        // give the same pairs.
        let d = 64;
        let model = TanhModel::<f64>::random(400, d, d, 4, 4.0, 12);
        let ctx = model.lower(&[5, 3, 8], 0).unwrap();
        let solver = EigensolverOptions { k: 8, tolerance: 1e-8, ..Default::default() };
        let run = |start| {
            let opts = TopKOptions { solver, start, ..Default::default() };
            top_k_fisher(&model, &ctx, 2, &opts).unwrap()
        };
        let (scores, random) = (run(TopKStart::ProbableTokenScores), run(TopKStart::Random));
        assert!(scores.converged && random.converged);
        assert_eq!((scores.start_vectors, random.start_vectors), (solver.first_block(d), 0));
        for i in 0..8 {
            let (a, b) = (scores.eigenvalues[i], random.eigenvalues[i]);
            assert!((a - b).abs() <= 1e-7 * scores.eigenvalues[0], "λ{i}: {a} vs {b}");
        }
        assert!(
            scores.applications < random.applications,
            "scores start {} vs random {} applications",
            scores.applications,
            random.applications
        );
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
