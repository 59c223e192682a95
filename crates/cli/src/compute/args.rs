//! The arguments of `compute` (clap) and the checks that need no model; what they record in
//! run.json and metadata.json.

use crate::backends::Backend;
use crate::dataset::ShardSpec;
use crate::positions::PositionSpec;
use crate::results::{EstimatorSettings, ReadoutSettings};
use anyhow::{bail, Result};
use fs_estimators::SamplingOptions;
use std::path::PathBuf;

/// Which estimator `compute` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Estimator {
    /// Full-vocabulary Fisher `AᵀGA` (centered `G`, vocabulary streamed).
    Exact,
    /// `(1/S) Σ_s g_{y_s} g_{y_s}ᵀ`, `y_s ~ p` (unbiased at temperature 1, top-p 1).
    Sampled,
    /// `Jᵀdiag(p)J − (Jᵀp)(Jᵀp)ᵀ` with `J = W_U A`, streamed (an independent check of exact).
    ClosedForm,
    /// The original script's default: mean exact F over N sampled next input tokens, each at
    /// position t+1.
    Predictive,
    /// The top --k eigenpairs of F without forming it (F v = Aᵀ G (A v) by JVPs and VJPs in a
    /// block Krylov eigensolver): for big models and when only the leading directions matter.
    TopK,
}

impl Estimator {
    /// The name recorded in metadata.json and used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Estimator::Exact => "exact",
            Estimator::Sampled => "sampled",
            Estimator::ClosedForm => "closed-form",
            Estimator::Predictive => "predictive",
            Estimator::TopK => "top-k",
        }
    }
}

/// Which softmax of the model the Fisher information is taken of (`--distribution`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Distribution {
    /// The next-token distribution `p = softmax(z)` (the default).
    #[default]
    NextToken,
    /// The attention weights of one head over the keys its query sees
    /// (`attention:L.J`: block `L`, query head `J`).
    Attention(fs_estimators::AttentionHead),
}

impl Distribution {
    /// The head, for an attention distribution.
    pub fn head(self) -> Option<fs_estimators::AttentionHead> {
        match self {
            Distribution::NextToken => None,
            Distribution::Attention(h) => Some(h),
        }
    }

    /// What run.json and the mean accumulator record: nothing for the next-token distribution
    /// (so that runs of earlier versions resume and merge), the name otherwise.
    pub fn recorded(self) -> Option<String> {
        self.head().map(|h| h.to_string())
    }
}

impl std::fmt::Display for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Distribution::NextToken => f.write_str("next-token"),
            Distribution::Attention(h) => write!(f, "{h}"),
        }
    }
}

impl std::str::FromStr for Distribution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("{s:?}: use next-token, or attention:L.J for query head J of block L (e.g. attention:5.3)")
        };
        if s == "next-token" {
            return Ok(Distribution::NextToken);
        }
        let spec = s.strip_prefix("attention:").ok_or_else(bad)?;
        let (layer, head) = spec.split_once('.').ok_or_else(bad)?;
        let number = |x: &str| x.trim().parse::<usize>().map_err(|_| bad());
        Ok(Distribution::Attention(fs_estimators::AttentionHead {
            layer: number(layer)?,
            head: number(head)?,
        }))
    }
}

/// Results file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `.safetensors` (default).
    Safetensors,
    /// `.npz` (uncompressed; `numpy.load`).
    Npz,
}

impl Format {
    /// The results files' extension.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Npz => "npz",
        }
    }
}

/// How `--estimator top-k` reports `tr F`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TraceArg {
    /// Exact on the eigensolver's subspace, Hutchinson on its complement (± one standard error).
    Estimate,
    /// `Σ_i e_iᵀ F e_i` (d more operator applications).
    Exact,
}

