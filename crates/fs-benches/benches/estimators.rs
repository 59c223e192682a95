//! Criterion benchmarks of the exact estimator's heavy step, on the GPT-2-small shape.
//!
//! `cargo bench -p fs-benches --bench estimators`
//!
//! * `weighted_gram/centered` — `fs_estimators::centered_output_gram`: `G = Σ_y p_y (w_y − m)(w_y − m)ᵀ`
//!   over `V = 50257`, `d = 768`, f32 products with f64 accumulation (what the exact estimator runs).
//! * `weighted_gram/faer_full_matmul` — faer's plain `XᵀX` on a `V × d` f32 matrix (same shape).
//! * `weighted_gram/faer_lower_matmul` — faer's lower-triangular `XᵀX` (the kernel the estimator uses).
//!
//! Throughput is reported in "elements" = useful flops of a symmetric rank-V update, `V·d·(d+1)`
//! (one multiply-add per lower-triangle entry per row, counted as 2 flops): elem/s = flop/s.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{matmul as tri, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};
use fs_estimators::{centered_output_gram, softmax, Matrix, Threads};
use std::hint::black_box;

const V: usize = 50257;
const D: usize = 768;

fn inputs() -> (Matrix<f32>, Vec<f64>) {
    let w = Matrix::from_fn(V, D, |i, j| {
        (((i * 131 + j * 71 + i * j) % 1009) as f32 / 504.5 - 1.0) * 0.1
    });
    let z: Vec<f32> = (0..V).map(|i| ((i * 7919) % 1013) as f32 / 100.0).collect();
    (w, softmax(&z).unwrap())
}

fn weighted_gram(c: &mut Criterion) {
    let (w, p) = inputs();
    let mut g = c.benchmark_group("weighted_gram");
    g.sample_size(10);
    g.throughput(Throughput::Elements((V * D * (D + 1)) as u64));
    g.bench_function("centered", |b| {
        b.iter(|| black_box(centered_output_gram(w.view(), &p, 2048, Threads(0)).unwrap()))
    });
    let x = MatRef::from_row_major_slice(w.as_slice(), V, D);
    let par = Par::rayon(0);
    let mut dst = Mat::<f32>::zeros(D, D);
    g.bench_function("faer_full_matmul", |b| {
        b.iter(|| matmul(dst.as_mut(), Accum::Replace, x.transpose(), x, 1.0f32, par))
    });
    g.bench_function("faer_lower_matmul", |b| {
        b.iter(|| {
            tri(
                dst.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Replace,
                x.transpose(),
                BlockStructure::Rectangular,
                x,
                BlockStructure::Rectangular,
                1.0f32,
                par,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, weighted_gram);
criterion_main!(benches);
