//! # fs-estimators — Fisher information of a next-token distribution w.r.t. an activation
//!
//! For a model split at layer `k` ([`fs_traits::SplitModel`]), position `t`, activation
//! `h = H_k[t]`, next-token distribution `p = softmax(z(h))` and logit Jacobian `J = ∂z/∂h`:
//!
//! ```text
//!     F = E_{y~p}[g_y g_yᵀ],   g_y = ∇_h log p_y = Jᵀ(e_y − p),
//!     F = Jᵀ(diag p − p pᵀ)J                                   (symmetric, PSD, rank ≤ min(d, V−1))
//! ```
//!
//! Estimators (all return `d × d` matrices accumulated in `f64`):
//!
//! | function | formula | cost per position |
//! |---|---|---|
//! | [`exact_fisher`] | `Aᵀ G A`, `G = Σ_y p_y (w_y − m)(w_y − m)ᵀ`, `m = W_Uᵀp` | `d_u` VJPs + one `V × d_u` weighted Gram |
//! | [`sampled_fisher`] | `(1/S) Σ_s g_{y_s} g_{y_s}ᵀ`, `y_s ~ p` | `S` VJPs |
//! | [`closed_form_fisher`] | `∇ᵀ diag(p) ∇ − (∇ᵀp)(∇ᵀp)ᵀ` on host arrays | one `V × d` weighted Gram |
//! | [`predictive_fisher`] | `mean_i F(x_{≤t}, a_i)` at position `t+1`, `a_i ~ p(·|x_{≤t})` | `N` exact Fishers |
//! | [`top_k_fisher`] | top `K` eigenpairs of `F v = Aᵀ G (A v)`, never formed ([`top_eigenpairs`]) | a few `K`-blocks of JVPs + VJPs, `4·V·d_u` per vector |
//!
//! The same estimators for any other softmax of the model: the attention of one head
//! ([`exact_attention_fisher`], [`sampled_attention_fisher`], read-outs
//! [`attention_direction_effects`]; `F = Jᵀ(diag a − a aᵀ)J` with `J = ∂scores/∂h`), and
//! [`spectrum`] for the eigen-analysis (eigenvalues descending, eigenvectors, trace,
//! effective rank, participation ratio).
//!
//! Interpretability read-outs: [`direction_effects`] (what a direction `v` does: the exact logit
//! change `Jv = W_U A v`, the probability change, `vᵀFv`, and the check
//! `KL(p ‖ p(h + εv)) ≈ ½ ε² vᵀFv`), [`project`] (coordinates `hᵀv`), and
//! [`FisherAccumulator`] (dataset means, streamed, with exact-to-round-off merges of shards).
//!
//! ## Precision
//! Probabilities are computed from the logits in `f64` ([`softmax`]) and renormalised there.
//! The big products (the `V × d_u` weighted Gram, the `V × d` closed form) run in the model's
//! scalar type `S` in vocabulary chunks, and every chunk's `d × d` result is added into an
//! `f64` accumulator. The exact estimator uses the *centered* form of `G`: every term is PSD,
//! so nothing cancels when `p` is peaked — the two-term form `W_Uᵀ diag(p) W_U − m mᵀ` loses all
//! its digits as `max p → 1` (see the `peaked` tests).
//!
//! No tensor framework is in this crate's dependency tree: link it into your own model by
//! implementing [`SplitModel`] (everything an implementer needs is re-exported here; see
//! `examples/custom_model.rs`), check the implementation with `testing::check_split_model`
//! (feature `testing`), or call [`closed_form_fisher`] / [`exact_fisher_from_parts`] on plain
//! arrays. Every function is generic over [`Scalar`] (`f32` or `f64`) alone.

#![warn(missing_docs)]

mod accumulate;
pub mod analytic;
mod attention;
mod closed_form;
mod eigensolver;
mod exact;
mod gram;
mod predictive;
mod probs;
mod readouts;
mod sampled;
mod spectrum;
pub mod steering;
#[cfg(feature = "testing")]
pub mod testing;
mod topk;

pub use accumulate::{CompensatedSum, FisherAccumulator};
pub use attention::{
    attention_direction_effects, attention_distribution, exact_attention_fisher,
    sampled_attention_fisher, AttentionDistribution, AttentionFisher,
};
pub use closed_form::{closed_form_fisher, closed_form_fisher_at, GradientKind};
pub use exact::{
    exact_fisher, exact_fisher_from_parts, exact_fisher_with_jacobians, ExactOptions,
    FisherWithJacobian,
};
// What an implementer of `SplitModel` needs, so that one dependency is enough.
pub use eigensolver::{top_eigenpairs, top_eigenpairs_from, Eigenpairs, EigensolverOptions};
pub use fs_traits::{
    check_attention_head, check_finite, check_layer, check_len, check_position, check_tokens,
    check_tokens_in_vocab, AttentionHead, FsError, Matrix, MatrixRef, ModelDims, OutputGram,
    Result, Scalar, SplitContext, SplitModel, TypedSlice, TypedSliceMut, Unembedding,
    UnembeddingRows,
};
pub use gram::{
    centered_output_gram, centered_output_gram_with_slopes, outer_product_mean, relative_frobenius,
    sandwich,
};
pub use predictive::{predictive_fisher, PredictiveFisher, PredictiveOptions};
pub use probs::{
    entropy, normalized_probabilities, sample_tokens, sampling_distribution, softmax,
    SamplingOptions, PROBABILITY_SUM_TOLERANCE,
};
pub use readouts::{
    direction_effects, direction_effects_from_jacobian, fisher_quadratic_form, kl_from_logits,
    logit_change_from_parts, project, DirectionEffect, DirectionOptions,
};
pub use sampled::{sampled_fisher, SampledFisher, SampledOptions};
pub use spectrum::{spectrum, Spectrum};
pub use topk::{
    top_k_fisher, FisherOperator, OperatorSeconds, TopKFisher, TopKOptions, TopKStart,
    TraceEstimate, TraceMode,
};

/// How many threads the dense products may use: `0` = all of rayon's global pool, `1` =
/// sequential, `n` = at most `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Threads(pub usize);

impl Threads {
    pub(crate) fn par(self) -> faer::Par {
        match self.0 {
            1 => faer::Par::Seq,
            n => faer::Par::rayon(n),
        }
    }
}
