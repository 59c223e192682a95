//! Forward-mode differentiation of the single-position upper half: the readout Jacobian
//! `A = ∂u/∂h` without replicating the forward pass.
//!
//! A [`Dual`] carries, for each of `P` positions, the primal row `x` `(P, 1, …)` and `R` tangent
//! rows `ẋ` `(P, R, …)`: the directional derivatives of `x` along `R` directions of `h`. Seeding
//! the tangents with rows of the identity and pushing them through the upper half gives, at the
//! final norm, `u̇_r = A e_r`, i.e. the columns of `A`.
//!
//! Why not reverse mode: a reverse pass needs the forward pass of every replica it
//! differentiates, so `d` cotangents cost `d` replicated forward rows *and* `d` backward rows.
//! Forward mode runs the primal once (one row) and the tangents once: every linear layer is one
//! `(P·R × in)·(in × out)` GEMM on the tangents, and every nonlinearity is an elementwise product
//! with its derivative at the primal row. That halves the flops of the exact estimator's
//! dominant step, and nothing but the current layer's tangents is kept alive.
//!
//! The tangent rules, for a primal row `x` and a tangent row `ẋ` (`n` = width):
//!
//! * linear `y = xW + b`: `ẏ = ẋW`;
//! * LayerNorm `y = γ ∘ x̂ + β`, `x̂ = (x − μ)/σ`, `σ = √(var x + ε)`:
//!   `ẏ = γ ∘ (ẋ_c − x̂ · mean(ẋ_c ∘ x̂)) / σ`, `ẋ_c = ẋ − mean(ẋ)`;
//! * RMSNorm `y = w ∘ x / r`, `r = √(mean x² + ε)`: `ẏ = w ∘ (ẋ − x · mean(x ∘ ẋ)/r²) / r`;
//! * elementwise `y = g(x)`: `ẏ = g'(x) ∘ ẋ`; SwiGLU `m = silu(a) ∘ b`:
//!   `ṁ = silu'(a) ∘ ȧ ∘ b + silu(a) ∘ ḃ`, `silu'(a) = σ(a)(1 + a(1 − σ(a)))`;
//! * attention of the row at position `t` (query `q`, own key/value `k`, `v`, cached keys/values
//!   `K_j`, `V_j` of positions `j < t`): scores `s_j = q·K_j·c`, `s_t = q·k·c`, `a = softmax(s)`,
//!   `o = Σ_j a_j V_j + a_t v`; then `ṡ_j = q̇·K_j·c`, `ṡ_t = (q̇·k + q·k̇)·c`,
//!   `ȧ = a ∘ (ṡ − ⟨a, ṡ⟩)`, `ȯ = Σ_j ȧ_j V_j + ȧ_t v + a_t v̇`.
//!
//! Every rule is checked against finite differences through the models' readout Jacobians (the
//! `SplitModel` contract in `tests/`).

use crate::cached::Attention;
use crate::ops::{gelu_new, layer_norm, linear, softmax_last_dim, Weight};
use candle_core::{Result, Tensor, D};
use fs_traits::engine::MASKED;

/// Primal rows `x` `(P, 1, …)` and tangent rows `dx` `(P, R, …)`.
pub(crate) struct Dual {
    pub(crate) x: Tensor,
    pub(crate) dx: Tensor,
}

impl Dual {
    /// Apply the same linear map to the primal and the tangents (reshapes, transposes, RoPE,
    /// head repetition). `f` gets the tensor and its number of rows per position (1 for the
    /// primal, `R` for the tangents; whatever axis they currently sit on).
    pub(crate) fn map(&self, f: impl Fn(&Tensor, usize) -> Result<Tensor>) -> Result<Dual> {
        let r = self.dx.elem_count() / self.x.elem_count().max(1);
        Ok(Dual { x: f(&self.x, 1)?, dx: f(&self.dx, r)? })
    }

