//! Differentiable building blocks from burn's elementary ops.
//!
//! Their gradients are the exact derivatives of the elementary ops (`mul`, `add`, `tanh`, `sqrt`,
//! `exp`, `mean_dim`, …). DESIGN §7 measured a fused GELU backward with 6-digit constants (error
//! ~1e-3) in burn-ndarray, so GELU is composed here, independent of which kernels a burn backend
//! fuses, and its gradient is tested against `f64` finite differences. (In burn 0.22.1,
//! `activation::gelu_approximate` is itself composed of elementary ops and passes the same check.)
//!
//! All functions act on the last dimension of a tensor of any rank `D`; per-feature parameters
//! (`γ`, `β`, biases) are rank-1 tensors broadcast over the leading dimensions.

use burn::tensor::Tensor;

/// `√(2/π)`, the constant of the tanh-approximate GELU.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// GPT-2's `gelu_new` (the tanh approximation of GELU):
///
/// ```text
///     g(x) = 0.5·x·(1 + tanh u),   u = √(2/π)·(x + 0.044715·x³)
///     g'(x) = 0.5·(1 + tanh u) + 0.5·x·(1 − tanh² u)·√(2/π)·(1 + 3·0.044715·x²)
/// ```
///
/// composed of `mul`, `add` and `tanh`, so autodiff produces `g'` exactly (up to round-off).
pub fn gelu_new<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let cube = x.clone().mul(x.clone()).mul(x.clone());
    let inner = x.clone().add(cube.mul_scalar(0.044715)).mul_scalar(SQRT_2_OVER_PI);
    let gate = inner.tanh().mul_scalar(0.5).add_scalar(0.5);
    x.mul(gate)
}

/// SiLU `x·σ(x)` (the SwiGLU gate). burn's `sigmoid` backward is `σ(1 − σ)` from the forward
/// output, which is exact.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    burn::tensor::activation::silu(x)
}

/// The erf GELU `½x(1 + erf(x/√2))` (`hidden_act: "gelu"`), from `erf` (whose autodiff
/// derivative `2/√π·e^(−x²)` is exact).
pub fn gelu_erf<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let phi =
        x.clone().mul_scalar(std::f64::consts::FRAC_1_SQRT_2).erf().mul_scalar(0.5).add_scalar(0.5);
    x.mul(phi)
}

/// An MLP activation: SiLU, the tanh GELU [`gelu_new`] or the erf GELU [`gelu_erf`].
pub fn activation<const D: usize>(x: Tensor<D>, act: fs_checkpoint::Activation) -> Tensor<D> {
    use fs_checkpoint::Activation as A;
    match act {
        A::Silu => silu(x),
        A::GeluTanh => gelu_new(x),
        A::GeluErf => gelu_erf(x),
    }
}

/// A rank-1 parameter `[n]` viewed as `[1, …, 1, n]` so that it broadcasts against a rank-`D`
/// tensor's last dimension.
pub fn broadcast_last<const D: usize>(p: &Tensor<1>) -> Tensor<D> {
    p.clone().unsqueeze::<D>()
}

/// LayerNorm over the last dimension, as `torch.nn.LayerNorm` (biased variance):
///
/// ```text
///     y = (x − μ) / √(σ² + ε) · γ + β,   μ = mean(x),   σ² = mean((x − μ)²)
/// ```
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    let mean = x.clone().mean_dim(D - 1);
    let centered = x.sub(mean);
    let var = centered.clone().mul(centered.clone()).mean_dim(D - 1);
    let normed = centered.div(var.add_scalar(eps).sqrt());
    normed.mul(broadcast_last(gamma)).add(broadcast_last(beta))
}

/// RMSNorm over the last dimension (Llama): `y = x / √(mean(x²) + ε) · w`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: &Tensor<1>, eps: f64) -> Tensor<D> {
    let ms = x.clone().mul(x.clone()).mean_dim(D - 1);
    x.div(ms.add_scalar(eps).sqrt()).mul(broadcast_last(weight))
}

/// Softmax over the last dimension: `softmax(x)_j = e^{x_j − m} / Σ_k e^{x_k − m}`, `m = max x`.
/// The max is detached (a constant): neither the result nor its gradient depends on the shift.
pub fn softmax_last_dim<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let max = x.clone().detach().max_dim(D - 1).detach();
    let e = x.sub(max).exp();
    let s = e.clone().sum_dim(D - 1);
    e.div(s)
}

