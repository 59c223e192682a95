//! `fisher-stein bench`: time the estimators on a random model of a named shape, on one or more
//! engines, and print a table (median of `--repeats` runs, attained GFLOP/s against the flop
//! count below, peak RSS, and each engine's own f32 GEMM rate on the same machine in the same
//! run, so that roofline ratios are measured, not assumed).
//!
//! ## Flop count
//!
//! Per block and per row at position `t`, with `M_lin` the multiply-adds of the block's linear
//! layers for one row (GPT-2: `12 d²`; Llama: `d·q + 2·d·kv + q·d + 3·d·inner`, `q`/`kv` the
//! query and key/value widths) and `q` the attention width, the upper half costs
//! `c(t) = 2·M_lin + 4·q·(t + 1)` flops (multiply-adds count 2; the attention term is the
//! scores and the weighted values against `t` cached keys plus the row's own). Then, with `B`
//! blocks above the split layer, width `d`, vocabulary `V`:
//!
//! ```text
//! readout Jacobian A   d · B · c(t)        (d tangent directions through the upper half, forward mode)
//! weighted Gram G      V · d · (d + 1)     (lower triangle of a rank-V update)
//! sandwich AᵀGA        3 d³
//! exact                the three above
//! sampled (S draws)    2 · S · B · c(t) + 2 V d   (S replicated forward + backward rows, the logits)
//! top-k (N applications, S scores)
//!                      N · (3 · B · c(t) + 4 V d) + S · 2 · B · c(t)
//!                      (per vector: one forward-mode tangent, one replicated forward + backward
//!                      row, and G = W_Uᵀ(p ∘ …)W_U in two passes; N = the eigensolver's
//!                      applications plus the trace probes, as counted; per start score one
//!                      replicated forward + backward row)
//! lower pass           Σ_{t<T} L · c(t)     (the whole-sequence forward, every block)
//! ```
//!
//! This is the *minimum* work of the forward-mode algorithm: an engine that gets `A` by reverse
//! mode over `d` replicated rows does twice the upper-half work, and shows half the rate. The
//! GEMM row is `(d × d)·(d × 4d)` at `2·d·d·4d` flops.
//!
//! `exact`, `sampled`, `readout` and `gram` time the estimator on an already-lowered context (the
//! "cached context" of a run); `lower` times the forward pass over the whole sequence once (a
//! one-position-at-a-time run pays it for every position, a run over all positions once).

use crate::backends::{Backend, Engine, EngineJob};
use anyhow::{bail, Result};
use fs_checkpoint::{DecoderConfig, Gpt2Config};
use fs_estimators::{
    exact_fisher, sampled_fisher, top_k_fisher, EigensolverOptions, ExactOptions, SampledOptions,
    SplitModel, TopKOptions, TopKStart,
};
use std::time::Instant;

