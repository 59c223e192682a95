//! Loading a model for a subcommand (`compute`, `inspect`) through the registry of engines and
//! models (`fs-engines`, re-exported here: [`Backend`], [`Engine`]), with what the subcommand
//! records about the load ([`Loaded`]: files, tokenizer, architecture, engine, device, time).
//!
//! A model is opened engine-free (`fs_checkpoint::Checkpoint`: resolve, config, GGUF header),
//! its typed host weights are read once (`ModelWeights`), and [`Engine::run`] uploads them to
//! the engine the user chose (`--backend`, `--device`) and hands the model to a job that is
//! generic over [`SplitModel`]. The engines are Cargo features of this crate (`candle`, the
//! default; `burn`; `dfdx`; `all-backends`), forwarded to `fs-engines`; asking for one that was
//! not compiled in names the feature to enable.

use anyhow::Result;
use fs_checkpoint::{Checkpoint, ModelFiles};
use fs_estimators::SplitModel;
use std::time::Instant;

pub use fs_engines::{Backend, Engine, EngineJob};

use crate::Globals;

/// What a job knows about how its model was loaded (for metadata.json and logs).
pub struct Loaded {
    /// The model files (a GGUF file is both config and weights).
    pub files: ModelFiles,
    /// A tokenizer that came with the weights (GGUF metadata), if any.
    pub tokenizer: Option<fs_checkpoint::tokenizers::Tokenizer>,
    /// The model file that runs it: `gpt2` or `decoder`.
    pub arch: &'static str,
    /// The HF `model_type` (`gpt2`, `llama`, `gemma2`, …).
    pub model_type: &'static str,
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
    fn run<M: SplitModel + 'static>(self, model: M, loaded: Loaded) -> Result<Self::Output>;
}

/// A [`ModelJob`] with its [`Loaded`] record, as a job of the registry; the upload time is
/// added to the load time.
struct WithLoaded<J> {
    job: J,
    loaded: Loaded,
    upload: Instant,
}

impl<J: ModelJob> EngineJob for WithLoaded<J> {
    type Output = J::Output;
    fn run<M: SplitModel + 'static>(self, model: M) -> Result<J::Output> {
        let load_s = self.loaded.load_s + self.upload.elapsed().as_secs_f64();
        self.job.run(model, Loaded { load_s, ..self.loaded })
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
        model_type: arch.model_type(),
        backend: spec.backend,
        device: spec.device.to_string(),
        load_s: t0.elapsed().as_secs_f64(),
    };
    g.log(&format!("weights read in {:.3} s", loaded.load_s));
    engine.run(weights, spec.batch, WithLoaded { job, loaded, upload: Instant::now() })
}
