//! `fisher-stein edit` and `fisher-stein steer`: what editing an activation along a direction
//! costs, and steering the next-token prediction toward a target token with the least damage
//! to the rest of the distribution (`fs_estimators::steering` has the math).
//!
//! * `edit`: a direction — a vector file (`.npy`, `.safetensors`), the unembedding difference
//!   `w_a − w_b` of two tokens, or a contrastive steering vector (the mean layer-`k` activation
//!   difference of two prompt sets) — at one position: `v̂ᵀFv̂`, and for each edit size the
//!   second-order KL `½ε²v̂ᵀFv̂` next to the measured KL, and the first-order vs measured change
//!   of chosen tokens' log-probabilities.
//! * `steer`: one prompt and target token, or a study file of many, steered to a target
//!   probability by the Euclidean gradient, the damped Fisher direction and (where given) a
//!   contrastive vector; the off-target KL of each at the matched target probability, a table
//!   and `steer.json` (which `report` turns into a page with a plot).

use crate::backends::{with_model, Backend, LoadSpec, Loaded, ModelJob};
use crate::output::write_atomic;
use crate::readouts::token_text;
use crate::results::pretty_json;
use crate::Globals;
use anyhow::{anyhow, bail, Context, Result};
use fs_checkpoint::tokenizers::Tokenizer;
use fs_estimators::steering::{
    contrastive_direction, edit_cost, steer, SteeringMethod, SteeringOptions, SteeringPath,
};
use fs_estimators::{Scalar, SplitContext, SplitModel};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The file `steer` writes into its output directory (and `report` reads).
pub const STEER_FILE: &str = "steer.json";

/// The model, layer and engine of `edit` and `steer`.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Model: a directory with config.json + safetensors, a `.gguf` file, or a hub id.
    #[arg(long, value_name = "PATH_OR_ID")]
    pub model: String,
    /// Split layer k (index or TransformerLens hook name, as for `compute`).
    #[arg(long, value_name = "K", allow_hyphen_values = true)]
    pub layer: String,
    /// Device: cpu, or cuda:N (needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Autodiff engine: candle (default), burn or dfdx.
    #[arg(long, value_enum, default_value = "candle")]
    pub backend: Backend,
}

impl ModelArgs {
    /// `--layer` resolved against the loaded model.
    fn resolve_layer(
        &self,
        dims: &fs_estimators::ModelDims,
        loaded: &Loaded,
    ) -> Result<crate::layers::NamedLayer> {
        crate::layers::resolve_layer(&self.layer, dims.n_layers, loaded.model_type, "--layer")
    }
}

/// Arguments of `fisher-stein edit`.
#[derive(Debug, clap::Args)]
pub struct EditArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text whose activation is edited (tokenised with the model's tokenizer).
    #[arg(long, conflicts_with = "tokens")]
    pub text: Option<String>,
    /// Token ids instead of --text.
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<u32>>,
    /// The position edited (negative = from the end; default the last).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub position: i64,
    /// The direction as a vector file: `.npy` (1-D, f32/f64) or `.safetensors` (see
    /// --vector-name), of length d.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["token_difference", "contrast"])]
    pub vector: Option<PathBuf>,
    /// The tensor of a `.safetensors` --vector holding several.
    #[arg(long, value_name = "NAME", requires = "vector")]
    pub vector_name: Option<String>,
    /// The direction w_A − w_B: the difference of two tokens' unembedding rows (each a text
    /// that is one token, or id:N).
    #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with = "contrast")]
    pub token_difference: Option<Vec<String>>,
    /// A contrastive steering vector: the mean activation at the split layer (last position)
    /// of the prompts in POSITIVE minus that of NEGATIVE (files, one prompt per line).
    #[arg(long, num_args = 2, value_names = ["POSITIVE", "NEGATIVE"])]
    pub contrast: Option<Vec<PathBuf>>,
    /// Edit sizes relative to the activation: h' = h + s·‖h‖·v̂ for each s (comma-separated;
    /// negative = the opposite way).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.001,0.01,0.03,0.1",
        allow_hyphen_values = true
    )]
    pub scales: Vec<f64>,
    /// A token whose log-probability change to report (a text that is one token, or id:N;
    /// repeatable).
    #[arg(long = "target", value_name = "TOKEN")]
    pub targets: Vec<String>,
    /// Also write the result as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Arguments of `fisher-stein steer`.
#[derive(Debug, clap::Args)]
pub struct SteerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt: the target is steered as its next token.
    #[arg(long, requires = "target", conflicts_with = "pairs")]
    pub text: Option<String>,
    /// The target token (a text that is one token, or id:N).
    #[arg(long, requires = "text")]
    pub target: Option<String>,
    /// With --text: a contrastive baseline from two prompt files (one prompt per line).
    #[arg(long, num_args = 2, value_names = ["POSITIVE", "NEGATIVE"], requires = "text")]
    pub contrast: Option<Vec<PathBuf>>,
    /// A study file (JSON): {"contrasts": {NAME: {"positive": [...], "negative": [...]}},
    /// "pairs": [{"prompt": ..., "target": ..., "contrast": NAME}, ...]}.
    #[arg(long, value_name = "FILE")]
    pub pairs: Option<PathBuf>,
    /// The target probability every method is steered to (in (0, 1)).
    #[arg(long = "to", value_name = "P", default_value_t = 0.5)]
    pub target_probability: f64,
    /// Methods: euclidean, fisher, contrast (default: all that apply).
    #[arg(long, value_delimiter = ',', value_name = "M,M")]
    pub methods: Option<Vec<MethodName>>,
    /// Damping ρ of the Fisher direction (F + λI)⁻¹g, λ = ρ·gᵀFg/gᵀg; several values (comma-
    /// separated) run one Fisher method each.
    #[arg(long, value_delimiter = ',', default_value = "0.01")]
    pub damping: Vec<f64>,
    /// Largest first-order change of log p(target) per step, in nats.
    #[arg(long, default_value_t = 0.5, value_name = "NATS")]
    pub max_step_nats: f64,
    /// Steps before a method gives up.
    #[arg(long, default_value_t = 100)]
    pub max_steps: usize,
    /// How the Fisher direction is solved: exact (form F = AᵀGA per step, Cholesky; the default)
    /// or cg (conjugate gradients without forming F or G: for models whose V·d² is too large).
    #[arg(long, value_enum, default_value = "exact")]
    pub fisher_solver: SolverName,
    /// --fisher-solver cg: stop at ‖(F+λI)x − g‖ ≤ TOL·‖g‖.
    #[arg(long, default_value_t = 1e-5, value_name = "TOL")]
    pub cg_tolerance: f64,
    /// Results directory: steer.json, rewritten after every pair (a stopped study keeps the
    /// pairs it finished).
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Replace an existing steer.json in --output.
    #[arg(long)]
    pub force: bool,
}

