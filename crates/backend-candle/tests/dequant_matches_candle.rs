//! fs-checkpoint's engine-free GGML dequantiser is bit-identical to candle-core's CPU one.
//!
//! For each of the 15 GGML types, seeded random blocks are dequantised by
//! `fs_checkpoint::dequantize` and by candle (`QStorage::from_data` → `QTensor::dequantize`, the
//! safe path that ends in each block type's `GgmlType::to_float`), and compared with `to_bits`
//! (so NaN == NaN when the bits agree). Three kinds of data: finite scales of varied magnitude,
//! raw random bytes, and scales set to special values (NaNs, infinities, subnormals, ±0).

use std::borrow::Cow;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use fs_checkpoint::{dequantize, dequantize_into, GgmlType};

/// Blocks per generated tensor.
const BLOCKS: usize = 7;
/// Seeds per type and kind of data.
const SEEDS: u64 = 4;

/// SplitMix64: deterministic test bytes.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// A finite value of magnitude 1e-3 … ~3, random sign.
    fn scale(&mut self) -> f32 {
        let magnitude = 10f32.powf(-3.0 + 3.5 * self.unit());
        if self.next() & 1 == 0 {
            magnitude
        } else {
            -magnitude
        }
    }
}

fn candle_dtype(ty: GgmlType) -> GgmlDType {
    match ty {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q8_1 => GgmlDType::Q8_1,
        GgmlType::Q2K => GgmlDType::Q2K,
        GgmlType::Q3K => GgmlDType::Q3K,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
        GgmlType::Q8K => GgmlDType::Q8K,
    }
}

/// Byte offsets of the f16 scale/min fields inside one block (Q8_K's `d` is an f32 at 0 and the
/// plain float types have none; both are handled separately).
fn f16_scale_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8K => &[],
    }
}

/// The kind of data a case uses.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Every scale (or float element) finite, of magnitude 1e-3 … ~3.
    Finite,
    /// Raw random bytes (NaN/Inf scales wherever they fall).
    Raw,
    /// Scales (or float elements) cycling through NaNs, infinities, subnormals, ±0, extremes.
    Special,
}

const SPECIAL_F16: [u16; 10] = [
    0x7E00, // quiet NaN
    0x7C01, // signalling NaN
    0xFE2A, // negative NaN with payload
    0x7C00, // +inf
    0xFC00, // -inf
    0x8000, // -0
    0x0001, // smallest subnormal
    0x83FF, // largest negative subnormal
    0x7BFF, // max
    0x3C00, // 1
];

const SPECIAL_BF16: [u16; 9] = [
    0x7FC0, // quiet NaN
    0x7F81, // signalling NaN
    0xFFC5, // negative NaN with payload
    0x7F80, // +inf
    0xFF80, // -inf
    0x8000, // -0
    0x0001, // smallest subnormal
    0x7F7F, // max
    0x3F80, // 1
];

const SPECIAL_F32: [u32; 9] = [
    0x7FC0_0000, // quiet NaN
    0x7F80_0001, // signalling NaN
    0xFFC1_2345, // negative NaN with payload
    0x7F80_0000, // +inf
    0xFF80_0000, // -inf
    0x8000_0000, // -0
    0x0000_0001, // smallest subnormal
    0x7F7F_FFFF, // max
    0x3F80_0000, // 1
];

/// `BLOCKS` blocks of `ty` (or 7 × 37 elements for the float types) of the given kind.
fn make_bytes(ty: GgmlType, kind: Kind, seed: u64) -> (Vec<u8>, usize) {
    let mut rng = SplitMix64(seed ^ (u64::from(ty.id()) << 32) ^ ((kind as u64) << 48));
    let blocks = if ty.block_size() == 1 { BLOCKS * 37 } else { BLOCKS };
    let n = blocks * ty.block_size();
    let ts = ty.type_size();
    let mut bytes = vec![0u8; blocks * ts];
    rng.fill(&mut bytes);
    let specials: &[u16] = if ty == GgmlType::BF16 { &SPECIAL_BF16 } else { &SPECIAL_F16 };
    let mut special = 0usize;
    let mut next_special_16 = || {
        special += 1;
        specials[special % specials.len()].to_le_bytes()
    };
    for block in bytes.chunks_exact_mut(ts) {
        match (ty, kind) {
            (_, Kind::Raw) => {}
            (GgmlType::F32, Kind::Finite) => block.copy_from_slice(&rng.scale().to_le_bytes()),
            (GgmlType::F16, Kind::Finite) => {
                block.copy_from_slice(&half::f16::from_f32(rng.scale()).to_le_bytes())
            }
            (GgmlType::BF16, Kind::Finite) => {
                block.copy_from_slice(&half::bf16::from_f32(rng.scale()).to_le_bytes())
            }
            (GgmlType::Q8K, Kind::Finite) => block[..4].copy_from_slice(&rng.scale().to_le_bytes()),
            (GgmlType::F32 | GgmlType::Q8K, Kind::Special) => {
                let bits = SPECIAL_F32[(rng.next() % SPECIAL_F32.len() as u64) as usize];
                block[..4].copy_from_slice(&bits.to_le_bytes());
            }
            (GgmlType::F16 | GgmlType::BF16, Kind::Special) => {
                block.copy_from_slice(&next_special_16())
            }
            (_, Kind::Finite) => {
                for &at in f16_scale_offsets(ty) {
                    let h = half::f16::from_f32(rng.scale()).to_le_bytes();
                    block[at..at + 2].copy_from_slice(&h);
                }
            }
            (_, Kind::Special) => {
                for &at in f16_scale_offsets(ty) {
                    block[at..at + 2].copy_from_slice(&next_special_16());
                }
            }
        }
    }
    (bytes, n)
}

