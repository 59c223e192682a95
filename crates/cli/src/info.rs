//! `fisher-stein info MODEL`: what a model is and where its files came from, without reading
//! its weights: parameter counts come from the safetensors headers or the GGUF tensor table
//! (`fs_checkpoint::Checkpoint::open` reads a GGUF file's header only).

use anyhow::Result;
use fs_checkpoint::{Checkpoint, ModelConfig, ModelOrigin, TokenizerFiles, WeightStore};

/// Arguments of `fisher-stein info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Model: a directory with config.json + safetensors, a hub id (`org/name[@revision]`; from
    /// the HF cache, downloaded into it when missing unless HF_HUB_OFFLINE=1), or a `.gguf` file.
    #[arg(value_name = "PATH_OR_ID")]
    pub model: String,
}

/// Run `info`.
pub fn run(args: InfoArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.model)?;
    let files = &ckpt.files;
    println!("model         {}", args.model);
    match (ckpt.gguf(), &files.origin) {
        (Some(f), _) => println!(
            "from          GGUF file ({:.1} MB), dequantised to f32 on load",
            f.size() as f64 / 1e6
        ),
        (None, ModelOrigin::LocalDir { dir }) => {
            println!("from          local directory {}", dir.display())
        }
        (None, ModelOrigin::HubCache { repo_id, revision, commit, snapshot_dir }) => println!(
            "from          HF cache: {repo_id} @ {revision} (commit {commit}), {}",
            snapshot_dir.display()
        ),
    }
    let embedding = if ckpt.gguf().is_some() { "token_embd" } else { "embed_tokens" };
    match &ckpt.config {
        ModelConfig::Gpt2(c) => {
            println!("architecture  gpt2 (GPT2LMHeadModel, {})", c.activation_function);
            println!("layers        {} (split layers 0..={})", c.n_layer, c.n_layer);
            println!(
                "d_model       {}  (heads {}, head dim {}, MLP {})",
                c.n_embd,
                c.n_head,
                c.n_embd / c.n_head,
                c.inner_dim()
            );
            println!("vocab         {}", c.vocab_size);
            println!("context       {} positions", c.n_positions);
            println!(
                "lm_head       {}",
                if c.tie_word_embeddings { "tied to wte" } else { "untied" }
            );
        }
        ModelConfig::Decoder(c) => {
            println!("architecture  {} ({})", c.model_type(), describe_decoder(c));
            println!(
                "layers        {} (split layers 0..={})",
                c.num_hidden_layers, c.num_hidden_layers
            );
            println!(
                "d_model       {}  (heads {}, kv heads {}, head dim {}, MLP {})",
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
                c.intermediate_size
            );
            println!("vocab         {}", c.vocab_size);
            println!("context       {} positions", c.max_position_embeddings);
            println!(
                "lm_head       {}",
                if c.tie_word_embeddings {
                    format!("tied to {embedding}")
                } else {
                    "untied".into()
                }
            );
        }
    }
    if let Some(f) = ckpt.gguf() {
        let params: usize = f.tensors().values().map(|t| t.elements()).sum();
        let mut types: Vec<&str> = f.tensors().values().map(|t| t.ggml_type.name()).collect();
        types.sort_unstable();
        types.dedup();
        println!(
            "parameters    {params} ({:.1} M) in {} tensors ({})",
            params as f64 / 1e6,
            f.tensors().len(),
            types.join(", ")
        );
        let n_tokens = f
            .get("tokenizer.ggml.tokens")
            .and_then(fs_checkpoint::GgufValue::as_array)
            .map_or(0, <[_]>::len);
        let kind = f
            .get("tokenizer.ggml.model")
            .and_then(fs_checkpoint::GgufValue::as_str)
            .unwrap_or("none");
        println!("tokenizer     {kind} from the GGUF metadata ({n_tokens} tokens)");
        return Ok(());
    }
    let store = WeightStore::open(&files.weights)?;
    let params: usize = store
        .names()
        .iter()
        .filter(|n| !n.ends_with(".attn.bias") && !n.ends_with(".attn.masked_bias"))
        .map(|n| store.shape(n).map_or(0, |s| s.iter().product::<usize>()))
        .sum();
    println!(
        "parameters    {params} ({:.1} M) in {} tensors",
        params as f64 / 1e6,
        store.names().len()
    );
    for w in &files.weights {
        let size = std::fs::metadata(w).map(|m| m.len()).unwrap_or(0);
        println!("weights       {} ({:.1} MB)", w.display(), size as f64 / 1e6);
    }
    match &files.tokenizer {
        TokenizerFiles::Json(p) => println!("tokenizer     {}", p.display()),
        TokenizerFiles::VocabMerges { vocab, merges } => {
            println!("tokenizer     byte-level BPE: {} + {}", vocab.display(), merges.display())
        }
        TokenizerFiles::Missing => println!("tokenizer     none (use --tokens; --text needs tokenizer.json or vocab.json + merges.txt)"),
    }
    Ok(())
}

