//! Decoder models from llama.cpp GGUF files: the configuration from the metadata
//! (`{arch}.embedding_length`, …) and where each HF tensor lives, with the converter's layout
//! conventions undone on read — q/k rows permuted for the interleaved rotation (`llama` only),
//! Gemma's norm weights stored as `1 + w`, GPT-NeoX's fused q/k/v reordered from per-head to
//! `[q | k | v]`.

use crate::arch::decoder::{DecoderConfig, LayerAttention, NormKind, QkNorm, Rope, RopeScaling};
use crate::arch::{Architecture, GgufLayout, GgufTensorName};
use crate::error::{CheckpointError, Result};
use crate::gguf::{GgufFile, GgufValue};

/// The GGUF architectures read as decoder models (Mistral files are written as `llama`).
pub const GGUF_ARCHITECTURES: &[&str] =
    &["llama", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "phi3", "gptneox"];

fn architecture_of(gguf_arch: &str) -> Option<Architecture> {
    use Architecture as A;
    Some(match gguf_arch {
        "llama" => A::Llama,
        "qwen2" => A::Qwen2,
        "qwen3" => A::Qwen3,
        "gemma2" => A::Gemma2,
        "gemma3" => A::Gemma3,
        "olmo2" => A::Olmo2,
        "phi3" => A::Phi3,
        "gptneox" => A::GptNeoX,
        _ => return None,
    })
}

