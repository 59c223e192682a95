//! # fs-suite — the workspace's cross-crate test suite
//!
//! The `SplitModel` contract itself lives in
//! `fs_estimators::testing` (feature `testing`, re-exported here) so that custom-model authors
//! can run it too. This crate instantiates it per model and scalar type (`tests/contract.rs`)
//! and per engine through [`backend_suite!`] over [`backends::compiled_backends`], on the
//! oracle fixtures ([`check_against_oracle`]) and on [`random_models`].

pub mod backends;
pub mod random_models;

pub use fs_estimators::testing::{
    check_split_model, check_top_k, fd_jacobian, fd_roundoff_floor, logit_jacobian, ContractReport,
    Tolerances,
};

/// Print what a contract check measured, one line, when `FS_PRINT_CONTRACT` is set: how the
/// tolerances of [`Tolerances::F32`] were set from measured distributions (`docs/TESTING.md`).
pub fn print_contract(label: &str, r: &ContractReport) {
    if std::env::var_os("FS_PRINT_CONTRACT").is_some() {
        println!(
            "contract {label} logits {:.3e} jacobian {:.3e} scores {:.3e} fisher {:.3e} psd {:.3e}",
            r.logits, r.jacobian, r.scores, r.fisher, r.psd
        );
    }
}
use fs_estimators::{
    closed_form_fisher_at, exact_fisher, relative_frobenius, ExactOptions, GradientKind, Scalar,
    SplitModel,
};

/// The committed oracle fixtures (`tests/fixtures/`, made by `tools/make_fixtures.py` with
/// torch + transformers in float64).
pub mod fixtures {
    use fs_estimators::Matrix;
    use safetensors::SafeTensors;
    use std::path::PathBuf;

    /// Every model fixture with a transformers oracle (GPT-2 and every decoder family).
    pub const ALL: [&str; 12] = [
        "gpt2-tiny-a",
        "gpt2-tiny-b",
        "llama-tiny-tied",
        "llama-tiny-untied",
        "mistral-window-tiny",
        "gemma2-tiny",
        "gemma3-tiny",
        "qwen3-tiny",
        "olmo2-tiny",
        "phi3-tiny",
        "pythia-tiny",
        "gptneox-sequential-tiny",
    ];

    /// The environment variable naming the fixtures folder for a suite executable run outside
    /// the checkout it was built in (tools/gpu-check.sh on the lent GPU machine). Unset: this
    /// crate's `tests/fixtures`.
    pub const FIXTURES_DIR: &str = "FS_FIXTURES_DIR";

    /// `tests/fixtures/NAME` (or `$FS_FIXTURES_DIR/NAME`).
    pub fn dir(name: &str) -> PathBuf {
        std::env::var_os(FIXTURES_DIR)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
            .join(name)
    }

    /// The reference values of one fixture (`reference.safetensors`).
    pub struct Reference {
        /// Token ids `[T]`.
        pub input_ids: Vec<u32>,
        /// Number of blocks `L`.
        pub n_layers: usize,
        /// `d`.
        pub d: usize,
        /// `V`.
        pub vocab: usize,
        /// Logits `[T, V]` (f64 forward).
        pub logits: Matrix<f64>,
        /// `hidden[k]` = layer-`k` activations `[T, d]`, `k = 0..=L`.
        pub hidden: Vec<Matrix<f64>>,
        /// Tested positions.
        pub positions: Vec<usize>,
        /// `fisher[k][i]` = exact F at layer `k`, position `positions[i]`.
        pub fisher: Vec<Vec<Matrix<f64>>>,
        /// `sample_tokens[i]` = the recorded draws at `positions[i]`.
        pub sample_tokens: Vec<Vec<u32>>,
        /// `sampled_fisher[k][i]` = `(1/S) Σ g gᵀ` over those draws.
        pub sampled_fisher: Vec<Vec<Matrix<f64>>>,
    }

