//! The architectures fisher-stein reads, each written once: its configuration, its tensor
//! layout, and one typed, shape-checked, finite set of host weights that every engine uploads.
//!
//! An architecture is one module here (`gpt2`; `decoder` with its `decoder_json` and
//! `decoder_gguf` halves for every RoPE decoder family) plus one model file per engine
//! (`crates/backend-*/src/<arch>.rs`); see `docs/ARCHITECTURE.md`, "Adding an architecture".
//!
//! Weights come from a [`WeightSource`] — a safetensors [`WeightStore`] (one file or shards), a
//! GGUF file ([`GgufSource`]: llama.cpp names mapped to HF names, dequantised, q/k rows
//! un-permuted), or deterministic random values ([`RandomSource`]) — and are laid out as the
//! engines consume them: row-major f32, linear weights `[in, out]` so that `y = x·W + b`.

pub mod decoder;
pub(crate) mod decoder_gguf;
mod decoder_json;
pub mod gpt2;

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{CheckpointError, Result};
use crate::gguf::GgufFile;
use crate::weights::WeightStore;
use crate::{GgmlType, StoredMatrix};
use decoder::take_rows;
use decoder::{DecoderConfig, DecoderWeights};
use gpt2::{Gpt2Config, Gpt2Weights};

/// The largest width a `config.json` may declare (vocabulary, hidden, intermediate, heads, head
/// dimension): 2²⁴ = 16,777,216, 64× the largest vocabulary and 300× the largest hidden size of
/// released checkpoints. Backends allocate from these sizes before they compare a tensor with the
/// checkpoint (the RoPE table has `head_dim / 2` entries), so a corrupt or hostile config must be
/// refused here rather than reach an allocation of petabytes.
pub const MAX_CONFIG_WIDTH: usize = 1 << 24;

/// The most layers a `config.json` may declare (2¹⁶; released checkpoints have at most a few
/// hundred).
pub const MAX_CONFIG_LAYERS: usize = 1 << 16;

/// Refuse a `(field, value, limit)` with `value > limit` (the limits: [`MAX_CONFIG_WIDTH`],
/// [`MAX_CONFIG_LAYERS`]) with a one-line config error naming the field.
pub(crate) fn check_size_limits(path: &Path, sizes: &[(&str, usize, usize)]) -> Result<()> {
    for &(field, value, limit) in sizes {
        if value > limit {
            return Err(CheckpointError::config(
                path,
                field,
                format!("is {value}, over the {limit} this tool accepts for any model"),
            ));
        }
    }
    Ok(())
}

/// The text of a `config.json`: a missing file is [`CheckpointError::NotFound`] saying which
/// directory to pass, any other failure [`CheckpointError::Io`].
pub(crate) fn read_config_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CheckpointError::NotFound {
                what: "config.json".into(),
                path: path.to_path_buf(),
                fix: "pass the directory that holds the model's config.json".into(),
            }
        } else {
            CheckpointError::io(path, e)
        }
    })
}

/// Parse the text of a `config.json` whose top level must be a JSON object (`path` only names
/// the file in messages).
pub(crate) fn parse_config_object(json: &str, path: &Path) -> Result<Map<String, Value>> {
    match serde_json::from_str(json).map_err(|e| CheckpointError::json(path, e.to_string()))? {
        Value::Object(obj) => Ok(obj),
        _ => Err(CheckpointError::json(path, "the top level is not a JSON object")),
    }
}

/// A field that is present and not `null`.
pub(crate) fn present<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

