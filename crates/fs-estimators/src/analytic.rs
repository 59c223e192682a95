//! Small models whose Fisher matrix is known in closed form, implementing [`SplitModel`]: the
//! known answers the estimators are tested against, and a template for bringing your own model.
//!
//! Both share a lower pass `h_t = E[x_t] + P[t]` (token plus learned position embedding, like
//! GPT-2's layer 0), have one split layer (`n_layers = 0`: only layer 0 is valid), and no
//! attention, so the upper half at `t` depends on `h_t` alone:
//!
//! * [`LinearModel`]: `z = W h + c`, so `J = W`, `A = I`, `W_U = W` and exactly
//!   `F = Wᵀ(diag p − p pᵀ)W`;
//! * [`TanhModel`]: `z = W₂ tanh(W₁ h + b) + c`, so `u = tanh(W₁ h + b)`,
//!   `A = diag(1 − u²) W₁`, `W_U = W₂`, `J = W₂ diag(1 − u²) W₁`.
//!
//! Arithmetic inside the models is `f64`; outputs are rounded once to the model's scalar `S`,
//! so an `f32` model exercises the estimators' `f32` paths with `f64`-accurate inputs.

use crate::{softmax, FsError, Matrix, Result, Scalar, SplitContext, SplitModel};
use fs_traits::ModelDims;
use fs_traits::Unembedding;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The context of the analytic models: the tokens and their layer-0 activations.
#[derive(Clone, Debug)]
pub struct AnalyticContext<S> {
    tokens: Vec<u32>,
    h: Matrix<S>,
}

impl<S> SplitContext for AnalyticContext<S> {
    fn layer(&self) -> usize {
        0
    }
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

impl<S: Copy> AnalyticContext<S> {
    /// The activations `H_0` (`T × d`).
    pub fn activations(&self) -> &Matrix<S> {
        &self.h
    }
}

/// Token and position embeddings: the lower pass shared by the analytic models.
#[derive(Clone, Debug)]
struct Embeddings<S> {
    token: Matrix<S>,
    position: Matrix<S>,
}

impl<S: Scalar> Embeddings<S> {
    fn lower(&self, tokens: &[u32], layer: usize) -> Result<AnalyticContext<S>> {
        fs_traits::check_layer(layer, 0)?;
        fs_traits::check_tokens(tokens, self.token.rows(), Some(self.position.rows()))?;
        let d = self.token.cols();
        let mut h = Matrix::zeros(tokens.len(), d);
        for (t, &x) in tokens.iter().enumerate() {
            let row = h.row_mut(t);
            for (j, r) in row.iter_mut().enumerate() {
                *r = self.token.get(x as usize, j) + self.position.get(t, j);
            }
        }
        Ok(AnalyticContext { tokens: tokens.to_vec(), h })
    }