/// Arguments of `fisher-stein bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Model shape (random weights): gpt2-small (12 layers, d 768, V 50257), gpt2-medium,
    /// smollm2-135m (the Llama shape of SmolLM2-135M: 30 layers, d 576, 9 heads / 3 key-value
    /// heads, V 49152), gemma-3-270m (18 layers, d 640, 4 / 1 heads of width 256, sliding window
    /// 512 on five of every six layers, V 262144, tied), llama-3.2-1b (16 layers, d 2048, 32 / 8 heads, MLP 8192, V 128256, tied),
    /// llama-3.1-8b (32 layers, d 4096, 32 / 8 heads, MLP 14336, V 128256, untied), or tiny.
    #[arg(long, default_value = "gpt2-small")]
    pub shape: String,
    /// Precision the random weights are held in: f32, bf16 or f16 (default: bf16 for the
    /// llama-3.x and gemma-3 shapes, as those checkpoints ship, f32 otherwise). candle's CPU path keeps
    /// bf16/f16 matrices as stored and widens one product at a time; burn and dfdx widen on load.
    #[arg(long, value_name = "DTYPE")]
    pub weights: Option<String>,
    /// Engines to time, comma-separated: candle, burn, dfdx (each needs its Cargo feature).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "candle")]
    pub backend: Vec<Backend>,
    /// Device: cpu, or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Split layer.
    #[arg(long, default_value_t = 6)]
    pub layer: usize,
    /// Sequence length T (random tokens).
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// How many of the last positions to compute together (1 = only the last; T = all).
    #[arg(long, default_value_t = 1)]
    pub positions: usize,
    /// Rows to time, comma-separated: exact, sampled, top-k (the matrix-free top --k
    /// eigenpairs), readout (the A step alone), gram (the G step alone), lower (the forward pass
    /// over the sequence).
    #[arg(long, value_delimiter = ',', default_value = "exact,sampled")]
    pub estimators: Vec<String>,
    /// Draws of the sampled estimator.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Eigenpairs of the top-k row (with its trace estimate).
    #[arg(long = "k", default_value_t = 16)]
    pub top_k: usize,
    /// Residual tolerance of the top-k row: stop when every pair has ‖F v − λ v‖ ≤ tolerance·λ1
    /// (as `compute --tolerance`).
    #[arg(long, default_value_t = 1e-5)]
    pub tolerance: f64,
    /// Vectors per block of the top-k row's eigensolver (default: the solver's, k + max(4, k/2)).
    #[arg(long, value_name = "B")]
    pub block: Option<usize>,
    /// Start the top-k row's eigensolver from random vectors instead of the score vectors of
    /// the most probable tokens (the default), for comparison.
    #[arg(long)]
    pub random_start: bool,
    /// Standard deviation of the random model's logits, set by scaling its final-norm gain.
    /// Random weights of std 0.02 give logits of std ~0.02·√d and a near-uniform next-token
    /// distribution (entropy ≈ ln V), whose Fisher is nearly isotropic — nothing like a trained
    /// model's. The default 4 gives an entropy of a few nats, as trained models have; the table
    /// prints the entropy measured at the timed positions. The cost of every estimator but
    /// top-k does not depend on it; top-k's does (a flat spectrum converges slowly).
    #[arg(long, default_value_t = 4.0, value_name = "STD")]
    pub logit_std: f64,
    /// Timed repetitions per row (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn rss() -> String {
    peak_rss_mb().map_or("n/a".into(), |m| format!("{m:.0} MB"))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// A model shape with random weights.
enum Shape {
    Gpt2(Gpt2Config),
    Llama(DecoderConfig),
}

impl Shape {
    fn parse(name: &str, seq_len: usize) -> Result<Shape> {
        let gpt2 = |n_layer, d, heads, vocab| {
            Shape::Gpt2(Gpt2Config {
                vocab_size: vocab,
                n_positions: seq_len.max(1024),
                n_embd: d,
                n_layer,
                n_head: heads,
                layer_norm_epsilon: 1e-5,
                activation_function: "gelu_new".into(),
                tie_word_embeddings: true,
                n_inner: None,
            })
        };
        Ok(match name {
            "gpt2-small" => gpt2(12, 768, 12, 50257),
            "gpt2-medium" => gpt2(24, 1024, 16, 50257),
            "tiny" => gpt2(4, 64, 4, 1000),
            "smollm2-135m" => {
                let json = serde_json::json!({
                    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                    "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                    "max_position_embeddings": seq_len.max(8192), "tie_word_embeddings": true,
                });
                Shape::Llama(DecoderConfig::from_json(&json.to_string(), "smollm2-135m".as_ref())?)
            }
            "llama-3.2-1b" => {
                let json = serde_json::json!({
                    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
                    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                    "max_position_embeddings": seq_len.max(8192), "tie_word_embeddings": true,
                    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                });
                Shape::Llama(DecoderConfig::from_json(&json.to_string(), "llama-3.2-1b".as_ref())?)
            }
            "gemma-3-270m" => {
                // google/gemma-3-270m's config.json: five sliding-window layers (512) per global
                // one, q/k norms, one key-value head of width 256, a 262,144-token vocabulary.
                let layer_types: Vec<&str> = (0..18)
                    .map(|i| if i % 6 == 5 { "full_attention" } else { "sliding_attention" })
                    .collect();
                let json = serde_json::json!({
                    "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
                    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
                    "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
                    "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
                    "sliding_window": 512, "layer_types": layer_types,
                    "max_position_embeddings": seq_len.max(32768), "tie_word_embeddings": true,
                    "rope_parameters": {
                        "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
                    },
                });
                Shape::Llama(DecoderConfig::from_json(&json.to_string(), "gemma-3-270m".as_ref())?)
            }
            "llama-3.1-8b" => {
                let json = serde_json::json!({
                    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
                    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                    "max_position_embeddings": seq_len.max(131072), "tie_word_embeddings": false,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                });
                Shape::Llama(DecoderConfig::from_json(&json.to_string(), "llama-3.1-8b".as_ref())?)
            }
            other => bail!(
                "unknown --shape {other:?}: use gpt2-small, gpt2-medium, smollm2-135m, gemma-3-270m, llama-3.2-1b, llama-3.1-8b or tiny"
            ),
        })
    }