    fn f64s(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f64>) {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F64, "{name}");
        let v =
            t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
        (t.shape().to_vec(), v)
    }

    fn i64s(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<i64>) {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
        let v =
            t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        (t.shape().to_vec(), v)
    }

    fn blocks(shape: &[usize], data: &[f64]) -> Vec<Vec<Matrix<f64>>> {
        let (l, p, d) = (shape[0], shape[1], shape[2]);
        (0..l)
            .map(|k| {
                (0..p)
                    .map(|i| {
                        let off = (k * p + i) * d * d;
                        Matrix::from_vec(d, d, data[off..off + d * d].to_vec()).unwrap()
                    })
                    .collect()
            })
            .collect()
    }

    /// The attention oracle of one fixture (`attention.safetensors`, made by
    /// `tools/make_attention_oracle.py`): split layer `k`, two blocks `ℓ ≥ k`, every head.
    pub struct AttentionReference {
        /// The split layer `k`.
        pub split_layer: usize,
        /// The two blocks.
        pub layers: Vec<usize>,
        /// The query positions.
        pub positions: Vec<usize>,
        /// Query heads.
        pub heads: usize,
        /// Sequence length `T`.
        pub seq_len: usize,
        /// `d`.
        pub d: usize,
        /// `weights[((i·H + j)·P + p)·T + s]`: attention of block `layers[i]`, head `j`, query
        /// `positions[p]`, key `s` (transformers' `output_attentions`, float64).
        pub weights: Vec<f64>,
        /// `log_jacobian[(((i·H + j)·P + p)·T + s)·d + c]`: `∂ log a_s / ∂h_c`, `h = H_k[t]`
        /// (autograd), zero for keys the query cannot see.
        pub log_jacobian: Vec<f64>,
    }

    impl AttentionReference {
        /// Load `tests/fixtures/NAME/attention.safetensors`.
        pub fn load(name: &str) -> AttentionReference {
            let bytes = std::fs::read(dir(name).join("attention.safetensors"))
                .expect("read attention oracle");
            let st = SafeTensors::deserialize(&bytes).expect("parse attention oracle");
            let usizes =
                |n: &str| -> Vec<usize> { i64s(&st, n).1.iter().map(|&x| x as usize).collect() };
            let (ws, weights) = f64s(&st, "weights");
            let (js, log_jacobian) = f64s(&st, "log_jacobian");
            assert_eq!(&js[..4], &ws[..], "{name}: weights vs log_jacobian shapes");
            AttentionReference {
                split_layer: usizes("split_layer")[0],
                layers: usizes("layers"),
                positions: usizes("positions"),
                heads: ws[1],
                seq_len: ws[3],
                d: js[4],
                weights,
                log_jacobian,
            }
        }

        /// The weights of query `positions[p]` over keys `0..T` (block `layers[i]`, head `j`).
        pub fn weights_at(&self, i: usize, j: usize, p: usize) -> &[f64] {
            let t = self.seq_len;
            let off = ((i * self.heads + j) * self.positions.len() + p) * t;
            &self.weights[off..off + t]
        }

        /// `∂ log a_s / ∂h` of key `s` for query `positions[p]` (length `d`).
        pub fn log_gradient(&self, i: usize, j: usize, p: usize, s: usize) -> &[f64] {
            let (t, d) = (self.seq_len, self.d);
            let off = (((i * self.heads + j) * self.positions.len() + p) * t + s) * d;
            &self.log_jacobian[off..off + d]
        }
    }

    impl Reference {
        /// Load `tests/fixtures/NAME/reference.safetensors`.
        pub fn load(name: &str) -> Reference {
            let bytes =
                std::fs::read(dir(name).join("reference.safetensors")).expect("read fixture");
            let st = SafeTensors::deserialize(&bytes).expect("parse fixture");
            let (_, ids) = i64s(&st, "input_ids");
            let (ls, logits) = f64s(&st, "logits");
            let (hs, hidden) = f64s(&st, "hidden");
            let (_, positions) = i64s(&st, "positions");
            let (fs, fisher) = f64s(&st, "fisher");
            let (ss, samples) = i64s(&st, "sample_tokens");
            let (sfs, sampled) = f64s(&st, "sampled_fisher");
            let (t, d) = (hs[1], hs[2]);
            Reference {
                input_ids: ids.iter().map(|&x| x as u32).collect(),
                n_layers: hs[0] - 1,
                d,
                vocab: ls[1],
                logits: Matrix::from_vec(ls[0], ls[1], logits).unwrap(),
                hidden: (0..hs[0])
                    .map(|k| {
                        Matrix::from_vec(t, d, hidden[k * t * d..(k + 1) * t * d].to_vec()).unwrap()
                    })
                    .collect(),
                positions: positions.iter().map(|&x| x as usize).collect(),
                fisher: blocks(&fs, &fisher),
                sample_tokens: samples
                    .chunks(ss[1])
                    .map(|c| c.iter().map(|&x| x as u32).collect())
                    .collect(),
                sampled_fisher: blocks(&sfs, &sampled),
            }
        }
    }
}