/// A steering method on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodName {
    /// The Euclidean gradient of log p(target).
    Euclidean,
    /// The damped Fisher direction (F + λI)⁻¹g.
    Fisher,
    /// The contrastive steering vector.
    Contrast,
}

/// `--fisher-solver`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SolverName {
    /// Form F per step, Cholesky.
    Exact,
    /// Conjugate gradients on the operator.
    Cg,
}

impl From<SolverName> for fs_estimators::steering::FisherSolver {
    fn from(s: SolverName) -> Self {
        match s {
            SolverName::Exact => Self::Exact,
            SolverName::Cg => Self::ConjugateGradient,
        }
    }
}

/// A study: contrast prompt sets and prompt/target pairs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Study {
    /// What the study is (free text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Named contrast prompt sets.
    #[serde(default)]
    pub contrasts: BTreeMap<String, ContrastSets>,
    /// The prompt/target pairs.
    pub pairs: Vec<StudyPair>,
}

/// Two prompt sets whose mean activation difference is a steering vector.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContrastSets {
    /// Prompts with the concept.
    pub positive: Vec<String>,
    /// Prompts without it.
    pub negative: Vec<String>,
}

/// One prompt and the token to steer toward.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StudyPair {
    /// The prompt.
    pub prompt: String,
    /// The target token (one token's text, or id:N).
    pub target: String,
    /// The name of its contrast sets, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contrast: Option<String>,
}

/// One method's result on one pair (in steer.json).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct MethodResult {
    /// `euclidean`, `fisher`, `fisher(ρ=…)` or `contrast`.
    pub method: String,
    /// ρ of a Fisher method.
    pub damping: Option<f64>,
    /// Whether the target probability was reached.
    pub reached: bool,
    /// Why it stopped short.
    pub stopped: Option<String>,
    /// p(target) at the end.
    pub final_probability: f64,
    /// KL(p ‖ p') of the final edit.
    pub kl: f64,
    /// KL between the renormalised non-target parts.
    pub off_target_kl: f64,
    /// ‖δ‖.
    pub edit_norm: f64,
    /// ‖δ‖ / ‖h‖.
    pub relative_edit_norm: f64,
    /// Directions computed.
    pub steps: usize,
    /// Fisher operator applications (JVP + VJP each).
    pub operator_applications: usize,
    /// Largest relative CG residual.
    pub cg_residual: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The tokens whose probability rose most, besides the target: (token, p before, p after).
    pub raised: Vec<(String, f64, f64)>,
    /// (p(target), KL, off-target KL, ‖δ‖) after each accepted step, from the start.
    pub path: Vec<[f64; 4]>,
}

/// One pair's results (in steer.json).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PairResult {
    /// The prompt.
    pub prompt: String,
    /// The target as given.
    pub target: String,
    /// Its token id.
    pub target_id: u32,
    /// Its contrast set, if any.
    pub contrast: Option<String>,
    /// Prompt length in tokens (the steered position is the last).
    pub tokens: usize,
    /// p(target) before steering.
    pub initial_probability: f64,
    /// ‖h‖ at the steered position.
    pub activation_norm: f64,
    /// One entry per method.
    pub methods: Vec<MethodResult>,
}

/// One method's summary (in steer.json): the comparisons with Fisher are at matched target
/// probabilities ([`summarise`]).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct MethodSummary {
    /// The method.
    pub method: String,
    /// Pairs it reached the target probability on.
    pub reached: usize,
    /// Pairs it was run on.
    pub runs: usize,
    /// Pairs compared with Fisher at the same target probability (see [`summarise`]).
    pub matched: usize,
    /// Of those, the pairs where this method stopped short and Fisher's off-target KL at the
    /// probability it reached was interpolated along Fisher's path.
    #[serde(default)]
    pub interpolated: usize,
    /// Median off-target KL over the matched pairs.
    #[serde(deserialize_with = "crate::results::nan_if_null")]
    pub median_off_target_kl: f64,
    /// Geometric mean over the matched pairs of (this method's off-target KL / Fisher's).
    #[serde(deserialize_with = "crate::results::nan_if_null")]
    pub geomean_ratio_to_fisher: f64,
    /// Of the matched pairs, how many Fisher had the lower off-target KL on.
    pub fisher_lower: usize,
    /// Median ‖δ‖/‖h‖ over the matched pairs.
    #[serde(deserialize_with = "crate::results::nan_if_null")]
    pub median_relative_edit_norm: f64,
}

