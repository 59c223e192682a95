//! `compute --sae`: SAE features through the Fisher matrix, checked independently of the binary's
//! own SAE code. The SAEs are random, written by `tools/make_sae_fixtures.py` in both layouts
//! (SAELens ReLU and JumpReLU; Gemma Scope `params.npz` by `np.savez`) for the
//! `llama-tiny-untied` fixture. From the results file (F, the activation h) and the SAE's
//! own files the test recomputes: the active features (encoder), the sensitivities
//! `diag(W_dec F W_decᵀ)`, the eigenvectors' most aligned features; it checks the second-order
//! ablation cost against the measured one for small activations, that both layouts of the same
//! weights give the same answer, and that a hook-name mismatch is an error that says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fisher-stein"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

const IDS: &str = "15,42,7,199,3,88,120,5,61,17,130,9";

fn run(out: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["compute", "--model"])
        .arg(fixtures().join("llama-tiny-untied"))
        .args(["--tokens", IDS, "--positions", "all", "--directions", "3", "--output"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn summaries(dir: &Path) -> Vec<serde_json::Value> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("metadata.json")).unwrap()).unwrap();
    meta["summary"].as_array().unwrap().clone()
}

/// `W_enc [48, 96]` etc. of a SAELens fixture, in f64.
fn saelens(name: &str) -> common::Arrays {
    common::read_safetensors(&fixtures().join("sae").join(name).join("sae_weights.safetensors"))
}

#[test]
fn sae_features_match_an_independent_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("relu");
    let sae_dir = fixtures().join("sae/saelens-relu");
    let sae_arg = sae_dir.to_str().unwrap();
    common::ok(&run(&out, &["--layer", "1", "--sae", sae_arg]));
    let r = common::read_safetensors(&out.join("fisher.safetensors"));
    let (fshape, f) = &r["fisher"];
    let (_, h) = &r["activations"];
    let (_, evecs) = &r["eigenvectors"];
    let (n, d) = (fshape[0], fshape[1]);
    let k_stored = r["eigenvectors"].0[2];
    let w = saelens("saelens-relu");
    let (w_enc, b_enc, w_dec, b_dec) = (&w["W_enc"].1, &w["b_enc"].1, &w["W_dec"].1, &w["b_dec"].1);
    let m = b_enc.len();
    let rows = summaries(&out);
    assert_eq!(rows.len(), n);
    let (mut checked_small, mut active_total) = (0, 0);
    for (p, row) in rows.iter().enumerate() {
        let sae = &row["sae"];
        let hp = &h[p * d..(p + 1) * d];
        let fp = &f[p * d * d..(p + 1) * d * d];
        // The encoder, SAELens `standard`: relu((h − b_dec) W_enc + b_enc).
        let acts: Vec<f64> = (0..m)
            .map(|i| {
                let pre: f64 =
                    b_enc[i] + (0..d).map(|j| (hp[j] - b_dec[j]) * w_enc[j * m + i]).sum::<f64>();
                pre.max(0.0)
            })
            .collect();
        let mut want: Vec<usize> = (0..m).filter(|&i| acts[i] > 0.0).collect();
        let features = sae["features"].as_array().unwrap();
        let mut got: Vec<usize> =
            features.iter().map(|x| x["index"].as_u64().unwrap() as usize).collect();
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want, "position {p}: active features");
        assert_eq!(sae["n_active"].as_u64().unwrap() as usize, want.len());
        assert!(!want.is_empty() && want.len() < m, "position {p}: a sparse code, not all or none");
        active_total += want.len();
        let f_norm = fp.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut last = f64::INFINITY;
        for x in features {
            let i = x["index"].as_u64().unwrap() as usize;
            let a = x["activation"].as_f64().unwrap();
            assert!(
                (a - acts[i]).abs() <= 1e-5 * acts[i].abs().max(1e-3),
                "feature {i}: a {a} vs {}",
                acts[i]
            );
            // diag(W_dec F W_decᵀ)_i from the stored (f32) F.
            let wi = &w_dec[i * d..(i + 1) * d];
            let s: f64 =
                (0..d).map(|r| wi[r] * (0..d).map(|c| fp[r * d + c] * wi[c]).sum::<f64>()).sum();
            let sens = x["sensitivity"].as_f64().unwrap();
            assert!((sens - s).abs() <= 1e-6 * (f_norm + s), "feature {i}: wᵀFw {sens} vs {s}");
            let second = x["kl_second_order"].as_f64().unwrap();
            assert!((second - 0.5 * a * a * sens).abs() <= 1e-12 * second.max(1e-300));
            assert!(second <= last, "sorted by second-order cost");
            last = second;
            let measured = x["kl_ablation"].as_f64().unwrap();
            assert!(measured >= 0.0);
            // The second-order cost is the KL of a small ablation.
            if second < 1e-4 && second > 1e-9 {
                let ratio = measured / second;
                assert!(
                    (ratio - 1.0).abs() <= 0.10,
                    "feature {i} at {p}: KL {measured} vs ½a²wᵀFw {second}"
                );
                checked_small += 1;
            }
        }
        // The top eigenvectors in feature space: largest |cos(v, w_i)|.
        for (kk, list) in sae["eigenvector_features"].as_array().unwrap().iter().enumerate() {
            let v: Vec<f64> = (0..d).map(|r| evecs[p * d * k_stored + r * k_stored + kk]).collect();
            let mut cos: Vec<(usize, f64)> = (0..m)
                .map(|i| {
                    let wi = &w_dec[i * d..(i + 1) * d];
                    let dot: f64 = wi.iter().zip(&v).map(|(a, b)| a * b).sum();
                    (i, dot / wi.iter().map(|x| x * x).sum::<f64>().sqrt())
                })
                .collect();
            cos.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
            let list = list.as_array().unwrap();
            assert_eq!(list.len(), 5);
            for (j, x) in list.iter().enumerate() {
                let c = x["cosine"].as_f64().unwrap();
                assert!(
                    (c.abs() - cos[j].1.abs()).abs() <= 1e-5,
                    "v{} feature {j}: {c} vs {:?}",
                    kk + 1,
                    cos[j]
                );
            }
        }
    }
    assert!(checked_small >= 10, "only {checked_small} small ablations checked of {active_total}");

    // inspect and report show it.
    let shown = common::ok(&bin().arg("inspect").arg(&out).output().unwrap());
    assert!(shown.contains("active feature(s)") && shown.contains("in feature space"), "{shown}");
    let html = tmp.path().join("report.html");
    common::ok(&bin().arg("report").arg(&out).arg("--output").arg(&html).output().unwrap());
    assert!(std::fs::read_to_string(&html).unwrap().contains("SAE features"));
}

