//! `fisher-stein compute`: Fisher matrices of a model at one or more layers, for chosen positions
//! of one or more texts.
//!
//! Everything the user gave is checked (model, tokenizer, every document, layers, positions,
//! estimator options) before the results directory is created. Then each sequence's results go
//! to their own file, written atomically; `metadata.json` is written last. A killed run leaves
//! only complete files and continues with `--resume` without recomputing them.

use crate::backends::{with_model, Backend, LoadSpec, Loaded, ModelJob};
use crate::inputs::{read_input_file, truncate, Document};
use crate::npz::npz_bytes;
use crate::output::{
    check_output_dir, create_results_dir, lock_output, remove_stale_temporaries, safetensors_bytes,
    write_atomic, ExistingDir, OwnedTensor, RUN_FILE,
};
use crate::positions::PositionSpec;
use crate::Globals;
use anyhow::{anyhow, bail, Context, Result};
use fs_checkpoint::{ModelFiles, ModelOrigin};
use fs_estimators::{
    closed_form_fisher_at, entropy, exact_fisher, exact_fisher_with_jacobians, predictive_fisher,
    sampled_fisher, softmax, spectrum, Element, ExactOptions, FsError, GradientKind, Matrix,
    PredictiveOptions, SampledOptions, SamplingOptions, SplitModel,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
}

impl Estimator {
    fn name(self) -> &'static str {
        match self {
            Estimator::Exact => "exact",
            Estimator::Sampled => "sampled",
            Estimator::ClosedForm => "closed-form",
            Estimator::Predictive => "predictive",
        }
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

/// Arguments of `fisher-stein compute`.
#[derive(Debug, clap::Args)]
pub struct ComputeArgs {
    /// Model: a directory with config.json + safetensors, or a hub id in the local HF cache.
    #[arg(long, alias = "model_name", value_name = "PATH_OR_ID")]
    pub model: String,
    /// Split layer k: 0 = embeddings, n_layer = last block before the final norm.
    #[arg(
        long,
        alias = "layer_idx",
        value_name = "K",
        conflicts_with = "layers",
        required_unless_present = "layers"
    )]
    pub layer: Option<usize>,
    /// Several split layers sharing one forward pass: K,K,... or all.
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
    #[arg(long, default_value = "last")]
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
    /// Draws per position: sampled estimator (default 10) or predictive average (default 50).
    #[arg(long, alias = "num_samples", alias = "num-samples", value_name = "S")]
    pub samples: Option<usize>,
    /// Seed of every random draw (position t uses stream t); recorded in metadata.json.
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
    pub readouts: crate::readouts::ReadoutArgs,
}

impl ComputeArgs {
    fn samples(&self) -> usize {
        self.samples.unwrap_or(match self.estimator {
            Estimator::Predictive => 50,
            _ => 10,
        })
    }

    fn sampling(&self) -> SamplingOptions {
        SamplingOptions { temperature: self.temperature, top_p: self.top_p }
    }

    /// Checks that need no model.
    fn validate(&self) -> Result<()> {
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
        if self.eig_top == Some(0) {
            bail!("--eig-top 0 keeps no eigenpairs: give at least 1, or drop the flag");
        }
        self.readouts.validate(self.estimator.name())
    }

    /// The estimator's settings, as recorded in run.json / metadata.json.
    fn estimator_json(&self) -> serde_json::Value {
        let biased = !self.sampling().is_unbiased();
        match self.estimator {
            Estimator::Sampled => json!({
                "name": "sampled", "samples": self.samples(), "seed": self.seed,
                "temperature": self.temperature, "top_p": self.top_p, "biased": biased,
            }),
            Estimator::Predictive => json!({
                "name": "predictive", "draws": self.samples(), "seed": self.seed,
                "temperature": self.temperature, "top_p": self.top_p,
                "note": "mean exact Fisher at position t+1 over next input tokens drawn at t",
            }),
            e => json!({"name": e.name(), "biased": false}),
        }
    }
}