/// steer.json.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct SteerReport {
    /// Format version.
    pub version: u32,
    /// `--model` as given.
    pub model: String,
    /// HF model type.
    pub model_type: String,
    /// Split layer.
    pub layer: usize,
    /// Its hook name.
    pub hook: String,
    /// Engine.
    pub backend: String,
    /// The target probability.
    pub target_probability: f64,
    /// Max nats per step.
    pub max_step_nats: f64,
    /// Max steps.
    pub max_steps: usize,
    /// `exact` or `cg`.
    pub fisher_solver: String,
    /// CG tolerance of the Fisher direction (`cg`).
    pub cg_tolerance: f64,
    /// The study description.
    pub description: Option<String>,
    /// Per method.
    pub summary: Vec<MethodSummary>,
    /// Per pair.
    pub pairs: Vec<PairResult>,
    /// Seconds of the whole run (after loading).
    pub seconds: f64,
}

/// `fisher-stein edit`.
pub fn run_edit(args: EditArgs, g: &Globals) -> Result<()> {
    if args.vector.is_none() && args.token_difference.is_none() && args.contrast.is_none() {
        bail!("give the direction: --vector FILE, --token-difference A B or --contrast POSITIVE NEGATIVE");
    }
    if args.text.is_none() && args.tokens.is_none() {
        bail!("give the input as --text \"...\" or --tokens 1,2,3");
    }
    if let Some(s) = args.scales.iter().find(|s| !(s.is_finite() && **s != 0.0)) {
        bail!("--scales {s}: every edit size must be a finite non-zero number");
    }
    if let Some(path) = &args.json {
        check_writable_parent(path)?;
    }
    let spec = LoadSpec {
        model: &args.model.model,
        backend: args.model.backend,
        device: &args.model.device,
        batch: None,
    };
    with_model(&spec, g, EditJob { args: &args })
}

/// `fisher-stein steer`.
pub fn run_steer(args: SteerArgs, g: &Globals) -> Result<()> {
    let p = args.target_probability;
    if !(p > 0.0 && p < 1.0) {
        bail!("--to {p}: the target probability must be in (0, 1)");
    }
    if let Some(r) = args.damping.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        bail!("--damping {r}: must be a finite number > 0");
    }
    if !(args.max_step_nats.is_finite() && args.max_step_nats > 0.0) || args.max_steps == 0 {
        bail!("--max-step-nats must be > 0 and --max-steps at least 1");
    }
    if !(args.cg_tolerance.is_finite() && args.cg_tolerance > 0.0 && args.cg_tolerance < 1.0) {
        bail!("--cg-tolerance {}: must be in (0, 1)", args.cg_tolerance);
    }
    let study = match (&args.pairs, &args.text, &args.target) {
        (Some(path), _, _) => read_study(path)?,
        (None, Some(text), Some(target)) => {
            let mut contrasts = BTreeMap::new();
            let contrast = match &args.contrast {
                Some(files) => {
                    let sets = ContrastSets {
                        positive: read_prompts(&files[0])?,
                        negative: read_prompts(&files[1])?,
                    };
                    contrasts.insert("contrast".to_string(), sets);
                    Some("contrast".to_string())
                }
                None => None,
            };
            Study {
                description: None,
                contrasts,
                pairs: vec![StudyPair { prompt: text.clone(), target: target.clone(), contrast }],
            }
        }
        _ => bail!("give a prompt and a target (--text \"...\" --target TOKEN) or a study file (--pairs FILE)"),
    };
    if let Some(methods) = &args.methods {
        if methods.contains(&MethodName::Contrast)
            && study.pairs.iter().any(|p| p.contrast.is_none())
        {
            bail!("--methods contrast needs a contrast for every pair: give --contrast POSITIVE NEGATIVE (or \"contrast\" in each pair of --pairs)");
        }
    }
    if let Some(dir) = &args.output {
        let file = dir.join(STEER_FILE);
        if file.exists() && !args.force {
            bail!(
                "{} exists: pass --force to replace it, or choose another --output",
                file.display()
            );
        }
    }
    let spec = LoadSpec {
        model: &args.model.model,
        backend: args.model.backend,
        device: &args.model.device,
        batch: None,
    };
    with_model(&spec, g, SteerJob { args: &args, study, g })
}

fn check_writable_parent(path: &Path) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("{}: the directory {} does not exist", path.display(), parent.display());
    }
    Ok(())
}

/// Read `DIR/steer.json`, with its summary recomputed from the per-pair results by the current
/// [`summarise`] (so a file written by an older version gets today's comparison).
pub fn read_report(dir: &Path) -> Result<SteerReport> {
    let path = dir.join(STEER_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut r: SteerReport = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a steer.json written by `steer`", path.display()))?;
    r.summary = summarise(&r.pairs);
    Ok(r)
}

/// Read a study file and check it: pairs non-empty, every named contrast defined and non-empty.
pub fn read_study(path: &Path) -> Result<Study> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the study file {}", path.display()))?;
    let study: Study = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow!("{} is not a valid study file: {e}", path.display()))?;
    if study.pairs.is_empty() {
        bail!("{}: \"pairs\" is empty: give at least one prompt/target pair", path.display());
    }
    for (i, pair) in study.pairs.iter().enumerate() {
        if pair.prompt.trim().is_empty() {
            bail!("{}: pair {i} has an empty prompt", path.display());
        }
        if let Some(name) = &pair.contrast {
            let Some(sets) = study.contrasts.get(name) else {
                bail!(
                    "{}: pair {i} names the contrast {name:?}, which \"contrasts\" does not define",
                    path.display()
                );
            };
            if sets.positive.is_empty() || sets.negative.is_empty() {
                bail!(
                    "{}: contrast {name:?} needs at least one positive and one negative prompt",
                    path.display()
                );
            }
        }
    }
    Ok(study)
}

