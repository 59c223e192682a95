//! Loading a model on the engine the user chose (`--backend`, `--device`), and handing it to a
//! job that is generic over [`SplitModel`].
//!
//! The engines are Cargo features of this crate (`candle`, the default; `burn`; `dfdx`;
//! `all-backends`). Asking for one that was not compiled in names the feature to enable.

use anyhow::{bail, Context, Result};
use fs_checkpoint::ModelFiles;
use fs_estimators::{Element, SplitModel};
use std::path::Path;
use std::time::Instant;

use crate::Globals;

/// The autodiff engine that runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// candle (GPT-2, the Llama family, GGUF; CPU, CUDA with `--features cuda`).
    Candle,
    /// burn (GPT-2, the Llama family; needs `--features burn`).
    Burn,
    /// dfdx (GPT-2; needs `--features dfdx`).
    Dfdx,
}

impl Backend {
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
    /// `gpt2` or `llama`.
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
    /// Run on `model`.
    fn run<M: SplitModel>(self, model: &M, loaded: Loaded) -> Result<Self::Output>
    where
        M::Scalar: Element;
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

/// A `.gguf` file given as `--model`, described as model files (config and weights are the file).
pub fn gguf_files(spec: &str) -> Option<ModelFiles> {
    let path = Path::new(spec);
    if !(path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))) {
        return None;
    }
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Some(ModelFiles {
        config: path.to_path_buf(),
        weights: vec![path.to_path_buf()],
        tokenizer: fs_checkpoint::TokenizerFiles::Missing,
        origin: fs_checkpoint::ModelOrigin::LocalDir { dir },
    })
}

/// `model_type` of a `config.json` (`gpt2` when absent).
pub fn architecture(files: &ModelFiles) -> Result<String> {
    let text = std::fs::read_to_string(&files.config)
        .with_context(|| format!("cannot read {}", files.config.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", files.config.display()))?;
    Ok(v.get("model_type").and_then(|m| m.as_str()).unwrap_or("gpt2").to_string())
}

/// The architecture family a `model_type` belongs to.
fn family(model_type: &str) -> Result<&'static str> {
    match model_type {
        "gpt2" => Ok("gpt2"),
        "llama" | "mistral" | "qwen2" => Ok("llama"),
        other => bail!(
            "model architecture {other:?} is not supported yet: supported: gpt2, llama, mistral, qwen2"
        ),
    }
}

/// Resolve and load `spec` on its engine, then run `job` on the model.
pub fn with_model<J: ModelJob>(spec: &LoadSpec<'_>, g: &Globals, job: J) -> Result<J::Output> {
    let t0 = Instant::now();
    if !spec.backend.compiled() {
        return Err(spec.backend.not_compiled());
    }
    if let Some(files) = gguf_files(spec.model) {
        if spec.backend != Backend::Candle {
            bail!(
                "--backend {}: GGUF files are read by the candle backend only: use --backend candle (or convert the model to an HF directory)",
                spec.backend.name()
            );
        }
        return run_gguf(files, spec, g, t0, job);
    }
    let files = fs_checkpoint::resolve_model(spec.model)?;
    let model_type = architecture(&files)?;
    let arch = family(&model_type)?;
    g.log(&format!(
        "model {} resolved: {model_type}, config {}; loading on {} {}",
        spec.model,
        files.config.display(),
        spec.backend.name(),
        spec.device
    ));
    let loaded = |files: ModelFiles, parameters: usize| Loaded {
        files,
        tokenizer: None,
        arch,
        parameters,
        backend: spec.backend,
        device: spec.device.to_string(),
        load_s: t0.elapsed().as_secs_f64(),
    };
    match (spec.backend, arch) {
        #[cfg(feature = "candle")]
        (Backend::Candle, "gpt2") => {
            let mut m =
                backend_candle::Gpt2::load(&files, &backend_candle::device(spec.device)?)?;
            if let Some(b) = spec.batch {
                m.set_position_batch(b);
            }
            let n = m.parameter_count();
            job.run(&m, loaded(files, n))
        }
        #[cfg(feature = "candle")]
        (Backend::Candle, _) => {
            let mut m =
                backend_candle::Llama::load(&files, &backend_candle::device(spec.device)?)?;
            if let Some(b) = spec.batch {
                m.set_position_batch(b);
            }
            let n = m.parameter_count();
            job.run(&m, loaded(files, n))
        }
        #[cfg(feature = "burn")]
        (Backend::Burn, "gpt2") => {
            let mut m = backend_burn::Gpt2::load(&files, &backend_burn::device(spec.device)?)?;
            if let Some(b) = spec.batch {
                m.set_position_batch(b);
            }
            let n = m.parameter_count();
            job.run(&m, loaded(files, n))
        }
        #[cfg(feature = "burn")]
        (Backend::Burn, _) => {
            let mut m = backend_burn::Llama::load(&files, &backend_burn::device(spec.device)?)?;
            if let Some(b) = spec.batch {
                m.set_position_batch(b);
            }
            let n = m.parameter_count();
            job.run(&m, loaded(files, n))
        }
        #[cfg(feature = "dfdx")]
        (Backend::Dfdx, "gpt2") => {
            let mut m = backend_dfdx::Gpt2::load(&files, &backend_dfdx::device(spec.device)?)?;
            if let Some(b) = spec.batch {
                m.set_position_batch(b);
            }
            let n = m.parameter_count();
            job.run(&m, loaded(files, n))
        }
        (Backend::Dfdx, other) => bail!(
            "--backend dfdx implements GPT-2 only, this is a {other}-family model: use --backend candle or burn"
        ),
        #[allow(unreachable_patterns)]
        (b, _) => Err(b.not_compiled()),
    }
}

#[cfg(feature = "candle")]
fn run_gguf<J: ModelJob>(
    files: ModelFiles,
    spec: &LoadSpec<'_>,
    _g: &Globals,
    t0: Instant,
    job: J,
) -> Result<J::Output> {
    let device = backend_candle::device(spec.device)?;
    let (mut model, tokenizer) = backend_candle::load_llama_gguf(&files.config, &device)?;
    if let Some(b) = spec.batch {
        model.set_position_batch(b);
    }
    let loaded = Loaded {
        parameters: model.parameter_count(),
        files,
        tokenizer: Some(tokenizer),
        arch: "llama",
        backend: Backend::Candle,
        device: spec.device.to_string(),
        load_s: t0.elapsed().as_secs_f64(),
    };
    job.run(&model, loaded)
}

#[cfg(not(feature = "candle"))]
fn run_gguf<J: ModelJob>(
    _: ModelFiles,
    _: &LoadSpec<'_>,
    _: &Globals,
    _: Instant,
    _: J,
) -> Result<J::Output> {
    Err(Backend::Candle.not_compiled())
}
