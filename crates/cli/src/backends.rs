//! The registry of engines and models: the one place that knows which engine runs which
//! architecture. Every subcommand that needs a model (`compute`, `inspect`, `bench`) goes
//! through it; so do the cross-backend tests (`fs-suite` has the same table for its tests).
//!
//! A model is opened engine-free (`fs_checkpoint::Checkpoint`: resolve, config, GGUF header),
//! its typed host weights are read once (`ModelWeights`), and [`Engine::run`] uploads them to
//! the engine the user chose (`--backend`, `--device`) and hands the model to a job that is
//! generic over [`SplitModel`]. The engines are Cargo features of this crate (`candle`, the
//! default; `burn`; `dfdx`; `all-backends`); asking for one that was not compiled in names the
//! feature to enable.

use anyhow::{bail, Result};
use fs_checkpoint::{Architecture, Checkpoint, ModelFiles, ModelWeights};
use fs_estimators::{Element, SplitModel};
use std::time::Instant;

use crate::Globals;

/// The autodiff engine that runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// candle (GPT-2, the Llama family; CPU, CUDA with `--features cuda`).
    Candle,
    /// burn (GPT-2, the Llama family; needs `--features burn`).
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

    /// Whether this build has the engine.
    pub fn compiled(self) -> bool {
        match self {
            Backend::Candle => cfg!(feature = "candle"),
            Backend::Burn => cfg!(feature = "burn"),
            Backend::Dfdx => cfg!(feature = "dfdx"),
        }
    }

    /// The architecture families (model files) this engine implements.
    pub fn families(self) -> &'static [&'static str] {
        match self {
            Backend::Candle | Backend::Burn => &["gpt2", "llama"],
            Backend::Dfdx => &["gpt2"],
        }
    }

    /// An error unless this engine implements `arch`.
    pub fn check_supports(self, arch: Architecture) -> Result<()> {
        if self.families().contains(&arch.family()) {
            return Ok(());
        }
        let others: Vec<&str> = Backend::ALL
            .iter()
            .filter(|b| b.families().contains(&arch.family()))
            .map(|b| b.name())
            .collect();
        let family_name = |f: &&str| if *f == "gpt2" { "GPT-2" } else { "the Llama family" };
        let has: Vec<&str> = self.families().iter().map(family_name).collect();
        bail!(
            "--backend {} implements {} only, this is a {}-family model: use --backend {}",
            self.name(),
            has.join(" and "),
            arch.family(),
            others.join(" or ")
        )
    }

    fn not_compiled(self) -> anyhow::Error {
        anyhow::anyhow!(
            "--backend {0}: this build has no {0} backend: rebuild with `cargo build --release -p fisher-stein --features {0}` (or `--features all-backends`)",
            self.name()
        )
    }
}

/// What a job knows about how its model was loaded (for metadata.json and logs).
pub struct Loaded {
    /// The model files (a GGUF file is both config and weights).
    pub files: ModelFiles,
    /// A tokenizer that came with the weights (GGUF metadata), if any.
    pub tokenizer: Option<fs_checkpoint::tokenizers::Tokenizer>,
    /// The model file that runs it: `gpt2` or `llama`.
    pub arch: &'static str,
    /// Number of parameters.
    pub parameters: usize,
    /// The engine.
    pub backend: Backend,
    /// The device it runs on, as given.
    pub device: String,
    /// Seconds spent resolving and loading.
    pub load_s: f64,
}

/// Something to do with a loaded model, whatever its engine.
pub trait ModelJob {
    /// What the job returns.
    type Output;
    /// Run on `model` (owned: a job may keep it, as `inspect`'s decoder does).
    fn run<M: SplitModel + 'static>(self, model: M, loaded: Loaded) -> Result<Self::Output>
    where
        M::Scalar: Element;
}

/// An engine with its device opened.
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
    /// Open `device` (`cpu`, `cuda:N`, `wgpu`, … as the engine reads it) on `backend`; an error
    /// naming the feature when the engine or the device kind was not compiled in.
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
    /// (`Some(positions per pass)`, or the engine's memory budget), and run `job` on it.
    pub fn run<J: ModelJob>(
        &self,
        weights: ModelWeights,
        batch: Option<usize>,
        loaded: Loaded,
        job: J,
    ) -> Result<J::Output> {
        let upload = Instant::now();
        macro_rules! run {
            ($model:expr) => {{
                let mut model = $model;
                if let Some(b) = batch {
                    model.set_position_batch(b);
                }
                let load_s = loaded.load_s + upload.elapsed().as_secs_f64();
                job.run(model, Loaded { load_s, ..loaded })
            }};
        }
        match (self, weights) {
            #[cfg(feature = "candle")]
            (Engine::Candle(d), ModelWeights::Gpt2(w)) => run!(backend_candle::Gpt2::new(w, d)?),
            #[cfg(feature = "candle")]
            (Engine::Candle(d), ModelWeights::Llama(w)) => run!(backend_candle::Llama::new(w, d)?),
            #[cfg(feature = "burn")]
            (Engine::Burn(d), ModelWeights::Gpt2(w)) => run!(backend_burn::Gpt2::new(w, d)?),
            #[cfg(feature = "burn")]
            (Engine::Burn(d), ModelWeights::Llama(w)) => run!(backend_burn::Llama::new(w, d)?),
            #[cfg(feature = "dfdx")]
            (Engine::Dfdx(d), ModelWeights::Gpt2(w)) => run!(backend_dfdx::Gpt2::new(w, d)?),
            #[allow(unreachable_patterns)]
            (engine, weights) => {
                engine.backend().check_supports(weights.config().architecture())?;
                unreachable!("every supported (engine, architecture) pair has an arm")
            }
        }
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
}

/// How to load: the model spec (directory, hub id or `.gguf` file), engine, device and the
/// readout batch (positions per pass; `None` = the engine's memory budget decides).
#[derive(Clone, Debug)]
pub struct LoadSpec<'a> {
    /// `--model`.
    pub model: &'a str,
    /// `--backend`.
    pub backend: Backend,
    /// `--device`.
    pub device: &'a str,
    /// `--batch-size`.
    pub batch: Option<usize>,
}

/// Resolve `spec.model`, read its weights, put them on the chosen engine and run `job` on the
/// model. Checked in this order, each before anything slower: the engine is compiled in, the
/// model resolves and its configuration is valid, the engine implements the architecture, the
/// device opens; then the weights are read and uploaded.
pub fn with_model<J: ModelJob>(spec: &LoadSpec<'_>, g: &Globals, job: J) -> Result<J::Output> {
    let t0 = Instant::now();
    if !spec.backend.compiled() {
        return Err(spec.backend.not_compiled());
    }
    let ckpt = Checkpoint::open(spec.model)?;
    let arch = ckpt.config.architecture();
    g.log(&format!(
        "model {} resolved: {arch}, config {}; loading on {} {}",
        spec.model,
        ckpt.files.config.display(),
        spec.backend.name(),
        spec.device
    ));
    spec.backend.check_supports(arch)?;
    let engine = Engine::open(spec.backend, spec.device)?;
    let weights = ckpt.read_weights()?;
    let tokenizer = ckpt.embedded_tokenizer()?;
    let loaded = Loaded {
        parameters: weights.parameter_count(),
        files: ckpt.files,
        tokenizer,
        arch: arch.family(),
        backend: spec.backend,
        device: spec.device.to_string(),
        load_s: t0.elapsed().as_secs_f64(),
    };
    g.log(&format!("weights read in {:.3} s", loaded.load_s));
    engine.run(weights, spec.batch, loaded, job)
}
