//! `compute --directions K`: per analysed matrix, what its top `K` eigenvectors do
//! (`fs_estimators::direction_effects`: the exact logit change `Jv = W_U A v`, the tokens `±v`
//! push up, `vᵀFv`, and the check `KL(p ‖ p(h + εv)) ≈ ½ ε² vᵀFv`), and the coordinates
//! `hᵀv` of the activation on them (projections). Stored as tensors in the results file and as
//! decoded tables in metadata.json (read by `inspect` and `report`).

use crate::output::OwnedTensor;
use anyhow::{bail, Result};
use fs_estimators::{
    direction_effects, direction_effects_from_jacobian, project, spectrum, DirectionOptions,
    Matrix, Scalar, SplitModel,
};
use serde_json::json;

/// The interpretability flags of `compute`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadoutArgs {
    /// Decode the top K eigenvectors of every matrix: tokens ±v push up, vᵀFv, the KL check
    /// KL(p‖p(h+εv)) vs ½ε²vᵀFv, and the projections hᵀv (stores the top K eigenpairs too).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub directions: usize,
    /// Tokens listed per direction and sign with --directions.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub direction_tokens: usize,
    /// Also accumulate the mean Fisher per layer over every analysed position and sequence
    /// (streamed, f64 compensated sums + counts) into mean.safetensors.
    #[arg(long)]
    pub mean: bool,
    /// Like --mean, but write no per-sequence matrices (only mean.safetensors and metadata.json).
    #[arg(long)]
    pub mean_only: bool,
    /// Process only shard i of N of the documents (document j belongs to shard j mod N), for
    /// array jobs; combine the shards' mean.safetensors with `fisher-stein merge`.
    #[arg(long, value_name = "i/N")]
    pub shard: Option<crate::dataset::ShardSpec>,
}

impl ReadoutArgs {
    /// `--mean` or `--mean-only`.
    pub fn accumulate(&self) -> bool {
        self.mean || self.mean_only
    }

    /// Checks that need no model.
    pub fn validate(&self, estimator: &str) -> Result<()> {
        if self.directions > 0 && estimator == "predictive" {
            bail!("--directions with --estimator predictive: the predictive average is a Fisher at position t+1 over sampled tokens, so its eigenvectors do not act on h_k[t]; use exact, closed-form or sampled");
        }
        if self.directions > 0 && self.direction_tokens == 0 {
            bail!("--direction-tokens 0 lists no tokens: give at least 1");
        }
        Ok(())
    }

    /// The settings recorded in run.json (and checked by --resume).
    pub fn settings_json(&self) -> serde_json::Value {
        json!({
            "directions": self.directions,
            "direction_tokens": self.direction_tokens,
            "mean": self.accumulate(),
            "mean_only": self.mean_only,
            "shard": self.shard.map(|s| s.to_string()),
        })
    }
}

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
}

/// Compute the read-out of the matrix `fisher` of `model` at `position` of `ctx`. `jacobian`:
/// the readout Jacobian `A_t` of this position when the estimator already computed it
/// (`J v = W_U A_t v` then costs no second Jacobian), else `None`.
pub fn readout<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    position: usize,
    fisher: &Matrix<f64>,
    jacobian: Option<&Matrix<M::Scalar>>,
    args: &ReadoutArgs,
) -> Result<Readout> {
    let d = fisher.rows();
    let k = args.directions.min(d);
    let s = spectrum(fisher, Some(k))?;
    let h = model.activation(ctx, position)?;
    let projections = project(&h, &s.eigenvectors)?;
    let opts = DirectionOptions::default();
    let effects = match jacobian {
        Some(a) => {
            direction_effects_from_jacobian(model, ctx, position, a.view(), &s.eigenvectors, &opts)?
        }
        None => direction_effects(model, ctx, position, &s.eigenvectors, &opts)?,
    };
    let n = args.direction_tokens;
    let directions = effects
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let with_dz = |v: Vec<(u32, f64)>| {
                v.into_iter().map(|(y, dp)| (y, dp, e.logit_change[y as usize])).collect()
            };
            DirectionRow {
                eigenvalue: s.eigenvalues[i],
                fisher_quadratic: e.fisher_quadratic,
                epsilon: e.epsilon,
                kl: e.kl,
                kl_quadratic: e.kl_quadratic,
                projection: projections[i],
                up: with_dz(e.pushed_up(n)),
                down: with_dz(e.pushed_down(n)),
            }
        })
        .collect();
    Ok(Readout { activation: h.iter().map(|x| x.as_f64()).collect(), directions })
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
        ("direction_up_tokens", up_t),
        ("direction_up_dp", up_dp),
        ("direction_down_tokens", down_t),
        ("direction_down_dp", down_dp),
    ]
}

