//! Helpers shared by the CLI's integration tests. The results readers here are written against
//! the `safetensors` crate directly, independent of the binary's own readers (`results/`), so a
//! bug there cannot hide itself.

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;

/// Every tensor of a results file, as `(shape, values)` widened to `f64`.
pub type Arrays = HashMap<String, (Vec<usize>, Vec<f64>)>;

/// Read a `.safetensors` results file.
pub fn read_safetensors(path: &Path) -> Arrays {
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

/// Relative Frobenius distance `‖a − b‖ / ‖b‖`.
#[allow(dead_code)]
pub fn rel(a: &[f64], b: &[f64]) -> f64 {
    let n: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    n / b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-300)
}

/// A copy of the `gpt2-tiny-b` fixture (V = 256) with a word-level tokenizer (`w0` … `w199`,
/// whitespace-split, `[UNK]` = 200), so `--input` texts work on it.
#[allow(dead_code)]
pub fn model_with_word_tokenizer(dir: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny-b");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> = (0..200)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .chain([("[UNK]".to_string(), serde_json::json!(200))])
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

/// A successful run's stdout; otherwise a panic showing the exit code, stdout and stderr.
#[allow(dead_code)]
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
