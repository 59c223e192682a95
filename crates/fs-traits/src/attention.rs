//! Attention distributions as Fisher targets.
//!
//! Every attention head is a softmax too. At block `ℓ`, query head `j`, the query at position
//! `t` attends to keys `i = 0 … t` with weights `a = softmax(s)`, where the scores are the
//! model's own (`s_i = scale · q_t·k_i`, soft-capped `c·tanh(s_i/c)` where the model caps them,
//! and `s_i = −∞` for keys outside a sliding window). For a split layer `k ≤ ℓ` and the
//! activation `h = H_k[t]` (every other position held fixed, as for the next-token Fisher), the
//! query `q_t` and the query's own key `k_t` depend on `h`; the cached keys of positions `< t`
//! do not (they are computed from earlier positions only). With `J = ∂s/∂h` (`(t+1) × d`) the
//! Fisher of that head's distribution is
//!
//! ```text
//!     F = E_{i~a}[∇_h log a_i ∇_h log a_iᵀ] = Jᵀ(diag a − a aᵀ)J,    ∇_h log a_i = J_i − aᵀJ,
//! ```
//!
//! the same form as the next-token Fisher with `J` in place of `W_U A` — so the exact and
//! sampled estimators apply unchanged to the rows of `J` (`fs_estimators::attention`).
//! [`SplitModel::attention_scores`](crate::SplitModel::attention_scores) and
//! [`SplitModel::attention_jacobian`](crate::SplitModel::attention_jacobian) are the model's
//! side of it.

use crate::{FsError, Result};

/// One attention head of one block: query head `head` (`0 .. n_heads`, the query heads; grouped
/// key/value heads are shared as the model shares them) of block `layer` (`0 .. n_layers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionHead {
    /// The block, `0 .. n_layers` (block `ℓ` reads the layer-`ℓ` activation).
    pub layer: usize,
    /// The query head.
    pub head: usize,
}

impl std::fmt::Display for AttentionHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "attention:{}.{}", self.layer, self.head)
    }
}

/// Check `head` against a model of `n_layers` blocks with `n_heads` query heads per block,
/// split at `split_layer`: the block must be one the split activation feeds (`split_layer ≤
/// layer < n_layers`) and the head must exist. The errors name the valid range.
pub fn check_attention_head(
    head: AttentionHead,
    split_layer: usize,
    n_layers: usize,
    n_heads: usize,
) -> Result<()> {
    if n_heads == 0 {
        return Err(FsError::Unsupported(
            "attention distributions (this model does not expose its attention heads)".into(),
        ));
    }
    if head.layer >= n_layers {
        return Err(FsError::invalid(
            "attention block",
            head.layer,
            format!("the model has blocks 0..{n_layers}"),
        ));
    }
    if head.layer < split_layer {
        return Err(FsError::invalid(
            "attention block",
            head.layer,
            format!(
                "block {} runs before split layer {split_layer}, so the layer-{split_layer} activation cannot move its attention: use a block in {split_layer}..{n_layers}",
                head.layer
            ),
        ));
    }
    if head.head >= n_heads {
        return Err(FsError::invalid(
            "attention head",
            head.head,
            format!("block {} has query heads 0..{n_heads}", head.layer),
        ));
    }
    Ok(())
}

/// Check a request for the attention of `head` at `position` of a context of `seq_len`
/// positions split at `split_layer`: the position first, then the head
/// ([`check_attention_head`]). What every engine's `attention_scores` / `attention_jacobian`
/// checks before it runs.
pub fn check_attention_query(
    head: AttentionHead,
    position: usize,
    seq_len: usize,
    split_layer: usize,
    n_layers: usize,
    n_heads: usize,
) -> Result<()> {
    crate::check_position(position, seq_len)?;
    check_attention_head(head, split_layer, n_layers, n_heads)
}

/// Set the scores of the keys the query at `query` may not see (under `window`) to `−∞`.
pub fn mask_invisible_scores<S: crate::Scalar>(
    scores: &mut [S],
    query: usize,
    window: Option<usize>,
) {
    for (key, s) in scores.iter_mut().enumerate() {
        if !key_visible(query, key, window) {
            *s = S::round_from_f64(f64::NEG_INFINITY);
        }
    }
}

/// Whether the query at `query` may attend to the key at `key` in a causal layer with an
/// optional sliding `window` (transformers' convention: `query − key < window`).
pub fn key_visible(query: usize, key: usize, window: Option<usize>) -> bool {
    key <= query && window.is_none_or(|w| query - key < w)
}

/// The keys `0 ..= query` the query may attend to, in order.
pub fn visible_keys(query: usize, window: Option<usize>) -> Vec<usize> {
    (0..=query).filter(|&i| key_visible(query, i, window)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_checks_name_the_range() {
        let h = |layer, head| AttentionHead { layer, head };
        assert!(check_attention_head(h(2, 3), 1, 4, 4).is_ok());
        assert!(check_attention_head(h(1, 0), 1, 4, 4).is_ok());
        let e = check_attention_head(h(0, 0), 1, 4, 4).unwrap_err().to_string();
        assert!(e.contains("before split layer 1") && e.contains("1..4"), "{e}");
        let e = check_attention_head(h(4, 0), 1, 4, 4).unwrap_err().to_string();
        assert!(e.contains("blocks 0..4"), "{e}");
        let e = check_attention_head(h(2, 4), 1, 4, 4).unwrap_err().to_string();
        assert!(e.contains("query heads 0..4"), "{e}");
        assert!(matches!(check_attention_head(h(0, 0), 0, 4, 0), Err(FsError::Unsupported(_))));
        assert_eq!(h(3, 1).to_string(), "attention:3.1");
    }

    #[test]
    fn queries_are_checked_and_invisible_keys_masked() {
        let h = AttentionHead { layer: 1, head: 0 };
        assert!(check_attention_query(h, 4, 5, 1, 2, 2).is_ok());
        assert!(matches!(
            check_attention_query(h, 5, 5, 1, 2, 2),
            Err(FsError::PositionOutOfRange { position: 5, seq_len: 5 })
        ));
        assert!(check_attention_query(h, 4, 5, 2, 2, 2).is_err());
        let mut s = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        mask_invisible_scores(&mut s, 3, Some(2));
        assert_eq!(s, [f32::NEG_INFINITY, f32::NEG_INFINITY, 3.0, 4.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn windows_follow_transformers() {
        assert_eq!(visible_keys(3, None), vec![0, 1, 2, 3]);
        assert_eq!(visible_keys(5, Some(2)), vec![4, 5]);
        assert_eq!(visible_keys(0, Some(1)), vec![0]);
        assert!(!key_visible(2, 3, None));
    }
}
