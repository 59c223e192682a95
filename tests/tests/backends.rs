//! The cross-backend suite, written once.
//!
//! * Per backend ([`fs_suite::backend_suite!`]): the oracle fixtures of GPT-2 and the Llama
//!   family, the `SplitModel` contract (with the estimator invariants: exact == closed form,
//!   symmetric, PSD) at every layer of every fixture and on random tiny configurations.
//! * Across backends: every pair of compiled engines agrees on logits (≤ 1e-4 absolute) and on
//!   the exact F (≤ 1e-4 relative Frobenius) for the same random checkpoint, at a random layer
//!   and position; and every engine gives the same one-line error for the same bad input.
//!
//! Tolerances: both sides run f32 forward passes whose round-off is ~1e-6 relative on logits of
//! size ~10 (see `tools/README.md`); over the 96 engine pairs of 27 + 27 cases
//! (`FS_PRINT_CONTRACT=1`, 2026-11-30) the largest differences were 9.4e-6 (logits) and 3.2e-6
//! (exact F), so 1e-4 is a ≥ 10× margin, while a wrong layer norm, mask or RoPE angle gives
//! errors of order 1e-1 and more.

use fs_checkpoint::{DecoderConfig, Gpt2Config, ModelFiles};
use fs_estimators::relative_frobenius;
use fs_suite::backends::{compiled_backends, load, max_abs_diff, Probe};
use fs_suite::random_models::{decoder_case, gpt2_case, Case, WEIGHT_STD};
use proptest::prelude::*;

#[cfg(feature = "candle")]
fs_suite::backend_suite!(candle, Backend::Candle, llama);
#[cfg(feature = "burn")]
fs_suite::backend_suite!(burn, Backend::Burn, llama);
#[cfg(feature = "dfdx")]
fs_suite::backend_suite!(dfdx, Backend::Dfdx);

/// Load `files` on every compiled engine that implements the architecture `family`.
fn load_all(files: &ModelFiles, family: &str) -> Vec<(&'static str, Box<dyn Probe>)> {
    compiled_backends()
        .into_iter()
        .filter(|b| b.implements(family))
        .map(|b| (b.name(), load(b, files).unwrap_or_else(|e| panic!("{}: {e}", b.name()))))
        .collect()
}

