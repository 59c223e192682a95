//! A model that lends `W_U` only as rows widened on demand (`Unembedding::Rows`, as the candle
//! backend does for bf16 and quantised checkpoints) gets the same estimates as the same model
//! lending it whole: the estimators stream `W_U` in chunks either way, chunk boundaries and all.

use std::ops::Range;

use fs_estimators::analytic::{AnalyticContext, TanhModel};
use fs_estimators::{
    closed_form_fisher_at, direction_effects, exact_fisher, top_k_fisher, DirectionOptions,
    ExactOptions, GradientKind, Matrix, ModelDims, Result, SplitModel, TopKOptions, Unembedding,
    UnembeddingRows,
};

/// `TanhModel<f32>` with every method delegated except `unembedding` (rows on demand, counted)
/// and `score_gradients` (the trait's default, which reads `W_U` through `unembedding`).
struct RowsOnly {
    inner: TanhModel<f32>,
    dense: Matrix<f32>,
    reads: std::sync::atomic::AtomicUsize,
}

impl UnembeddingRows<f32> for RowsOnly {
    fn shape(&self) -> (usize, usize) {
        self.dense.shape()
    }
    fn read_rows(&self, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let du = self.dense.cols();
        out.copy_from_slice(&self.dense.as_slice()[rows.start * du..rows.end * du]);
        Ok(())
    }
}

impl SplitModel for RowsOnly {
    type Scalar = f32;
    type Context = AnalyticContext<f32>;
    fn dims(&self) -> ModelDims {
        self.inner.dims()
    }
    fn lower(&self, tokens: &[u32], layer: usize) -> Result<Self::Context> {
        self.inner.lower(tokens, layer)
    }
    fn activation(&self, ctx: &Self::Context, position: usize) -> Result<Vec<f32>> {
        self.inner.activation(ctx, position)
    }
    fn upper_logits(&self, ctx: &Self::Context, position: usize, h: &[f32]) -> Result<Vec<f32>> {
        self.inner.upper_logits(ctx, position, h)
    }
    fn readout_jacobians(
        &self,
        ctx: &Self::Context,
        positions: &[usize],
    ) -> Result<Vec<Matrix<f32>>> {
        self.inner.readout_jacobians(ctx, positions)
    }
    fn unembedding(&self) -> Unembedding<'_, f32> {
        Unembedding::Rows(self)
    }
}

#[test]
fn rows_on_demand_give_the_dense_estimates() {
    // V = 5000 > the 2048-row default chunk, so every streaming loop crosses chunk boundaries.
    let inner = TanhModel::<f64>::random(5000, 12, 10, 4, 0.8, 3).cast::<f32>();
    let dense = inner.unembedding().to_matrix().unwrap();
    let rows = RowsOnly { inner: inner.clone(), dense, reads: Default::default() };
    let (ctx_d, ctx_r) = (inner.lower(&[5, 7, 9], 0).unwrap(), rows.lower(&[5, 7, 9], 0).unwrap());
    let positions = [0, 2];

    // A small vocab chunk (not a divisor of V) for the Gram as well.
    let opts = ExactOptions { vocab_chunk: 700, ..ExactOptions::default() };
    assert_eq!(
        exact_fisher(&inner, &ctx_d, &positions, &opts).unwrap(),
        exact_fisher(&rows, &ctx_r, &positions, &opts).unwrap()
    );
    for kind in [GradientKind::Logits, GradientKind::LogProbs] {
        assert_eq!(
            closed_form_fisher_at(&inner, &ctx_d, &positions, kind, &opts).unwrap(),
            closed_form_fisher_at(&rows, &ctx_r, &positions, kind, &opts).unwrap()
        );
    }
    let topk = TopKOptions::default();
    let (a, b) = (
        top_k_fisher(&inner, &ctx_d, 2, &topk).unwrap(),
        top_k_fisher(&rows, &ctx_r, 2, &topk).unwrap(),
    );
    assert_eq!(a.eigenvalues, b.eigenvalues);
    assert_eq!(a.eigenvectors, b.eigenvectors);
    let v = Matrix::from_fn(12, 2, |i, j| ((i * 3 + j) as f64).cos());
    let (a, b) = (
        direction_effects(&inner, &ctx_d, 1, &v, &DirectionOptions::default()).unwrap(),
        direction_effects(&rows, &ctx_r, 1, &v, &DirectionOptions::default()).unwrap(),
    );
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(a.logit_change, b.logit_change);
    }
    // The trait's default score gradients (through `unembedding`) against the model's own.
    let tokens = [0u32, 4999, 2048, 17];
    let (own, default) = (
        inner.score_gradients(&ctx_d, 1, &tokens).unwrap(),
        rows.score_gradients(&ctx_r, 1, &tokens).unwrap(),
    );
    let scale = own.as_slice().iter().fold(0f32, |m, x| m.max(x.abs()));
    for (x, y) in own.as_slice().iter().zip(default.as_slice()) {
        assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}");
    }
    assert!(rows.reads.load(std::sync::atomic::Ordering::Relaxed) > 10, "W_U was read in chunks");
}
