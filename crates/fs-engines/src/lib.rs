//! # fs-engines — the registry of engines and models
//!
//! The one place that knows which engine runs which architecture. The CLI (`compute`,
//! `inspect`, `bench`), the cross-backend test suite (`fs-suite`) and the criterion benches
//! (`fs-benches`) all go through it, so adding an architecture to an engine is one arm in
//! [`Engine::run`] and one entry in [`Backend::families`] (`docs/ARCHITECTURE.md`).
//!
//! A model is read engine-free first (`fs_checkpoint::Checkpoint` → typed host weights
//! [`ModelWeights`]); [`Engine::open`] opens the device the user named on the chosen
//! [`Backend`]; [`Engine::run`] uploads the weights as that engine's model of their architecture
//! and hands the model to an [`EngineJob`], which is generic over [`SplitModel`] — whatever the
//! engine, the job's code is written once. The engines are Cargo features (`candle`, `burn`,
//! `dfdx`); asking for one that was not compiled in is an error naming the feature.

#![warn(missing_docs)]

use anyhow::{bail, Result};
use fs_checkpoint::{Architecture, ModelWeights};
use fs_traits::SplitModel;

/// An autodiff engine that runs models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Backend {
    /// candle (GPT-2, the RoPE decoder families; CPU, CUDA with `--features cuda`).
    Candle,
    /// burn (GPT-2, the RoPE decoder families; needs `--features burn`).
    Burn,
    /// dfdx (GPT-2; needs `--features dfdx`).
    Dfdx,
}

impl Backend {
    /// Every engine, compiled in or not.
    pub const ALL: [Backend; 3] = [Backend::Candle, Backend::Burn, Backend::Dfdx];

    /// The name used in flags, tables and metadata.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Candle => "candle",
            Backend::Burn => "burn",
            Backend::Dfdx => "dfdx",
        }
    }

    /// Whether this build has the engine (its Cargo feature of this crate).
    pub fn compiled(self) -> bool {
        match self {
            Backend::Candle => cfg!(feature = "candle"),
            Backend::Burn => cfg!(feature = "burn"),
            Backend::Dfdx => cfg!(feature = "dfdx"),
        }
    }

    /// Every engine this build has, candle first.
    pub fn compiled_in() -> Vec<Backend> {
        Backend::ALL.into_iter().filter(|b| b.compiled()).collect()
    }

    /// The architecture families (model files, [`Architecture::family`]) this engine
    /// implements.
    pub fn families(self) -> &'static [&'static str] {
        match self {
            Backend::Candle | Backend::Burn => &["gpt2", "decoder"],
            Backend::Dfdx => &["gpt2"],
        }
    }

    /// Whether this engine implements the architecture family `family`.
    pub fn implements(self, family: &str) -> bool {
        self.families().contains(&family)
    }

    /// An error unless this engine implements `arch`, naming the engines that do.
    pub fn check_supports(self, arch: Architecture) -> Result<()> {
        if self.implements(arch.family()) {
            return Ok(());
        }
        let others: Vec<&str> =
            Backend::ALL.iter().filter(|b| b.implements(arch.family())).map(|b| b.name()).collect();
        let family_name = |f: &&str| if *f == "gpt2" { "GPT-2" } else { "the RoPE decoders" };
        let has: Vec<&str> = self.families().iter().map(family_name).collect();
        bail!(
            "--backend {} implements {} only, this is a {} model: use --backend {}",
            self.name(),
            has.join(" and "),
            arch.model_type(),
            others.join(" or ")
        )
    }

    /// The error of asking for an engine this build does not have.
    pub fn not_compiled(self) -> anyhow::Error {
        anyhow::anyhow!(
            "--backend {0}: this build has no {0} backend: rebuild with `cargo build --release -p fisher-stein --features {0}` (or `--features all-backends`)",
            self.name()
        )
    }
}

/// Something to do with a model, whatever its engine: written once, generic over
/// [`SplitModel`].
pub trait EngineJob {
    /// What the job returns.
    type Output;
    /// Run on `model` (owned: a job may keep it).
    fn run<M: SplitModel + 'static>(self, model: M) -> Result<Self::Output>;
}

/// An engine with its device opened.
#[derive(Clone, Debug)]
pub enum Engine {
    /// candle.
    #[cfg(feature = "candle")]
    Candle(backend_candle::Device),
    /// burn.
    #[cfg(feature = "burn")]
    Burn(backend_burn::Device),
    /// dfdx.
    #[cfg(feature = "dfdx")]
    Dfdx(backend_dfdx::Device),
}

