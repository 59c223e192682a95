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
//! ([`crate::results::MeanHeader`]) records the settings a merge must agree on (`settings`:
//! model weights' sha256, d, layers, estimator, position selection) and the shard.

use crate::output::{write_atomic, OwnedTensor};
use crate::results::{finite, json_text, top_three, MeanHeader, MeanSettings, MeanSummaryRow};
use anyhow::{anyhow, Context, Result};
use fs_estimators::{spectrum, CompensatedSum, FisherAccumulator};
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
    /// What a merge must agree on.
    pub settings: MeanSettings,
    /// `i/N`, `merged` or `all`.
    pub shard: String,
}

impl MeanState {
    /// Empty accumulators for `layers`, `d × d`.
    pub fn new(layers: &[usize], d: usize, settings: MeanSettings, shard: String) -> Self {
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
        let meta = MeanHeader { settings: self.settings.clone(), shard: self.shard.clone() }
            .to_metadata()
            .context("serialising the mean accumulator's header")?;
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
        let MeanHeader { settings, shard } =
            MeanHeader::from_metadata(&header.metadata().clone().unwrap_or_default())
                .map_err(bad)?;
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
    pub fn summary(&self) -> Result<Vec<(MeanSummaryRow, Vec<f64>)>> {
        self.layers
            .iter()
            .filter_map(|(layer, acc)| acc.mean().map(|m| (layer, acc, m)))
            .map(|(&layer, acc, m)| {
                let s = spectrum(&m, None)?;
                Ok((
                    MeanSummaryRow {
                        layer,
                        count: acc.count(),
                        mean_entropy: acc.mean_entropy(),
                        trace: s.trace,
                        top_eigenvalues: s.eigenvalues[..s.eigenvalues.len().min(5)].to_vec(),
                        effective_rank: s.effective_rank,
                        participation_ratio: s.participation_ratio,
                    },
                    s.eigenvalues,
                ))
            })
            .collect()
    }
}

/// Print the per-layer summary of the mean Fisher.
///
/// Numbers print as metadata.json holds them (a non-finite value as NaN, and left out of the
/// eigenvalue list).
pub fn print_mean_summary(rows: &[MeanSummaryRow]) {
    println!("mean Fisher per layer:");
    println!("layer  matrices  mean entropy  trace       top eigenvalues                      eff. rank  part. ratio");
    let num = |x: f64| finite(x).unwrap_or(f64::NAN);
    for r in rows {
        let top = top_three(&r.top_eigenvalues);
        println!(
            "{:>5}  {:>8}  {:>12.4}  {:>10.4e}  [{top:<33}]  {:>9.2}  {:>11.2}",
            r.layer,
            r.count,
            r.mean_entropy.and_then(finite).unwrap_or(f64::NAN),
            num(r.trace),
            num(r.effective_rank),
            num(r.participation_ratio),
        );
    }
}

/// Check two accumulators' settings for a merge; the error names the first difference.
pub fn check_compatible(a: &MeanState, b: &MeanState, a_name: &str, b_name: &str) -> Result<()> {
    let (x, y) = (&a.settings, &b.settings);
    // What differs, and both values as JSON.
    let differ = |what: &str, a: String, b: String| {
        anyhow!("cannot merge {b_name} into {a_name}: they differ in {what} ({a} vs {b}): merge only shards of one run")
    };
    if x.weights_sha256 != y.weights_sha256 {
        return Err(differ(
            "model weights",
            json_text(&x.weights_sha256),
            json_text(&y.weights_sha256),
        ));
    }
    if x.d_model != y.d_model {
        return Err(differ("model width d", json_text(&x.d_model), json_text(&y.d_model)));
    }
    if x.layers != y.layers {
        return Err(differ("layers", json_text(&x.layers), json_text(&y.layers)));
    }
    if x.estimator != y.estimator {
        return Err(differ("estimator settings", json_text(&x.estimator), json_text(&y.estimator)));
    }
    if x.distribution != y.distribution {
        let name = |d: &Option<String>| d.clone().unwrap_or_else(|| "next-token".into());
        return Err(differ("distribution", name(&x.distribution), name(&y.distribution)));
    }
    if x.selection != y.selection {
        return Err(differ("position selection", json_text(&x.selection), json_text(&y.selection)));
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

/// The accumulators of a `compute --mean` run: with `--resume`, the checkpoint in the results
/// directory `dir` (whose sequences are then skipped), else fresh ones for `layers` (`d × d`)
/// with the run's `settings` (called only then: they hash the weights) and its `shard`.
pub fn start_mean(
    dir: &Path,
    resuming: bool,
    layers: &[usize],
    d: usize,
    shard: Option<ShardSpec>,
    settings: impl FnOnce() -> Result<MeanSettings>,
) -> Result<MeanState> {
    let path = dir.join(MEAN_FILE);
    if resuming && path.is_file() {
        return MeanState::read(&path);
    }
    let shard = shard.map_or("all".to_string(), |s| s.to_string());
    Ok(MeanState::new(layers, d, settings()?, shard))
}
