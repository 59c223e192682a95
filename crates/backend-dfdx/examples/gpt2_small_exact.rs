//! Rough timing of the dfdx backend on a GPT-2-small-shaped random model (12 layers, d 768,
//! 12 heads, V 50257; `Gpt2Weights::random(cfg, 0.02, 0)`), split at layer 6, last position of a
//! 64-token sequence: the lower pass, the readout Jacobian `A` (768 VJPs in batched backward
//! passes), the exact Fisher `F = Aᵀ G A` and 10 score gradients.
//!
//! `cargo run --release -p backend-dfdx --example gpt2_small_exact [repeats]`
//! (the criterion benchmark of every engine is `cargo bench -p fs-benches --bench backends`).

use backend_dfdx::{device, Gpt2};
use fs_checkpoint::Gpt2Config;
use fs_estimators::{exact_fisher, ExactOptions, SplitModel};
use std::time::Instant;

fn peak_rss_mib() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM")).map(|l| l[6..].trim().to_string()))
        .unwrap_or_else(|| "?".into())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repeats: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let cfg = Gpt2Config {
        vocab_size: 50257,
        n_positions: 1024,
        n_embd: 768,
        n_layer: 12,
        n_head: 12,
        layer_norm_epsilon: 1e-5,
        activation_function: "gelu_new".into(),
        tie_word_embeddings: true,
        n_inner: None,
    };
    let (layer, t_len) = (6, 64);
    let gemm = backend_dfdx::matmul_gflops(768, 768, 3072, 5, &device("cpu")?)?;
    println!("dfdx f32 GEMM (768×768)·(768×3072): {gemm:.1} GFLOP/s");
    let t0 = Instant::now();
    let weights = fs_checkpoint::Gpt2Weights::random(cfg, 0.02, 0)?;
    let parameters = weights.parameter_count();
    let model = Gpt2::new(weights, &device("cpu")?)?;
    println!("build: {:.2} s ({parameters} parameters)", t0.elapsed().as_secs_f64());
    let tokens: Vec<u32> = (0..t_len).map(|i| ((i * 7919 + 13) % 50257) as u32).collect();
    let t0 = Instant::now();
    let ctx = model.lower(&tokens, layer)?;
    println!("lower (T = {t_len}): {:.3} s", t0.elapsed().as_secs_f64());
    let last = [t_len - 1];
    for r in 0..repeats {
        let t0 = Instant::now();
        let a = model.readout_jacobians(&ctx, &last)?;
        let t_a = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let f = exact_fisher(&model, &ctx, &last, &ExactOptions::default())?;
        let t_f = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let g = model.score_gradients(&ctx, t_len - 1, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])?;
        let t_g = t0.elapsed().as_secs_f64();
        let trace: f64 = (0..768).map(|i| f[0].get(i, i)).sum();
        println!(
            "run {r}: readout Jacobian A {t_a:.2} s | exact F (A + G + AᵀGA) {t_f:.2} s | 10 score gradients {t_g:.2} s | tr F {trace:.4e} | |A| {} x {} | g {} x {}",
            a[0].rows(),
            a[0].cols(),
            g.rows(),
            g.cols()
        );
    }
    println!("peak RSS: {}", peak_rss_mib());
    Ok(())
}