/// How close a model must come to an oracle fixture ([`check_against_oracle_within`]).
#[derive(Clone, Copy, Debug)]
pub struct OracleTolerances {
    /// Logits (cached pass and single-row upper half), absolute.
    pub logits: f64,
    /// Hidden states, `|Δ| ≤ hidden · (1 + |h|)`.
    pub hidden: f64,
    /// Exact F, relative Frobenius.
    pub fisher: f64,
    /// Closed form vs exact, relative Frobenius.
    pub closed_form: f64,
    /// Sampled F of the recorded draws, relative Frobenius.
    pub sampled: f64,
}

impl OracleTolerances {
    /// For f32 engines against the float64 oracle, each ≥ 10× the largest error seen over every
    /// fixture, layer and position on candle, burn and dfdx (`FS_PRINT_CONTRACT=1`,
    /// 2026-11-30): logits 2.1e-5 absolute, hidden states 8.3e-6, exact F 2.2e-5, sampled F
    /// 2.2e-5 relative; closed form vs exact as `Tolerances::F32`. A wrong layer norm, mask or
    /// RoPE angle gives errors of 1e-1 and more.
    pub const F32: OracleTolerances = OracleTolerances {
        logits: 2.5e-4,
        hidden: 1e-4,
        fisher: 2.5e-4,
        closed_form: 5e-5,
        sampled: 2.5e-4,
    };
}

/// Compare `model` with the oracle fixture `name` at every layer: logits at every position (from
/// the cached pass and from the single-row upper half) ≤ `logit_tol` absolute, and the rest as
/// [`OracleTolerances::F32`] — hidden states, exact F at every position the fixture holds (all
/// of them), closed form vs exact, the sampled F of the recorded draws. Returns the largest
/// errors seen `(logits, exact F, sampled F)`.
pub fn check_against_oracle<M: SplitModel>(
    model: &M,
    name: &str,
    logit_tol: f64,
) -> Result<(f64, f64, f64), String> {
    check_against_oracle_within(
        model,
        name,
        OracleTolerances { logits: logit_tol, ..OracleTolerances::F32 },
    )
}