/// Arguments of `fisher-stein compute`.
#[derive(Debug, clap::Args)]
pub struct ComputeArgs {
    /// Model: a directory with config.json + safetensors, a `.gguf` file, or a hub id
    /// `org/name[@revision]` (from the HF cache; downloaded into it when missing, unless
    /// HF_HUB_OFFLINE=1).
    #[arg(long, alias = "model_name", value_name = "PATH_OR_ID")]
    pub model: String,
    /// Split layer k: 0 = embeddings, n_layer = last block before the final norm; or its
    /// TransformerLens hook name: blocks.K.hook_resid_pre (= K), blocks.K.hook_resid_post
    /// (= K+1), hook_embed (= 0 on rotary models without embedding scaling).
    #[arg(
        long,
        visible_alias = "hook",
        alias = "layer_idx",
        value_name = "K|HOOK",
        conflicts_with = "layers",
        required_unless_present = "layers"
    )]
    pub layer: Option<String>,
    /// Several split layers sharing one forward pass: K,K,... (indices or hook names) or all.
    #[arg(long, value_name = "K,K|all")]
    pub layers: Option<String>,
    /// Token ids, comma-separated (e.g. 15496,995).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["text", "input"])]
    pub tokens: Option<Vec<u32>>,
    /// Text, tokenised with the model's tokenizer (tokenizer.json or vocab.json + merges.txt).
    #[arg(long, conflicts_with = "input")]
    pub text: Option<String>,
    /// File of documents: plain text, one per line, or JSONL with a "text" field.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Analyse at most N documents of --input.
    #[arg(long, alias = "num_sequences", value_name = "N")]
    pub num_sequences: Option<usize>,
    /// Skip the first I documents of --input (their indices are kept in the output names).
    #[arg(long, alias = "start_sequence_idx", default_value_t = 0, value_name = "I")]
    pub start_sequence: usize,
    /// Truncate every document to at most N tokens (with a warning).
    #[arg(long, alias = "max_seq_len", value_name = "N")]
    pub max_seq_len: Option<usize>,
    /// Positions: all, last, or a list/range such as 0,3,10..12 (negative = from the end).
    #[arg(long, default_value = "last", allow_hyphen_values = true)]
    pub positions: PositionSpec,
    /// Keep every k-th of the selected positions, starting with the k-th (1 = all).
    #[arg(long, alias = "position_skip", default_value_t = 1, value_name = "K")]
    pub position_skip: usize,
    /// Keep at most M positions per sequence (the first M after --position-skip).
    #[arg(long, alias = "max_positions", value_name = "M")]
    pub max_positions: Option<usize>,
    /// Estimator.
    #[arg(long, value_enum, default_value = "exact")]
    pub estimator: Estimator,
    /// Whose Fisher: next-token (default), or attention:L.J — the attention weights of query
    /// head J of block L (L ≥ the split layer) over the keys the query sees (exact or sampled
    /// estimator; --directions then names the keys a direction moves attention toward).
    #[arg(long, default_value = "next-token", value_name = "next-token|attention:L.J")]
    pub distribution: Distribution,
    /// Draws per position: sampled estimator (default 10) or predictive average (default 50).
    #[arg(long, alias = "num_samples", alias = "num-samples", value_name = "S")]
    pub samples: Option<usize>,
    /// Seed of every random draw (position t uses stream t; top-k: its starting block and trace
    /// probes); recorded in metadata.json.
    #[arg(long, alias = "random_seed", default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature for sampled / predictive draws. Any value other than 1 makes the
    /// sampled estimator BIASED (it no longer estimates F).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus mass in (0, 1] for sampled / predictive draws. Below 1 the sampled estimator is
    /// BIASED (it no longer estimates F).
    #[arg(long, alias = "top_p", default_value_t = 1.0)]
    pub top_p: f64,
    /// --estimator top-k: eigenpairs per position.
    #[arg(long = "k", value_name = "K", default_value_t = 16)]
    pub top_k: usize,
    /// --estimator top-k: stop when every residual ‖F v − λ v‖ ≤ TOL · λ_1.
    #[arg(long, value_name = "TOL", default_value_t = 1e-5)]
    pub tolerance: f64,
    /// --estimator top-k: the trace of F as an estimate with its standard error (a few more
    /// operator applications) or exact (d more).
    #[arg(long, value_enum, default_value = "estimate")]
    pub trace: TraceArg,
    /// --estimator top-k with --trace estimate: Hutchinson probes on the complement of the
    /// eigensolver's subspace.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub trace_probes: usize,
    /// Positions per batched backward pass of the readout Jacobian (default: fits ~1 GiB).
    #[arg(long, alias = "batch_size", value_name = "N")]
    pub batch_size: Option<usize>,
    /// Also store the full eigendecomposition (eigenvalues [N, d], eigenvectors [N, d, d]).
    #[arg(long, conflicts_with = "eig_top")]
    pub eig: bool,
    /// Also store the top K eigenpairs (eigenvalues [N, K], eigenvectors [N, d, K]).
    #[arg(long, value_name = "K")]
    pub eig_top: Option<usize>,
    /// Results file format.
    #[arg(long, value_enum, default_value = "safetensors")]
    pub format: Format,
    /// Results directory.
    #[arg(long, alias = "output_dir", value_name = "DIR")]
    pub output: PathBuf,
    /// Replace a non-empty output directory.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Continue the run in a non-empty output directory, skipping finished sequences.
    #[arg(long)]
    pub resume: bool,
    /// Stop at the first position whose computation meets a NaN or infinity (in activations,
    /// logits, probabilities or the result) instead of recording it as failed and going on.
    #[arg(long)]
    pub fail_fast: bool,
    /// With --mean: checkpoint the accumulator (what --resume continues from) at most every
    /// SECONDS (0 = after every sequence); it is always written at the end.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub checkpoint_secs: f64,
    /// Device: cpu, or cuda:N (needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Autodiff engine: candle (default), burn or dfdx (each needs its Cargo feature;
    /// `--features all-backends` builds all three).
    #[arg(long, value_enum, default_value = "candle")]
    pub backend: Backend,
    /// Interpretability read-outs and dataset means (--directions, --mean, --shard).
    #[command(flatten)]
    pub readouts: ReadoutArgs,
}

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
    pub shard: Option<ShardSpec>,
    /// A residual-stream sparse autoencoder at the analysed layer (SAELens directory: cfg.json +
    /// sae_weights.safetensors; or Gemma Scope params.npz): per position its active features
    /// with their Fisher sensitivity wᵀFw, the second-order ablation cost ½a²wᵀFw next to the
    /// measured KL of ablating them, and the top eigenvectors in feature space.
    #[arg(long, value_name = "PATH")]
    pub sae: Option<PathBuf>,
}

