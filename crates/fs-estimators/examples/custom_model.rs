//! Bring your own model: implement `SplitModel` for a toy that is none of our backends and get
//! the exact, sampled and closed-form Fisher plus its spectrum. Run with
//! `cargo run -p fs-estimators --example custom_model`.
//!
//! The model: `h_t = E[x_t] · (1 + t/8)`, readout `u = silu(h) = h ⊙ σ(h)`, logits `z = W u`.
//! So `A = ∂u/∂h = diag(σ(h)(1 + h(1 − σ(h))))` and `W_U = W`. Score gradients and `extend`
//! use the trait's defaults.
use fs_estimators::*;

/// `E` (`V × d`) and `W` (`V × d`).
struct SiluModel(Matrix<f64>, Matrix<f64>);
/// The tokens and their activations `H_0` (`T × d`).
struct Ctx(Vec<u32>, Matrix<f64>);

impl SplitContext for Ctx {
    fn layer(&self) -> usize {
        0
    }
    fn tokens(&self) -> &[u32] {
        &self.0
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl SplitModel for SiluModel {
    type Scalar = f64;
    type Context = Ctx;
    fn dims(&self) -> ModelDims {
        let (vocab_size, d) = self.1.shape();
        let (d_model, readout_dim, n_layers, max_seq_len) = (d, d, 0, None);
        ModelDims { d_model, readout_dim, vocab_size, n_layers, max_seq_len }
    }
    fn lower(&self, tokens: &[u32], layer: usize) -> Result<Ctx> {
        check_layer(layer, 0)?;
        check_tokens(tokens, self.0.rows(), None)?;
        let scale = |t: usize| 1.0 + t as f64 / 8.0;
        let h = Matrix::from_fn(tokens.len(), self.0.cols(), |t, j| {
            self.0.get(tokens[t] as usize, j) * scale(t)
        });
        Ok(Ctx(tokens.to_vec(), h))
    }
    fn activation(&self, ctx: &Ctx, t: usize) -> Result<Vec<f64>> {
        check_position(t, ctx.seq_len())?;
        Ok(ctx.1.row(t).to_vec())
    }
    fn upper_logits(&self, ctx: &Ctx, t: usize, h: &[f64]) -> Result<Vec<f64>> {
        check_position(t, ctx.seq_len())?;
        check_len("h", h.len(), self.1.cols())?;
        let u: Vec<f64> = h.iter().map(|&x| x * sigmoid(x)).collect();
        let dot = |w: &[f64]| w.iter().zip(&u).map(|(a, b)| a * b).sum();
        Ok((0..self.1.rows()).map(|y| dot(self.1.row(y))).collect())
    }
    fn readout_jacobians(&self, ctx: &Ctx, positions: &[usize]) -> Result<Vec<Matrix<f64>>> {
        let jacobian = |h: Vec<f64>| {
            let diag = |x: f64| sigmoid(x) * (1.0 + x * (1.0 - sigmoid(x)));
            Matrix::from_fn(h.len(), h.len(), |i, j| if i == j { diag(h[i]) } else { 0.0 })
        };
        positions.iter().map(|&t| Ok(jacobian(self.activation(ctx, t)?))).collect()
    }
    fn unembedding(&self) -> Unembedding<'_, f64> {
        (&self.1).into()
    }
}

pub fn main() {
    let (v, d) = (50, 8);
    let e = Matrix::from_fn(v, d, |i, j| ((i * 37 + j * 91 + i * j) % 101) as f64 / 50.0 - 1.0);
    let w = Matrix::from_fn(v, d, |i, j| ((i * 53 + j * 29 + 3 * i * j) % 89) as f64 / 22.0 - 2.0);
    let model = SiluModel(e, w);
    let ctx = model.lower(&[3, 14, 15, 9, 26], 0).expect("valid tokens");
    let (t, opts) = (4, ExactOptions::default());
    let exact = exact_fisher(&model, &ctx, &[t], &opts).expect("exact").remove(0);
    let closed = closed_form_fisher_at(&model, &ctx, &[t], GradientKind::Logits, &opts);
    let closed = closed.expect("closed form").remove(0);
    let sampling = SampledOptions { samples: 20_000, seed: 1, ..Default::default() };
    let sampled = sampled_fisher(&model, &ctx, &[t], &sampling).expect("sampled").remove(0);
    let s = spectrum(&exact, Some(3)).expect("spectrum");
    println!(
        "exact F at t={t}: trace {:.4}, top eigenvalues {:.4?}, effective rank {:.2}, PR {:.2}",
        s.trace, s.eigenvalues, s.effective_rank, s.participation_ratio
    );
    let (e_closed, e_sampled) =
        (relative_frobenius(&closed, &exact), relative_frobenius(&sampled.fisher, &exact));
    println!("closed form vs exact: relative Frobenius {e_closed:.2e}");
    println!("sampled (S = 20000) vs exact: relative Frobenius {e_sampled:.3}");
    assert!(e_closed < 1e-10 && e_sampled < 0.05);
}
