//! The settings files record: the estimator's, the read-outs', what makes two runs the same run
//! (`run.json`, [`RunSettings`]) and what a merge of mean accumulators must agree on (the header
//! of `mean.safetensors`, [`MeanHeader`]).

use super::lenient;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;

/// An estimator and its settings (`estimator` in metadata.json and run.json, and in the mean
/// accumulator's settings), tagged by `name`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name")]
pub enum EstimatorSettings {
    /// Full-vocabulary Fisher.
    #[serde(rename = "exact")]
    Exact {
        /// Always `false`.
        biased: bool,
    },
    /// The closed form over the streamed vocabulary.
    #[serde(rename = "closed-form")]
    ClosedForm {
        /// Always `false`.
        biased: bool,
    },
    /// Monte-Carlo over sampled next tokens.
    #[serde(rename = "sampled")]
    Sampled {
        /// Draws per position.
        samples: usize,
        /// `--seed`.
        seed: u64,
        /// `--temperature`.
        temperature: f64,
        /// `--top-p`.
        top_p: f64,
        /// Whether the sampling makes it a biased estimate of F.
        biased: bool,
    },
    /// The top `K` eigenpairs of F, matrix-free (`fs_estimators::top_k_fisher`).
    #[serde(rename = "top-k")]
    TopK {
        /// `--k`: eigenpairs per position.
        k: usize,
        /// `--tolerance`: every residual `‖F v − λ v‖ ≤ tolerance · λ_1`.
        tolerance: f64,
        /// `--trace`: `estimate` (Hutch++-style, ± one standard error) or `exact`.
        trace: String,
        /// `--trace-probes` (for `estimate`).
        trace_probes: usize,
        /// `--seed`: the eigensolver's starting block and the trace probes.
        seed: u64,
    },
    /// The mean exact Fisher at `t + 1` over sampled next input tokens.
    #[serde(rename = "predictive")]
    Predictive {
        /// Draws per position.
        draws: usize,
        /// `--seed`.
        seed: u64,
        /// `--temperature`.
        temperature: f64,
        /// `--top-p`.
        top_p: f64,
        /// What it computes, in words.
        note: String,
    },
}

/// The read-out flags of a run (`readouts` in run.json and metadata.json).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadoutSettings {
    /// `--directions K`.
    pub directions: usize,
    /// `--direction-tokens N`.
    pub direction_tokens: usize,
    /// `--mean` or `--mean-only`.
    pub mean: bool,
    /// `--mean-only`.
    pub mean_only: bool,
    /// `--shard i/N`, if given.
    pub shard: Option<String>,
    /// `--sae PATH`, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sae: Option<std::path::PathBuf>,
}

/// `run.json`: the settings that make two runs the same run. `--resume` continues only a run
/// whose run.json holds exactly these (compared as JSON values: any other key, missing or
/// extra, makes it another run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// `--model` as given.
    pub model: String,
    /// The split layers, sorted.
    pub layers: Vec<usize>,
    /// The estimator's settings.
    pub estimator: EstimatorSettings,
    /// `--distribution` when it is not the next-token one (absent for next-token, so that runs
    /// of earlier versions resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<String>,
    /// The positions analysed, per sequence.
    pub positions: Vec<Vec<usize>>,
    /// The token ids, per sequence.
    pub token_ids: Vec<Vec<u32>>,
    /// Eigenpairs stored per matrix.
    pub eig_rank: Option<usize>,
    /// `Safetensors` or `Npz`.
    pub format: String,
    /// The read-out flags.
    pub readouts: ReadoutSettings,
}

impl RunSettings {
    /// Whether the bytes of a recorded run.json hold these settings; an error if they are not
    /// JSON.
    pub fn same_as_recorded(&self, recorded: &[u8]) -> serde_json::Result<bool> {
        let recorded: serde_json::Value = serde_json::from_slice(recorded)?;
        Ok(serde_json::to_value(self)? == recorded)
    }
}

/// What the mean accumulators of one run share and a merge must agree on, recorded in the
/// header of `mean.safetensors`. Read tolerantly (an accumulator written by hand or by another
/// version may lack fields): what is missing reads as the default, an estimator or input of
/// another shape as `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MeanSettings {
    /// `--model` as given.
    pub model: String,
    /// sha256 of every weight file.
    pub weights_sha256: Vec<String>,
    /// `d`.
    pub d_model: usize,
    /// The split layers.
    pub layers: Vec<usize>,
    /// The estimator's settings.
    #[serde(deserialize_with = "lenient")]
    pub estimator: Option<EstimatorSettings>,
    /// `--distribution` when it is not the next-token one (absent for next-token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distribution: Option<String>,
    /// How positions were selected.
    pub selection: Selection,
    /// Where the documents came from (documents of distinct inputs may share an index).
    #[serde(deserialize_with = "lenient")]
    pub input: Option<MeanInput>,
}

/// The position selection of a run (in [`MeanSettings`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Selection {
    /// `--positions`, as parsed (`Debug`).
    pub positions: String,
    /// `--position-skip`.
    pub position_skip: usize,
    /// `--max-positions`.
    pub max_positions: Option<usize>,
    /// `--max-seq-len`.
    pub max_seq_len: Option<usize>,
}

/// The input of a run (in [`MeanSettings`]): `{"file": …}`, `{"text": …}` or `{"tokens": …}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeanInput {
    /// `--input FILE`.
    File(PathBuf),
    /// `--text`.
    Text(String),
    /// `--tokens` (`null` if none was given).
    Tokens(Option<Vec<u32>>),
}

/// The `format` entry of a mean accumulator's header.
pub const MEAN_FORMAT: &str = "fisher-stein mean accumulator v1";

/// The header metadata (`__metadata__`) of `mean.safetensors`: the string map
/// `{"format": MEAN_FORMAT, "settings": JSON of MeanSettings, "shard": …}`.
#[derive(Clone, Debug, PartialEq)]
pub struct MeanHeader {
    /// What a merge must agree on.
    pub settings: MeanSettings,
    /// `i/N`, `all` or `merged from N input(s)`.
    pub shard: String,
}

/// The header's string map as serde sees it.
#[derive(Serialize, Deserialize)]
struct RawMeanHeader {
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    settings: Option<String>,
    #[serde(default)]
    shard: Option<String>,
}

impl MeanHeader {
    /// The safetensors header metadata.
    pub fn to_metadata(&self) -> serde_json::Result<HashMap<String, String>> {
        let raw = RawMeanHeader {
            format: Some(MEAN_FORMAT.to_string()),
            settings: Some(serde_json::to_value(&self.settings)?.to_string()),
            shard: Some(self.shard.clone()),
        };
        serde_json::from_value(serde_json::to_value(raw)?)
    }

    /// Read the safetensors header metadata; the error says what is wrong with it.
    pub fn from_metadata(meta: &HashMap<String, String>) -> Result<Self, String> {
        let raw: RawMeanHeader = serde_json::to_value(meta)
            .and_then(serde_json::from_value)
            .map_err(|e| e.to_string())?;
        if raw.format.as_deref() != Some(MEAN_FORMAT) {
            return Err("no fisher-stein accumulator header".into());
        }
        let settings = raw.settings.ok_or_else(|| "no settings in the header".to_string())?;
        let settings: MeanSettings =
            serde_json::from_str(&settings).map_err(|e| format!("settings: {e}"))?;
        Ok(MeanHeader { settings, shard: raw.shard.unwrap_or_default() })
    }
}
