//! # fs-traits — the seam between language models and Fisher estimators
//!
//! A causal language model maps tokens `x_0 … x_{T-1}` to next-token logits. Split it at
//! layer `k` (0 = embedding output, `n_layers` = output of the last block, before the final
//! norm):
//!
//! * the **lower half** `L_k` maps tokens to residual-stream activations `H_k` (`T × d`);
//! * the **upper half** `U_k` maps `H_k` to logits `Z` (`T × V`).
//!
//! At position `t`, hold every other position's activation fixed (the *context*) and let
//! `h = H_k[t]` vary. The upper half at `t` is then a function of one `d`-vector, and factors
//! through the final-norm output `u` (the *readout*, dimension `d_u`, usually `d`):
//!
//! ```text
//!     z(h) = W_U · u(h) + b,        u(h) = norm_f(r_L(h)),       p = softmax(z)
//! ```
//!
//! With `A = ∂u/∂h` (`d_u × d`) the logit Jacobian is `J = W_U A` (`V × d`), the score of a
//! token `y` is `g_y = ∇_h log p_y = Jᵀ(e_y − p)`, and the Fisher information is
//!
//! ```text
//!     F = E_{y~p}[g_y g_yᵀ] = Jᵀ(diag p − p pᵀ)J = Aᵀ G A,   G = W_Uᵀ(diag p − p pᵀ)W_U.
//! ```
//!
//! [`SplitModel`] asks a model for exactly the pieces the estimators in `fs-estimators` need:
//! dimensions, the lower pass, logits at a position (optionally at a perturbed `h`), score
//! gradients for chosen tokens, the readout Jacobians `A` (whole, or as batched products `A V`
//! and `Aᵀ W`), the unembedding `W_U`, and a way to extend a context by one token. It uses plain
//! host arrays ([`Matrix`], [`MatrixRef`]) and no tensor framework, so any model — candle,
//! burn, dfdx or hand-written — can implement it.

#![warn(missing_docs)]

mod attention;
pub mod engine;
mod error;
mod matrix;
mod scalar;
mod unembedding;

pub use attention::{
    check_attention_head, check_attention_query, key_visible, mask_invisible_scores, visible_keys,
    AttentionHead,
};
pub use engine::{softmax, tempered_softmax};
pub use error::{FsError, Result};
pub use matrix::{Matrix, MatrixRef};
pub use scalar::{Scalar, TypedSlice, TypedSliceMut};
pub use unembedding::{Unembedding, UnembeddingRows, UNEMBEDDING_CHUNK_ROWS};

/// One position's output Gram `G` (see [`SplitModel::device_output_gram`]) held where the model
/// lives: `p`, the slopes and `m` uploaded once, each application one pass over the unembedding.
pub trait OutputGram {
    /// `G U` for the rows of `u` (`b × d_u`): rows in, rows out, `f64` on both sides,
    /// `(G u)_i = Σ_y p_y q_y (s_y w_y − m)` with `q_y = s_y w_yᵀu − mᵀu`.
    fn apply(&self, u: &Matrix<f64>) -> Result<Matrix<f64>>;

    /// `m = Σ_y p_y s_y w_y` (`d_u` values), copied back from where it lives: the centre of the
    /// rows `s_y w_y − m` whose pull-backs `Aᵀ(s_y w_y − m) = ∇_h log p_y` are the score
    /// vectors.
    fn mean_row(&self) -> Result<Vec<f64>>;
}

/// The sizes of a split model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelDims {
    /// `d`: width of the residual-stream activation `h` that the Fisher matrix is taken over.
    pub d_model: usize,
    /// `d_u`: width of the readout `u` that the unembedding acts on (`z = W_U u + b`).
    /// Equal to `d_model` for transformers (`u` is the final-norm output).
    pub readout_dim: usize,
    /// `V`: vocabulary size, the number of logits.
    pub vocab_size: usize,
    /// Number of blocks; valid split layers are `0..=n_layers`.
    pub n_layers: usize,
    /// Longest sequence the model accepts (`n_positions` for GPT-2), if it has a limit.
    pub max_seq_len: Option<usize>,
}