/// Resolve `--layer` / `--layers` against the model's `n_layers`.
fn resolve_layers(args: &ComputeArgs, n_layers: usize) -> Result<Vec<usize>> {
    let layers: Vec<usize> = match (&args.layer, &args.layers) {
        (Some(k), _) => vec![*k],
        (None, Some(s)) if s.trim() == "all" => (0..=n_layers).collect(),
        (None, Some(s)) => s
            .split(',')
            .map(|x| {
                x.trim().parse::<usize>().map_err(|e| {
                    anyhow!("invalid layer {x:?} in --layers {s:?} ({e}): use K,K,... or all")
                })
            })
            .collect::<Result<_>>()?,
        (None, None) => bail!("give --layer K or --layers K,K|all"),
    };
    for &k in &layers {
        fs_traits::check_layer(k, n_layers)?;
    }
    let mut sorted = layers.clone();
    sorted.sort_unstable();
    sorted.dedup();
    Ok(sorted)
}

/// JSON description of where the model files came from.
pub fn origin_json(files: &ModelFiles) -> serde_json::Value {
    match &files.origin {
        ModelOrigin::LocalDir { dir } => json!({"kind": "local_dir", "dir": dir}),
        ModelOrigin::HubCache { repo_id, revision, commit, snapshot_dir } => json!({
            "kind": "hf_cache", "repo_id": repo_id, "revision": revision, "commit": commit,
            "snapshot_dir": snapshot_dir,
        }),
    }
}

/// Tokenise / collect the documents the user gave.
fn documents(args: &ComputeArgs, run: &RunInfo<'_>) -> Result<Vec<Document>> {
    let texts: Vec<String> = match (&args.tokens, &args.text, &args.input) {
        (Some(t), _, _) => {
            if t.is_empty() {
                bail!("--tokens is empty: give at least one token id");
            }
            return Ok(vec![Document { index: 0, tokens: t.clone(), text: None, truncated: 0 }]);
        }
        (None, Some(text), _) => {
            if text.trim().is_empty() {
                bail!("--text is empty: give some text to analyse");
            }
            vec![text.clone()]
        }
        (None, None, Some(path)) => read_input_file(path)?,
        (None, None, None) => {
            bail!("give the input as --text \"...\", --input FILE or --tokens 1,2,3")
        }
    };
    let start = args.start_sequence;
    if start >= texts.len() {
        bail!("--start-sequence {start} skips every document: the input has {}", texts.len());
    }
    let take = args.num_sequences.unwrap_or(usize::MAX);
    let tok = match &run.tokenizer {
        Some(t) => t.clone(),
        None => fs_checkpoint::load_tokenizer(&run.files.tokenizer)?,
    };
    texts
        .into_iter()
        .enumerate()
        .skip(start)
        .take(take)
        .map(|(i, text)| {
            let ids = tok
                .encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing document {i} failed: {e}"))?
                .get_ids()
                .to_vec();
            if ids.is_empty() {
                bail!("document {i} has no tokens after tokenization: give non-empty text");
            }
            Ok(Document { index: i, tokens: ids, text: Some(text), truncated: 0 })
        })
        .collect()
}

/// The positions of one document: `--positions`, then `--position-skip`, then `--max-positions`.
fn select_positions(args: &ComputeArgs, len: usize) -> Result<Vec<usize>> {
    let all = args.positions.resolve(len)?;
    let k = args.position_skip;
    let mut kept: Vec<usize> = all.iter().copied().skip(k - 1).step_by(k).collect();
    if let Some(m) = args.max_positions {
        kept.truncate(m);
    }
    if kept.is_empty() {
        bail!(
            "--positions {:?} with --position-skip {k} selects no position of a {len}-token sequence: lower the skip",
            args.positions
        );
    }
    Ok(kept)
}

/// The results file of sequence `i` (`fisher.EXT` when the run has a single text).
fn sequence_file(i: usize, single: bool, format: Format) -> String {
    let ext = match format {
        Format::Safetensors => "safetensors",
        Format::Npz => "npz",
    };
    if single {
        format!("fisher.{ext}")
    } else {
        format!("fisher_seq_{i:06}.{ext}")
    }
}

