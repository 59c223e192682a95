//! Differentiable building blocks from dfdx's elementary ops, generic over the device and over
//! the tape (`NoneTape` for plain forward passes, `OwnedTape` when `h` is being differentiated).
//!
//! * [`gelu_new`] and [`layer_norm`] are compositions of elementary ops, so their gradients are
//!   the exact derivatives of those ops (dfdx's fused `accurate_gelu` backward is off by a factor
//!   `1/√2`, DESIGN §7, and GPT-2 uses the tanh form anyway).
//! * [`linear`] / [`Engine::const_bmm`] multiply a traced input by a *constant* matrix.
//!   dfdx's `matmul` backward always forms the gradient of both operands; the Fisher computation
//!   only ever needs `∂/∂x`, so on the CPU these record a backward op that computes just
//!   `∂L/∂X = ∂L/∂Y · Wᵀ` (a third of the backward flops and a `W`-sized buffer saved per use).

use dfdx::prelude::{
    Axes2, Axes3, Axis, BroadcastTo, Cpu, HasShape, MeanTo, NoneTape, PermuteTo, PutTape,
    ReshapeTo, SplitTape, Tape, Tensor, TryMatMul, WithEmptyTape,
};

/// A row-major matrix on a dfdx device with runtime dimensions.
pub type Mat<D, T = NoneTape> = Tensor<(usize, usize), f32, D, T>;
/// A batch of row-major matrices on a dfdx device with runtime dimensions.
pub type Batch<D, T = NoneTape> = Tensor<(usize, usize, usize), f32, D, T>;
/// A vector on a dfdx device.
pub type Vector<D> = Tensor<(usize,), f32, D>;
/// A row-major `f64` matrix on a dfdx device (the device-side Fisher's accumulators).
pub type Mat64<D> = Tensor<(usize, usize), f64, D>;

/// `√(2/π)`, the constant of the tanh-approximate GELU.
pub const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// A dfdx device this crate can run on: every dfdx `f32` kernel, plus products with constant
/// matrices whose backward pass propagates to the input only.
///
/// The provided methods use dfdx's own `matmul` (whose backward also forms the constant's
/// gradient and throws it away); [`Cpu`] overrides them with input-only backward ops.
pub trait Engine: dfdx::tensor_ops::Device<f32> + dfdx::tensor_ops::Device<f64> {
    /// `x` widened to `f64` on the device (dfdx's `to_dtype`, whose kernel trait is not public,
    /// so each device implements this with its own).
    fn widen(x: Mat<Self>) -> Mat64<Self>;

    /// `Y = X · W` for `X` `(n, in)` (traced or not) and a constant `W` `(in, out)`; the backward
    /// pass adds `∂L/∂Y · Wᵀ` to `∂L/∂X`.
    fn const_matmul<T: Tape<f32, Self>>(x: Mat<Self, T>, w: &Mat<Self>) -> Mat<Self, T> {
        x.matmul(w.clone())
    }

    /// `Y_b = X_b · W_b` for `X` `(B, n, k)` and a constant `W` `(B, k, m)` (any strides); the
    /// backward pass adds `∂L/∂Y_b · W_bᵀ` to `∂L/∂X_b`.
    fn const_bmm<T: Tape<f32, Self>>(x: Batch<Self, T>, w: &Batch<Self>) -> Batch<Self, T> {
        x.matmul(w.clone())
    }
}

impl Engine for Cpu {
    fn widen(x: Mat<Self>) -> Mat64<Self> {
        x.to_dtype::<f64>()
    }

    fn const_matmul<T: Tape<f32, Self>>(x: Mat<Self, T>, w: &Mat<Self>) -> Mat<Self, T> {
        // A contiguous input, so that its gradient buffer has the layout of `∂L/∂Y · Wᵀ`.
        let shape = *x.shape();
        let (x, mut tape) = x.reshape_like(&shape).split_tape();
        let x_ghost = x.ghost();
        let y = x.matmul(w.clone());
        let y_ghost = y.ghost();
        let w_t = w.clone().permute::<(usize, usize), Axes2<1, 0>>();
        tape.add_backward_op(move |grads| {
            let gy = grads.get(&y_ghost);
            let gx = gy.matmul(w_t).as_vec();
            let acc = grads.get_or_alloc_mut(&x_ghost)?;
            acc.iter_mut().zip(gx).for_each(|(a, g)| *a += g);
            Ok(())
        });
        y.put_tape(tape)
    }

    fn const_bmm<T: Tape<f32, Self>>(x: Batch<Self, T>, w: &Batch<Self>) -> Batch<Self, T> {
        let shape = *x.shape();
        let (x, mut tape) = x.reshape_like(&shape).split_tape();
        let x_ghost = x.ghost();
        let y = x.matmul(w.clone());
        let y_ghost = y.ghost();
        let w_t = w.clone().permute::<(usize, usize, usize), Axes3<0, 2, 1>>();
        tape.add_backward_op(move |grads| {
            let gy = grads.get(&y_ghost);
            let gx = gy.matmul(w_t).as_vec();
            let acc = grads.get_or_alloc_mut(&x_ghost)?;
            acc.iter_mut().zip(gx).for_each(|(a, g)| *a += g);
            Ok(())
        });
        y.put_tape(tape)
    }
}

