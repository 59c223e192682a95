//! One sequence's matrices: one lower pass for every layer, then per layer the estimator
//! (`fs-estimators`) over batches of positions, each matrix with its entropy and, with
//! `--directions`, its read-out. A batch that meets a NaN or infinity is retried position by
//! position, so that a bad position fails alone.

use super::args::{ComputeArgs, Estimator, TraceArg};
use super::failures::{is_numerical, is_numerical_fs};
use crate::readouts::Readout;
use crate::results::ComputeSplit;
use anyhow::Result;
use fs_estimators::{
    closed_form_fisher_at, entropy, exact_attention_fisher, exact_fisher,
    exact_fisher_with_jacobians, predictive_fisher, sampled_attention_fisher, sampled_fisher,
    softmax, spectrum, top_k_fisher, AttentionDistribution, EigensolverOptions, ExactOptions,
    FsError, GradientKind, Matrix, PredictiveOptions, SampledOptions, Spectrum, SplitModel,
    TopKFisher, TopKOptions, TraceMode,
};
use std::time::Instant;

/// What the estimator produced at one position.
pub(super) enum Estimated {
    /// The whole `d × d` matrix (exact, closed form, sampled, predictive).
    Matrix(Matrix<f64>),
    /// Its top `K` eigenpairs, matrix-free (`--estimator top-k`).
    TopK(TopKFisher),
}

impl Estimated {
    /// Its spectrum, as [`Entry::spectrum`] holds it (`rank` pairs of a matrix).
    fn spectrum(&self, rank: usize) -> Result<Spectrum> {
        Ok(match self {
            Estimated::Matrix(f) => spectrum(f, Some(rank.max(5).min(f.rows())))?,
            Estimated::TopK(r) => Spectrum {
                eigenvalues: r.eigenvalues.clone(),
                eigenvectors: r.eigenvectors.clone(),
                trace: r.trace.value,
                effective_rank: f64::NAN,
                participation_ratio: f64::NAN,
                clamped_negative: 0,
                min_raw_eigenvalue: f64::NAN,
            },
        })
    }

    /// The whole matrix, where the estimator formed one.
    pub fn matrix(&self) -> Option<&Matrix<f64>> {
        match self {
            Estimated::Matrix(f) => Some(f),
            Estimated::TopK(_) => None,
        }
    }

    /// Every number it holds, for the non-finite check.
    fn values(&self) -> &[f64] {
        match self {
            Estimated::Matrix(f) => f.as_slice(),
            Estimated::TopK(t) => t.eigenvectors.as_slice(),
        }
    }
}

/// One computed position.
pub(super) struct Entry {
    pub layer: usize,
    pub position: usize,
    pub estimate: Estimated,
    /// Its leading eigenpairs (at least 5, at least the stored and decoded ones), the trace and
    /// the summaries: one eigendecomposition per matrix, shared by the read-outs, the summary
    /// line and the stored eigenpairs. For top-k: the computed pairs and trace, no effective
    /// rank or participation ratio (NaN: they need the whole spectrum).
    pub spectrum: Spectrum,
    /// The entropy of the distribution (next-token, or the attention weights), nats.
    pub entropy: f64,
    /// The sampled tokens (sampled and predictive estimators; key positions for attention).
    pub draws: Option<Vec<u32>>,
    /// With `--directions`: what its top eigenvectors do.
    pub readout: Option<Readout>,
    /// With `--sae`: the SAE's active features through F.
    pub sae: Option<crate::results::SaeSummary>,
    /// With `--distribution attention:L.J`: the head's weights `(key position, a)` over the
    /// keys the query sees.
    pub attention: Option<Vec<(usize, f64)>>,
}

/// One position's estimate.
struct Estimate<S> {
    /// The Fisher matrix or its top eigenpairs.
    estimated: Estimated,
    /// The sampled tokens (sampled and predictive estimators; key positions for an attention
    /// distribution).
    draws: Option<Vec<u32>>,
    /// For the exact estimator with `--directions`: the readout Jacobian `A_t` it was built from
    /// (reused by the read-outs instead of computed twice).
    jacobian: Option<Matrix<S>>,
    /// For `--distribution attention:L.J`: the head's weights and score Jacobian.
    attention: Option<AttentionDistribution>,
}

impl<S> Estimate<S> {
    fn new(estimated: Estimated, draws: Option<Vec<u32>>, jacobian: Option<Matrix<S>>) -> Self {
        Estimate { estimated, draws, jacobian, attention: None }
    }
}

