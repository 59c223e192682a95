//! `metadata.json`: what `compute` ([`Metadata`]) and `merge` ([`MergeMetadata`]) write, the
//! per-position and per-layer summaries they share, and [`MetadataView`], the tolerant reader
//! `inspect`, `report` and `merge` use on either.

use super::settings::{EstimatorSettings, MeanSettings, ReadoutSettings};
use super::{lenient, nan_if_null, nans_if_null};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `metadata.json` of a `compute` run (written last, once every sequence is done).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// [`super::TOOL`].
    pub tool: String,
    /// [`super::VERSION`].
    pub version: String,
    /// The model and its files.
    pub model: ModelInfo,
    /// The split layers analysed, sorted.
    pub layers: Vec<usize>,
    /// Their TransformerLens hook names, one per layer: as given (`--layer blocks.5.hook_resid_post`),
    /// else `blocks.K.hook_resid_pre` (`blocks.{n-1}.hook_resid_post` for the last).
    #[serde(default)]
    pub hooks: Vec<String>,
    /// `d`.
    pub d_model: usize,
    /// Sequences analysed (after `--shard`).
    pub n_sequences: usize,
    /// One entry per sequence.
    pub sequences: Vec<SequenceInfo>,
    /// The positions analysed, per sequence.
    pub positions: Vec<Vec<usize>>,
    /// The token ids, per sequence (after `--max-seq-len`).
    pub token_ids: Vec<Vec<u32>>,
    /// `--text`.
    pub text: Option<String>,
    /// `--input`.
    pub input: Option<PathBuf>,
    /// The estimator's settings.
    pub estimator: EstimatorSettings,
    /// Whose Fisher (`--distribution`): `next-token`, or `attention:L.J` (the attention weights
    /// of query head `J` of block `L`; entropies are then the attention's).
    #[serde(default = "next_token")]
    pub distribution: String,
    /// Eigenpairs stored per matrix (`--eig`, `--eig-top`, `--directions`).
    pub eig_rank: Option<usize>,
    /// `safetensors` or `npz`.
    pub format: String,
    /// A note on the arithmetic.
    pub dtype: String,
    /// The engine.
    pub backend: String,
    /// Its device.
    pub device: String,
    /// Sequences `--resume` found finished.
    pub resumed_sequences_skipped: usize,
    /// `failed_positions.len()`.
    #[serde(default)]
    pub n_failed_positions: usize,
    /// Positions that failed on NaN or infinity.
    #[serde(default)]
    pub failed_positions: Vec<FailedPosition>,
    /// Wall-clock seconds.
    pub timings_s: Timings,
    /// The read-out flags.
    #[serde(default)]
    pub readouts: ReadoutSettings,
    /// The layer sweep: per layer, means over its positions.
    #[serde(default)]
    pub layer_summary: Vec<LayerSummaryRow>,
    /// With `--mean`: the spectrum of the mean Fisher per layer; else `null`.
    #[serde(default)]
    pub mean_summary: Option<Vec<MeanSummaryRow>>,
    /// One entry per analysed position (layer × position × sequence).
    pub summary: Vec<PositionSummary>,
}

/// The model of a run and its files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `--model` as given.
    pub spec: String,
    /// `gpt2` or `llama`.
    pub architecture: String,
    /// Its `config.json` (or GGUF file).
    pub config: PathBuf,
    /// Where the files came from.
    pub origin: Origin,
    /// Every weight file with its sha256.
    pub weights: Vec<WeightHash>,
    /// `d`.
    pub d_model: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Transformer blocks.
    pub n_layers: usize,
}

/// Where the model files came from (`fs_checkpoint::ModelOrigin`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Origin {
    /// A directory given on the command line.
    #[serde(rename = "local_dir")]
    LocalDir {
        /// The directory.
        dir: PathBuf,
    },
    /// A snapshot in the Hugging Face hub cache.
    #[serde(rename = "hf_cache")]
    HubCache {
        /// `org/name`.
        repo_id: String,
        /// The revision asked for.
        revision: String,
        /// The commit it resolved to.
        commit: String,
        /// The snapshot directory.
        snapshot_dir: PathBuf,
    },
}

impl From<&fs_checkpoint::ModelOrigin> for Origin {
    fn from(o: &fs_checkpoint::ModelOrigin) -> Self {
        match o {
            fs_checkpoint::ModelOrigin::LocalDir { dir } => Origin::LocalDir { dir: dir.clone() },
            fs_checkpoint::ModelOrigin::HubCache { repo_id, revision, commit, snapshot_dir } => {
                Origin::HubCache {
                    repo_id: repo_id.clone(),
                    revision: revision.clone(),
                    commit: commit.clone(),
                    snapshot_dir: snapshot_dir.clone(),
                }
            }
        }
    }
}