/// Every pair agrees on all logits at `layer` and on the exact F at `position`.
fn pairs_agree(
    models: &[(&'static str, Box<dyn Probe>)],
    tokens: &[u32],
    layer: usize,
    position: usize,
) -> Result<(), String> {
    let results = models
        .iter()
        .map(|(name, m)| {
            Ok((*name, m.all_logits(tokens, layer)?, m.exact(tokens, layer, position)?))
        })
        .collect::<Result<Vec<_>, String>>()?;
    for (i, (a, za, fa)) in results.iter().enumerate() {
        for (b, zb, fb) in &results[i + 1..] {
            let dz = max_abs_diff(za, zb);
            let df = relative_frobenius(fa, fb);
            if std::env::var_os("FS_PRINT_CONTRACT").is_some() {
                println!("agree {a} {b} logits {dz:.3e} F {df:.3e}");
            }
            if dz > 1e-4 || df > 1e-4 {
                return Err(format!(
                    "{a} vs {b} at layer {layer}, position {position}: max |Δlogit| {dz:.3e}, exact F rel. difference {df:.3e}"
                ));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Every pair of backends agrees on random tiny GPT-2s.
    #[test]
    fn backends_agree_on_random_gpt2(case in gpt2_case(), pos in 0.0f64..1.0) {
        let dir = tempfile::tempdir().unwrap();
        let models = load_all(&case.write(dir.path()), "gpt2");
        let position = ((case.tokens.len() as f64 * pos) as usize).min(case.tokens.len() - 1);
        pairs_agree(&models, &case.tokens, case.layer, position).map_err(TestCaseError::fail)?;
    }

    /// Every pair of Llama-capable backends agrees on random tiny Llamas (GQA, biases, tied or
    /// untied heads, Llama-3 RoPE scaling).
    #[test]
    fn backends_agree_on_random_decoders(case in decoder_case(), pos in 0.0f64..1.0) {
        let dir = tempfile::tempdir().unwrap();
        let models = load_all(&case.write(dir.path()), "llama");
        let position = ((case.tokens.len() as f64 * pos) as usize).min(case.tokens.len() - 1);
        pairs_agree(&models, &case.tokens, case.layer, position).map_err(TestCaseError::fail)?;
    }
}

/// A small GPT-2 for the bad-input table.
fn gpt2_config() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 23,
        n_positions: 8,
        n_embd: 16,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
        activation_function: "gelu_new".into(),
        tie_word_embeddings: true,
        n_inner: None,
    }
}

fn llama_config() -> DecoderConfig {
    let json = r#"{"model_type": "llama", "vocab_size": 19, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 8}"#;
    DecoderConfig::from_json(json, std::path::Path::new("config.json")).unwrap()
}

/// A bad checkpoint: a name, and how to damage a good one in `dir`.
type Damage = (&'static str, fn(&std::path::Path) -> ModelFiles);

fn write_gpt2(
    dir: &std::path::Path,
    edit: impl FnOnce(&mut Vec<fs_checkpoint::NamedTensor>, &mut serde_json::Value),
) -> ModelFiles {
    let cfg = gpt2_config();
    let mut w = fs_checkpoint::random_gpt2_weights(&cfg, WEIGHT_STD, 3);
    let mut json = cfg.to_json();
    edit(&mut w, &mut json);
    fs_checkpoint::write_checkpoint(dir, &json, &w).unwrap()
}

const BAD_GPT2_CHECKPOINTS: &[Damage] = &[
    ("missing tensor", |d| write_gpt2(d, |w, _| w.retain(|t| t.0 != "h.1.mlp.c_fc.bias"))),
    ("wrong shape", |d| {
        write_gpt2(d, |w, _| {
            let t = w.iter_mut().find(|t| t.0 == "h.0.attn.c_proj.weight").unwrap();
            t.1 = vec![8, 32];
        })
    }),
    ("NaN weight", |d| write_gpt2(d, |w, _| w[3].2[1] = f32::NAN)),
    ("infinite weight", |d| write_gpt2(d, |w, _| w[0].2[5] = f32::INFINITY)),
    ("unsupported activation", |d| write_gpt2(d, |_, j| j["activation_function"] = "relu".into())),
    ("heads do not divide width", |d| write_gpt2(d, |_, j| j["n_head"] = 3.into())),
    ("not a GPT-2 config", |d| write_gpt2(d, |_, j| j["model_type"] = "llama".into())),
    ("truncated weights", |d| {
        let files = write_gpt2(d, |_, _| {});
        let f = std::fs::OpenOptions::new().write(true).open(&files.weights[0]).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - 100).unwrap();
        files
    }),
    ("garbage weights", |d| {
        let files = write_gpt2(d, |_, _| {});
        std::fs::write(&files.weights[0], b"\xff\xff\xff\xff\xff\xff\xff\x7fnot safetensors")
            .unwrap();
        files
    }),
];

/// The one-line message every backend gives for `case`, checked to be the same everywhere.
fn same_error_everywhere(what: &str, results: Vec<(&'static str, Result<(), String>)>) {
    let mut first: Option<(&str, String)> = None;
    for (name, r) in results {
        let msg = match r {
            Ok(()) => panic!("{what}: {name} accepted it"),
            Err(m) => m,
        };
        assert!(!msg.contains('\n'), "{what}: {name}: multi-line message {msg:?}");
        assert!(!msg.is_empty(), "{what}: {name}: empty message");
        match &first {
            None => {
                println!("{what:<28} {msg}");
                first = Some((name, msg));
            }
            Some((n0, m0)) => assert_eq!(&msg, m0, "{what}: {name} and {n0} disagree"),
        }
    }
}

/// Every bad checkpoint is refused, with one line, on every engine's load path. The messages
/// agree by construction (the registry reads and checks the checkpoint engine-free, before any
/// engine sees it); what can fail here is a bad checkpoint getting through, or a message on
/// several lines.
#[test]
fn every_bad_checkpoint_is_refused_with_one_line_on_every_engine() {
    for (what, damage) in BAD_GPT2_CHECKPOINTS {
        let dir = tempfile::tempdir().unwrap();
        let files = damage(dir.path());
        let results = compiled_backends()
            .into_iter()
            .map(|b| (b.name(), load(b, &files).map(|_| ())))
            .collect();
        same_error_everywhere(what, results);
    }
    // A Llama checkpoint missing a layer's weights.
    let dir = tempfile::tempdir().unwrap();
    let cfg = llama_config();
    let mut w = fs_checkpoint::random_decoder_weights(&cfg, WEIGHT_STD, 4);
    w.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight");
    let files = fs_checkpoint::write_checkpoint(dir.path(), &cfg.to_json(), &w).unwrap();
    let results = compiled_backends()
        .into_iter()
        .filter(|b| b.implements("llama"))
        .map(|b| (b.name(), load(b, &files).map(|_| ())))
        .collect();
    same_error_everywhere("llama missing tensor", results);
}

#[test]
fn every_backend_gives_the_same_error_for_the_same_bad_request() {
    let dir = tempfile::tempdir().unwrap();
    let gpt2 = write_gpt2(dir.path(), |_, _| {});
    let ldir = tempfile::tempdir().unwrap();
    let cfg = llama_config();
    let llama = Case { config: cfg, seed: 5, tokens: vec![], layer: 0 }.write(ldir.path());
    type Request = (&'static str, Vec<u32>, usize);
    let requests: Vec<Request> = vec![
        ("layer past the last block", vec![1, 2, 3], 3),
        ("token id out of vocabulary", vec![1, 99, 3], 1),
        ("empty token sequence", vec![], 1),
        ("sequence longer than the context", (0..9).collect(), 1),
    ];
    for (arch, files) in [("gpt2", &gpt2), ("llama", &llama)] {
        let models = load_all(files, arch);
        for (what, tokens, layer) in &requests {
            let results = models.iter().map(|(n, m)| (*n, m.lower_error(tokens, *layer))).collect();
            same_error_everywhere(&format!("{arch}: {what}"), results);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The random model every engine builds (`…Weights::random`) is exactly the model of the
    /// checkpoint the suite writes for the same `(config, seed)`: the typed host weights read back
    /// from the safetensors file are equal, tensor by tensor (so the engine tests that use
    /// either are testing the same model). Engine-free: both sides are `fs-checkpoint`.
    #[test]
    fn random_weights_are_the_model_of_the_written_checkpoint(
        g in gpt2_case(),
        l in decoder_case()
    ) {
        let dir = tempfile::tempdir().unwrap();
        let files = g.write(&dir.path().join("gpt2"));
        let loaded = fs_checkpoint::Gpt2Weights::load(&files).unwrap();
        let random = fs_checkpoint::Gpt2Weights::random(g.config.clone(), WEIGHT_STD, g.seed).unwrap();
        prop_assert!(loaded == random, "GPT-2 {:?}", g.config);
        let files = l.write(&dir.path().join("llama"));
        let loaded = fs_checkpoint::DecoderWeights::load(&files).unwrap();
        let random = fs_checkpoint::DecoderWeights::random(l.config.clone(), WEIGHT_STD, l.seed).unwrap();
        prop_assert!(loaded == random, "Llama {:?}", l.config);
    }
}

/// The device of `FS_TEST_DEVICE` against the CPU, engine by engine: for every compiled engine
/// that opens the device and every fixture of its families, the logits at every layer (≤ 1e-4
/// absolute) and the exact F at every layer and the last position (≤ 1e-4 relative Frobenius,
/// the cross-engine bound) equal the same engine's on the CPU. Uploads, kernels and downloads of
/// the device path are what differs. Ignored by a plain `cargo test` (it needs a device):
/// `tools/test_wgpu.sh` runs it with `FS_TEST_DEVICE=wgpu` on Mesa's software Vulkan driver.
#[test]
#[ignore = "needs FS_TEST_DEVICE (tools/test_wgpu.sh)"]
fn device_agrees_with_cpu() {
    use fs_suite::backends::{load_on, test_device};
    let device = test_device();
    assert_ne!(device, "cpu", "set FS_TEST_DEVICE to the device to compare with the CPU");
    let mut compared = Vec::new();
    for backend in compiled_backends() {
        for name in fs_suite::fixtures::ALL {
            let files =
                fs_checkpoint::resolve_model(fs_suite::fixtures::dir(name).to_str().unwrap())
                    .expect("resolve fixture");
            let family = fs_checkpoint::Checkpoint::from_files(files.clone())
                .expect("fixture config")
                .config
                .architecture()
                .family();
            if !backend.implements(family) {
                continue;
            }
            let on_device = match load_on(backend, &files, &device) {
                Ok(m) => m,
                Err(e) => {
                    println!("{} cannot open {device} ({e}): not compared", backend.name());
                    break;
                }
            };
            let on_cpu = load_on(backend, &files, "cpu").expect("cpu");
            let r = fs_suite::fixtures::Reference::load(name);
            let last = r.input_ids.len() - 1;
            let models = vec![(backend.name(), on_cpu), ("device", on_device)];
            for k in 0..=r.n_layers {
                pairs_agree(&models, &r.input_ids, k, last)
                    .unwrap_or_else(|e| panic!("{name} on {device} vs cpu: {e}"));
            }
            compared.push(format!("{} {name}", backend.name()));
        }
    }
    println!("{device} agrees with cpu: {}", compared.join(", "));
    assert!(!compared.is_empty(), "no compiled engine opened {device}");
}