/// The architectures this crate reads, by HF `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// GPT-2 (`GPT2LMHeadModel`).
    Gpt2,
    /// Llama (`LlamaForCausalLM`; also SmolLM).
    Llama,
    /// Mistral (Llama with a sliding window).
    Mistral,
    /// Qwen2 (Llama with q/k/v biases).
    Qwen2,
    /// Qwen3 (per-head q/k RMSNorm, explicit `head_dim`).
    Qwen3,
    /// Gemma-2 (sandwich norms, `1 + w` RMSNorm, GeGLU, soft-capped scores and logits,
    /// alternating sliding-window layers).
    Gemma2,
    /// Gemma-3 text models (`gemma3_text`: Gemma-2 without soft-caps, q/k norms, 5 local : 1
    /// global layers with their own RoPE θ).
    Gemma3,
    /// OLMo-2 (norms after attention and MLP, q/k RMSNorm over the whole projection).
    Olmo2,
    /// Phi-3 (fused `qkv_proj` and `gate_up_proj`).
    Phi3,
    /// GPT-NeoX / Pythia (LayerNorm, parallel residual, partial rotary, fused per-head qkv).
    GptNeoX,
}

impl Architecture {
    /// Every architecture, in the order error messages list them.
    pub const ALL: [Architecture; 10] = [
        Architecture::Gpt2,
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gemma2,
        Architecture::Gemma3,
        Architecture::Olmo2,
        Architecture::Phi3,
        Architecture::GptNeoX,
    ];

    /// The HF `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Gpt2 => "gpt2",
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3_text",
            Architecture::Olmo2 => "olmo2",
            Architecture::Phi3 => "phi3",
            Architecture::GptNeoX => "gpt_neox",
        }
    }

    /// The architecture of an HF `model_type`; [`CheckpointError::Unsupported`] (listing what
    /// is supported) for any other.
    pub fn from_model_type(model_type: &str) -> Result<Self> {
        Architecture::ALL.into_iter().find(|a| a.model_type() == model_type).ok_or_else(|| {
            CheckpointError::Unsupported {
                what: format!("model architecture {model_type:?}"),
                supported: Architecture::ALL.map(Architecture::model_type).join(", "),
            }
        })
    }

    /// The model file that runs it: `gpt2`, or `decoder` for every RoPE decoder family.
    pub fn family(self) -> &'static str {
        match self {
            Architecture::Gpt2 => "gpt2",
            _ => "decoder",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// A parsed, validated configuration of any supported architecture.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// The Llama family (Llama, Mistral, Qwen2).
    Decoder(DecoderConfig),
}

impl ModelConfig {
    /// Read a `config.json`, dispatching on its `model_type` (`gpt2` when absent, as HF's GPT-2
    /// checkpoints predate the field).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_config_text(path)?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| CheckpointError::json(path, e.to_string()))?;
        let model_type = value.get("model_type").and_then(Value::as_str).unwrap_or("gpt2");
        if model_type == "gemma3" {
            // The multimodal wrapper: DecoderConfig says which Gemma-3 checkpoints work.
            return DecoderConfig::from_json(&text, path).map(ModelConfig::Decoder);
        }
        Ok(match Architecture::from_model_type(model_type)? {
            Architecture::Gpt2 => ModelConfig::Gpt2(Gpt2Config::from_json(&text, path)?),
            _ => ModelConfig::Decoder(DecoderConfig::from_json(&text, path)?),
        })
    }

    /// The architecture.
    pub fn architecture(&self) -> Architecture {
        match self {
            ModelConfig::Gpt2(_) => Architecture::Gpt2,
            ModelConfig::Decoder(c) => c.architecture,
        }
    }

    /// Number of blocks (split layers are `0..=n_layers`).
    pub fn n_layers(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_layer,
            ModelConfig::Decoder(c) => c.num_hidden_layers,
        }
    }

    /// Residual-stream width `d`.
    pub fn d_model(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_embd,
            ModelConfig::Decoder(c) => c.hidden_size,
        }
    }

    /// Vocabulary size `V`.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Decoder(c) => c.vocab_size,
        }
    }

    /// The tensor names and shapes of a checkpoint of this configuration in HF layout, in load
    /// order.
    pub fn tensor_specs(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            ModelConfig::Gpt2(c) => c.tensor_specs(),
            ModelConfig::Decoder(c) => c.tensor_specs(),
        }
    }

    /// The HF `config.json` of this configuration.
    pub fn to_json(&self) -> Value {
        match self {
            ModelConfig::Gpt2(c) => c.to_json(),
            ModelConfig::Decoder(c) => c.to_json(),
        }
    }

    /// Read the typed host weights of this configuration from `source`.
    pub fn read_weights(&self, source: &mut dyn WeightSource) -> Result<ModelWeights> {
        Ok(match self {
            ModelConfig::Gpt2(c) => ModelWeights::Gpt2(Gpt2Weights::read(c.clone(), source)?),
            ModelConfig::Decoder(c) => {
                ModelWeights::Decoder(DecoderWeights::read(c.clone(), source)?)
            }
        })
    }

    /// Deterministic random weights of this configuration ([`RandomSource`]).
    pub fn random_weights(&self, std: f64, seed: u64) -> Result<ModelWeights> {
        self.read_weights(&mut RandomSource::new(self, std, seed))
    }
}