/// Bytes into a candle CPU `QStorage` (safe path; it asserts the block alignment, at most 4
/// bytes, so the bytes are copied into a 16-byte-aligned window first).
fn candle_qtensor(ty: GgmlType, bytes: &[u8], n: usize) -> QTensor {
    let mut buf = vec![0u8; bytes.len() + 16];
    let off = buf.as_ptr().align_offset(16);
    assert!(off < 16, "cannot align a byte buffer");
    buf[off..off + bytes.len()].copy_from_slice(bytes);
    let window = &buf[off..off + bytes.len()];
    let storage = QStorage::from_data(Cow::Borrowed(window), &Device::Cpu, candle_dtype(ty))
        .unwrap_or_else(|e| panic!("{}: candle QStorage::from_data: {e}", ty.name()));
    QTensor::new(storage, (n,))
        .unwrap_or_else(|e| panic!("{}: candle QTensor::new: {e}", ty.name()))
}

fn candle_dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    candle_qtensor(ty, bytes, n)
        .dequantize(&Device::Cpu)
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap_or_else(|e| panic!("{}: candle dequantize: {e}", ty.name()))
}

/// Element-by-element bit equality, naming the type and the first differing element.
fn assert_same_bits(ty: GgmlType, what: &str, ours: &[f32], candle: &[f32]) {
    assert_eq!(ours.len(), candle.len(), "{} ({what}): lengths differ", ty.name());
    if let Some(i) = ours.iter().zip(candle).position(|(a, b)| a.to_bits() != b.to_bits()) {
        panic!(
            "{} ({what}): first difference at element {i} (block {}): ours {} ({:#010x}), candle {} ({:#010x})",
            ty.name(),
            i / ty.block_size(),
            ours[i],
            ours[i].to_bits(),
            candle[i],
            candle[i].to_bits()
        );
    }
}

#[test]
fn every_type_matches_candle_bit_for_bit() {
    let mut compared = 0usize;
    for ty in GgmlType::ALL {
        for kind in [Kind::Finite, Kind::Raw, Kind::Special] {
            for seed in 0..SEEDS {
                let (bytes, n) = make_bytes(ty, kind, seed);
                let ours = dequantize(ty, &bytes, n)
                    .unwrap_or_else(|e| panic!("{}: fs-checkpoint: {e}", ty.name()));
                let theirs = candle_dequantize(ty, &bytes, n);
                let what = format!("{kind:?} seed {seed}");
                assert_same_bits(ty, &what, &ours, &theirs);
                match kind {
                    Kind::Finite => assert!(
                        ours.iter().all(|v| v.is_finite()),
                        "{} ({what}): finite scales gave a non-finite value",
                        ty.name()
                    ),
                    Kind::Special => assert!(
                        ours.iter().any(|v| v.is_nan()),
                        "{} ({what}): special scales gave no NaN",
                        ty.name()
                    ),
                    Kind::Raw => {}
                }
                // The in-place entry point gives the same bits into a dirty buffer.
                let mut out = vec![f32::NAN; n];
                dequantize_into(ty, &bytes, &mut out).unwrap();
                assert_same_bits(ty, &format!("{what}, dequantize_into"), &out, &theirs);
                compared += n;
            }
        }
    }
    assert!(compared > 0);
}

/// `cargo test -p backend-candle --test dequant_matches_candle -- --ignored --nocapture`
#[test]
#[ignore = "timing: dequantises 100 M elements of Q4_1 and Q4_K both ways (~1.2 GB RAM)"]
fn dequant_speed_vs_candle() {
    const N: usize = 100_000_000;
    for ty in [GgmlType::Q4_1, GgmlType::Q4K] {
        let blocks = N / ty.block_size();
        let mut rng = SplitMix64(42);
        let mut bytes = vec![0u8; blocks * ty.type_size()];
        rng.fill(&mut bytes);
        for block in bytes.chunks_exact_mut(ty.type_size()) {
            for &at in f16_scale_offsets(ty) {
                block[at..at + 2].copy_from_slice(&half::f16::from_f32(rng.scale()).to_le_bytes());
            }
        }

        let t = Instant::now();
        let ours = dequantize(ty, &bytes, N).unwrap();
        let ours_alloc = t.elapsed();
        let mut out = vec![1f32; N];
        let t = Instant::now();
        dequantize_into(ty, &bytes, &mut out).unwrap();
        let ours_into = t.elapsed();

        let t = Instant::now();
        let q = candle_qtensor(ty, &bytes, N);
        let candle_load = t.elapsed();
        let t = Instant::now();
        let tensor = q.dequantize(&Device::Cpu).unwrap();
        let candle_deq = t.elapsed();
        let theirs = tensor.to_vec1::<f32>().unwrap();

        assert_same_bits(ty, "100 M", &ours, &theirs);
        assert_same_bits(ty, "100 M, into", &out, &theirs);
        println!(
            "{}: fs-checkpoint dequantize {:.3} s (into a pre-faulted buffer {:.3} s); \
             candle QTensor::dequantize {:.3} s (plus {:.3} s building the QTensor)",
            ty.name(),
            ours_alloc.as_secs_f64(),
            ours_into.as_secs_f64(),
            candle_deq.as_secs_f64(),
            candle_load.as_secs_f64()
        );
    }
}
