//! Llama-architecture GGUF files (llama.cpp): metadata → [`LlamaConfig`], every tensor
//! dequantised to f32 on load (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants, via
//! candle's `gguf_file`), the tokenizer rebuilt from `tokenizer.ggml.*`.
//!
//! RoPE layout: llama.cpp's converter permutes the rows of `attn_q` / `attn_k` so that the
//! interleaved (GPT-J style) rotation applies; this loader undoes the permutation so that the
//! model runs with HF's `rotate_half`, like an HF checkpoint. (Pairing the wrong rows with the
//! wrong rotation still ranks plausible tokens first, so the tests check probabilities.)

use crate::llama::Llama;
use crate::Error;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Device;
use fs_checkpoint::{CheckpointError, LlamaConfig};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The GGUF architectures this loader reads.
pub const GGUF_ARCHITECTURES: &[&str] = &["llama"];
/// The GGUF tensor types this loader dequantises.
pub const GGUF_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

fn gguf_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Gguf { path: path.to_path_buf(), message: message.into() }
}

/// Undo llama.cpp's q/k row permutation for `n_head` heads: GGUF row `h·dh + 2i + j` is HF row
/// `h·dh + j·dh/2 + i`.
fn unpermute(rows: &[f32], n_head: usize, out: usize, inp: usize) -> Vec<f32> {
    let dh = out / n_head;
    let half = dh / 2;
    let mut hf = vec![0f32; rows.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * dh + 2 * i + j) * inp;
                let dst = (h * dh + j * half + i) * inp;
                hf[dst..dst + inp].copy_from_slice(&rows[src..src + inp]);
            }
        }
    }
    hf
}

/// Longest GGUF string accepted (a key, a value, or one element of a string array): 16 MiB.
const MAX_STRING_BYTES: u64 = 1 << 24;
/// Most metadata values accepted in all (scalars and array elements together; SmolLM2 has
/// ≈ 150 k): bounds the memory of candle's in-memory metadata whatever the file size.
const MAX_METADATA_VALUES: u64 = 1 << 24;
/// Most tensors and metadata entries accepted.
const MAX_ENTRIES: u64 = 1 << 20;
/// Deepest nesting of arrays accepted (llama.cpp writes none).
const MAX_NESTING: u32 = 4;

enum HeaderError {
    Io(std::io::Error),
    Bad(String),
}

impl From<std::io::Error> for HeaderError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HeaderError::Bad("the header ends early".into())
        } else {
            HeaderError::Io(e)
        }
    }
}

fn bad<T>(message: String) -> Result<T, HeaderError> {
    Err(HeaderError::Bad(message))
}

/// A position-tracking reader over the header of a file of known size.
struct HeaderReader<R> {
    inner: R,
    pos: u64,
    size: u64,
    /// GGUF v1 writes lengths as u32, later versions as u64.
    v1: bool,
    /// Metadata values read so far.
    values: u64,
}

impl<R: Read + Seek> HeaderReader<R> {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], HeaderError> {
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, HeaderError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, HeaderError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn length(&mut self) -> Result<u64, HeaderError> {
        if self.v1 {
            self.u32().map(u64::from)
        } else {
            self.u64()
        }
    }

    /// Skip `n` bytes, which must lie inside the file.
    fn skip(&mut self, n: u64, what: &str) -> Result<(), HeaderError> {
        if n > self.remaining() {
            return bad(format!(
                "{what} needs {n} bytes at offset {}, past the end of the {}-byte file",
                self.pos, self.size
            ));
        }
        self.inner.seek_relative(n as i64)?;
        self.pos += n;
        Ok(())
    }

    /// A string, its length checked before anything is read (contents returned only when
    /// `keep`).
    fn string(&mut self, what: &str, keep: bool) -> Result<Option<String>, HeaderError> {
        let len = self.length()?;
        if len > MAX_STRING_BYTES {
            return bad(format!("{what} declares a {len}-byte string (limit {MAX_STRING_BYTES})"));
        }
        if !keep {
            self.skip(len, what)?;
            return Ok(None);
        }
        if len > self.remaining() {
            return bad(format!(
                "{what} declares a {len}-byte string at offset {}, past the end of the {}-byte file",
                self.pos, self.size
            ));
        }
        let mut v = vec![0u8; len as usize];
        self.inner.read_exact(&mut v)?;
        self.pos += len;
        // As candle's reader does (some writers NUL-terminate GGUF strings): without this, a
        // key "general.alignment\0…" would escape the alignment check here and reach candle as
        // "general.alignment" (found by the gguf fuzz target: alignment 0, division by zero).
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(Some(String::from_utf8_lossy(&v).into_owned()))
    }