    /// The configuration of the random model.
    fn config(&self) -> fs_checkpoint::ModelConfig {
        match self {
            Shape::Gpt2(c) => fs_checkpoint::ModelConfig::Gpt2(c.clone()),
            Shape::Llama(c) => fs_checkpoint::ModelConfig::Decoder(c.clone()),
        }
    }

    /// `(d, V, L, M_lin, q)` for the flop count.
    fn flop_terms(&self) -> (f64, f64, usize, f64, f64) {
        match self {
            Shape::Gpt2(c) => {
                let d = c.n_embd as f64;
                (d, c.vocab_size as f64, c.n_layer, 4.0 * d * d + 2.0 * d * c.inner_dim() as f64, d)
            }
            Shape::Llama(c) => {
                let d = c.hidden_size as f64;
                let q = (c.num_attention_heads * c.head_dim) as f64;
                let kv = (c.num_key_value_heads * c.head_dim) as f64;
                let lin = d * q + 2.0 * d * kv + q * d + 3.0 * d * c.intermediate_size as f64;
                (d, c.vocab_size as f64, c.num_hidden_layers, lin, q)
            }
        }
    }
}

/// Run `bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    if args.repeats == 0 || args.positions == 0 || args.seq_len == 0 {
        bail!("--repeats, --positions and --seq-len must be at least 1");
    }
    if args.positions > args.seq_len {
        bail!("--positions {} is more than --seq-len {}", args.positions, args.seq_len);
    }
    let shape = Shape::parse(&args.shape, args.seq_len)?;
    let (_, _, n_layers, _, _) = shape.flop_terms();
    if args.layer > n_layers {
        bail!("--layer {}: the {} shape splits at layers 0..={n_layers}", args.layer, args.shape);
    }
    if !(args.tolerance.is_finite() && args.tolerance > 0.0) {
        bail!("--tolerance {}: give a finite number > 0 (e.g. 1e-5)", args.tolerance);
    }
    for est in &args.estimators {
        if !["exact", "sampled", "top-k", "readout", "gram", "lower"].contains(&est.as_str()) {
            bail!(
                "unknown estimator {est:?} in --estimators: use exact, sampled, top-k, readout (the A step alone), gram (the G step alone), lower (the forward pass)"
            );
        }
    }
    println!(
        "| shape | layer | T | positions | estimator | backend | time/position (median of {}) | GFLOP/s | peak RSS |",
        args.repeats
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &backend in &args.backend {
        run_backend(backend, &shape, &args)?;
    }
    Ok(())
}

/// Build the random model on `backend` (through the engine registry) and time it.
fn run_backend(backend: Backend, shape: &Shape, args: &BenchArgs) -> Result<()> {
    let (d, _, _, _, _) = shape.flop_terms();
    let d = d as usize;
    let (m, k, n) = (d, d, 4 * d);
    let config = shape.config();
    backend.check_supports(config.architecture())?;
    let engine = Engine::open(backend, &args.device)?;
    let gemm = engine.matmul_gflops(m, k, n, args.repeats.max(5))?;
    println!(
        "| {} | — | — | — | f32 GEMM ({m}×{k})·({k}×{n}) | {} {} | — | {gemm:.1} | {} |",
        args.shape,
        backend.name(),
        args.device,
        rss()
    );
    let dtype = weights_dtype(args)?;
    let start = Instant::now();
    let source = &mut fs_checkpoint::RandomSource::new(&config, 0.02, 0).with_dtype(dtype)?;
    let weights = scale_logits(config.read_weights(source)?, args.logit_std);
    println!(
        "| {} | — | — | — | random weights in {} ({:.1} s to draw) | {} {} | — | — | {} |",
        args.shape,
        dtype.name(),
        start.elapsed().as_secs_f64(),
        backend.name(),
        args.device,
        rss()
    );
    engine.run(weights, None, BenchJob { backend, shape, args })
}