impl Engine {
    /// Open `device` (`cpu`, `cuda:N`, `wgpu`, … as the engine reads it,
    /// [`fs_traits::engine::DeviceName`]) on `backend`; an error naming the feature when the
    /// engine or the device kind was not compiled in.
    pub fn open(backend: Backend, device: &str) -> Result<Self> {
        Ok(match backend {
            #[cfg(feature = "candle")]
            Backend::Candle => Engine::Candle(backend_candle::device(device)?),
            #[cfg(feature = "burn")]
            Backend::Burn => Engine::Burn(backend_burn::device(device)?),
            #[cfg(feature = "dfdx")]
            Backend::Dfdx => Engine::Dfdx(backend_dfdx::device(device)?),
            #[allow(unreachable_patterns)]
            other => return Err(other.not_compiled()),
        })
    }

    /// Which engine this is.
    pub fn backend(&self) -> Backend {
        match *self {
            #[cfg(feature = "candle")]
            Engine::Candle(_) => Backend::Candle,
            #[cfg(feature = "burn")]
            Engine::Burn(_) => Backend::Burn,
            #[cfg(feature = "dfdx")]
            Engine::Dfdx(_) => Backend::Dfdx,
            #[allow(unreachable_patterns)]
            _ => unreachable!("an Engine exists only for a compiled-in engine"),
        }
    }

    /// The engine's attained f32 GEMM rate for `(m × k)·(k × n)` on its device, GFLOP/s.
    pub fn matmul_gflops(&self, m: usize, k: usize, n: usize, repeats: usize) -> Result<f64> {
        Ok(match self {
            #[cfg(feature = "candle")]
            Engine::Candle(d) => backend_candle::matmul_gflops(m, k, n, repeats, d)?,
            #[cfg(feature = "burn")]
            Engine::Burn(d) => backend_burn::matmul_gflops(m, k, n, repeats, d)?,
            #[cfg(feature = "dfdx")]
            Engine::Dfdx(d) => backend_dfdx::matmul_gflops(m, k, n, repeats, d)?,
            #[allow(unreachable_patterns)]
            _ => unreachable!("an Engine exists only for a compiled-in engine"),
        })
    }

    /// Upload `weights` as this engine's model of their architecture, set the readout batch
    /// (`Some(positions per pass)`, or `None` for the engine's memory budget), and run `job` on
    /// it. An architecture the engine does not implement is the error of
    /// [`Backend::check_supports`].
    pub fn run<J: EngineJob>(
        &self,
        weights: ModelWeights,
        batch: Option<usize>,
        job: J,
    ) -> Result<J::Output> {
        macro_rules! run {
            ($model:expr) => {{
                let mut model = $model;
                if let Some(b) = batch {
                    model.set_position_batch(b);
                }
                job.run(model)
            }};
        }
        match (self, weights) {
            #[cfg(feature = "candle")]
            (Engine::Candle(d), ModelWeights::Gpt2(w)) => run!(backend_candle::Gpt2::new(w, d)?),
            #[cfg(feature = "candle")]
            (Engine::Candle(d), ModelWeights::Decoder(w)) => {
                run!(backend_candle::Decoder::new(w, d)?)
            }
            #[cfg(feature = "burn")]
            (Engine::Burn(d), ModelWeights::Gpt2(w)) => run!(backend_burn::Gpt2::new(w, d)?),
            #[cfg(feature = "burn")]
            (Engine::Burn(d), ModelWeights::Decoder(w)) => run!(backend_burn::Decoder::new(w, d)?),
            #[cfg(feature = "dfdx")]
            (Engine::Dfdx(d), ModelWeights::Gpt2(w)) => run!(backend_dfdx::Gpt2::new(w, d)?),
            #[allow(unreachable_patterns)]
            (engine, weights) => {
                engine.backend().check_supports(weights.config().architecture())?;
                unreachable!(
                    "{} implements {} but has no arm for it in Engine::run",
                    engine.backend().name(),
                    weights.config().architecture().family()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_compiled_engine_opens_the_cpu() {
        for b in Backend::compiled_in() {
            assert_eq!(Engine::open(b, "cpu").unwrap().backend(), b);
            assert!(Engine::open(b, "tpu").unwrap_err().to_string().contains("expected cpu"));
        }
    }

    #[test]
    fn an_unsupported_architecture_names_the_engines_that_have_it() {
        let e = Backend::Dfdx.check_supports(Architecture::Qwen2).unwrap_err().to_string();
        assert_eq!(
            e,
            "--backend dfdx implements GPT-2 only, this is a qwen2 model: use --backend candle or burn"
        );
        for b in Backend::ALL {
            assert!(b.check_supports(Architecture::Gpt2).is_ok());
        }
    }
}
