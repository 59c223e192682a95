//! # backend-dfdx
//!
//! [`fs_traits::SplitModel`] on [dfdx](https://github.com/coreylowman/dfdx) 0.13: [`Gpt2`]
//! (HF `GPT2LMHeadModel` semantics). CPU by default; the `cuda` feature adds CUDA devices
//! (`cuda`, `cuda:N`) and needs the CUDA toolkit (`nvcc`) at build time, because dfdx compiles
//! its kernels then.
//!
//! The model computes, at split layer `k` and position `t`, the pieces of the Fisher information
//! `F = Jᵀ(diag p − p pᵀ)J = Aᵀ G A` that the estimators in `fs-estimators` need:
//!
//! * the lower pass runs the whole sequence once and caches every block's keys and values, so
//!   the upper half `u(h) = ln_f(r_L(h))` at `t` runs on single rows `h`;
//! * dfdx has reverse mode only, so the readout Jacobian `A = ∂u/∂h` (`d × d`) comes from `d`
//!   vector–Jacobian products in one batched backward pass (`d` copies of `h`, seeds `e_i`), and
//!   score gradients `g_y = Aᵀ(w_y − m)`, `m = W_Uᵀp`, from `S` copies seeded with `w_y − m`;
//! * only `h` is traced: products with weights and cached keys/values record input-only backward
//!   ops ([`ops::Engine`]), so no weight gradient is ever formed.
//!
//! Loading goes through `fs-checkpoint` (config parsing, safetensors headers checked before any
//! allocation, HF cache resolution), shared with the other backends; this crate holds only what
//! dfdx forces it to hold: the tensors and the forward / backward passes.

#![warn(missing_docs)]

mod gpt2;
pub mod ops;

pub use fs_traits::SplitModel;
pub use gpt2::{Gpt2, Gpt2Context};

/// A dfdx device.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Device {
    /// The CPU (gemm and rayon, all cores of the global rayon pool).
    Cpu(dfdx::tensor::Cpu),
    /// A CUDA device (the `cuda` feature; needs nvcc at build time).
    #[cfg(feature = "cuda")]
    Cuda(dfdx::tensor::Cuda),
}

/// Errors of loading a model on dfdx.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A checkpoint problem (missing file or tensor, bad config, corrupt safetensors).
    #[error(transparent)]
    Checkpoint(#[from] fs_checkpoint::CheckpointError),
    /// Invalid model data (e.g. NaN in the weights) or a failure inside dfdx while building the
    /// model.
    #[error(transparent)]
    Model(#[from] fs_traits::FsError),
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
/// (needs the `cuda` feature); dfdx has no wgpu device.
pub fn device(name: &str) -> Result<Device, Error> {
    use fs_traits::engine::DeviceName;
    let name = name.trim();
    let unavailable = |reason: String| Error::Device { device: name.into(), reason };
    match DeviceName::parse(name).map_err(unavailable)? {
        DeviceName::Cpu => Ok(Device::Cpu(dfdx::tensor::Cpu::default())),
        DeviceName::Cuda(ordinal) => cuda_device(name, ordinal.unwrap_or(0)),
        DeviceName::Wgpu(_) => Err(unavailable(
            "dfdx has no wgpu device: use cpu or cuda:N, or --backend burn for wgpu".into(),
        )),
    }
}

/// The attained f32 GEMM rate of dfdx on this machine for `(m × k) · (k × n)`, in GFLOP/s
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
    fn rate<D: ops::Engine + dfdx::tensor::Synchronize>(
        dev: &D,
        (m, k, n): (usize, usize, usize),
        repeats: usize,
    ) -> f64 {
        use dfdx::prelude::TryMatMul;
        let a = dev.tensor_from_vec(vec![0.5f32; m * k], (m, k));
        let b = dev.tensor_from_vec(vec![0.25f32; k * n], (k, n));
        drop(a.clone().matmul(b.clone()));
        let mut times: Vec<f64> = (0..repeats.max(1))
            .map(|_| {
                let t = std::time::Instant::now();
                let c = a.clone().matmul(b.clone());
                dev.synchronize();
                let elapsed = t.elapsed().as_secs_f64();
                drop(c);
                elapsed
            })
            .collect();
        times.sort_by(f64::total_cmp);
        2.0 * (m * k * n) as f64 / times[times.len() / 2] / 1e9
    }
    let dims = (m, k, n);
    gpt2::guarded(|| {
        Ok(match device {
            Device::Cpu(dev) => rate(dev, dims, repeats),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => rate(dev, dims, repeats),
        })
    })
    .map_err(Error::Model)
}

#[cfg(feature = "cuda")]
fn cuda_device(name: &str, ordinal: usize) -> Result<Device, Error> {
    use dfdx::tensor::CudaError;
    // The status codes, not cudarc 0.9's `Debug` of a driver error, which unwraps
    // `cuGetErrorString` and so can panic inside the error path.
    let reason = |e: CudaError| match e {
        CudaError::Driver(e) => format!("CUDA driver error {:?}", e.0),
        CudaError::Blas(e) => format!("cuBLAS error {:?}", e.0),
        CudaError::Cpu(e) => format!("{e:?}"),
        #[allow(unreachable_patterns)]
        _ => "CUDA error".to_string(),
    };
    let unavailable = |reason: String| Error::Device { device: name.into(), reason };
    // cudarc 0.9's `CudaDevice::new` panics on a machine without a GPU and on a missing ordinal:
    // both are answered here first.
    use cudarc::driver::result;
    result::init().map_err(|e| unavailable(format!("CUDA driver error {:?}", e.0)))?;
    let count = result::device::get_count()
        .map_err(|e| unavailable(format!("CUDA driver error {:?}", e.0)))?;
    let count = count.max(0) as usize;
    if ordinal >= count {
        return Err(unavailable(match count {
            0 => "this machine has no CUDA device: use cpu".to_string(),
            1 => "this machine has 1 CUDA device: use cuda:0".to_string(),
            n => format!("this machine has {n} CUDA devices: use cuda:0 … cuda:{}", n - 1),
        }));
    }
    dfdx::tensor::Cuda::try_build(ordinal, 0).map(Device::Cuda).map_err(|e| unavailable(reason(e)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(name: &str, _ordinal: usize) -> Result<Device, Error> {
    Err(Error::Device {
        device: name.into(),
        reason: "this build has no CUDA support for dfdx: rebuild fisher-stein with `--features dfdx,cuda` (backend-dfdx: `--features cuda`)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert!(matches!(device("cpu"), Ok(Device::Cpu(_))));
        assert!(matches!(device(" cpu "), Ok(Device::Cpu(_))));
        let e = device("tpu").unwrap_err();
        assert!(matches!(e, Error::Device { .. }));
        assert!(e.to_string().contains("expected cpu, cuda, cuda:N"), "{e}");
        assert!(device("wgpu").unwrap_err().to_string().contains("--backend burn"));
        assert!(device("cuda:x").is_err());
        let r = matmul_gflops(64, 48, 32, 3, &device("cpu").unwrap()).unwrap();
        assert!(r.is_finite() && r > 0.0, "{r}");
        #[cfg(not(feature = "cuda"))]
        {
            let e = device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("--features cuda") && !e.contains('\n'), "{e}");
        }
    }
}
