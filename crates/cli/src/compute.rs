//! `fisher-stein compute`: Fisher matrices of a model at a layer, for chosen positions of a text.

use crate::output::{check_output_dir, safetensors_bytes, write_results_dir, OwnedTensor};
use crate::positions::PositionSpec;
use anyhow::{bail, Context, Result};
use fs_checkpoint::{ModelFiles, ModelOrigin};
use fs_estimators::{
    closed_form_fisher_at, entropy, exact_fisher, sampled_fisher, softmax, spectrum, Element,
    ExactOptions, GradientKind, Matrix, SampledOptions, SplitModel,
};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Which estimator `compute` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Estimator {
    /// Full-vocabulary Fisher `Aᵀ G A` (centered `G`, vocabulary streamed).
    Exact,
    /// `(1/S) Σ_s g_{y_s} g_{y_s}ᵀ` with `y_s ~ p` (unbiased; `--samples`, `--seed`).
    Sampled,
    /// `Jᵀ diag(p) J − (Jᵀp)(Jᵀp)ᵀ` with `J = W_U A`, streamed (an independent check of exact).
    ClosedForm,
}

impl Estimator {
    fn name(self) -> &'static str {
        match self {
            Estimator::Exact => "exact",
            Estimator::Sampled => "sampled",
            Estimator::ClosedForm => "closed-form",
        }
    }
}