/// Run `compute`.
pub fn run(args: ComputeArgs, g: &Globals) -> Result<()> {
    args.validate()?;
    // Held until the run ends (however it ends): no second run writes into this directory.
    let _lock = lock_output(&args.output)?;
    let existing = if args.resume {
        ExistingDir::Resume
    } else if args.force {
        ExistingDir::Replace
    } else {
        ExistingDir::Refuse
    };
    let resuming = check_output_dir(&args.output, existing)?;
    if resuming {
        // Only in a directory this tool wrote (it holds run.json) and under the lock: the
        // temporaries a killed run left behind.
        remove_stale_temporaries(&args.output)?;
        remove_stale_temporaries(&args.output.join(".state"))?;
    }
    let spec = LoadSpec {
        model: &args.model,
        backend: args.backend,
        device: &args.device,
        batch: args.batch_size,
    };
    with_model(&spec, g, ComputeJob { args: &args, g, resuming })
}

/// `compute` on a loaded model.
struct ComputeJob<'a> {
    args: &'a ComputeArgs,
    g: &'a Globals,
    resuming: bool,
}

impl ModelJob for ComputeJob<'_> {
    type Output = ();
    fn run<M: SplitModel + 'static>(self, model: M, loaded: Loaded) -> Result<()>
    where
        M::Scalar: Element,
    {
        let model = &model;
        self.g.log(&format!(
            "loaded {} parameters on {} {} in {:.2} s",
            loaded.parameters,
            loaded.backend.name(),
            loaded.device,
            loaded.load_s
        ));
        let run = RunInfo {
            files: &loaded.files,
            tokenizer: loaded.tokenizer,
            arch: loaded.arch,
            backend: loaded.backend.name(),
            device: loaded.device,
            load_s: loaded.load_s,
        };
        run_with(model, &run, self.args, self.g, self.resuming)
    }
}

/// What the metadata needs to know about the model run.
struct RunInfo<'a> {
    files: &'a ModelFiles,
    /// A tokenizer that came with the weights (GGUF metadata), if any.
    tokenizer: Option<fs_checkpoint::tokenizers::Tokenizer>,
    arch: &'static str,
    backend: &'static str,
    device: String,
    load_s: f64,
}

/// One computed matrix.
struct Entry {
    layer: usize,
    position: usize,
    fisher: Matrix<f64>,
    entropy: f64,
    draws: Option<Vec<u32>>,
    readout: Option<crate::readouts::Readout>,
}

/// One position's estimate: the Fisher matrix, the sampled tokens (sampled and predictive
/// estimators) and, for the exact estimator with `--directions`, the readout Jacobian `A_t` it
/// was built from (reused by the read-outs instead of computed twice).
type Estimate<S> = (Matrix<f64>, Option<Vec<u32>>, Option<Matrix<S>>);

fn estimate<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    positions: &[usize],
    args: &ComputeArgs,
) -> Result<Vec<Estimate<M::Scalar>>>
where
    M::Scalar: Element,
{
    let opts = ExactOptions::default();
    Ok(match args.estimator {
        Estimator::Exact if args.readouts.directions > 0 => {
            exact_fisher_with_jacobians(model, ctx, positions, &opts)?
                .into_iter()
                .map(|e| (e.fisher, None, Some(e.jacobian)))
                .collect()
        }
        Estimator::Exact => exact_fisher(model, ctx, positions, &opts)?
            .into_iter()
            .map(|f| (f, None, None))
            .collect(),
        Estimator::ClosedForm => {
            closed_form_fisher_at(model, ctx, positions, GradientKind::Logits, &opts)?
                .into_iter()
                .map(|f| (f, None, None))
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
                .map(|s| (s.fisher, Some(s.tokens), None))
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
                    predictive_fisher(model, ctx, t, &o).map(|p| (p.fisher, Some(p.tokens), None))
                })
                .collect::<Result<_, FsError>>()?
        }
    })
}

