//! # backend-candle
//!
//! [`fs_traits::SplitModel`] implementations on [candle](https://github.com/huggingface/candle):
//! [`Gpt2`] (HF `GPT2LMHeadModel` semantics) and [`Decoder`] (the Decoder family). CPU by default;
//! the `cuda` feature adds CUDA devices (`cuda:N`).
//!
//! A model is built from the typed host weights `fs-checkpoint` reads from any source
//! (safetensors, GGUF, random): [`Gpt2::new`], [`Decoder::new`] (f32), or in f64 as a reference
//! ([`Float`]: `Gpt2::<f64>::with_scalar`). This crate holds only what candle
//! forces it to hold: the tensors and the forward / forward-mode passes (`docs/ARCHITECTURE.md`).

#![warn(missing_docs)]

mod cached;
mod decoder;
mod gpt2;
mod jvp;
pub mod ops;

pub use cached::CachedContext;
pub use candle_core::Device;
pub use decoder::Decoder;
pub use gpt2::{Gpt2, Gpt2Context};

/// The scalar a model computes in, the [`SplitModel::Scalar`](fs_traits::SplitModel::Scalar) of
/// [`Gpt2<S>`](Gpt2) and [`Decoder<S>`](Decoder): `f32` (the default, and what the CLI runs), or
/// `f64` — every weight widened to f64 once (exactly: the checkpoint's values are f32 or
/// narrower) and every pass, tangent and gradient computed in f64. The f64 models exist as a
/// reference: their derivatives can be checked against f64 finite differences to ~1e-9 (the
/// test suite's `SplitModel` contract at `Tolerances::F64`) and the f32 engines compared with
/// them. In f64 nothing is kept in stored precision (bf16/GGUF matrices are widened on load).
pub trait Float: candle_core::WithDType + fs_traits::Scalar {}

impl Float for f32 {}
impl Float for f64 {}

/// Errors of loading a model on candle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A checkpoint problem (missing file or tensor, bad config, corrupt safetensors).
    #[error(transparent)]
    Checkpoint(#[from] fs_checkpoint::CheckpointError),
    /// Invalid model data (e.g. NaN in the weights).
    #[error(transparent)]
    Model(#[from] fs_traits::FsError),
    /// An error inside candle (its first line; candle appends a backtrace when
    /// `RUST_BACKTRACE` is set).
    #[error("candle: {}", fs_traits::engine::first_line(&.0.to_string()))]
    Candle(#[from] candle_core::Error),
    /// A device that cannot be used.
    #[error("device {device:?} is not available: {reason}")]
    Device {
        /// What was asked for.
        device: String,
        /// Why it cannot be used, and the fix.
        reason: String,
    },
}

/// Open a device by name ([`fs_traits::engine::DeviceName`]): `cpu`, or `cuda` / `cuda:N`
/// (needs the `cuda` feature); candle has no wgpu device.
pub fn device(name: &str) -> Result<Device, Error> {
    use fs_traits::engine::DeviceName;
    let name = name.trim();
    let unavailable = |reason: String| Error::Device { device: name.into(), reason };
    let ordinal = match DeviceName::parse(name).map_err(unavailable)? {
        DeviceName::Cpu => return Ok(Device::Cpu),
        DeviceName::Cuda(ordinal) => ordinal.unwrap_or(0),
        DeviceName::Wgpu(_) => {
            return Err(unavailable(
                "candle has no wgpu device: use cpu or cuda:N, or --backend burn for wgpu".into(),
            ))
        }
    };
    if cfg!(feature = "cuda") {
        Device::new_cuda(ordinal)
            .map_err(|e| Error::Device { device: name.into(), reason: format!("{e}") })
    } else {
        Err(Error::Device {
            device: name.into(),
            reason: "this build has no CUDA support: rebuild fisher-stein with `--features cuda` (backend-candle: `--features cuda`)".into(),
        })
    }
}

/// The number of threads candle's CPU kernels use by default (its physical-core count, unless
/// `RAYON_NUM_THREADS` says otherwise).
///
/// candle 0.11 recomputes this on every matmul by reading the CPU topology from `/proc` unless
/// `RAYON_NUM_THREADS` is set; the `fisher-stein` binary sets that variable to this value once at
/// start-up (measured: 12% of the top-K estimator's time on the SmolLM2 shape, 5% of exact's).
pub fn default_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// The attained f32 GEMM rate of candle on this machine for `(m × k) · (k × n)`, in GFLOP/s
/// (`2·m·k·n` flops per product; median of `repeats` timed products after one warm-up). The
/// benchmark harness prints it beside the estimators so roofline ratios are measured, not assumed.
pub fn matmul_gflops(
    m: usize,
    k: usize,
    n: usize,
    repeats: usize,
    device: &Device,
) -> Result<f64, Error> {
    let a = candle_core::Tensor::ones((m, k), candle_core::DType::F32, device)?.affine(0.5, 0.0)?;
    let b =
        candle_core::Tensor::ones((k, n), candle_core::DType::F32, device)?.affine(0.25, 0.0)?;
    let _ = a.matmul(&b)?;
    let mut times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = std::time::Instant::now();
            let c = a.matmul(&b)?;
            device.synchronize()?;
            drop(c);
            Ok(t.elapsed().as_secs_f64())
        })
        .collect::<Result<_, Error>>()?;
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (m * k * n) as f64 / times[times.len() / 2] / 1e9)
}
