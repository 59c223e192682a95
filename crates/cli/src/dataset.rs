//! Dataset averages: `compute --mean` streams every analysed matrix into one
//! `fs_estimators::FisherAccumulator` per layer (compensated f64 sums + counts; no per-position
//! matrix is kept), `--shard i/N` splits the documents between independent jobs, and
//! `fisher-stein merge` adds the jobs' accumulators into the result one job would have produced.
//!
//! `mean.safetensors` holds, for `L` layers: `layers` i64 `[L]`, `count` i64 `[L]`,
//! `fisher_sum` f64 `[L, d, d]` (the compensated sum's leading part), `fisher_sum_lo` f64
//! `[L, d, d]` (its accumulated rounding errors: the sum is `fisher_sum + fisher_sum_lo`),
//! `fisher_mean` f64 `[L, d, d]` (the mean, for readers), `entropy_sum` f64 `[L, 2]`
//! (hi, lo) and `sequences` i64 `[S]` (the document indices included); its header metadata
//! records the settings a merge must agree on (`settings`: model weights' sha256, d, layers,
//! estimator, position selection) and the shard.

use crate::output::{write_atomic, OwnedTensor};
use anyhow::{anyhow, bail, Context, Result};
use fs_estimators::{spectrum, CompensatedSum, FisherAccumulator};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// The accumulator file of a results directory.
pub const MEAN_FILE: &str = "mean.safetensors";

/// `--shard i/N`: this job processes the documents `j` with `j mod N = i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardSpec {
    /// `i`, in `0..N`.
    pub index: usize,
    /// `N ≥ 1`.
    pub count: usize,
}

impl std::str::FromStr for ShardSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("invalid shard {s:?}: use i/N with 0 ≤ i < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(ShardSpec { index, count })
    }
}

impl std::fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl ShardSpec {
    /// Whether document `j` belongs to this shard.
    pub fn contains(&self, j: usize) -> bool {
        j % self.count == self.index
    }
}

/// The per-layer accumulators of one run (or of a merge).
pub struct MeanState {
    /// `(layer, accumulator)`, in layer order.
    pub layers: Vec<(usize, FisherAccumulator)>,
    /// Document indices included.
    pub sequences: Vec<usize>,
    /// What a merge must agree on (JSON).
    pub settings: serde_json::Value,
    /// `i/N`, `merged` or `all`.
    pub shard: String,
}

impl MeanState {
    /// Empty accumulators for `layers`, `d × d`.
    pub fn new(layers: &[usize], d: usize, settings: serde_json::Value, shard: String) -> Self {
        MeanState {
            layers: layers.iter().map(|&l| (l, FisherAccumulator::new(d))).collect(),
            sequences: Vec::new(),
            settings,
            shard,
        }
    }

    /// The accumulator of `layer`.
    pub fn layer_mut(&mut self, layer: usize) -> Result<&mut FisherAccumulator> {
        self.layers
            .iter_mut()
            .find(|(l, _)| *l == layer)
            .map(|(_, a)| a)
            .ok_or_else(|| anyhow!("no accumulator for layer {layer}"))
    }

    /// `d`.
    pub fn dim(&self) -> usize {
        self.layers.first().map_or(0, |(_, a)| a.dim())
    }