/// What a lower pass produced: enough to evaluate the upper half at any position.
///
/// For a transformer this is the layer-`k` activations `H_k` plus the keys/values of every
/// position at every layer `≥ k` (a KV cache), so the upper half at position `t` can be run on
/// a single row.
pub trait SplitContext {
    /// The split layer `k` these activations belong to.
    fn layer(&self) -> usize;
    /// The token ids this context was computed from (`T` of them).
    fn tokens(&self) -> &[u32];
    /// Sequence length `T`.
    fn seq_len(&self) -> usize {
        self.tokens().len()
    }
}

/// A language model split at a layer, as seen by the Fisher estimators.
///
/// Positions are 0-based; the logits at position `t` are the distribution of token `t + 1`
/// given `x_0 … x_t`. All methods must validate their inputs and return [`FsError`] — never
/// panic — for a layer outside `0..=n_layers`, a position outside `0..T`, a token `≥ V`, or a
/// vector of the wrong length.
///
/// Implementations may choose their scalar ([`Scalar`]: `f32` or `f64`); the estimators keep
/// their `d × d` accumulators in `f64` whatever it is.
pub trait SplitModel {
    /// Element type of every array this model hands out.
    type Scalar: Scalar;
    /// The result of a lower pass (activations and cached context).
    type Context: SplitContext;

    /// `d`, `d_u`, `V`, number of layers and maximum sequence length.
    fn dims(&self) -> ModelDims;

    /// The lower pass `L_k`: run `tokens` through the model up to split layer `layer`,
    /// caching whatever the upper half needs (for a transformer: the KV cache of layers
    /// `≥ layer` from one full forward pass).
    ///
    /// Errors: empty `tokens`, a token `≥ V`, `layer > n_layers`, a sequence longer than
    /// `max_seq_len`.
    fn lower(&self, tokens: &[u32], layer: usize) -> Result<Self::Context>;

    /// Lower passes of the same `tokens` for several split layers, in the order given. The
    /// default calls [`lower`](Self::lower) once per layer; backends override it to share one
    /// forward pass (the contexts of different layers differ only in which activations and
    /// which blocks' keys/values they keep).
    fn lower_layers(&self, tokens: &[u32], layers: &[usize]) -> Result<Vec<Self::Context>> {
        layers.iter().map(|&layer| self.lower(tokens, layer)).collect()
    }

    /// `h = H_k[t]`, the layer-`k` activation at `position` (length `d`).
    fn activation(&self, ctx: &Self::Context, position: usize) -> Result<Vec<Self::Scalar>>;

    /// The upper half at one position as a function of its activation: `z(h)` with every other
    /// position's activation held at its value in `ctx`. `h` has length `d`; the result has
    /// length `V`. This is the function the Fisher matrix is the curvature of; the estimators
    /// use it for finite-difference checks and direction read-outs.
    fn upper_logits(
        &self,
        ctx: &Self::Context,
        position: usize,
        h: &[Self::Scalar],
    ) -> Result<Vec<Self::Scalar>>;

    /// Next-token logits at each of `positions` (unperturbed), one row of length `V` each.
    ///
    /// The default evaluates [`upper_logits`](Self::upper_logits) at
    /// [`activation`](Self::activation); backends override it with their cached forward pass.
    fn logits(&self, ctx: &Self::Context, positions: &[usize]) -> Result<Matrix<Self::Scalar>> {
        let v = self.dims().vocab_size;
        let mut out = Matrix::zeros(positions.len(), v);
        for (row, &t) in positions.iter().enumerate() {
            let h = self.activation(ctx, t)?;
            let z = self.upper_logits(ctx, t, &h)?;
            check_len("upper_logits output", z.len(), v)?;
            out.row_mut(row).copy_from_slice(&z);
        }
        Ok(out)
    }