    /// `y = xW + b`, `ẏ = ẋW`: one product of the stacked rows `[x; ẋ]`, so the weight is read
    /// (and, when stored narrower than f32, widened) once per layer — the primal row alone is a
    /// matrix–vector product as expensive as a block of tangents, since both stream `W`.
    pub(crate) fn linear(&self, w: &Weight, b: Option<&Tensor>) -> Result<Dual> {
        let inp = self.x.dim(D::Minus1)?;
        let (nx, ndx) = (self.x.elem_count() / inp.max(1), self.dx.elem_count() / inp.max(1));
        let rows = Tensor::cat(&[self.x.reshape((nx, inp))?, self.dx.reshape((ndx, inp))?], 0)?;
        let y = linear(&rows, w, None)?;
        let out = y.dim(1)?;
        let shaped = |t: &Tensor| {
            let mut dims = t.dims().to_vec();
            *dims.last_mut().expect("a tensor with a feature axis") = out;
            dims
        };
        let x = y.narrow(0, 0, nx)?.reshape(shaped(&self.x))?;
        let x = match b {
            Some(b) => x.broadcast_add(b)?,
            None => x,
        };
        Ok(Dual { x, dx: y.narrow(0, nx, ndx)?.reshape(shaped(&self.dx))? })
    }

    /// `x + y`.
    pub(crate) fn add(&self, other: &Dual) -> Result<Dual> {
        Ok(Dual { x: (&self.x + &other.x)?, dx: (&self.dx + &other.dx)? })
    }

