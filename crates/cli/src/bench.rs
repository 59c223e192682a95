//! `fisher-stein bench`: time the estimators on a random model of a named shape and print a
//! table (median of `--repeats` runs, attained GFLOP/s against a documented flop count, peak RSS).
//!
//! Flop count of the exact estimator at position `t`, split layer `k`, `L` blocks, width `d`,
//! MLP width `4d`, vocabulary `V` (multiply-adds count 2):
//!
//! ```text
//! readout Jacobian  2 · (24 d² + 4 d (t+1)) · d · (L − k)   (d rows through L−k blocks: forward + input-gradient backward)
//! weighted Gram G   V · d · (d + 1)                          (lower triangle of a rank-V update)
//! sandwich AᵀGA     3 d³
//! ```
//!
//! Sampled with `S` draws: `2 · (24 d² + 4 d (t+1)) · S · (L − k) + 2 V d` (the logits at `t`).

use anyhow::{bail, Result};
use fs_estimators::{exact_fisher, sampled_fisher, ExactOptions, SampledOptions, SplitModel};
use std::time::Instant;

/// Arguments of `fisher-stein bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Model shape: gpt2-small (12 layers, d 768, V 50257), gpt2-medium, or tiny.
    #[arg(long, default_value = "gpt2-small")]
    pub shape: String,
    /// Split layer.
    #[arg(long, default_value_t = 6)]
    pub layer: usize,
    /// Sequence length T (random tokens).
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// How many of the last positions to compute together (1 = only the last).
    #[arg(long, default_value_t = 1)]
    pub positions: usize,
    /// Estimators to time, comma-separated: exact, sampled.
    #[arg(long, value_delimiter = ',', default_value = "exact,sampled")]
    pub estimators: Vec<String>,
    /// Draws of the sampled estimator.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
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

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// Run `bench`.
#[cfg(feature = "candle")]
pub fn run(args: BenchArgs) -> Result<()> {
    use backend_candle::{Device, Gpt2};
    use fs_checkpoint::Gpt2Config;
    let (n_layer, d, heads, vocab) = match args.shape.as_str() {
        "gpt2-small" => (12, 768, 12, 50257),
        "gpt2-medium" => (24, 1024, 16, 50257),
        "tiny" => (4, 64, 4, 1000),
        other => bail!("unknown --shape {other:?}: use gpt2-small, gpt2-medium or tiny"),
    };
    if args.repeats == 0 || args.positions == 0 || args.seq_len == 0 {
        bail!("--repeats, --positions and --seq-len must be at least 1");
    }
    let cfg = Gpt2Config {
        vocab_size: vocab,
        n_positions: args.seq_len.max(1024),
        n_embd: d,
        n_layer,
        n_head: heads,
        layer_norm_epsilon: 1e-5,
        activation_function: "gelu_new".into(),
        tie_word_embeddings: true,
        n_inner: None,
    };
    let model = Gpt2::random(cfg, 0.02, 0, &Device::Cpu)?;
    let tokens: Vec<u32> = (0..args.seq_len).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let ctx = model.lower(&tokens, args.layer)?;
    let positions: Vec<usize> =
        (args.seq_len.saturating_sub(args.positions)..args.seq_len).collect();
    let blocks = (n_layer - args.layer) as f64;
    let (df, vf) = (d as f64, vocab as f64);
    let row_flops = |t: usize| 2.0 * (24.0 * df * df + 4.0 * df * (t as f64 + 1.0)) * blocks;

    println!(
        "| shape | layer | T | positions | estimator | backend | time/position (median of {}) | GFLOP/s | peak RSS |",
        args.repeats
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let gemm = backend_candle::matmul_gflops(d, d, 4 * d, args.repeats.max(5), &Device::Cpu)?;
    println!(
        "| {} | — | — | — | f32 GEMM ({d}×{d})·({d}×{}) | candle cpu | — | {gemm:.1} | {} |",
        args.shape,
        4 * d,
        peak_rss_mb().map_or("n/a".into(), |m| format!("{m:.0} MB"))
    );
    for est in &args.estimators {
        let mut times = Vec::with_capacity(args.repeats);
        let flops: f64 = match est.as_str() {
            "exact" => positions.iter().map(|&t| row_flops(t) * df + vf * df * (df + 1.0) + 3.0 * df * df * df).sum(),
            "sampled" => positions.iter().map(|&t| row_flops(t) * args.samples as f64 + 2.0 * vf * df).sum(),
            "readout" => positions.iter().map(|&t| row_flops(t) * df).sum(),
            "gram" => positions.len() as f64 * vf * df * (df + 1.0),
            other => bail!(
                "unknown estimator {other:?} in --estimators: use exact, sampled, readout (the A step alone), gram (the G step alone)"
            ),
        };
        for _ in 0..args.repeats {
            let t0 = Instant::now();
            match est.as_str() {
                "exact" => {
                    exact_fisher(&model, &ctx, &positions, &ExactOptions::default())?;
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
                _ => {
                    let o = SampledOptions { samples: args.samples, ..Default::default() };
                    sampled_fisher(&model, &ctx, &positions, &o)?;
                }
            }
            times.push(t0.elapsed().as_secs_f64());
        }
        let per_position = median(times) / positions.len() as f64;
        let gflops = flops / positions.len() as f64 / per_position / 1e9;
        let est_label =
            if est == "sampled" { format!("sampled S={}", args.samples) } else { est.clone() };
        println!(
            "| {} | {} | {} | {} | {} | candle cpu | {:.3} s | {:.1} | {} |",
            args.shape,
            args.layer,
            args.seq_len,
            positions.len(),
            est_label,
            per_position,
            gflops,
            peak_rss_mb().map_or("n/a".into(), |m| format!("{m:.0} MB"))
        );
    }
    Ok(())
}

/// Run `bench` (no backend compiled in).
#[cfg(not(feature = "candle"))]
pub fn run(_args: BenchArgs) -> Result<()> {
    bail!("this build has no candle backend: rebuild with `--features candle`")
}