/// The typed host weights of any supported architecture, ready to upload.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelWeights {
    /// GPT-2.
    Gpt2(Gpt2Weights),
    /// The Llama family.
    Decoder(DecoderWeights),
}

impl ModelWeights {
    /// The configuration the weights were read for.
    pub fn config(&self) -> ModelConfig {
        match self {
            ModelWeights::Gpt2(w) => ModelConfig::Gpt2(w.config.clone()),
            ModelWeights::Decoder(w) => ModelConfig::Decoder(w.config.clone()),
        }
    }

    /// Number of parameters (a tied unembedding counted once).
    pub fn parameter_count(&self) -> usize {
        match self {
            ModelWeights::Gpt2(w) => w.parameter_count(),
            ModelWeights::Decoder(w) => w.parameter_count(),
        }
    }
}

/// A row-major f32 matrix on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostMatrix {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// `rows · cols` values, row-major.
    pub data: Vec<f32>,
}

impl HostMatrix {
    /// The `rows × cols` matrix stored row-major in `data` (`data.len() == rows · cols`, which
    /// every reader here has checked).
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        HostMatrix { rows, cols, data }
    }

    /// The transpose of the `rows × cols` matrix stored row-major in `data`, in 32 × 32 tiles,
    /// bands of 32 output rows in parallel (a row-by-row transpose misses the cache on every
    /// write: it was 12% of loading SmolLM2-135M).
    pub fn transposed(rows: usize, cols: usize, data: &[f32]) -> Self {
        use rayon::prelude::*;
        const TILE: usize = 32;
        let mut out = vec![0f32; data.len()];
        if rows > 0 {
            out.par_chunks_mut(TILE * rows).enumerate().for_each(|(band, block)| {
                let c0 = band * TILE;
                let width = block.len() / rows;
                for r0 in (0..rows).step_by(TILE) {
                    for r in r0..(r0 + TILE).min(rows) {
                        let src = &data[r * cols + c0..r * cols + c0 + width];
                        for (c, &v) in src.iter().enumerate() {
                            block[c * rows + r] = v;
                        }
                    }
                }
            });
        }
        HostMatrix { rows: cols, cols: rows, data: out }
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }
}

/// A linear map `y = x·W + b` with `W` stored `[in, out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// `W`, `in × out`.
    pub weight: HostMatrix,
    /// `b` (length `out`), if the layer has one.
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// Number of parameters.
    pub fn parameter_count(&self) -> usize {
        self.weight.data.len() + self.bias.as_ref().map_or(0, Vec::len)
    }
}

/// A linear map `y = W x + b` with `W` kept as stored, `[out, in]` (rows are output features;
/// [`StoredMatrix`]): the decoder families' layers, widened when a pass needs them.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredLinear {
    /// `W`, `out × in`, in its stored precision.
    pub weight: StoredMatrix,
    /// `b` (length `out`), if the layer has one.
    pub bias: Option<Vec<f32>>,
}

impl StoredLinear {
    /// Number of parameters.
    pub fn parameter_count(&self) -> usize {
        self.weight.rows() * self.weight.cols() + self.bias.as_ref().map_or(0, Vec::len)
    }

    /// The layer widened to f32 with `W` transposed to `[in, out]` (for engines that hold every
    /// weight in f32).
    pub fn to_linear(&self) -> Linear {
        Linear { weight: self.weight.to_host_transposed(), bias: self.bias.clone() }
    }
}

