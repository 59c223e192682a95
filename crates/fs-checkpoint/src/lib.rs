//! # fs-checkpoint — everything about a checkpoint that needs no engine
//!
//! The candle, burn and dfdx backends only upload host weights and run passes; every step before
//! that lives here, once (map: `docs/ARCHITECTURE.md`):
//!
//! * **finding the files** — [`resolve_model`] takes a local directory or a hub id
//!   (`org/name[@revision]`) and finds `config.json`, the safetensors weights (single file or
//!   sharded with `model.safetensors.index.json`) and the tokenizer files in the standard
//!   Hugging Face cache ([`default_hub_cache`]); with the `download` feature, a hub model the
//!   cache lacks is first downloaded into it (only the files it needs, resumable, each checked
//!   against the hub's hash; never when `HF_HUB_OFFLINE` is set, [`hub_offline`]);
//!   [`Checkpoint::open`] also takes a `.gguf` file;
//! * **the architecture** — [`Architecture`] (GPT-2 and the RoPE decoder families: Llama,
//!   Mistral, Qwen2/3, Gemma-2/3, OLMo-2, Phi-3, GPT-NeoX) and its
//!   configuration [`ModelConfig`] from `config.json` ([`Gpt2Config`], [`DecoderConfig`]) or GGUF
//!   metadata ([`DecoderConfig::from_gguf`]), validated with one-line errors;
//! * **the weights** — per architecture one typed, shape-checked, finite set of host weights
//!   ([`Gpt2Weights`]: f32, linear weights `[in, out]`; [`DecoderWeights`]: every matrix a
//!   [`StoredMatrix`] kept in the precision the file stores it in, linear weights `[out, in]`,
//!   rows widened to f32 on demand) read from any
//!   [`WeightSource`]: safetensors ([`WeightStore`]: headers validated against the real file
//!   size before anything is allocated; F32, F16, BF16, F64), GGUF ([`GgufFile`] +
//!   [`GgufSource`]: header validated the same way, llama.cpp names mapped to HF names, the
//!   converter's layouts undone ([`GgufLayout`]; row permutations by a row index, so quantised
//!   blocks stay quantised), every [`GgmlType`] widened by this crate's [`dequantize_into`]), or
//!   deterministic random values ([`RandomSource`]: drawn lazily, in f32 or bf16);
//! * **the tokenizer** — [`load_tokenizer`] (`tokenizer.json` or GPT-2's `vocab.json` +
//!   `merges.txt`), or the one in a GGUF file's metadata ([`Checkpoint::embedded_tokenizer`]);
//! * **provenance** — [`sha256_file`] hashes the weights for results metadata;
//! * **synthetic models** — [`ModelConfig::random_weights`], [`random_gpt2_weights`],
//!   [`write_checkpoint`]: one random model that every backend loads identically, for the
//!   cross-backend suite and the benchmarks.
//!
//! Every error is a [`CheckpointError`] whose message is one line naming the file, tensor or
//! value at fault and the fix.
//!
//! ```no_run
//! use fs_checkpoint::{Checkpoint, ModelWeights};
//!
//! let ckpt = Checkpoint::open("openai-community/gpt2")?;
//! match ckpt.read_weights()? {
//!     ModelWeights::Gpt2(w) => println!("wte is {:?}", w.wte.shape()),
//!     ModelWeights::Decoder(w) => println!("{} blocks", w.blocks.len()),
//! }
//! # Ok::<(), fs_checkpoint::CheckpointError>(())
//! ```

#![warn(missing_docs)]

mod arch;
mod checkpoint;
mod dequant;
#[cfg(feature = "download")]
mod download;
mod error;
mod gguf;
mod hash;
mod hub;
mod resolve;
mod stored;
mod synthetic;
mod tokenizer;
mod weights;

pub use arch::decoder::{
    Activation, DecoderBlock, DecoderConfig, DecoderWeights, LayerAttention, Llama3RopeScaling,
    Norm, NormKind, QkNorm, Rope, RopeScaling, DECODER_MODEL_TYPES,
};
pub use arch::decoder_gguf::GGUF_ARCHITECTURES;
pub use arch::gpt2::{Gpt2Block, Gpt2Config, Gpt2Weights, LayerNorm, GPT2_ACTIVATIONS};
pub use arch::{
    neox_qkv_rows, unpermute_rows, Architecture, GgufLayout, GgufNameMap, GgufSource,
    GgufTensorName, HostMatrix, Linear, ModelConfig, ModelWeights, RandomSource, StoredLinear,
    WeightSource, MAX_CONFIG_LAYERS, MAX_CONFIG_WIDTH,
};
pub use checkpoint::{is_gguf_path, Checkpoint, CheckpointFormat};
pub use dequant::{dequantize, dequantize_into, GgmlType};
pub use error::{CheckpointError, Result};
pub use gguf::{GgufFile, GgufTensorInfo, GgufValue, GGUF_TYPES};
pub use hash::sha256_file;
pub use hub::{hub_offline, set_download_progress};
pub use resolve::{
    default_hub_cache, resolve_model, resolve_model_in, ModelFiles, ModelOrigin, TokenizerFiles,
};
pub use stored::{matrix_dims, SharedBytes, StorageId, StoredMatrix};
pub use synthetic::{random_decoder_weights, random_gpt2_weights, write_checkpoint, NamedTensor};
pub use tokenizer::{
    load_tokenizer, tokenizer_from_gguf, tokenizer_from_gguf_bpe, tokenizer_from_gguf_spm,
    GgufTokenizer, GgufTokenizerKind,
};
pub use weights::{HostTensor, WeightStore, MAX_HEADER_BYTES};

/// The tokenizers crate, re-exported so backends name the same `Tokenizer` type.
pub use tokenizers;
