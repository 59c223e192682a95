//! The whole `fisher-stein` workflow, driven through the binary: every subcommand and estimator,
//! several layers in one run, text inputs through a real tokenizer, npz and safetensors read
//! back, `--resume` after a kill, the README's command as written, and the bad-input matrix.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fisher-stein"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

mod common;
use common::{ok, read_safetensors, Arrays};

/// Parse an uncompressed npz by hand (independent of the binary's own reader).
fn read_npz(path: &Path) -> Arrays {
    let b = std::fs::read(path).unwrap();
    let mut out = Arrays::new();
    let mut pos = 0;
    let u16_at = |p: usize| u16::from_le_bytes([b[p], b[p + 1]]) as usize;
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) as usize;
    while u32_at(pos) == 0x0403_4b50 {
        let size = u32_at(pos + 18);
        let (nl, el) = (u16_at(pos + 26), u16_at(pos + 28));
        let name = String::from_utf8(b[pos + 30..pos + 30 + nl].to_vec())
            .unwrap()
            .trim_end_matches(".npy")
            .to_string();
        let data = &b[pos + 30 + nl + el..pos + 30 + nl + el + size];
        assert_eq!(&data[..6], b"\x93NUMPY");
        let hl = u16::from_le_bytes([data[8], data[9]]) as usize;
        let header = std::str::from_utf8(&data[10..10 + hl]).unwrap();
        assert_eq!((10 + hl) % 64, 0, "NPY header not 64-byte aligned");
        let shape: Vec<usize> = header
            .split("'shape': (")
            .nth(1)
            .unwrap()
            .split(')')
            .next()
            .unwrap()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        let body = &data[10 + hl..];
        let v: Vec<f64> = if header.contains("<f4") {
            body.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        } else if header.contains("<f8") {
            body.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
        } else {
            body.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        };
        out.insert(name, (shape, v));
        pos += 30 + nl + el + size;
    }
    out
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den
}