fn run_with<M: SplitModel>(
    model: &M,
    run: &RunInfo<'_>,
    args: &ComputeArgs,
    g: &Globals,
    resuming: bool,
) -> Result<()>
where
    M::Scalar: Element,
{
    let t_start = Instant::now();
    let dims = model.dims();
    let layers = resolve_layers(args, dims.n_layers)?;
    let mut docs = documents(args, run)?;
    if let Some(warning) = crate::dataset::select_shard(&mut docs, args.readouts.shard) {
        if !g.quiet {
            eprintln!("{warning}");
        }
    }
    g.log(&format!("{} document(s) tokenized", docs.len()));
    truncate(&mut docs, args.max_seq_len);
    let mut plan = Vec::with_capacity(docs.len());
    for d in &docs {
        let i = d.index;
        if d.truncated > 0 && !g.quiet {
            eprintln!(
                "warning: document {i} truncated to {} tokens (--max-seq-len), {} dropped",
                d.tokens.len(),
                d.truncated
            );
        }
        match fs_traits::check_tokens(&d.tokens, dims.vocab_size, dims.max_seq_len) {
            Err(FsError::SequenceTooLong { len, max }) => bail!(
                "document {i} has {len} tokens but the model accepts at most {max}: pass --max-seq-len {max} to truncate, or shorten the text"
            ),
            other => other.with_context(|| format!("document {i}"))?,
        }
        let positions = select_positions(args, d.tokens.len())?;
        if args.estimator == Estimator::Predictive {
            if let (Some(max), Some(&t)) = (dims.max_seq_len, positions.last()) {
                if t + 2 > max {
                    bail!("the predictive estimator at position {t} of document {i} appends a token at position {}, beyond the model's {max} positions: use --max-seq-len {} or earlier positions", t + 1, max - 1);
                }
            }
        }
        plan.push(positions);
    }
    let d = dims.d_model;
    let eig_rank = if args.eig { Some(d) } else { args.eig_top.map(|k| k.min(d)) };
    // --directions K stores (at least) the top K eigenpairs its read-outs refer to.
    let eig_rank = match args.readouts.directions.min(d) {
        0 => eig_rank,
        k => Some(eig_rank.unwrap_or(k).max(k)),
    };

    // Settings that make two runs the same run (checked by --resume).
    let settings = json!({
        "model": args.model,
        "layers": layers,
        "estimator": args.estimator_json(),
        "positions": plan,
        "token_ids": docs.iter().map(|d| &d.tokens).collect::<Vec<_>>(),
        "eig_rank": eig_rank,
        "format": format!("{:?}", args.format),
        "readouts": args.readouts.settings_json(),
    });
    let run_path = args.output.join(RUN_FILE);
    if resuming {
        let recorded: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&run_path).with_context(|| format!("reading {}", run_path.display()))?,
        )
        .with_context(|| format!("{} is corrupt: re-run with --force", run_path.display()))?;
        if recorded != settings {
            bail!(
                "--resume: {} was started with different settings (model, layers, estimator, positions, inputs or format): rerun with the original flags, or use --force to start over",
                args.output.display()
            );
        }
    } else {
        create_results_dir(&args.output, args.force)?;
        write_atomic(&run_path, &serde_json::to_vec_pretty(&settings)?)?;
    }

    let total: usize = plan.iter().map(|p| p.len() * layers.len()).sum();
    let bar = g.progress(total as u64);
    let mut summaries = Vec::new();
    let mut failed: Vec<serde_json::Value> = Vec::new();
    let mut sequences = Vec::new();
    let mut skipped = 0usize;
    let t_compute = Instant::now();
    let single = docs.len() == 1 && args.input.is_none();
    let tokenizer =
        run.tokenizer.clone().or_else(|| fs_checkpoint::load_tokenizer(&run.files.tokenizer).ok());
    let decode = |id: u32| crate::readouts::token_text(tokenizer.as_ref(), id);
    let mut mean =
        crate::dataset::start_mean(args, args.estimator_json(), run.files, &layers, d, resuming)?;
    let mut last_checkpoint = Instant::now();
    for (k, doc) in docs.iter().enumerate() {
        let i = doc.index;
        let file = sequence_file(i, single, args.format);
        let path = args.output.join(&file);
        let state_path = sequence_state_file(&args.output, i);
        sequences.push(json!({
            "index": i, "file": (!args.readouts.mean_only).then_some(&file), "n_tokens": doc.tokens.len(), "truncated_tokens": doc.truncated,
            "text_preview": doc.text.as_deref().map(|t| t.chars().take(200).collect::<String>()),
        }));
        // With --mean, a sequence already in the accumulator's checkpoint is never added again.
        // A sequence is finished once its state file (summaries, failures) is written: that
        // happens after its results file and before the accumulator's checkpoint records it.
        let in_mean = mean.as_ref().is_some_and(|m| m.sequences.contains(&i));
        let done = state_path.exists()
            && match &mean {
                Some(_) => in_mean && (args.readouts.mean_only || path.exists()),
                None => path.exists(),
            };
        if resuming && done {
            let state = SequenceState::read(&state_path)?;
            summaries.extend(state.summaries);
            failed.extend(state.failed);
            skipped += 1;
            bar.inc((plan[k].len() * layers.len()) as u64);
            g.log(&format!("sequence {i}: {file} exists, skipped (--resume)"));
            continue;
        }
        let first_summary = summaries.len();
        let first_failure = failed.len();
        let mut fail = |layer: usize, t: usize, e: anyhow::Error| -> Result<()> {
            record_failure(i, layer, t, e, args.fail_fast, g, &mut failed)
        };
        let contexts = match model.lower_layers(&doc.tokens, &layers) {
            Ok(c) => c,
            Err(e) if is_numerical_fs(&e) => {
                // The forward pass itself broke down: every requested position of this
                // sequence fails.
                let e = anyhow::Error::from(e);
                for &layer in &layers {
                    for &t in &plan[k] {
                        fail(layer, t, anyhow::anyhow!("{e:#}"))?;
                    }
                }
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
        let mut entries = Vec::new();
        for (ctx, &layer) in contexts.iter().zip(&layers) {
            // Logits of every position at once; position by position when one is not finite.
            let logits = match model.logits(ctx, &plan[k]) {
                Ok(l) if l.as_slice().iter().all(|&x| fs_traits::Scalar::as_f64(x).is_finite()) => {
                    Some(l)
                }
                Ok(_) => None,
                Err(e) if is_numerical_fs(&e) => None,
                Err(e) => return Err(e.into()),
            };
            let chunk = args.batch_size.unwrap_or(1).max(1);
            for (c, positions) in plan[k].chunks(chunk).enumerate() {
                // A batch that meets a non-finite value is retried position by position, so
                // that one bad position does not fail its neighbours.
                let results: Vec<Result<Estimate<M::Scalar>>> =
                    match estimate(model, ctx, positions, args) {
                        Ok(v) => v.into_iter().map(Ok).collect(),
                        Err(e) if is_numerical(&e) && positions.len() > 1 => positions
                            .iter()
                            .map(|&t| estimate(model, ctx, &[t], args).map(|mut v| v.remove(0)))
                            .collect(),
                        Err(e) if is_numerical(&e) => vec![Err(e)],
                        Err(e) => return Err(e),
                    };
                for (j, (result, &t)) in results.into_iter().zip(positions).enumerate() {
                    let entry = (|| -> Result<Entry> {
                        let (fisher, draws, jacobian) = result?;
                        if let Some(bad) = fisher.as_slice().iter().position(|x| !x.is_finite()) {
                            return Err(FsError::NonFinite {
                                what: "the Fisher matrix".into(),
                                index: bad,
                                value: fisher.as_slice()[bad],
                            }
                            .into());
                        }
                        let p = match &logits {
                            Some(l) => softmax(l.row(c * chunk + j))?,
                            None => softmax(model.logits(ctx, &[t])?.row(0))?,
                        };
                        let readout = (args.readouts.directions > 0)
                            .then(|| {
                                crate::readouts::readout(
                                    model,
                                    ctx,
                                    t,
                                    &fisher,
                                    jacobian.as_ref(),
                                    &args.readouts,
                                )
                            })
                            .transpose()?;
                        Ok(Entry {
                            layer,
                            position: t,
                            fisher,
                            entropy: entropy(&p),
                            draws,
                            readout,
                        })
                    })();
                    let e = match entry {
                        Ok(e) => e,
                        Err(e) if is_numerical(&e) => {
                            fail(layer, t, e)?;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if let Some(m) = mean.as_mut().filter(|_| !in_mean) {
                        m.layer_mut(layer)?.add(&e.fisher, e.entropy)?;
                    }
                    if args.readouts.mean_only {
                        // Nothing per position is kept: summarise now, drop the matrix.
                        summarise(i, doc, &e, 5, &mut summaries, g, &decode)?;
                    } else {
                        entries.push(e);
                    }
                }
                bar.inc(positions.len() as u64);
            }
        }
        if !args.readouts.mean_only {
            let bytes =
                sequence_results(i, doc, &entries, d, eig_rank, args, &mut summaries, g, &decode)?;
            write_atomic(&path, &bytes)?;
            g.log(&format!("sequence {i}: wrote {file}"));
        }
        SequenceState {
            summaries: summaries[first_summary..].to_vec(),
            failed: failed[first_failure..].to_vec(),
        }
        .write(&state_path)?;
        if let Some(m) = mean.as_mut().filter(|_| !in_mean) {
            m.sequences.push(i);
            // Checkpoint the accumulator (for --resume) at most every --checkpoint-secs;
            // always at the end.
            if last_checkpoint.elapsed().as_secs_f64() >= args.checkpoint_secs {
                m.write(&args.output)?;
                last_checkpoint = Instant::now();
            }
        }
    }
    bar.finish_and_clear();
    let layer_summary = crate::readouts::layer_summary(&summaries);
    let mean_summary = match &mean {
        Some(m) => {
            m.write(&args.output)?;
            Some(m.summary()?.into_iter().map(|(r, _)| r).collect::<Vec<_>>())
        }
        None => None,
    };

    let weight_hashes = run
        .files
        .weights
        .iter()
        .map(|p| Ok(json!({"path": p, "sha256": fs_checkpoint::sha256_file(p)?})))
        .collect::<Result<Vec<_>>>()?;
    let metadata = json!({
        "tool": "fisher-stein",
        "version": env!("CARGO_PKG_VERSION"),
        "model": {
            "spec": args.model, "architecture": run.arch, "config": run.files.config,
            "origin": origin_json(run.files), "weights": weight_hashes,
            "d_model": d, "vocab_size": dims.vocab_size, "n_layers": dims.n_layers,
        },
        "layers": layers,
        "d_model": d,
        "n_sequences": docs.len(),
        "sequences": sequences,
        "positions": plan,
        "token_ids": docs.iter().map(|d| &d.tokens).collect::<Vec<_>>(),
        "text": args.text,
        "input": args.input,
        "estimator": args.estimator_json(),
        "eig_rank": eig_rank,
        "format": format!("{:?}", args.format).to_lowercase(),
        "dtype": "f32 GEMMs (model dtype), f64 accumulation of d×d results; stored as f32",
        "backend": run.backend,
        "device": run.device,
        "resumed_sequences_skipped": skipped,
        "n_failed_positions": failed.len(),
        "failed_positions": failed,
        "timings_s": {
            "load": run.load_s,
            "compute": t_compute.elapsed().as_secs_f64(),
            "total": t_start.elapsed().as_secs_f64() + run.load_s,
        },
        "readouts": args.readouts.settings_json(),
        "layer_summary": layer_summary,
        "mean_summary": mean_summary,
        "summary": summaries,
    });
    write_atomic(&args.output.join("metadata.json"), &serde_json::to_vec_pretty(&metadata)?)?;
    if !g.quiet {
        if layers.len() > 1 {
            crate::readouts::print_layer_summary(&layer_summary);
        }
        if let Some(rows) = &mean_summary {
            crate::dataset::print_mean_summary(rows);
        }
        eprintln!(
            "wrote {} ({} sequence(s), {} matrices, d = {d})",
            args.output.display(),
            docs.len(),
            total - failed.len()
        );
    }
    if let Some(first) = failed.first() {
        return Err(PartialFailure {
            failed: failed.len(),
            total,
            first: first["error"].as_str().unwrap_or_default().to_string(),
            metadata: args.output.join("metadata.json"),
        }
        .into());
    }
    Ok(())
}

/// A run that finished every position it could, with some positions failed on NaN or
/// infinity (they are listed in metadata.json). `main` exits with code 3 for it.
#[derive(Debug)]
pub struct PartialFailure {
    /// Positions (layer × position × sequence) that failed.
    pub failed: usize,
    /// Positions requested.
    pub total: usize,
    /// The first failure's message.
    pub first: String,
    /// The metadata file listing every failure.
    pub metadata: PathBuf,
}

impl std::fmt::Display for PartialFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} positions failed on non-finite values (first: {}); every other result is written, the failures are listed under \"failed_positions\" in {}: check the weights and inputs, or pass --fail-fast to stop at the first",
            self.failed,
            self.total,
            self.first,
            self.metadata.display()
        )
    }
}