    fn count_values(&mut self, n: u64, key: &str) -> Result<(), HeaderError> {
        self.values = self.values.saturating_add(n);
        if self.values > MAX_METADATA_VALUES {
            return bad(format!(
                "metadata {key:?} brings the metadata to over {MAX_METADATA_VALUES} values"
            ));
        }
        Ok(())
    }

    /// Skip one metadata value of `value_type`; integer scalars are returned (for
    /// `general.alignment`).
    fn value(
        &mut self,
        value_type: u32,
        key: &str,
        depth: u32,
    ) -> Result<Option<i64>, HeaderError> {
        self.count_values(1, key)?;
        Ok(match value_type {
            GGUF_U8 => Some(i64::from(self.bytes::<1>()?[0])),
            GGUF_I8 => Some(i64::from(i8::from_le_bytes(self.bytes()?))),
            GGUF_U16 => Some(i64::from(u16::from_le_bytes(self.bytes()?))),
            GGUF_I16 => Some(i64::from(i16::from_le_bytes(self.bytes()?))),
            GGUF_U32 => Some(i64::from(self.u32()?)),
            GGUF_I32 => Some(i64::from(i32::from_le_bytes(self.bytes()?))),
            GGUF_STRING => {
                self.string(&format!("metadata {key:?}"), false)?;
                None
            }
            GGUF_ARRAY => {
                if depth >= MAX_NESTING {
                    return bad(format!("metadata {key:?} nests arrays over {MAX_NESTING} deep"));
                }
                let elem_type = self.u32()?;
                let len = self.length()?;
                let prefix = if self.v1 { 4 } else { 8 };
                // Fixed-size elements are skipped in one step; strings and arrays are walked.
                let (min, fixed) = match elem_type {
                    GGUF_STRING => (prefix, false),
                    GGUF_ARRAY => (4 + prefix, false),
                    t => match fixed_size(t) {
                        Some(w) => (w, true),
                        None => {
                            return bad(format!(
                                "metadata {key:?} is an array of unknown value type {t}"
                            ))
                        }
                    },
                };
                match len.checked_mul(min) {
                    Some(n) if n <= self.remaining() => {}
                    _ => {
                        return bad(format!(
                            "metadata {key:?} declares {len} array elements, more than the {} bytes left in the file hold",
                            self.remaining()
                        ))
                    }
                }
                if fixed {
                    self.count_values(len, key)?;
                    self.skip(len * min, key)?;
                } else {
                    for _ in 0..len {
                        self.value(elem_type, key, depth + 1)?;
                    }
                }
                None
            }
            t => match fixed_size(t) {
                Some(w) => {
                    self.skip(w, key)?;
                    None
                }
                None => return bad(format!("metadata {key:?} has unknown value type {t}")),
            },
        })
    }
}

// GGUF metadata value types.
const GGUF_U8: u32 = 0;
const GGUF_I8: u32 = 1;
const GGUF_U16: u32 = 2;
const GGUF_I16: u32 = 3;
const GGUF_U32: u32 = 4;
const GGUF_I32: u32 = 5;
const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;