/// A tiny GPT-2 with GPT-2's real 50257-token vocabulary and tokenizer (vendored in assets/),
/// random weights, unprefixed key names (as the original hub checkpoints have them).
fn model_with_tokenizer(dir: &Path, n_embd: usize) {
    use safetensors::tensor::{Dtype, TensorView};
    std::fs::create_dir_all(dir).unwrap();
    let (v, d, n_layer, n_pos) = (50257usize, n_embd, 1usize, 64usize);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = |scale: f32| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
    };
    let mut specs: Vec<(String, Vec<usize>, f32, f32)> = vec![
        ("wte.weight".into(), vec![v, d], 0.0, 0.5),
        ("wpe.weight".into(), vec![n_pos, d], 0.0, 0.1),
    ];
    for i in 0..n_layer {
        for (n, s, mean, sc) in [
            ("ln_1.weight", vec![d], 1.0, 0.2),
            ("ln_1.bias", vec![d], 0.0, 0.1),
            ("attn.c_attn.weight", vec![d, 3 * d], 0.0, 0.4),
            ("attn.c_attn.bias", vec![3 * d], 0.0, 0.1),
            ("attn.c_proj.weight", vec![d, d], 0.0, 0.3),
            ("attn.c_proj.bias", vec![d], 0.0, 0.1),
            ("ln_2.weight", vec![d], 1.0, 0.2),
            ("ln_2.bias", vec![d], 0.0, 0.1),
            ("mlp.c_fc.weight", vec![d, 4 * d], 0.0, 0.4),
            ("mlp.c_fc.bias", vec![4 * d], 0.0, 0.1),
            ("mlp.c_proj.weight", vec![4 * d, d], 0.0, 0.2),
            ("mlp.c_proj.bias", vec![d], 0.0, 0.1),
        ] {
            specs.push((format!("h.{i}.{n}"), s, mean, sc));
        }
    }
    specs.push(("ln_f.weight".into(), vec![d], 1.0, 0.2));
    specs.push(("ln_f.bias".into(), vec![d], 0.0, 0.1));
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .into_iter()
        .map(|(n, s, mean, sc)| {
            let count: usize = s.iter().product();
            let bytes = (0..count).flat_map(|_| (mean + rnd(sc)).to_le_bytes()).collect();
            (n, s, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": "gpt2", "vocab_size": v, "n_positions": n_pos, "n_embd": d, "n_layer": n_layer,
        "n_head": 2, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(repo().join("assets/gpt2-tokenizer").join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn several_layers_in_one_run_match_the_fixture_and_npz_matches_safetensors() {
    let fx = fixture("gpt2-tiny-b");
    let reference = read_safetensors(&fx.join("reference.safetensors"));
    let ids: Vec<String> =
        reference["input_ids"].1.iter().map(|x| (*x as i64).to_string()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for format in ["safetensors", "npz"] {
        let out = tmp.path().join(format);
        ok(&bin()
            .args([
                "compute",
                "--model",
                fx.to_str().unwrap(),
                "--layers",
                "0,3",
                "--tokens",
                &ids.join(","),
            ])
            .args([
                "--positions",
                "0,1,8,15",
                "--format",
                format,
                "--eig-top",
                "4",
                "-q",
                "--output",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap());
        outputs.push(out.join(format!("fisher.{format}")));
    }
    let st = read_safetensors(&outputs[0]);
    let npz = read_npz(&outputs[1]);
    for name in [
        "fisher",
        "layer",
        "positions",
        "sequence",
        "token_ids",
        "probs_entropy",
        "eigenvalues",
        "eigenvectors",
    ] {
        assert_eq!(st[name], npz[name], "{name} differs between safetensors and npz");
    }
    assert_eq!(st["fisher"].0, vec![8, 48, 48]);
    assert_eq!(st["layer"].1, vec![0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0]);
    assert_eq!(st["eigenvalues"].0, vec![8, 4]);
    assert_eq!(st["eigenvectors"].0, vec![8, 48, 4]);
    let (rs, rf) = &reference["fisher"];
    let (p, d) = (rs[1], rs[2]);
    // The fixture holds every position 0..T; the run analysed 0, 1, 8, 15 at each layer.
    for (n, layer) in [0usize, 0, 0, 0, 3, 3, 3, 3].iter().enumerate() {
        let i = [0, 1, 8, 15][n % 4];
        let want = &rf[(layer * p + i) * d * d..(layer * p + i + 1) * d * d];
        let got = &st["fisher"].1[n * d * d..(n + 1) * d * d];
        assert!(rel_err(got, want) <= 1e-4, "layer {layer} position {i}: {}", rel_err(got, want));
    }
}

#[test]
fn every_estimator_runs_and_predictive_records_its_draws() {
    let fx = fixture("gpt2-tiny-a");
    let tmp = tempfile::tempdir().unwrap();
    let mut results = std::collections::HashMap::new();
    for est in ["exact", "sampled", "closed-form", "predictive"] {
        let out = tmp.path().join(est);
        ok(&bin()
            .args([
                "compute",
                "--model",
                fx.to_str().unwrap(),
                "--layer",
                "1",
                "--tokens",
                "3,14,15,92,65",
            ])
            .args([
                "--positions",
                "1..3",
                "--estimator",
                est,
                "--samples",
                "6",
                "--seed",
                "7",
                "-q",
            ])
            .args(["--output", out.to_str().unwrap()])
            .output()
            .unwrap());
        let r = read_safetensors(&out.join("fisher.safetensors"));
        assert_eq!(r["fisher"].0, vec![3, 32, 32], "{est}");
        if est == "sampled" || est == "predictive" {
            assert_eq!(r["sample_tokens"].0, vec![3, 6], "{est}");
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metadata.json")).unwrap()).unwrap();
        assert_eq!(meta["estimator"]["name"], est);
        results.insert(est, r);
    }
    assert!(rel_err(&results["closed-form"]["fisher"].1, &results["exact"]["fisher"].1) < 1e-5);
    // The predictive average is a different quantity (F at t+1 over sampled continuations).
    assert!(rel_err(&results["predictive"]["fisher"].1, &results["exact"]["fisher"].1) > 1e-3);
}

#[test]
fn text_input_file_inspect_and_info() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("gpt2-vocab");
    model_with_tokenizer(&model, 16);
    let docs = tmp.path().join("docs.jsonl");
    std::fs::write(&docs, "{\"text\": \"Hello world, the quick brown fox\"}\n{\"text\": \"The capital of France is\"}\n").unwrap();
    let out = tmp.path().join("run");
    let stdout = ok(&bin()
        .args([
            "compute",
            "--model",
            model.to_str().unwrap(),
            "--layer",
            "1",
            "--input",
            docs.to_str().unwrap(),
        ])
        .args([
            "--positions",
            "all",
            "--position-skip",
            "2",
            "--max-positions",
            "2",
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap());
    assert_eq!(stdout.lines().filter(|l| l.starts_with("seq")).count(), 4, "{stdout}");
    let first = read_safetensors(&out.join("fisher_seq_000000.safetensors"));
    assert_eq!(first["token_ids"].1, vec![15496.0, 995.0, 11.0, 262.0, 2068.0, 7586.0, 21831.0]);
    assert_eq!(
        first["positions"].1,
        vec![1.0, 3.0],
        "--position-skip 2 keeps positions 1, 3, 5; --max-positions 2 the first two"
    );
    assert!(out.join("fisher_seq_000001.safetensors").exists());

    let report =
        ok(&bin().args(["inspect", out.to_str().unwrap(), "--top-k", "2"]).output().unwrap());
    assert_eq!(report.matches("+v pushes up").count(), 8, "{report}");
    assert!(report.contains("effective rank") && report.contains("entropy"), "{report}");
    // Tokens are decoded through the tokenizer (quoted strings, not #ids).
    assert!(
        report.lines().filter(|l| l.contains("pushes up")).all(|l| l.contains('"')),
        "{report}"
    );

    let info = ok(&bin().args(["info", model.to_str().unwrap()]).output().unwrap());
    let params = 50257 * 16
        + 64 * 16
        + (4 * 16 + 16 * 48 + 48 + 16 * 16 + 16 + 16 * 64 + 64 + 64 * 16 + 16)
        + 2 * 16;
    assert!(info.contains(&format!("parameters    {params} ")), "{info}");
    assert!(info.contains("vocab         50257") && info.contains("byte-level BPE"), "{info}");
}

/// Every file of a results directory except the hidden per-sequence state and lock, by name.
fn result_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// metadata.json without what records the run's history rather than its results (timings, how
/// many sequences a resumed run skipped).
fn metadata_results(dir: &Path) -> serde_json::Value {
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("metadata.json")).unwrap()).unwrap();
    let m = meta.as_object_mut().unwrap();
    m.remove("timings_s");
    m.remove("resumed_sequences_skipped");
    meta
}

/// Spawn `cmd` with `-v` and its stderr piped; return the child and an iterator over the lines
/// it logs (the test synchronises on these events, never on the clock).
fn spawn_logged(
    mut cmd: Command,
) -> (std::process::Child, std::io::Lines<std::io::BufReader<std::process::ChildStderr>>) {
    use std::io::BufRead;
    let mut child = cmd.arg("-v").stderr(std::process::Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    (child, std::io::BufReader::new(stderr).lines())
}

/// SIGKILL at several moments of a run, each run after the first continuing with `--resume` and
/// killed again: the final per-sequence results, the mean accumulator and run.json equal an
/// uninterrupted run's byte for byte, and metadata.json equals it except for timings and the
/// resume count. The kill moments are events, not times: right after the run logs that it wrote
/// its `k`-th results file (so the kill lands while it writes that sequence's state file or the
/// accumulator's checkpoint, or computes the next sequence), with `k` drawn from a seeded stream
/// (`FS_KILL_SEED` to change it; the seed and every `k` are printed).
#[test]
fn resume_after_kills_at_logged_events_gives_identical_results() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    model_with_tokenizer(&model, 32);
    let docs = tmp.path().join("docs.txt");
    let lines: Vec<String> = (0..24)
        .map(|i| {
            format!("Document number {i} says the quick brown fox jumps over the lazy dog again")
        })
        .collect();
    std::fs::write(&docs, lines.join("\n")).unwrap();
    let args = |out: &Path| -> Vec<String> {
        let m = model.to_str().unwrap();
        let d = docs.to_str().unwrap();
        let o = out.to_str().unwrap();
        let a = ["compute", "--model", m, "--layers", "0,1", "--input", d, "--positions", "all"];
        a.iter()
            .chain(&["--mean", "--checkpoint-secs", "0", "--eig-top", "3", "-q", "--output", o])
            .map(|s| s.to_string())
            .collect()
    };
    let full = tmp.path().join("full");
    ok(&bin().args(args(&full)).output().unwrap());

    let seed: u64 = std::env::var("FS_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(29);
    println!("kill seed {seed} (FS_KILL_SEED={seed} replays it)");
    let mut state = seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let killed = tmp.path().join("killed");
    // A chain of 4 runs, each but the first a --resume of the one before, each killed right
    // after it logs its k-th written results file, k in 1..=4 (24 documents: the chain writes at
    // most 16, so every kill lands before the run could finish).
    for kill in 1..=4 {
        let mut cmd = bin();
        cmd.args(args(&killed));
        if kill > 1 {
            cmd.arg("--resume");
        }
        let (mut child, lines) = spawn_logged(cmd);
        let k = 1 + ((next() >> 32) % 4) as usize;
        let mut written = 0;
        for line in lines {
            let line = line.unwrap();
            if line.contains(": wrote fisher_seq_") {
                written += 1;
                if written == k {
                    break;
                }
            }
        }
        assert_eq!(written, k, "run {kill} ended before writing {k} results files (seed {seed})");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        println!("run {kill}: SIGKILL right after its results file number {k}");
        // Only complete files are ever visible: every results file in the directory parses.
        for name in result_files(&killed) {
            if name.ends_with(".safetensors") {
                read_safetensors(&killed.join(name));
            }
        }
    }
    // Without --resume (or --force) a started directory is refused; with it the run completes.
    if killed.join("run.json").exists() {
        let refused = bin().args(args(&killed)).output().unwrap();
        assert_eq!(refused.status.code(), Some(2));
    }
    ok(&bin().args(args(&killed)).arg("--resume").output().unwrap());
    assert_eq!(result_files(&full), result_files(&killed));
    for name in result_files(&full) {
        if name == "metadata.json" {
            continue;
        }
        assert!(
            std::fs::read(full.join(&name)).unwrap() == std::fs::read(killed.join(&name)).unwrap(),
            "{name} differs after kills and --resume (seed {seed})"
        );
    }
    assert_eq!(metadata_results(&full), metadata_results(&killed), "metadata.json (seed {seed})");
    // No temporaries, no lock left behind.
    for e in std::fs::read_dir(tmp.path()).unwrap().chain(std::fs::read_dir(&killed).unwrap()) {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp-"), "temporary {name} left behind");
    }
    // --resume with different settings is refused.
    let other = bin()
        .args(args(&killed))
        .args(["--resume", "--seed", "1", "--estimator", "sampled"])
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&other.stderr).contains("different settings"));
}

/// Two runs pointed at the same output directory: the second is refused at once (one line,
/// exit 2, naming the first run's pid) whether it asks for --resume, --force or neither, and
/// the first run's results are untouched; once the first run is gone (even killed), its lock
/// is free.
#[test]
fn a_second_run_on_the_same_output_is_refused_by_the_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    model_with_tokenizer(&model, 32);
    let docs = tmp.path().join("docs.txt");
    let lines: Vec<String> =
        (0..200).map(|i| format!("Document {i}: the quick brown fox jumps over the dog")).collect();
    std::fs::write(&docs, lines.join("\n")).unwrap();
    let out = tmp.path().join("out");
    let args: Vec<String> = [
        "compute",
        "--model",
        model.to_str().unwrap(),
        "--layer",
        "1",
        "--input",
        docs.to_str().unwrap(),
        "--positions",
        "all",
        "-q",
        "--output",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut first, mut lines) = spawn_logged({
        let mut c = bin();
        c.args(&args);
        c
    });
    // Wait for the event "first results file written", then stop the first run (SIGSTOP: it
    // keeps its lock and cannot finish while the second runs are tried, however slow they are).
    let wrote = lines.by_ref().map(|l| l.unwrap()).find(|l| l.contains(": wrote fisher_seq_"));
    assert!(wrote.is_some(), "the first run ended before writing a results file");
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(first.id() as libc::pid_t, libc::SIGSTOP) }, 0);
    let before = std::fs::read(out.join("fisher_seq_000000.safetensors")).unwrap();
    for extra in [&[][..], &["--resume"][..], &["--force"][..]] {
        let second = bin().args(&args).args(extra).output().unwrap();
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert_eq!(second.status.code(), Some(2), "{extra:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("in use by another fisher-stein run")
                && stderr.contains(&format!("pid {}", first.id())),
            "{extra:?}: {stderr}"
        );
    }
    assert!(first.try_wait().unwrap().is_none(), "the first run was disturbed");
    assert_eq!(std::fs::read(out.join("fisher_seq_000000.safetensors")).unwrap(), before);
    first.kill().unwrap(); // SIGKILL ends a stopped process too
    first.wait().unwrap();
    drop(lines);
    // The killed run's lock died with it: --resume takes it — the event is its log line that the
    // model resolved, which comes after the lock (and it is killed in turn here, to keep the test
    // short; resuming to the end is the test above).
    let (mut resumed, lines) = spawn_logged({
        let mut c = bin();
        c.args(&args).arg("--resume");
        c
    });
    let log: Vec<String> =
        lines.map(|l| l.unwrap()).take_while(|l| !l.contains("resolved")).collect();
    assert!(
        resumed.try_wait().unwrap().is_none(),
        "--resume after a kill did not take the lock: {log:?}"
    );
    resumed.kill().unwrap();
    resumed.wait().unwrap();
}

/// SIGTERM (a scheduler's preemption or `scancel`) ends `compute --mean-only` between documents
/// with the accumulator checkpointed and a one-line error naming `--resume`; `--resume` then
/// skips the finished documents and ends with the same mean, byte for byte, as an
/// uninterrupted run. The signal lands at a known point: `FISHER_STEIN_STOP_AFTER_SEQUENCE`
/// makes the run hold after document 3 until the SIGTERM, which the test sends once it said so.
#[test]
fn sigterm_checkpoints_between_documents_and_resume_finishes_the_same_mean() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    common::model_with_word_tokenizer(&model);
    let docs = tmp.path().join("docs.txt");
    let lines: Vec<String> =
        (0..12).map(|i| format!("w{i} w{} w{} w7 w9", i + 20, i * 3)).collect();
    std::fs::write(&docs, lines.join("\n")).unwrap();
    let args = |out: &Path| -> Vec<String> {
        let (m, d, o) = (model.to_str().unwrap(), docs.to_str().unwrap(), out.to_str().unwrap());
        ["compute", "--model", m, "--input", d, "--layers", "1,2", "--positions", "all"]
            .iter()
            .chain(&["--mean-only", "--output", o])
            .map(|s| s.to_string())
            .collect()
    };
    let full = tmp.path().join("full");
    ok(&bin().arg("-q").args(args(&full)).output().unwrap());

    let out = tmp.path().join("stopped");
    let (mut child, lines) = spawn_logged({
        let mut c = bin();
        c.args(args(&out)).env("FISHER_STEIN_STOP_AFTER_SEQUENCE", "3");
        c
    });
    let mut lines = lines.map(|l| l.unwrap());
    let said: Vec<String> =
        lines.by_ref().take_while(|l| !l.contains("holding for SIGTERM")).collect();
    assert!(child.try_wait().unwrap().is_none(), "the run ended instead of holding: {said:?}");
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let rest: Vec<String> = lines.collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{rest:?}");
    let error = rest.last().expect("an error line");
    assert!(
        error.starts_with("error: stopped by SIGTERM before sequence 4:")
            && error.contains("mean accumulator")
            && error.contains("--resume"),
        "{rest:?}"
    );
    assert!(!out.join("metadata.json").exists(), "an interrupted run wrote metadata.json");
    let checkpoint = read_safetensors(&out.join("mean.safetensors"));
    assert_eq!(checkpoint["sequences"].1, [0.0, 1.0, 2.0, 3.0], "documents in the checkpoint");

    let resumed = bin().arg("-v").args(args(&out)).arg("--resume").output().unwrap();
    ok(&resumed);
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert_eq!(log.matches("skipped (--resume)").count(), 4, "{log}");
    assert_eq!(
        std::fs::read(full.join("mean.safetensors")).unwrap(),
        std::fs::read(out.join("mean.safetensors")).unwrap(),
        "the resumed mean differs from the uninterrupted one"
    );
}

/// The README's main command, as written, run by bash, with `cargo run --release -p fisher-stein
/// --` and `target/release/fisher-stein` replaced by the binary under test. It fetches the real
/// SmolLM2 GGUF through tools/fetch_smollm2.sh (fails loudly if the registry is unreachable).
#[test]
fn readme_main_command_runs_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("cargo run --release -p fisher-stein -- compute"))
        .expect("README has the main command");
    let tmp = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_fisher-stein");
    let command = line
        .replace("cargo run --release -p fisher-stein --", "@BIN@")
        .replace("target/release/fisher-stein", "@BIN@")
        .replace("@BIN@", binary)
        .replace("/tmp/fisher-demo", tmp.path().join("demo").to_str().unwrap());
    let out = Command::new("bash").arg("-c").arg(&command).current_dir(repo()).output().unwrap();
    let stdout = ok(&out);
    assert!(stdout.contains("eff. rank") && stdout.contains("+v pushes up"), "{stdout}");
    assert!(stdout.contains("\" Paris\""), "the top direction should move \" Paris\": {stdout}");
    // The output the README shows for it is what the binary prints (lines elided with `…`).
    let shown = block_after(&readme, "The main job's output", "```text");
    assert_lines_printed(
        &shown,
        &printed(&out, &tmp.path().join("demo")),
        "the README's main-command output",
    );
    assert!(tmp.path().join("demo/fisher.safetensors").exists());
    const TEST_COMMAND: &str =
        "cargo test --locked --features fisher-stein/all-backends && tools/test_python.sh";
    assert!(readme.contains(&format!("```sh\n{TEST_COMMAND}\n```")), "README test command");
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == TEST_COMMAND),
        ".ci/run must run the README's test command"
    );
}