    /// Score gradients `g_y = ∇_h log p_y(h)` at `position` for each token in `tokens`
    /// (repeats allowed), one row of length `d` each: `g_y = Jᵀ(e_y − p) = Aᵀ(w_y − m)`,
    /// `m = W_Uᵀ p`.
    ///
    /// The default computes exactly that from [`readout_jacobians`](Self::readout_jacobians),
    /// [`unembedding`](Self::unembedding) and [`logits`](Self::logits) (softmax in `f64`), which
    /// costs a full readout Jacobian. Backends override it with `len(tokens)` vector–Jacobian
    /// products of the single-position upper half in one batched backward pass — the point of
    /// the sampled estimator.
    fn score_gradients(
        &self,
        ctx: &Self::Context,
        position: usize,
        tokens: &[u32],
    ) -> Result<Matrix<Self::Scalar>> {
        let dims = self.dims();
        check_tokens_in_vocab(tokens, dims.vocab_size)?;
        let z = self.logits(ctx, &[position])?;
        check_len("logits", z.cols(), dims.vocab_size)?;
        check_finite("logits", z.as_slice())?;
        let max = z.row(0).iter().fold(f64::NEG_INFINITY, |m, x| m.max(x.as_f64()));
        let e: Vec<f64> = z.row(0).iter().map(|x| (x.as_f64() - max).exp()).collect();
        let total: f64 = e.iter().sum();
        let w_u = self.unembedding();
        let du = dims.readout_dim;
        w_u.check_shape(dims.vocab_size, du)?;
        let slopes = logit_slopes(self.final_logit_softcap(), z.row(0));
        let slope = |y: usize| slopes.as_ref().map_or(1.0, |s| s[y]);
        let mut m = vec![0.0f64; du];
        w_u.for_each_chunk(UNEMBEDDING_CHUNK_ROWS, |start, rows| {
            for (i, row) in rows.chunks_exact(du.max(1)).enumerate() {
                let y = start + i;
                for (mi, w) in m.iter_mut().zip(row) {
                    *mi += e[y] / total * slope(y) * w.as_f64();
                }
            }
            Ok(())
        })?;
        let chosen: Vec<usize> = tokens.iter().map(|&y| y as usize).collect();
        let w_chosen = w_u.gather(&chosen)?;
        let a = single_readout_jacobian(self, ctx, position)?;
        let mut out = Matrix::zeros(tokens.len(), dims.d_model);
        for (i, &y) in tokens.iter().enumerate() {
            let sy = slope(y as usize);
            let diff: Vec<f64> =
                w_chosen.row(i).iter().zip(&m).map(|(w, mi)| sy * w.as_f64() - mi).collect();
            for (c, o) in out.row_mut(i).iter_mut().enumerate() {
                *o = Self::Scalar::round_from_f64(
                    (0..du).map(|k| a.get(k, c).as_f64() * diff[k]).sum(),
                );
            }
        }
        Ok(out)
    }

    /// The readout Jacobians `A_t = ∂u/∂h` (`d_u × d`, row-major) at each of `positions`.
    ///
    /// Backends compute each as `d_u` VJPs of the single-position upper half (replicate `h`
    /// `d_u` times as a batch, back-propagate `Σ_i ⟨e_i, u_i⟩` once), several positions per
    /// backward pass. The `V × d` logit Jacobian is never formed.
    fn readout_jacobians(
        &self,
        ctx: &Self::Context,
        positions: &[usize],
    ) -> Result<Vec<Matrix<Self::Scalar>>>;

