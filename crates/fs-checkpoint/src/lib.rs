//! # fs-checkpoint — model-loading plumbing shared by every backend
//!
//! The candle, burn and dfdx backends all need the same framework-free steps before they can
//! build a model; they live here, once:
//!
//! * **finding the files** — [`resolve_model`] takes a local directory or a hub id
//!   (`org/name[@revision]`) and finds `config.json`, the safetensors weights (single file or
//!   sharded with `model.safetensors.index.json`) and the tokenizer files, reading the standard
//!   Hugging Face cache offline ([`default_hub_cache`]: `HF_HUB_CACHE`, `HF_HOME`, `~/.cache`);
//! * **the config** — [`Gpt2Config`] parses and validates HF's `GPT2Config`;
//! * **the weights** — [`WeightStore`] validates every safetensors header against the real file
//!   size before anything is allocated, then reads single tensors on demand into f32
//!   [`HostTensor`]s (F32, F16, BF16, F64);
//! * **the tokenizer** — [`load_tokenizer`] loads `tokenizer.json` or GPT-2's
//!   `vocab.json` + `merges.txt`;
//! * **provenance** — [`sha256_file`] hashes the weights for results metadata;
//! * **synthetic models** — [`Gpt2Config::tensor_specs`], [`random_gpt2_weights`],
//!   [`write_checkpoint`] (and the Llama equivalents) write one random model directory that every
//!   backend loads identically, for the cross-backend suite and the benchmarks.
//!
//! Every error is a [`CheckpointError`] whose message is one line naming the file, tensor or
//! value at fault and the fix.
//!
//! ```no_run
//! use fs_checkpoint::{load_tokenizer, resolve_model, Gpt2Config, WeightStore};
//!
//! let files = resolve_model("openai-community/gpt2")?;
//! let config = Gpt2Config::from_file(&files.config)?;
//! let weights = WeightStore::open(&files.weights)?;
//! let name = weights
//!     .find(&["transformer.wte.weight", "wte.weight"])
//!     .expect("token embedding");
//! let wte = weights.read_f32_shaped(&name, &[config.vocab_size, config.n_embd])?;
//! let tokenizer = load_tokenizer(&files.tokenizer)?;
//! # Ok::<(), fs_checkpoint::CheckpointError>(())
//! ```

#![warn(missing_docs)]

mod config;
mod error;
mod hash;
mod llama;
mod resolve;
mod synthetic;
mod tokenizer;
mod weights;

pub use config::{Gpt2Config, GPT2_ACTIVATIONS, MAX_CONFIG_LAYERS, MAX_CONFIG_WIDTH};
pub use error::{CheckpointError, Result};
pub use hash::sha256_file;
pub use llama::{Llama3RopeScaling, LlamaConfig, LLAMA_MODEL_TYPES};
pub use resolve::{
    default_hub_cache, resolve_model, resolve_model_in, ModelFiles, ModelOrigin, TokenizerFiles,
};
pub use synthetic::{random_gpt2_weights, random_llama_weights, write_checkpoint, NamedTensor};
pub use tokenizer::{load_tokenizer, tokenizer_from_gguf_bpe};
pub use weights::{HostTensor, WeightStore, MAX_HEADER_BYTES};

/// The tokenizers crate, re-exported so backends name the same `Tokenizer` type.
pub use tokenizers;
