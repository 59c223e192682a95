//! GGUF copies of the family fixtures, written by llama.cpp's own `convert_hf_to_gguf.py` from the
//! same weights (`tools/make_fixtures.py`, see tools/README.md "GGUF copies"): the GGUF reader
//! must undo every converter convention (tensor names, Gemma norms stored as `1 + w`, llama q/k
//! row permutation, Phi-3's fused tensors, GPT-NeoX's re-laid-out q/k/v) and give the same typed
//! weights as the safetensors checkpoint; where the GGUF metadata carries everything the model
//! needs, the same logits too.
//!
//! Where it does not (recorded by the fixture script): Gemma GGUFs have no
//! `query_pre_attn_scalar` (llama.cpp, and this reader, use `head_dim`), Gemma-3 GGUFs no
//! `layer_types` (llama.cpp's 5:1 pattern is used), the Mistral copy is converted as `llama`
//! without its window, and llama.cpp's Phi-3 drops the window. For those only the weights are
//! compared, and the configuration differences are asserted to be exactly these.
#![cfg(feature = "candle")]

use backend_candle::{Decoder, Device};
use fs_checkpoint::{Checkpoint, DecoderConfig, DecoderWeights, LayerAttention, ModelWeights};
use fs_estimators::SplitModel;
use fs_suite::fixtures::{dir, Reference};

fn decoder(ckpt: &Checkpoint) -> DecoderWeights {
    match ckpt.read_weights().expect("read weights") {
        ModelWeights::Decoder(w) => w,
        ModelWeights::Gpt2(_) => panic!("a decoder fixture"),
    }
}

/// The largest absolute difference between two sets of typed weights (same layout).
fn max_weight_diff(a: &DecoderWeights, b: &DecoderWeights) -> f32 {
    let mut worst = 0f32;
    let mut cmp = |x: &[f32], y: &[f32], what: &str| {
        assert_eq!(x.len(), y.len(), "{what}: lengths differ");
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
        }
    };
    cmp(&a.embed.to_f32(), &b.embed.to_f32(), "embed");
    cmp(&a.norm.weight, &b.norm.weight, "final norm");
    cmp(
        a.norm.bias.as_deref().unwrap_or_default(),
        b.norm.bias.as_deref().unwrap_or_default(),
        "final norm bias",
    );
    assert_eq!(a.lm_head.is_some(), b.lm_head.is_some(), "tying");
    if let (Some(x), Some(y)) = (&a.lm_head, &b.lm_head) {
        cmp(&x.to_f32(), &y.to_f32(), "lm_head");
    }
    for (i, (x, y)) in a.blocks.iter().zip(&b.blocks).enumerate() {
        let lin = |l: &fs_checkpoint::StoredLinear| {
            let mut v = l.weight.to_f32();
            v.extend(l.bias.clone().unwrap_or_default());
            v
        };
        for (name, p, q) in [
            ("q", &x.q, &y.q),
            ("k", &x.k, &y.k),
            ("v", &x.v, &y.v),
            ("o", &x.o, &y.o),
            ("up", &x.up, &y.up),
            ("down", &x.down, &y.down),
        ] {
            cmp(&lin(p), &lin(q), &format!("block {i} {name}"));
        }
        assert_eq!(x.gate.is_some(), y.gate.is_some());
        if let (Some(p), Some(q)) = (&x.gate, &y.gate) {
            cmp(&lin(p), &lin(q), &format!("block {i} gate"));
        }
        for (name, p, q) in [
            ("attn_norm", &x.attn_norm, &y.attn_norm),
            ("post_attn_norm", &x.post_attn_norm, &y.post_attn_norm),
            ("mlp_norm", &x.mlp_norm, &y.mlp_norm),
            ("post_mlp_norm", &x.post_mlp_norm, &y.post_mlp_norm),
        ] {
            assert_eq!(p.is_some(), q.is_some(), "block {i} {name}");
            if let (Some(p), Some(q)) = (p, q) {
                cmp(&p.weight, &q.weight, &format!("block {i} {name}"));
                cmp(
                    p.bias.as_deref().unwrap_or_default(),
                    q.bias.as_deref().unwrap_or_default(),
                    &format!("block {i} {name} bias"),
                );
            }
        }
        for (name, p, q) in [("q_norm", &x.q_norm, &y.q_norm), ("k_norm", &x.k_norm, &y.k_norm)] {
            assert_eq!(p.is_some(), q.is_some(), "block {i} {name}");
            if let (Some(p), Some(q)) = (p, q) {
                cmp(p, q, &format!("block {i} {name}"));
            }
        }
    }
    worst
}