/// [`check_against_oracle`] with every tolerance given ([`OracleTolerances`]).
pub fn check_against_oracle_within<M: SplitModel>(
    model: &M,
    name: &str,
    tol: OracleTolerances,
) -> Result<(f64, f64, f64), String> {
    use fs_estimators::outer_product_mean;
    let r = fixtures::Reference::load(name);
    let dims = model.dims();
    if (dims.n_layers, dims.d_model, dims.vocab_size) != (r.n_layers, r.d, r.vocab) {
        return Err(format!("{name}: dims {dims:?} do not match the fixture"));
    }
    let all: Vec<usize> = (0..r.input_ids.len()).collect();
    let (mut worst_z, mut worst_h, mut worst_f, mut worst_s) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let opts = ExactOptions::default();
    for k in 0..=r.n_layers {
        let ctx = model.lower(&r.input_ids, k).map_err(|e| e.to_string())?;
        let logits = model.logits(&ctx, &all).map_err(|e| e.to_string())?;
        for t in 0..all.len() {
            let h = model.activation(&ctx, t).map_err(|e| e.to_string())?;
            let upper = model.upper_logits(&ctx, t, &h).map_err(|e| e.to_string())?;
            for (y, up) in upper.iter().enumerate() {
                let want = r.logits.get(t, y);
                let e = (logits.get(t, y).as_f64() - want).abs().max((up.as_f64() - want).abs());
                worst_z = worst_z.max(e);
                if e > tol.logits {
                    return Err(format!(
                        "{name} layer {k} position {t} token {y}: logit error {e:.3e}"
                    ));
                }
            }
            for (j, x) in h.iter().enumerate() {
                let want = r.hidden[k].get(t, j);
                worst_h = worst_h.max((x.as_f64() - want).abs() / (1.0 + want.abs()));
                if (x.as_f64() - want).abs() > tol.hidden * (1.0 + want.abs()) {
                    return Err(format!(
                        "{name} hidden layer {k} position {t}: {} vs {want}",
                        x.as_f64()
                    ));
                }
            }
        }
        let exact = exact_fisher(model, &ctx, &r.positions, &opts).map_err(|e| e.to_string())?;
        let closed = closed_form_fisher_at(model, &ctx, &r.positions, GradientKind::Logits, &opts)
            .map_err(|e| e.to_string())?;
        for (i, &t) in r.positions.iter().enumerate() {
            let e = relative_frobenius(&exact[i], &r.fisher[k][i]);
            worst_f = worst_f.max(e);
            if e > tol.fisher {
                return Err(format!(
                    "{name} layer {k} position {t}: exact F relative error {e:.3e}"
                ));
            }
            let c = relative_frobenius(&closed[i], &exact[i]);
            if c > tol.closed_form {
                return Err(format!("{name} layer {k} position {t}: closed form vs exact {c:.3e}"));
            }
            let scores =
                model.score_gradients(&ctx, t, &r.sample_tokens[i]).map_err(|e| e.to_string())?;
            let sampled = outer_product_mean(scores.view()).map_err(|e| e.to_string())?;
            let s = relative_frobenius(&sampled, &r.sampled_fisher[k][i]);
            worst_s = worst_s.max(s);
            if s > tol.sampled {
                return Err(format!(
                    "{name} layer {k} position {t}: sampled F relative error {s:.3e}"
                ));
            }
        }
    }
    if std::env::var_os("FS_PRINT_CONTRACT").is_some() {
        println!("oracle {name} hidden {worst_h:.3e}");
    }
    Ok((worst_z, worst_f, worst_s))
}

/// How close a model's attention distributions must come to the attention oracle
/// ([`check_attention_oracle`]).
#[derive(Clone, Copy, Debug)]
pub struct AttentionTolerances {
    /// Attention weights, absolute.
    pub weights: f64,
    /// `∇_h log a` (all visible keys of one query), relative Frobenius.
    pub log_jacobian: f64,
    /// The exact attention Fisher against `Σ_s a_s g_s g_sᵀ` of the oracle, relative Frobenius.
    pub fisher: f64,
}

impl AttentionTolerances {
    /// For f32 engines against the float64 oracle, each ≥ 10× the largest error seen over every
    /// fixture, both recorded blocks, every head and query on candle, burn and dfdx
    /// (`FS_PRINT_CONTRACT=1`, 2026-11-30): weights 6.0e-6 absolute, `∇ log a` 9.0e-6, attention
    /// F 2.3e-5 relative.
    pub const F32: AttentionTolerances =
        AttentionTolerances { weights: 1e-4, log_jacobian: 1e-4, fisher: 2.5e-4 };
    /// For candle's f64 reference model: both sides in f64 from the same weights, so what
    /// remains is summation order (measured 1.4e-14 / 1.8e-14 / 5.8e-14, 2026-11-30).
    pub const F64: AttentionTolerances =
        AttentionTolerances { weights: 1e-12, log_jacobian: 1e-12, fisher: 1e-12 };
}

/// What [`check_attention_oracle`] measured: the largest error of each kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionErrors {
    /// Attention weights, absolute.
    pub weights: f64,
    /// `∇_h log a`, relative.
    pub log_jacobian: f64,
    /// Exact attention Fisher, relative.
    pub fisher: f64,
    /// (block, head, query) triples compared.
    pub compared: usize,
}

