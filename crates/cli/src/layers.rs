//! Split layers named by index or by TransformerLens hook name.
//!
//! A split layer `k` is the residual stream entering block `k` (`0` = the embeddings,
//! `n_layers` = the output of the last block, before the final norm). TransformerLens names
//! the same activations
//!
//! * `blocks.K.hook_resid_pre`  = split layer `K`      (`0 ≤ K < n_layers`),
//! * `blocks.K.hook_resid_post` = split layer `K + 1`  (`0 ≤ K < n_layers`; the last block's
//!   is split layer `n_layers`),
//! * `hook_embed` = split layer `0`, only where the embedding *is* the residual stream entering
//!   block 0: rotary decoders without embedding scaling (Llama, Mistral, Qwen, OLMo-2, Phi-3,
//!   GPT-NeoX). GPT-2 adds `hook_pos_embed` to it and Gemma multiplies it by `√d` first, so
//!   there `hook_embed` is not a split layer and is refused (use `blocks.0.hook_resid_pre`).
//!
//! Every other hook (`hook_attn_out`, `hook_resid_mid`, `ln_final.hook_normalized`, …) is not
//! on the residual stream at a split layer and is refused with the list of what is accepted.

use anyhow::{anyhow, bail, Result};

/// A resolved split layer with the name it was asked for by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedLayer {
    /// The split layer index `k` (`0..=n_layers`).
    pub index: usize,
    /// The TransformerLens hook name: as the user gave it, or the canonical one for an index
    /// ([`hook_name`]).
    pub hook: String,
}

/// The canonical TransformerLens name of split layer `k` of an `n_layers`-block model:
/// `blocks.k.hook_resid_pre`, and `blocks.{n_layers-1}.hook_resid_post` for `k = n_layers`.
pub fn hook_name(k: usize, n_layers: usize) -> String {
    if k == n_layers && n_layers > 0 {
        format!("blocks.{}.hook_resid_post", n_layers - 1)
    } else {
        format!("blocks.{k}.hook_resid_pre")
    }
}

/// Whether `hook_embed` is exactly split layer 0 for this `model_type` (see the module docs).
fn embed_is_layer0(model_type: &str) -> bool {
    !matches!(model_type, "gpt2" | "gemma2" | "gemma3_text")
}

fn accepted(n_layers: usize) -> String {
    let last = n_layers.saturating_sub(1);
    format!(
        "a split layer 0..={n_layers}, blocks.K.hook_resid_pre (= layer K, K in 0..={last}), blocks.K.hook_resid_post (= layer K+1, K in 0..={last}) or, on rotary models without embedding scaling, hook_embed (= layer 0)"
    )
}

/// Resolve one layer argument — an index or a TransformerLens hook name — against a model with
/// `n_layers` blocks of HF `model_type`. `flag` names the option in messages.
pub fn resolve_layer(
    arg: &str,
    n_layers: usize,
    model_type: &str,
    flag: &str,
) -> Result<NamedLayer> {
    let arg = arg.trim();
    if let Ok(k) = arg.parse::<usize>() {
        fs_traits::check_layer(k, n_layers)?;
        return Ok(NamedLayer { index: k, hook: hook_name(k, n_layers) });
    }
    let refuse = |why: &str| anyhow!("{flag} {arg:?}: {why}; give {}", accepted(n_layers));
    if arg == "hook_embed" {
        if embed_is_layer0(model_type) {
            return Ok(NamedLayer { index: 0, hook: arg.to_string() });
        }
        return Err(refuse(&format!(
            "on a {model_type} model hook_embed is not the residual stream entering block 0 ({}), use blocks.0.hook_resid_pre",
            if model_type == "gpt2" {
                "hook_pos_embed is added to it"
            } else {
                "it is scaled by √d first"
            }
        )));
    }
    let Some(rest) = arg.strip_prefix("blocks.") else {
        return Err(refuse("not a layer index nor a residual-stream hook name"));
    };
    let Some((block, hook)) = rest.split_once('.') else {
        return Err(refuse("not a layer index nor a residual-stream hook name"));
    };
    let Ok(block) = block.parse::<usize>() else {
        return Err(refuse("the block number is not a non-negative integer"));
    };
    let offset = match hook {
        "hook_resid_pre" => 0,
        "hook_resid_post" => 1,
        _ => {
            return Err(refuse(&format!(
                "{hook} is not on the residual stream at a split layer (only hook_resid_pre and hook_resid_post are)"
            )))
        }
    };
    if block >= n_layers {
        return Err(refuse(&format!("this model has blocks 0..={}", n_layers.saturating_sub(1))));
    }
    Ok(NamedLayer { index: block + offset, hook: arg.to_string() })
}