/// The precision of the random weights: `--weights`, else bf16 for the llama-3.x and gemma-3
/// shapes.
fn weights_dtype(args: &BenchArgs) -> Result<fs_checkpoint::GgmlType> {
    use fs_checkpoint::GgmlType;
    let name = args.weights.clone().unwrap_or_else(|| {
        if args.shape.starts_with("llama-3") || args.shape.starts_with("gemma-3") {
            "bf16"
        } else {
            "f32"
        }
        .to_string()
    });
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" => GgmlType::F32,
        "bf16" => GgmlType::BF16,
        "f16" => GgmlType::F16,
        other => bail!("--weights {other:?}: use f32, bf16 or f16"),
    })
}

/// Scale the final-norm gain (and shift) of random weights of std 0.02 so that the logits have
/// standard deviation ≈ `logit_std`: a unit-RMS readout `u ∘ γ` against unembedding rows of
/// std 0.02 gives logits of std `0.02·√d·rms(γ)`.
fn scale_logits(
    weights: fs_checkpoint::ModelWeights,
    logit_std: f64,
) -> fs_checkpoint::ModelWeights {
    use fs_checkpoint::ModelWeights;
    let factor = |gain: &[f32]| {
        let rms =
            (gain.iter().map(|&g| (g as f64).powi(2)).sum::<f64>() / gain.len() as f64).sqrt();
        (logit_std / (0.02 * (gain.len() as f64).sqrt() * rms.max(1e-12))) as f32
    };
    match weights {
        ModelWeights::Gpt2(mut w) => {
            let c = factor(&w.ln_f.weight);
            w.ln_f.weight.iter_mut().chain(w.ln_f.bias.iter_mut()).for_each(|x| *x *= c);
            ModelWeights::Gpt2(w)
        }
        ModelWeights::Decoder(mut w) => {
            let c = factor(&w.norm.weight);
            w.norm.weight.iter_mut().chain(w.norm.bias.iter_mut().flatten()).for_each(|x| *x *= c);
            ModelWeights::Decoder(w)
        }
    }
}

/// [`time_model`] as a job of the engine registry.
struct BenchJob<'a> {
    backend: Backend,
    shape: &'a Shape,
    args: &'a BenchArgs,
}

impl EngineJob for BenchJob<'_> {
    type Output = ();
    fn run<M: SplitModel + 'static>(self, model: M) -> Result<()> {
        time_model(&model, self.backend, self.shape, self.args)
    }
}