    /// Jacobian–vector products of the readout at one position: for each row `v_i` of
    /// `tangents` (`R × d`), the row `A v_i` (`R × d_u`), `A = ∂u/∂h` — the directional
    /// derivatives of the readout `u` along `v_i`. Linear in each `v_i`.
    ///
    /// The default forms `A` with [`readout_jacobians`](Self::readout_jacobians) (cost: `d_u`
    /// VJPs) and multiplies in `f64`, rounding once; backends with forward-mode
    /// differentiation override it with one pass of `R` tangents, which is what makes the
    /// matrix-free top-K eigensolver cheaper than forming `F`.
    fn readout_jvp(
        &self,
        ctx: &Self::Context,
        position: usize,
        tangents: MatrixRef<'_, Self::Scalar>,
    ) -> Result<Matrix<Self::Scalar>> {
        let dims = self.dims();
        check_len("tangent length (d)", tangents.cols(), dims.d_model)?;
        let a = single_readout_jacobian(self, ctx, position)?;
        Ok(Matrix::from_fn(tangents.rows(), dims.readout_dim, |i, k| {
            let v = tangents.row(i);
            Self::Scalar::round_from_f64(
                a.row(k).iter().zip(v).map(|(x, y)| x.as_f64() * y.as_f64()).sum(),
            )
        }))
    }

    /// Whether [`readout_jvp`](Self::readout_jvp) is a native forward-mode pass, costing in
    /// proportion to the number of tangents (`true`), or the default, which forms all of `A`
    /// on every call (`false`, the default). A caller that applies `A` many times at one
    /// position (the matrix-free top-K eigensolver) forms `A` once when this is `false`.
    fn native_readout_jvp(&self) -> bool {
        false
    }

    /// Vector–Jacobian products of the readout at one position: for each row `w_i` of
    /// `cotangents` (`R × d_u`), the row `Aᵀ w_i` (`R × d`) — the gradient of `⟨w_i, u(h)⟩`
    /// with respect to `h`. Linear in each `w_i`.
    ///
    /// The default forms `A` with [`readout_jacobians`](Self::readout_jacobians) and multiplies
    /// in `f64`, rounding once; backends override it with one backward pass over `R` replicas
    /// of the position (as [`score_gradients`](Self::score_gradients) does).
    fn readout_vjp(
        &self,
        ctx: &Self::Context,
        position: usize,
        cotangents: MatrixRef<'_, Self::Scalar>,
    ) -> Result<Matrix<Self::Scalar>> {
        let dims = self.dims();
        check_len("cotangent length (d_u)", cotangents.cols(), dims.readout_dim)?;
        let a = single_readout_jacobian(self, ctx, position)?;
        Ok(Matrix::from_fn(cotangents.rows(), dims.d_model, |i, j| {
            let w = cotangents.row(i);
            Self::Scalar::round_from_f64(
                (0..dims.readout_dim).map(|k| a.get(k, j).as_f64() * w[k].as_f64()).sum(),
            )
        }))
    }

    /// The unembedding `W_U` (`V × d_u`, row `y` is the output embedding `w_y`), so that
    /// `z = W_U u + b`. The bias `b` does not enter the Fisher matrix.
    ///
    /// A model that holds `W_U` in its scalar lends it whole
    /// (`Unembedding::Dense(MatrixRef::new(v, d_u, &w)?)`, or `(&matrix).into()`); one that
    /// keeps it in a narrower stored form lends a reader ([`Unembedding::Rows`]) and the
    /// estimators stream it in vocabulary chunks.
    fn unembedding(&self) -> Unembedding<'_, Self::Scalar>;

    /// The final-logit soft-cap `c` of a model whose logits are `z = c·tanh(W_U u / c)`
    /// (Gemma-2), `None` (the default) when `z = W_U u + b`.
    ///
    /// With a cap, `∂z_y/∂u = s_y w_y` with the slope `s_y = 1 − tanh²(ẑ_y/c) = 1 − (z_y/c)²`,
    /// computable from the capped logits themselves ([`logit_slopes`]). The estimators then use
    /// `s_y w_y` wherever they would use `w_y`: `G = Σ_y p_y (s_y w_y − m)(s_y w_y − m)ᵀ` with
    /// `m = Σ_y p_y s_y w_y`, `g_y = Aᵀ(s_y w_y − m)`.
    fn final_logit_softcap(&self) -> Option<f64> {
        None
    }