    /// LayerNorm over the last axis (biased variance, as `torch.nn.LayerNorm`).
    pub(crate) fn layer_norm(&self, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Dual> {
        let centered = self.x.broadcast_sub(&self.x.mean_keepdim(D::Minus1)?)?;
        let inv_sigma = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let x_hat = centered.broadcast_mul(&inv_sigma)?;
        let dxc = self.dx.broadcast_sub(&self.dx.mean_keepdim(D::Minus1)?)?;
        let proj = dxc.broadcast_mul(&x_hat)?.mean_keepdim(D::Minus1)?;
        let dx_hat = (dxc - proj.broadcast_mul(&x_hat)?)?.broadcast_mul(&inv_sigma)?;
        Ok(Dual { x: layer_norm(&self.x, gamma, beta, eps)?, dx: dx_hat.broadcast_mul(gamma)? })
    }

    /// RMSNorm over the last axis: `w ∘ x / √(mean x² + ε)`.
    pub(crate) fn rms_norm(&self, w: &Tensor, eps: f64) -> Result<Dual> {
        let inv_r = (self.x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let x_scaled = self.x.broadcast_mul(&inv_r)?;
        let proj = self.dx.broadcast_mul(&x_scaled)?.mean_keepdim(D::Minus1)?;
        let dy = (self.dx.broadcast_sub(&proj.broadcast_mul(&x_scaled)?)?).broadcast_mul(&inv_r)?;
        Ok(Dual { x: x_scaled.broadcast_mul(w)?, dx: dy.broadcast_mul(w)? })
    }

    /// GPT-2's `gelu_new`, with `g'(x)` evaluated on the primal rows only.
    pub(crate) fn gelu_new(&self) -> Result<Dual> {
        let deriv = crate::ops::gelu_new_derivative(&self.x)?;
        Ok(Dual { x: gelu_new(&self.x)?, dx: self.dx.broadcast_mul(&deriv)? })
    }

    /// `x ∘ y` (product rule `ẋ ∘ y + x ∘ ẏ`).
    pub(crate) fn mul(&self, other: &Dual) -> Result<Dual> {
        let dx = (self.dx.broadcast_mul(&other.x)? + other.dx.broadcast_mul(&self.x)?)?;
        Ok(Dual { x: (&self.x * &other.x)?, dx })
    }

    /// `act(x)`, with `act'(x)` evaluated on the primal rows only.
    pub(crate) fn activation(&self, act: fs_checkpoint::Activation) -> Result<Dual> {
        let (y, deriv) = crate::ops::activation_and_derivative(&self.x, act)?;
        Ok(Dual { x: y, dx: self.dx.broadcast_mul(&deriv)? })
    }

    /// SwiGLU's `silu(self) ∘ up`.
    pub(crate) fn silu_times(&self, up: &Dual) -> Result<Dual> {
        let sig = candle_core::Tensor::ones_like(&self.x)?
            .broadcast_div(&(self.x.neg()?.exp()? + 1.0)?)?;
        let silu = (&self.x * &sig)?;
        // silu'(a) = σ(a)·(1 + a·(1 − σ(a)))
        let silu_deriv = (&sig * ((&self.x * sig.affine(-1.0, 1.0)?)? + 1.0)?)?;
        let dx = (self.dx.broadcast_mul(&(silu_deriv * &up.x)?)? + up.dx.broadcast_mul(&silu)?)?;
        Ok(Dual { x: (silu * &up.x)?, dx })
    }
}

/// Attention of single rows against the cache, differentiated: `q`, `k`, `v` have primal
/// `(P, H, 1, d_head)` and tangents `(P, H, R, d_head)`; `keys`/`values` are the cache
/// `(H, T, d_head)`; `mask` lets the rows at `positions[p]` see cached positions `< positions[p]`
/// (see [`fs_traits::engine::context_mask`]). Returns primal and tangents of the attention output.
pub(crate) fn attend_cached_jvp(
    q: &Dual,
    k: &Dual,
    v: &Dual,
    keys: &Tensor,
    values: &Tensor,
    mask: Option<&(Tensor, usize)>,
    attn: &Attention,
) -> Result<Dual> {
    let Some((mask, t_max)) = mask else {
        // No context: the row attends only to itself, `o = v`.
        return Ok(Dual { x: v.x.clone(), dx: v.dx.clone() });
    };
    let k_ctx = keys.narrow(1, 0, *t_max)?.unsqueeze(0)?;
    let v_ctx = values.narrow(1, 0, *t_max)?.unsqueeze(0)?;
    let k_ctx_t = k_ctx.t()?;
    // Raw primal scores (one row per position and head), then scaled and soft-capped ones.
    let raw = Tensor::cat(
        &[&q.x.broadcast_matmul(&k_ctx_t)?, &(&q.x * &k.x)?.sum_keepdim(D::Minus1)?],
        3,
    )?;
    let scores = attn.scores(&raw)?;
    let probs = softmax_last_dim(&Tensor::cat(
        &[&scores.narrow(3, 0, *t_max)?.broadcast_add(mask)?, &scores.narrow(3, *t_max, 1)?],
        3,
    )?)?;
    let p_ctx = probs.narrow(3, 0, *t_max)?.contiguous()?;
    let p_self = probs.narrow(3, *t_max, 1)?;
    let out = (p_ctx.broadcast_matmul(&v_ctx)? + p_self.broadcast_mul(&v.x)?)?;
    // Tangent scores: ṡ_j = q̇·K_j·c, ṡ_t = (q̇·k + q·k̇)·c; through the cap
    // `s = cap·tanh(s_raw/cap)`: ṡ = (1 − (s/cap)²) ṡ_raw.
    let d_ctx = q.dx.broadcast_matmul(&k_ctx_t)?;
    let d_self = (q.dx.broadcast_mul(&k.x)? + k.dx.broadcast_mul(&q.x)?)?.sum_keepdim(D::Minus1)?;
    let mut ds = (Tensor::cat(&[&d_ctx, &d_self], 3)? * attn.scale)?;
    if let Some(c) = attn.softcap {
        let slope = (scores / c)?.sqr()?.affine(-1.0, 1.0)?;
        ds = ds.broadcast_mul(&slope)?;
    }
    // ȧ = a ∘ (ṡ − ⟨a, ṡ⟩); masked entries have a = 0 (exp(MASKED − max) underflows).
    const { assert!(MASKED < -1e20) };
    let mean = ds.broadcast_mul(&probs)?.sum_keepdim(D::Minus1)?;
    let dp = ds.broadcast_sub(&mean)?.broadcast_mul(&probs)?;
    let dp_ctx = dp.narrow(3, 0, *t_max)?.contiguous()?;
    let dp_self = dp.narrow(3, *t_max, 1)?;
    let dout = ((dp_ctx.broadcast_matmul(&v_ctx)? + dp_self.broadcast_mul(&v.x)?)?
        + v.dx.broadcast_mul(&p_self)?)?;
    Ok(Dual { x: out, dx: dout })
}

/// Tangent seeds: for each of `p` positions, the primal row `h_t` and the identity rows
/// `rows.start..rows.end` (`(p, R, d)`).
pub(crate) fn seed(h: &Tensor, p: usize, rows: std::ops::Range<usize>) -> Result<Dual> {
    let d = h.dim(D::Minus1)?;
    let eye = Tensor::eye(d, h.dtype(), h.device())?.narrow(0, rows.start, rows.len())?;
    let dx = eye.unsqueeze(0)?.broadcast_as((p, rows.len(), d))?.contiguous()?;
    Ok(Dual { x: h.reshape((p, 1, d))?, dx })
}
