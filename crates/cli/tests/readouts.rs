//! Interpretability read-outs on the repository's tiny real checkpoints: direction effects against
//! finite differences of the model, the KL check, projections, the layer sweep, dataset means
//! merged from shards, and the HTML report.

use backend_candle::{Decoder, Device, Gpt2};
use fs_estimators::{
    direction_effects, exact_fisher, spectrum, DirectionOptions, ExactOptions, Matrix, Scalar,
    SplitModel,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fisher-stein"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// A failure with exit code 2 and a one-line message containing `needle`.
fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
}

mod common;
use common::{model_with_word_tokenizer, ok, read_safetensors, rel, Arrays};

/// `J v` for the top eigenvectors (exact, `W_U A v`) against central differences of the model's
/// own upper half; returns the worst relative error.
fn fd_agreement<M: SplitModel>(model: &M, tokens: &[u32], layer: usize) -> f64 {
    let ctx = model.lower(tokens, layer).unwrap();
    let mut worst = 0.0f64;
    for t in [0, tokens.len() / 2, tokens.len() - 1] {
        let f = exact_fisher(model, &ctx, &[t], &ExactOptions::default()).unwrap();
        let s = spectrum(&f[0], Some(3)).unwrap();
        let effects =
            direction_effects(model, &ctx, t, &s.eigenvectors, &DirectionOptions::default())
                .unwrap();
        let h = model.activation(&ctx, t).unwrap();
        for (k, e) in effects.iter().enumerate() {
            // Fourth-order central stencil (f32 model: the step trades truncation against
            // rounding of the logits).
            let eps = 4e-3;
            let at = |step: f64| {
                let x: Vec<M::Scalar> = h
                    .iter()
                    .enumerate()
                    .map(|(j, a)| {
                        M::Scalar::round_from_f64(a.as_f64() + step * s.eigenvectors.get(j, k))
                    })
                    .collect();
                model.upper_logits(&ctx, t, &x).unwrap()
            };
            let (z1, zm1, z2, zm2) = (at(eps), at(-eps), at(2.0 * eps), at(-2.0 * eps));
            let fd: Vec<f64> = (0..z1.len())
                .map(|y| {
                    let d1 = z1[y].as_f64() - zm1[y].as_f64();
                    let d2 = z2[y].as_f64() - zm2[y].as_f64();
                    (8.0 * d1 - d2) / (12.0 * eps)
                })
                .collect();
            worst = worst.max(rel(&e.logit_change, &fd));
            // vᵀFv from the exact Jv reproduces the eigenvalue of the exact Fisher.
            let lambda = s.eigenvalues[k];
            assert!(
                (e.fisher_quadratic - lambda).abs() <= 1e-3 * lambda,
                "{} vs {lambda}",
                e.fisher_quadratic
            );
        }
    }
    worst
}

#[test]
fn direction_effects_match_finite_differences_of_the_model() {
    let tokens = [15u32, 42, 7, 99, 3, 88, 60, 5];
    for name in ["gpt2-tiny-a", "gpt2-tiny-b"] {
        let files = fs_checkpoint::resolve_model(fixture(name).to_str().unwrap()).unwrap();
        let model = fs_checkpoint::Gpt2Weights::load(&files)
            .map_err(Into::into)
            .and_then(|w| Gpt2::new(w, &Device::Cpu))
            .unwrap();
        for layer in [0, 1, 2] {
            let err = fd_agreement(&model, &tokens, layer);
            println!(
                "{name} layer {layer}: max relative error of Jv vs central difference {err:.2e}"
            );
            assert!(err < 2e-3, "{name} layer {layer}: {err}");
        }
    }
    let files =
        fs_checkpoint::resolve_model(fixture("llama-tiny-untied").to_str().unwrap()).unwrap();
    let model = fs_checkpoint::DecoderWeights::load(&files)
        .map_err(Into::into)
        .and_then(|w| Decoder::new(w, &Device::Cpu))
        .unwrap();
    for layer in [0, 1] {
        let err = fd_agreement(&model, &tokens, layer);
        println!("llama-tiny-untied layer {layer}: max relative error {err:.2e}");
        assert!(err < 2e-3, "llama layer {layer}: {err}");
    }
}

/// `compute --directions 3 --layers all --positions all` on a fixture.
fn directions_run(name: &str, out: &Path) -> String {
    ok(&bin()
        .args(["compute", "--model", fixture(name).to_str().unwrap(), "--layers", "all"])
        .args(["--tokens", "15,42,7,90,3,88,60,5", "--positions", "all", "--directions", "3"])
        .args(["--output", out.to_str().unwrap(), "--force"])
        .output()
        .unwrap())
}