/// Prompts from a file: one per non-empty line.
fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let lines = crate::inputs::read_input_file(path)?;
    if lines.is_empty() {
        bail!("{} has no prompts: give one prompt per line", path.display());
    }
    Ok(lines)
}

/// The tokenizer of a loaded model (the one that came with the weights, else its files').
fn tokenizer(loaded: &Loaded) -> Result<Tokenizer> {
    match &loaded.tokenizer {
        Some(t) => Ok(t.clone()),
        None => Ok(fs_checkpoint::load_tokenizer(&loaded.files.tokenizer)?),
    }
}

/// A prompt's token ids with the tokenizer's special tokens (as `compute` does).
fn encode(tok: &Tokenizer, text: &str, dims: &fs_estimators::ModelDims) -> Result<Vec<u32>> {
    let ids = crate::inputs::token_ids(tok, text, &format!("{text:?}"))?;
    fs_traits::check_tokens(&ids, dims.vocab_size, dims.max_seq_len)
        .with_context(|| format!("prompt {text:?}"))?;
    Ok(ids)
}

/// One token: `id:N`, or a text the tokenizer encodes (without special tokens) as one token.
fn single_token(tok: Option<&Tokenizer>, spec: &str, vocab: usize) -> Result<u32> {
    if let Some(id) = spec.strip_prefix("id:") {
        let id: u32 =
            id.trim().parse().map_err(|_| anyhow!("token {spec:?}: id:N needs a number"))?;
        fs_traits::check_tokens_in_vocab(&[id], vocab)?;
        return Ok(id);
    }
    let tok =
        tok.ok_or_else(|| anyhow!("token {spec:?}: the model has no tokenizer: give id:N"))?;
    let ids = tok
        .encode(spec, false)
        .map_err(|e| anyhow!("tokenizing {spec:?} failed: {e}"))?
        .get_ids()
        .to_vec();
    match ids.as_slice() {
        [id] => Ok(*id),
        _ => bail!(
            "token {spec:?} is {} tokens ({ids:?}), not one: give a text that is a single token (mind the leading space, e.g. \" Paris\") or id:N",
            ids.len()
        ),
    }
}

/// The contrastive vector of `sets` at `layer`.
fn contrast_vector<M: SplitModel>(
    model: &M,
    layer: usize,
    tok: &Tokenizer,
    sets: &ContrastSets,
) -> Result<Vec<f64>> {
    let dims = model.dims();
    let enc = |set: &[String]| -> Result<Vec<Vec<u32>>> {
        set.iter().map(|p| encode(tok, p, &dims)).collect()
    };
    Ok(contrastive_direction(model, layer, &enc(&sets.positive)?, &enc(&sets.negative)?)?)
}

/// A vector of length `d` from a `.npy` or `.safetensors` file.
fn read_vector(path: &Path, name: Option<&str>, d: usize) -> Result<Vec<f64>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read --vector {}", path.display()))?;
    let (shape, data) = if path.extension().is_some_and(|e| e == "npy") {
        let a = crate::npz::parse_npy(&bytes)
            .with_context(|| format!("--vector {}", path.display()))?;
        (a.shape, a.data)
    } else {
        let arrays = crate::results::safetensors_arrays(&bytes).map_err(|e| {
            anyhow!("--vector {} is not a .npy or safetensors file: {e}", path.display())
        })?;
        let found = match name {
            Some(n) => arrays
                .into_iter()
                .find(|(k, _)| k == n)
                .ok_or_else(|| anyhow!("--vector {} has no tensor {n:?}", path.display()))?,
            None if arrays.len() == 1 => arrays.into_iter().next().expect("one tensor"),
            None => bail!(
                "--vector {} holds {} tensors: name one with --vector-name",
                path.display(),
                arrays.len()
            ),
        };
        (found.1.shape, found.1.data)
    };
    if data.len() != d || shape.iter().filter(|&&n| n != 1).count() > 1 {
        bail!(
            "--vector {} has shape {shape:?}: it must be a vector of length d = {d}",
            path.display()
        );
    }
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        bail!("--vector {} has a non-finite value at index {i}", path.display());
    }
    Ok(data)
}

/// `edit` on a loaded model.
struct EditJob<'a> {
    args: &'a EditArgs,
}

/// `edit`'s JSON output.
#[derive(Serialize)]
struct EditReport {
    model: String,
    layer: usize,
    hook: String,
    position: usize,
    direction: String,
    direction_norm: f64,
    activation_norm: f64,
    unit_fisher: f64,
    targets: Vec<String>,
    target_slopes: Vec<f64>,
    steps: Vec<EditStepJson>,
}

#[derive(Serialize)]
struct EditStepJson {
    scale: f64,
    epsilon: f64,
    kl_quadratic: f64,
    kl: f64,
    target_log_prob_change: Vec<(f64, f64)>,
}