/// The size in bytes of a fixed-size GGUF value type (integers, floats, bool).
fn fixed_size(value_type: u32) -> Option<u64> {
    match value_type {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

/// The candle type of a GGUF tensor type id (those candle's reader knows).
fn ggml_dtype(id: u32) -> Option<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType as T;
    Some(match id {
        0 => T::F32,
        1 => T::F16,
        2 => T::Q4_0,
        3 => T::Q4_1,
        6 => T::Q5_0,
        7 => T::Q5_1,
        8 => T::Q8_0,
        9 => T::Q8_1,
        10 => T::Q2K,
        11 => T::Q3K,
        12 => T::Q4K,
        13 => T::Q5K,
        14 => T::Q6K,
        15 => T::Q8K,
        30 => T::BF16,
        _ => return None,
    })
}

/// Walk a GGUF header without allocating from any declared size: magic and version; the
/// tensor and metadata counts against the bytes left; every string and array length against
/// the bytes left and the limits above; `general.alignment` a power of two; every tensor's
/// rank, dimensions (≥ 1, no overflow), type, and byte range `[offset, offset + size)` inside
/// the data section. Returns the number of tensors.
fn check_header(file: &std::fs::File) -> Result<u64, HeaderError> {
    let size = file.metadata()?.len();
    let mut r = HeaderReader { inner: BufReader::new(file), pos: 0, size, v1: false, values: 0 };
    let magic = r.bytes::<4>()?;
    if &magic != b"GGUF" {
        return bad(format!("the magic is {magic:02x?}, not \"GGUF\""));
    }
    let version = r.u32()?;
    if !(1..=3).contains(&version) {
        return bad(format!("GGUF version {version} (readable: 1, 2, 3)"));
    }
    r.v1 = version == 1;
    let n_tensors = r.length()?;
    let n_kv = r.length()?;
    let prefix = if r.v1 { 4 } else { 8 };
    // Smallest entries: a key, a type and one byte; a name, a rank, a type and an offset.
    let needed = n_kv
        .checked_mul(prefix + 4 + 1)
        .zip(n_tensors.checked_mul(prefix + 4 + 4 + 8))
        .and_then(|(a, b)| a.checked_add(b));
    if n_tensors > MAX_ENTRIES || n_kv > MAX_ENTRIES || needed.is_none_or(|n| n > r.remaining()) {
        return bad(format!(
            "the header declares {n_tensors} tensors and {n_kv} metadata entries, more than the {}-byte file holds",
            size
        ));
    }
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        let key = r.string("a metadata key", true)?.unwrap_or_default();
        let value_type = r.u32()?;
        let value = r.value(value_type, &key, 0)?;
        if key == "general.alignment" {
            // candle reads the alignment from 8-, 16- and 32-bit integers only.
            alignment = match (value_type, value) {
                (0..=5, Some(a)) if a >= 0 => a as u64,
                _ => 32,
            };
            if !alignment.is_power_of_two() {
                return bad(format!("general.alignment is {alignment}, not a power of two"));
            }
        }
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = r.string("a tensor name", true)?.unwrap_or_default();
        let rank = r.u32()?;
        if rank > 4 {
            return bad(format!("tensor {name:?} has {rank} dimensions (at most 4)"));
        }
        let mut elems = 1u64;
        for _ in 0..rank {
            let dim = r.length()?;
            if dim == 0 {
                return bad(format!("tensor {name:?} has an empty dimension"));
            }
            elems = elems
                .checked_mul(dim)
                .filter(|&n| n <= isize::MAX as u64)
                .ok_or_else(|| HeaderError::Bad(format!("tensor {name:?} is impossibly large")))?;
        }
        let type_id = r.u32()?;
        let dtype = ggml_dtype(type_id).ok_or_else(|| {
            HeaderError::Bad(format!("tensor {name:?} has tensor type {type_id}"))
        })?;
        let block = dtype.block_size() as u64;
        if !elems.is_multiple_of(block) {
            return bad(format!(
                "tensor {name:?} has {elems} elements, not a whole number of {dtype:?} blocks of {block}"
            ));
        }
        let bytes = (elems / block).checked_mul(dtype.type_size() as u64);
        let offset = r.u64()?;
        let end = bytes.and_then(|b| offset.checked_add(b));
        tensors.push((name, offset, end));
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    // A file without tensors may end before the (aligned) data section would start.
    let data_len = size.checked_sub(data_start).or(tensors.is_empty().then_some(0)).ok_or_else(|| {
        HeaderError::Bad(format!("the tensor data would start at byte {data_start}, past the end of the {size}-byte file"))
    })?;
    for (name, offset, end) in tensors {
        match end {
            Some(end) if end <= data_len => {}
            _ => {
                return bad(format!(
                    "tensor {name:?} at data offset {offset} runs past the end of the file ({data_len} bytes of tensor data)"
                ))
            }
        }
    }
    Ok(n_tensors)
}

/// Load a Llama-architecture GGUF file: the model and the tokenizer from its metadata.
///
/// Errors (one line, naming the file): not a GGUF file / truncated or corrupt (detected from the
/// header before any tensor data is read; every tensor's byte range is checked against the file
/// size before it is allocated); an architecture other than `llama` or a tensor type candle
/// cannot read (both list what is supported); a tensor whose shape does not match the metadata.
pub fn load_llama_gguf(
    path: &Path,
    device: &Device,
) -> Result<(Llama, fs_checkpoint::tokenizers::Tokenizer), Error> {
    let mut file = std::fs::File::open(path).map_err(|source| {
        Error::Checkpoint(CheckpointError::Io { path: path.to_path_buf(), source })
    })?;
    let unreadable = |reason: &str| {
        gguf_error(
            path,
            format!(
                "not a readable GGUF file ({reason}): it may be truncated, corrupt, or use an unsupported tensor type (supported: {GGUF_TYPES}); re-download it"
            ),
        )
    };
    // Our own pass over the header first: every count, length and tensor range is checked
    // against the file's real size (and sane limits) before candle's reader allocates from them.
    let n_tensors = check_header(&file).map_err(|e| match e {
        HeaderError::Io(e) => unreadable(&e.to_string()),
        HeaderError::Bad(m) => unreadable(&m),
    })?;
    file.seek(SeekFrom::Start(0)).map_err(|source| {
        Error::Checkpoint(CheckpointError::Io { path: path.to_path_buf(), source })
    })?;
    let content = Content::read(&mut file).map_err(|e| unreadable(&crate::first_line(&e)))?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if !GGUF_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(CheckpointError::Unsupported {
            what: format!("GGUF architecture {arch:?} in {}", path.display()),
            supported: GGUF_ARCHITECTURES.join(", "),
        }
        .into());
    }
    let get_u = |key: &str| -> Result<usize, Error> {
        md.get(key)
            .and_then(|v| {
                v.to_u32().ok().map(|x| x as usize).or_else(|| v.to_u64().ok().map(|x| x as usize))
            })
            .ok_or_else(|| {
                gguf_error(
                    path,
                    format!("lacks the metadata key {key}: not a llama.cpp llama GGUF"),
                )
            })
    };
    let get_f = |key: &str| md.get(key).and_then(|v| v.to_f32().ok()).map(f64::from);
    if let Some(t) = md.get("llama.rope.scaling.type").and_then(|v| v.to_string().ok()) {
        if t != "none" {
            return Err(CheckpointError::Unsupported {
                what: format!("RoPE scaling {t:?} in the GGUF metadata of {}", path.display()),
                supported: "none (Llama-3 scaling is read from HF config.json checkpoints)".into(),
            }
            .into());
        }
    }
    let strings = |key: &str| -> Result<Vec<String>, Error> {
        let arr = md
            .get(key)
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| gguf_error(path, format!("lacks {key}")))?;
        arr.iter()
            .map(|v| v.to_string().cloned().map_err(|e| gguf_error(path, format!("{key}: {e}"))))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let d = get_u("llama.embedding_length")?;
    let heads = get_u("llama.attention.head_count")?;
    let cfg = LlamaConfig {
        model_type: "llama".into(),
        vocab_size: tokens.len(),
        hidden_size: d,
        intermediate_size: get_u("llama.feed_forward_length")?,
        num_hidden_layers: get_u("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: get_u("llama.attention.head_count_kv").unwrap_or(heads),
        head_dim: get_u("llama.rope.dimension_count").unwrap_or(d / heads.max(1)),
        rms_norm_eps: get_f("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: get_f("llama.rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: get_u("llama.context_length").unwrap_or(2048),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: content.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: false,
    };
    if cfg.num_attention_heads == 0
        || cfg.num_key_value_heads == 0
        || !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads)
        || !cfg.head_dim.is_multiple_of(2)
    {
        return Err(gguf_error(
            path,
            format!(
                "has inconsistent attention metadata (heads {}, kv heads {}, head dim {})",
                cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            ),
        ));
    }
    // Sizes the model allocates from before any tensor is read: bounded by the file.
    if cfg.num_hidden_layers == 0 || cfg.num_hidden_layers as u64 > n_tensors {
        return Err(gguf_error(
            path,
            format!(
                "declares llama.block_count = {} with {n_tensors} tensors in the file: it is corrupt, re-download it",
                cfg.num_hidden_layers
            ),
        ));
    }
    // The same limits as a config.json (the RoPE table alone has head_dim / 2 entries).
    cfg.check_sizes(path).map_err(|e| match e {
        fs_checkpoint::CheckpointError::Config { field, message, .. } => gguf_error(
            path,
            format!(
                "has impossible model sizes ({field} {message}): it is corrupt, re-download it"
            ),
        ),
        other => gguf_error(path, other.to_string()),
    })?;
    let kv_heads = cfg.num_key_value_heads;
    let mut get = |hf_name: &str, shape: &[usize]| -> Result<Option<Vec<f32>>, Error> {
        let (gguf_name, permute_heads) = match hf_gguf_name(hf_name, heads, kv_heads) {
            Some(x) => x,
            None => return Ok(None),
        };
        let Some(info) = content.tensor_infos.get(&gguf_name) else { return Ok(None) };
        if info.shape.dims() != shape {
            return Err(CheckpointError::ShapeMismatch {
                name: gguf_name,
                expected: shape.to_vec(),
                got: info.shape.dims().to_vec(),
                path: path.to_path_buf(),
            }
            .into());
        }
        let q = info.read(&mut file, content.tensor_data_offset, &Device::Cpu).map_err(|e| {
            gguf_error(
                path,
                format!(
                    "tensor {gguf_name}: {}: the file is truncated or corrupt, re-download it",
                    crate::first_line(&e)
                ),
            )
        })?;
        let data = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(match permute_heads {
            Some(n) => unpermute(&data, n, shape[0], shape[1]),
            None => data,
        }))
    };
    let model = Llama::from_hf_weights(cfg, &mut get, device, &[path.to_path_buf()])?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match md.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
        Some(arr) => arr
            .iter()
            .map(|v| match v {
                Value::I32(x) => *x as i64,
                Value::U32(x) => *x as i64,
                other => other.to_u32().map(i64::from).unwrap_or(1),
            })
            .collect(),
        None => vec![1; tokens.len()],
    };
    let model_kind = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model_kind != "gpt2" {
        return Err(CheckpointError::Unsupported {
            what: format!("GGUF tokenizer model {model_kind:?} in {}", path.display()),
            supported: "gpt2 (byte-level BPE); pass --tokens instead of --text".into(),
        }
        .into());
    }
    let tokenizer = fs_checkpoint::tokenizer_from_gguf_bpe(&tokens, &merges, &types, path)?;
    Ok((model, tokenizer))
}

