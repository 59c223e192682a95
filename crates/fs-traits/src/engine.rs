//! What every engine's model files share, written once: attention masks, the batching rule of
//! the readout Jacobians, the device names `--device` accepts, the host softmax, and errors on
//! one line. Engines (`backend-candle`, `backend-burn`, `backend-dfdx`) build their tensors
//! from these host values; see `docs/ARCHITECTURE.md` ("Where things go").

use crate::{check_finite, check_position, FsError, Result, Scalar};

/// The additive attention-mask value of a key a query may not see. Large and negative so that
/// `exp(MASKED − max)` underflows to exactly 0 in `f32`, yet finite so that `MASKED + score`
/// never forms `inf − inf = NaN` (a fully masked row cannot occur: a query always sees itself).
pub const MASKED: f32 = -1e30;

/// The row-major `P × width` additive mask of single query rows against cached keys: row `p`
/// lets the query at `t = positions[p]` see the keys `j < t` (`0`) — with a sliding `window`,
/// only those with `t − j < window` — and hides the rest ([`MASKED`]). The query's own key is
/// attended separately (always visible: `t − t = 0 < window`).
pub fn prefix_mask(positions: &[usize], width: usize, window: Option<usize>) -> Vec<f32> {
    let visible = |t: usize, j: usize| j < t && window.is_none_or(|w| t - j < w);
    positions
        .iter()
        .flat_map(|&t| (0..width).map(move |j| if visible(t, j) { 0.0 } else { MASKED }))
        .collect()
}

/// [`prefix_mask`] at the narrowest width that holds every row's context,
/// `t_max = max(positions)`: `(mask, t_max)`, or `None` when no row has any context.
pub fn context_mask(positions: &[usize], window: Option<usize>) -> Option<(Vec<f32>, usize)> {
    let t_max = positions.iter().copied().max().unwrap_or(0);
    (t_max > 0).then(|| (prefix_mask(positions, t_max, window), t_max))
}

/// The row-major `T × T` causal mask: query `i` sees keys `j ≤ i` — with a sliding `window`,
/// only those with `i − j < window` (transformers' `sliding_window_overlay`).
pub fn causal_mask(t_len: usize, window: Option<usize>) -> Vec<f32> {
    (0..t_len * t_len)
        .map(|n| {
            let (i, j) = (n / t_len, n % t_len);
            if j <= i && window.is_none_or(|w| i - j < w) {
                0.0
            } else {
                MASKED
            }
        })
        .collect()
}

/// How to split the readout Jacobians (`d` tangent or cotangent rows per position) into passes
/// under a memory budget: `(positions per pass, rows per pass)`. A pass keeps about
/// `bytes_per_row` bytes alive per row; several positions (at most 64) share a pass when all
/// `d` rows of one fit `budget`, otherwise one position's rows are split over several passes.
pub fn readout_batching(d: usize, bytes_per_row: usize, budget: usize) -> (usize, usize) {
    let rows = (budget / bytes_per_row.max(1)).max(1);
    if rows >= d {
        ((rows / d).clamp(1, 64), d)
    } else {
        (1, rows)
    }
}

/// Check every position against `0..seq_len`.
pub fn check_positions(positions: &[usize], seq_len: usize) -> Result<()> {
    positions.iter().try_for_each(|&t| check_position(t, seq_len))
}

/// `p = softmax(z / temperature)` computed in `f64`:
/// `p_y = exp((z_y − max z)/τ) / Σ_y' exp((z_y' − max z)/τ)`.
///
/// Errors with [`FsError::NonFinite`] if any logit is NaN or ±inf, and on an empty vector.
pub fn tempered_softmax<S: Scalar>(logits: &[S], temperature: f64) -> Result<Vec<f64>> {
    if logits.is_empty() {
        return Err(FsError::invalid("logits", "[]", "at least one logit"));
    }
    check_finite("logits", logits)?;
    let max = logits.iter().map(|z| z.as_f64()).fold(f64::NEG_INFINITY, f64::max);
    let mut p: Vec<f64> = logits.iter().map(|z| ((z.as_f64() - max) / temperature).exp()).collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    Ok(p)
}

/// `p = softmax(z)` computed in `f64` ([`tempered_softmax`] at temperature 1).
pub fn softmax<S: Scalar>(logits: &[S]) -> Result<Vec<f64>> {
    tempered_softmax(logits, 1.0)
}

/// A device as the user names it (`--device`): `cpu`, `cuda` / `cuda:N`, `wgpu` / `wgpu:N`.
/// Parsing is shared; whether an engine (and this build of it) has the device is the engine's
/// answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceName {
    /// The host CPU.
    Cpu,
    /// An NVIDIA GPU through CUDA; `None` = the default (ordinal 0).
    Cuda(Option<usize>),
    /// A GPU through wgpu (Vulkan, Metal, DX12); `None` = the default adapter.
    Wgpu(Option<usize>),
}