    /// The model with an **edited activation**: a context for the prefix `x_0 … x_position` in
    /// which the layer-`k` activation at `position` is `h` instead of its computed value (what
    /// activation steering and patching do). The result has length `position + 1` and every
    /// method evaluated at its last position — logits, score gradients, readout Jacobians,
    /// JVPs and VJPs — is taken at `h`, with the other positions' cached keys and values as in
    /// `ctx` (exactly the function [`upper_logits`](Self::upper_logits) evaluates, so
    /// `logits(edited, [position]) = upper_logits(ctx, position, h)`). The later positions are
    /// dropped: their cache was computed from the unedited activation, and the result is not
    /// meant to be [`extend`](Self::extend)ed.
    ///
    /// The steering and edit-cost analyses (`fs_estimators::steering`) recompute `F` and
    /// `∇_h log p_y` at edited activations with it. The default returns
    /// [`FsError::Unsupported`]: the edit needs the backend's cache layout. The backends of this
    /// workspace and the analytic models implement it.
    fn with_activation(
        &self,
        ctx: &Self::Context,
        position: usize,
        h: &[Self::Scalar],
    ) -> Result<Self::Context> {
        let _ = (ctx, position, h);
        Err(FsError::Unsupported(
            "SplitModel::with_activation (an edited activation), which steering needs".into(),
        ))
    }