#[test]
fn kl_check_projections_and_report() {
    let root = tempfile::tempdir().unwrap();
    for name in ["gpt2-tiny-a", "gpt2-tiny-b", "llama-tiny-tied"] {
        let out = root.path().join(name);
        directions_run(name, &out);
        let r = read_safetensors(&out.join("fisher.safetensors"));
        let (ks, kl) = &r["direction_kl"];
        let (_, klq) = &r["direction_kl_quadratic"];
        assert_eq!(ks[1], 3);
        let ratios: Vec<f64> = kl.iter().zip(klq).map(|(a, b)| a / b).collect();
        let (lo, hi) =
            ratios.iter().fold((f64::INFINITY, 0.0f64), |(l, h), &x| (l.min(x), h.max(x)));
        println!(
            "{name}: KL(p‖p(h+εv)) / ½ε²vᵀFv over {} directions in [{lo:.4}, {hi:.4}]",
            ratios.len()
        );
        assert!(lo > 0.9 && hi < 1.1, "{name}: KL ratios in [{lo}, {hi}]");

        // Projections are hᵀv with the stored activation and eigenvectors...
        let (hs, h) = &r["activations"];
        let (vs, v) = &r["eigenvectors"];
        let (_, proj) = &r["projections"];
        let (n, d, rank) = (vs[0], vs[1], vs[2]);
        assert_eq!(hs, &vec![n, d]);
        let mut worst = 0.0f64;
        for i in 0..n {
            let hn: f64 = h[i * d..(i + 1) * d].iter().map(|x| x * x).sum::<f64>().sqrt();
            for k in 0..3 {
                let dot: f64 = (0..d).map(|j| h[i * d + j] * v[i * d * rank + j * rank + k]).sum();
                worst = worst.max((dot - proj[i * 3 + k]).abs() / hn);
            }
        }
        assert!(worst < 1e-5, "{name}: projections vs hᵀv {worst:e}");
        // ...and the stored activation is the model's h_k[t] (checked on GPT-2 through candle).
        if name.starts_with("gpt2") {
            let files = fs_checkpoint::resolve_model(fixture(name).to_str().unwrap()).unwrap();
            let model = fs_checkpoint::Gpt2Weights::load(&files)
                .map_err(Into::into)
                .and_then(|w| Gpt2::new(w, &Device::Cpu))
                .unwrap();
            let tokens: Vec<u32> = r["token_ids"].1.iter().map(|&x| x as u32).collect();
            for i in 0..n {
                let (layer, t) = (r["layer"].1[i] as usize, r["positions"].1[i] as usize);
                let ctx = model.lower(&tokens, layer).unwrap();
                let a: Vec<f64> =
                    model.activation(&ctx, t).unwrap().iter().map(|x| x.as_f64()).collect();
                assert!(rel(&h[i * d..(i + 1) * d], &a) < 1e-6, "activation {i}");
            }
        }
    }

    // The report: one self-contained page with the three plots and the tables.
    let dir = root.path().join("gpt2-tiny-b");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("metadata.json")).unwrap()).unwrap();
    let inspect =
        ok(&bin().args(["inspect", dir.to_str().unwrap(), "--top-k", "1"]).output().unwrap());
    assert!(inspect.contains("projections hᵀv_i") && inspect.contains("ratio"), "{inspect}");
    assert!(inspect.contains("layer sweep:"), "{inspect}");
    ok(&bin().args(["report", dir.to_str().unwrap()]).output().unwrap());
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    for needle in [
        "<figure id=\"plot-spectra\"><svg",
        "<figure id=\"plot-effective_rank\"><svg",
        "<figure id=\"plot-entropy_trace\"><svg",
        "<h2>Layer sweep</h2>",
        "<h2>Projections</h2>",
        "<h2>Decoded directions</h2>",
        "+v pushes up",
        "½ε²vᵀFv",
    ] {
        assert!(html.contains(needle), "report lacks {needle}");
    }
    // One table row per analysed position and per decoded direction.
    let n = meta["summary"].as_array().unwrap().len();
    assert_eq!(html.matches("<h3>seq ").count(), n);
    assert_eq!(html.matches("<tr><td>v").count(), 3 * n);
    // Self-contained: no scripts, no links or sources to fetch.
    for bad in ["<script", "src=", "href=", "url("] {
        assert!(!html.contains(bad), "report contains {bad}");
    }
    for p in ["spectra", "effective_rank", "entropy_trace"] {
        let png = std::fs::read(dir.join("plots").join(format!("{p}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = std::fs::read_to_string(dir.join("plots").join(format!("{p}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("<text"));
    }
}

#[test]
fn layer_sweep_summary_matches_the_spectra_of_the_stored_matrices() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("sweep");
    let stdout = ok(&bin()
        .args(["compute", "--model", fixture("gpt2-tiny-b").to_str().unwrap(), "--layers", "all"])
        .args(["--tokens", "15,42,7,199,3,88", "--positions", "all", "--output"])
        .arg(&out)
        .output()
        .unwrap());
    assert!(stdout.contains("layer  positions  mean entropy"), "{stdout}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metadata.json")).unwrap()).unwrap();
    let rows = meta["layer_summary"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let r = read_safetensors(&out.join("fisher.safetensors"));
    let (fs, f) = &r["fisher"];
    let (n, d) = (fs[0], fs[1]);
    for row in rows {
        let layer = row["layer"].as_u64().unwrap() as usize;
        let idx: Vec<usize> = (0..n).filter(|&i| r["layer"].1[i] as usize == layer).collect();
        assert_eq!(idx.len(), 6);
        let specs: Vec<_> = idx
            .iter()
            .map(|&i| {
                let m = Matrix::from_vec(d, d, f[i * d * d..(i + 1) * d * d].to_vec()).unwrap();
                spectrum(&m, Some(5)).unwrap()
            })
            .collect();
        let mean = |g: &dyn Fn(&fs_estimators::Spectrum) -> f64| {
            specs.iter().map(g).sum::<f64>() / specs.len() as f64
        };
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1e-12);
        assert!(close(row["mean_trace"].as_f64().unwrap(), mean(&|s| s.trace)), "{row}");
        assert!(
            close(row["mean_effective_rank"].as_f64().unwrap(), mean(&|s| s.effective_rank)),
            "{row}"
        );
        assert!(
            close(
                row["mean_participation_ratio"].as_f64().unwrap(),
                mean(&|s| s.participation_ratio)
            ),
            "{row}"
        );
        for k in 0..5 {
            let got = row["mean_top_eigenvalues"][k].as_f64().unwrap();
            assert!(close(got, mean(&|s| s.eigenvalues[k])), "layer {layer} λ{k}: {got}");
        }
    }
}