/// Time the requested rows on one model.
fn time_model<M: SplitModel>(
    model: &M,
    backend: Backend,
    shape: &Shape,
    args: &BenchArgs,
) -> Result<()> {
    let (df, vf, n_layers, lin, q) = shape.flop_terms();
    let vocab = vf as usize;
    let tokens: Vec<u32> = (0..args.seq_len).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let ctx = model.lower(&tokens, args.layer)?;
    let positions: Vec<usize> = (args.seq_len - args.positions..args.seq_len).collect();
    let logits = model.logits(&ctx, &positions)?;
    let entropy = (0..positions.len())
        .map(|i| Ok(fs_estimators::entropy(&fs_estimators::softmax(logits.row(i))?)))
        .collect::<Result<Vec<f64>>>()?;
    eprintln!(
        "next-token entropy at the timed positions: mean {:.2} nats (ln V = {:.2}; --logit-std {})",
        entropy.iter().sum::<f64>() / entropy.len() as f64,
        vf.ln(),
        args.logit_std
    );
    let blocks = (n_layers - args.layer) as f64;
    let row_flops = |t: usize| (2.0 * lin + 4.0 * q * (t as f64 + 1.0)) * blocks;
    let lower_flops = (0..args.seq_len)
        .map(|t| (2.0 * lin + 4.0 * q * (t as f64 + 1.0)) * n_layers as f64)
        .sum::<f64>();
    for est in &args.estimators {
        if est == "top-k" {
            time_top_k(model, &ctx, &positions, backend, args, |t, n, scores| {
                n as f64 * (3.0 * row_flops(t) + 4.0 * vf * df) + scores as f64 * 2.0 * row_flops(t)
            })?;
            continue;
        }
        let flops: f64 = match est.as_str() {
            "exact" => positions
                .iter()
                .map(|&t| row_flops(t) * df + vf * df * (df + 1.0) + 3.0 * df * df * df)
                .sum(),
            "sampled" => positions
                .iter()
                .map(|&t| 2.0 * row_flops(t) * args.samples as f64 + 2.0 * vf * df)
                .sum(),
            "readout" => positions.iter().map(|&t| row_flops(t) * df).sum(),
            "gram" => positions.len() as f64 * vf * df * (df + 1.0),
            _ => lower_flops,
        };
        let mut times = Vec::with_capacity(args.repeats);
        for _ in 0..args.repeats {
            let t0 = Instant::now();
            match est.as_str() {
                "exact" => {
                    exact_fisher(model, &ctx, &positions, &ExactOptions::default())?;
                }
                "readout" => {
                    model.readout_jacobians(&ctx, &positions)?;
                }
                "gram" => {
                    let logits = model.logits(&ctx, &positions)?;
                    for i in 0..positions.len() {
                        let p = fs_estimators::softmax(logits.row(i))?;
                        fs_estimators::centered_output_gram(
                            model.unembedding(),
                            &p,
                            ExactOptions::default().vocab_chunk,
                            ExactOptions::default().threads,
                        )?;
                    }
                }
                "lower" => {
                    // Reading one activation back waits for the device's queue (a GPU runs the
                    // pass asynchronously), so the clock stops when the pass is done.
                    let ctx = model.lower(&tokens, args.layer)?;
                    model.activation(&ctx, args.seq_len - 1)?;
                }
                _ => {
                    let o = SampledOptions { samples: args.samples, ..Default::default() };
                    sampled_fisher(model, &ctx, &positions, &o)?;
                }
            }
            times.push(t0.elapsed().as_secs_f64());
        }
        // `lower` is per sequence; the others per position.
        let per = if est == "lower" { 1 } else { positions.len() };
        let time = median(times) / per as f64;
        let gflops = flops / per as f64 / time / 1e9;
        let label = match est.as_str() {
            "sampled" => format!("sampled S={}", args.samples),
            "lower" => "lower pass (per sequence)".to_string(),
            other => other.to_string(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} {} | {:.3} s | {:.1} | {} |",
            args.shape,
            args.layer,
            args.seq_len,
            positions.len(),
            label,
            backend.name(),
            args.device,
            time,
            gflops,
            rss()
        );
    }
    Ok(())
}

/// The `top-k` row: the median time per position of `top_k_fisher` (`--tolerance`, trace
/// estimate), with the flops of the applications and start scores it actually made
/// (`flops(t, applications, scores)`).
fn time_top_k<M: SplitModel>(
    model: &M,
    ctx: &M::Context,
    positions: &[usize],
    backend: Backend,
    args: &BenchArgs,
    flops: impl Fn(usize, usize, usize) -> f64,
) -> Result<()> {
    let opts = TopKOptions {
        solver: EigensolverOptions {
            k: args.top_k,
            block: args.block,
            tolerance: args.tolerance,
            ..TopKOptions::default().solver
        },
        start: if args.random_start { TopKStart::Random } else { TopKStart::ProbableTokenScores },
        ..TopKOptions::default()
    };
    let mut times = Vec::with_capacity(args.repeats);
    let mut total_flops = 0.0;
    let mut applications = 0;
    let mut scores = 0;
    let mut split = fs_estimators::OperatorSeconds::default();
    for _ in 0..args.repeats {
        let t0 = Instant::now();
        total_flops = 0.0;
        applications = 0;
        scores = 0;
        for &t in positions {
            let r = top_k_fisher(model, ctx, t, &opts)?;
            split = r.seconds;
            let n = r.applications + r.trace.applications;
            applications += n;
            scores += r.start_vectors;
            total_flops += flops(t, n, r.start_vectors);
        }
        times.push(t0.elapsed().as_secs_f64());
    }
    let per = positions.len();
    let time = median(times) / per as f64;
    println!(
        "| {} | {} | {} | {} | top-{} ({} applications + {} scores) | {} {} | {:.3} s | {:.1} | {} |",
        args.shape,
        args.layer,
        args.seq_len,
        per,
        args.top_k,
        applications / per,
        scores / per,
        backend.name(),
        args.device,
        time,
        total_flops / per as f64 / time / 1e9,
        rss()
    );
    eprintln!(
        "top-k split (last position of the last repeat): form A {:.3} s, JVPs {:.3} s, G {:.3} s, VJPs {:.3} s",
        split.jacobian, split.jvp, split.gram, split.vjp
    );
    Ok(())
}