impl DecoderConfig {
    /// The configuration of a llama.cpp GGUF file of one of [`GGUF_ARCHITECTURES`] from its
    /// metadata (`{arch}.embedding_length`, `{arch}.block_count`, `{arch}.attention.*`,
    /// `{arch}.rope.*`, soft-caps, sliding window; the vocabulary size from
    /// `tokenizer.ggml.tokens`; tied when there is no `output.weight`; biases when the file
    /// holds them). What llama.cpp hard-codes rather than stores is taken as llama.cpp does:
    /// Gemma-2 alternates sliding and global layers, Gemma-3 has one global layer in 6 and a
    /// local RoPE θ of 10⁴, Gemma scales scores by `key_length^(−½)`.
    ///
    /// Errors name the file: another architecture, a RoPE scaling other than linear, a missing
    /// key, inconsistent attention metadata, sizes over this tool's limits or more blocks than
    /// the file has tensors.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        use Architecture as A;
        let path = file.path();
        let gguf_arch = file.architecture().to_string();
        let arch = architecture_of(&gguf_arch).ok_or_else(|| CheckpointError::Unsupported {
            what: format!("GGUF architecture {gguf_arch:?} in {}", path.display()),
            supported: GGUF_ARCHITECTURES.join(", "),
        })?;
        let key = |k: &str| format!("{gguf_arch}.{k}");
        let get_u = |k: &str| -> Option<usize> {
            file.get(&key(k)).and_then(GgufValue::as_u64).and_then(|x| usize::try_from(x).ok())
        };
        let need_u = |k: &str| -> Result<usize> {
            get_u(k).ok_or_else(|| {
                CheckpointError::gguf(
                    path,
                    format!("lacks the metadata key {}: not a llama.cpp {gguf_arch} GGUF", key(k)),
                )
            })
        };
        let get_f = |k: &str| file.get(&key(k)).and_then(GgufValue::as_f64);
        let vocab_size = file
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
            .map(<[GgufValue]>::len)
            .ok_or_else(|| CheckpointError::gguf(path, "lacks tokenizer.ggml.tokens"))?;
        let d = need_u("embedding_length")?;
        let heads = need_u("attention.head_count")?;
        let n_layers = need_u("block_count")?;
        // Sizes the model allocates from before any tensor is read: bounded by the file.
        let n_tensors = file.tensors().len();
        if n_layers == 0 || n_layers > n_tensors {
            return Err(CheckpointError::gguf(
                path,
                format!(
                    "declares {} = {n_layers} with {n_tensors} tensors in the file: it is corrupt, re-download it",
                    key("block_count")
                ),
            ));
        }
        let head_dim = get_u("attention.key_length").unwrap_or(d / heads.max(1));
        let mut cfg = DecoderConfig::llama_like(
            arch,
            vocab_size,
            d,
            need_u("feed_forward_length")?,
            n_layers,
            heads,
            get_u("attention.head_count_kv").unwrap_or(heads),
            head_dim,
        );
        cfg.rotary_dim = get_u("rope.dimension_count").unwrap_or(head_dim);
        cfg.norm_eps = get_f("attention.layer_norm_rms_epsilon")
            .or(get_f("attention.layer_norm_epsilon"))
            .unwrap_or(1e-5);
        let theta = get_f("rope.freq_base").unwrap_or(10_000.0);
        let scaling = match file.get(&key("rope.scaling.type")).and_then(GgufValue::as_str) {
            None | Some("none") => None,
            Some("linear") => get_f("rope.scaling.factor")
                .filter(|f| *f != 1.0)
                .map(|factor| RopeScaling::Linear { factor }),
            Some(t) => {
                return Err(CheckpointError::Unsupported {
                    what: format!("RoPE scaling {t:?} in the GGUF metadata of {}", path.display()),
                    supported:
                        "none, linear (Llama-3 scaling is read from HF config.json checkpoints)"
                            .into(),
                })
            }
        };
        if file.tensor("rope_freqs.weight").is_some() {
            // llama.cpp's form of Llama-3 RoPE scaling: per-frequency divisors in a tensor.
            return Err(CheckpointError::Unsupported {
                what: format!(
                    "Llama-3 RoPE scaling stored as the tensor rope_freqs.weight in {}",
                    path.display()
                ),
                supported: "GGUF files without it; load the HF checkpoint (config.json) instead"
                    .into(),
            });
        }
        cfg.rope = Rope { theta, scaling };
        cfg.max_position_embeddings = get_u("context_length").unwrap_or(2048);
        cfg.tie_word_embeddings = file.tensor("output.weight").is_none();
        cfg.qkv_bias = file.tensor("blk.0.attn_q.bias").is_some()
            || file.tensor("blk.0.attn_qkv.bias").is_some();
        cfg.o_bias = file.tensor("blk.0.attn_output.bias").is_some();
        cfg.mlp_bias = file.tensor("blk.0.ffn_down.bias").is_some();
        cfg.sliding_window = get_u("attention.sliding_window");
        let slides = |f: &dyn Fn(usize) -> bool| -> Vec<LayerAttention> {
            (0..n_layers)
                .map(|i| if f(i) { LayerAttention::Sliding } else { LayerAttention::Full })
                .collect()
        };
        match arch {
            A::Gemma2 | A::Gemma3 => {
                cfg.norm_unit_offset = true;
                cfg.scale_embeddings = true;
                cfg.activation = crate::arch::decoder::Activation::GeluTanh;
                cfg.query_pre_attn_scalar = Some(head_dim as f64);
                // Gemma-3 never applies a score cap (as in transformers); Gemma-2 reads it.
                cfg.attn_logit_softcap =
                    get_f("attn_logit_softcapping").filter(|_| arch == A::Gemma2);
                cfg.final_logit_softcap = get_f("final_logit_softcapping");
                if cfg.sliding_window.is_some() {
                    cfg.layer_types = if arch == A::Gemma2 {
                        slides(&|i| i % 2 == 0)
                    } else {
                        let pattern = get_u("attention.sliding_window_pattern").unwrap_or(6);
                        slides(&|i| (i + 1) % pattern.max(1) != 0)
                    };
                }
                if arch == A::Gemma3 {
                    cfg.qk_norm = Some(QkNorm::PerHead);
                    let local = get_f("rope.freq_base_swa").unwrap_or(10_000.0);
                    cfg.sliding_rope = Some(Rope { theta: local, scaling: None });
                }
            }
            A::Qwen3 => cfg.qk_norm = Some(QkNorm::PerHead),
            A::Olmo2 => cfg.qk_norm = Some(QkNorm::Projection),
            A::GptNeoX => {
                cfg.norm = NormKind::Layer;
                cfg.gated_mlp = false;
                cfg.activation = crate::arch::decoder::Activation::GeluErf;
                cfg.parallel_residual = file
                    .get(&key("use_parallel_residual"))
                    .and_then(|v| v.as_u64().map(|x| x != 0))
                    .unwrap_or(true);
            }
            A::Phi3 if cfg.sliding_window.is_some() => cfg.layer_types = slides(&|_| true),
            _ => {}
        }
        if cfg.layer_types.iter().all(|t| *t == LayerAttention::Full) {
            cfg.sliding_window = None;
        }
        // The same limits as a config.json.
        cfg.check_sizes(path).map_err(|e| match e {
            CheckpointError::Config { field, message, .. } => CheckpointError::gguf(
                path,
                format!(
                    "has impossible model sizes ({field} {message}): it is corrupt, re-download it"
                ),
            ),
            other => other,
        })?;
        Ok(cfg)
    }
}