impl std::error::Error for PartialFailure {}

/// Whether an estimator error is a numerical fault of one position (NaN or infinity met in
/// activations, logits, probabilities or results; a linear-algebra breakdown), as opposed to a
/// fault of the run (I/O, a bad argument), which stops the run.
fn is_numerical(e: &anyhow::Error) -> bool {
    e.downcast_ref::<FsError>().is_some_and(is_numerical_fs)
}

fn is_numerical_fs(e: &FsError) -> bool {
    matches!(
        e,
        FsError::NonFinite { .. } | FsError::NotAProbability { .. } | FsError::LinearAlgebra(_)
    )
}

/// Record a failed position (or, with `--fail-fast`, stop the run with it).
fn record_failure(
    sequence: usize,
    layer: usize,
    position: usize,
    e: anyhow::Error,
    fail_fast: bool,
    g: &Globals,
    failed: &mut Vec<serde_json::Value>,
) -> Result<()> {
    let message = format!("document {sequence} layer {layer} position {position}: {e:#}");
    if fail_fast {
        bail!("{message} (--fail-fast): check the weights and inputs for NaN/Inf, or drop --fail-fast to record failed positions and go on");
    }
    if !g.quiet {
        eprintln!("warning: {message}; recorded as failed, continuing");
    }
    failed.push(json!({
        "sequence": sequence, "layer": layer, "position": position, "error": message,
    }));
    Ok(())
}