/// Compare `model`'s attention distributions with the attention oracle of fixture `name`, for
/// every head of both recorded blocks at every recorded query position: the weights
/// `softmax(attention_scores)` (and which keys are visible) against transformers'
/// `output_attentions`; `∇_h log a_s = J_s − aᵀJ` from `attention_jacobian` against the autograd
/// Jacobian of `log a`; and `exact_attention_fisher` against `Σ_s a_s g_s g_sᵀ` built from the
/// oracle's own gradients.
pub fn check_attention_oracle<M: SplitModel>(
    model: &M,
    name: &str,
    tol: AttentionTolerances,
) -> Result<AttentionErrors, String> {
    use fs_estimators::{exact_attention_fisher, AttentionHead, Matrix};
    let r = fixtures::AttentionReference::load(name);
    let ids = fixtures::Reference::load(name).input_ids;
    if model.attention_heads() != r.heads || model.dims().d_model != r.d {
        return Err(format!("{name}: heads / d do not match the attention oracle"));
    }
    let ctx = model.lower(&ids, r.split_layer).map_err(|e| e.to_string())?;
    let mut worst = AttentionErrors::default();
    for (i, &layer) in r.layers.iter().enumerate() {
        for j in 0..r.heads {
            let head = AttentionHead { layer, head: j };
            let got = exact_attention_fisher(model, &ctx, &r.positions, head)
                .map_err(|e| format!("{name} {head}: {e}"))?;
            for (p, f) in got.iter().enumerate() {
                let t = r.positions[p];
                let at = format!("{name} {head} query {t}");
                let want = r.weights_at(i, j, p);
                let visible: Vec<usize> = (0..r.seq_len).filter(|&s| want[s] > 0.0).collect();
                if visible != f.distribution.keys {
                    return Err(format!(
                        "{at}: visible keys {:?}, oracle {visible:?}",
                        f.distribution.keys
                    ));
                }
                for (&s, a) in visible.iter().zip(&f.distribution.weights) {
                    let e = (a - want[s]).abs();
                    worst.weights = worst.weights.max(e);
                    if e > tol.weights {
                        return Err(format!("{at} key {s}: weight {a} vs {}", want[s]));
                    }
                }
                let rows: Vec<usize> = (0..visible.len()).collect();
                let g = f.distribution.score_gradients(&rows).map_err(|e| e.to_string())?;
                let g_want =
                    Matrix::from_fn(rows.len(), r.d, |k, c| r.log_gradient(i, j, p, visible[k])[c]);
                let fisher_want = Matrix::from_fn(r.d, r.d, |a, b| {
                    rows.iter()
                        .map(|&k| want[visible[k]] * g_want.get(k, a) * g_want.get(k, b))
                        .sum()
                });
                // One visible key: log a ≡ 0, nothing to compare but zeros.
                let scale = g_want.as_slice().iter().map(|x| x * x).sum::<f64>().sqrt();
                if scale < 1e-12 {
                    let e = g.as_slice().iter().fold(0.0f64, |m, x| m.max(x.abs()));
                    if e > tol.log_jacobian {
                        return Err(format!("{at}: ∇ log a should vanish, got {e:.3e}"));
                    }
                    continue;
                }
                let e = relative_frobenius(&g, &g_want);
                worst.log_jacobian = worst.log_jacobian.max(e);
                if e > tol.log_jacobian {
                    return Err(format!("{at}: ∇ log a relative error {e:.3e}"));
                }
                let e = relative_frobenius(&f.fisher, &fisher_want);
                worst.fisher = worst.fisher.max(e);
                if e > tol.fisher {
                    return Err(format!("{at}: attention Fisher relative error {e:.3e}"));
                }
                worst.compared += 1;
            }
        }
    }
    if std::env::var_os("FS_PRINT_CONTRACT").is_some() {
        println!(
            "attention oracle {name}: weights {:.3e} log-jacobian {:.3e} fisher {:.3e} ({} compared)",
            worst.weights, worst.log_jacobian, worst.fisher, worst.compared
        );
    }
    Ok(worst)
}

/// The largest relative Frobenius difference between the exact Fisher of `on_device` (a model
/// whose `SplitModel::device_exact_fisher` is on) and the host estimator's on `host` (the same
/// weights), at `positions` of `tokens` split at `layer`.
pub fn device_vs_host_fisher<M: SplitModel>(
    host: &M,
    on_device: &M,
    tokens: &[u32],
    layer: usize,
    positions: &[usize],
) -> f64 {
    let opts = ExactOptions::default();
    let ctx = host.lower(tokens, layer).unwrap();
    let want = exact_fisher(host, &ctx, positions, &opts).unwrap();
    let ctx = on_device.lower(tokens, layer).unwrap();
    let got = exact_fisher(on_device, &ctx, positions, &opts).unwrap();
    got.iter().zip(&want).map(|(a, b)| relative_frobenius(a, b)).fold(0.0, f64::max)
}