/// One line of what distinguishes a decoder family: norms, residual form, RoPE, attention
/// extras, MLP.
fn describe_decoder(c: &fs_checkpoint::DecoderConfig) -> String {
    use fs_checkpoint::{Activation, LayerAttention, NormKind, QkNorm, RopeScaling};
    let mut parts = Vec::new();
    let norm = match (c.norm, c.norm_unit_offset) {
        (NormKind::Layer, _) => "LayerNorm",
        (NormKind::Rms, true) => "RMSNorm x·(1+w)",
        (NormKind::Rms, false) => "RMSNorm",
    };
    let placement = match c.architecture {
        fs_checkpoint::Architecture::Gemma2 | fs_checkpoint::Architecture::Gemma3 => ", sandwich",
        fs_checkpoint::Architecture::Olmo2 => ", after attention and MLP",
        _ => "",
    };
    parts.push(format!("{norm}{placement}"));
    if c.parallel_residual {
        parts.push("parallel residual".into());
    }
    let scaling = match c.rope.scaling {
        None => String::new(),
        Some(RopeScaling::Linear { factor }) => format!(", linear scaling ×{factor}"),
        Some(RopeScaling::Llama3(_)) => ", llama3 scaling".into(),
    };
    let rotary = if c.rotary_dim < c.head_dim {
        format!(" on {} of {} dims", c.rotary_dim, c.head_dim)
    } else {
        String::new()
    };
    parts.push(format!("RoPE θ = {}{scaling}{rotary}", c.rope.theta));
    if let (Some(r), Some(w)) = (c.sliding_rope, c.sliding_window) {
        parts.push(format!("local θ = {} on window-{w} layers", r.theta));
    }
    let sliding = c.layer_types.iter().filter(|t| **t == LayerAttention::Sliding).count();
    if let Some(w) = c.sliding_window {
        parts.push(format!("{sliding} of {} layers sliding-window {w}", c.layer_types.len()));
    }
    match c.qk_norm {
        Some(QkNorm::PerHead) => parts.push("q/k norm per head".into()),
        Some(QkNorm::Projection) => parts.push("q/k norm".into()),
        None => {}
    }
    if let Some(cap) = c.attn_logit_softcap {
        parts.push(format!("score soft-cap {cap}"));
    }
    if let Some(cap) = c.final_logit_softcap {
        parts.push(format!("logit soft-cap {cap}"));
    }
    if c.scale_embeddings {
        parts.push("embeddings ×√d".into());
    }
    let act = match c.activation {
        Activation::Silu => "SiLU",
        Activation::GeluTanh => "tanh-GELU",
        Activation::GeluErf => "GELU",
    };
    parts.push(if c.gated_mlp { format!("gated {act} MLP") } else { format!("{act} MLP") });
    parts.join(", ")
}