impl ModelJob for EditJob<'_> {
    type Output = ();
    fn run<M: SplitModel + 'static>(self, model: M, loaded: Loaded) -> Result<()> {
        let args = self.args;
        let dims = model.dims();
        let layer = args.model.resolve_layer(&dims, &loaded)?;
        // The tokenizer is optional with --tokens and id:N tokens; where text needs it, its own
        // error (missing or unreadable files) is reported.
        let loaded_tokenizer = tokenizer(&loaded);
        let tok = loaded_tokenizer.as_ref().ok();
        let tokens = match (&args.tokens, &args.text) {
            (Some(t), _) => {
                fs_traits::check_tokens(t, dims.vocab_size, dims.max_seq_len)?;
                t.clone()
            }
            (None, Some(text)) => {
                let tok = loaded_tokenizer
                    .as_ref()
                    .map_err(|e| anyhow!("--text needs the model's tokenizer: {e}"))?;
                encode(tok, text, &dims)?
            }
            (None, None) => unreachable!("checked before loading"),
        };
        let len = tokens.len() as i64;
        let position = if args.position < 0 { len + args.position } else { args.position };
        if position < 0 || position >= len {
            bail!("--position {}: the input has {len} tokens (positions 0..{len}, or -1..-{len} from the end)", args.position);
        }
        let position = position as usize;
        let (v, what) = if let Some(path) = &args.vector {
            (
                read_vector(path, args.vector_name.as_deref(), dims.d_model)?,
                format!("vector {}", path.display()),
            )
        } else if let Some(pair) = &args.token_difference {
            let a = single_token(tok, &pair[0], dims.vocab_size)?;
            let b = single_token(tok, &pair[1], dims.vocab_size)?;
            let w = model.unembedding().gather(&[a as usize, b as usize])?;
            let v: Vec<f64> =
                w.row(0).iter().zip(w.row(1)).map(|(x, y)| x.as_f64() - y.as_f64()).collect();
            if dims.readout_dim != dims.d_model {
                bail!("--token-difference needs the unembedding to act on the residual stream (d_u = d)");
            }
            (v, format!("w_{} − w_{}", token_text(tok, a), token_text(tok, b)))
        } else {
            let files = args.contrast.as_ref().expect("checked before loading");
            let tok = loaded_tokenizer
                .as_ref()
                .map_err(|e| anyhow!("--contrast needs the model's tokenizer: {e}"))?;
            let sets = ContrastSets {
                positive: read_prompts(&files[0])?,
                negative: read_prompts(&files[1])?,
            };
            let v = contrast_vector(&model, layer.index, tok, &sets)?;
            (v, format!("contrast mean({}) − mean({})", files[0].display(), files[1].display()))
        };
        let targets: Vec<u32> = args
            .targets
            .iter()
            .map(|t| single_token(tok, t, dims.vocab_size))
            .collect::<Result<_>>()?;
        let ctx = model.lower(&tokens, layer.index)?;
        let cost = edit_cost(&model, &ctx, position, &v, &args.scales, &targets)?;
        let names: Vec<String> = targets.iter().map(|&t| token_text(tok, t)).collect();
        println!(
            "direction: {what}, ‖v‖ = {:.4e}; layer {} ({}), position {position} of {}; ‖h‖ = {:.4e}",
            cost.direction_norm, layer.index, layer.hook, tokens.len(), cost.activation_norm
        );
        println!(
            "v̂ᵀFv̂ = {:.4e}  (unit direction v̂ = v/‖v‖; KL ≈ ½ε²v̂ᵀFv̂ for an edit ε·v̂)",
            cost.unit_fisher
        );
        for (name, slope) in names.iter().zip(&cost.target_slopes) {
            println!("∂ log p({name})/∂ε = {slope:+.4e} per unit step along v̂");
        }
        let mut header =
            format!("{:>9} {:>11} {:>11} {:>11} {:>7}", "s", "ε = s‖h‖", "½ε²v̂ᵀFv̂", "KL", "ratio");
        for name in &names {
            header.push_str(&format!("  Δlog p({name}) pred / meas"));
        }
        println!("{header}");
        for s in &cost.steps {
            let mut line = format!(
                "{:>9.3e} {:>11.4e} {:>11.4e} {:>11.4e} {:>7.3}",
                s.scale,
                s.epsilon,
                s.kl_quadratic,
                s.kl,
                s.kl / s.kl_quadratic
            );
            for (pred, meas) in &s.target_log_prob_change {
                line.push_str(&format!("  {pred:+.4e} / {meas:+.4e}"));
            }
            println!("{line}");
        }
        if let Some(path) = &args.json {
            let report = EditReport {
                model: args.model.model.clone(),
                layer: layer.index,
                hook: layer.hook.clone(),
                position,
                direction: what,
                direction_norm: cost.direction_norm,
                activation_norm: cost.activation_norm,
                unit_fisher: cost.unit_fisher,
                targets: names,
                target_slopes: cost.target_slopes.clone(),
                steps: cost
                    .steps
                    .iter()
                    .map(|s| EditStepJson {
                        scale: s.scale,
                        epsilon: s.epsilon,
                        kl_quadratic: s.kl_quadratic,
                        kl: s.kl,
                        target_log_prob_change: s.target_log_prob_change.clone(),
                    })
                    .collect(),
            };
            write_atomic(path, &pretty_json(&report)?)?;
        }
        Ok(())
    }
}

/// `steer` on a loaded model.
struct SteerJob<'a> {
    args: &'a SteerArgs,
    study: Study,
    g: &'a Globals,
}