/// Where a run keeps the per-sequence state `--resume` needs (hidden, inside the results
/// directory): `.state/seq_NNNNNN.json`.
fn sequence_state_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(".state").join(format!("seq_{i:06}.json"))
}

/// What a resumed run needs to know of a finished sequence to write the same metadata.json as an
/// uninterrupted run: its summaries and its failed positions.
struct SequenceState {
    summaries: Vec<serde_json::Value>,
    failed: Vec<serde_json::Value>,
}

impl SequenceState {
    fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let state = json!({"summaries": self.summaries, "failed": self.failed});
        write_atomic(path, &serde_json::to_vec(&state)?)
    }

    fn read(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let corrupt =
            || anyhow::anyhow!("{} is corrupt: re-run with --force to start over", path.display());
        let state: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| corrupt())?;
        let list = |key: &str| -> Result<Vec<serde_json::Value>> {
            state.get(key).and_then(|v| v.as_array()).cloned().ok_or_else(corrupt)
        };
        Ok(SequenceState { summaries: list("summaries")?, failed: list("failed")? })
    }
}

/// Summarise one matrix: append its summary (with decoded read-outs) to `summaries`, print its
/// line, and return its spectrum (top `rank` eigenpairs, at least 5).
fn summarise(
    i: usize,
    doc: &Document,
    e: &Entry,
    rank: usize,
    summaries: &mut Vec<serde_json::Value>,
    g: &Globals,
    decode: &dyn Fn(u32) -> String,
) -> Result<fs_estimators::Spectrum> {
    let d = e.fisher.rows();
    let s = spectrum(&e.fisher, Some(rank.max(5).min(d)))?;
    let mut summary = json!({
        "sequence": i, "layer": e.layer, "position": e.position, "token_id": doc.tokens[e.position],
        "entropy": e.entropy, "trace": s.trace, "top_eigenvalues": &s.eigenvalues[..s.eigenvalues.len().min(5)],
        "effective_rank": s.effective_rank, "participation_ratio": s.participation_ratio,
        "clamped_negative_eigenvalues": s.clamped_negative,
    });
    if let Some(r) = &e.readout {
        summary["token"] = json!(decode(doc.tokens[e.position]));
        summary["directions"] = crate::readouts::readout_json(r, decode);
    }
    summaries.push(summary);
    if !g.quiet {
        println!(
            "seq {i:>3}  layer {:>3}  position {:>4}  token {:>6}  entropy {:.4}  trace {:.4e}  top eigenvalues [{}]  eff. rank {:.2}",
            e.layer,
            e.position,
            doc.tokens[e.position],
            e.entropy,
            s.trace,
            s.eigenvalues.iter().take(3).map(|x| format!("{x:.3e}")).collect::<Vec<_>>().join(", "),
            s.effective_rank
        );
    }
    Ok(s)
}