/// The GGUF name of an HF tensor name, and the head count to un-permute it with (q/k only).
fn hf_gguf_name(hf: &str, heads: usize, kv_heads: usize) -> Option<(String, Option<usize>)> {
    Some(match hf {
        "model.embed_tokens.weight" => ("token_embd.weight".into(), None),
        "model.norm.weight" => ("output_norm.weight".into(), None),
        "lm_head.weight" => ("output.weight".into(), None),
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (i, name) = rest.split_once('.')?;
            let (g, permute) = match name {
                "input_layernorm.weight" => ("attn_norm.weight", None),
                "post_attention_layernorm.weight" => ("ffn_norm.weight", None),
                "self_attn.q_proj.weight" => ("attn_q.weight", Some(heads)),
                "self_attn.k_proj.weight" => ("attn_k.weight", Some(kv_heads)),
                "self_attn.v_proj.weight" => ("attn_v.weight", None),
                "self_attn.o_proj.weight" => ("attn_output.weight", None),
                "self_attn.q_proj.bias" => ("attn_q.bias", None),
                "self_attn.k_proj.bias" => ("attn_k.bias", None),
                "self_attn.v_proj.bias" => ("attn_v.bias", None),
                "self_attn.o_proj.bias" => ("attn_output.bias", None),
                "mlp.gate_proj.weight" => ("ffn_gate.weight", None),
                "mlp.up_proj.weight" => ("ffn_up.weight", None),
                "mlp.down_proj.weight" => ("ffn_down.weight", None),
                _ => return None,
            };
            (format!("blk.{i}.{g}"), permute)
        }
    })
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
        assert_eq!(unpermute(&gguf, n_head, out, inp), hf);
    }
}