/// The HF config with what the GGUF cannot carry set as the GGUF reader sets it.
fn as_gguf_sees_it(hf: &DecoderConfig, gguf: &DecoderConfig) -> DecoderConfig {
    DecoderConfig {
        query_pre_attn_scalar: gguf.query_pre_attn_scalar,
        layer_types: gguf.layer_types.clone(),
        sliding_window: gguf.sliding_window,
        architecture: gguf.architecture,
        max_position_embeddings: gguf.max_position_embeddings,
        norm_eps: gguf.norm_eps,
        ..hf.clone()
    }
}

#[test]
fn gguf_copies_read_as_the_same_weights_and_where_complete_the_same_model() {
    // (fixture, whether the GGUF metadata carries the whole model)
    let fixtures = [
        ("llama-tiny-tied", true),
        ("qwen3-tiny", true),
        ("olmo2-tiny", true),
        ("pythia-tiny", true),
        ("phi3-tiny", false),
        ("gemma2-tiny", false),
        ("gemma3-tiny", false),
        ("mistral-window-tiny", false),
    ];
    for (name, complete) in fixtures {
        let st = Checkpoint::open(dir(name).to_str().unwrap()).expect("safetensors");
        let gg = Checkpoint::open(dir(name).join("model.gguf").to_str().unwrap())
            .unwrap_or_else(|e| panic!("{name}: GGUF: {e}"));
        let (a, b) = (decoder(&st), decoder(&gg));
        let diff = max_weight_diff(&a, &b);
        println!("{name}: max |Δ weight| safetensors vs GGUF {diff:.2e}");
        // The GGUF holds the same f32 values; Gemma norms go through 1 + w and back.
        assert!(diff <= 1e-6, "{name}: weights differ by {diff}");
        let (hf, gc) = (&a.config, &b.config);
        // GGUF stores ε as f32.
        assert!((gc.norm_eps - hf.norm_eps).abs() <= 1e-6 * hf.norm_eps, "{name}: eps");
        assert_eq!(
            (
                gc.rope.theta,
                gc.rotary_dim,
                gc.qk_norm,
                gc.final_logit_softcap,
                gc.attn_logit_softcap
            ),
            (
                hf.rope.theta,
                hf.rotary_dim,
                hf.qk_norm,
                hf.final_logit_softcap,
                hf.attn_logit_softcap
            ),
            "{name}: RoPE, q/k norm, caps"
        );
        if complete {
            assert_eq!(&as_gguf_sees_it(hf, gc), gc, "{name}: the GGUF config");
            assert!(gc.layer_types.iter().all(|t| *t == LayerAttention::Full));
            // The same logits at every position and every layer's activations.
            let r = Reference::load(name);
            let m_st = Decoder::new(a, &Device::Cpu).unwrap();
            let m_gg = Decoder::new(b, &Device::Cpu).unwrap();
            let all: Vec<usize> = (0..r.input_ids.len()).collect();
            let za = m_st.logits(&m_st.lower(&r.input_ids, 0).unwrap(), &all).unwrap();
            let zb = m_gg.logits(&m_gg.lower(&r.input_ids, 0).unwrap(), &all).unwrap();
            let worst = za
                .as_slice()
                .iter()
                .zip(zb.as_slice())
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            println!("{name}: max |Δ logit| safetensors vs GGUF {worst:.2e}");
            assert!(worst <= 1e-5, "{name}: logits differ by {worst}");
        }
    }
    // llama.cpp stores Llama-3 RoPE scaling as a `rope_freqs` tensor, which this reader does not
    // apply: such a file is refused, naming the way out.
    let e = Checkpoint::open(dir("llama-tiny-untied").join("model.gguf").to_str().unwrap())
        .expect_err("rope_freqs refused")
        .to_string();
    assert!(e.contains("rope_freqs") && !e.contains('\n'), "{e}");
}