/// `n` entries, padded with (-1 as id, 0, 0) when the vocabulary is smaller than `n`.
fn padded(v: &[(u32, f64, f64)], n: usize) -> impl Iterator<Item = (i64, f64)> + '_ {
    (0..n).map(move |i| v.get(i).map_or((-1, 0.0), |t| (t.0 as i64, t.1)))
}

/// The read-out as JSON for metadata.json, tokens decoded with `decode`.
pub fn readout_json(r: &Readout, decode: &dyn Fn(u32) -> String) -> serde_json::Value {
    let toks = |v: &[(u32, f64, f64)]| {
        v.iter()
            .map(|&(y, dp, dz)| json!({"id": y, "token": decode(y), "dp": dp, "dlogit": dz}))
            .collect::<Vec<_>>()
    };
    json!(r
        .directions
        .iter()
        .enumerate()
        .map(|(i, d)| json!({
            "k": i + 1, "eigenvalue": d.eigenvalue, "vFv": d.fisher_quadratic,
            "epsilon": d.epsilon, "kl": d.kl, "kl_quadratic": d.kl_quadratic,
            "kl_ratio": d.kl / d.kl_quadratic, "projection": d.projection,
            "up": toks(&d.up), "down": toks(&d.down),
        }))
        .collect::<Vec<_>>())
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
/// writes (entropy, trace, top eigenvalues, effective rank, participation ratio).
pub fn layer_summary(summaries: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let mut layers: Vec<u64> = summaries.iter().filter_map(|s| s["layer"].as_u64()).collect();
    layers.sort_unstable();
    layers.dedup();
    layers
        .into_iter()
        .map(|layer| {
            let rows: Vec<&serde_json::Value> =
                summaries.iter().filter(|s| s["layer"].as_u64() == Some(layer)).collect();
            let n = rows.len() as f64;
            let mean = |key: &str| rows.iter().filter_map(|r| r[key].as_f64()).sum::<f64>() / n;
            let top_len = rows
                .iter()
                .filter_map(|r| r["top_eigenvalues"].as_array().map(|a| a.len()))
                .min()
                .unwrap_or(0);
            let top: Vec<f64> = (0..top_len)
                .map(|i| {
                    rows.iter().filter_map(|r| r["top_eigenvalues"][i].as_f64()).sum::<f64>() / n
                })
                .collect();
            json!({
                "layer": layer, "positions": rows.len(), "mean_entropy": mean("entropy"),
                "mean_trace": mean("trace"), "mean_top_eigenvalues": top,
                "mean_effective_rank": mean("effective_rank"),
                "mean_participation_ratio": mean("participation_ratio"),
            })
        })
        .collect()
}

/// Print the layer sweep as a table.
pub fn print_layer_summary(rows: &[serde_json::Value]) {
    println!("layer  positions  mean entropy  mean trace  mean top eigenvalues                 eff. rank  part. ratio");
    for r in rows {
        let top = r["mean_top_eigenvalues"]
            .as_array()
            .map(|a| {
                a.iter()
                    .take(3)
                    .filter_map(|x| x.as_f64())
                    .map(|x| format!("{x:.3e}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        println!(
            "{:>5}  {:>9}  {:>12.4}  {:>10.4e}  [{top:<33}]  {:>9.2}  {:>11.2}",
            r["layer"].as_u64().unwrap_or(0),
            r["positions"].as_u64().unwrap_or(0),
            r["mean_entropy"].as_f64().unwrap_or(f64::NAN),
            r["mean_trace"].as_f64().unwrap_or(f64::NAN),
            r["mean_effective_rank"].as_f64().unwrap_or(f64::NAN),
            r["mean_participation_ratio"].as_f64().unwrap_or(f64::NAN),
        );
    }
}