impl ComputeArgs {
    /// Draws per position (`--samples`, or the estimator's default).
    pub fn samples(&self) -> usize {
        self.samples.unwrap_or(match self.estimator {
            Estimator::Predictive => 50,
            _ => 10,
        })
    }

    /// `--temperature` and `--top-p`.
    pub fn sampling(&self) -> SamplingOptions {
        SamplingOptions { temperature: self.temperature, top_p: self.top_p }
    }

    /// Checks that need no model.
    pub fn validate(&self) -> Result<()> {
        if matches!(self.estimator, Estimator::Sampled | Estimator::Predictive) {
            if self.samples() == 0 {
                bail!(
                    "--samples 0: the {} estimator needs at least 1 draw per position",
                    self.estimator.name()
                );
            }
            self.sampling().validate()?;
        }
        if self.position_skip == 0 {
            bail!("--position-skip 0: use 1 to keep every position, k to keep every k-th");
        }
        if self.max_positions == Some(0) {
            bail!("--max-positions 0 selects nothing: give at least 1");
        }
        if self.max_seq_len == Some(0) {
            bail!("--max-seq-len 0 leaves no tokens: give at least 1");
        }
        if self.batch_size == Some(0) {
            bail!("--batch-size 0: give at least 1 position per batch");
        }
        if !(self.checkpoint_secs >= 0.0 && self.checkpoint_secs.is_finite()) {
            bail!(
                "--checkpoint-secs {}: give a finite number of seconds ≥ 0",
                self.checkpoint_secs
            );
        }
        if self.estimator == Estimator::TopK {
            if self.top_k == 0 {
                bail!("--k 0 asks for no eigenpairs: give at least 1");
            }
            if !(self.tolerance.is_finite() && self.tolerance > 0.0) {
                bail!("--tolerance {}: give a finite number > 0 (e.g. 1e-5)", self.tolerance);
            }
            if self.trace == TraceArg::Estimate && self.trace_probes < 2 {
                bail!(
                    "--trace-probes {}: a standard error needs at least 2 probes",
                    self.trace_probes
                );
            }
            if self.readouts.accumulate() {
                bail!("--mean with --estimator top-k: the dataset mean averages whole Fisher matrices, which top-k never forms; use --estimator exact or sampled for --mean");
            }
            if self.readouts.directions > self.top_k {
                bail!("--directions {} with --k {}: top-k decodes only the eigenpairs it computes; raise --k or lower --directions", self.readouts.directions, self.top_k);
            }
            if self.eig || self.eig_top.is_some() {
                bail!("--eig/--eig-top with --estimator top-k: it stores its --k eigenpairs already; drop the flag and set --k");
            }
        }
        if self.eig_top == Some(0) {
            bail!("--eig-top 0 keeps no eigenpairs: give at least 1, or drop the flag");
        }
        if let Some(head) = self.distribution.head() {
            if !matches!(self.estimator, Estimator::Exact | Estimator::Sampled) {
                bail!("--distribution {head} with --estimator {}: attention distributions have the exact estimator (cheap: one outcome per key) and the sampled one; use --estimator exact or sampled", self.estimator.name());
            }
            if !self.sampling().is_unbiased() {
                bail!("--distribution {head} with --temperature/--top-p: the keys are drawn from the attention weights themselves; drop those flags");
            }
            if self.readouts.sae.is_some() {
                bail!("--distribution {head} with --sae: the SAE read-out measures next-token KL; use the next-token distribution for --sae");
            }
        }
        self.readouts.validate(self.estimator)
    }