/// The lines of the first code block opened by `fence` after the line starting with `marker`.
fn block_after(text: &str, marker: &str, fence: &str) -> Vec<String> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(marker));
    assert!(lines.next().is_some(), "README has {marker:?}");
    lines
        .skip_while(|l| *l != fence)
        .skip(1)
        .take_while(|l| *l != "```")
        .map(str::to_string)
        .collect()
}

/// Every line of `shown` (but `…` elisions and blank lines) is a line the command printed
/// (stdout or stderr). The digits of `inspect`'s KL check (`KL(p‖p(h+εv)) … (ratio …, ε …)`, a
/// finite f32 perturbation) differ between the release build the README quotes and the test
/// build, so that segment is compared by presence only. Every other character must match,
/// except that a number may differ by one unit in its last printed digit: the f32 GEMM kernels
/// differ between CPUs (AVX2 vs AVX-512 sum in different orders), which moves a trace printed
/// to five digits across a rounding boundary (seen: `7.3735e-2` vs `7.3736e-2`).
fn assert_lines_printed(shown: &[String], printed: &str, what: &str) {
    fn key(line: &str) -> (&str, bool) {
        let line = line.trim_end();
        match line.find("  KL(p‖p(h+εv))") {
            Some(i) => (&line[..i], true),
            None => (line, false),
        }
    }
    let same = |a: &str, b: &str| {
        let ((a, ka), (b, kb)) = (key(a), key(b));
        ka == kb && same_up_to_last_digits(a, b)
    };
    assert!(!shown.is_empty(), "{what}: empty block");
    for line in shown.iter().map(|l| l.trim_end()).filter(|l| !l.is_empty() && *l != "…") {
        assert!(
            printed.lines().any(|o| same(o, line)),
            "{what}: the README shows a line the binary does not print:\n{line}\n--- printed:\n{printed}"
        );
    }
}

