//! Random tiny models for property tests: proptest strategies over configurations (layers 1–3,
//! heads 1–4 with grouped-query attention for Llama, d 8–64, vocab 5–300, T 1–16), weights from
//! [`fs_checkpoint::random_gpt2_weights`] / [`fs_checkpoint::random_decoder_weights`] and a
//! checkpoint directory every backend loads identically.

use std::path::Path;

use fs_checkpoint::{DecoderConfig, Gpt2Config, ModelFiles};
use proptest::prelude::*;

/// Standard deviation of the random weight matrices: large enough that next-token distributions
/// are far from uniform (entropies well below `ln V`), small enough that f32 logits stay ~10.
pub const WEIGHT_STD: f64 = 0.3;

/// A model configuration, its weights' seed, a token sequence and a split layer.
#[derive(Clone, Debug)]
pub struct Case<C> {
    /// The configuration.
    pub config: C,
    /// Seed of the weights.
    pub seed: u64,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Split layer, `0..=n_layers`.
    pub layer: usize,
}

impl Case<Gpt2Config> {
    /// Write the model to `dir` (config.json + model.safetensors).
    pub fn write(&self, dir: &Path) -> ModelFiles {
        let w = fs_checkpoint::random_gpt2_weights(&self.config, WEIGHT_STD, self.seed);
        fs_checkpoint::write_checkpoint(dir, &self.config.to_json(), &w).expect("write checkpoint")
    }
}

impl Case<DecoderConfig> {
    /// Write the model to `dir` (config.json + model.safetensors).
    pub fn write(&self, dir: &Path) -> ModelFiles {
        let w = fs_checkpoint::random_decoder_weights(&self.config, WEIGHT_STD, self.seed);
        fs_checkpoint::write_checkpoint(dir, &self.config.to_json(), &w).expect("write checkpoint")
    }
}

fn tokens_and_layer(
    vocab: usize,
    n_layers: usize,
) -> impl Strategy<Value = (Vec<u32>, usize, u64)> {
    (prop::collection::vec(0..vocab as u32, 1..=16), 0..=n_layers, any::<u64>())
}

/// Random tiny GPT-2 cases.
pub fn gpt2_case() -> impl Strategy<Value = Case<Gpt2Config>> {
    (1usize..=3, 1usize..=4, 2usize..=16, 5usize..=300, any::<bool>())
        .prop_flat_map(|(n_layer, n_head, head_dim, vocab, tied)| {
            // d a multiple of n_head in 8..=64.
            let mut d = (n_head * head_dim).clamp(8, 64).div_ceil(n_head) * n_head;
            if d > 64 {
                d -= n_head;
            }
            let config = Gpt2Config {
                vocab_size: vocab,
                n_positions: 32,
                n_embd: d,
                n_layer,
                n_head,
                layer_norm_epsilon: 1e-5,
                activation_function: "gelu_new".into(),
                tie_word_embeddings: tied,
                n_inner: None,
            };
            (Just(config), tokens_and_layer(vocab, n_layer))
        })
        .prop_map(|(config, (tokens, layer, seed))| Case { config, seed, tokens, layer })
}

/// The decoder families [`decoder_case`] draws from, by `model_type`.
pub const DECODER_FAMILIES: [&str; 9] =
    ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3", "gpt_neox"];

