//! Criterion benchmarks of every backend on the same shape: the exact and the sampled estimator
//! on a random GPT-2-small model (12 layers, d 768, V 50257; weights from
//! `fs_checkpoint::random_gpt2_weights`, identical on every engine), split at layer 6, last
//! position of a 64-token sequence, on the CPU.
//!
//! `cargo bench -p fs-benches --bench backends` (all three engines; `-- candle` etc. to pick one).
//! The context (the lower pass) is built once outside the timed loop, as in a run over many
//! positions. `fisher-stein bench --backend candle,burn,dfdx` prints the same numbers as a table
//! with GFLOP/s and each engine's GEMM rate.
//!
//! `-- stored` times candle's products with a bf16-stored weight alone.
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

/// The registry's job: benchmark the model it was handed.
struct Bench<'a>(&'a mut Criterion, &'static str);

impl fs_engines::EngineJob for Bench<'_> {
    type Output = ();
    fn run<M: SplitModel + 'static>(self, model: M) -> anyhow::Result<()> {
        bench_model(self.0, self.1, &model);
        Ok(())
    }
}

/// Every engine through the registry (`fs-engines`), on the same random weights.
fn engines(c: &mut Criterion) {
    for backend in fs_engines::Backend::ALL {
        let weights = fs_checkpoint::ModelWeights::Gpt2(
            fs_checkpoint::Gpt2Weights::random(config(), 0.02, 0).expect("random weights"),
        );
        fs_engines::Engine::open(backend, "cpu")
            .and_then(|engine| engine.run(weights, None, Bench(c, backend.name())))
            .unwrap_or_else(|e| panic!("{}: {e}", backend.name()));
    }
}

/// candle's CPU products with a weight kept in bf16 (`backend_candle::ops::stored_product`),
/// the `8192 × 2048` MLP matrix of Llama-3.2-1B, at the row counts the estimators use: 1 (a
/// primal row), 25 (a top-K block with its primal row), 400.
fn stored_products(c: &mut Criterion) {
    use backend_candle::ops::{stored_product, Side};
    let (out, inp) = (8192, 2048);
    let bytes: Vec<u8> = (0..out * inp)
        .flat_map(|i| half::bf16::from_f32(((i * 7 % 13) as f32 - 6.0) / 50.0).to_le_bytes())
        .collect();
    let w = fs_checkpoint::StoredMatrix::from_bytes(out, inp, fs_checkpoint::GgmlType::BF16, bytes)
        .expect("bf16 matrix");
    let mut group = c.benchmark_group("stored-products/bf16-8192x2048");
    group.sample_size(10);
    for rows in [1, 25, 400] {
        let x: Vec<f32> = (0..rows * inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..rows * out).map(|i| (i as f32 * 0.21).cos()).collect();
        group.bench_function(format!("x-Wt-rows{rows}"), |b| {
            b.iter(|| black_box(stored_product(&x, rows, &w, Side::Transposed)))
        });
        group.bench_function(format!("g-W-rows{rows}"), |b| {
            b.iter(|| black_box(stored_product(&g, rows, &w, Side::Plain)))
        });
    }
    group.finish();
}

criterion_group!(benches, engines, stored_products);
criterion_main!(benches);