/// `a` and `b` are the same text, but for decimals that differ by at most one unit in the last
/// printed digit (same digit count, same exponent); integers must be equal.
fn same_up_to_last_digits(a: &str, b: &str) -> bool {
    /// Split into runs of number characters and the rest.
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let is_num = |c: char| c.is_ascii_digit() || c == '.';
        let mut kind = None;
        for (i, c) in s.char_indices() {
            let k = is_num(c);
            if kind.is_some_and(|kd| kd != k) {
                out.push((kind.unwrap(), &s[start..i]));
                start = i;
            }
            kind = Some(k);
        }
        if let Some(k) = kind {
            out.push((k, &s[start..]));
        }
        out
    }
    let (ra, rb) = (runs(a), runs(b));
    ra.len() == rb.len()
        && ra.iter().zip(&rb).all(|(&(na, x), &(nb, y))| {
            if x == y {
                return true;
            }
            // Integers (token ids, positions, counts) must match exactly; a decimal may be one
            // unit off in its last digit.
            if !(na && nb) || x.len() != y.len() || x.matches('.').count() != 1 {
                return false;
            }
            // Same length and layout: compare as integers of their digits.
            let digits = |s: &str| s.replace('.', "").parse::<i64>().ok();
            x.find('.') == y.find('.')
                && matches!((digits(x), digits(y)), (Some(p), Some(q)) if (p - q).abs() <= 1)
        })
}

/// What a command printed, stdout then stderr, with the temporary output directory written as
/// the README writes it.
fn printed(out: &Output, tmp_out: &Path) -> String {
    let text = format!("{}\n{}", ok(out), String::from_utf8_lossy(&out.stderr));
    text.replace(tmp_out.to_str().unwrap(), "/tmp/fisher-demo")
}

/// The README's worked example on a repository fixture (`$ fisher-stein …` lines and the
/// output under each) is what the binary prints: every command runs as written (the output
/// directory moved to a temporary one) and every shown output line is printed by it.
#[test]
fn readme_worked_example_is_what_the_binary_prints() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let block = block_after(&readme, "### Worked example on a repository fixture", "```console");
    let tmp = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_fisher-stein");
    let mut runs: Vec<(String, Vec<String>)> = Vec::new();
    for line in block {
        match line.strip_prefix("$ ") {
            Some(cmd) => runs.push((cmd.to_string(), Vec::new())),
            None => runs.last_mut().expect("the block starts with a command").1.push(line),
        }
    }
    assert!(runs.len() >= 3, "compute, inspect and info");
    for (cmd, shown) in runs {
        let command = cmd
            .replacen("fisher-stein", binary, 1)
            .replace("/tmp/fisher-demo", tmp.path().join("demo").to_str().unwrap());
        let out =
            Command::new("bash").arg("-c").arg(&command).current_dir(repo()).output().unwrap();
        assert_lines_printed(&shown, &printed(&out, &tmp.path().join("demo")), &cmd);
    }
}

