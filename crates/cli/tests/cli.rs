//! The `fisher-stein` binary, driven as a user would: results checked against the oracle
//! fixtures, models found through a fake HF cache, and bad input rejected with one line, exit
//! code 2, no panic and nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fisher-stein"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

mod common;

/// Read an f64 or f32 tensor, or an i64 tensor, from a safetensors file into f64.
fn read_tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f64>) {
    common::read_safetensors(path).remove(name).unwrap_or_else(|| panic!("no tensor {name}"))
}

fn ids_arg(path: &Path) -> String {
    let (_, ids) = read_tensor(&path.join("reference.safetensors"), "input_ids");
    ids.iter().map(|x| (*x as i64).to_string()).collect::<Vec<_>>().join(",")
}

fn assert_ok(out: &Output) {
    common::ok(out);
}

/// `compute` writes fisher.safetensors whose matrices equal the fixture's exact F.
#[test]
fn compute_matches_the_fixture() {
    let fx = fixture("gpt2-tiny-b");
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("run");
    let layer = 2;
    let out = bin()
        .args(["compute", "--model", fx.to_str().unwrap(), "--layer", &layer.to_string()])
        .args([
            "--tokens",
            &ids_arg(&fx),
            "--positions",
            "0,1,8,15",
            "--output",
            out_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().filter(|l| l.starts_with("seq")).count(), 4, "{stdout}");

    let (shape, f) = read_tensor(&out_dir.join("fisher.safetensors"), "fisher");
    assert_eq!(shape, vec![4, 48, 48]);
    let (_, pos) = read_tensor(&out_dir.join("fisher.safetensors"), "positions");
    assert_eq!(pos, vec![0.0, 1.0, 8.0, 15.0]);
    let (tshape, _) = read_tensor(&out_dir.join("fisher.safetensors"), "token_ids");
    assert_eq!(tshape, vec![1, 16]);
    let (rshape, reference) = read_tensor(&fx.join("reference.safetensors"), "fisher");
    let (p, d) = (rshape[1], rshape[2]);
    // The fixture holds every position 0..T: the run's i-th matrix is at position pos[i].
    assert_eq!(p, 16);
    for i in 0..pos.len() {
        let t = pos[i] as usize;
        let r = &reference[(layer * p + t) * d * d..(layer * p + t + 1) * d * d];
        let g = &f[i * d * d..(i + 1) * d * d];
        let num: f64 = g.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
        let den: f64 = r.iter().map(|b| b * b).sum::<f64>().sqrt();
        assert!(num / den <= 1e-4, "position {i}: relative error {}", num / den);
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["layers"][0], 2);
    assert_eq!(meta["estimator"]["name"], "exact");
    assert_eq!(meta["backend"], "candle");
    assert_eq!(meta["model"]["weights"][0]["sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn sampled_and_closed_form_estimators_run() {
    let fx = fixture("gpt2-tiny-a");
    let tmp = tempfile::tempdir().unwrap();
    for (est, extra) in
        [("sampled", vec!["--samples", "7", "--seed", "3"]), ("closed-form", vec![])]
    {
        let out_dir = tmp.path().join(est);
        let out = bin()
            .args([
                "compute",
                "--model",
                fx.to_str().unwrap(),
                "--layer",
                "1",
                "--tokens",
                "1,2,3,4",
            ])
            .args([
                "--estimator",
                est,
                "--positions",
                "all",
                "--output",
                out_dir.to_str().unwrap(),
                "-q",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert_ok(&out);
        let (shape, _) = read_tensor(&out_dir.join("fisher.safetensors"), "fisher");
        assert_eq!(shape, vec![4, 32, 32]);
        if est == "sampled" {
            let (s, _) = read_tensor(&out_dir.join("fisher.safetensors"), "sample_tokens");
            assert_eq!(s, vec![4, 7]);
        }
    }
}

/// A fake HF cache (`models--org--name/refs/main`, `snapshots/<hash>/…`) found through HF_HOME.
#[test]
fn loads_by_hub_id_from_a_fake_hf_cache() {
    let fx = fixture("gpt2-tiny-a");
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub").join("models--tiny-org--gpt2-tiny-a");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fx.join(f), snap.join(f)).unwrap();
    }
    let out_dir = home.path().join("out");
    let out = bin()
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .args(["compute", "--model", "tiny-org/gpt2-tiny-a", "--layer", "0", "--tokens", "5,6,7"])
        .args(["--output", out_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ok(&out);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["model"]["origin"]["kind"], "hf_cache");
    assert_eq!(meta["model"]["origin"]["commit"], commit);
}

/// Run a failing command: exit code 2, one line on stderr containing every `needle`, no panic,
/// and no output directory left behind.
fn expect_failure(args: &[&str], out_dir: &Path, needles: &[&str]) {
    let out = bin().args(args).args(["--output", out_dir.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "args {args:?}: stderr {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "args {args:?}: {stderr:?} lacks {n:?}");
    }
    assert!(!out_dir.exists(), "output directory written despite the error");
    let parent = out_dir.parent().unwrap();
    if parent.exists() {
        for e in std::fs::read_dir(parent).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp-"), "temporary directory left behind: {name}");
        }
    }
}

#[test]
fn bad_input_is_one_line_exit_2_and_writes_nothing() {
    let fx = fixture("gpt2-tiny-a");
    let fxs = fx.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    // Missing / unreadable model.
    expect_failure(
        &["compute", "--model", "/nonexistent/model", "--layer", "0", "--tokens", "1"],
        &out,
        &["/nonexistent/model"],
    );
    // Hub id not in the cache, offline: says how to fetch it (online, it would be downloaded:
    // tests/hub.rs).
    let empty_home = tempfile::tempdir().unwrap();
    let o = bin()
        .env("HF_HOME", empty_home.path())
        .env_remove("HF_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "compute",
            "--model",
            "nobody/nothing",
            "--layer",
            "0",
            "--tokens",
            "1",
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("nobody/nothing") && e.contains("download"), "{e}");
    // Layer out of range.
    expect_failure(
        &["compute", "--model", fxs, "--layer", "3", "--tokens", "1,2"],
        &out,
        &["layer 3", "0..=2"],
    );
    // Token id ≥ V.
    expect_failure(
        &["compute", "--model", fxs, "--layer", "0", "--tokens", "1,101"],
        &out,
        &["token id 101", "0..=100"],
    );
    // Longer than n_positions (32).
    let long: Vec<String> = (0..33).map(|i| (i % 100).to_string()).collect();
    expect_failure(
        &["compute", "--model", fxs, "--layer", "0", "--tokens", &long.join(",")],
        &out,
        &["33 tokens", "at most 32"],
    );
    // Position outside the sequence.
    expect_failure(
        &["compute", "--model", fxs, "--layer", "0", "--tokens", "1,2", "--positions", "5"],
        &out,
        &["position 5"],
    );
    // --text without a tokenizer in the model directory.
    expect_failure(
        &["compute", "--model", fxs, "--layer", "0", "--text", "hello"],
        &out,
        &["tokenizer"],
    );
    // --samples 0.
    expect_failure(
        &[
            "compute",
            "--model",
            fxs,
            "--layer",
            "0",
            "--tokens",
            "1,2",
            "--estimator",
            "sampled",
            "--samples",
            "0",
        ],
        &out,
        &["samples"],
    );

    // A config that does not match the weights: the tensor and the shapes are named.
    let bad = tmp.path().join("bad-shape");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(fx.join("model.safetensors"), bad.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(fx.join("config.json"))
        .unwrap()
        .replace("\"n_embd\": 32", "\"n_embd\": 64");
    std::fs::write(bad.join("config.json"), cfg).unwrap();
    expect_failure(
        &["compute", "--model", bad.to_str().unwrap(), "--layer", "0", "--tokens", "1"],
        &out,
        &["wte.weight", "64"],
    );
    // A config with more layers than the weights: the missing tensor is named.
    let missing = tmp.path().join("missing-tensor");
    std::fs::create_dir(&missing).unwrap();
    std::fs::copy(fx.join("model.safetensors"), missing.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(fx.join("config.json"))
        .unwrap()
        .replace("\"n_layer\": 2", "\"n_layer\": 3");
    std::fs::write(missing.join("config.json"), cfg).unwrap();
    expect_failure(
        &["compute", "--model", missing.to_str().unwrap(), "--layer", "0", "--tokens", "1"],
        &out,
        &["h.2."],
    );
    // A truncated (corrupt) weights file.
    let trunc = tmp.path().join("truncated");
    std::fs::create_dir(&trunc).unwrap();
    std::fs::copy(fx.join("config.json"), trunc.join("config.json")).unwrap();
    let w = std::fs::read(fx.join("model.safetensors")).unwrap();
    std::fs::write(trunc.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    expect_failure(
        &["compute", "--model", trunc.to_str().unwrap(), "--layer", "0", "--tokens", "1"],
        &out,
        &["model.safetensors"],
    );

    // A non-empty output directory without --force.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let o = bin()
        .args([
            "compute",
            "--model",
            fxs,
            "--layer",
            "0",
            "--tokens",
            "1",
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "x");
}

/// `compute --backend B` on a GPT-2 and a Llama fixture reproduces the oracle's exact F for every
/// engine compiled into this binary (the `backend` in metadata.json says which ran); an engine
/// that is not compiled in is a one-line error naming the Cargo feature.
#[test]
fn every_compiled_backend_reproduces_the_fixture_through_the_binary() {
    for (backend, compiled) in [
        ("candle", cfg!(feature = "candle")),
        ("burn", cfg!(feature = "burn")),
        ("dfdx", cfg!(feature = "dfdx")),
    ] {
        for name in ["gpt2-tiny-a", "llama-tiny-untied"] {
            let fx = fixture(name);
            let tmp = tempfile::tempdir().unwrap();
            let out_dir = tmp.path().join("run");
            let layer = 1;
            let args = [
                "compute",
                "--model",
                fx.to_str().unwrap(),
                "--layer",
                "1",
                "--backend",
                backend,
                "--tokens",
                &ids_arg(&fx),
                "--positions",
                "all",
            ];
            if !compiled {
                expect_failure(
                    &args,
                    &out_dir,
                    &["--backend", backend, &format!("--features {backend}")],
                );
                continue;
            }
            let llama_on_dfdx = backend == "dfdx" && name.starts_with("llama");
            if llama_on_dfdx {
                expect_failure(&args, &out_dir, &["dfdx implements GPT-2 only"]);
                continue;
            }
            let out = bin()
                .args(args)
                .args(["-q", "--output", out_dir.to_str().unwrap()])
                .output()
                .unwrap();
            assert_ok(&out);
            let meta: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out_dir.join("metadata.json")).unwrap())
                    .unwrap();
            assert_eq!(meta["backend"], backend);
            let (_, f) = read_tensor(&out_dir.join("fisher.safetensors"), "fisher");
            let (_, pos) = read_tensor(&out_dir.join("fisher.safetensors"), "positions");
            let (rshape, reference) = read_tensor(&fx.join("reference.safetensors"), "fisher");
            let (_, ref_pos) = read_tensor(&fx.join("reference.safetensors"), "positions");
            let (p, d) = (rshape[1], rshape[2]);
            for (i, t) in ref_pos.iter().enumerate() {
                let j = pos.iter().position(|x| x == t).expect("position computed");
                let r = &reference[(layer * p + i) * d * d..(layer * p + i + 1) * d * d];
                let g = &f[j * d * d..(j + 1) * d * d];
                let num: f64 = g.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
                let den: f64 = r.iter().map(|b| b * b).sum::<f64>().sqrt();
                assert!(
                    num / den <= 1e-4,
                    "{backend} {name} position {t}: relative error {}",
                    num / den
                );
            }
        }
    }
}

/// TransformerLens hook names select the same split layers as indices (`blocks.K.hook_resid_pre`
/// = K, `blocks.K.hook_resid_post` = K+1): bit-identical results files, the names recorded in
/// metadata.json next to the indices; a hook off the residual stream is refused on one line
/// listing what is accepted, before anything is written.
#[test]
fn transformerlens_hook_names_select_the_same_layers() {
    let fx = fixture("llama-tiny-untied");
    let tmp = tempfile::tempdir().unwrap();
    let run = |dir: &str, layer_args: &[&str]| {
        let out_dir = tmp.path().join(dir);
        let out = bin()
            .args(["compute", "--model", fx.to_str().unwrap()])
            .args(layer_args)
            .args(["--tokens", "3,1,4,1,5", "--positions", "all", "--output"])
            .arg(&out_dir)
            .output()
            .unwrap();
        (out_dir, out)
    };
    let (by_index, out) = run("index", &["--layers", "0,2,3"]);
    assert_ok(&out);
    let (by_hook, out) =
        run("hook", &["--layers", "hook_embed,blocks.1.hook_resid_post,blocks.2.hook_resid_post"]);
    assert_ok(&out);
    assert_eq!(
        std::fs::read(by_index.join("fisher.safetensors")).unwrap(),
        std::fs::read(by_hook.join("fisher.safetensors")).unwrap()
    );
    let meta = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("metadata.json")).unwrap()).unwrap()
    };
    let (mi, mh) = (meta(&by_index), meta(&by_hook));
    assert_eq!(mi["layers"], serde_json::json!([0, 2, 3]));
    assert_eq!(mh["layers"], serde_json::json!([0, 2, 3]));
    assert_eq!(
        mi["hooks"],
        serde_json::json!([
            "blocks.0.hook_resid_pre",
            "blocks.2.hook_resid_pre",
            "blocks.2.hook_resid_post"
        ])
    );
    assert_eq!(
        mh["hooks"],
        serde_json::json!(["hook_embed", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"])
    );
    // `--hook` is `--layer` under its TransformerLens name.
    let (single, out) = run("single", &["--hook", "blocks.2.hook_resid_pre"]);
    assert_ok(&out);
    assert_eq!(meta(&single)["layers"], serde_json::json!([2]));

    for (bad, expect) in [
        ("blocks.1.hook_attn_out", "hook_attn_out is not on the residual stream"),
        ("blocks.3.hook_resid_pre", "blocks 0..=2"),
        ("ln_final.hook_normalized", "blocks.K.hook_resid_pre"),
    ] {
        let (dir, out) = run("bad", &["--layer", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{bad}: {err}");
        assert!(err.contains(expect) && err.contains("hook_resid_post"), "{bad}: {err}");
        assert!(!dir.exists(), "{bad}: {} written", dir.display());
    }
}

/// `--positions -1` (negative = from the end) is a value, not an unknown flag.
#[test]
fn negative_positions_parse_as_values() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("neg");
    let run = bin()
        .args(["compute", "--model", fixture("gpt2-tiny-b").to_str().unwrap()])
        .args(["--layer", "1", "--tokens", "1,2,3,4", "--positions", "-2", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert_ok(&run);
    let (_, pos) = read_tensor(&out.join("fisher.safetensors"), "positions");
    assert_eq!(pos, vec![2.0]);
}

/// `--device` names a device this build cannot open: one line naming the Cargo feature to
/// rebuild with (this suite's build has every engine but no GPU feature), or the engine that
/// has the device; a misspelt device lists the accepted syntax. (Compiled for the builds it
/// describes: every engine, no GPU feature — what `.ci/run` builds.)
#[cfg(all(feature = "burn", feature = "dfdx", not(feature = "cuda"), not(feature = "wgpu")))]
#[test]
fn unavailable_devices_name_the_feature_to_build_with() {
    let fx = fixture("gpt2-tiny-a");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["compute", "--model", fx.to_str().unwrap(), "--layer", "0"];
        args.extend_from_slice(&["--tokens", "1,2"]);
        args.extend_from_slice(extra);
        expect_failure(&args, &out, needles);
    };
    run(&["--device", "cuda:0"], &["cuda:0", "rebuild fisher-stein with `--features cuda`"]);
    run(&["--device", "wgpu"], &["candle has no wgpu device", "--backend burn"]);
    run(
        &["--backend", "burn", "--device", "wgpu"],
        &["rebuild fisher-stein with `--features wgpu`"],
    );
    run(&["--backend", "burn", "--device", "cuda"], &["--features burn,cuda"]);
    run(&["--backend", "dfdx", "--device", "cuda:1"], &["--features dfdx,cuda"]);
    run(&["--backend", "dfdx", "--device", "wgpu"], &["wgpu"]);
    run(&["--device", "gpu"], &["cpu, cuda, cuda:N, wgpu or wgpu:N"]);
}

/// `bench` on the tiny random GPT-2, every row kind on candle: one table row per requested
/// estimator (plus the engine's GEMM row), each with a time and a positive, finite rate; the top-k
/// row names its operator applications. And a shape it does not know is one line
/// naming the shapes it does.
#[test]
fn bench_prints_one_timed_row_per_estimator() {
    let out = bin()
        .args(["bench", "--shape", "tiny", "--layer", "2", "--seq-len", "12", "--positions", "3"])
        .args(["--estimators", "exact,sampled,top-k,readout,gram,lower", "--k", "4"])
        .args(["--repeats", "1", "--backend", "candle"])
        .output()
        .unwrap();
    assert_ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with("| tiny | 2 |"))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    let labels: Vec<&str> = rows.iter().map(|r| r[5]).collect();
    assert_eq!(rows.len(), 6, "{text}");
    for (row, want) in
        rows.iter().zip(["exact", "sampled S=10", "top-4", "readout", "gram", "lower"])
    {
        assert!(row[5].starts_with(want), "{labels:?}");
        let seconds: f64 = row[7].trim_end_matches(" s").parse().unwrap();
        let rate: f64 = row[8].parse().unwrap();
        // The time is printed to the millisecond (0.000 s on this tiny model); the rate comes
        // from the unrounded time.
        assert!(seconds >= 0.0 && rate.is_finite() && rate > 0.0, "{row:?}");
    }
    assert!(labels[2].contains("applications"), "{labels:?}");
    assert!(text.contains("f32 GEMM (64×64)·(64×256)"), "{text}");
    let out = bin().args(["bench", "--shape", "gpt5"]).output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("gemma-3-270m") && err.contains("llama-3.1-8b"), "{err}");
}