#[cfg(feature = "cuda")]
impl Engine for dfdx::tensor::Cuda {
    fn widen(x: Mat<Self>) -> Mat64<Self> {
        x.to_dtype::<f64>()
    }
}

/// `x · W + b` for `x` `(n, in)`, `W` stored `[in, out]` (HF Conv1D layout), `b` `[out]`; `W`
/// and `b` are constants (only `x` receives a gradient).
pub fn linear<D: Engine, T: Tape<f32, D>>(x: Mat<D, T>, w: &Mat<D>, b: &Vector<D>) -> Mat<D, T> {
    let y = D::const_matmul(x, w);
    let shape = *y.shape();
    y + b.clone().broadcast_like::<_, Axis<0>>(&shape)
}

/// GPT-2's `gelu_new`, elementwise:
///
/// ```text
///     g(x) = ½·x·(1 + tanh u),   u = √(2/π)·(x + 0.044715·x³),
///     g'(x) = ½·(1 + tanh u) + ½·x·(1 − tanh² u)·√(2/π)·(1 + 3·0.044715·x²)
/// ```
///
/// built from `square`, `mul`, `add` and `tanh`, whose backward passes give `g'` exactly (up to
/// round-off).
pub fn gelu_new<S, D, T>(x: Tensor<S, f32, D, T>) -> Tensor<S, f32, D, T>
where
    S: dfdx::shapes::Shape,
    D: Engine,
    T: Tape<f32, D>,
{
    let cube = x.with_empty_tape().square() * x.with_empty_tape();
    let inner = (x.with_empty_tape() + cube * 0.044715f32) * SQRT_2_OVER_PI;
    let gate = inner.tanh() * 0.5f32 + 0.5f32;
    x * gate
}

