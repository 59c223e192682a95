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
    let content = Content::read(&mut file).map_err(|e| {
        gguf_error(
            path,
            format!(
                "not a readable GGUF file ({}): it may be truncated, corrupt, or use an unsupported tensor type (supported: {GGUF_TYPES}); re-download it",
                crate::first_line(&e)
            ),
        )
    })?;
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