/// A weight file and its sha256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightHash {
    /// The file.
    pub path: PathBuf,
    /// Its sha256, hex.
    pub sha256: String,
}

/// One analysed sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceInfo {
    /// Its document index in the input.
    pub index: usize,
    /// Its results file (`null` with `--mean-only`).
    pub file: Option<String>,
    /// Tokens analysed.
    pub n_tokens: usize,
    /// Tokens `--max-seq-len` cut off.
    pub truncated_tokens: usize,
    /// The first 200 characters of its text (`null` for `--tokens`).
    pub text_preview: Option<String>,
}

/// Wall-clock seconds of a run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Resolving and loading the model.
    pub load: f64,
    /// The sequences.
    pub compute: f64,
    /// Everything.
    pub total: f64,
    /// How `compute` divides (absent in files written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_split: Option<ComputeSplit>,
}

/// Where `compute`'s time went, summed over the sequences (seconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ComputeSplit {
    /// The lower passes (one forward pass per sequence for all its layers).
    pub lower: f64,
    /// The logits of the analysed positions and the estimator itself.
    pub estimator: f64,
    /// `--directions` read-outs.
    pub readouts: f64,
    /// Spectra for the summaries, results files, state files and the mean accumulator.
    pub summaries_and_files: f64,
}

/// A position that failed on NaN or infinity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedPosition {
    /// Document index.
    pub sequence: usize,
    /// Split layer.
    pub layer: usize,
    /// Position.
    pub position: usize,
    /// The one-line message (also printed as a warning).
    pub error: String,
}

/// The summary of one analysed matrix (layer × position × sequence).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PositionSummary {
    /// Document index.
    pub sequence: usize,
    /// Split layer.
    pub layer: usize,
    /// Position.
    pub position: usize,
    /// The token at the position.
    pub token_id: u32,
    /// Entropy of the next-token distribution.
    #[serde(deserialize_with = "nan_if_null")]
    pub entropy: f64,
    /// `tr F`.
    #[serde(deserialize_with = "nan_if_null")]
    pub trace: f64,
    /// The (up to) 5 largest eigenvalues.
    #[serde(deserialize_with = "nans_if_null")]
    pub top_eigenvalues: Vec<f64>,
    /// `exp` of the spectral entropy.
    #[serde(deserialize_with = "nan_if_null")]
    pub effective_rank: f64,
    /// `(Σλ)² / Σλ²`.
    #[serde(deserialize_with = "nan_if_null")]
    pub participation_ratio: f64,
    /// Negative round-off eigenvalues clamped to 0.
    pub clamped_negative_eigenvalues: usize,
    /// `--estimator top-k --trace estimate`: one standard error of `trace` (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_std_error: Option<f64>,
    /// `--estimator top-k`: how the eigenpairs were obtained (absent otherwise). Effective rank
    /// and participation ratio need the whole spectrum and are `null` in that mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<TopKSummary>,
    /// With `--directions`: the token's text (absent without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// With `--directions`: the decoded top directions (absent without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directions: Option<Vec<DirectionSummary>>,
    /// With `--sae`: the SAE's active features through F (absent without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sae: Option<SaeSummary>,
}

/// `compute --sae`: one position's SAE features through its Fisher matrix (`crate::sae`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SaeSummary {
    /// Features with `a_i > 0`.
    pub n_active: usize,
    /// Every active feature, largest second-order ablation cost first.
    pub features: Vec<SaeFeature>,
    /// Per top eigenvector `v_k` of F: the features whose decoder directions are most aligned
    /// with it (largest `|cos(v_k, w_i)|` over all features).
    pub eigenvector_features: Vec<Vec<SaeFeatureCosine>>,
}

/// One active SAE feature at one position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SaeFeature {
    /// Feature index.
    pub index: usize,
    /// Its activation `a_i`.
    #[serde(deserialize_with = "nan_if_null")]
    pub activation: f64,
    /// `w_iᵀ F w_i`, `w_i` its decoder direction.
    #[serde(deserialize_with = "nan_if_null")]
    pub sensitivity: f64,
    /// `½ a_i² w_iᵀ F w_i`: the second-order KL cost of ablating it.
    #[serde(deserialize_with = "nan_if_null")]
    pub kl_second_order: f64,
    /// `KL(p ‖ p(h − a_i w_i))`: the KL of ablating it, measured through the model.
    #[serde(deserialize_with = "nan_if_null")]
    pub kl_ablation: f64,
}

