//! `fisher-stein info MODEL`: what a model is and where its files came from, without loading
//! its weights (parameter counts come from the safetensors headers).

use anyhow::{bail, Context, Result};
use fs_checkpoint::{Gpt2Config, ModelOrigin, TokenizerFiles, WeightStore};

/// Arguments of `fisher-stein info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Model: a directory with config.json + safetensors, or a hub id in the local HF cache.
    #[arg(value_name = "PATH_OR_ID")]
    pub model: String,
}

/// Run `info`.
pub fn run(args: InfoArgs) -> Result<()> {
    #[cfg(feature = "candle")]
    if crate::backends::gguf_files(&args.model).is_some() {
        return gguf_info(&args.model);
    }
    let files = fs_checkpoint::resolve_model(&args.model)?;
    let text = std::fs::read_to_string(&files.config)
        .with_context(|| format!("cannot read {}", files.config.display()))?;
    let raw: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", files.config.display()))?;
    let arch = raw.get("model_type").and_then(|m| m.as_str()).unwrap_or("gpt2");
    println!("model         {}", args.model);
    match &files.origin {
        ModelOrigin::LocalDir { dir } => {
            println!("from          local directory {}", dir.display())
        }
        ModelOrigin::HubCache { repo_id, revision, commit, snapshot_dir } => println!(
            "from          HF cache: {repo_id} @ {revision} (commit {commit}), {}",
            snapshot_dir.display()
        ),
    }
    match arch {
        "gpt2" => {
            let c = Gpt2Config::from_file(&files.config)?;
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
        "llama" | "mistral" | "qwen2" => {
            let c = fs_checkpoint::LlamaConfig::from_file(&files.config)?;
            println!("architecture  {} (RMSNorm, RoPE θ = {}{}, SwiGLU)", c.model_type, c.rope_theta,
                if c.rope_scaling.is_some() { ", llama3 scaling" } else { "" });
            println!("layers        {} (split layers 0..={})", c.num_hidden_layers, c.num_hidden_layers);
            println!("d_model       {}  (heads {}, kv heads {}, head dim {}, MLP {})", c.hidden_size,
                c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size);
            println!("vocab         {}", c.vocab_size);
            println!("context       {} positions", c.max_position_embeddings);
            println!("lm_head       {}", if c.tie_word_embeddings { "tied to embed_tokens" } else { "untied" });
        }
        other => bail!(
            "model architecture {other:?} is not supported yet: supported: gpt2, llama, mistral, qwen2"
        ),
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

/// `info` for a GGUF file: loads it (dequantising) to report the architecture and sizes.
#[cfg(feature = "candle")]
fn gguf_info(spec: &str) -> Result<()> {
    use fs_estimators::SplitModel;
    let path = std::path::Path::new(spec);
    let (model, tokenizer) = backend_candle::load_llama_gguf(path, &backend_candle::Device::Cpu)?;
    let c = model.config();
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    println!("model         {spec}");
    println!("from          GGUF file ({:.1} MB), dequantised to f32 on load", size as f64 / 1e6);
    println!("architecture  llama (RMSNorm, RoPE θ = {}, SwiGLU)", c.rope_theta);
    println!("layers        {} (split layers 0..={})", c.num_hidden_layers, c.num_hidden_layers);
    println!(
        "d_model       {}  (heads {}, kv heads {}, head dim {}, MLP {})",
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size
    );
    println!("vocab         {}", model.dims().vocab_size);
    println!("context       {} positions", c.max_position_embeddings);
    println!(
        "lm_head       {}",
        if c.tie_word_embeddings { "tied to token_embd" } else { "untied" }
    );
    println!(
        "parameters    {} ({:.1} M)",
        model.parameter_count(),
        model.parameter_count() as f64 / 1e6
    );
    println!(
        "tokenizer     byte-level BPE from the GGUF metadata ({} tokens)",
        tokenizer.get_vocab_size(true)
    );
    Ok(())
}