    fn activation(&self, ctx: &AnalyticContext<S>, t: usize) -> Result<Vec<S>> {
        fs_traits::check_position(t, ctx.tokens.len())?;
        Ok(ctx.h.row(t).to_vec())
    }
}

impl<S: Scalar> AnalyticContext<S> {
    /// `SplitModel::with_activation`: the first `t + 1` positions with row `t` replaced by `h`
    /// (no attention: the upper half at `t` reads `h_t` alone).
    fn with_activation(&self, t: usize, h: &[S]) -> Result<Self> {
        fs_traits::check_position(t, self.tokens.len())?;
        fs_traits::check_len("h", h.len(), self.h.cols())?;
        fs_traits::check_finite("h", h)?;
        let mut edited = Matrix::from_fn(t + 1, self.h.cols(), |i, j| self.h.get(i, j));
        edited.row_mut(t).copy_from_slice(h);
        Ok(AnalyticContext { tokens: self.tokens[..=t].to_vec(), h: edited })
    }
}

fn to64<S: Scalar>(x: &[S]) -> Vec<f64> {
    x.iter().map(|v| v.as_f64()).collect()
}

fn from64<S: Scalar>(x: &[f64]) -> Vec<S> {
    x.iter().map(|&v| S::round_from_f64(v)).collect()
}

/// `y = M x + b` in `f64` for a row-major `M` (`rows × cols`).
fn affine<S: Scalar>(m: &Matrix<S>, x: &[f64], b: &[S]) -> Vec<f64> {
    (0..m.rows())
        .map(|i| m.row(i).iter().zip(x).map(|(a, x)| a.as_f64() * x).sum::<f64>() + b[i].as_f64())
        .collect()
}

/// The logit Jacobian `J` (`V × d`) from `W_U` (`V × d_u`) and `A` (`d_u × d`), in `f64`.
fn logit_jacobian<S: Scalar>(w_u: &Matrix<S>, a: &Matrix<f64>) -> Matrix<f64> {
    Matrix::from_fn(w_u.rows(), a.cols(), |y, j| {
        (0..a.rows()).map(|k| w_u.get(y, k).as_f64() * a.get(k, j)).sum()
    })
}

/// Score gradients `g_y = Jᵀ(e_y − p)` for each token, rounded to `S`.
fn scores<S: Scalar>(j: &Matrix<f64>, p: &[f64], tokens: &[u32]) -> Result<Matrix<S>> {
    let (v, d) = j.shape();
    let jp: Vec<f64> = (0..d).map(|c| (0..v).map(|y| p[y] * j.get(y, c)).sum()).collect();
    let mut out = Matrix::zeros(tokens.len(), d);
    for (i, &y) in tokens.iter().enumerate() {
        if y as usize >= v {
            return Err(FsError::TokenOutOfRange { token: y, index: i, vocab_size: v });
        }
        let row = out.row_mut(i);
        for c in 0..d {
            row[c] = S::round_from_f64(j.get(y as usize, c) - jp[c]);
        }
    }
    Ok(out)
}

/// The reference Fisher `Jᵀ(diag p − p pᵀ)J = Σ_y p_y (J_y − J̄)(J_y − J̄)ᵀ`, `J̄ = Σ_y p_y J_y`
/// (rows `J_y` of the logit Jacobian), by explicit `f64` loops (`O(V d²)`), independent of every
/// optimisation in this crate (chunking, GEMMs, the readout factorisation). It uses the centered
/// form so that it stays a good reference when `p` is peaked. For tests and for users checking
/// their own model.
pub fn reference_fisher(j: &Matrix<f64>, p: &[f64]) -> Matrix<f64> {
    let (v, d) = j.shape();
    let jp: Vec<f64> = (0..d).map(|c| (0..v).map(|y| p[y] * j.get(y, c)).sum()).collect();
    Matrix::from_fn(d, d, |a, b| {
        (0..v).map(|y| p[y] * (j.get(y, a) - jp[a]) * (j.get(y, b) - jp[b])).sum::<f64>()
    })
}

/// Deterministic `N(0, std²)` draws (Box–Muller on ChaCha8).
struct Gaussian(ChaCha8Rng);

impl Gaussian {
    fn new(seed: u64) -> Self {
        Gaussian(ChaCha8Rng::seed_from_u64(seed))
    }
    fn uniform(&mut self) -> f64 {
        ((self.0.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }
    fn sample(&mut self, std: f64) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    fn matrix<S: Scalar>(&mut self, rows: usize, cols: usize, std: f64) -> Matrix<S> {
        Matrix::from_fn(rows, cols, |_, _| S::round_from_f64(self.sample(std)))
    }
    fn vector<S: Scalar>(&mut self, n: usize, std: f64) -> Vec<S> {
        (0..n).map(|_| S::round_from_f64(self.sample(std))).collect()
    }
}

fn check_matrix<S>(what: &str, m: &Matrix<S>, rows: usize, cols: usize) -> Result<()> {
    if m.shape() == (rows, cols) {
        Ok(())
    } else {
        Err(FsError::DimensionMismatch {
            what: format!("{what} (expected {rows}x{cols}, got {}x{})", m.rows(), m.cols()),
            expected: rows * cols,
            got: m.rows() * m.cols(),
        })
    }
}

/// `z = W h + c` on top of token + position embeddings: the Fisher is exactly
/// `Wᵀ(diag p − p pᵀ)W`.
#[derive(Clone, Debug)]
pub struct LinearModel<S> {
    emb: Embeddings<S>,
    /// `W` (`V × d`).
    w: Matrix<S>,
    /// `c` (`V`).
    c: Vec<S>,
}

impl<S: Scalar> LinearModel<S> {
    /// Build from token embeddings `E` (`V × d`), position embeddings `P` (`max_len × d`),
    /// `W` (`V × d`) and `c` (`V`); shapes are checked.
    pub fn new(token_emb: Matrix<S>, pos_emb: Matrix<S>, w: Matrix<S>, c: Vec<S>) -> Result<Self> {
        let (v, d) = token_emb.shape();
        check_matrix("position embeddings", &pos_emb, pos_emb.rows(), d)?;
        check_matrix("W", &w, v, d)?;
        fs_traits::check_len("c", c.len(), v)?;
        Ok(LinearModel { emb: Embeddings { token: token_emb, position: pos_emb }, w, c })
    }

    /// Random weights: embeddings and `c` with standard deviation 1, `W` with `w_std`.
    pub fn random(vocab: usize, d: usize, max_len: usize, w_std: f64, seed: u64) -> Self {
        let mut g = Gaussian::new(seed);
        let token = g.matrix(vocab, d, 1.0);
        let position = g.matrix(max_len, d, 1.0);
        let w = g.matrix(vocab, d, w_std);
        let c = g.vector(vocab, 1.0);
        Self::new(token, position, w, c).expect("shapes are consistent by construction")
    }

    /// The same model in another scalar type (each weight rounded once).
    pub fn cast<T: Scalar>(&self) -> LinearModel<T> {
        let conv = |m: &Matrix<S>| m.map(|x| T::round_from_f64(x.as_f64()));
        LinearModel {
            emb: Embeddings { token: conv(&self.emb.token), position: conv(&self.emb.position) },
            w: conv(&self.w),
            c: self.c.iter().map(|x| T::round_from_f64(x.as_f64())).collect(),
        }
    }

    /// Mutable access to `W` (`V × d`) and `c`, for tests that shape the distribution.
    pub fn weights_mut(&mut self) -> (&mut Matrix<S>, &mut Vec<S>) {
        (&mut self.w, &mut self.c)
    }

    /// The known answer `Wᵀ(diag p − p pᵀ)W` at `position`, by explicit `f64` loops.
    pub fn known_fisher(&self, ctx: &AnalyticContext<S>, position: usize) -> Result<Matrix<f64>> {
        let h = self.activation(ctx, position)?;
        let z = self.upper_logits(ctx, position, &h)?;
        let p = softmax(&z)?;
        Ok(reference_fisher(&self.w.map(|x| x.as_f64()), &p))
    }
}

impl<S: Scalar> SplitModel for LinearModel<S> {
    type Scalar = S;
    type Context = AnalyticContext<S>;

    fn dims(&self) -> ModelDims {
        ModelDims {
            d_model: self.w.cols(),
            readout_dim: self.w.cols(),
            vocab_size: self.w.rows(),
            n_layers: 0,
            max_seq_len: Some(self.emb.position.rows()),
        }
    }
    fn lower(&self, tokens: &[u32], layer: usize) -> Result<Self::Context> {
        self.emb.lower(tokens, layer)
    }
    fn activation(&self, ctx: &Self::Context, position: usize) -> Result<Vec<S>> {
        self.emb.activation(ctx, position)
    }
    fn upper_logits(&self, ctx: &Self::Context, position: usize, h: &[S]) -> Result<Vec<S>> {
        fs_traits::check_position(position, ctx.seq_len())?;
        fs_traits::check_len("h", h.len(), self.w.cols())?;
        Ok(from64(&affine(&self.w, &to64(h), &self.c)))
    }
    fn score_gradients(
        &self,
        ctx: &Self::Context,
        position: usize,
        tokens: &[u32],
    ) -> Result<Matrix<S>> {
        let h = self.activation(ctx, position)?;
        let p = softmax(&self.upper_logits(ctx, position, &h)?)?;
        scores(&self.w.map(|x| x.as_f64()), &p, tokens)
    }
    fn readout_jacobians(
        &self,
        ctx: &Self::Context,
        positions: &[usize],
    ) -> Result<Vec<Matrix<S>>> {
        let d = self.w.cols();
        positions
            .iter()
            .map(|&t| {
                fs_traits::check_position(t, ctx.seq_len())?;
                Ok(Matrix::from_fn(d, d, |i, j| if i == j { S::one() } else { S::zero() }))
            })
            .collect()
    }
    fn with_activation(
        &self,
        ctx: &Self::Context,
        position: usize,
        h: &[S],
    ) -> Result<Self::Context> {
        ctx.with_activation(position, h)
    }
    fn unembedding(&self) -> Unembedding<'_, S> {
        (&self.w).into()
    }
}

/// `z = W₂ tanh(W₁ h + b) + c` on top of token + position embeddings: a nonlinear model whose
/// Jacobian `J = W₂ diag(1 − u²) W₁` is known in closed form.
#[derive(Clone, Debug)]
pub struct TanhModel<S> {
    emb: Embeddings<S>,
    /// `W₁` (`m × d`).
    w1: Matrix<S>,
    /// `b` (`m`).
    b1: Vec<S>,
    /// `W₂` (`V × m`).
    w2: Matrix<S>,
    /// `c` (`V`).
    c: Vec<S>,
}

impl<S: Scalar> TanhModel<S> {
    /// Build from `E` (`V × d`), `P` (`max_len × d`), `W₁` (`m × d`), `b` (`m`), `W₂` (`V × m`)
    /// and `c` (`V`); shapes are checked.
    pub fn new(
        token_emb: Matrix<S>,
        pos_emb: Matrix<S>,
        w1: Matrix<S>,
        b1: Vec<S>,
        w2: Matrix<S>,
        c: Vec<S>,
    ) -> Result<Self> {
        let (v, d) = token_emb.shape();
        let m = w1.rows();
        check_matrix("position embeddings", &pos_emb, pos_emb.rows(), d)?;
        check_matrix("W1", &w1, m, d)?;
        fs_traits::check_len("b", b1.len(), m)?;
        check_matrix("W2", &w2, v, m)?;
        fs_traits::check_len("c", c.len(), v)?;
        Ok(TanhModel { emb: Embeddings { token: token_emb, position: pos_emb }, w1, b1, w2, c })
    }