/// A feature and the cosine of its decoder direction with an eigenvector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SaeFeatureCosine {
    /// Feature index.
    pub index: usize,
    /// `cos(v, w_i)`.
    #[serde(deserialize_with = "nan_if_null")]
    pub cosine: f64,
}

/// How `--estimator top-k` obtained one position's eigenpairs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopKSummary {
    /// Eigenpairs computed.
    pub k: usize,
    /// Operator applications (one JVP + one VJP each) spent by the eigensolver.
    pub applications: usize,
    /// Operator applications spent on the trace.
    pub trace_applications: usize,
    /// Score vectors of probable tokens that made the eigensolver's first block (one VJP each;
    /// absent, read as 0, in results written before they existed).
    #[serde(default)]
    pub start_vectors: usize,
    /// Largest residual `‖F v − λ v‖ / λ_1`.
    pub max_residual: f64,
    /// Whether every residual met `--tolerance`.
    pub converged: bool,
}

/// One decoded direction (`compute --directions K`): an eigenvector `v` of F.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DirectionSummary {
    /// Rank, from 1 (top eigenvalue).
    pub k: usize,
    /// λ.
    #[serde(deserialize_with = "nan_if_null")]
    pub eigenvalue: f64,
    /// `vᵀFv` from the exact `Jv`.
    #[serde(rename = "vFv", deserialize_with = "nan_if_null")]
    pub fisher_quadratic: f64,
    /// The KL step ε.
    #[serde(deserialize_with = "nan_if_null")]
    pub epsilon: f64,
    /// `KL(p ‖ p(h + εv))`, measured.
    #[serde(deserialize_with = "nan_if_null")]
    pub kl: f64,
    /// `½ ε² vᵀFv`.
    #[serde(deserialize_with = "nan_if_null")]
    pub kl_quadratic: f64,
    /// `kl / kl_quadratic`.
    #[serde(deserialize_with = "nan_if_null")]
    pub kl_ratio: f64,
    /// `hᵀv`.
    #[serde(deserialize_with = "nan_if_null")]
    pub projection: f64,
    /// Tokens `+v` pushes up.
    pub up: Vec<TokenEffect>,
    /// Tokens `−v` pushes up.
    pub down: Vec<TokenEffect>,
}

/// A token a direction pushes up — for an attention distribution, a key the direction moves
/// attention toward (`key` = its position, `id`/`token` = the token there, `dp` = `∂a/∂ε`,
/// `dlogit` = the score change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenEffect {
    /// Token id.
    pub id: u32,
    /// Its text, quoted (or `#id`).
    pub token: String,
    /// The key position, for an attention distribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<usize>,
    /// `∂p_y/∂ε`.
    #[serde(deserialize_with = "nan_if_null")]
    pub dp: f64,
    /// `(Jv)_y`.
    #[serde(deserialize_with = "nan_if_null")]
    pub dlogit: f64,
}

/// One row of the layer sweep: means over the analysed positions of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerSummaryRow {
    /// Split layer.
    pub layer: usize,
    /// Positions averaged.
    pub positions: usize,
    /// Mean entropy.
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_entropy: f64,
    /// Mean `tr F`.
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_trace: f64,
    /// Mean of each of the top eigenvalues.
    #[serde(deserialize_with = "nans_if_null")]
    pub mean_top_eigenvalues: Vec<f64>,
    /// Mean effective rank.
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_effective_rank: f64,
    /// Mean participation ratio.
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_participation_ratio: f64,
}

/// One row of the mean Fisher's summary (`--mean`, `merge`): the spectrum of one layer's mean.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeanSummaryRow {
    /// Split layer.
    pub layer: usize,
    /// Matrices in the mean.
    pub count: u64,
    /// Mean entropy (`null` if none).
    pub mean_entropy: Option<f64>,
    /// `tr F̄`.
    #[serde(deserialize_with = "nan_if_null")]
    pub trace: f64,
    /// The (up to) 5 largest eigenvalues of `F̄`.
    #[serde(deserialize_with = "nans_if_null")]
    pub top_eigenvalues: Vec<f64>,
    /// Effective rank of `F̄`.
    #[serde(deserialize_with = "nan_if_null")]
    pub effective_rank: f64,
    /// Participation ratio of `F̄`.
    #[serde(deserialize_with = "nan_if_null")]
    pub participation_ratio: f64,
}