impl ModelJob for SteerJob<'_> {
    type Output = ();
    fn run<M: SplitModel + 'static>(self, model: M, loaded: Loaded) -> Result<()> {
        let SteerJob { args, study, g } = self;
        let start = Instant::now();
        let dims = model.dims();
        let layer = args.model.resolve_layer(&dims, &loaded)?;
        let tok = tokenizer(&loaded).context("steer needs the model's tokenizer")?;
        // Methods: as asked, or all that apply to each pair.
        let methods: Vec<MethodName> = args.methods.clone().unwrap_or_else(|| {
            vec![MethodName::Euclidean, MethodName::Fisher, MethodName::Contrast]
        });
        let fisher_label = |rho: f64| {
            if args.damping.len() == 1 {
                "fisher".to_string()
            } else {
                format!("fisher(ρ={rho})")
            }
        };
        let opts = SteeringOptions {
            target_probability: args.target_probability,
            max_step_nats: args.max_step_nats,
            max_steps: args.max_steps,
            cg_tolerance: args.cg_tolerance,
            ..SteeringOptions::default()
        };
        // steer.json after every pair (atomically), so a long study that is stopped keeps
        // what it finished; the last write is the whole study.
        let make_report = |pairs: Vec<PairResult>, start: Instant| SteerReport {
            version: 1,
            model: args.model.model.clone(),
            model_type: loaded.model_type.to_string(),
            layer: layer.index,
            hook: layer.hook.clone(),
            backend: loaded.backend.name().to_string(),
            target_probability: args.target_probability,
            max_step_nats: args.max_step_nats,
            max_steps: args.max_steps,
            fisher_solver: format!("{:?}", args.fisher_solver).to_lowercase(),
            cg_tolerance: args.cg_tolerance,
            description: study.description.clone(),
            summary: summarise(&pairs),
            pairs,
            seconds: start.elapsed().as_secs_f64(),
        };
        let mut contrast_vectors: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut pairs = Vec::with_capacity(study.pairs.len());
        for (i, pair) in study.pairs.iter().enumerate() {
            let tokens = encode(&tok, &pair.prompt, &dims).with_context(|| format!("pair {i}"))?;
            let target = single_token(Some(&tok), &pair.target, dims.vocab_size)
                .with_context(|| format!("pair {i}"))?;
            let ctx = model.lower(&tokens, layer.index)?;
            let t = ctx.seq_len() - 1;
            let h = model.activation(&ctx, t)?;
            let h_norm = h.iter().map(|x| x.as_f64().powi(2)).sum::<f64>().sqrt();
            let z0 = model.logits(&ctx, &[t])?;
            let p0 = fs_estimators::softmax(z0.row(0))?;
            let mut runs: Vec<(String, Option<f64>, SteeringMethod)> = Vec::new();
            for m in &methods {
                match m {
                    MethodName::Euclidean => {
                        runs.push(("euclidean".into(), None, SteeringMethod::Euclidean))
                    }
                    MethodName::Fisher => {
                        for &rho in &args.damping {
                            runs.push((
                                fisher_label(rho),
                                Some(rho),
                                SteeringMethod::Fisher {
                                    damping: rho,
                                    solver: args.fisher_solver.into(),
                                },
                            ));
                        }
                    }
                    MethodName::Contrast => {
                        let Some(name) = &pair.contrast else { continue };
                        if !contrast_vectors.contains_key(name) {
                            let sets = &study.contrasts[name];
                            let v = contrast_vector(&model, layer.index, &tok, sets)
                                .with_context(|| format!("contrast {name:?}"))?;
                            contrast_vectors.insert(name.clone(), v);
                        }
                        runs.push((
                            "contrast".into(),
                            None,
                            SteeringMethod::Fixed(contrast_vectors[name].clone()),
                        ));
                    }
                }
            }
            let mut results = Vec::with_capacity(runs.len());
            for (label, damping, method) in runs {
                crate::signals::check_interrupt()?;
                let clock = Instant::now();
                let path = steer(&model, &ctx, t, target, &method, &opts).with_context(|| {
                    format!("pair {i} ({:?} → {:?}), method {label}", pair.prompt, pair.target)
                })?;
                let seconds = clock.elapsed().as_secs_f64();
                let raised = raised_tokens(&path, target, &tok)?;
                g.log(&format!(
                    "pair {i} {label}: reached {} in {} steps, off-target KL {:.4e}, {seconds:.2} s",
                    path.reached, path.steps, path.off_target_kl
                ));
                results.push(method_result(label, damping, &path, seconds, raised));
            }
            pairs.push(PairResult {
                prompt: pair.prompt.clone(),
                target: pair.target.clone(),
                target_id: target,
                contrast: pair.contrast.clone(),
                tokens: tokens.len(),
                initial_probability: p0[target as usize],
                activation_norm: h_norm,
                methods: results,
            });
            if let Some(dir) = &args.output {
                std::fs::create_dir_all(dir).with_context(|| {
                    format!("cannot create the output directory {}", dir.display())
                })?;
                let partial = make_report(pairs.clone(), start);
                write_atomic(&dir.join(STEER_FILE), &pretty_json(&partial)?)?;
            }
        }
        let report = make_report(pairs, start);
        print!("{}", steer_table(&report));
        if let Some(dir) = &args.output {
            write_atomic(&dir.join(STEER_FILE), &pretty_json(&report)?)?;
        }
        Ok(())
    }
}

/// The 5 tokens other than the target whose probability the final edit raised most (from the
/// logits `steer` computed its KLs from).
fn raised_tokens(
    path: &SteeringPath,
    target: u32,
    tok: &Tokenizer,
) -> Result<Vec<(String, f64, f64)>> {
    let p0 = fs_estimators::softmax(&path.logits[0])?;
    let p1 = fs_estimators::softmax(&path.logits[1])?;
    let mut order: Vec<usize> = (0..p0.len()).filter(|&y| y != target as usize).collect();
    order.sort_by(|&a, &b| (p1[b] - p0[b]).total_cmp(&(p1[a] - p0[a])));
    Ok(order.into_iter().take(5).map(|y| (token_text(Some(tok), y as u32), p0[y], p1[y])).collect())
}

fn method_result(
    method: String,
    damping: Option<f64>,
    path: &SteeringPath,
    seconds: f64,
    raised: Vec<(String, f64, f64)>,
) -> MethodResult {
    MethodResult {
        method,
        damping,
        reached: path.reached,
        stopped: path.stopped.clone(),
        final_probability: path.final_probability,
        kl: path.kl,
        off_target_kl: path.off_target_kl,
        edit_norm: path.edit_norm,
        relative_edit_norm: path.relative_edit_norm,
        steps: path.steps,
        operator_applications: path.operator_applications,
        cg_residual: path.cg_residual,
        seconds,
        raised,
        path: path
            .path
            .iter()
            .map(|p| [p.target_probability, p.kl, p.off_target_kl, p.edit_norm])
            .collect(),
    }
}