/// Arguments of `fisher-stein compute`.
#[derive(Debug, clap::Args)]
pub struct ComputeArgs {
    /// Model: a directory with config.json + safetensors, or a hub id in the local HF cache.
    #[arg(long, alias = "model_name", value_name = "PATH_OR_ID")]
    pub model: String,
    /// Split layer k: 0 = embeddings, n_layer = last block before the final norm.
    #[arg(long, alias = "layer_idx", value_name = "K")]
    pub layer: usize,
    /// Token ids, comma-separated (e.g. 15496,995).
    #[arg(long, value_delimiter = ',', conflicts_with = "text", required_unless_present = "text")]
    pub tokens: Option<Vec<u32>>,
    /// Text, tokenised with the model's tokenizer (tokenizer.json or vocab.json + merges.txt).
    #[arg(long)]
    pub text: Option<String>,
    /// Positions: all, last, or a list such as 0,3,10..12 (negative = from the end).
    #[arg(long, default_value = "last")]
    pub positions: PositionSpec,
    /// Estimator.
    #[arg(long, value_enum, default_value = "exact")]
    pub estimator: Estimator,
    /// Draws per position for the sampled estimator.
    #[arg(long, alias = "num_samples", default_value_t = 10)]
    pub samples: usize,
    /// Seed of the sampled estimator's draws (position t uses stream t).
    #[arg(long, alias = "random_seed", default_value_t = 0)]
    pub seed: u64,
    /// Results directory (must not exist or be empty, unless --force).
    #[arg(long, alias = "output_dir", value_name = "DIR")]
    pub output: PathBuf,
    /// Replace a non-empty output directory.
    #[arg(long)]
    pub force: bool,
    /// Device: cpu, or cuda:N (needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// What one run computed, independent of the model type.
struct Computed {
    d: usize,
    positions: Vec<usize>,
    fisher: Vec<Matrix<f64>>,
    entropies: Vec<f64>,
    sample_tokens: Option<Vec<Vec<u32>>>,
    lower_s: f64,
    estimator_s: f64,
}

fn run_estimator<M: SplitModel>(model: &M, tokens: &[u32], args: &ComputeArgs) -> Result<Computed>
where
    M::Scalar: Element,
{
    let t0 = Instant::now();
    let ctx = model.lower(tokens, args.layer)?;
    let lower_s = t0.elapsed().as_secs_f64();
    let positions = args.positions.resolve(tokens.len())?;
    let logits = model.logits(&ctx, &positions)?;
    let entropies = (0..positions.len())
        .map(|i| softmax(logits.row(i)).map(|p| entropy(&p)))
        .collect::<Result<Vec<_>, _>>()?;
    let t1 = Instant::now();
    let opts = ExactOptions::default();
    let (fisher, sample_tokens) = match args.estimator {
        Estimator::Exact => (exact_fisher(model, &ctx, &positions, &opts)?, None),
        Estimator::ClosedForm => {
            (closed_form_fisher_at(model, &ctx, &positions, GradientKind::Logits, &opts)?, None)
        }
        Estimator::Sampled => {
            let o = SampledOptions { samples: args.samples, seed: args.seed, ..Default::default() };
            let s = sampled_fisher(model, &ctx, &positions, &o)?;
            let tokens = s.iter().map(|x| x.tokens.clone()).collect();
            (s.into_iter().map(|x| x.fisher).collect(), Some(tokens))
        }
    };
    let estimator_s = t1.elapsed().as_secs_f64();
    for (f, &t) in fisher.iter().zip(&positions) {
        if let Some(i) = f.as_slice().iter().position(|x| !x.is_finite()) {
            bail!(
                "the Fisher matrix at layer {} position {t} has a non-finite entry at index {i}: check the weights for NaN/Inf",
                args.layer
            );
        }
    }
    Ok(Computed {
        d: model.dims().d_model,
        positions,
        fisher,
        entropies,
        sample_tokens,
        lower_s,
        estimator_s,
    })
}

fn origin_json(files: &ModelFiles) -> serde_json::Value {
    match &files.origin {
        ModelOrigin::LocalDir { dir } => json!({"kind": "local_dir", "dir": dir}),
        ModelOrigin::HubCache { repo_id, revision, commit, snapshot_dir } => json!({
            "kind": "hf_cache", "repo_id": repo_id, "revision": revision, "commit": commit,
            "snapshot_dir": snapshot_dir,
        }),
    }
}

fn architecture(files: &ModelFiles) -> Result<String> {
    let text = std::fs::read_to_string(&files.config)
        .with_context(|| format!("cannot read {}", files.config.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", files.config.display()))?;
    Ok(v.get("model_type").and_then(|m| m.as_str()).unwrap_or("gpt2").to_string())
}

/// Run `compute`.
pub fn run(args: ComputeArgs, quiet: bool) -> Result<()> {
    let t_start = Instant::now();
    check_output_dir(&args.output, args.force)?;
    let files = fs_checkpoint::resolve_model(&args.model)?;
    let arch = architecture(&files)?;

    let tokens: Vec<u32> = match (&args.tokens, &args.text) {
        (Some(t), _) => t.clone(),
        (None, Some(text)) => {
            if text.is_empty() {
                bail!("--text is empty: give some text to analyse");
            }
            let tok = fs_checkpoint::load_tokenizer(&files.tokenizer)?;
            tok.encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing --text failed: {e}"))?
                .get_ids()
                .to_vec()
        }
        (None, None) => bail!("give the input as --tokens 1,2,3 or --text \"...\""),
    };
    if tokens.is_empty() {
        bail!("the input has no tokens: give a non-empty --text or --tokens");
    }

    let t_load = Instant::now();
    let (computed, backend, device, dtype) = match arch.as_str() {
        "gpt2" => run_candle_gpt2(&files, &tokens, &args)?,
        other => bail!("model architecture {other:?} is not supported yet: supported: gpt2"),
    };
    let load_and_run_s = t_load.elapsed().as_secs_f64();

    let n = computed.positions.len();
    let d = computed.d;
    let mut tensors = vec![
        (
            "fisher",
            OwnedTensor::f32(
                vec![n, d, d],
                computed.fisher.iter().flat_map(|f| f.as_slice().iter().map(|&x| x as f32)),
            ),
        ),
        ("positions", OwnedTensor::i64(vec![n], computed.positions.iter().map(|&t| t as i64))),
        ("sequence", OwnedTensor::i64(vec![n], std::iter::repeat_n(0, n))),
        ("token_ids", OwnedTensor::i64(vec![1, tokens.len()], tokens.iter().map(|&t| t as i64))),
        ("probs_entropy", OwnedTensor::f64(vec![n], computed.entropies.iter().copied())),
    ];
    if let Some(st) = &computed.sample_tokens {
        let s = st.first().map_or(0, |v| v.len());
        tensors.push((
            "sample_tokens",
            OwnedTensor::i64(vec![n, s], st.iter().flatten().map(|&t| t as i64)),
        ));
    }

    let mut summaries = Vec::with_capacity(n);
    for (i, f) in computed.fisher.iter().enumerate() {
        let s = spectrum(f, Some(5))?;
        summaries.push(json!({
            "position": computed.positions[i],
            "token_id": tokens[computed.positions[i]],
            "entropy": computed.entropies[i],
            "trace": s.trace,
            "top_eigenvalues": s.eigenvalues,
            "effective_rank": s.effective_rank,
            "participation_ratio": s.participation_ratio,
            "clamped_negative_eigenvalues": s.clamped_negative,
        }));
        if !quiet {
            println!(
                "position {:>4}  token {:>6}  entropy {:.4}  trace {:.6e}  top eigenvalues [{}]  effective rank {:.2}",
                computed.positions[i],
                tokens[computed.positions[i]],
                computed.entropies[i],
                s.trace,
                s.eigenvalues.iter().map(|x| format!("{x:.4e}")).collect::<Vec<_>>().join(", "),
                s.effective_rank
            );
        }
    }

    let weight_hashes = files
        .weights
        .iter()
        .map(|p| Ok(json!({"path": p, "sha256": fs_checkpoint::sha256_file(p)?})))
        .collect::<Result<Vec<_>>>()?;
    let estimator = match args.estimator {
        Estimator::Sampled => json!({
            "name": "sampled", "samples": args.samples, "seed": args.seed,
            "temperature": 1.0, "top_p": 1.0, "biased": false,
        }),
        e => json!({"name": e.name(), "biased": false}),
    };
    let metadata = json!({
        "tool": "fisher-stein",
        "version": env!("CARGO_PKG_VERSION"),
        "model": {
            "spec": args.model,
            "architecture": arch,
            "config": files.config,
            "origin": origin_json(&files),
            "weights": weight_hashes,
        },
        "layer": args.layer,
        "d_model": d,
        "positions": computed.positions,
        "n_sequences": 1,
        "token_ids": [tokens],
        "text": args.text,
        "estimator": estimator,
        "dtype": dtype,
        "backend": backend,
        "device": device,
        "timings_s": {
            "lower": computed.lower_s,
            "estimator": computed.estimator_s,
            "load_and_run": load_and_run_s,
            "total": t_start.elapsed().as_secs_f64(),
        },
        "summary": summaries,
    });
    let files_out = vec![
        ("fisher.safetensors", safetensors_bytes(&tensors)?),
        ("metadata.json", serde_json::to_vec_pretty(&metadata)?),
    ];
    write_results_dir(&args.output, args.force, &files_out)?;
    if !quiet {
        eprintln!("wrote {} ({n} position(s), d = {d})", args.output.display());
    }
    Ok(())
}

#[cfg(feature = "candle")]
fn run_candle_gpt2(
    files: &ModelFiles,
    tokens: &[u32],
    args: &ComputeArgs,
) -> Result<(Computed, &'static str, String, &'static str)> {
    let device = backend_candle::device(&args.device)?;
    let model = backend_candle::Gpt2::load(files, &device)?;
    let computed = run_estimator(&model, tokens, args)?;
    Ok((computed, "candle", args.device.clone(), "f32 GEMMs, f64 accumulation of d×d results"))
}

#[cfg(not(feature = "candle"))]
fn run_candle_gpt2(
    _files: &ModelFiles,
    _tokens: &[u32],
    _args: &ComputeArgs,
) -> Result<(Computed, &'static str, String, &'static str)> {
    bail!("this build has no candle backend: rebuild with `--features candle`")
}