/// Where typed weights are read from: tensors by their HF name, in the precision they are
/// stored in ([`StoredMatrix`]; a vector is an `n × 1` column, see [`crate::matrix_dims`]).
///
/// The architecture modules ask for every tensor they need with the shape the configuration
/// implies; a source answers `None` for a tensor it does not hold (the caller decides whether
/// that is an error or an optional tensor) and an error naming the file for a tensor it holds
/// with another shape or unreadable data. NaN and ±∞ are refused by the caller
/// ([`StoredMatrix::check_finite`]), once, whatever the source.
pub trait WeightSource {
    /// The tensor `name` (HF naming) with shape `shape`.
    fn read(&mut self, name: &str, shape: &[usize]) -> Result<Option<StoredMatrix>>;

    /// The files read from, comma-separated (for "tensor … is not in …" messages).
    fn describe(&self) -> String;
}

impl WeightSource for WeightStore {
    fn read(&mut self, name: &str, shape: &[usize]) -> Result<Option<StoredMatrix>> {
        if !self.contains(name) {
            return Ok(None);
        }
        self.read_stored(name, shape).map(Some)
    }

    fn describe(&self) -> String {
        if self.files().is_empty() {
            return "no weight files".to_string();
        }
        self.files().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// Where an HF tensor lives in a llama.cpp GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorName {
    /// The GGUF tensor name (`blk.3.attn_q.weight`).
    pub name: String,
    /// How the converter changed the tensor; undone on read.
    pub layout: GgufLayout,
}

/// How llama.cpp's converter stores a tensor differently from the HF checkpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GgufLayout {
    /// As in the HF checkpoint.
    Same,
    /// Rows permuted for this many heads (q and k of `llama` files: the interleaved rotation
    /// pairs rows `2i, 2i+1` where HF's `rotate_half` pairs `i, i + d_head/2`).
    UnpermuteRows(usize),
    /// Every value shifted: the GGUF holds `w − shift`… i.e. the HF value is `gguf + shift`
    /// (Gemma norms are stored as `1 + w`: shift −1).
    Shifted(f32),
    /// GPT-NeoX's fused `query_key_value`, stored `[q | k | v]` where HF interleaves
    /// `[head][q | k | v][head_dim]`.
    NeoxQkv {
        /// Heads.
        heads: usize,
        /// Per-head width.
        head_dim: usize,
    },
}

/// A GGUF file as a [`WeightSource`]: HF names are mapped to GGUF names by the architecture's
/// map, tensors are dequantised ([`GgufFile::read_f32`]) and un-permuted where the converter
/// permuted them.
pub struct GgufSource<'a> {
    file: &'a GgufFile,
    map: Box<GgufNameMap<'a>>,
}

/// An architecture's map from HF tensor names to where they live in a GGUF file.
pub type GgufNameMap<'a> = dyn Fn(&str) -> Option<GgufTensorName> + 'a;

impl<'a> GgufSource<'a> {
    /// A source reading `file` through `map` (HF name → GGUF name).
    pub fn new(file: &'a GgufFile, map: impl Fn(&str) -> Option<GgufTensorName> + 'a) -> Self {
        GgufSource { file, map: Box::new(map) }
    }
}

impl WeightSource for GgufSource<'_> {
    fn read(&mut self, name: &str, shape: &[usize]) -> Result<Option<StoredMatrix>> {
        let Some(target) = (self.map)(name) else { return Ok(None) };
        let Some(info) = self.file.tensor(&target.name) else { return Ok(None) };
        if info.shape != shape {
            return Err(CheckpointError::ShapeMismatch {
                name: target.name,
                expected: shape.to_vec(),
                got: info.shape.clone(),
                path: self.file.path().to_path_buf(),
            });
        }
        let stored = self.file.read_stored(&target.name)?;
        let (rows, inp) = (stored.rows(), stored.cols());
        // The converter's layouts are row permutations (undone by a row index, so quantised
        // rows stay quantised) or a shift of every value (norms: widened).
        Ok(Some(match target.layout {
            GgufLayout::Same => stored,
            GgufLayout::UnpermuteRows(heads) => {
                stored.select_rows(&unpermute_row_order(heads, rows))
            }
            GgufLayout::NeoxQkv { heads, head_dim } => {
                stored.select_rows(&neox_qkv_row_order(heads, head_dim))
            }
            GgufLayout::Shifted(shift) => StoredMatrix::from_f32(
                rows,
                inp,
                stored.to_f32().into_iter().map(|x| x + shift).collect(),
            ),
        }))
    }

    fn describe(&self) -> String {
        self.file.path().display().to_string()
    }
}