/// `x · W + b` for `x` of shape `(…, in)`, `W` stored `[in, out]` (HF Conv1D layout), `b` `[out]`.
///
/// The leading dimensions are flattened into one GEMM. `W` and `b` live on the plain
/// (non-autodiff) device, so when `x` is tracked burn treats them as constants and the backward
/// pass forms only `∂L/∂x = ∂L/∂y · Wᵀ`, never the weight gradient.
pub fn linear<const D: usize>(x: Tensor<D>, w: &Tensor<2>, b: Option<&Tensor<1>>) -> Tensor<D> {
    let dims = x.dims();
    let inp = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let [_, out] = w.dims();
    let y = x.reshape([rows, inp]).matmul(w.clone());
    let y = match b {
        Some(b) => y.add(b.clone().unsqueeze::<2>()),
        None => y,
    };
    let mut out_dims = dims;
    out_dims[D - 1] = out;
    y.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Device, TensorData};

    fn f64_tensor(values: &[f64], device: &Device) -> Tensor<1> {
        Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), (device, DType::F64))
    }

    fn to_f64(t: Tensor<1>) -> Vec<f64> {
        t.try_into_vec_as::<f64>().unwrap()
    }

    /// `∂/∂x_i Σ f(x)` by autodiff against central differences in `f64`.
    fn fd_check(f: impl Fn(Tensor<1>) -> Tensor<1>, xs: &[f64]) {
        let dev = Device::flex().autodiff();
        let x = f64_tensor(xs, &dev).require_grad();
        let y = f(x.clone()).sum();
        let grads = y.backward();
        let g = to_f64(x.grad(&grads).expect("gradient reaches x"));
        let plain = Device::flex();
        for i in 0..xs.len() {
            let eval = |delta: f64| {
                let mut v = xs.to_vec();
                v[i] += delta;
                to_f64(f(f64_tensor(&v, &plain)).sum())[0]
            };
            let fd = (eval(1e-6) - eval(-1e-6)) / 2e-6;
            assert!((g[i] - fd).abs() < 1e-8 * (1.0 + fd.abs()), "i={i}: {} vs {fd}", g[i]);
        }
    }

    #[test]
    fn gelu_new_value_and_gradient() {
        let xs = [-5.0f64, -3.0, -1.3, -0.5, 0.0, 0.4, 0.7, 1.7, 2.5, 6.0];
        let y = to_f64(gelu_new(f64_tensor(&xs, &Device::flex())));
        for (xi, yi) in xs.iter().zip(y) {
            let e = 0.5 * xi * (1.0 + (SQRT_2_OVER_PI * (xi + 0.044715 * xi.powi(3))).tanh());
            assert!((e - yi).abs() < 1e-15, "{xi}: {yi} vs {e}");
        }
        fd_check(gelu_new, &xs);
        // The analytic derivative, to 1e-12: the composed op is as good as a fused exact one.
        let dev = Device::flex().autodiff();
        let x = f64_tensor(&xs, &dev).require_grad();
        let g = to_f64(x.grad(&gelu_new(x.clone()).sum().backward()).unwrap());
        for (xi, gi) in xs.iter().zip(g) {
            let th = (SQRT_2_OVER_PI * (xi + 0.044715 * xi.powi(3))).tanh();
            let e = 0.5 * (1.0 + th)
                + 0.5 * xi * (1.0 - th * th) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * xi * xi);
            assert!((e - gi).abs() < 1e-12, "{xi}: {gi} vs {e}");
        }
    }

    #[test]
    fn norms_softmax_and_silu_gradients() {
        let dev = Device::flex();
        let gamma = f64_tensor(&[1.3, 0.7, -0.4, 2.0], &dev);
        let beta = f64_tensor(&[0.1, -0.2, 0.3, 0.0], &dev);
        let w = f64_tensor(&[0.3, -1.1, 0.5, 0.9], &dev);
        let xs = [0.5, -1.0, 2.0, 0.25];
        fd_check(|x| layer_norm(x, &gamma, &beta, 1e-5).mul(w.clone()), &xs);
        fd_check(|x| rms_norm(x, &gamma, 1e-6).mul(w.clone()), &xs);
        fd_check(|x| softmax_last_dim(x).mul(w.clone()), &xs);
        fd_check(|x| silu(x).mul(w.clone()), &[-30.0, -1.0, 0.0, 2.0]);
    }

    #[test]
    fn linear_matches_the_conv1d_convention_and_its_input_gradient() {
        let dev = Device::flex();
        let w: Tensor<2> = Tensor::from_data(
            TensorData::new(vec![0.5f64, -1.0, 2.0, 1.5, 0.25, -0.75], [2, 3]),
            (&dev, DType::F64),
        );
        let b = f64_tensor(&[0.1, 0.2, 0.3], &dev);
        let x: Tensor<2> = Tensor::from_data(
            TensorData::new(vec![1.0f64, 2.0, -1.0, 0.5], [2, 2]),
            (&dev, DType::F64),
        );
        let y = linear(x, &w, Some(&b)).try_into_vec_as::<f64>().unwrap();
        // Row 0: [1, 2]·W + b; row 1: [−1, 0.5]·W + b.
        let expected = [3.6, -0.3, 0.8, 0.35, 1.325, -2.075];
        for (a, e) in y.iter().zip(expected) {
            assert!((a - e).abs() < 1e-12, "{y:?}");
        }
        let c = f64_tensor(&[0.3, -1.1, 0.5, 0.9, 0.2, -0.4], &dev);
        fd_check(
            |x| linear(x.reshape([2, 2]), &w, Some(&b)).reshape([6]).mul(c.clone()),
            &[1.0, 2.0, -1.0, 0.5],
        );
    }
}