/// `metadata.json` of a `merge`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MergeMetadata {
    /// [`super::TOOL`].
    pub tool: String,
    /// [`super::VERSION`].
    pub version: String,
    /// The accumulators merged.
    pub merged_from: Vec<MergedInput>,
    /// The settings they agree on (the first input's).
    pub settings: MeanSettings,
    /// Layers.
    pub layers: Vec<usize>,
    /// `d`.
    pub d_model: usize,
    /// Documents in the merged mean.
    pub n_sequences: usize,
    /// The spectrum of the merged mean per layer.
    pub mean_summary: Vec<MeanSummaryRow>,
    /// The layer sweep over the inputs' per-position summaries.
    pub layer_summary: Vec<LayerSummaryRow>,
    /// The inputs' per-position summaries, in input order.
    pub summary: Vec<PositionSummary>,
}

/// One input of a merge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedInput {
    /// Its mean.safetensors.
    pub path: PathBuf,
    /// Its shard (`i/N`, `all`, or `merged from …`).
    pub shard: String,
    /// Documents in it.
    pub sequences: usize,
}

/// What `inspect`, `report` and `merge` read from a metadata.json, of `compute` or of `merge`.
/// Tolerant: each field is read on its own, and one that is missing or of another type is
/// `None` / empty (a directory from an older version, a hand-edited file).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct MetadataView {
    /// `version`.
    #[serde(default, deserialize_with = "lenient")]
    pub version: Option<String>,
    /// `model` (compute).
    #[serde(default, deserialize_with = "lenient")]
    pub model: Option<ModelRef>,
    /// `settings` (merge).
    #[serde(default, deserialize_with = "lenient")]
    pub settings: Option<SettingsRef>,
    /// `merged_from` (merge).
    #[serde(default, deserialize_with = "lenient")]
    pub merged_from: Option<Vec<MergedInput>>,
    /// `layers`.
    #[serde(default, deserialize_with = "lenient")]
    pub layers: Option<Vec<usize>>,
    /// `d_model`.
    #[serde(default, deserialize_with = "lenient")]
    pub d_model: Option<usize>,
    /// `n_sequences`.
    #[serde(default, deserialize_with = "lenient")]
    pub n_sequences: Option<usize>,
    /// `estimator` (compute).
    #[serde(default, deserialize_with = "lenient")]
    pub estimator: Option<EstimatorSettings>,
    /// `distribution` (compute; absent before `--distribution` existed: next-token).
    #[serde(default, deserialize_with = "lenient")]
    pub distribution: Option<String>,
    /// `text` (compute).
    #[serde(default, deserialize_with = "lenient")]
    pub text: Option<String>,
    /// `backend` (compute).
    #[serde(default, deserialize_with = "lenient")]
    pub backend: Option<String>,
    /// `device` (compute).
    #[serde(default, deserialize_with = "lenient")]
    pub device: Option<String>,
    /// `layer_summary`.
    #[serde(default, deserialize_with = "lenient")]
    pub layer_summary: Vec<LayerSummaryRow>,
    /// `mean_summary`.
    #[serde(default, deserialize_with = "lenient")]
    pub mean_summary: Option<Vec<MeanSummaryRow>>,
    /// `summary`.
    #[serde(default, deserialize_with = "lenient")]
    pub summary: Vec<PositionSummary>,
}

impl MetadataView {
    /// Read a metadata.json's bytes: an error only if they are not JSON; JSON that is not an
    /// object reads as an empty view.
    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Self> {
        let value: serde_json::Value = serde_json::from_slice(bytes)?;
        Ok(Self::deserialize(value).unwrap_or_default())
    }

    /// The model the results are of: `model.spec` (compute) or `settings.model` (merge).
    pub fn model_spec(&self) -> Option<&str> {
        match self.model.as_ref().and_then(|m| m.spec.as_deref()) {
            Some(spec) => Some(spec),
            None => self.settings.as_ref().and_then(|s| s.model.as_deref()),
        }
    }

    /// The estimator's settings: `estimator` (compute) or `settings.estimator` (merge).
    pub fn estimator(&self) -> Option<&EstimatorSettings> {
        self.estimator.as_ref().or(self.settings.as_ref().and_then(|s| s.estimator.as_ref()))
    }
}

/// The part of [`MergeMetadata::settings`] readers need.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct SettingsRef {
    /// `model`.
    #[serde(default, deserialize_with = "lenient")]
    pub model: Option<String>,
    /// `estimator`.
    #[serde(default, deserialize_with = "lenient")]
    pub estimator: Option<EstimatorSettings>,
}

/// The part of [`ModelInfo`] readers need.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ModelRef {
    /// `spec`.
    #[serde(default, deserialize_with = "lenient")]
    pub spec: Option<String>,
    /// `architecture`.
    #[serde(default, deserialize_with = "lenient")]
    pub architecture: Option<String>,
}

/// The default `distribution` of metadata written before `--distribution` existed.
fn next_token() -> String {
    "next-token".into()
}
