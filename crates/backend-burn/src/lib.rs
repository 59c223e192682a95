//! # backend-burn
//!
//! [`fs_traits::SplitModel`] implementations on [burn](https://burn.dev) 0.22: [`Gpt2`] (HF
//! `GPT2LMHeadModel` semantics) and [`Decoder`] (the Decoder family: Decoder, Mistral, Qwen2,
//! SmolLM). The public face mirrors `backend-candle` (`Gpt2`, `Decoder`, [`Device`], [`device`],
//! [`Error`]) so the CLI and the shared test suite can swap engines.
//!
//! ## Engine
//!
//! burn 0.22 carries the backend in the [`Device`] rather than in a type parameter, and autodiff
//! is a property of the device (`device.autodiff()`). The CPU device is burn's **flex** backend
//! (`Device::flex()`, pure Rust, `gemm` matmuls, multi-threaded through rayon and with SIMD
//! elementwise kernels): it builds faster than the deprecated ndarray backend and its matmul is
//! up to twice as fast on this machine (DESIGN §7). `wgpu` devices come with the `wgpu` feature,
//! CUDA devices with the `cuda` feature (see [`device`]).
//!
//! ## What runs where
//!
//! Weights and every forward pass live on the plain (non-autodiff) device. Only the replicated
//! activation rows `h` of a readout-Jacobian or score-gradient pass are created on the autodiff
//! view of the device and marked `require_grad`: burn treats the weights they meet as constants,
//! so the backward pass computes input gradients only — no weight gradients, no weight-sized
//! buffers.
//!
//! ## Numerics
//!
//! GELU (tanh form), LayerNorm, RMSNorm and softmax are built from elementary ops in [`ops`]: their
//! gradients are then the exact derivatives of the elementary ops (burn's fused GELU backward
//! uses 6-digit constants, DESIGN §7). Everything runs in `f32`.
//!
//! Loading goes through `fs-checkpoint` (config parsing, safetensors headers checked before any
//! allocation, HF cache resolution, deterministic random weights), shared with the other
//! backends; this crate holds only what burn forces it to hold: the tensors and the passes.

#![warn(missing_docs)]

mod cached;
mod decoder;
mod gpt2;
pub mod ops;

pub use burn::tensor::Device;
pub use cached::CachedContext;
pub use decoder::Decoder;
pub use gpt2::{Gpt2, Gpt2Context};

/// Errors of loading a model on burn (the same variants as `backend_candle::Error` where they
/// apply, so the same bad input gives the same kind of error on every backend).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A checkpoint problem (missing file or tensor, bad config, corrupt safetensors).
    #[error(transparent)]
    Checkpoint(#[from] fs_checkpoint::CheckpointError),
    /// Invalid model data (e.g. NaN in the weights).
    #[error(transparent)]
    Model(#[from] fs_traits::FsError),
    /// An error reported by burn while executing on the device (its message on one line).
    #[error("burn: {0}")]
    Burn(String),
    /// A device that cannot be used.
    #[error("device {device:?} is not available: {reason}")]
    Device {
        /// What was asked for.
        device: String,
        /// Why it cannot be used, and the fix.
        reason: String,
    },
}

/// An error's message on one line (burn's execution errors span several lines: `…\nCaused by:\n
/// reason`): [`fs_traits::engine::one_line`].
pub(crate) fn one_line(e: &impl std::fmt::Display) -> String {
    fs_traits::engine::one_line(&e.to_string())
}

/// Parse a device name: `cpu` (burn's flex backend), `wgpu` / `wgpu:N` (the `N`-th discrete GPU
/// through wgpu; needs the `wgpu` feature) or `cuda` / `cuda:N` (needs the `cuda` feature).
///
/// A GPU device is probed with a one-element read-back, so a machine without one gets an
/// [`Error::Device`] here rather than a panic at the first tensor operation. A GPU name in a
/// build without its feature is an [`Error::Device`] naming the feature.
pub fn device(name: &str) -> Result<Device, Error> {
    use fs_traits::engine::DeviceName;
    let name = name.trim();
    match DeviceName::parse(name).map_err(|reason| Error::Device { device: name.into(), reason })? {
        DeviceName::Cpu => Ok(Device::flex()),
        DeviceName::Wgpu(ordinal) => wgpu_device(name, ordinal),
        DeviceName::Cuda(ordinal) => cuda_device(name, ordinal),
    }
}

/// The attained f32 GEMM rate of burn on `device` for `(m × k) · (k × n)`, in GFLOP/s
/// (`2·m·k·n` flops per product; median of `repeats` timed products after one warm-up, each
/// followed by a device sync). The benchmark harness prints it beside the estimators so roofline
/// ratios are measured, not assumed.
pub fn matmul_gflops(
    m: usize,
    k: usize,
    n: usize,
    repeats: usize,
    device: &Device,
) -> Result<f64, Error> {
    use burn::tensor::Tensor;
    let device = device.clone().without_autodiff();
    let sync = |d: &Device| d.sync().map_err(|e| Error::Burn(one_line(&e)));
    let a = Tensor::<2>::full([m, k], 0.5, &device);
    let b = Tensor::<2>::full([k, n], 0.25, &device);
    drop(a.clone().matmul(b.clone()));
    sync(&device)?;
    let mut times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = std::time::Instant::now();
            let c = a.clone().matmul(b.clone());
            sync(&device)?;
            let elapsed = t.elapsed().as_secs_f64();
            drop(c);
            Ok(elapsed)
        })
        .collect::<Result<_, Error>>()?;
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (m * k * n) as f64 / times[times.len() / 2] / 1e9)
}