/// Random tiny RoPE decoder cases of every family (`config.json` built the way the family writes
/// it and parsed by `DecoderConfig::from_json`, so each family's defaults apply): grouped-query
/// attention (key/value heads dividing the query heads; GPT-NeoX full), biases where the family
/// has the switch, tied or untied heads, Llama-3 or linear RoPE scaling, partial rotary
/// (GPT-NeoX, Phi-3), parallel or sequential residual (GPT-NeoX), sliding windows of 1–6
/// positions (shorter than most sequences) and active soft-caps (Gemma-2), Gemma's
/// `query_pre_attn_scalar`.
pub fn decoder_case() -> impl Strategy<Value = Case<DecoderConfig>> {
    (
        (1usize..=3, 1usize..=4, 1usize..=8, 5usize..=300, 8usize..=96),
        (0usize..DECODER_FAMILIES.len(), any::<bool>(), any::<bool>(), any::<bool>(), any::<u32>()),
    )
        .prop_flat_map(|((n_layer, heads, half_head, vocab, inner), (ty, bias, tied, flag, r))| {
            let family = DECODER_FAMILIES[ty];
            // head_dim even (a multiple of 4 where a half-rotary factor applies), d = heads ·
            // head_dim in 8..=64.
            let head_dim = (2 * half_head).max((8usize).div_ceil(heads).next_multiple_of(2));
            let head_dim = head_dim.min(64 / heads / 2 * 2);
            let head_dim = if matches!(family, "gpt_neox" | "phi3") {
                head_dim.next_multiple_of(4).min(64 / heads / 4 * 4).max(4)
            } else {
                head_dim
            };
            let divisors: Vec<usize> = (1..=heads).filter(|k| heads % k == 0).collect();
            let kv =
                if family == "gpt_neox" { heads } else { divisors[r as usize % divisors.len()] };
            let window = 1 + (r as usize / 7) % 6;
            let mut json = serde_json::json!({
                "model_type": family, "vocab_size": vocab, "hidden_size": heads * head_dim,
                "intermediate_size": inner, "num_hidden_layers": n_layer,
                "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
                "rms_norm_eps": 1e-5, "layer_norm_eps": 1e-5,
                "rope_theta": if r % 2 == 0 { 10_000.0 } else { 500.0 },
                "max_position_embeddings": 32, "tie_word_embeddings": tied,
                "attention_bias": bias,
            });
            match family {
                "llama" if flag => {
                    json["rope_scaling"] = serde_json::json!({"rope_type": "llama3",
                            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16.0});
                }
                "mistral" | "phi3" => {
                    json["sliding_window"] = serde_json::json!(window);
                    if family == "phi3" && flag {
                        json["partial_rotary_factor"] = serde_json::json!(0.5);
                    }
                }
                "gemma2" => {
                    json["sliding_window"] = serde_json::json!(window);
                    json["query_pre_attn_scalar"] = serde_json::json!(head_dim as f64 * 1.5);
                    // Caps near the scores' and logits' scale, so tanh bends them.
                    json["attn_logit_softcapping"] = serde_json::json!(1.0 + (r % 4) as f64);
                    json["final_logit_softcapping"] = serde_json::json!(2.0 + (r % 5) as f64);
                }
                "gemma3_text" => {
                    json["sliding_window"] = serde_json::json!(window);
                    json["sliding_window_pattern"] = serde_json::json!(2);
                    json["rope_local_base_freq"] = serde_json::json!(100.0);
                    if flag {
                        json["rope_scaling"] =
                            serde_json::json!({"rope_type": "linear", "factor": 4.0});
                    }
                }
                "gpt_neox" => {
                    json["use_parallel_residual"] = serde_json::json!(flag);
                    json["rotary_pct"] = serde_json::json!(if r % 3 == 0 { 1.0 } else { 0.5 });
                    json["hidden_act"] =
                        serde_json::json!(if r % 2 == 0 { "gelu" } else { "gelu_new" });
                }
                _ => {}
            }
            let config = DecoderConfig::from_json(&json.to_string(), Path::new("config.json"))
                .expect("a valid generated config");
            (Just(config), tokens_and_layer(vocab, n_layer))
        })
        .prop_map(|(config, (tokens, layer, seed))| Case { config, seed, tokens, layer })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    #[test]
    fn generated_configs_are_valid_and_round_trip() {
        let mut runner = TestRunner::deterministic();
        for _ in 0..200 {
            let g = gpt2_case().new_tree(&mut runner).unwrap().current();
            let path = Path::new("config.json");
            assert_eq!(
                Gpt2Config::from_json(&g.config.to_json().to_string(), path).unwrap(),
                g.config
            );
            assert!((8..=64).contains(&g.config.n_embd) && g.layer <= g.config.n_layer);
            let l = decoder_case().new_tree(&mut runner).unwrap().current();
            let back = DecoderConfig::from_json(&l.config.to_json().to_string(), path).unwrap();
            assert_eq!(back, l.config);
            assert!((8..=64).contains(&l.config.hidden_size), "{:?}", l.config);
            assert_eq!(l.config.num_attention_heads % l.config.num_key_value_heads, 0);
            assert!(l.tokens.iter().all(|&t| (t as usize) < l.config.vocab_size));
        }
    }
}
