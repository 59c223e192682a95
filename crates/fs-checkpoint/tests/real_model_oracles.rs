//! The float64 Fisher oracles of the two real GGUF models (`tools/real_model_oracle.py`:
//! `tests/fixtures/{gemma3-270m,smollm2}-oracle.{safetensors,json}`) read as a consumer reads
//! them: the packed upper triangles unpack to symmetric matrices whose Frobenius norms and traces
//! are the float64 ones recorded, and the safetensors and JSON halves agree. No model is needed.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn f32s(t: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let v = t.tensor(name).unwrap();
    assert_eq!(v.dtype(), Dtype::F32, "{name}");
    let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
    (v.shape().to_vec(), data.collect())
}

fn f64s(t: &SafeTensors, name: &str) -> Vec<f64> {
    let v = t.tensor(name).unwrap();
    assert_eq!(v.dtype(), Dtype::F64, "{name}");
    v.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn i64s(t: &SafeTensors, name: &str) -> Vec<i64> {
    let v = t.tensor(name).unwrap();
    assert_eq!(v.dtype(), Dtype::I64, "{name}");
    v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// `F[i][j]` from the packed upper triangle (`numpy.triu_indices(d)` order).
fn unpack(upper: &[f32], d: usize) -> Vec<f64> {
    assert_eq!(upper.len(), d * (d + 1) / 2);
    let mut f = vec![0.0; d * d];
    let mut k = 0;
    for i in 0..d {
        for j in i..d {
            f[i * d + j] = upper[k] as f64;
            f[j * d + i] = upper[k] as f64;
            k += 1;
        }
    }
    f
}

fn check(name: &str, d: usize, layers: &[i64], ids: &[i64]) {
    let bytes = std::fs::read(fixture(&format!("{name}-oracle.safetensors"))).unwrap();
    let t = SafeTensors::deserialize(&bytes).unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{name}-oracle.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(i64s(&t, "layers"), layers);
    assert_eq!(i64s(&t, "input_ids"), ids);
    assert_eq!(i64s(&t, "position"), [ids.len() as i64 - 1]);
    assert_eq!(json["d_model"], d);
    let (shape, upper) = f32s(&t, "fisher_upper");
    assert_eq!(shape, [layers.len(), d * (d + 1) / 2]);
    let (shape, hidden) = f32s(&t, "hidden");
    assert_eq!(shape, [layers.len(), d]);
    let (norms, traces) = (f64s(&t, "fisher_norm"), f64s(&t, "fisher_trace"));
    for (l, chunk) in upper.chunks_exact(d * (d + 1) / 2).enumerate() {
        let f = unpack(chunk, d);
        let fro = f.iter().map(|x| x * x).sum::<f64>().sqrt();
        let trace: f64 = (0..d).map(|i| f[i * d + i]).sum();
        assert!(
            (fro / norms[l] - 1.0).abs() < 1e-6,
            "{name} layer {}: {fro} vs {}",
            layers[l],
            norms[l]
        );
        assert!((trace / traces[l] - 1.0).abs() < 1e-5, "{name} layer {}", layers[l]);
        assert_eq!(json["fisher_norm"][l].as_f64().unwrap(), norms[l]);
        let h = &hidden[l * d..(l + 1) * d];
        let hn = h.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let want = json["hidden_norm"][l].as_f64().unwrap();
        assert!((hn / want - 1.0).abs() < 1e-6, "{name} layer {}", layers[l]);
        println!("{name} layer {:2}: ||F||_F {:.6e}  trace {:.6e}", layers[l], norms[l], traces[l]);
    }
    for prec in ["f32", "f64"] {
        let ids = i64s(&t, &format!("top10_ids_{prec}"));
        let probs = f64s(&t, &format!("top10_probs_{prec}"));
        assert_eq!(ids.len(), 10);
        assert!(probs.windows(2).all(|w| w[0] >= w[1]), "{name} {prec}: sorted");
        let key = format!("top10_{prec}");
        let json_ids: Vec<i64> =
            json[&key]["ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        assert_eq!(json_ids, ids);
    }
    // The float32 stock forward and the float64 one agree to well within 1e-4 here.
    let (p32, p64) = (f64s(&t, "top10_probs_f32"), f64s(&t, "top10_probs_f64"));
    assert_eq!(i64s(&t, "top10_ids_f32")[..3], i64s(&t, "top10_ids_f64")[..3]);
    assert!(p32.iter().zip(&p64).all(|(a, b)| (a - b).abs() < 1e-4), "{p32:?} {p64:?}");
}

#[test]
fn gemma3_270m_oracle() {
    check("gemma3-270m", 640, &[0, 6, 12, 17, 18], &[2, 818, 5279, 529, 7001, 563]);
}

#[test]
fn smollm2_oracle() {
    check("smollm2", 576, &[0, 15, 30], &[504, 3575, 282, 4649, 314]);
    // transformers' float32 forward of tools/gguf_reference.py: " Paris" (7042) 0.77253.
    let bytes = std::fs::read(fixture("smollm2-oracle.safetensors")).unwrap();
    let t = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(i64s(&t, "top10_ids_f32")[0], 7042);
    assert!((f64s(&t, "top10_probs_f32")[0] - 0.77253).abs() < 1e-5);
}
