//! The predictive average of the original script: the exact Fisher averaged over sampled next
//! input tokens.

use crate::exact::check_shape;
use crate::{
    exact_fisher, sample_tokens, sampling_distribution, ExactOptions, FsError, Matrix, Result,
    SamplingOptions, SplitContext, SplitModel,
};
use std::collections::BTreeMap;

/// Options of the predictive average.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PredictiveOptions {
    /// Number of sampled next input tokens `N ≥ 1` (the original script's default is 50).
    pub draws: usize,
    /// Seed; position `t` uses stream `t`.
    pub seed: u64,
    /// Distribution of the next input token (the original used temperature and top-p).
    pub sampling: SamplingOptions,
    /// Options of the exact Fisher computed at each draw.
    pub exact: ExactOptions,
}

impl Default for PredictiveOptions {
    fn default() -> Self {
        PredictiveOptions {
            draws: 50,
            seed: 0,
            sampling: SamplingOptions::default(),
            exact: ExactOptions::default(),
        }
    }
}

/// A predictive-average Fisher and its draws.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictiveFisher {
    /// `(1/N) Σ_i F(x_0 … x_t, a_i)` at position `t + 1`.
    pub fisher: Matrix<f64>,
    /// The sampled next input tokens `a_1 … a_N`, in draw order.
    pub tokens: Vec<u32>,
}

/// The predictive average at `position` `t` of `ctx`:
///
/// ```text
///     F̄_t = (1/N) Σ_{i=1..N} F_{t+1}(x_0 … x_t, a_i),    a_i ~ q(·|x_{≤t}) i.i.d.,
/// ```
///
/// where `F_{t+1}(…)` is the exact Fisher at the appended token's own position `t + 1` (its
/// layer-`k` state, with position id `t + 1` — the original script gave it position 0) and `q`
/// is `p(·|x_{≤t})` tempered / truncated by `opts.sampling`. This is the "Fisher–Stein"
/// expectation over the model's own continuations, not the Fisher at `t`. Repeated draws of the
/// same token share one exact computation.
///
/// Errors: `draws = 0`, invalid sampling options, a position outside the sequence, or
/// `t + 2` tokens exceeding the model's maximum length.
pub fn predictive_fisher<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    position: usize,
    opts: &PredictiveOptions,
) -> Result<PredictiveFisher> {
    if opts.draws == 0 {
        return Err(FsError::invalid("draws", 0, "at least 1 sampled next token"));
    }
    opts.sampling.validate()?;
    fs_traits::check_position(position, ctx.seq_len())?;
    let dims = model.dims();
    if let Some(max) = dims.max_seq_len {
        if position + 2 > max {
            return Err(FsError::SequenceTooLong { len: position + 2, max });
        }
    }
    let logits = model.logits(ctx, &[position])?;
    check_shape("logits", logits.shape(), (1, dims.vocab_size))?;
    let q = sampling_distribution(logits.row(0), &opts.sampling)?;
    let tokens = sample_tokens(&q, opts.draws, opts.seed, position as u64)?;

    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    tokens.iter().for_each(|&a| *counts.entry(a).or_default() += 1);
    let d = dims.d_model;
    let mut sum = Matrix::<f64>::zeros(d, d);
    for (&a, &count) in &counts {
        let extended = model.extend(ctx, position + 1, a)?;
        let f = exact_fisher(model, &extended, &[position + 1], &opts.exact)?
            .pop()
            .ok_or_else(|| FsError::Backend("exact_fisher returned no matrix".to_string()))?;
        let w = count as f64;
        sum.as_mut_slice().iter_mut().zip(f.as_slice()).for_each(|(s, x)| *s += w * x);
    }
    let inv = 1.0 / opts.draws as f64;
    sum.as_mut_slice().iter_mut().for_each(|x| *x *= inv);
    Ok(PredictiveFisher { fisher: sum, tokens })
}