fn median(mut x: Vec<f64>) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.sort_by(f64::total_cmp);
    let n = x.len();
    if n % 2 == 1 {
        x[n / 2]
    } else {
        0.5 * (x[n / 2 - 1] + x[n / 2])
    }
}

/// Fisher's off-target KL at target probability `q` along its recorded path: linear in `log p`
/// between the two steps that bracket `q` (the cost grows about quadratically in the gain, so
/// this over-estimates Fisher's cost: conservative for the comparison). `None` when the path
/// does not pass `q` or `q` is the starting probability.
fn off_target_along(path: &[[f64; 4]], q: f64) -> Option<f64> {
    let lq = q.ln();
    let first = path.first()?[0].ln();
    if (lq - first).abs() < 1e-3 {
        return None;
    }
    path.windows(2).find_map(|w| {
        let (a, b) = (w[0][0].ln(), w[1][0].ln());
        if (lq - a) * (lq - b) > 0.0 || a == b {
            return None;
        }
        Some(w[0][2] + (w[1][2] - w[0][2]) * (lq - a) / (b - a))
    })
}

/// One pair of a method's comparison with Fisher: its off-target KL and edit size, Fisher's
/// off-target KL at the same target probability, and whether that came from Fisher's path
/// (interpolated).
pub struct Matched {
    /// The method's off-target KL.
    pub off_target_kl: f64,
    /// Its ‖δ‖/‖h‖.
    pub relative_edit_norm: f64,
    /// Fisher's off-target KL at the same target probability (`None` without a Fisher method).
    pub fisher: Option<f64>,
    /// Whether `fisher` was interpolated along Fisher's path.
    pub interpolated: bool,
}

/// The pairs on which `method` is compared with the Fisher method `fisher` at the same target
/// probability (see [`summarise`]); without a Fisher method, the pairs `method` reached.
pub fn matched_pairs(pairs: &[PairResult], method: &str, fisher: Option<&str>) -> Vec<Matched> {
    fn get<'a>(p: &'a PairResult, n: &str) -> Option<&'a MethodResult> {
        p.methods.iter().find(|m| m.method == n)
    }
    pairs
        .iter()
        .filter_map(|p| {
            let m = get(p, method)?;
            let entry = |fisher, interpolated| Matched {
                off_target_kl: m.off_target_kl,
                relative_edit_norm: m.relative_edit_norm,
                fisher,
                interpolated,
            };
            let Some(f) = fisher else {
                return m.reached.then(|| entry(None, false));
            };
            let f = get(p, f).filter(|f| f.reached)?;
            if m.reached {
                return Some(entry(Some(f.off_target_kl), false));
            }
            let moved = (m.final_probability / p.initial_probability).ln()
                * (f.final_probability / p.initial_probability).ln();
            if moved <= 0.0 {
                return None;
            }
            off_target_along(&f.path, m.final_probability).map(|x| entry(Some(x), true))
        })
        .collect()
}

/// Per method: how often it reached the target, and over the matched pairs the median
/// off-target KL, the geometric mean of its ratio to the first Fisher method's and how often
/// Fisher's was lower. A pair is matched when the method and Fisher both reached the target
/// probability, or — for a method that stopped short after moving the target the requested way
/// (a contrastive vector that cannot reach it) — when Fisher's path passed the probability the
/// method did reach: Fisher's off-target KL there is interpolated along its path
/// (linear in `log p` between the two steps of Fisher's path that bracket it).
pub fn summarise(pairs: &[PairResult]) -> Vec<MethodSummary> {
    let mut names: Vec<String> = Vec::new();
    for p in pairs {
        for m in &p.methods {
            if !names.contains(&m.method) {
                names.push(m.method.clone());
            }
        }
    }
    let fisher = names.iter().find(|n| n.starts_with("fisher")).cloned();
    names
        .iter()
        .map(|n| {
            let runs: Vec<&MethodResult> =
                pairs.iter().filter_map(|p| p.methods.iter().find(|m| &m.method == n)).collect();
            let matched = matched_pairs(pairs, n, fisher.as_deref());
            let logs: Vec<f64> = matched
                .iter()
                .filter_map(|m| Some((m.off_target_kl / m.fisher?).ln()))
                .filter(|x| x.is_finite())
                .collect();
            let geomean = if logs.is_empty() {
                f64::NAN
            } else {
                (logs.iter().sum::<f64>() / logs.len() as f64).exp()
            };
            MethodSummary {
                method: n.clone(),
                reached: runs.iter().filter(|m| m.reached).count(),
                runs: runs.len(),
                matched: matched.len(),
                interpolated: matched.iter().filter(|m| m.interpolated).count(),
                median_off_target_kl: median(matched.iter().map(|m| m.off_target_kl).collect()),
                geomean_ratio_to_fisher: geomean,
                fisher_lower: matched
                    .iter()
                    .filter(|m| m.fisher.is_some_and(|f| f < m.off_target_kl))
                    .count(),
                median_relative_edit_norm: median(
                    matched.iter().map(|m| m.relative_edit_norm).collect(),
                ),
            }
        })
        .collect()
}