/// `--estimator top-k`'s options.
fn top_k_options(args: &ComputeArgs) -> TopKOptions {
    TopKOptions {
        solver: EigensolverOptions {
            k: args.top_k,
            tolerance: args.tolerance,
            seed: args.seed,
            ..EigensolverOptions::default()
        },
        trace: match args.trace {
            TraceArg::Estimate => TraceMode::Estimate { probes: args.trace_probes },
            TraceArg::Exact => TraceMode::Exact,
        },
        ..TopKOptions::default()
    }
}

/// Run `--estimator` at `positions` of `ctx`.
fn estimate<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    positions: &[usize],
    args: &ComputeArgs,
) -> Result<Vec<Estimate<M::Scalar>>> {
    let opts = ExactOptions::default();
    if let Some(head) = args.distribution.head() {
        let found = match args.estimator {
            Estimator::Exact => exact_attention_fisher(model, ctx, positions, head)?,
            Estimator::Sampled => {
                sampled_attention_fisher(model, ctx, positions, head, args.samples(), args.seed)?
            }
            other => anyhow::bail!(
                "--estimator {} does not apply to attention distributions",
                other.name()
            ),
        };
        return Ok(found
            .into_iter()
            .map(|f| Estimate {
                estimated: Estimated::Matrix(f.fisher),
                draws: f.draws.map(|d| d.into_iter().map(|k| k as u32).collect()),
                jacobian: None,
                attention: Some(f.distribution),
            })
            .collect());
    }
    Ok(match args.estimator {
        Estimator::Exact if args.readouts.directions > 0 => {
            exact_fisher_with_jacobians(model, ctx, positions, &opts)?
                .into_iter()
                .map(|e| Estimate::new(Estimated::Matrix(e.fisher), None, Some(e.jacobian)))
                .collect()
        }
        Estimator::Exact => exact_fisher(model, ctx, positions, &opts)?
            .into_iter()
            .map(|f| Estimate::new(Estimated::Matrix(f), None, None))
            .collect(),
        Estimator::ClosedForm => {
            closed_form_fisher_at(model, ctx, positions, GradientKind::Logits, &opts)?
                .into_iter()
                .map(|f| Estimate::new(Estimated::Matrix(f), None, None))
                .collect()
        }
        Estimator::Sampled => {
            let o = SampledOptions {
                samples: args.samples(),
                seed: args.seed,
                sampling: args.sampling(),
            };
            sampled_fisher(model, ctx, positions, &o)?
                .into_iter()
                .map(|s| Estimate::new(Estimated::Matrix(s.fisher), Some(s.tokens), None))
                .collect()
        }
        Estimator::Predictive => {
            let o = PredictiveOptions {
                draws: args.samples(),
                seed: args.seed,
                sampling: args.sampling(),
                exact: opts,
            };
            positions
                .iter()
                .map(|&t| {
                    predictive_fisher(model, ctx, t, &o)
                        .map(|p| Estimate::new(Estimated::Matrix(p.fisher), Some(p.tokens), None))
                })
                .collect::<Result<_, FsError>>()?
        }
        Estimator::TopK => {
            let o = top_k_options(args);
            positions
                .iter()
                .map(|&t| {
                    top_k_fisher(model, ctx, t, &o)
                        .map(|r| Estimate::new(Estimated::TopK(r), None, None))
                })
                .collect::<Result<_, FsError>>()?
        }
    })
}