    /// Random weights with hidden width `m`: embeddings and biases with standard deviation 1,
    /// `W₁` with `1/√d` (so `tanh` is neither linear nor saturated), `W₂` with `w_std`.
    pub fn random(
        vocab: usize,
        d: usize,
        hidden: usize,
        max_len: usize,
        w_std: f64,
        seed: u64,
    ) -> Self {
        let mut g = Gaussian::new(seed);
        let token = g.matrix(vocab, d, 1.0);
        let position = g.matrix(max_len, d, 1.0);
        let w1 = g.matrix(hidden, d, 1.0 / (d as f64).sqrt());
        let b1 = g.vector(hidden, 0.5);
        let w2 = g.matrix(vocab, hidden, w_std);
        let c = g.vector(vocab, 1.0);
        Self::new(token, position, w1, b1, w2, c).expect("shapes are consistent by construction")
    }

    /// The same model in another scalar type (each weight rounded once).
    pub fn cast<T: Scalar>(&self) -> TanhModel<T> {
        let conv = |m: &Matrix<S>| m.map(|x| T::round_from_f64(x.as_f64()));
        let convv = |v: &[S]| v.iter().map(|x| T::round_from_f64(x.as_f64())).collect();
        TanhModel {
            emb: Embeddings { token: conv(&self.emb.token), position: conv(&self.emb.position) },
            w1: conv(&self.w1),
            b1: convv(&self.b1),
            w2: conv(&self.w2),
            c: convv(&self.c),
        }
    }