/// The table `steer` prints: per pair and method, then the summary.
pub fn steer_table(r: &SteerReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "steering to p(target) = {} at layer {} ({}), {} pair(s); off-target KL = KL between the renormalised non-target distributions",
        r.target_probability,
        r.layer,
        r.hook,
        r.pairs.len()
    );
    let _ = writeln!(
        s,
        "{:>4} {:<34} {:<12} {:>9}  method: off-target KL (‖δ‖/‖h‖, steps)",
        "pair", "prompt", "target", "p before"
    );
    for (i, p) in r.pairs.iter().enumerate() {
        let prompt: String = p.prompt.chars().take(32).collect();
        let mut line = format!(
            "{i:>4} {:<34} {:<12} {:>9.3e} ",
            format!("{prompt:?}"),
            format!("{:?}", p.target),
            p.initial_probability
        );
        for m in &p.methods {
            if m.reached {
                let _ = write!(
                    line,
                    " {}: {:.3e} ({:.3}, {})",
                    m.method, m.off_target_kl, m.relative_edit_norm, m.steps
                );
            } else {
                let _ = write!(
                    line,
                    " {}: stopped at p = {:.2e}, {:.3e} ({:.3}, {})",
                    m.method, m.final_probability, m.off_target_kl, m.relative_edit_norm, m.steps
                );
            }
        }
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(
        s,
        "summary, each method against Fisher at the same target probability (both reached it, or interpolated along Fisher's path at the probability a method stopped at):"
    );
    let _ = writeln!(
        s,
        "{:<16} {:>8} {:>12} {:>14} {:>18} {:>14} {:>12}",
        "method",
        "reached",
        "matched (i)",
        "median off-KL",
        "geomean ÷ fisher",
        "fisher lower",
        "median ‖δ‖/‖h‖"
    );
    for m in &r.summary {
        let _ = writeln!(
            s,
            "{:<16} {:>8} {:>12} {:>14.4e} {:>18.3} {:>14} {:>12.4}",
            m.method,
            format!("{}/{}", m.reached, m.runs),
            format!("{} ({})", m.matched, m.interpolated),
            m.median_off_target_kl,
            m.geomean_ratio_to_fisher,
            format!("{}/{}", m.fisher_lower, m.matched),
            m.median_relative_edit_norm
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(method: &str, reached: bool, off: f64) -> MethodResult {
        MethodResult {
            method: method.into(),
            damping: None,
            reached,
            stopped: None,
            final_probability: 0.3,
            kl: off,
            off_target_kl: off,
            edit_norm: 1.0,
            relative_edit_norm: off * 10.0,
            steps: 1,
            operator_applications: 0,
            cg_residual: 0.0,
            seconds: 0.0,
            raised: vec![],
            path: vec![],
        }
    }

    fn pair(methods: Vec<MethodResult>) -> PairResult {
        PairResult {
            prompt: "p".into(),
            target: "t".into(),
            target_id: 0,
            contrast: None,
            tokens: 1,
            initial_probability: 0.1,
            activation_norm: 1.0,
            methods,
        }
    }

    #[test]
    fn the_summary_compares_each_method_with_fisher_on_the_pairs_both_reached() {
        let pairs = vec![
            pair(vec![
                run("euclidean", true, 0.4),
                run("fisher", true, 0.1),
                run("contrast", false, 9.0),
            ]),
            pair(vec![
                run("euclidean", true, 0.2),
                run("fisher", true, 0.2),
                run("contrast", true, 0.8),
            ]),
            pair(vec![
                run("euclidean", true, 5.0),
                run("fisher", false, 0.0),
                run("contrast", true, 0.1),
            ]),
        ];
        let s = summarise(&pairs);
        let (e, f, c) = (&s[0], &s[1], &s[2]);
        assert_eq!((e.method.as_str(), e.reached, e.runs, e.matched), ("euclidean", 3, 3, 2));
        // Ratios 4 and 1: geometric mean 2; Fisher strictly lower on one pair.
        assert!((e.geomean_ratio_to_fisher - 2.0).abs() < 1e-12);
        assert_eq!(e.fisher_lower, 1);
        assert!((e.median_off_target_kl - 0.3).abs() < 1e-12);
        assert_eq!((f.matched, f.fisher_lower), (2, 0));
        assert!((f.geomean_ratio_to_fisher - 1.0).abs() < 1e-12);
        // The contrast reached pairs 1 and 2, Fisher only 1 of those.
        assert_eq!((c.reached, c.matched, c.fisher_lower), (2, 1, 1));
        assert!((c.geomean_ratio_to_fisher - 4.0).abs() < 1e-12);
        assert!((c.median_relative_edit_norm - 8.0).abs() < 1e-12);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn a_method_that_stops_short_is_compared_with_fisher_at_the_probability_it_reached() {
        let path = vec![[0.1, 0.0, 0.0, 0.0], [0.15, 0.05, 0.04, 1.0], [0.3, 0.2, 0.1, 2.0]];
        let want = 0.04 + 0.06 * (0.2f64 / 0.15).ln() / 2f64.ln();
        assert!((off_target_along(&path, 0.2).unwrap() - want).abs() < 1e-15);
        assert_eq!(off_target_along(&path, 0.35), None);
        assert_eq!(off_target_along(&path, 0.1), None);
        let mut fisher = run("fisher", true, 0.1);
        fisher.path = path;
        let mut short = run("contrast", false, 0.5);
        short.final_probability = 0.2;
        let mut wrong_way = run("contrast", false, 0.5);
        wrong_way.final_probability = 0.05;
        let pairs = vec![pair(vec![fisher.clone(), short]), pair(vec![fisher, wrong_way])];
        let s = summarise(&pairs);
        let c = &s[1];
        assert_eq!((c.reached, c.matched, c.interpolated, c.fisher_lower), (0, 1, 1, 1));
        assert!((c.geomean_ratio_to_fisher - 0.5 / want).abs() < 1e-12);
    }
}
