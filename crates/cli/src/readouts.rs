//! `compute --directions K`: per analysed matrix, what its top `K` eigenvectors do
//! (`fs_estimators::direction_effects`: the exact logit change `Jv = W_U A v`, the tokens `±v`
//! push up, `vᵀFv`, and the check `KL(p ‖ p(h + εv)) ≈ ½ ε² vᵀFv`), and the coordinates
//! `hᵀv` of the activation on them (projections). Stored as tensors in the results file and as
//! decoded tables in metadata.json (read by `inspect` and `report`).

use crate::output::OwnedTensor;
use crate::results::{
    finite, top_three, DirectionSummary, LayerSummaryRow, PositionSummary, TokenEffect,
};
use anyhow::Result;
use fs_estimators::{
    attention_direction_effects, direction_effects, direction_effects_from_jacobian, project,
    AttentionDistribution, AttentionHead, DirectionEffect, DirectionOptions, Matrix, Scalar,
    SplitModel,
};

/// One direction's read-out, ready to store.
#[derive(Clone, Debug)]
pub struct DirectionRow {
    /// Eigenvalue λ of F for this eigenvector.
    pub eigenvalue: f64,
    /// `vᵀFv` from the exact `Jv` (equals λ for the exact estimator).
    pub fisher_quadratic: f64,
    /// The KL step ε.
    pub epsilon: f64,
    /// `KL(p ‖ p(h + εv))`, measured.
    pub kl: f64,
    /// `½ ε² vᵀFv`.
    pub kl_quadratic: f64,
    /// `hᵀv`.
    pub projection: f64,
    /// Tokens `+v` pushes up: (id, ∂p/∂ε, (Jv)_y).
    pub up: Vec<(u32, f64, f64)>,
    /// Tokens `−v` pushes up: (id, ∂p/∂ε, (Jv)_y).
    pub down: Vec<(u32, f64, f64)>,
}

/// The read-out of one matrix: its activation and its top directions.
#[derive(Clone, Debug)]
pub struct Readout {
    /// `h_k[t]` (length d).
    pub activation: Vec<f64>,
    /// One row per direction, top eigenvalue first.
    pub directions: Vec<DirectionRow>,
    /// Whether the outcomes are attention keys (`--distribution attention:L.J`): the ids in
    /// `up`/`down` are then key positions, `∂p/∂ε` the attention weight's change and the logit
    /// change the score's.
    pub keys: bool,
}

/// Compute the read-out at `position` of `ctx` of the eigenpairs `(λ, V)` (eigenvalues
/// descending, eigenvectors as the columns of `V`, `d × K`) of its Fisher matrix, with `tokens`
/// tokens per direction and sign. `jacobian`: the readout Jacobian `A_t` of this position when
/// the estimator already computed it (`J v = W_U A_t v` then costs no second Jacobian), else
/// `None` (`J v` from one batched JVP).
pub fn readout<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    position: usize,
    (eigenvalues, eigenvectors): (&[f64], &Matrix<f64>),
    jacobian: Option<&Matrix<M::Scalar>>,
    tokens: usize,
) -> Result<Readout> {
    let h = model.activation(ctx, position)?;
    let projections = project(&h, eigenvectors)?;
    let opts = DirectionOptions::default();
    let effects = match jacobian {
        Some(a) => {
            direction_effects_from_jacobian(model, ctx, position, a.view(), eigenvectors, &opts)?
        }
        None => direction_effects(model, ctx, position, eigenvectors, &opts)?,
    };
    let directions = rows(&effects, eigenvalues, &projections, tokens, |y| y);
    Ok(Readout { activation: h.iter().map(|x| x.as_f64()).collect(), directions, keys: false })
}

/// [`readout`] for an attention distribution (`--distribution attention:L.J`): what the top
/// eigenvectors do to the head's attention at the query of `distribution`
/// ([`attention_direction_effects`]: the keys `±v` move attention toward, with the weight change
/// `∂a_i/∂ε` and the score change `(Jv)_i`, `vᵀFv`, and the KL check between the head's
/// attention at `h` and at `h + εv`), `keys` keys per direction and sign.
pub fn attention_readout<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    head: AttentionHead,
    distribution: &AttentionDistribution,
    (eigenvalues, eigenvectors): (&[f64], &Matrix<f64>),
    keys: usize,
) -> Result<Readout> {
    let h = model.activation(ctx, distribution.position)?;
    let projections = project(&h, eigenvectors)?;
    let opts = DirectionOptions::default();
    let effects = attention_direction_effects(model, ctx, head, distribution, eigenvectors, &opts)?;
    // The effects index the visible keys; record key positions.
    let directions =
        rows(&effects, eigenvalues, &projections, keys, |i| distribution.keys[i as usize] as u32);
    Ok(Readout { activation: h.iter().map(|x| x.as_f64()).collect(), directions, keys: true })
}