/// Copy a safetensors checkpoint directory, letting `edit` change any f32 tensor's values.
fn edited_checkpoint(src: &Path, dst: &Path, edit: impl Fn(&str, &mut Vec<f32>)) {
    use safetensors::tensor::{Dtype, TensorView};
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), Dtype::F32);
            let mut v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            edit(&name, &mut v);
            (name, t.shape().to_vec(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
}

/// The bad-input matrix: files, configs, layers, texts, flags and numbers a user can get wrong.
/// Every row must end with exit code 2 and one line on stderr that contains the row's words,
/// never a panic, and leave no output directory. The table (row, exit code, message) is printed
/// for the issue tracker: `cargo test -p fisher-stein --test workflows bad_input_matrix --
/// --nocapture`.
#[test]
fn bad_input_matrix() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let model = tmp.path().join("m");
    model_with_tokenizer(&model, 8);
    let fx_path = fixture("gpt2-tiny-a");
    let fx = fx_path.to_str().unwrap().to_string();
    // Files.
    let with_config = |name: &str, config: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(fx_path.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
    };
    let cfg = std::fs::read_to_string(fx_path.join("config.json")).unwrap();
    with_config("cfg-not-json", "{\"model_type\": \"gpt2\", \"n_embd\": ");
    with_config("cfg-no-field", &cfg.replace("\"n_embd\": 32,", ""));
    with_config("cfg-heads", &cfg.replace("\"n_head\": 2", "\"n_head\": 5"));
    with_config("cfg-shape", &cfg.replace("\"n_embd\": 32", "\"n_embd\": 64"));
    with_config("cfg-arch", &cfg.replace("\"model_type\": \"gpt2\"", "\"model_type\": \"mamba\""));
    let weights = std::fs::read(fx_path.join("model.safetensors")).unwrap();
    let with_weights = |name: &str, bytes: &[u8]| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("config.json"), &cfg).unwrap();
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    };
    with_weights("st-truncated", &weights[..weights.len() / 2]);
    let mut huge = (1u64 << 60).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    with_weights("st-huge-header", &huge);
    let mut garbage = 16u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"{\"a\": [1, 2, 3]}");
    with_weights("st-garbage-header", &garbage);
    with_weights("st-empty", b"");
    edited_checkpoint(&fx_path, &tmp.path().join("st-nan"), |name, v| {
        if name.ends_with("h.1.mlp.c_fc.weight") {
            v[7] = f32::NAN;
        }
    });
    let bad_tok = tmp.path().join("bad-tokenizer");
    model_with_tokenizer(&bad_tok, 8);
    std::fs::write(bad_tok.join("vocab.json"), "[this is not a vocabulary").unwrap();
    std::fs::write(tmp.path().join("broken.gguf"), b"GGUF\x03\x00").unwrap();
    std::fs::write(tmp.path().join("magic.gguf"), b"NOPE\x03\x00\x00\x00 not a gguf file at all")
        .unwrap();
    let mut lying = b"GGUF".to_vec();
    lying.extend_from_slice(&3u32.to_le_bytes());
    lying.extend_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    lying.extend_from_slice(&u64::MAX.to_le_bytes()); // metadata count
    std::fs::write(tmp.path().join("lying.gguf"), &lying).unwrap();
    let corrupt = tmp.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::write(corrupt.join("fisher.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
        .unwrap();
    std::fs::create_dir(tmp.path().join("empty-dir")).unwrap();
    let junk = tmp.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("notes.txt"), "mine").unwrap();
    std::fs::write(tmp.path().join("a-file"), "not a directory").unwrap();
    // Texts.
    std::fs::write(
        tmp.path().join("bad.jsonl"),
        "{\"text\": \"fine\"}\n{\"content\": \"no text field\"}\n",
    )
    .unwrap();
    std::fs::write(tmp.path().join("empty.txt"), "").unwrap();
    std::fs::write(tmp.path().join("binary.txt"), b"caf\xe9 \xff\xfe\n").unwrap();
    std::fs::write(tmp.path().join("two.txt"), "first document\nsecond document\n").unwrap();
    let long_text = "word ".repeat(100);
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap().to_string();

    // (what is wrong, the command: split on spaces, placeholders {o} output, {m} GPT-2 with
    // tokenizer, {fx} fixture, {t:NAME} a file made above, {long} a long text; words the one-line
    // message must contain)
    #[rustfmt::skip]
    let table: &[(&str, &str, &[&str])] = &[
        // Files.
        ("model path does not exist", "compute --model /no/such/model --layer 0 --tokens 1 --output {o}", &["/no/such/model"]),
        ("config.json is not JSON", "compute --model {t:cfg-not-json} --layer 0 --tokens 1 --output {o}", &["config.json"]),
        ("config.json lacks n_embd", "compute --model {t:cfg-no-field} --layer 0 --tokens 1 --output {o}", &["config.json", "n_embd"]),
        ("n_embd not divisible by n_head", "compute --model {t:cfg-heads} --layer 0 --tokens 1 --output {o}", &["n_head"]),
        ("config does not match the weights", "compute --model {t:cfg-shape} --layer 0 --tokens 1 --output {o}", &["wte.weight", "64"]),
        ("unsupported architecture", "compute --model {t:cfg-arch} --layer 0 --tokens 1 --output {o}", &["mamba"]),
        ("weights file truncated", "compute --model {t:st-truncated} --layer 0 --tokens 1 --output {o}", &["model.safetensors"]),
        ("safetensors header claims 2^60 bytes", "compute --model {t:st-huge-header} --layer 0 --tokens 1 --output {o}", &["model.safetensors"]),
        ("safetensors header is not a tensor table", "compute --model {t:st-garbage-header} --layer 0 --tokens 1 --output {o}", &["model.safetensors"]),
        ("weights file empty", "compute --model {t:st-empty} --layer 0 --tokens 1 --output {o}", &["model.safetensors"]),
        ("NaN in a weight", "compute --model {t:st-nan} --layer 0 --tokens 1 --output {o}", &["h.1.mlp.c_fc.weight", "NaN"]),
        ("tokenizer vocab.json corrupt", "compute --model {t:bad-tokenizer} --layer 0 --text hello --output {o}", &["vocab.json"]),
        ("GGUF header truncated", "compute --model {t:broken.gguf} --layer 0 --text hi --output {o}", &["broken.gguf", "GGUF"]),
        ("GGUF magic wrong", "compute --model {t:magic.gguf} --layer 0 --text hi --output {o}", &["magic.gguf", "GGUF"]),
        ("GGUF header lies about its counts", "compute --model {t:lying.gguf} --layer 0 --text hi --output {o}", &["lying.gguf", "GGUF"]),
        ("info on a broken GGUF", "info {t:broken.gguf}", &["broken.gguf", "GGUF"]),
        ("info on a missing model", "info /no/such/model", &["/no/such/model"]),
        ("inspect a corrupt results file", "inspect {t:corrupt}", &["fisher.safetensors", "not a valid results file"]),
        ("inspect a missing directory", "inspect /no/such/dir", &["/no/such/dir"]),
        ("inspect a directory without results", "inspect {t:empty-dir}", &["holds no fisher"]),
        ("merge directories without accumulators", "merge {t:empty-dir} {t:junk} --output {o}", &["mean.safetensors"]),
        ("report on a missing directory", "report /no/such/dir --output {o}", &["/no/such/dir"]),
        // Layers and positions.
        ("layer beyond the model", "compute --model {fx} --layer 9 --tokens 1 --output {o}", &["layer 9", "0..=2"]),
        ("--layers not a number", "compute --model {fx} --layers 0,x --tokens 1 --output {o}", &["not a layer index", "\"x\"", "hook_resid_pre"]),
        ("position beyond the sequence", "compute --model {fx} --layer 0 --tokens 1,2 --positions 7 --output {o}", &["position 7"]),
        ("--positions unparsable", "compute --model {fx} --layer 0 --tokens 1,2 --positions 3..a --output {o}", &["3..a"]),
        ("--position-skip 0", "compute --model {fx} --layer 0 --tokens 1,2 --position-skip 0 --output {o}", &["--position-skip 0"]),
        ("--max-positions 0", "compute --model {fx} --layer 0 --tokens 1,2 --max-positions 0 --output {o}", &["--max-positions 0"]),
        // Texts and tokens.
        ("--text empty", "compute --model {m} --layer 0 --text  --output {o}", &["--text is empty"]),
        ("--text longer than the context", "compute --model {m} --layer 0 --text {long} --output {o}", &["101 tokens", "at most 64", "--max-seq-len"]),
        ("--text without a tokenizer", "compute --model {fx} --layer 0 --text hello --output {o}", &["tokenizer"]),
        ("token id outside the vocabulary", "compute --model {fx} --layer 0 --tokens 1,101 --output {o}", &["token id 101", "0..=100"]),
        ("--tokens not numbers", "compute --model {fx} --layer 0 --tokens 1,x --output {o}", &["--tokens", "x"]),
        ("--input missing", "compute --model {m} --layer 0 --input /no/such/input.txt --output {o}", &["/no/such/input.txt"]),
        ("--input empty", "compute --model {m} --layer 0 --input {t:empty.txt} --output {o}", &["empty.txt"]),
        ("--input not UTF-8", "compute --model {m} --layer 0 --input {t:binary.txt} --output {o}", &["binary.txt", "UTF-8"]),
        ("--input JSONL line without text", "compute --model {m} --layer 0 --input {t:bad.jsonl} --output {o}", &["line 2", "\"text\""]),
        ("--start-sequence past the input", "compute --model {m} --layer 0 --input {t:two.txt} --start-sequence 5 --output {o}", &["--start-sequence 5", "2"]),
        ("--max-seq-len 0", "compute --model {m} --layer 0 --text hi --max-seq-len 0 --output {o}", &["--max-seq-len 0"]),
        // Estimator flags and numbers.
        ("unknown estimator", "compute --model {fx} --layer 0 --tokens 1 --estimator magic --output {o}", &["magic", "exact"]),
        ("--samples 0", "compute --model {fx} --layer 0 --tokens 1 --estimator sampled --samples 0 --output {o}", &["--samples 0"]),
        ("--top-p above 1", "compute --model {fx} --layer 0 --tokens 1 --estimator predictive --top-p 1.5 --output {o}", &["top_p", "(0, 1]"]),
        ("--top-p 0", "compute --model {fx} --layer 0 --tokens 1 --estimator sampled --top-p 0 --output {o}", &["top_p", "(0, 1]"]),
        ("--temperature 0", "compute --model {fx} --layer 0 --tokens 1 --estimator sampled --temperature 0 --output {o}", &["temperature"]),
        ("--temperature NaN", "compute --model {fx} --layer 0 --tokens 1 --estimator sampled --temperature NaN --output {o}", &["temperature"]),
        ("--eig-top 0", "compute --model {fx} --layer 0 --tokens 1 --eig-top 0 --output {o}", &["--eig-top 0"]),
        ("--batch-size 0", "compute --model {fx} --layer 0 --tokens 1 --batch-size 0 --output {o}", &["--batch-size 0"]),
        ("--checkpoint-secs negative", "compute --model {fx} --layer 0 --tokens 1 --mean --checkpoint-secs=-1 --output {o}", &["--checkpoint-secs"]),
        ("--shard index past N", "compute --model {fx} --layer 0 --tokens 1 --mean --shard 3/2 --output {o}", &["3/2"]),
        ("--device cuda in a CPU build", "compute --model {fx} --layer 0 --tokens 1 --device cuda:0 --output {o}", &["cuda"]),
        // Output directory.
        ("--output is a file", "compute --model {fx} --layer 0 --tokens 1 --output {t:a-file}", &["not a directory"]),
        ("--resume on a foreign directory", "compute --model {fx} --layer 0 --tokens 1 --resume --output {t:junk}", &["run.json"]),
        ("--output not empty, no --resume/--force", "compute --model {fx} --layer 0 --tokens 1 --output {t:junk}", &["--resume", "--force"]),
        ("--output not writable", "compute --model {fx} --layer 0 --tokens 1 --output /proc/fisher-out", &["/proc"]),
    ];
    assert!(table.len() >= 30);
    println!("| # | what is wrong | exit | message |\n|---|---|---|---|");
    for (row, (what, cmd, needles)) in table.iter().enumerate() {
        let args: Vec<String> = cmd
            .split(' ')
            .map(|a| match a {
                "{o}" => o.clone(),
                "{m}" => m(&model),
                "{fx}" => fx.clone(),
                "{long}" => long_text.clone(),
                a => match a.strip_prefix("{t:").and_then(|n| n.strip_suffix('}')) {
                    Some(name) => t(name),
                    None => a.to_string(),
                },
            })
            .collect();
        let r = bin().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&r.stderr);
        println!("| {} | {what} | {:?} | `{}` |", row + 1, r.status.code(), stderr.trim_end());
        assert_eq!(r.status.code(), Some(2), "{what}: {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: not one line: {stderr}");
        for n in needles.iter() {
            assert!(stderr.contains(n), "{what}: {stderr:?} lacks {n:?}");
        }
        // Said once, fix last: no clause of the message repeats (a context and its cause both
        // saying "re-download it"), and it does not end on an operating-system error after
        // the fix.
        let line = stderr.trim_end();
        let clauses: Vec<&str> = line.split(": ").collect();
        for c in clauses.iter().filter(|c| c.len() >= 8) {
            let n = clauses.iter().filter(|d| d.starts_with(c)).count();
            assert_eq!(n, 1, "{what}: {c:?} said twice: {line}");
        }
        let last = line.rsplit(": ").next().unwrap();
        assert!(!last.contains("os error"), "{what}: ends on the cause, not the fix: {line}");
        assert!(!out.exists(), "{what}: left an output directory");
        let leftovers: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-") || n.ends_with(".lock"))
            .collect();
        assert!(leftovers.is_empty(), "{what}: left {leftovers:?}");
    }
    assert_eq!(std::fs::read_to_string(junk.join("notes.txt")).unwrap(), "mine");
}