    /// The weighted output Gram of one position, `G = Σ_y p_y (s_y w_y − m)(s_y w_y − m)ᵀ`
    /// (`m = Σ_y p_y s_y w_y`, `w_y` the unembedding rows, `s_y` the soft-cap slopes or 1), as an
    /// operator applied **where the model lives** ([`OutputGram`]), or `Ok(None)` (the default)
    /// when the model has no such path, in which case `fs_estimators::FisherOperator` applies `G`
    /// on the host from [`unembedding`](Self::unembedding). For a model on a GPU, whose
    /// unembedding rows the host would otherwise copy from the device at every application of the
    /// matrix-free operator. `p` (`V`, normalised) and `slopes` are the caller's, in `f64`.
    fn device_output_gram(
        &self,
        p: &[f64],
        slopes: Option<&[f64]>,
    ) -> Result<Option<Box<dyn OutputGram + '_>>> {
        let _ = (p, slopes);
        Ok(None)
    }

    /// The exact Fisher `F_t = A_tᵀ G_t A_t` at each of `positions`, computed **where the model
    /// lives** — the readout Jacobian, the weighted Gram `G = Σ_y p_y (w_y − m)(w_y − m)ᵀ` (soft-cap
    /// slopes applied as in [`final_logit_softcap`](Self::final_logit_softcap)) and the sandwich
    /// on the model's device, only the `d × d` results copied back — or `Ok(None)` when the model
    /// has no such path (the default), in which case `fs_estimators::exact_fisher` forms `F` on
    /// the host from [`readout_jacobians`](Self::readout_jacobians) and
    /// [`unembedding`](Self::unembedding). For a model on a GPU, where the host would otherwise
    /// do the `V·d_u²` Gram and the `d³` sandwich while the device waits. Implementations keep
    /// the estimators' precision: products in the model's scalar, chunk results of the
    /// vocabulary accumulated and the sandwich taken in `f64`.
    fn device_exact_fisher(
        &self,
        ctx: &Self::Context,
        positions: &[usize],
    ) -> Result<Option<Vec<Matrix<f64>>>> {
        let _ = (ctx, positions);
        Ok(None)
    }

    /// Query heads per block, `0` (the default) for a model that does not expose its attention
    /// distributions ([`attention_scores`](Self::attention_scores) and
    /// [`attention_jacobian`](Self::attention_jacobian) then return [`FsError::Unsupported`]).
    fn attention_heads(&self) -> usize {
        0
    }

    /// The scores of one attention head for the query at `position`, as a function of the split
    /// activation `h` there (every other position held at its value in `ctx`, as for
    /// [`upper_logits`](Self::upper_logits)): `s_i` for the keys `i = 0 ..= position`, exactly as
    /// the model's softmax sees them (scaled, soft-capped where the model caps attention logits),
    /// with `−∞` for keys the query may not attend to (outside a sliding window). The weights are
    /// `a = softmax(s)`. Length `position + 1`. See the [`attention`](crate::AttentionHead)
    /// types for the math; the block must satisfy `ctx.layer() ≤ head.layer < n_layers`
    /// ([`check_attention_head`]).
    ///
    /// The default returns [`FsError::Unsupported`]; the backends of this workspace implement it.
    fn attention_scores(
        &self,
        ctx: &Self::Context,
        position: usize,
        head: AttentionHead,
        h: &[Self::Scalar],
    ) -> Result<Vec<Self::Scalar>> {
        let _ = (ctx, position, head, h);
        Err(FsError::Unsupported("SplitModel::attention_scores (attention distributions)".into()))
    }

    /// The Jacobian `J = ∂s/∂h` (`(position + 1) × d`, row `i` = the gradient of key `i`'s score)
    /// of [`attention_scores`](Self::attention_scores) at the context's own activation. Rows of
    /// keys the query may not attend to are zero. Only the query row and the query's own key
    /// depend on `h`, so row `i < position` is `scale · k_iᵀ ∂q/∂h` (through the soft-cap's slope
    /// where there is one).
    ///
    /// The default returns [`FsError::Unsupported`]; backends compute it in one backward pass of
    /// `position + 1` replicas of the activation.
    fn attention_jacobian(
        &self,
        ctx: &Self::Context,
        position: usize,
        head: AttentionHead,
    ) -> Result<Matrix<Self::Scalar>> {
        let _ = (ctx, position, head);
        Err(FsError::Unsupported("SplitModel::attention_jacobian (attention distributions)".into()))
    }

    /// A context for the sequence `x_0 … x_{prefix_len−1}, token`: keep the first `prefix_len`
    /// positions of `ctx` and append `token` at position `prefix_len`, with its own position
    /// (position id / rotary angle `prefix_len`, never 0). The new position is
    /// `prefix_len` and the result has length `prefix_len + 1`.
    ///
    /// Used by the predictive average, which draws `a ~ p(·|x_{≤t})` and analyses `a`'s
    /// layer-`k` state at position `t + 1` (`prefix_len = t + 1`).
    ///
    /// The default re-runs [`lower`](Self::lower) on the new token sequence (correct for any
    /// model; backends override it to reuse the cached prefix).
    fn extend(&self, ctx: &Self::Context, prefix_len: usize, token: u32) -> Result<Self::Context> {
        let tokens = ctx.tokens();
        if prefix_len > tokens.len() {
            return Err(FsError::invalid(
                "prefix_len",
                prefix_len,
                format!("at most the sequence length {}", tokens.len()),
            ));
        }
        let mut extended = tokens[..prefix_len].to_vec();
        extended.push(token);
        self.lower(&extended, ctx.layer())
    }
}

/// The readout Jacobian `A` (`d_u × d`) of one position from
/// [`SplitModel::readout_jacobians`], its shape checked: what the defaults of [`SplitModel`] and
/// callers that need one position's `A` build on.
pub fn single_readout_jacobian<M: SplitModel + ?Sized>(
    model: &M,
    ctx: &M::Context,
    position: usize,
) -> Result<Matrix<M::Scalar>> {
    let dims = model.dims();
    let a = model.readout_jacobians(ctx, &[position])?.into_iter().next();
    let a = a.ok_or_else(|| FsError::Backend("no readout Jacobian returned".into()))?;
    if a.shape() != (dims.readout_dim, dims.d_model) {
        return Err(FsError::DimensionMismatch {
            what: format!(
                "readout Jacobian A shape (expected {}x{}, got {}x{})",
                dims.readout_dim,
                dims.d_model,
                a.rows(),
                a.cols()
            ),
            expected: dims.readout_dim * dims.d_model,
            got: a.rows() * a.cols(),
        });
    }
    Ok(a)
}