/// LayerNorm over the last dimension of `x` `(n, d)`, as `torch.nn.LayerNorm` (biased variance):
///
/// ```text
///     y = (x − μ) / √(σ² + ε) · γ + β,   μ = mean(x),   σ² = mean((x − μ)²)
/// ```
pub fn layer_norm<D: Engine, T: Tape<f32, D>>(
    x: Mat<D, T>,
    gamma: &Vector<D>,
    beta: &Vector<D>,
    eps: f64,
) -> Mat<D, T> {
    let shape = *x.shape();
    let mean = x.with_empty_tape().mean::<(usize,), Axis<1>>();
    let centered = x - mean.broadcast_like::<_, Axis<1>>(&shape);
    let var = centered.with_empty_tape().square().mean::<(usize,), Axis<1>>();
    let std = (var + eps as f32).sqrt();
    let normed = centered / std.broadcast_like::<_, Axis<1>>(&shape);
    normed * gamma.clone().broadcast_like::<_, Axis<0>>(&shape)
        + beta.clone().broadcast_like::<_, Axis<0>>(&shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfdx::prelude::*;

    fn gelu_f64(x: f64) -> f64 {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
    }

    /// Gradient of `Σ w_i f(x)_i` by dfdx's backward pass.
    fn grad_of(
        dev: &Cpu,
        xs: &[f32],
        f: impl Fn(
            Tensor<(usize,), f32, Cpu, OwnedTape<f32, Cpu>>,
        ) -> Tensor<(usize,), f32, Cpu, OwnedTape<f32, Cpu>>,
        w: &[f32],
    ) -> Vec<f32> {
        let x = dev.tensor_from_vec(xs.to_vec(), (xs.len(),));
        let wt = dev.tensor_from_vec(w.to_vec(), (w.len(),));
        let g = (f(x.leaky_trace()) * wt).sum::<Rank0, _>().backward();
        g.get(&x).as_vec()
    }

    #[test]
    fn gelu_new_value_and_gradient_match_f64_finite_differences() {
        let dev = Cpu::default();
        let xs = [-5.0f32, -3.0, -1.3, -0.5, -0.2, 0.0, 0.4, 0.7, 1.7, 2.5, 5.0];
        let x = dev.tensor_from_vec(xs.to_vec(), (xs.len(),));
        let y = gelu_new(x).as_vec();
        for (&xi, yi) in xs.iter().zip(&y) {
            let e = gelu_f64(xi as f64);
            assert!((e - *yi as f64).abs() <= 1e-6 * (1.0 + e.abs()), "g({xi}) = {yi} vs {e}");
        }
        let ones = vec![1.0f32; xs.len()];
        let g = grad_of(&dev, &xs, gelu_new, &ones);
        for (&xi, gi) in xs.iter().zip(&g) {
            let x = xi as f64;
            let fd = (gelu_f64(x + 1e-6) - gelu_f64(x - 1e-6)) / 2e-6;
            assert!(
                (*gi as f64 - fd).abs() <= 2e-6 * (1.0 + fd.abs()),
                "g'({xi}): dfdx {gi} vs f64 finite differences {fd}"
            );
        }
    }

    #[test]
    fn dfdx_accurate_gelu_is_not_what_gpt2_needs() {
        // Documents why gelu_new is composed: dfdx's fused GELU is the erf form, and its backward
        // pass is off (DESIGN §7). If this starts failing, dfdx's kernel changed.
        let dev = Cpu::default();
        let xs = [0.7f32];
        let g = grad_of(&dev, &xs, |x| x.accurate_gelu(), &[1.0]);
        let erf_gelu = |x: f64| 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2));
        let fd = (erf_gelu(0.7 + 1e-6) - erf_gelu(0.7 - 1e-6)) / 2e-6;
        assert!((g[0] as f64 - fd).abs() > 1e-2, "dfdx accurate_gelu backward {} vs {fd}", g[0]);
    }

    /// `erf` by its Maclaurin series (enough terms for |x| < 1).
    fn erf(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..40 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }

    #[test]
    fn layer_norm_value_and_gradient() {
        let dev = Cpu::default();
        let gamma = [1.3f32, 0.7, -0.4, 2.0];
        let beta = [0.1f32, -0.2, 0.3, 0.0];
        let w = [0.3f32, -1.1, 0.5, 0.9, 1.2, -0.3, 0.25, 0.6];
        let xs = [0.5f32, -1.0, 2.0, 0.25, 1.5, 1.25, -0.75, 3.0];
        let ln64 = |x: &[f64]| -> f64 {
            let mut total = 0.0;
            for (r, row) in x.chunks(4).enumerate() {
                let mu = row.iter().sum::<f64>() / 4.0;
                let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / 4.0;
                for j in 0..4 {
                    let y = (row[j] - mu) / (var + 1e-5).sqrt() * gamma[j] as f64 + beta[j] as f64;
                    total += y * w[r * 4 + j] as f64;
                }
            }
            total
        };
        let g_t = dev.tensor_from_vec(gamma.to_vec(), (4,));
        let b_t = dev.tensor_from_vec(beta.to_vec(), (4,));
        let x = dev.tensor_from_vec(xs.to_vec(), (2usize, 4usize));
        let wt = dev.tensor_from_vec(w.to_vec(), (2usize, 4usize));
        let y = layer_norm(x.leaky_trace(), &g_t, &b_t, 1e-5);
        let grads = (y * wt).sum::<Rank0, _>().backward();
        let g = grads.get(&x).as_vec();
        let x64: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
        for i in 0..xs.len() {
            let mut p = x64.clone();
            p[i] += 1e-6;
            let mut m = x64.clone();
            m[i] -= 1e-6;
            let fd = (ln64(&p) - ln64(&m)) / 2e-6;
            assert!((g[i] as f64 - fd).abs() <= 1e-4 * (1.0 + fd.abs()), "i={i}: {} vs {fd}", g[i]);
        }
    }

    #[test]
    fn const_products_propagate_only_to_the_input_and_match_matmul() {
        let dev = Cpu::default();
        let xs: Vec<f32> = (0..6).map(|i| 0.3 * i as f32 - 0.7).collect();
        let ws: Vec<f32> = (0..12).map(|i| 0.1 * i as f32 - 0.5).collect();
        let cs: Vec<f32> = (0..8).map(|i| 0.2 * i as f32 - 0.4).collect();
        let w = dev.tensor_from_vec(ws.clone(), (3usize, 4usize));
        let c = dev.tensor_from_vec(cs.clone(), (2usize, 4usize));
        let x = dev.tensor_from_vec(xs.clone(), (2usize, 3usize));
        // Reference: dfdx's own matmul.
        let reference = (x.leaky_trace().matmul(w.clone()) * c.clone()).sum::<Rank0, _>();
        let want_y = x.clone().matmul(w.clone()).as_vec();
        let want_g = reference.backward().get(&x).as_vec();
        let y = Cpu::const_matmul(x.leaky_trace(), &w);
        assert_eq!(y.as_vec(), want_y);
        let g = (y * c.clone()).sum::<Rank0, _>().backward().get(&x).as_vec();
        for (a, b) in g.iter().zip(&want_g) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
        // Batched, with a transposed (strided) constant.
        let xb = dev.tensor_from_vec(xs.clone(), (2usize, 1usize, 3usize));
        let wb = dev.tensor_from_vec([ws.clone(), ws].concat(), (2usize, 4usize, 3usize));
        let wb_t = wb.clone().permute::<(usize, usize, usize), Axes3<0, 2, 1>>();
        let cb = dev.tensor_from_vec(cs.clone(), (2usize, 1usize, 4usize));
        let reference = (xb.leaky_trace().matmul(wb_t.clone()) * cb.clone()).sum::<Rank0, _>();
        let want_g = reference.backward().get(&xb).as_vec();
        let y = Cpu::const_bmm(xb.leaky_trace(), &wb_t);
        assert_eq!(y.as_vec(), xb.clone().matmul(wb_t.clone()).as_vec());
        let g = (y * cb).sum::<Rank0, _>().backward().get(&xb).as_vec();
        for (a, b) in g.iter().zip(&want_g) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }
}