/// A copy of gpt2-tiny-b with a word-level tokenizer (`w0` … `w199` → ids 0 … 199), so that
/// `--input FILE` works on it.

#[test]
fn merge_of_shards_equals_one_job() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("model");
    model_with_word_tokenizer(&model);
    let docs = root.path().join("docs.txt");
    std::fs::write(
        &docs,
        "w15 w42 w7 w199 w3\nw1 w2 w3 w4 w5 w6 w7\nw100 w50 w25\nw9 w8 w7 w6\nw180 w170 w160 w150 w140 w130\n",
    )
    .unwrap();
    let common = |out: &Path| {
        let mut c = bin();
        c.args([
            "-q",
            "compute",
            "--model",
            model.to_str().unwrap(),
            "--input",
            docs.to_str().unwrap(),
        ])
        .args([
            "--layers",
            "1,3",
            "--positions",
            "all",
            "--output",
            out.to_str().unwrap(),
        ]);
        c
    };
    let single = root.path().join("single");
    ok(&common(&single).arg("--mean-only").output().unwrap());
    assert!(!single.join("fisher_seq_000000.safetensors").exists(), "--mean-only wrote matrices");
    let mut shard_dirs = Vec::new();
    for i in 0..3 {
        let out = root.path().join(format!("shard{i}"));
        ok(&common(&out).args(["--mean", "--shard", &format!("{i}/3")]).output().unwrap());
        shard_dirs.push(out);
    }
    // Shard 1/3 holds documents 1 and 4 only.
    assert!(shard_dirs[1].join("fisher_seq_000004.safetensors").exists());
    assert!(!shard_dirs[1].join("fisher_seq_000000.safetensors").exists());
    let merged = root.path().join("merged");
    // Merge in a different order from the shard numbering: order must not matter.
    let stdout = ok(&bin()
        .args(["merge", shard_dirs[2].to_str().unwrap(), shard_dirs[0].to_str().unwrap()])
        .arg(shard_dirs[1].to_str().unwrap())
        .args(["--output", merged.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(stdout.contains("mean Fisher per layer"), "{stdout}");
    let a = read_safetensors(&single.join("mean.safetensors"));
    let b = read_safetensors(&merged.join("mean.safetensors"));
    assert_eq!(a["count"], b["count"]);
    assert_eq!(a["count"].1, vec![25.0, 25.0]);
    assert_eq!(a["sequences"], b["sequences"]);
    let sum = |r: &Arrays| -> Vec<f64> {
        r["fisher_sum"].1.iter().zip(&r["fisher_sum_lo"].1).map(|(h, l)| h + l).collect()
    };
    let e_sum = rel(&sum(&b), &sum(&a));
    let e_mean = rel(&b["fisher_mean"].1, &a["fisher_mean"].1);
    println!("merge of 3 shards vs one job: relative error of the sum {e_sum:.1e}, of the mean {e_mean:.1e}");
    assert!(e_sum <= 1e-12 && e_mean <= 1e-12, "{e_sum} {e_mean}");
    // The mean is the mean of the per-position matrices the shards wrote (stored in f32).
    let mut acc = vec![0.0f64; b["fisher_mean"].1.len() / 2];
    let mut count = 0;
    for dir in &shard_dirs {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().starts_with("fisher_seq") {
                let r = read_safetensors(&p);
                let (fs, f) = &r["fisher"];
                let dd = fs[1] * fs[2];
                for i in 0..fs[0] {
                    if r["layer"].1[i] == 1.0 {
                        acc.iter_mut().zip(&f[i * dd..(i + 1) * dd]).for_each(|(a, x)| *a += x);
                        count += 1;
                    }
                }
            }
        }
    }
    assert_eq!(count, 25);
    acc.iter_mut().for_each(|x| *x /= 25.0);
    assert!(rel(&b["fisher_mean"].1[..acc.len()], &acc) < 1e-6);
    // inspect and report read a mean-only directory and a merged one.
    let s = ok(&bin().args(["inspect", single.to_str().unwrap()]).output().unwrap());
    assert!(s.contains("mean.safetensors (5 sequence(s)"), "{s}");
    ok(&bin().args(["-q", "report", merged.to_str().unwrap()]).output().unwrap());
    let html = std::fs::read_to_string(merged.join("report.html")).unwrap();
    assert!(html.contains("<h2>Dataset mean</h2>") && html.contains("plot-spectra"));

    // Bad inputs: one line, exit code 2.
    let again = root.path().join("again");
    fails_with(
        &bin()
            .args([
                "merge",
                shard_dirs[0].to_str().unwrap(),
                shard_dirs[0].to_str().unwrap(),
                "--output",
            ])
            .arg(&again)
            .output()
            .unwrap(),
        "is in both",
    );
    let other_layers = root.path().join("other");
    ok(&bin()
        .args([
            "-q",
            "compute",
            "--model",
            model.to_str().unwrap(),
            "--input",
            docs.to_str().unwrap(),
        ])
        .args(["--layers", "2", "--positions", "all", "--mean-only", "--shard", "1/3", "--output"])
        .arg(&other_layers)
        .output()
        .unwrap());
    fails_with(
        &bin()
            .args([
                "merge",
                shard_dirs[0].to_str().unwrap(),
                other_layers.to_str().unwrap(),
                "--output",
            ])
            .arg(&again)
            .output()
            .unwrap(),
        "differ in layers",
    );
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails_with(
        &bin().args(["merge", empty.to_str().unwrap(), "--output"]).arg(&again).output().unwrap(),
        "holds no mean.safetensors",
    );
    fails_with(
        &bin().args(["merge", "/nonexistent/dir", "--output"]).arg(&again).output().unwrap(),
        "does not exist",
    );
    fails_with(&bin().args(["report", empty.to_str().unwrap()]).output().unwrap(), "metadata.json");
    for (shard, needle) in [
        ("3/3", "invalid shard"),
        ("0/0", "invalid shard"),
        ("a/b", "invalid shard"),
        ("1", "invalid shard"),
    ] {
        fails_with(
            &common(&root.path().join("bad")).args(["--mean", "--shard", shard]).output().unwrap(),
            needle,
        );
    }
    fails_with(
        &bin()
            .args([
                "compute",
                "--model",
                model.to_str().unwrap(),
                "--tokens",
                "1,2,3",
                "--layer",
                "1",
            ])
            .args(["--estimator", "predictive", "--directions", "2", "--output"])
            .arg(root.path().join("bad"))
            .output()
            .unwrap(),
        "--directions",
    );
    assert!(
        !again.exists() && !root.path().join("bad").exists(),
        "a failed command left a directory"
    );
}

/// A job array with more tasks than documents: the shards that get no document succeed with a
/// warning and an empty accumulator (count 0, no sequences), and merging every task's directory
/// gives the same sums as the shards that had work.
#[test]
fn an_empty_shard_succeeds_and_merges_as_nothing() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("model");
    model_with_word_tokenizer(&model);
    let docs = root.path().join("docs.txt");
    std::fs::write(&docs, "w15 w42 w7\nw1 w2 w3 w4\n").unwrap();
    let shard = |i: usize| {
        let out = root.path().join(format!("shard{i}"));
        let r = bin()
            .args(["compute", "--model", model.to_str().unwrap(), "--input"])
            .arg(&docs)
            .args(["--layers", "1,2", "--positions", "all", "--mean", "--shard"])
            .arg(format!("{i}/4"))
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        ok(&r);
        (out, String::from_utf8_lossy(&r.stderr).into_owned())
    };
    let shards: Vec<(PathBuf, String)> = (0..4).map(shard).collect();
    for (i, (dir, stderr)) in shards.iter().enumerate() {
        let empty = i >= 2;
        assert_eq!(
            stderr.contains("--shard") && stderr.contains("selects none"),
            empty,
            "{i}: {stderr}"
        );
        let m = read_safetensors(&dir.join("mean.safetensors"));
        let expected = if empty { vec![0.0, 0.0] } else { vec![3.0 + i as f64, 3.0 + i as f64] };
        assert_eq!(m["count"].1, expected, "shard {i}");
        assert_eq!(m["sequences"].1.len(), usize::from(!empty), "shard {i}");
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("metadata.json")).unwrap()).unwrap();
        assert!(meta.is_object(), "shard {i}: metadata.json");
    }
    // Every task's directory, empty ones first, against only the shards with work.
    let all = root.path().join("all");
    let every: Vec<&Path> = shards.iter().rev().map(|(d, _)| d.as_path()).collect();
    ok(&bin().arg("merge").args(&every).arg("--output").arg(&all).output().unwrap());
    let busy = root.path().join("busy");
    ok(&bin()
        .arg("merge")
        .args([&shards[0].0, &shards[1].0])
        .arg("--output")
        .arg(&busy)
        .output()
        .unwrap());
    let a = read_safetensors(&all.join("mean.safetensors"));
    let b = read_safetensors(&busy.join("mean.safetensors"));
    for key in ["count", "sequences", "fisher_sum", "fisher_sum_lo", "fisher_mean", "entropy_sum"] {
        assert_eq!(a[key], b[key], "{key}");
    }
    assert_eq!(a["count"].1, vec![7.0, 7.0]);
}