/// Undo llama.cpp's q/k row permutation for `n_head` heads: GGUF row `h·dh + 2i + j` is HF row
/// `h·dh + j·dh/2 + i` (`dh = out / n_head`). llama.cpp's converter does
/// `w.reshape(n_head, 2, dh/2, in).swapaxes(1, 2).reshape(out, in)`. (Rows copied by
/// `unpermute_row_order`, which the GGUF source applies as a row index.)
pub fn unpermute_rows(rows: &[f32], n_head: usize, out: usize, inp: usize) -> Vec<f32> {
    take_rows(rows, unpermute_row_order(n_head, out).into_iter(), inp)
}

/// GPT-NeoX's fused q/k/v from llama.cpp's `[q | k | v]` row order back to HF's per-head
/// `[head][q | k | v][head_dim]` (`inp` values per row; 1 for the bias). (Rows copied by
/// `neox_qkv_row_order`.)
pub fn neox_qkv_rows(rows: &[f32], heads: usize, head_dim: usize, inp: usize) -> Vec<f32> {
    take_rows(rows, neox_qkv_row_order(heads, head_dim).into_iter(), inp)
}

/// HF row `r` of an `out`-row q/k weight is GGUF row `unpermute_row_order(n_head, out)[r]`.
fn unpermute_row_order(n_head: usize, out: usize) -> Vec<usize> {
    let dh = out / n_head.max(1);
    let half = dh / 2;
    let mut order: Vec<usize> = (0..out).collect();
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                order[h * dh + j * half + i] = h * dh + 2 * i + j;
            }
        }
    }
    order
}

/// HF row of GPT-NeoX's fused q/k/v → its GGUF row.
fn neox_qkv_row_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..3 * heads * head_dim).collect();
    for part in 0..3 {
        for h in 0..heads {
            for i in 0..head_dim {
                order[(h * 3 + part) * head_dim + i] = (part * heads + h) * head_dim + i;
            }
        }
    }
    order
}

/// Deterministic random weights as a [`WeightSource`]: every tensor of the configuration's
/// HF layout drawn from a seeded normal stream (see [`crate::random_gpt2_weights`]), so a
/// `(config, std, seed)` triple names one model on every engine.
///
/// Tensors are drawn when they are read (the stream skips ahead to each tensor's place, so the
/// values do not depend on the order of reads), and matrices can be held in bf16
/// ([`RandomSource::with_dtype`]): a model too big for f32 memory can still be built.
pub struct RandomSource {
    /// Each tensor's role parameters and its first sample's index in the stream.
    tensors: HashMap<String, crate::synthetic::RandomTensor>,
    seed: u64,
    dtype: GgmlType,
}

impl RandomSource {
    /// The random tensors of `config` (matrices `N(0, std²)`, see [`crate::random_gpt2_weights`]),
    /// held in f32.
    pub fn new(config: &ModelConfig, std: f64, seed: u64) -> Self {
        let norm_weight_mean = match config {
            ModelConfig::Decoder(c) if c.norm_unit_offset => 0.0,
            _ => 1.0,
        };
        let tensors = crate::synthetic::random_tensor_plan(
            config.tensor_specs(),
            std,
            config.n_layers(),
            norm_weight_mean,
        );
        RandomSource { tensors, seed, dtype: GgmlType::F32 }
    }

