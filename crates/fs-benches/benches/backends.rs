//! Criterion benchmarks of every backend on the same shape: the exact and the sampled estimator
//! on a random GPT-2-small model (12 layers, d 768, V 50257; weights from
//! `fs_checkpoint::random_gpt2_weights`, identical on every engine), split at layer 6, last
//! position of a 64-token sequence, on the CPU.
//!
//! `cargo bench -p fs-benches --bench backends` (all three engines; `-- candle` etc. to pick one).
//! The context (the lower pass) is built once outside the timed loop, as in a run over many
//! positions. `fisher-stein bench --backend candle,burn,dfdx` prints the same numbers as a table
//! with GFLOP/s and each engine's GEMM rate.
use criterion::{criterion_group, criterion_main, Criterion};
use fs_checkpoint::Gpt2Config;
use fs_estimators::{exact_fisher, sampled_fisher, ExactOptions, SampledOptions, SplitModel};
use std::hint::black_box;

const LAYER: usize = 6;
const T: usize = 64;

fn config() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 50257,
        n_positions: 1024,
        n_embd: 768,
        n_layer: 12,
        n_head: 12,
        layer_norm_epsilon: 1e-5,
        activation_function: "gelu_new".into(),
        tie_word_embeddings: true,
        n_inner: None,
    }
}

fn bench_model<M: SplitModel>(c: &mut Criterion, name: &str, model: &M) {
    let tokens: Vec<u32> = (0..T).map(|i| ((i * 7919 + 13) % 50257) as u32).collect();
    let ctx = model.lower(&tokens, LAYER).expect("lower");
    let mut group = c.benchmark_group(format!("{name}/gpt2-small-L{LAYER}-T{T}"));
    group.sample_size(10);
    group.bench_function("exact", |b| {
        b.iter(|| black_box(exact_fisher(model, &ctx, &[T - 1], &ExactOptions::default()).unwrap()))
    });
    group.bench_function("sampled-S10", |b| {
        let o = SampledOptions { samples: 10, ..Default::default() };
        b.iter(|| black_box(sampled_fisher(model, &ctx, &[T - 1], &o).unwrap()))
    });
    group.finish();
}

fn candle(c: &mut Criterion) {
    let m = fs_checkpoint::Gpt2Weights::random(config(), 0.02, 0)
        .map_err(Into::into)
        .and_then(|w| backend_candle::Gpt2::new(w, &backend_candle::Device::Cpu))
        .unwrap();
    bench_model(c, "candle", &m);
}

fn burn(c: &mut Criterion) {
    let dev = backend_burn::device("cpu").unwrap();
    let m = fs_checkpoint::Gpt2Weights::random(config(), 0.02, 0)
        .map_err(Into::into)
        .and_then(|w| backend_burn::Gpt2::new(w, &dev))
        .unwrap();
    bench_model(c, "burn", &m);
}

fn dfdx(c: &mut Criterion) {
    let dev = backend_dfdx::device("cpu").unwrap();
    let m = fs_checkpoint::Gpt2Weights::random(config(), 0.02, 0)
        .map_err(Into::into)
        .and_then(|w| backend_dfdx::Gpt2::new(w, &dev))
        .unwrap();
    bench_model(c, "dfdx", &m);
}

criterion_group!(benches, candle, burn, dfdx);
criterion_main!(benches);