    fn hidden(&self, h: &[S]) -> Vec<f64> {
        affine(&self.w1, &to64(h), &self.b1).into_iter().map(f64::tanh).collect()
    }

    fn readout_jacobian_f64(&self, u: &[f64]) -> Matrix<f64> {
        Matrix::from_fn(self.w1.rows(), self.w1.cols(), |i, j| {
            (1.0 - u[i] * u[i]) * self.w1.get(i, j).as_f64()
        })
    }

    /// The closed-form logit Jacobian `J = W₂ diag(1 − u²) W₁` (`V × d`, `f64`) at `h`.
    pub fn logit_jacobian(&self, h: &[S]) -> Result<Matrix<f64>> {
        fs_traits::check_len("h", h.len(), self.w1.cols())?;
        Ok(logit_jacobian(&self.w2, &self.readout_jacobian_f64(&self.hidden(h))))
    }

    /// The known answer `Jᵀ(diag p − p pᵀ)J` at `position`, by explicit `f64` loops.
    pub fn known_fisher(&self, ctx: &AnalyticContext<S>, position: usize) -> Result<Matrix<f64>> {
        let h = self.activation(ctx, position)?;
        let p = softmax(&self.upper_logits(ctx, position, &h)?)?;
        Ok(reference_fisher(&self.logit_jacobian(&h)?, &p))
    }
}

impl<S: Scalar> SplitModel for TanhModel<S> {
    type Scalar = S;
    type Context = AnalyticContext<S>;