    /// Write `DIR/mean.safetensors` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let d = self.dim();
        let l = self.layers.len();
        let accs = || self.layers.iter().map(|(_, a)| a);
        let zeros = vec![0.0; d * d];
        let tensors = [
            ("layers", OwnedTensor::i64(vec![l], self.layers.iter().map(|(k, _)| *k as i64))),
            ("count", OwnedTensor::i64(vec![l], accs().map(|a| a.count() as i64))),
            (
                "fisher_sum",
                OwnedTensor::f64(vec![l, d, d], accs().flat_map(|a| a.parts().0.to_vec())),
            ),
            (
                "fisher_sum_lo",
                OwnedTensor::f64(vec![l, d, d], accs().flat_map(|a| a.parts().1.to_vec())),
            ),
            (
                "fisher_mean",
                OwnedTensor::f64(
                    vec![l, d, d],
                    accs().flat_map(|a| a.mean().map_or(zeros.clone(), |m| m.into_vec())),
                ),
            ),
            (
                "entropy_sum",
                OwnedTensor::f64(vec![l, 2], accs().flat_map(|a| [a.parts().3.hi, a.parts().3.lo])),
            ),
            (
                "sequences",
                OwnedTensor::i64(
                    vec![self.sequences.len()],
                    self.sequences.iter().map(|&s| s as i64),
                ),
            ),
        ];
        let meta: HashMap<String, String> = [
            ("format".to_string(), "fisher-stein mean accumulator v1".to_string()),
            ("settings".to_string(), self.settings.to_string()),
            ("shard".to_string(), self.shard.clone()),
        ]
        .into_iter()
        .collect();
        let bytes = crate::output::safetensors_bytes(&tensors, Some(meta))
            .context("serialising the mean accumulator")?;
        write_atomic(&dir.join(MEAN_FILE), &bytes)
    }

    /// Read `path` (a mean.safetensors), checking every shape.
    pub fn read(path: &Path) -> Result<MeanState> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(path, &bytes)
    }

    /// [`MeanState::read`] on the file's bytes; `path` names the file in messages.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<MeanState> {
        let bad = |e: String| {
            anyhow!(
                "{} is not a valid mean accumulator ({e}): re-run compute --mean",
                path.display()
            )
        };
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some("fisher-stein mean accumulator v1") {
            return Err(bad("no fisher-stein accumulator header".into()));
        }
        let settings: serde_json::Value = serde_json::from_str(
            meta.get("settings").ok_or_else(|| bad("no settings in the header".into()))?,
        )
        .map_err(|e| bad(format!("settings: {e}")))?;
        let shard = meta.get("shard").cloned().unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let get = |name: &str| -> Result<(Vec<usize>, Vec<f64>)> {
            let t = st.tensor(name).map_err(|_| bad(format!("tensor `{name}` is missing")))?;
            let v = match t.dtype() {
                safetensors::Dtype::F64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
                safetensors::Dtype::I64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64)
                    .collect(),
                d => return Err(bad(format!("tensor `{name}` has dtype {d:?}"))),
            };
            Ok((t.shape().to_vec(), v))
        };
        let (ls, layers) = get("layers")?;
        let (_, count) = get("count")?;
        let (hs, hi) = get("fisher_sum")?;
        let (_, lo) = get("fisher_sum_lo")?;
        let (_, ent) = get("entropy_sum")?;
        let (_, seqs) = get("sequences")?;
        let l = ls.first().copied().unwrap_or(0);
        if ls.len() != 1
            || layers.len() != l
            || hs.len() != 3
            || hs[0] != l
            || hs[1] != hs[2]
            || lo.len() != hi.len()
            || count.len() != l
            || ent.len() != 2 * l
        {
            return Err(bad(format!("inconsistent shapes (layers {ls:?}, fisher_sum {hs:?})")));
        }
        let d = hs[1];
        let mut out = Vec::with_capacity(l);
        for i in 0..l {
            let r = i * d * d..(i + 1) * d * d;
            let acc = FisherAccumulator::from_parts(
                d,
                hi[r.clone()].to_vec(),
                lo[r].to_vec(),
                count[i] as u64,
                CompensatedSum { hi: ent[2 * i], lo: ent[2 * i + 1] },
            )
            .map_err(|e| bad(e.to_string()))?;
            out.push((layers[i] as usize, acc));
        }
        Ok(MeanState {
            layers: out,
            sequences: seqs.iter().map(|&s| s as usize).collect(),
            settings,
            shard,
        })
    }

    /// Per layer: the spectrum summary of the mean Fisher (and the full eigenvalues, for plots).
    pub fn summary(&self) -> Result<Vec<(serde_json::Value, Vec<f64>)>> {
        self.layers
            .iter()
            .filter_map(|(layer, acc)| acc.mean().map(|m| (layer, acc, m)))
            .map(|(layer, acc, m)| {
                let s = spectrum(&m, None)?;
                Ok((
                    json!({
                        "layer": layer, "count": acc.count(), "mean_entropy": acc.mean_entropy(),
                        "trace": s.trace, "top_eigenvalues": &s.eigenvalues[..s.eigenvalues.len().min(5)],
                        "effective_rank": s.effective_rank, "participation_ratio": s.participation_ratio,
                    }),
                    s.eigenvalues,
                ))
            })
            .collect()
    }
}