/// Resolve `--layer` or the comma-separated `--layers` (`all` = every split layer), sorted by
/// index without repeats (the first name given for an index is kept).
pub fn resolve_layers(
    layer: Option<&str>,
    layers: Option<&str>,
    n_layers: usize,
    model_type: &str,
) -> Result<Vec<NamedLayer>> {
    let mut resolved: Vec<NamedLayer> = match (layer, layers) {
        (Some(k), _) => vec![resolve_layer(k, n_layers, model_type, "--layer")?],
        (None, Some(s)) if s.trim() == "all" => {
            (0..=n_layers).map(|k| NamedLayer { index: k, hook: hook_name(k, n_layers) }).collect()
        }
        (None, Some(s)) => s
            .split(',')
            .map(|x| resolve_layer(x, n_layers, model_type, "--layers"))
            .collect::<Result<_>>()?,
        (None, None) => bail!(
            "give --layer K (or a hook name such as blocks.K.hook_resid_pre) or --layers K,K|all"
        ),
    };
    resolved.sort_by_key(|l| l.index);
    resolved.dedup_by_key(|l| l.index);
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(arg: &str, n: usize, mt: &str) -> Result<usize> {
        resolve_layer(arg, n, mt, "--layer").map(|l| l.index)
    }

    #[test]
    fn hook_names_map_onto_split_layers() {
        assert_eq!(idx("blocks.0.hook_resid_pre", 12, "gpt2").unwrap(), 0);
        assert_eq!(idx("blocks.6.hook_resid_pre", 12, "gpt2").unwrap(), 6);
        assert_eq!(idx("blocks.5.hook_resid_post", 12, "gpt2").unwrap(), 6);
        assert_eq!(idx("blocks.11.hook_resid_post", 12, "gpt2").unwrap(), 12);
        assert_eq!(idx("hook_embed", 30, "llama").unwrap(), 0);
        assert_eq!(idx("7", 12, "gpt2").unwrap(), 7);
        assert_eq!(idx(" 12 ", 12, "gpt2").unwrap(), 12);
    }

    #[test]
    fn canonical_names_round_trip() {
        for n in 1..5 {
            for k in 0..=n {
                assert_eq!(idx(&hook_name(k, n), n, "llama").unwrap(), k, "k {k} n {n}");
            }
        }
        assert_eq!(hook_name(12, 12), "blocks.11.hook_resid_post");
        assert_eq!(hook_name(3, 12), "blocks.3.hook_resid_pre");
    }

    #[test]
    fn everything_off_the_residual_stream_is_refused_with_the_list() {
        for bad in [
            "blocks.3.hook_attn_out",
            "blocks.3.hook_resid_mid",
            "blocks.3.attn.hook_pattern",
            "ln_final.hook_normalized",
            "blocks.x.hook_resid_pre",
            "blocks.12.hook_resid_pre",
            "blocks.12.hook_resid_post",
            "13",
            "-1",
            "",
        ] {
            let e = idx(bad, 12, "gpt2").unwrap_err().to_string();
            assert!(e.contains("0..=12") || e.contains("0..=11"), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
        let e = idx("blocks.3.hook_attn_out", 12, "gpt2").unwrap_err().to_string();
        assert!(e.contains("hook_resid_pre") && e.contains("hook_resid_post"), "{e}");
    }

    #[test]
    fn hook_embed_only_where_it_is_layer_zero() {
        for mt in ["gpt2", "gemma2", "gemma3_text"] {
            let e = idx("hook_embed", 4, mt).unwrap_err().to_string();
            assert!(e.contains("blocks.0.hook_resid_pre"), "{mt}: {e}");
        }
        for mt in ["llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "gpt_neox"] {
            assert_eq!(idx("hook_embed", 4, mt).unwrap(), 0, "{mt}");
        }
    }

    #[test]
    fn lists_sort_dedup_and_keep_the_given_name() {
        let l = resolve_layers(
            None,
            Some("blocks.5.hook_resid_post,2,6,blocks.0.hook_resid_pre"),
            12,
            "gpt2",
        )
        .unwrap();
        let got: Vec<(usize, &str)> = l.iter().map(|l| (l.index, l.hook.as_str())).collect();
        assert_eq!(
            got,
            [
                (0, "blocks.0.hook_resid_pre"),
                (2, "blocks.2.hook_resid_pre"),
                (6, "blocks.5.hook_resid_post")
            ]
        );
        assert_eq!(resolve_layers(None, Some("all"), 3, "gpt2").unwrap().len(), 4);
        assert!(resolve_layers(None, None, 3, "gpt2").is_err());
    }
}