/// The tiny GPT-2 with a word-level tokenizer (`w0` … `w199`), loaded in-process too.
fn word_model(dir: &Path) -> Gpt2 {
    model_with_word_tokenizer(dir);
    let files = fs_checkpoint::resolve_model(dir.to_str().unwrap()).unwrap();
    fs_checkpoint::Gpt2Weights::load(&files)
        .map_err(Into::into)
        .and_then(|w| Gpt2::new(w, &Device::Cpu))
        .unwrap()
}

#[test]
fn steer_reaches_the_target_with_the_reported_off_target_kl_and_reports_it() {
    use fs_estimators::steering::{
        off_target_kl, steer, FisherSolver, SteeringMethod, SteeringOptions,
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let model = word_model(&dir);
    std::fs::write(tmp.path().join("pos.txt"), "w3 w9 w9\nw9 w9\n").unwrap();
    std::fs::write(tmp.path().join("neg.txt"), "w3 w4 w4\nw4 w4\n").unwrap();
    let out = tmp.path().join("steer");
    let run = |extra: &[&str]| {
        bin()
            .args(["steer", "--model", dir.to_str().unwrap(), "--layer", "1"])
            .args(["--text", "w1 w2 w3 w4", "--target", "w9", "--to", "0.05"])
            .args(["--contrast", tmp.path().join("pos.txt").to_str().unwrap()])
            .arg(tmp.path().join("neg.txt"))
            .args(["--output", out.to_str().unwrap(), "--cg-tolerance", "1e-6"])
            .args(extra)
            .output()
            .unwrap()
    };
    let table = ok(&run(&[]));
    assert!(table.contains("euclidean") && table.contains("fisher") && table.contains("contrast"));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("steer.json")).unwrap()).unwrap();
    let pair = &r["pairs"][0];
    assert_eq!(pair["target_id"], 9);
    let tokens = [1u32, 2, 3, 4];
    let ctx = model.lower(&tokens, 1).unwrap();
    let h0 = model.activation(&ctx, 3).unwrap();
    let mut off = std::collections::BTreeMap::new();
    for m in pair["methods"].as_array().unwrap() {
        let name = m["method"].as_str().unwrap();
        off.insert(name.to_string(), m["off_target_kl"].as_f64().unwrap());
        // The gradient methods reach the target; a contrastive vector need not (it reports why).
        if name == "contrast" && !m["reached"].as_bool().unwrap() {
            assert!(m["stopped"].as_str().unwrap().contains("direction"), "{m}");
            continue;
        }
        assert!(m["reached"].as_bool().unwrap(), "{name}: {m}");
        let p = m["final_probability"].as_f64().unwrap();
        assert!((p.ln() - 0.05f64.ln()).abs() <= 1e-3, "{name}: {p}");
    }
    // The library run gives the same path; the reported off-target KL is that of the edit,
    // recomputed here from the model's logits at h + δ.
    let opts =
        SteeringOptions { target_probability: 0.05, cg_tolerance: 1e-6, ..Default::default() };
    let encode = |t: &[u32]| {
        let c = model.lower(t, 1).unwrap();
        model.activation(&c, t.len() - 1).unwrap()
    };
    let (a, b, c, e) = (encode(&[3, 9, 9]), encode(&[9, 9]), encode(&[3, 4, 4]), encode(&[4, 4]));
    let contrast: Vec<f64> = (0..a.len())
        .map(|j| (a[j] as f64 + b[j] as f64) / 2.0 - (c[j] as f64 + e[j] as f64) / 2.0)
        .collect();
    for (name, method) in [
        ("euclidean", SteeringMethod::Euclidean),
        ("fisher", SteeringMethod::Fisher { damping: 0.01, solver: FisherSolver::Exact }),
        ("contrast", SteeringMethod::Fixed(contrast)),
    ] {
        let path = steer(&model, &ctx, 3, 9, &method, &opts).unwrap();
        let got = off[name];
        assert!((path.off_target_kl - got).abs() <= 1e-12 * got, "{name}: {path:?} vs {got}");
        let h1: Vec<f32> =
            h0.iter().zip(&path.edit).map(|(a, d)| (a.as_f64() + d) as f32).collect();
        let z1 = model.upper_logits(&ctx, 3, &h1).unwrap();
        // (p before is the upper half's at h, as steer takes it.)
        let z0 = model.upper_logits(&ctx, 3, &h0).unwrap();
        let again = off_target_kl(&z0, &z1, 9).unwrap();
        assert!((again - got).abs() <= 1e-9 * got, "{name}: {again} vs {got}");
    }
    // The Fisher direction costs less off-target than the Euclidean gradient here.
    assert!(off["fisher"] < off["euclidean"], "{off:?}");
    // A second run refuses to overwrite; report draws the comparison.
    fails_with(&run(&[]), "pass --force");
    ok(&bin().args(["report", out.to_str().unwrap()]).output().unwrap());
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("Off-target KL") && html.contains("<svg"), "{}", &html[..300]);
    assert!(out.join("plots/steering.png").is_file());
}