    fn dims(&self) -> ModelDims {
        ModelDims {
            d_model: self.w1.cols(),
            readout_dim: self.w1.rows(),
            vocab_size: self.w2.rows(),
            n_layers: 0,
            max_seq_len: Some(self.emb.position.rows()),
        }
    }
    fn lower(&self, tokens: &[u32], layer: usize) -> Result<Self::Context> {
        self.emb.lower(tokens, layer)
    }
    fn activation(&self, ctx: &Self::Context, position: usize) -> Result<Vec<S>> {
        self.emb.activation(ctx, position)
    }
    fn upper_logits(&self, ctx: &Self::Context, position: usize, h: &[S]) -> Result<Vec<S>> {
        fs_traits::check_position(position, ctx.seq_len())?;
        fs_traits::check_len("h", h.len(), self.w1.cols())?;
        let u = self.hidden(h);
        Ok(from64(&affine(&self.w2, &u, &self.c)))
    }
    fn score_gradients(
        &self,
        ctx: &Self::Context,
        position: usize,
        tokens: &[u32],
    ) -> Result<Matrix<S>> {
        let h = self.activation(ctx, position)?;
        let p = softmax(&self.upper_logits(ctx, position, &h)?)?;
        scores(&self.logit_jacobian(&h)?, &p, tokens)
    }
    fn readout_jacobians(
        &self,
        ctx: &Self::Context,
        positions: &[usize],
    ) -> Result<Vec<Matrix<S>>> {
        positions
            .iter()
            .map(|&t| {
                let h = self.activation(ctx, t)?;
                Ok(self.readout_jacobian_f64(&self.hidden(&h)).map(S::round_from_f64))
            })
            .collect()
    }
    fn with_activation(
        &self,
        ctx: &Self::Context,
        position: usize,
        h: &[S],
    ) -> Result<Self::Context> {
        ctx.with_activation(position, h)
    }
    fn unembedding(&self) -> Unembedding<'_, S> {
        (&self.w2).into()
    }
}