/// One [`DirectionRow`] per effect: the `n` outcomes each sign raises most, named by `id`.
fn rows(
    effects: &[DirectionEffect],
    eigenvalues: &[f64],
    projections: &[f64],
    n: usize,
    id: impl Fn(u32) -> u32,
) -> Vec<DirectionRow> {
    effects
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let with_dz = |v: Vec<(u32, f64)>| {
                v.into_iter().map(|(y, dp)| (id(y), dp, e.logit_change[y as usize])).collect()
            };
            DirectionRow {
                eigenvalue: eigenvalues[i],
                fisher_quadratic: e.fisher_quadratic,
                epsilon: e.epsilon,
                kl: e.kl,
                kl_quadratic: e.kl_quadratic,
                projection: projections[i],
                up: with_dz(e.pushed_up(n)),
                down: with_dz(e.pushed_down(n)),
            }
        })
        .collect()
}

/// The tensors of `--directions K` for one results file (`N` matrices, all with a read-out).
pub fn readout_tensors(
    readouts: &[&Readout],
    k: usize,
    n_tokens: usize,
) -> Vec<(&'static str, OwnedTensor)> {
    let n = readouts.len();
    let d = readouts.first().map_or(0, |r| r.activation.len());
    let rows = || readouts.iter().flat_map(|r| r.directions.iter());
    let per_dir = |f: fn(&DirectionRow) -> f64| OwnedTensor::f64(vec![n, k], rows().map(f));
    let tokens = |f: fn(&DirectionRow) -> &Vec<(u32, f64, f64)>| {
        (
            OwnedTensor::i64(
                vec![n, k, n_tokens],
                rows().flat_map(move |r| padded(f(r), n_tokens).map(|t| t.0)),
            ),
            OwnedTensor::f64(
                vec![n, k, n_tokens],
                rows().flat_map(move |r| padded(f(r), n_tokens).map(|t| t.1)),
            ),
        )
    };
    let (up_t, up_dp) = tokens(|r| &r.up);
    let (down_t, down_dp) = tokens(|r| &r.down);
    // Attention read-outs name key positions and attention-weight changes.
    let keys = readouts.first().is_some_and(|r| r.keys);
    let name =
        |tokens: &'static str, keys_name: &'static str| if keys { keys_name } else { tokens };
    vec![
        (
            "activations",
            OwnedTensor::f32(
                vec![n, d],
                readouts.iter().flat_map(|r| r.activation.iter().map(|&x| x as f32)),
            ),
        ),
        ("projections", per_dir(|r| r.projection)),
        ("direction_eigenvalues", per_dir(|r| r.eigenvalue)),
        ("direction_fisher_quadratic", per_dir(|r| r.fisher_quadratic)),
        ("direction_epsilon", per_dir(|r| r.epsilon)),
        ("direction_kl", per_dir(|r| r.kl)),
        ("direction_kl_quadratic", per_dir(|r| r.kl_quadratic)),
        (name("direction_up_tokens", "direction_up_keys"), up_t),
        (name("direction_up_dp", "direction_up_da"), up_dp),
        (name("direction_down_tokens", "direction_down_keys"), down_t),
        (name("direction_down_dp", "direction_down_da"), down_dp),
    ]
}

/// `n` entries, padded with (-1 as id, 0, 0) when the vocabulary is smaller than `n`.
fn padded(v: &[(u32, f64, f64)], n: usize) -> impl Iterator<Item = (i64, f64)> + '_ {
    (0..n).map(move |i| v.get(i).map_or((-1, 0.0), |t| (t.0 as i64, t.1)))
}