    /// The estimator's settings, as recorded in run.json / metadata.json.
    pub fn estimator_settings(&self) -> EstimatorSettings {
        let biased = !self.sampling().is_unbiased();
        match self.estimator {
            Estimator::Sampled => EstimatorSettings::Sampled {
                samples: self.samples(),
                seed: self.seed,
                temperature: self.temperature,
                top_p: self.top_p,
                biased,
            },
            Estimator::Predictive => EstimatorSettings::Predictive {
                draws: self.samples(),
                seed: self.seed,
                temperature: self.temperature,
                top_p: self.top_p,
                note: "mean exact Fisher at position t+1 over next input tokens drawn at t".into(),
            },
            Estimator::Exact => EstimatorSettings::Exact { biased: false },
            Estimator::TopK => EstimatorSettings::TopK {
                k: self.top_k,
                tolerance: self.tolerance,
                trace: match self.trace {
                    TraceArg::Estimate => "estimate".into(),
                    TraceArg::Exact => "exact".into(),
                },
                trace_probes: self.trace_probes,
                seed: self.seed,
            },
            Estimator::ClosedForm => EstimatorSettings::ClosedForm { biased: false },
        }
    }
}

impl ReadoutArgs {
    /// `--mean` or `--mean-only`.
    pub fn accumulate(&self) -> bool {
        self.mean || self.mean_only
    }

    /// Checks that need no model.
    pub fn validate(&self, estimator: Estimator) -> Result<()> {
        if self.directions > 0 && estimator == Estimator::Predictive {
            bail!("--directions with --estimator predictive: the predictive average is a Fisher at position t+1 over sampled tokens, so its eigenvectors do not act on h_k[t]; use exact, closed-form or sampled");
        }
        if self.directions > 0 && self.direction_tokens == 0 {
            bail!("--direction-tokens 0 lists no tokens: give at least 1");
        }
        if self.sae.is_some() && matches!(estimator, Estimator::TopK | Estimator::Predictive) {
            bail!("--sae with --estimator {}: the SAE read-out needs the whole Fisher matrix at h_k[t]; use exact, closed-form or sampled", estimator.name());
        }
        Ok(())
    }

    /// The settings recorded in run.json (and checked by --resume) and metadata.json.
    pub fn settings(&self) -> ReadoutSettings {
        ReadoutSettings {
            directions: self.directions,
            direction_tokens: self.direction_tokens,
            mean: self.accumulate(),
            mean_only: self.mean_only,
            shard: self.shard.map(|s| s.to_string()),
            sae: self.sae.clone(),
        }
    }
}