/// The Gemma Scope `params.npz` (numpy's zip, ZIP64 local headers) and the SAELens JumpReLU
/// files hold the same weights: the same features, numbers and eigenvector features.
#[test]
fn gemma_scope_and_saelens_layouts_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("gs"), tmp.path().join("sl"));
    let gs = fixtures().join("sae/gemma-scope/layer_1/width_96/params.npz");
    let sl = fixtures().join("sae/saelens-jumprelu");
    common::ok(&run(&a, &["--layer", "2", "--sae", gs.to_str().unwrap()]));
    common::ok(&run(&b, &["--hook", "blocks.1.hook_resid_post", "--sae", sl.to_str().unwrap()]));
    let (ra, rb) = (summaries(&a), summaries(&b));
    let mut thresholded = 0;
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!(x["sae"], y["sae"]);
        thresholded += x["sae"]["n_active"].as_u64().unwrap();
    }
    assert!(thresholded > 0);
    // JumpReLU: every active feature clears its threshold.
    let w = saelens("saelens-jumprelu");
    let theta = &w["threshold"].1;
    for row in &ra {
        for f in row["sae"]["features"].as_array().unwrap() {
            let i = f["index"].as_u64().unwrap() as usize;
            assert!(f["activation"].as_f64().unwrap() > theta[i]);
        }
    }
}

fn one_line_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[test]
fn an_sae_of_another_layer_or_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let relu = fixtures().join("sae/saelens-relu");
    let err = one_line_error(&run(&out, &["--layer", "2", "--sae", relu.to_str().unwrap()]));
    assert!(
        err.contains("trained on blocks.1.hook_resid_pre (split layer 1)")
            && err.contains("--layer 1"),
        "{err}"
    );
    let gs = fixtures().join("sae/gemma-scope/layer_1/width_96/params.npz");
    let err = one_line_error(&run(&out, &["--layer", "1", "--sae", gs.to_str().unwrap()]));
    assert!(err.contains("blocks.1.hook_resid_post (split layer 2)"), "{err}");
    let err = one_line_error(&run(&out, &["--layers", "1,2", "--sae", relu.to_str().unwrap()]));
    assert!(err.contains("one layer"), "{err}");
    let err = one_line_error(&run(
        &out,
        &["--layer", "1", "--sae", relu.to_str().unwrap(), "--estimator", "top-k", "--k", "3"],
    ));
    assert!(err.contains("--sae with --estimator top-k"), "{err}");
    // An SAE whose hook is not on the residual stream.
    let odd = tmp.path().join("mlp-sae");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::copy(relu.join("sae_weights.safetensors"), odd.join("sae_weights.safetensors"))
        .unwrap();
    let cfg = std::fs::read_to_string(relu.join("cfg.json"))
        .unwrap()
        .replace("blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out");
    std::fs::write(odd.join("cfg.json"), cfg).unwrap();
    let err = one_line_error(&run(&out, &["--layer", "1", "--sae", odd.to_str().unwrap()]));
    assert!(err.contains("hook_mlp_out") && err.contains("residual"), "{err}");
    // A different width.
    let err = one_line_error(
        &bin()
            .args(["compute", "--model"])
            .arg(fixtures().join("gpt2-tiny-a"))
            .args(["--tokens", "1,2", "--layer", "1", "--sae", relu.to_str().unwrap(), "--output"])
            .arg(&out)
            .output()
            .unwrap(),
    );
    assert!(err.contains("48-dimensional") && err.contains("d is 32"), "{err}");
    let err = one_line_error(&run(&out, &["--layer", "1", "--sae", "/nonexistent/sae"]));
    assert!(err.contains("no such file"), "{err}");
    assert!(!out.exists());
}