/// The read-out as metadata.json records it, tokens decoded with `decode`. For an attention
/// read-out the outcomes are key positions of `sequence` (its token ids): each is recorded with
/// the token at that key.
pub fn readout_summary(
    r: &Readout,
    decode: &dyn Fn(u32) -> String,
    sequence: &[u32],
) -> Vec<DirectionSummary> {
    let toks = |v: &[(u32, f64, f64)]| {
        v.iter()
            .map(|&(y, dp, dz)| {
                let (id, key) = match r.keys {
                    true => {
                        (sequence.get(y as usize).copied().unwrap_or(u32::MAX), Some(y as usize))
                    }
                    false => (y, None),
                };
                let token = match key {
                    Some(k) => format!("@{k} {}", decode(id)),
                    None => decode(id),
                };
                TokenEffect { id, token, key, dp, dlogit: dz }
            })
            .collect::<Vec<_>>()
    };
    r.directions
        .iter()
        .enumerate()
        .map(|(i, d)| DirectionSummary {
            k: i + 1,
            eigenvalue: d.eigenvalue,
            fisher_quadratic: d.fisher_quadratic,
            epsilon: d.epsilon,
            kl: d.kl,
            kl_quadratic: d.kl_quadratic,
            kl_ratio: d.kl / d.kl_quadratic,
            projection: d.projection,
            up: toks(&d.up),
            down: toks(&d.down),
        })
        .collect()
}

/// A token's text for tables: the tokenizer's decoding, quoted (`"␣Paris"`), or `#id`.
pub fn token_text(tokenizer: Option<&fs_checkpoint::tokenizers::Tokenizer>, id: u32) -> String {
    match tokenizer {
        Some(t) => {
            t.decode(&[id], false).map(|s| format!("{s:?}")).unwrap_or_else(|_| format!("#{id}"))
        }
        None => format!("#{id}"),
    }
}

/// The layer sweep: per layer, means over the analysed positions of the summaries `compute`
/// writes (entropy, trace, top eigenvalues, effective rank, participation ratio). A value
/// metadata.json cannot hold (NaN, infinity: written as `null`) is left out of the sums.
pub fn layer_summary(summaries: &[PositionSummary]) -> Vec<LayerSummaryRow> {
    let mut layers: Vec<usize> = summaries.iter().map(|s| s.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    layers
        .into_iter()
        .map(|layer| {
            let rows: Vec<&PositionSummary> =
                summaries.iter().filter(|s| s.layer == layer).collect();
            let n = rows.len() as f64;
            // The mean of the finite values; NaN (null in metadata.json) when there are none,
            // e.g. the effective rank of top-k runs, which never see the whole spectrum.
            let mean = |f: fn(&PositionSummary) -> f64| {
                let values: Vec<f64> = rows.iter().filter_map(|r| finite(f(r))).collect();
                if values.is_empty() {
                    f64::NAN
                } else {
                    values.iter().sum::<f64>() / values.len() as f64
                }
            };
            let top_len = rows.iter().map(|r| r.top_eigenvalues.len()).min().unwrap_or(0);
            let top: Vec<f64> = (0..top_len)
                .map(|i| rows.iter().filter_map(|r| finite(r.top_eigenvalues[i])).sum::<f64>() / n)
                .collect();
            LayerSummaryRow {
                layer,
                positions: rows.len(),
                mean_entropy: mean(|r| r.entropy),
                mean_trace: mean(|r| r.trace),
                mean_top_eigenvalues: top,
                mean_effective_rank: mean(|r| r.effective_rank),
                mean_participation_ratio: mean(|r| r.participation_ratio),
            }
        })
        .collect()
}

/// Print the layer sweep as a table (numbers as metadata.json holds them: a non-finite value as
/// NaN, and left out of the eigenvalue list).
pub fn print_layer_summary(rows: &[LayerSummaryRow]) {
    println!("layer  positions  mean entropy  mean trace  mean top eigenvalues                 eff. rank  part. ratio");
    let num = |x: f64| finite(x).unwrap_or(f64::NAN);
    for r in rows {
        let top = top_three(&r.mean_top_eigenvalues);
        println!(
            "{:>5}  {:>9}  {:>12.4}  {:>10.4e}  [{top:<33}]  {:>9.2}  {:>11.2}",
            r.layer,
            r.positions,
            num(r.mean_entropy),
            num(r.mean_trace),
            num(r.mean_effective_rank),
            num(r.mean_participation_ratio),
        );
    }
}