/// Serialise one sequence's results and append their summaries.
#[allow(clippy::too_many_arguments)]
fn sequence_results(
    i: usize,
    doc: &Document,
    entries: &[Entry],
    d: usize,
    eig_rank: Option<usize>,
    args: &ComputeArgs,
    summaries: &mut Vec<serde_json::Value>,
    g: &Globals,
    decode: &dyn Fn(u32) -> String,
) -> Result<Vec<u8>> {
    let format = args.format;
    let n = entries.len();
    let mut eigenvalues = Vec::new();
    let mut eigenvectors = Vec::new();
    for e in entries {
        let s = summarise(i, doc, e, eig_rank.unwrap_or(5), summaries, g, decode)?;
        if let Some(r) = eig_rank {
            eigenvalues.extend(s.eigenvalues.iter().take(r).map(|&x| x as f32));
            for row in 0..d {
                eigenvectors.extend((0..r).map(|c| s.eigenvectors.get(row, c) as f32));
            }
        }
    }
    let mut tensors = vec![
        (
            "fisher",
            OwnedTensor::f32(
                vec![n, d, d],
                entries.iter().flat_map(|e| e.fisher.as_slice().iter().map(|&x| x as f32)),
            ),
        ),
        ("layer", OwnedTensor::i64(vec![n], entries.iter().map(|e| e.layer as i64))),
        ("positions", OwnedTensor::i64(vec![n], entries.iter().map(|e| e.position as i64))),
        ("sequence", OwnedTensor::i64(vec![n], std::iter::repeat_n(i as i64, n))),
        (
            "token_ids",
            OwnedTensor::i64(vec![1, doc.tokens.len()], doc.tokens.iter().map(|&t| t as i64)),
        ),
        ("probs_entropy", OwnedTensor::f64(vec![n], entries.iter().map(|e| e.entropy))),
    ];
    if let Some(r) = eig_rank {
        tensors.push(("eigenvalues", OwnedTensor::f32(vec![n, r], eigenvalues)));
        tensors.push(("eigenvectors", OwnedTensor::f32(vec![n, d, r], eigenvectors)));
    }
    let readouts: Vec<&crate::readouts::Readout> =
        entries.iter().filter_map(|e| e.readout.as_ref()).collect();
    if n > 0 && readouts.len() == n {
        let k = args.readouts.directions.min(d);
        tensors.extend(crate::readouts::readout_tensors(
            &readouts,
            k,
            args.readouts.direction_tokens,
        ));
    }
    if let Some(s) = entries.first().and_then(|e| e.draws.as_ref()).map(|v| v.len()) {
        let draws = entries.iter().flat_map(|e| e.draws.iter().flatten().map(|&t| t as i64));
        tensors.push(("sample_tokens", OwnedTensor::i64(vec![n, s], draws)));
    }
    match format {
        Format::Safetensors => safetensors_bytes(&tensors, None),
        Format::Npz => npz_bytes(&tensors),
    }
}

/// Check a path for `inspect`-style readers: the results files of a directory, in order.
pub fn results_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| {
            format!("cannot read results directory {}: check the path", dir.display())
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with("fisher") && (name.ends_with(".safetensors") || name.ends_with(".npz"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no fisher*.safetensors or fisher*.npz: point inspect at a directory written by compute", dir.display());
    }
    Ok(files)
}