/// Where the HF tensor `hf` of `cfg` lives in a llama.cpp GGUF file, and how its layout
/// differs there.
pub(crate) fn gguf_tensor_name(cfg: &DecoderConfig, hf: &str) -> Option<GgufTensorName> {
    use Architecture as A;
    let arch = cfg.architecture;
    let gemma = matches!(arch, A::Gemma2 | A::Gemma3);
    let plain = |name: String| GgufTensorName { name, layout: GgufLayout::Same };
    // Gemma's converter stores every RMSNorm weight as 1 + w.
    let norm = |name: String| GgufTensorName {
        name,
        layout: if gemma { GgufLayout::Shifted(-1.0) } else { GgufLayout::Same },
    };
    let [embed, final_norm, lm_head] = cfg.top_names();
    if hf == embed {
        return Some(plain("token_embd.weight".into()));
    }
    if hf == lm_head {
        return Some(plain("output.weight".into()));
    }
    if let Some(suffix) = hf.strip_prefix(final_norm) {
        return Some(norm(format!("output_norm{suffix}")));
    }
    let prefix = if arch == A::GptNeoX { "gpt_neox.layers." } else { "model.layers." };
    let (i, name) = hf.strip_prefix(prefix)?.split_once('.')?;
    let (stem, suffix) = name.rsplit_once('.')?; // `.weight` / `.bias`
    let is_weight = suffix == "weight";
    let permute = arch == A::Llama && is_weight;
    let (g, layout) = match (arch, stem) {
        (A::GptNeoX, "input_layernorm") => ("attn_norm", GgufLayout::Same),
        (A::GptNeoX, "post_attention_layernorm") => ("ffn_norm", GgufLayout::Same),
        (A::GptNeoX, "attention.query_key_value") => (
            "attn_qkv",
            GgufLayout::NeoxQkv { heads: cfg.num_attention_heads, head_dim: cfg.head_dim },
        ),
        (A::GptNeoX, "attention.dense") => ("attn_output", GgufLayout::Same),
        (A::GptNeoX, "mlp.dense_h_to_4h") => ("ffn_up", GgufLayout::Same),
        (A::GptNeoX, "mlp.dense_4h_to_h") => ("ffn_down", GgufLayout::Same),
        (A::GptNeoX, _) => return None,
        (_, "input_layernorm") => return Some(norm(format!("blk.{i}.attn_norm.{suffix}"))),
        (A::Gemma2 | A::Gemma3 | A::Olmo2, "post_attention_layernorm") => {
            return Some(norm(format!("blk.{i}.post_attention_norm.{suffix}")))
        }
        (_, "post_attention_layernorm" | "pre_feedforward_layernorm") => {
            return Some(norm(format!("blk.{i}.ffn_norm.{suffix}")))
        }
        (_, "post_feedforward_layernorm") => {
            return Some(norm(format!("blk.{i}.post_ffw_norm.{suffix}")))
        }
        (_, "self_attn.q_norm") => return Some(norm(format!("blk.{i}.attn_q_norm.{suffix}"))),
        (_, "self_attn.k_norm") => return Some(norm(format!("blk.{i}.attn_k_norm.{suffix}"))),
        (_, "self_attn.q_proj") if permute => {
            ("attn_q", GgufLayout::UnpermuteRows(cfg.num_attention_heads))
        }
        (_, "self_attn.k_proj") if permute => {
            ("attn_k", GgufLayout::UnpermuteRows(cfg.num_key_value_heads))
        }
        (_, "self_attn.q_proj") => ("attn_q", GgufLayout::Same),
        (_, "self_attn.k_proj") => ("attn_k", GgufLayout::Same),
        (_, "self_attn.v_proj") => ("attn_v", GgufLayout::Same),
        (_, "self_attn.o_proj") => ("attn_output", GgufLayout::Same),
        (_, "self_attn.qkv_proj") => ("attn_qkv", GgufLayout::Same),
        (_, "mlp.gate_proj") => ("ffn_gate", GgufLayout::Same),
        (_, "mlp.up_proj" | "mlp.gate_up_proj") => ("ffn_up", GgufLayout::Same),
        (_, "mlp.down_proj") => ("ffn_down", GgufLayout::Same),
        _ => return None,
    };
    Some(GgufTensorName { name: format!("blk.{i}.{g}.{suffix}"), layout })
}