/// The soft-cap slopes `s_y = 1 − (z_y/c)²` of capped logits `z = c·tanh(ẑ/c)` (see
/// [`SplitModel::final_logit_softcap`]), clamped to `[0, 1]` against rounding; `None` without a
/// cap.
pub fn logit_slopes<S: Scalar>(softcap: Option<f64>, logits: &[S]) -> Option<Vec<f64>> {
    softcap.map(|c| {
        logits
            .iter()
            .map(|z| {
                let t = z.as_f64() / c;
                (1.0 - t * t).clamp(0.0, 1.0)
            })
            .collect()
    })
}

/// Check that a vector has the expected length.
pub fn check_len(what: &str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(FsError::DimensionMismatch { what: what.to_string(), expected, got })
    }
}

/// Check a split layer against `0..=n_layers`.
pub fn check_layer(layer: usize, n_layers: usize) -> Result<()> {
    if layer <= n_layers {
        Ok(())
    } else {
        Err(FsError::LayerOutOfRange { layer, n_layers })
    }
}

/// Check a position against `0..seq_len`.
pub fn check_position(position: usize, seq_len: usize) -> Result<()> {
    if position < seq_len {
        Ok(())
    } else {
        Err(FsError::PositionOutOfRange { position, seq_len })
    }
}

/// Check that every token id is `< vocab_size` (an empty list is fine).
pub fn check_tokens_in_vocab(tokens: &[u32], vocab_size: usize) -> Result<()> {
    match tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab_size) {
        None => Ok(()),
        Some((index, &token)) => Err(FsError::TokenOutOfRange { token, index, vocab_size }),
    }
}

/// Check a token sequence: non-empty, every id `< vocab_size`, length within `max_seq_len`.
pub fn check_tokens(tokens: &[u32], vocab_size: usize, max_seq_len: Option<usize>) -> Result<()> {
    if tokens.is_empty() {
        return Err(FsError::EmptySequence);
    }
    if let Some(max) = max_seq_len {
        if tokens.len() > max {
            return Err(FsError::SequenceTooLong { len: tokens.len(), max });
        }
    }
    check_tokens_in_vocab(tokens, vocab_size)
}

/// Check that every value is finite; the error names `what` and the first bad index.
pub fn check_finite<S: Scalar>(what: &str, values: &[S]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => {
            Err(FsError::NonFinite { what: what.to_string(), index, value: values[index].as_f64() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_checks_name_the_problem() {
        assert!(check_tokens(&[0, 1, 2], 3, Some(3)).is_ok());
        let e = check_tokens(&[0, 5], 3, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "token id 5 at index 1 is out of range: the vocabulary has 3 tokens (ids 0..=2)"
        );
        assert!(matches!(
            check_tokens(&[0, 1, 2, 0], 3, Some(3)),
            Err(FsError::SequenceTooLong { len: 4, max: 3 })
        ));
        assert!(matches!(check_tokens(&[], 3, None), Err(FsError::EmptySequence)));
    }

    #[test]
    fn layer_and_position_checks() {
        assert!(check_layer(12, 12).is_ok());
        let e = check_layer(13, 12).unwrap_err();
        assert!(e.to_string().contains("0..=12"), "{e}");
        assert!(check_position(3, 4).is_ok());
        assert!(check_position(4, 4).is_err());
    }

    #[test]
    fn finite_check_reports_index() {
        let e = check_finite("probabilities", &[0.5f32, f32::NAN]).unwrap_err();
        assert!(matches!(e, FsError::NonFinite { index: 1, .. }));
        assert!(e.to_string().contains("probabilities"));
    }
}