#[test]
fn edit_reports_the_fisher_cost_of_a_direction() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let model = word_model(&dir);
    let json = tmp.path().join("edit.json");
    let stdout = ok(&bin()
        .args(["edit", "--model", dir.to_str().unwrap(), "--layer", "2", "--text", "w1 w2 w3"])
        .args(["--token-difference", "w5", "w7", "--scales", "1e-4,-1e-4,0.5"])
        .args(["--target", "w5", "--target", "id:7", "--json", json.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(stdout.contains("v̂ᵀFv̂"), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    // v̂ᵀFv̂ against the exact estimator's F (readout Jacobian, not the JVP the command uses).
    let ctx = model.lower(&[1, 2, 3], 2).unwrap();
    let f = exact_fisher(&model, &ctx, &[2], &ExactOptions::default()).unwrap().remove(0);
    let w = model.unembedding().gather(&[5, 7]).unwrap();
    let v: Vec<f64> = w.row(0).iter().zip(w.row(1)).map(|(a, b)| (a - b) as f64).collect();
    let d = v.len();
    let vv: f64 = v.iter().map(|x| x * x).sum();
    let vfv: f64 = (0..d).map(|a| (0..d).map(|b| v[a] * f.get(a, b) * v[b]).sum::<f64>()).sum();
    let got = r["unit_fisher"].as_f64().unwrap();
    assert!((got - vfv / vv).abs() <= 1e-4 * got, "{got} vs {}", vfv / vv);
    let steps = r["steps"].as_array().unwrap();
    let ratio =
        |s: &serde_json::Value| s["kl"].as_f64().unwrap() / s["kl_quadratic"].as_f64().unwrap();
    assert!((ratio(&steps[0]) - 1.0).abs() < 0.02, "{}", steps[0]);
    // w5 − w7 raises log p(w5) and lowers log p(w7), to first order as measured (central
    // difference of the ±ε edits).
    let (plus, minus) = (&steps[0]["target_log_prob_change"], &steps[1]["target_log_prob_change"]);
    for k in 0..2 {
        let pred = plus[k][0].as_f64().unwrap();
        let central = 0.5 * (plus[k][1].as_f64().unwrap() - minus[k][1].as_f64().unwrap());
        assert!((pred - central).abs() <= 2e-2 * pred.abs(), "target {k}: {pred} vs {central}");
    }
    assert!(plus[0][0].as_f64().unwrap() > 0.0 && plus[1][0].as_f64().unwrap() < 0.0);
}

#[test]
fn edit_and_steer_refuse_bad_requests_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    model_with_word_tokenizer(&dir);
    let m = dir.to_str().unwrap();
    let steer = |extra: &[&str]| {
        bin().args(["steer", "--model", m, "--layer", "1"]).args(extra).output().unwrap()
    };
    fails_with(&steer(&["--text", "w1 w2", "--target", "w3", "--to", "1.5"]), "(0, 1)");
    let never = tmp.path().join("never");
    let out = ["--text", "w1 w2", "--target", "w3 w4", "--output", never.to_str().unwrap()];
    fails_with(&steer(&out), "not one");
    assert!(!never.exists(), "a failed steer left its output directory behind");
    fails_with(&steer(&["--text", "w1 w2", "--target", "w3", "--damping", "0"]), "--damping");
    let study = tmp.path().join("study.json");
    std::fs::write(&study, r#"{"pairs": [{"prompt": "w1", "target": "w2", "contrast": "x"}]}"#)
        .unwrap();
    fails_with(&steer(&["--pairs", study.to_str().unwrap()]), "does not define");
    std::fs::write(&study, r#"{"pairs": [{"prompt": "w1", "target": "w2", "extra": 1}]}"#).unwrap();
    fails_with(&steer(&["--pairs", study.to_str().unwrap()]), "not a valid study file");
    fails_with(
        &steer(&["--text", "w1 w2", "--target", "w3", "--methods", "contrast"]),
        "needs a contrast",
    );
    let edit = |extra: &[&str]| {
        bin()
            .args(["edit", "--model", m, "--layer", "1", "--text", "w1 w2"])
            .args(extra)
            .output()
            .unwrap()
    };
    fails_with(&edit(&[]), "give the direction");
    let short = tmp.path().join("short.npy");
    // A 3-element f8 vector: the wrong length for d = 48.
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }";
    let pad = 128 - 10 - header.len() - 1;
    let header = format!("{header}{}\n", " ".repeat(pad));
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    for x in [1.0f64, 2.0, 3.0] {
        npy.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&short, npy).unwrap();
    fails_with(&edit(&["--vector", short.to_str().unwrap()]), "must be a vector of length d");
    fails_with(&edit(&["--token-difference", "w1", "w2", "--position", "5"]), "--position 5");
    let out = bin()
        .args(["edit", "--model", m, "--layer", "9", "--text", "w1 w2"])
        .args(["--token-difference", "w1", "w2"])
        .output()
        .unwrap();
    fails_with(&out, "layer 9 is out of range");
}

/// `compute --distribution attention:L.J` end to end against the transformers attention oracle
/// (`tools/make_attention_oracle.py`): on the sliding-window fixture (window 4, grouped
/// key/value heads), the stored Fisher of every position equals `Σ_s a_s g_s g_sᵀ` built from
/// the oracle's autograd `∇ log a` and weights, the recorded entropies are the attention's, the
/// read-outs name visible keys and pass the KL check, the sampled estimator draws visible keys
/// only, and inspect and report say "moves attention to".
#[test]
fn attention_distribution_matches_the_oracle_and_reads_out_keys() {
    let name = "mistral-window-tiny";
    let oracle = read_safetensors(&fixture(name).join("attention.safetensors"));
    let reference = read_safetensors(&fixture(name).join("reference.safetensors"));
    let ids: Vec<String> =
        reference["input_ids"].1.iter().map(|&x| (x as i64).to_string()).collect();
    let (k, block) = (oracle["split_layer"].1[0] as usize, oracle["layers"].1[1] as usize);
    let (ws, weights) = &oracle["weights"];
    let (_, log_jacobian) = &oracle["log_jacobian"];
    let (heads, p_n, t_n) = (ws[1], ws[2], ws[3]);
    let d = oracle["log_jacobian"].0[4];
    let head = heads - 1;
    assert_eq!(p_n, t_n, "every query position is in this fixture's oracle");
    let root = tempfile::tempdir().unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let mut c = bin();
        c.args(["compute", "--model", fixture(name).to_str().unwrap()])
            .args(["--layer", &k.to_string(), "--tokens", &ids.join(",")])
            .args(["--distribution", &format!("attention:{block}.{head}"), "--positions", "all"])
            .args(["--output", out.to_str().unwrap()])
            .args(extra);
        ok(&c.output().unwrap())
    };
    let exact = root.path().join("exact");
    run(&exact, &["--directions", "2", "--direction-tokens", "3", "--mean"]);
    let r = read_safetensors(&exact.join("fisher.safetensors"));
    let (_, fisher) = &r["fisher"];
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exact.join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["distribution"], format!("attention:{block}.{head}"));
    let (mut worst_f, mut worst_h) = (0.0f64, 0.0f64);
    for t in 0..t_n {
        // Block `layers[1]` of the oracle, head `head`, query t: offsets into [2, H, P, T(, d)].
        let row = (heads + head) * p_n + t;
        let a1 = |s: usize| weights[row * t_n + s];
        let g = |s: usize, c: usize| log_jacobian[(row * t_n + s) * d + c];
        let want: Vec<f64> =
            (0..d * d).map(|x| (0..t_n).map(|s| a1(s) * g(s, x / d) * g(s, x % d)).sum()).collect();
        let got = &fisher[t * d * d..(t + 1) * d * d];
        if want.iter().any(|&x| x != 0.0) {
            worst_f = worst_f.max(rel(got, &want));
        } else {
            assert!(got.iter().all(|&x| x.abs() < 1e-6), "position {t}: F should vanish");
        }
        // The stored weights are the head's (zero outside the window and after t).
        let stored = &r["attention_weights"].1[t * t_n..(t + 1) * t_n];
        assert!((0..t_n).all(|s| (stored[s] - a1(s)).abs() < 1e-5), "weights at {t}: {stored:?}");
        let entropy: f64 = (0..t_n).map(a1).filter(|&x| x > 0.0).map(|x| -x * x.ln()).sum();
        let recorded = meta["summary"][t]["entropy"].as_f64().unwrap();
        worst_h = worst_h.max((recorded - entropy).abs());
        // The read-outs name keys this query sees (inside the window of 4).
        for dir in meta["summary"][t]["directions"].as_array().unwrap() {
            for e in dir["up"].as_array().unwrap().iter().chain(dir["down"].as_array().unwrap()) {
                let key = e["key"].as_u64().unwrap() as usize;
                assert!(key <= t && t - key < 4, "position {t}: key {key} outside the window");
                assert_eq!(e["id"].as_u64().unwrap() as usize, ids[key].parse::<usize>().unwrap());
            }
        }
    }
    println!(
        "attention:{block}.{head} on {name}: F rel. error ≤ {worst_f:.2e}, entropy ≤ {worst_h:.2e}"
    );
    assert!(worst_f < 1e-3 && worst_h < 1e-5, "F {worst_f:e}, entropy {worst_h:e}");
    // The KL check of the decoded directions, where the direction moves the attention at all.
    let (_, kl) = &r["direction_kl"];
    let (_, klq) = &r["direction_kl_quadratic"];
    // At the read-out's step (score change of standard deviation 0.01) the quadratic term
    // dominates for the strong directions (λ ≥ 1); along weak ones the scores' own curvature
    // (q·k is quadratic in h) is comparable at that step — measured ratios up to 31 at λ ≈ 3e-3
    // — so the second-order identity is checked there at a small step below, in f64.
    let (_, lam) = &r["direction_eigenvalues"];
    let strong: Vec<f64> =
        kl.iter().zip(klq).zip(lam).filter(|(_, &l)| l >= 1.0).map(|((a, b), _)| a / b).collect();
    assert!(strong.len() >= t_n / 2, "{} strong directions", strong.len());
    assert!(strong.iter().all(|r| (r - 1.0).abs() < 0.1), "KL ratios {strong:?}");
    assert!(r.contains_key("direction_up_keys") && !r.contains_key("direction_up_tokens"));
    let inspect =
        ok(&bin().args(["inspect", exact.to_str().unwrap(), "--top-k", "1"]).output().unwrap());
    assert!(inspect.contains("moves attention to: @"), "{inspect}");
    ok(&bin().args(["report", exact.to_str().unwrap()]).output().unwrap());
    let html = std::fs::read_to_string(exact.join("report.html")).unwrap();
    assert!(html.contains("+v moves attention to"), "report");

    // Every direction, weak ones included, at a step small enough for the second-order term to
    // dominate, on candle's f64 model: KL(a ‖ a(h+εv)) / ½ε²vᵀFv → 1, and vᵀFv = λ.
    let files = fs_checkpoint::resolve_model(fixture(name).to_str().unwrap()).unwrap();
    let model = fs_checkpoint::DecoderWeights::load(&files)
        .map_err(Into::into)
        .and_then(|w| Decoder::<f64>::with_scalar(w, &Device::Cpu))
        .unwrap();
    let tokens: Vec<u32> = ids.iter().map(|x| x.parse().unwrap()).collect();
    let ctx = model.lower(&tokens, k).unwrap();
    let head = fs_estimators::AttentionHead { layer: block, head };
    let f =
        fs_estimators::exact_attention_fisher(&model, &ctx, &(1..t_n).collect::<Vec<_>>(), head)
            .unwrap();
    let opts = DirectionOptions { epsilon: Some(1e-4), ..DirectionOptions::default() };
    let (mut checked, mut worst, mut weakest) = (0, 0.0f64, f64::INFINITY);
    for f in &f {
        let s = spectrum(&f.fisher, Some(2)).unwrap();
        let v = Matrix::from_fn(d, 2, |i, c| s.eigenvectors.get(i, c));
        let effects = fs_estimators::attention_direction_effects(
            &model,
            &ctx,
            head,
            &f.distribution,
            &v,
            &opts,
        )
        .unwrap();
        for (e, &l) in effects.iter().zip(&s.eigenvalues) {
            if l > 1e-8 * s.eigenvalues[0] && l > 1e-10 {
                assert!((e.fisher_quadratic - l).abs() < 1e-8 * s.eigenvalues[0], "vᵀFv {l}");
                let ratio = e.kl_ratio();
                assert!(
                    (ratio - 1.0).abs() < 0.02,
                    "position {}, λ {l:e}: ratio {ratio}",
                    f.distribution.position
                );
                (checked, worst, weakest) =
                    (checked + 1, worst.max((ratio - 1.0).abs()), weakest.min(l));
            }
        }
    }
    println!(
        "f64, ε = 1e-4: {checked} directions (λ down to {weakest:.1e}), |ratio − 1| ≤ {worst:.1e}"
    );
    assert!(checked > t_n, "{checked} directions checked");

    // A mean of attention Fishers does not merge with a mean of next-token ones.
    let plain = root.path().join("plain");
    let other: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    ok(&bin()
        .args(["compute", "--model", fixture(name).to_str().unwrap()])
        .args(["--layer", &k.to_string(), "--tokens", &other.join(","), "--positions", "all"])
        .args(["--mean", "--output", plain.to_str().unwrap()])
        .output()
        .unwrap());
    let merged = root.path().join("merged");
    fails_with(
        &bin()
            .args(["merge", exact.to_str().unwrap(), plain.to_str().unwrap(), "--output"])
            .arg(&merged)
            .output()
            .unwrap(),
        "differ in distribution",
    );

    // The sampled estimator draws keys from the attention weights: visible keys only.
    let sampled = root.path().join("sampled");
    run(&sampled, &["--estimator", "sampled", "--samples", "64"]);
    // Without stored read-outs, inspect does not decode the attention Fisher's eigenvectors as
    // next-token effects (what loading the model would do): it says why.
    let out = bin().args(["inspect", sampled.to_str().unwrap(), "--top-k", "1"]).output().unwrap();
    let (stdout, stderr) = (ok(&out), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(stderr.contains("directions not decoded") && stderr.contains("attention:"), "{stderr}");
    assert!(!stdout.contains("pushes up"), "{stdout}");
    let r = read_safetensors(&sampled.join("fisher.safetensors"));
    let (ss, draws) = &r["sample_tokens"];
    assert_eq!(ss, &vec![t_n, 64]);
    for t in 0..t_n {
        for &key in &draws[t * 64..(t + 1) * 64] {
            let key = key as usize;
            assert!(key <= t && t - key < 4, "position {t}: drew key {key}");
        }
    }
}

/// Attention requests the tool cannot answer are refused in one line, before anything is
/// written.
#[test]
fn attention_requests_are_checked() {
    let root = tempfile::tempdir().unwrap();
    let model = fixture("llama-tiny-tied");
    let cases: [(&[&str], &str); 6] = [
        (&["--layer", "2", "--distribution", "attention:0.0"], "before split layer 2"),
        (&["--layer", "0", "--distribution", "attention:2.0"], "blocks 0..2"),
        (&["--layer", "0", "--distribution", "attention:1.9"], "query heads 0.."),
        (&["--layer", "0", "--distribution", "attention:1"], "attention:L.J"),
        (
            &["--layer", "0", "--distribution", "attention:1.0", "--estimator", "closed-form"],
            "--estimator exact or sampled",
        ),
        (
            &[
                "--layer",
                "0",
                "--distribution",
                "attention:1.0",
                "--estimator",
                "sampled",
                "--temperature",
                "0.5",
            ],
            "drawn from the attention weights",
        ),
    ];
    for (i, (extra, needle)) in cases.into_iter().enumerate() {
        let out_dir = root.path().join(format!("out{i}"));
        let out = bin()
            .args(["compute", "--model", model.to_str().unwrap(), "--tokens", "5,9,3,7"])
            .args(["--output", out_dir.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        fails_with(&out, needle);
        assert!(!out_dir.exists(), "{extra:?} left {}", out_dir.display());
    }
}