    /// The same draws with matrices (2-D tensors) rounded to `dtype` (F32, F16 or BF16) and held
    /// in it; vectors stay f32. Other types are refused (one line).
    pub fn with_dtype(mut self, dtype: GgmlType) -> Result<Self> {
        if !matches!(dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Err(CheckpointError::Unsupported {
                what: format!("random weights held in {}", dtype.name()),
                supported: "F32, F16, BF16".to_string(),
            });
        }
        self.dtype = dtype;
        Ok(self)
    }
}

impl WeightSource for RandomSource {
    fn read(&mut self, name: &str, shape: &[usize]) -> Result<Option<StoredMatrix>> {
        let Some(plan) = self.tensors.remove(name) else { return Ok(None) };
        let (rows, cols) = crate::matrix_dims(&plan.shape);
        debug_assert_eq!(plan.shape, shape);
        let dtype = if plan.shape.len() == 2 { self.dtype } else { GgmlType::F32 };
        Ok(Some(plan.draw(self.seed, rows, cols, dtype)))
    }

    fn describe(&self) -> String {
        "random weights".to_string()
    }
}

/// Read a required tensor: missing is [`CheckpointError::MissingTensor`] naming the source,
/// and NaN or ±∞ is refused naming the tensor and index.
pub(crate) fn required_tensor(
    source: &mut dyn WeightSource,
    name: &str,
    shape: &[usize],
) -> Result<StoredMatrix> {
    let data = source.read(name, shape)?.ok_or_else(|| CheckpointError::MissingTensor {
        name: name.to_string(),
        files: source.describe(),
    })?;
    data.check_finite(name)?;
    Ok(data)
}

/// [`required_tensor`] widened to f32 (vectors, norms, biases, GPT-2's weights).
pub(crate) fn required_f32(
    source: &mut dyn WeightSource,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    required_tensor(source, name, shape).map(|m| m.to_f32())
}

/// An optional tensor (`None` when `wanted` is false or the source lacks it … only when not
/// wanted: a wanted tensor must exist), finite, widened to f32.
pub(crate) fn optional_f32(
    source: &mut dyn WeightSource,
    name: &str,
    shape: &[usize],
    wanted: bool,
) -> Result<Option<Vec<f32>>> {
    if wanted {
        required_f32(source, name, shape).map(Some)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(n_head, 2, dh/2, in).swapaxes(1, 2).reshape(out, in)
        let (n_head, dh, inp) = (2, 4, 3);
        let out = n_head * dh;
        let hf: Vec<f32> = (0..out * inp).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..dh / 2 {
                    let src = (h * dh + j * (dh / 2) + i) * inp;
                    let dst = (h * dh + 2 * i + j) * inp;
                    gguf[dst..dst + inp].copy_from_slice(&hf[src..src + inp]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, n_head, out, inp), hf);
    }

    #[test]
    fn architectures_by_model_type() {
        for a in Architecture::ALL {
            assert_eq!(Architecture::from_model_type(a.model_type()).unwrap(), a);
        }
        let e = Architecture::from_model_type("mamba").unwrap_err().to_string();
        assert_eq!(
            e,
            "model architecture \"mamba\" is not supported: supported are gpt2, llama, mistral, qwen2, qwen3, gemma2, gemma3_text, olmo2, phi3, gpt_neox"
        );
    }

    #[test]
    fn transposed_matrix() {
        let m = HostMatrix::transposed(2, 3, &[1., 2., 3., 4., 5., 6.]);
        assert_eq!((m.rows, m.cols), (3, 2));
        assert_eq!(m.data, vec![1., 4., 2., 5., 3., 6.]);
        // Shapes that are not multiples of the tile, against the definition.
        for (rows, cols) in [(33, 65), (1, 70), (70, 1), (64, 32)] {
            let data: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = HostMatrix::transposed(rows, cols, &data);
            assert_eq!((t.rows, t.cols), (cols, rows));
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        t.data[c * rows + r],
                        data[r * cols + c],
                        "({rows}, {cols}) at ({r}, {c})"
                    );
                }
            }
        }
    }
}
