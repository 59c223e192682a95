//! Every GGML type against the `gguf` Python package (0.19.0), on a file that package wrote.
//!
//! `tests/fixtures/quants/quants.gguf` holds one tensor per type, named as the type, and
//! `reference.safetensors` the package's dequantisation of each as float32; both come from
//! `tools/make_quant_fixture.py` (see `tools/README.md` and `tests/fixtures/quants/VERSIONS.json`
//! for how each tensor's bytes and reference were made: Q8_1 and Q8_K have no dequantiser in the
//! package). fs-checkpoint reads the file with [`GgufFile`] and dequantises every tensor with
//! [`GgufFile::read_f32`]; the values must equal the reference bit for bit, for every type.
//!
//! Why no tolerance is needed: the f16/bf16 widenings are exact, and every product of an f16
//! scale (11 significant bits) with the small integers of a block (6-bit scales, quants of at
//! most 6 bits, i8 scales) has at most 23 significant bits, so it is exact in f32 whatever the
//! order of the factors. What rounds is one step per element: the final `+ m` / `- dmin * m` of
//! Q4_1, Q5_1, Q2_K, Q4_K and Q5_K (exact operands), and Q8_K's f32 `d * q` (one product). One
//! rounding of the same exact value gives the same f32 under round-to-nearest-even, so any correct
//! implementation (numpy's or ours, in any order, fused or not) is bit-identical. The test prints
//! the number of differing values and the largest ulp distance per type; both must be 0.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fs_checkpoint::{GgmlType, GgufFile};

/// The types the fixture must hold: every [`GgmlType`], in GGUF id order.
const EXPECTED: [&str; 15] = [
    "F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K", "Q8_K", "BF16",
];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quants")
}

/// Distance in units in the last place between two finite f32s (0 for +0 and -0).
fn ulps(a: f32, b: f32) -> u64 {
    fn key(x: f32) -> i64 {
        let bits = x.to_bits();
        if bits >> 31 == 1 {
            -((bits & 0x7FFF_FFFF) as i64)
        } else {
            bits as i64
        }
    }
    key(a).abs_diff(key(b))
}

fn reference() -> (Vec<u8>, PathBuf) {
    let path = fixture_dir().join("reference.safetensors");
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run tools/make_quant_fixture.py)", path.display()));
    (bytes, path)
}

#[test]
fn the_fixture_holds_every_type() {
    let all: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
    assert_eq!(
        all, EXPECTED,
        "GgmlType::ALL changed: add the new type to tools/make_quant_fixture.py and EXPECTED"
    );
    let path = fixture_dir().join("quants.gguf");
    let file = GgufFile::open(&path).unwrap();
    let want: BTreeSet<&str> = EXPECTED.into_iter().collect();
    let have: BTreeSet<&str> = file.tensors().keys().map(String::as_str).collect();
    let missing: Vec<&&str> = want.difference(&have).collect();
    let extra: Vec<&&str> = have.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{}: missing types {missing:?}, unexpected tensors {extra:?}",
        path.display()
    );
    for name in EXPECTED {
        let ty = file.tensor(name).unwrap().ggml_type;
        assert_eq!(ty.name(), name, "tensor {name} is stored as {ty}");
    }
    let listed: Vec<&str> = file
        .get("fixture.types")
        .and_then(|v| v.as_array())
        .expect("fixture.types")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(listed, EXPECTED);

    let (bytes, path) = reference();
    let refs = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let have: BTreeSet<&str> = refs.names().into_iter().collect();
    assert_eq!(have, want, "{}", path.display());
}

#[test]
fn every_type_matches_the_gguf_package_bit_for_bit() {
    let file = GgufFile::open(&fixture_dir().join("quants.gguf")).unwrap();
    let (bytes, ref_path) = reference();
    let refs = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for name in EXPECTED {
        let info = file.tensor(name).unwrap_or_else(|| panic!("type {name} missing from the GGUF"));
        let view =
            refs.tensor(name).unwrap_or_else(|e| panic!("{}: {name}: {e}", ref_path.display()));
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        assert_eq!(info.shape, view.shape(), "{name}: shape");
        let want: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let got = file.read_f32(name).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");

        // The reference is not degenerate: mostly non-zero, many distinct values.
        let nonzero = want.iter().filter(|v| **v != 0.0).count();
        let distinct: BTreeSet<u32> = want.iter().map(|v| v.to_bits()).collect();
        assert!(nonzero > want.len() / 2 && distinct.len() > 500, "{name}: trivial reference");

        let mut differing = 0usize;
        let mut max_ulps = 0u64;
        let mut first = None;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if g.to_bits() != w.to_bits() {
                differing += 1;
                max_ulps = max_ulps.max(ulps(*g, *w));
                first.get_or_insert((i, *g, *w));
            }
        }
        report.push(format!(
            "{name:5} {:6} elements: {differing} differ, max {max_ulps} ulp",
            got.len()
        ));
        if let Some((i, g, w)) = first {
            failures.push(format!(
                "{name}: {differing} of {} values differ (max {max_ulps} ulp), first at flat index {i} (block {}): fs-checkpoint {g:e} ({:#010x}), gguf {w:e} ({:#010x})",
                got.len(),
                i / info.ggml_type.block_size(),
                g.to_bits(),
                w.to_bits()
            ));
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "not bit-exact:\n{}", failures.join("\n"));
}