impl DeviceName {
    /// The names every engine understands, for error messages.
    pub const SYNTAX: &'static str = "cpu, cuda, cuda:N, wgpu or wgpu:N";

    /// Parse `cpu`, `cuda`, `cuda:N`, `wgpu` or `wgpu:N` (surrounding whitespace ignored). The
    /// error is the reason, for the engine's own "device … is not available: {reason}".
    pub fn parse(name: &str) -> std::result::Result<DeviceName, String> {
        let name = name.trim();
        let bad = || format!("expected {}", Self::SYNTAX);
        if name == "cpu" {
            return Ok(DeviceName::Cpu);
        }
        let ordinal = |rest: &str| match rest {
            "" => Ok(None),
            r => {
                r.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()).map(Some).ok_or_else(bad)
            }
        };
        if let Some(rest) = name.strip_prefix("cuda") {
            ordinal(rest).map(DeviceName::Cuda)
        } else if let Some(rest) = name.strip_prefix("wgpu") {
            ordinal(rest).map(DeviceName::Wgpu)
        } else {
            Err(bad())
        }
    }
}

/// An error message on one line: library messages that span several lines (burn's `…\nCaused
/// by:\n reason`) have their non-empty lines trimmed and joined with spaces.
pub fn one_line(message: &str) -> String {
    if message.contains(['\n', '\r']) {
        message
            .split(['\n', '\r'])
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        message.to_string()
    }
}

/// The first line of an error message, trimmed: for libraries that append a multi-line
/// backtrace to the message itself (candle with `RUST_BACKTRACE` set), where the rest is noise
/// to a user.
pub fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or_default().trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_hide_exactly_the_future() {
        assert_eq!(causal_mask(2, None), vec![0.0, MASKED, 0.0, 0.0]);
        assert_eq!(context_mask(&[0], None), None);
        let (m, t_max) = context_mask(&[2, 1], None).unwrap();
        assert_eq!(t_max, 2);
        assert_eq!(m, vec![0.0, 0.0, 0.0, MASKED]);
        assert_eq!(prefix_mask(&[1], 3, None), vec![0.0, MASKED, MASKED]);
        // A window of 2: query i sees keys i − 1 and i only (transformers' i − j < window).
        let (o, x) = (0.0, MASKED);
        assert_eq!(causal_mask(3, Some(2)), vec![o, x, x, o, o, x, x, o, o]);
        assert_eq!(prefix_mask(&[3, 1], 3, Some(2)), vec![x, x, o, o, x, x]);
        // A window of 1: only the query itself (attended separately from the cached prefix).
        assert_eq!(context_mask(&[2], Some(1)), Some((vec![x, x], 2)));
        // MASKED survives a score added to it and underflows under exp.
        assert!((MASKED + 1e4).is_finite() && ((MASKED - 10.0) as f64).exp() as f32 == 0.0);
    }

    #[test]
    fn batching_packs_positions_or_splits_rows() {
        assert_eq!(readout_batching(4, 10, 1000), (25, 4));
        assert_eq!(readout_batching(4, 10, 1_000_000), (64, 4));
        assert_eq!(readout_batching(100, 10, 500), (1, 50));
        assert_eq!(readout_batching(100, 0, 0), (1, 1));
    }

    #[test]
    fn device_names() {
        assert_eq!(DeviceName::parse(" cpu "), Ok(DeviceName::Cpu));
        assert_eq!(DeviceName::parse("cuda"), Ok(DeviceName::Cuda(None)));
        assert_eq!(DeviceName::parse("cuda:3"), Ok(DeviceName::Cuda(Some(3))));
        assert_eq!(DeviceName::parse("wgpu:1"), Ok(DeviceName::Wgpu(Some(1))));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda1", "wgpu:-1", ""] {
            let e = DeviceName::parse(bad).unwrap_err();
            assert_eq!(e, "expected cpu, cuda, cuda:N, wgpu or wgpu:N", "{bad}");
        }
    }

    #[test]
    fn messages_on_one_line() {
        assert_eq!(one_line("a\n  Caused by:\r\n b  \n"), "a Caused by: b");
        assert_eq!(one_line("plain"), "plain");
        assert_eq!(first_line("head  \nstack backtrace:\n 0: x"), "head");
    }

    #[test]
    fn softmax_is_shift_invariant_and_rejects_non_finite() {
        let p = softmax(&[1.0f32, 2.0, 3.0]).unwrap();
        let q = softmax(&[1001.0f64, 1002.0, 1003.0]).unwrap();
        for (a, b) in p.iter().zip(&q) {
            assert!((a - b).abs() < 1e-6);
        }
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert!(matches!(softmax(&[0.0f32, f32::NAN]), Err(FsError::NonFinite { index: 1, .. })));
        assert!(softmax::<f32>(&[]).is_err());
        let t = tempered_softmax(&[0.0f64, 2f64.ln()], 0.5).unwrap();
        assert!((t[1] / t[0] - 4.0).abs() < 1e-12);
    }
}