fn m(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A finite but overflowing weight (position 2's embedding at f32::MAX) makes the activations
/// of every document with 3 or more tokens non-finite. (Within a document the fault reaches every
/// position, earlier ones included: masked attention multiplies the NaN values by zero weights,
/// and 0·NaN = NaN, in these engines as in PyTorch.) Those documents' positions are recorded as
/// failed, with layer and position, in metadata.json; the short documents are computed and
/// written; the exit code is 3 with one line saying so. With --fail-fast the run stops at the
/// first failure (exit 2).
#[test]
fn a_numerical_fault_fails_its_positions_not_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    model_with_tokenizer(&clean, 8);
    let model = tmp.path().join("overflow");
    edited_checkpoint(&clean, &model, |name, v| {
        if name == "wpe.weight" {
            // Row 2 of [n_positions, 8].
            v[2 * 8..3 * 8].iter_mut().for_each(|x| *x = f32::MAX);
        }
    });
    let docs = tmp.path().join("docs.txt");
    std::fs::write(&docs, "the quick brown fox jumps\nHi\nover the lazy dog again\nok\n").unwrap();
    let out = tmp.path().join("out");
    let run = |extra: &[&str]| {
        bin()
            .args(["compute", "--model", &m(&model), "--layers", "0,1", "--input", &m(&docs)])
            .args(["--positions", "all", "--output", &m(&out)])
            .args(extra)
            .output()
            .unwrap()
    };
    let r = run(&["--mean"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(3), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metadata.json")).unwrap()).unwrap();
    let lens: Vec<usize> =
        meta["positions"].as_array().unwrap().iter().map(|p| p.as_array().unwrap().len()).collect();
    assert!(lens[0] >= 3 && lens[1] < 3 && lens[2] >= 3 && lens[3] < 3, "{lens:?}");
    let mut expected = Vec::new();
    for seq in [0, 2] {
        for layer in [0, 1] {
            for t in 0..lens[seq] {
                expected.push((seq as u64, layer, t as u64));
            }
        }
    }
    let failed: Vec<(u64, u64, u64)> = meta["failed_positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let n = |k: &str| f[k].as_u64().unwrap();
            (n("sequence"), n("layer"), n("position"))
        })
        .collect();
    assert_eq!(failed, expected);
    assert_eq!(meta["n_failed_positions"], expected.len());
    assert!(meta["failed_positions"][0]["error"].as_str().unwrap().contains("non-finite"));
    let total = 2 * lens.iter().sum::<usize>();
    let last = stderr.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with(&format!(
            "error: {} of {total} positions failed on non-finite values",
            expected.len()
        )),
        "{last}"
    );
    assert!(last.contains("failed_positions") && last.contains("--fail-fast"), "{last}");
    println!("{last}");
    assert!(stderr.contains("warning: document 2 layer 1 position 0: "), "{stderr}");
    // The short documents are complete and finite; the failed ones hold no matrix.
    for (seq, n) in [(1, lens[1]), (3, lens[3])] {
        let results = read_safetensors(&out.join(format!("fisher_seq_{seq:06}.safetensors")));
        assert_eq!(results["layer"].1.len(), 2 * n);
        assert!(results["fisher"].1.iter().all(|x| x.is_finite()));
        assert!(results["fisher"].1.iter().any(|&x| x != 0.0));
    }
    let results = read_safetensors(&out.join("fisher_seq_000000.safetensors"));
    assert_eq!(results["fisher"].0, vec![0, 8, 8]);
    // The mean counts only the positions that succeeded.
    let mean = read_safetensors(&out.join("mean.safetensors"));
    assert_eq!(mean["count"].1, vec![(lens[1] + lens[3]) as f64; 2]);
    // inspect reads a directory with failed positions.
    ok(&bin().args(["inspect", &m(&out), "--no-model"]).output().unwrap());

    std::fs::remove_dir_all(&out).unwrap();
    let r = run(&["--fail-fast"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("document 0 layer 0 position 0") && stderr.contains("--fail-fast"),
        "{stderr}"
    );
    assert!(!out.join("fisher_seq_000000.safetensors").exists());
}

#[test]
fn llama_fixture_through_the_binary_matches_the_oracle_at_every_layer() {
    let fx = fixture("llama-tiny-untied");
    let reference = read_safetensors(&fx.join("reference.safetensors"));
    let ids: Vec<String> =
        reference["input_ids"].1.iter().map(|x| (*x as i64).to_string()).collect();
    let positions: Vec<String> =
        reference["positions"].1.iter().map(|x| (*x as i64).to_string()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("llama");
    ok(&bin()
        .args([
            "compute",
            "--model",
            fx.to_str().unwrap(),
            "--layers",
            "all",
            "--tokens",
            &ids.join(","),
        ])
        .args(["--positions", &positions.join(","), "-q", "--output", out.to_str().unwrap()])
        .output()
        .unwrap());
    let st = read_safetensors(&out.join("fisher.safetensors"));
    let (rs, rf) = &reference["fisher"];
    let (layers, p, d) = (rs[0], rs[1], rs[2]);
    assert_eq!(st["fisher"].0, vec![layers * p, d, d]);
    for n in 0..layers * p {
        let layer = st["layer"].1[n] as usize;
        let i = n % p;
        let want = &rf[(layer * p + i) * d * d..(layer * p + i + 1) * d * d];
        let got = &st["fisher"].1[n * d * d..(n + 1) * d * d];
        assert!(rel_err(got, want) <= 1e-4, "layer {layer} position {i}: {}", rel_err(got, want));
    }
    let info = ok(&bin().args(["info", fx.to_str().unwrap()]).output().unwrap());
    assert!(
        info.contains("kv heads 2") && info.contains("llama3 scaling") && info.contains("untied"),
        "{info}"
    );
}

/// `--estimator top-k` through the binary, on a soft-capped decoder (Gemma-2: final-logit
/// soft-cap, sliding windows) and on GPT-2, against the exact estimator's eigenpairs of the same
/// run settings: eigenvalues, eigenvectors, the exact trace, the stored tensors, metadata,
/// `--directions` from the top-k pairs, `inspect` and `report` on a top-k directory, npz, and
/// the flags top-k refuses.
#[test]
fn top_k_through_the_binary_matches_the_exact_eigenpairs() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, layer) in [("gemma2-tiny", "1"), ("gpt2-tiny-a", "1")] {
        let fx = fixture(name);
        let run = |est: &[&str], out: &Path| {
            ok(&bin()
                .args(["compute", "--model", fx.to_str().unwrap(), "--layer", layer])
                .args(["--tokens", "3,14,15,9,26,5", "--positions", "2..5", "-q"])
                .args(est)
                .args(["--output", out.to_str().unwrap()])
                .output()
                .unwrap())
        };
        let exact_dir = tmp.path().join(format!("{name}-exact"));
        run(&["--eig-top", "4"], &exact_dir);
        let top_dir = tmp.path().join(format!("{name}-top"));
        run(
            &["--estimator", "top-k", "--k", "4", "--trace", "exact", "--directions", "2"],
            &top_dir,
        );
        let exact = read_safetensors(&exact_dir.join("fisher.safetensors"));
        let top = read_safetensors(&top_dir.join("fisher.safetensors"));
        assert!(!top.contains_key("fisher"), "{name}: top-k forms no matrix");
        let d = exact["fisher"].0[1];
        let np = 4; // positions 2..5, inclusive
        assert_eq!(exact["fisher"].0[0], np, "{name}");
        assert_eq!(top["eigenvalues"].0, vec![np, 4], "{name}");
        assert_eq!(top["eigenvectors"].0, vec![np, d, 4], "{name}");
        assert_eq!(top["residuals"].0, vec![np, 4], "{name}");
        for n in 0..np {
            let (ve, vt) = (
                &exact["eigenvalues"].1[n * 4..n * 4 + 4],
                &top["eigenvalues"].1[n * 4..n * 4 + 4],
            );
            for i in 0..4 {
                assert!(
                    (ve[i] - vt[i]).abs() <= 1e-4 * ve[0],
                    "{name} position {n}: λ{i} {} vs {}",
                    vt[i],
                    ve[i]
                );
                let gap = [i.checked_sub(1), Some(i + 1)]
                    .into_iter()
                    .flatten()
                    .filter_map(|j| ve.get(j))
                    .map(|l| (l - ve[i]).abs())
                    .fold(f64::INFINITY, f64::min);
                if gap > 1e-2 * ve[0] {
                    let col = |a: &[f64], r: usize| a[n * d * 4 + r * 4 + i];
                    let cos: f64 = (0..d)
                        .map(|r| col(&exact["eigenvectors"].1, r) * col(&top["eigenvectors"].1, r))
                        .sum();
                    assert!(cos.abs() >= 1.0 - 1e-4, "{name} position {n}: v{i} cos {cos}");
                }
            }
            let f = &exact["fisher"].1[n * d * d..(n + 1) * d * d];
            let trace: f64 = (0..d).map(|r| f[r * d + r]).sum();
            assert!(
                (top["trace"].1[n] - trace).abs() <= 1e-5 * trace,
                "{name}: trace {} vs {trace}",
                top["trace"].1[n]
            );
            assert!(top["trace_std_error"].1[n].is_nan(), "an exact trace has no standard error");
            assert!(top["residuals"].1[n * 4..n * 4 + 4].iter().all(|&r| r <= 1e-5));
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(top_dir.join("metadata.json")).unwrap()).unwrap();
        assert_eq!(meta["estimator"]["name"], "top-k");
        let split = &meta["timings_s"]["compute_split"];
        assert!(
            split["estimator"].as_f64().unwrap() > 0.0 && split["lower"].as_f64().unwrap() > 0.0,
            "{split}"
        );
        assert_eq!(meta["estimator"]["k"], 4);
        let s = &meta["summary"][0];
        assert!(s["effective_rank"].is_null() && s["top_k"]["converged"] == true, "{s}");
        assert_eq!(s["directions"].as_array().unwrap().len(), 2, "{s}");
        let shown = ok(&bin().args(["inspect", top_dir.to_str().unwrap()]).output().unwrap());
        assert!(shown.contains("top-4 eigenpairs") && shown.contains("+v pushes up"), "{shown}");
        let report = tmp.path().join(format!("{name}-report.html"));
        ok(&bin()
            .args(["report", top_dir.to_str().unwrap(), "--output", report.to_str().unwrap()])
            .output()
            .unwrap());
        let html = std::fs::read_to_string(&report).unwrap();
        assert!(html.contains("--estimator top-k"), "the report says what its spectra are");
    }
    // npz, and the estimate of the trace with its standard error.
    let out = tmp.path().join("npz");
    ok(&bin()
        .args(["compute", "--model", fixture("gpt2-tiny-b").to_str().unwrap(), "--layer", "0"])
        .args(["--tokens", "3,14,15,9", "--estimator", "top-k", "--k", "1", "--format", "npz"])
        .args(["--tolerance", "1e-3"])
        .args(["-q", "--output", out.to_str().unwrap()])
        .output()
        .unwrap());
    let r = read_npz(&out.join("fisher.npz"));
    assert_eq!(r["eigenvalues"].0, vec![1, 1]);
    // The solver's basis stays below d = 48, so the trace is an estimate with an error bar.
    let se = r["trace_std_error"].1[0];
    assert!(se.is_finite() && se > 0.0, "{:?}", r["trace_std_error"]);
    // What top-k refuses, in one line naming the fix.
    for (extra, needle) in [
        (&["--mean"][..], "--mean with --estimator top-k"),
        (&["--eig-top", "2"][..], "--eig/--eig-top with --estimator top-k"),
        (&["--directions", "5", "--k", "4"][..], "--directions 5 with --k 4"),
        (&["--k", "0"][..], "--k 0"),
        (&["--tolerance", "0"][..], "--tolerance 0"),
        (&["--trace-probes", "1"][..], "--trace-probes 1"),
    ] {
        let o = bin()
            .args(["compute", "--model", fixture("gpt2-tiny-a").to_str().unwrap(), "--layer", "0"])
            .args(["--tokens", "3,14", "--estimator", "top-k"])
            .args(extra)
            .args(["--output", tmp.path().join("refused").to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{extra:?}: {err}");
        assert!(!tmp.path().join("refused").exists(), "{extra:?} left a directory behind");
    }
}

#[test]
fn numbers_may_differ_in_their_last_digit_only() {
    assert!(same_up_to_last_digits("trace 7.3735e-2  rank 6.98", "trace 7.3736e-2  rank 6.98"));
    assert!(!same_up_to_last_digits("trace 7.3735e-2", "trace 7.3745e-2"));
    assert!(!same_up_to_last_digits("trace 7.3735e-2", "trace 7.3735e-3"));
    assert!(!same_up_to_last_digits("token 314", "token 315"));
    assert!(!same_up_to_last_digits("a 1.5", "a 15."));
    assert!(same_up_to_last_digits("seq   0  layer  15", "seq   0  layer  15"));
}