#[cfg(feature = "wgpu")]
fn wgpu_device(name: &str, ordinal: Option<usize>) -> Result<Device, Error> {
    use burn::tensor::DeviceKind;
    let kind = ordinal.map_or(DeviceKind::DefaultDevice, DeviceKind::DiscreteGpu);
    probe(name, Device::wgpu(kind))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(name: &str, _ordinal: Option<usize>) -> Result<Device, Error> {
    Err(Error::Device {
        device: name.into(),
        reason: "this build has no wgpu support: rebuild fisher-stein with `--features wgpu` (backend-burn: `--features wgpu`)"
            .into(),
    })
}

#[cfg(feature = "cuda")]
fn cuda_device(name: &str, ordinal: Option<usize>) -> Result<Device, Error> {
    probe(name, Device::cuda(ordinal.unwrap_or(0)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(name: &str, _ordinal: Option<usize>) -> Result<Device, Error> {
    Err(Error::Device {
        device: name.into(),
        reason: "this build has no CUDA support for burn: rebuild fisher-stein with `--features burn,cuda` (backend-burn: `--features cuda`)"
            .into(),
    })
}

/// Run one tiny operation on a lazily initialised GPU device and read it back: burn reports a
/// missing adapter or driver by panicking at first use, which becomes an [`Error::Device`].
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn probe(name: &str, device: Device) -> Result<Device, Error> {
    let dev = device.clone();
    let result = std::panic::catch_unwind(move || {
        burn::tensor::Tensor::<1>::ones([1], &dev).add_scalar(1.0).try_into_data()
    });
    let reason = match result {
        Ok(Ok(_)) => return Ok(device),
        Ok(Err(e)) => one_line(&e),
        Err(panic) => panic
            .downcast_ref::<String>()
            .map(|s| one_line(s))
            .or_else(|| panic.downcast_ref::<&str>().map(|s| one_line(s)))
            .unwrap_or_else(|| "initialisation panicked".into()),
    };
    Err(Error::Device { device: name.into(), reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert!(device("cpu").is_ok());
        assert!(device(" cpu ").is_ok());
        for bad in ["gpu", "cuda:x", "wgpu:", "metal"] {
            let e = device(bad).unwrap_err();
            assert!(matches!(e, Error::Device { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("expected cpu"), "{bad}: {e}");
        }
        #[cfg(not(feature = "wgpu"))]
        {
            let e = device("wgpu:0").unwrap_err().to_string();
            assert!(e.contains("--features wgpu"), "{e}");
        }
        #[cfg(not(feature = "cuda"))]
        {
            let e = device("cuda").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }

    #[test]
    fn matmul_rate_is_measured() {
        let r = matmul_gflops(64, 48, 32, 3, &device("cpu").unwrap()).unwrap();
        assert!(r.is_finite() && r > 0.0, "{r}");
    }

    #[test]
    fn multi_line_errors_become_one_line() {
        let e = "An error happened during execution\nCaused by:\n  out of memory";
        assert_eq!(one_line(&e), "An error happened during execution Caused by: out of memory");
    }
}