/// Compute the matrices of `tokens` at every position of `positions` and every layer of
/// `layers`, in layer order: each one goes to `found`; a position that meets a NaN or infinity
/// goes to `fail(layer, position, error)` instead (which stops the run with `--fail-fast`).
/// Any other error stops the run. `bar` counts the positions done.
#[allow(clippy::too_many_arguments)]
pub(super) fn sequence_entries<M: SplitModel>(
    model: &M,
    tokens: &[u32],
    layers: &[usize],
    positions: &[usize],
    args: &ComputeArgs,
    bar: &indicatif::ProgressBar,
    rank: usize,
    sae: Option<&crate::sae::Sae>,
    split: &mut ComputeSplit,
    fail: &mut dyn FnMut(usize, usize, anyhow::Error) -> Result<()>,
    found: &mut dyn FnMut(Entry) -> Result<()>,
) -> Result<()> {
    let clock = Instant::now();
    let contexts = match model.lower_layers(tokens, layers) {
        Ok(c) => c,
        Err(e) if is_numerical_fs(&e) => {
            // The forward pass itself broke down: every requested position of this
            // sequence fails.
            let e = anyhow::Error::from(e);
            for &layer in layers {
                for &t in positions {
                    fail(layer, t, anyhow::anyhow!("{e:#}"))?;
                }
            }
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    split.lower += clock.elapsed().as_secs_f64();
    for (ctx, &layer) in contexts.iter().zip(layers) {
        let clock = Instant::now();
        // Logits of every position at once (for the next-token entropies; an attention
        // distribution has its own); position by position when one is not finite.
        let next_token = args.distribution.head().is_none();
        let logits = match next_token.then(|| model.logits(ctx, positions)) {
            None => None,
            Some(Ok(l))
                if l.as_slice().iter().all(|&x| fs_traits::Scalar::as_f64(x).is_finite()) =>
            {
                Some(l)
            }
            Some(Ok(_)) => None,
            Some(Err(e)) if is_numerical_fs(&e) => None,
            Some(Err(e)) => return Err(e.into()),
        };
        let chunk = args.batch_size.unwrap_or(1).max(1);
        split.estimator += clock.elapsed().as_secs_f64();
        for (c, batch) in positions.chunks(chunk).enumerate() {
            crate::signals::check_interrupt()?;
            let clock = Instant::now();
            // A batch that meets a non-finite value is retried position by position, so
            // that one bad position does not fail its neighbours.
            let results: Vec<Result<Estimate<M::Scalar>>> = match estimate(model, ctx, batch, args)
            {
                Ok(v) => v.into_iter().map(Ok).collect(),
                Err(e) if is_numerical(&e) && batch.len() > 1 => batch
                    .iter()
                    .map(|&t| estimate(model, ctx, &[t], args).map(|mut v| v.remove(0)))
                    .collect(),
                Err(e) if is_numerical(&e) => vec![Err(e)],
                Err(e) => return Err(e),
            };
            split.estimator += clock.elapsed().as_secs_f64();
            for (j, (result, &t)) in results.into_iter().zip(batch).enumerate() {
                let entry = (|| -> Result<Entry> {
                    let Estimate { estimated: estimate, draws, jacobian, attention } = result?;
                    let values = estimate.values();
                    if let Some(bad) = values.iter().position(|x| !x.is_finite()) {
                        return Err(FsError::NonFinite {
                            what: "the Fisher matrix".into(),
                            index: bad,
                            value: values[bad],
                        }
                        .into());
                    }
                    let entropy = match (&attention, &logits) {
                        (Some(a), _) => a.entropy(),
                        (None, Some(l)) => entropy(&softmax(l.row(c * chunk + j))?),
                        (None, None) => entropy(&softmax(model.logits(ctx, &[t])?.row(0))?),
                    };
                    let spectrum = estimate.spectrum(rank)?;
                    let clock = Instant::now();
                    let readout = (args.readouts.directions > 0)
                        .then(|| {
                            let k = args.readouts.directions.min(spectrum.eigenvalues.len());
                            let d = spectrum.eigenvectors.rows();
                            let v = Matrix::from_fn(d, k, |i, c| spectrum.eigenvectors.get(i, c));
                            let pairs = (&spectrum.eigenvalues[..k], &v);
                            let n = args.readouts.direction_tokens;
                            match (&attention, args.distribution.head()) {
                                (Some(a), Some(head)) => crate::readouts::attention_readout(
                                    model, ctx, head, a, pairs, n,
                                ),
                                _ => crate::readouts::readout(
                                    model,
                                    ctx,
                                    t,
                                    pairs,
                                    jacobian.as_ref(),
                                    n,
                                ),
                            }
                        })
                        .transpose()?;
                    let sae = match (sae, estimate.matrix()) {
                        (Some(sae), Some(f)) => {
                            let k = args.readouts.directions.max(3);
                            Some(crate::sae::analyse(model, ctx, t, f, &spectrum, k, sae)?)
                        }
                        _ => None,
                    };
                    split.readouts += clock.elapsed().as_secs_f64();
                    Ok(Entry {
                        layer,
                        position: t,
                        estimate,
                        spectrum,
                        entropy,
                        draws,
                        readout,
                        sae,
                        attention: attention.map(|a| {
                            a.keys.iter().copied().zip(a.weights.iter().copied()).collect()
                        }),
                    })
                })();
                match entry {
                    Ok(e) => found(e)?,
                    Err(e) if is_numerical(&e) => fail(layer, t, e)?,
                    Err(e) => return Err(e),
                }
            }
            bar.inc(batch.len() as u64);
        }
    }
    Ok(())
}
