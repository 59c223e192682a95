//! One entry point from what a user types (`--model`) to typed host weights: resolve the model,
//! read its configuration (from `config.json` or GGUF metadata) without touching tensor data,
//! then read the weights when asked.

use std::path::Path;

use crate::arch::decoder::DecoderConfig;
use crate::arch::{GgufSource, ModelConfig, ModelWeights};
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::resolve::{resolve_model, ModelFiles, ModelOrigin, TokenizerFiles};
use crate::weights::WeightStore;

/// How a checkpoint's weights are stored.
#[derive(Clone, Debug)]
pub enum CheckpointFormat {
    /// An HF directory: `config.json` and safetensors (one file or shards).
    Safetensors,
    /// A llama.cpp GGUF file: configuration and tokenizer in its metadata, weights possibly
    /// quantised (dequantised to f32 on read).
    Gguf(Box<GgufFile>),
}

/// A resolved model whose configuration has been read and validated; its tensors have not.
///
/// ```no_run
/// let ckpt = fs_checkpoint::Checkpoint::open("tests/fixtures/gpt2-tiny-a")?;
/// println!("{} with {} layers", ckpt.config.architecture(), ckpt.config.n_layers());
/// let weights = ckpt.read_weights()?; // typed, shape-checked, finite host weights
/// # Ok::<(), fs_checkpoint::CheckpointError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The files (for a GGUF file, `config` and the one weight file are the file itself).
    pub files: ModelFiles,
    /// The configuration.
    pub config: ModelConfig,
    /// How the weights are stored.
    pub format: CheckpointFormat,
}

/// Whether `spec` names an existing `.gguf` file.
pub fn is_gguf_path(spec: &str) -> bool {
    let path = Path::new(spec);
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl Checkpoint {
    /// Resolve `spec` — a `.gguf` file, a local directory, or a hub id from the HF cache,
    /// downloaded into it first when missing with the `download` feature (see
    /// [`resolve_model`]) — and read its configuration. A GGUF file's header is read and
    /// validated (no tensor data); a directory's safetensors headers are not opened yet.
    pub fn open(spec: &str) -> Result<Self> {
        if is_gguf_path(spec) {
            return Self::open_gguf(Path::new(spec));
        }
        let files = resolve_model(spec)?;
        let config = ModelConfig::from_file(&files.config)?;
        Ok(Checkpoint { files, config, format: CheckpointFormat::Safetensors })
    }

    /// Open a GGUF file: header, metadata → configuration (the architecture decides how).
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::Decoder(DecoderConfig::from_gguf(&file)?);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let files = ModelFiles {
            config: path.to_path_buf(),
            weights: vec![path.to_path_buf()],
            tokenizer: TokenizerFiles::Missing,
            origin: ModelOrigin::LocalDir { dir },
        };
        Ok(Checkpoint { files, config, format: CheckpointFormat::Gguf(Box::new(file)) })
    }

    /// A model directory written by [`crate::write_checkpoint`] (or any resolved files).
    pub fn from_files(files: ModelFiles) -> Result<Self> {
        let config = ModelConfig::from_file(&files.config)?;
        Ok(Checkpoint { files, config, format: CheckpointFormat::Safetensors })
    }

    /// Read every tensor into typed, shape-checked, finite host weights.
    pub fn read_weights(&self) -> Result<ModelWeights> {
        match &self.format {
            CheckpointFormat::Safetensors => {
                let mut store = WeightStore::open(&self.files.weights)?;
                self.config.read_weights(&mut store)
            }
            CheckpointFormat::Gguf(file) => {
                let ModelConfig::Decoder(cfg) = &self.config else {
                    unreachable!("GGUF files open as Llama-family models only")
                };
                let mut source = GgufSource::new(file, |hf| cfg.gguf_tensor_name(hf));
                self.config.read_weights(&mut source)
            }
        }
    }

    /// The GGUF file, when the checkpoint is one.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.format {
            CheckpointFormat::Gguf(f) => Some(f),
            CheckpointFormat::Safetensors => None,
        }
    }

    /// The tokenizer that came inside the weights (GGUF metadata `tokenizer.ggml.*`: byte-level
    /// BPE or SentencePiece, see [`crate::tokenizer_from_gguf`]; `encode(text, true)` adds BOS
    /// where the metadata says so), if any; `None` for a directory (its tokenizer files are in
    /// [`ModelFiles::tokenizer`]).
    pub fn embedded_tokenizer(&self) -> Result<Option<tokenizers::Tokenizer>> {
        let Some(file) = self.gguf() else { return Ok(None) };
        crate::tokenizer_from_gguf(file).map(|t| Some(t.tokenizer))
    }
}
