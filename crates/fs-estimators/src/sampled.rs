//! The sampled (expected outer product) Fisher `F̂ = (1/S) Σ_s g_{y_s} g_{y_s}ᵀ`.

use crate::exact::check_shape;
use crate::{
    outer_product_mean, sample_tokens, sampling_distribution, FsError, Matrix, Result,
    SamplingOptions, SplitModel,
};

/// Options of the sampled estimator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampledOptions {
    /// Number of draws `S ≥ 1` per position.
    pub samples: usize,
    /// Seed of the random stream; position `t` uses stream `t` of this seed, so its draws do not
    /// depend on which other positions are computed alongside.
    pub seed: u64,
    /// Distribution the tokens are drawn from. The default draws from `p` (unbiased); anything
    /// else is **biased** (see [`SamplingOptions`]).
    pub sampling: SamplingOptions,
}

impl Default for SampledOptions {
    fn default() -> Self {
        SampledOptions { samples: 10, seed: 0, sampling: SamplingOptions::default() }
    }
}

/// A sampled Fisher estimate and the draws it was computed from.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledFisher {
    /// `(1/S) Σ_s g_{y_s} g_{y_s}ᵀ`, `d × d`, symmetric PSD, rank `≤ S`.
    pub fisher: Matrix<f64>,
    /// The tokens `y_1 … y_S`, in draw order.
    pub tokens: Vec<u32>,
}

/// The sampled Fisher estimate of `model` at each of `positions` of `ctx`:
///
/// ```text
///     F̂_t = (1/S) Σ_{s=1..S} g_{y_s} g_{y_s}ᵀ,    y_s ~ q_t i.i.d.,    g_y = ∇_h log p_y,
/// ```
///
/// with `q_t = p_t` by default, so `E[F̂_t] = F_t` (unbiased) and the relative error falls like
/// `1/√S`. The score gradients come from [`SplitModel::score_gradients`] (one batched backward
/// of `S` VJPs per position for the backends). Draws are reproducible from `opts.seed`.
pub fn sampled_fisher<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    positions: &[usize],
    opts: &SampledOptions,
) -> Result<Vec<SampledFisher>> {
    if opts.samples == 0 {
        return Err(FsError::invalid("samples", 0, "at least 1 draw per position"));
    }
    opts.sampling.validate()?;
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let dims = model.dims();
    let logits = model.logits(ctx, positions)?;
    check_shape("logits", logits.shape(), (positions.len(), dims.vocab_size))?;
    positions
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let q = sampling_distribution(logits.row(i), &opts.sampling)?;
            let tokens = sample_tokens(&q, opts.samples, opts.seed, t as u64)?;
            let scores = model.score_gradients(ctx, t, &tokens)?;
            check_shape("score gradients", scores.shape(), (tokens.len(), dims.d_model))?;
            Ok(SampledFisher { fisher: outer_product_mean(scores.view())?, tokens })
        })
        .collect()
}