/// Print the per-layer summary of the mean Fisher.
pub fn print_mean_summary(rows: &[serde_json::Value]) {
    println!("mean Fisher per layer:");
    println!("layer  matrices  mean entropy  trace       top eigenvalues                      eff. rank  part. ratio");
    for r in rows {
        let top = r["top_eigenvalues"]
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
            "{:>5}  {:>8}  {:>12.4}  {:>10.4e}  [{top:<33}]  {:>9.2}  {:>11.2}",
            r["layer"].as_u64().unwrap_or(0),
            r["count"].as_u64().unwrap_or(0),
            r["mean_entropy"].as_f64().unwrap_or(f64::NAN),
            r["trace"].as_f64().unwrap_or(f64::NAN),
            r["effective_rank"].as_f64().unwrap_or(f64::NAN),
            r["participation_ratio"].as_f64().unwrap_or(f64::NAN),
        );
    }
}

/// Check two accumulators' settings for a merge; the error names the first difference.
pub fn check_compatible(a: &MeanState, b: &MeanState, a_name: &str, b_name: &str) -> Result<()> {
    for key in ["weights_sha256", "d_model", "layers", "estimator", "selection"] {
        if a.settings[key] != b.settings[key] {
            let what = match key {
                "weights_sha256" => "model weights",
                "d_model" => "model width d",
                "layers" => "layers",
                "estimator" => "estimator settings",
                _ => "position selection",
            };
            bail!(
                "cannot merge {b_name} into {a_name}: they differ in {what} ({} vs {}): merge only shards of one run",
                a.settings[key], b.settings[key]
            );
        }
    }
    Ok(())
}

/// Keep only the documents of `--shard i/N` (document `j` belongs to shard `j mod N`).
///
/// A shard that gets no document (more shards than documents, as in a job array sized for a
/// larger corpus) is not an error: the run writes an empty result (with `--mean`, an
/// accumulator with count 0, which `merge` adds as nothing) and succeeds, so that every task of
/// the array succeeds and `merge` can take all their directories. Returns the warning to print
/// in that case.
pub fn select_shard(
    docs: &mut Vec<crate::inputs::Document>,
    shard: Option<ShardSpec>,
) -> Option<String> {
    let shard = shard?;
    let before = docs.len();
    docs.retain(|d| shard.contains(d.index));
    docs.is_empty().then(|| {
        format!(
            "warning: --shard {shard} selects none of the {before} document(s) (document j goes to shard j mod N); writing an empty result"
        )
    })
}

/// The accumulators of a `compute --mean` run: fresh, or, with `--resume`, the checkpoint in
/// the results directory (whose sequences are then skipped). `None` without `--mean`.
pub fn start_mean(
    args: &crate::compute::ComputeArgs,
    estimator: serde_json::Value,
    files: &fs_checkpoint::ModelFiles,
    layers: &[usize],
    d: usize,
    resuming: bool,
) -> Result<Option<MeanState>> {
    if !args.readouts.accumulate() {
        return Ok(None);
    }
    let path = args.output.join(MEAN_FILE);
    if resuming && path.is_file() {
        return MeanState::read(&path).map(Some);
    }
    let hashes = files
        .weights
        .iter()
        .map(|p| fs_checkpoint::sha256_file(p).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let input = match (&args.input, &args.text, &args.tokens) {
        (Some(p), _, _) => json!({"file": p}),
        (None, Some(t), _) => json!({"text": t}),
        (None, None, t) => json!({"tokens": t}),
    };
    let settings = json!({
        "model": args.model,
        "weights_sha256": hashes,
        "d_model": d,
        "layers": layers,
        "estimator": estimator,
        "selection": {
            "positions": format!("{:?}", args.positions), "position_skip": args.position_skip,
            "max_positions": args.max_positions, "max_seq_len": args.max_seq_len,
        },
        "input": input,
    });
    let shard = args.readouts.shard.map_or("all".to_string(), |s| s.to_string());
    Ok(Some(MeanState::new(layers, d, settings, shard)))
}
