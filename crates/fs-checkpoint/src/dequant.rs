//! Engine-free dequantisation of GGML tensor data (as stored in GGUF files) into `f32`.
//!
//! Every formula is a port of candle-core 0.11.1's CPU `to_float` (which follows ggml's
//! `dequantize_row_*`), with the same float operations in the same order, so the results are
//! bit-identical to candle's — including NaN/Inf scales, which simply propagate. Block fields are
//! decoded from the byte slice with explicit little-endian reads; no `unsafe`, no allocation per
//! block, and no panic for any input bytes.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Elements per K-quant super-block.
const QK_K: usize = 256;
/// Elements per block of the "legacy" quants (Q4_0 … Q8_1).
const QK: usize = 32;

/// A GGML tensor element type as stored in GGUF files.
///
/// The layout documented on each variant is the little-endian byte layout of one block; `d`,
/// `m`, `dmin` are IEEE half floats (`f16`) unless stated otherwise, and `y[i]` is the `i`-th
/// dequantised element of the block.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit IEEE float, 1 element / 4 bytes, copied as is: `y = f32::from_le_bytes(b)`.
    F32,
    /// 16-bit IEEE half float, 1 element / 2 bytes: `y = f16::from_le_bytes(b) as f32` (exact).
    F16,
    /// bfloat16, 1 element / 2 bytes: `y = bf16::from_le_bytes(b) as f32` (exact).
    BF16,
    /// 32 elements / 18 bytes: `d: f16`, `qs: [u8; 16]` (4-bit quants, two per byte).
    ///
    /// `y[j] = ((qs[j] & 0xF) - 8) * d`, `y[j + 16] = ((qs[j] >> 4) - 8) * d` for `j < 16`.
    Q4_0,
    /// 32 elements / 20 bytes: `d: f16`, `m: f16`, `qs: [u8; 16]`.
    ///
    /// `y[j] = (qs[j] & 0xF) * d + m`, `y[j + 16] = (qs[j] >> 4) * d + m` for `j < 16`.
    Q4_1,
    /// 32 elements / 22 bytes: `d: f16`, `qh: u32` (5th bits, LE), `qs: [u8; 16]`.
    ///
    /// With `h0 = ((qh >> j) << 4) & 0x10`, `h1 = (qh >> (j + 12)) & 0x10`, for `j < 16`:
    /// `y[j] = (((qs[j] & 0xF) | h0) - 16) * d`, `y[j + 16] = (((qs[j] >> 4) | h1) - 16) * d`.
    Q5_0,
    /// 32 elements / 24 bytes: `d: f16`, `m: f16`, `qh: u32` (LE), `qs: [u8; 16]`.
    ///
    /// With `h0`, `h1` as for [`GgmlType::Q5_0`]:
    /// `y[j] = ((qs[j] & 0xF) | h0) * d + m`, `y[j + 16] = ((qs[j] >> 4) | h1) * d + m`.
    Q5_1,
    /// 32 elements / 34 bytes: `d: f16`, `qs: [i8; 32]`. `y[j] = qs[j] * d`.
    Q8_0,
    /// 32 elements / 36 bytes: `d: f16`, `s: f16` (`d * sum(qs)`, unused here), `qs: [i8; 32]`.
    ///
    /// `y[j] = qs[j] * d` (ggml has no `dequantize_row_q8_1`; this is candle's formula).
    Q8_1,
    /// 256 elements / 84 bytes: `scales: [u8; 16]`, `qs: [u8; 64]` (2-bit quants),
    /// `d: f16`, `dmin: f16`.
    ///
    /// Two halves of 128 elements, half `h` using `qs[32h..32h + 32]`; inside a half, shift
    /// `s = 0, 2, 4, 6` covers 32 elements, each 16 with its own scale byte `sc = scales[is++]`:
    /// `y = (d * (sc & 0xF)) * ((q[l] >> s) & 3) - dmin * (sc >> 4)` with `l` in `0..16` for
    /// the first 16 and `16..32` for the second.
    Q2K,
    /// 256 elements / 110 bytes: `hmask: [u8; 32]`, `qs: [u8; 64]` (low 2 bits),
    /// `scales: [u8; 12]` (16 packed 6-bit scales), `d: f16`.
    ///
    /// The 12 scale bytes, read as three LE `u32` `a0, a1, t`, unpack into 16 bytes
    /// `[a0 & 0x0f0f0f0f | (t & 0x03030303) << 4, a1 & … | ((t >> 2) & …) << 4,
    ///   (a0 >> 4) & … | ((t >> 4) & …) << 4, (a1 >> 4) & … | ((t >> 6) & …) << 4]`, each an `i8`
    /// scale `sc`. Elements go as for [`GgmlType::Q2K`] (halves of 128, shifts of 2, 16 per
    /// scale) with the high-bit mask `m = 1, 2, 4, …, 128` advancing once per 32 elements:
    /// `y = (d * (sc - 32)) * (((q[l] >> s) & 3) - (if hmask[l] & m != 0 { 0 } else { 4 }))`.
    Q3K,
    /// 256 elements / 144 bytes: `d: f16`, `dmin: f16`, `scales: [u8; 12]` (8 packed 6-bit
    /// scale/min pairs), `qs: [u8; 128]`.
    ///
    /// Pair `j` is `(sc, mn) = (s[j] & 63, s[j + 4] & 63)` for `j < 4`, else
    /// `((s[j + 4] & 0xF) | (s[j - 4] >> 6) << 4, (s[j + 4] >> 4) | (s[j] >> 6) << 4)`. Chunk
    /// `c` of 64 elements uses `q = qs[32c..32c + 32]` and pairs `2c`, `2c + 1`:
    /// `y[64c + l] = (d * sc) * (q[l] & 0xF) - dmin * mn`,
    /// `y[64c + 32 + l] = (d * sc') * (q[l] >> 4) - dmin * mn'`.
    Q4K,
    /// 256 elements / 176 bytes: `d: f16`, `dmin: f16`, `scales: [u8; 12]`, `qh: [u8; 32]`
    /// (5th bits), `qs: [u8; 128]`.
    ///
    /// As [`GgmlType::Q4K`], with the high bit of chunk `c` from `qh[l]` bit `2c` (low nibbles)
    /// and bit `2c + 1` (high nibbles):
    /// `y = (d * sc) * (nibble + (if bit { 16.0 } else { 0.0 })) - dmin * mn`.
    Q5K,
    /// 256 elements / 210 bytes: `ql: [u8; 128]` (low 4 bits), `qh: [u8; 64]` (high 2 bits),
    /// `scales: [i8; 16]`, `d: f16`.
    ///
    /// Half `h` (128 elements) uses `ql[64h..]`, `qh[32h..]`, `sc = scales[8h..]`; for
    /// `l < 32` and `is = l / 16`, the four 6-bit quants minus 32 are
    /// `q1 = (ql[l] & 0xF | (qh[l] & 3) << 4) - 32`,
    /// `q2 = (ql[l + 32] & 0xF | (qh[l] >> 2 & 3) << 4) - 32`,
    /// `q3 = (ql[l] >> 4 | (qh[l] >> 4 & 3) << 4) - 32`,
    /// `q4 = (ql[l + 32] >> 4 | (qh[l] >> 6 & 3) << 4) - 32`, and
    /// `y[l + 32k] = (d * sc[is + 2k]) * q(k+1)` for `k = 0..4`.
    Q6K,
    /// 256 elements / 292 bytes: `d: f32`, `qs: [i8; 256]`, `bsums: [i16; 16]` (unused here).
    ///
    /// `y[j] = d * qs[j]`.
    Q8K,
}

impl GgmlType {
    /// Every type this crate reads, in GGUF id order.
    pub const ALL: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
        GgmlType::BF16,
    ];

    /// From the GGUF tensor-type id (F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8,
    /// Q8_1 9, Q2_K 10, Q3_K 11, Q4_K 12, Q5_K 13, Q6_K 14, Q8_K 15, BF16 30); None otherwise.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The GGUF tensor-type id (the inverse of [`GgmlType::from_id`]).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
        }
    }

    /// As ggml spells it: "F32", "F16", "BF16", "Q4_0", …, "Q2_K", …, "Q8_K".
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
        }
    }

    /// Elements per block (1 for F32/F16/BF16, 32 for Q4_0…Q8_1, 256 for the K-quants).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => QK,
            GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::Q8K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => Q4_0_BYTES,
            GgmlType::Q4_1 => Q4_1_BYTES,
            GgmlType::Q5_0 => Q5_0_BYTES,
            GgmlType::Q5_1 => Q5_1_BYTES,
            GgmlType::Q8_0 => Q8_0_BYTES,
            GgmlType::Q8_1 => Q8_1_BYTES,
            GgmlType::Q2K => Q2K_BYTES,
            GgmlType::Q3K => Q3K_BYTES,
            GgmlType::Q4K => Q4K_BYTES,
            GgmlType::Q5K => Q5K_BYTES,
            GgmlType::Q6K => Q6K_BYTES,
            GgmlType::Q8K => Q8K_BYTES,
        }
    }

    /// Bytes that `n` elements take, or None when n is not a whole number of blocks or
    /// overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const Q4_0_BYTES: usize = 2 + QK / 2;
const Q4_1_BYTES: usize = 4 + QK / 2;
const Q5_0_BYTES: usize = 2 + 4 + QK / 2;
const Q5_1_BYTES: usize = 4 + 4 + QK / 2;
const Q8_0_BYTES: usize = 2 + QK;
const Q8_1_BYTES: usize = 4 + QK;
const Q2K_BYTES: usize = QK_K / 16 + QK_K / 4 + 4;
const Q3K_BYTES: usize = QK_K / 8 + QK_K / 4 + 12 + 2;
const Q4K_BYTES: usize = 4 + 12 + QK_K / 2;
const Q5K_BYTES: usize = 4 + 12 + QK_K / 8 + QK_K / 2;
const Q6K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;
const Q8K_BYTES: usize = 4 + QK_K + QK_K / 16 * 2;

/// Dequantise `out.len()` elements stored as `ty` in `bytes` (little-endian GGUF layout) into
/// `out`.
///
/// Errors (a one-line message, no panic for ANY input): `out.len()` not a multiple of the block
/// size, or `bytes.len()` != `out.len() / block_size * type_size`. The values are bit-identical
/// to candle-core 0.11.1's CPU dequantisation (see [`GgmlType`] for each formula).
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    check_sizes(ty, bytes.len(), out.len())?;
    match ty {
        GgmlType::F32 => f32s(bytes, out),
        GgmlType::F16 => halves::<f16>(bytes, out),
        GgmlType::BF16 => bf16s(bytes, out),
        GgmlType::Q4_0 => q4_0(bytes, out),
        GgmlType::Q4_1 => q4_1(bytes, out),
        GgmlType::Q5_0 => q5_0(bytes, out),
        GgmlType::Q5_1 => q5_1(bytes, out),
        GgmlType::Q8_0 => q8::<Q8_0_BYTES, 2>(bytes, out),
        GgmlType::Q8_1 => q8::<Q8_1_BYTES, 4>(bytes, out),
        GgmlType::Q2K => q2k(bytes, out),
        GgmlType::Q3K => q3k(bytes, out),
        GgmlType::Q4K => q4k(bytes, out),
        GgmlType::Q5K => q5k(bytes, out),
        GgmlType::Q6K => q6k(bytes, out),
        GgmlType::Q8K => q8k(bytes, out),
    }
    Ok(())
}

/// Convenience: allocate and dequantise `n` elements (see [`dequantize_into`] for the errors,
/// which are reported before anything is allocated).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    check_sizes(ty, bytes.len(), n)?;
    let mut out = vec![0f32; n];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// `n` elements must be whole blocks taking exactly `n_bytes`.
fn check_sizes(ty: GgmlType, n_bytes: usize, n: usize) -> Result<(), String> {
    let block = ty.block_size();
    if !n.is_multiple_of(block) {
        return Err(format!(
            "cannot dequantise {n} elements of {ty}: not a whole number of {block}-element blocks"
        ));
    }
    match (n / block).checked_mul(ty.type_size()) {
        Some(expected) if expected == n_bytes => Ok(()),
        Some(expected) => Err(format!(
            "cannot dequantise {n} elements of {ty}: expected {expected} bytes ({} blocks of {}), got {n_bytes}",
            n / block,
            ty.type_size()
        )),
        None => Err(format!(
            "cannot dequantise {n} elements of {ty}: their byte size overflows usize (got {n_bytes} bytes)"
        )),
    }
}

/// An `f16` from two little-endian bytes, widened to `f32` exactly as candle does
/// (`half::f16::to_f32`).
#[inline(always)]
fn f16_le(lo: u8, hi: u8) -> f32 {
    f16::from_le_bytes([lo, hi]).to_f32()
}

fn f32s(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<4>();
    for (b, y) in blocks.iter().zip(out.iter_mut()) {
        *y = f32::from_le_bytes(*b);
    }
}

/// BF16 is the top half of an f32: a shift, in one loop the compiler vectorises (this is the
/// widening every bf16 weight goes through on every product, so it skips the stack buffer of
/// [`halves`]). Bit-identical to `bf16::to_f32`, which also quiets a signalling NaN (sets the
/// top mantissa bit).
fn bf16s(bytes: &[u8], out: &mut [f32]) {
    let (pairs, _) = bytes.as_chunks::<2>();
    for (b, y) in pairs.iter().zip(out.iter_mut()) {
        let x = u16::from_le_bytes(*b);
        let x = if x & 0x7FFF > 0x7F80 { x | 0x0040 } else { x };
        *y = f32::from_bits(u32::from(x) << 16);
    }
}

/// A half-float type decodable from little-endian bytes.
trait LeHalf: Copy + Default {
    fn from_le(b: [u8; 2]) -> Self;
}
impl LeHalf for f16 {
    fn from_le(b: [u8; 2]) -> Self {
        f16::from_le_bytes(b)
    }
}

/// F16/BF16 through a stack buffer and `half`'s slice conversion (what candle calls).
fn halves<T>(bytes: &[u8], out: &mut [f32])
where
    T: LeHalf,
    [T]: HalfFloatSliceExt,
{
    const CHUNK: usize = 256;
    let mut buf = [T::default(); CHUNK];
    let (pairs, _) = bytes.as_chunks::<2>();
    for (src, dst) in pairs.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
        let n = src.len().min(dst.len());
        let (buf, src, dst) = (&mut buf[..n], &src[..n], &mut dst[..n]);
        for (h, b) in buf.iter_mut().zip(src) {
            *h = T::from_le(*b);
        }
        buf.convert_to_f32_slice(dst);
    }
}

fn q4_0(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q4_0_BYTES>();
    let (ys, _) = out.as_chunks_mut::<QK>();
    for (b, y) in blocks.iter().zip(ys.iter_mut()) {
        let d = f16_le(b[0], b[1]);
        for j in 0..QK / 2 {
            let q = b[2 + j];
            let x0 = (q & 0x0F) as i16 - 8;
            let x1 = (q >> 4) as i16 - 8;
            y[j] = (x0 as f32) * d;
            y[j + QK / 2] = (x1 as f32) * d;
        }
    }
}

fn q4_1(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q4_1_BYTES>();
    let (ys, _) = out.as_chunks_mut::<QK>();
    for (b, y) in blocks.iter().zip(ys.iter_mut()) {
        let d = f16_le(b[0], b[1]);
        let m = f16_le(b[2], b[3]);
        for j in 0..QK / 2 {
            let q = b[4 + j];
            let x0 = q & 0x0F;
            let x1 = q >> 4;
            y[j] = (x0 as f32) * d + m;
            y[j + QK / 2] = (x1 as f32) * d + m;
        }
    }
}

fn q5_0(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q5_0_BYTES>();
    let (ys, _) = out.as_chunks_mut::<QK>();
    for (b, y) in blocks.iter().zip(ys.iter_mut()) {
        let d = f16_le(b[0], b[1]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        for j in 0..QK / 2 {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            let q = b[6 + j];
            let x0 = ((q & 0x0F) | xh_0) as i32 - 16;
            let x1 = ((q >> 4) | xh_1) as i32 - 16;
            y[j] = (x0 as f32) * d;
            y[j + QK / 2] = (x1 as f32) * d;
        }
    }
}

fn q5_1(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q5_1_BYTES>();
    let (ys, _) = out.as_chunks_mut::<QK>();
    for (b, y) in blocks.iter().zip(ys.iter_mut()) {
        let d = f16_le(b[0], b[1]);
        let m = f16_le(b[2], b[3]);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        for j in 0..QK / 2 {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            let q = b[8 + j];
            let x0 = (q & 0x0F) | xh_0;
            let x1 = (q >> 4) | xh_1;
            y[j] = (x0 as f32) * d + m;
            y[j + QK / 2] = (x1 as f32) * d + m;
        }
    }
}

/// Q8_0 (`OFFSET` 2) and Q8_1 (`OFFSET` 4: the f16 `s` at bytes 2..4 is a precomputed sum used
/// by dot products only): `y = d · q` with `d` the f16 at bytes 0..2 and `q` the i8 quants that
/// follow.
fn q8<const BYTES: usize, const OFFSET: usize>(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<BYTES>();
    let (ys, _) = out.as_chunks_mut::<QK>();
    for (b, y) in blocks.iter().zip(ys.iter_mut()) {
        let d = f16_le(b[0], b[1]);
        for (dst, &q) in y.iter_mut().zip(&b[OFFSET..]) {
            *dst = q as i8 as f32 * d;
        }
    }
}

fn q2k(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q2K_BYTES>();
    let (ys, _) = out.as_chunks_mut::<QK_K>();
    for (b, y) in blocks.iter().zip(ys.iter_mut()) {
        let scales = &b[0..16];
        let qs = &b[16..80];
        let d = f16_le(b[80], b[81]);
        let min = f16_le(b[82], b[83]);
        let mut is = 0;
        for (y, q) in y.chunks_exact_mut(128).zip(qs.chunks_exact(32)) {
            let mut shift = 0;
            for y in y.chunks_exact_mut(32) {
                for (y, q) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)) {
                    let sc = scales[is];
                    is += 1;
                    let dl = d * (sc & 0xF) as f32;
                    let ml = min * (sc >> 4) as f32;
                    for (y, &q) in y.iter_mut().zip(q) {
                        *y = dl * ((q >> shift) & 3) as f32 - ml;
                    }
                }
                shift += 2;
            }
        }
    }
}

fn q3k(bytes: &[u8], out: &mut [f32]) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let (blocks, _) = bytes.as_chunks::<Q3K_BYTES>();
    let (ys, _) = out.as_chunks_mut::<QK_K>();
    for (b, y) in blocks.iter().zip(ys.iter_mut()) {
        let hmask = &b[0..32];
        let qs = &b[32..96];
        let s = &b[96..108];
        let d_all = f16_le(b[108], b[109]);

        // Unpack the 16 6-bit scales (candle reads the 12 bytes as three LE u32s).
        let a0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let a1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
        let tmp = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
        let aux = [
            (a0 & KMASK2) | ((tmp & KMASK1) << 4),
            (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
            ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
            ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
        ];
        let mut scales = [0i8; 16];
        for (dst, word) in scales.chunks_exact_mut(4).zip(aux) {
            for (d, byte) in dst.iter_mut().zip(word.to_le_bytes()) {
                *d = byte as i8;
            }
        }

        let mut m: u8 = 1;
        let mut is = 0;
        for (y, q) in y.chunks_exact_mut(128).zip(qs.chunks_exact(32)) {
            let mut shift = 0;
            for y in y.chunks_exact_mut(32) {
                for ((y, q), h) in
                    y.chunks_exact_mut(16).zip(q.chunks_exact(16)).zip(hmask.chunks_exact(16))
                {
                    let dl = d_all * (scales[is] as f32 - 32.0);
                    for ((y, &q), &h) in y.iter_mut().zip(q).zip(h) {
                        let low = ((q >> shift) & 3) as i8;
                        let high = if h & m == 0 { 4 } else { 0 };
                        *y = dl * (low - high) as f32;
                    }
                    is += 1;
                }
                shift += 2;
                m = m.wrapping_shl(1);
            }
        }
    }
}

/// The `j`-th (scale, min) pair of the 12 packed K-quant scale bytes (ggml's
/// `get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The 12 scale bytes at `b[4..16]` of a Q4_K/Q5_K block.
#[inline(always)]
fn k4_scales(b: &[u8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for (d, &x) in s.iter_mut().zip(&b[4..16]) {
        *d = x;
    }
    s
}

fn q4k(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q4K_BYTES>();
    let (ys, _) = out.as_chunks_mut::<QK_K>();
    for (b, y) in blocks.iter().zip(ys.iter_mut()) {
        let d = f16_le(b[0], b[1]);
        let min = f16_le(b[2], b[3]);
        let scales = k4_scales(b);
        let qs = &b[16..];
        for (c, (y, q)) in y.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
            let (sc, m) = scale_min_k4(2 * c, &scales);
            let d1 = d * sc as f32;
            let m1 = min * m as f32;
            let (sc, m) = scale_min_k4(2 * c + 1, &scales);
            let d2 = d * sc as f32;
            let m2 = min * m as f32;
            let (lo, hi) = y.split_at_mut(32);
            for ((lo, hi), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(q) {
                *lo = d1 * (q & 0xF) as f32 - m1;
                *hi = d2 * (q >> 4) as f32 - m2;
            }
        }
    }
}

fn q5k(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q5K_BYTES>();
    let (ys, _) = out.as_chunks_mut::<QK_K>();
    for (b, y) in blocks.iter().zip(ys.iter_mut()) {
        let d = f16_le(b[0], b[1]);
        let min = f16_le(b[2], b[3]);
        let scales = k4_scales(b);
        let qh = &b[16..48];
        let ql = &b[48..];
        let mut u1: u8 = 1;
        let mut u2: u8 = 2;
        for (c, (y, ql)) in y.chunks_exact_mut(64).zip(ql.chunks_exact(32)).enumerate() {
            let (sc, m) = scale_min_k4(2 * c, &scales);
            let d1 = d * sc as f32;
            let m1 = min * m as f32;
            let (sc, m) = scale_min_k4(2 * c + 1, &scales);
            let d2 = d * sc as f32;
            let m2 = min * m as f32;
            let (lo, hi) = y.split_at_mut(32);
            for (((lo, hi), &ql), &qh) in lo.iter_mut().zip(hi.iter_mut()).zip(ql).zip(qh) {
                let add1 = if qh & u1 != 0 { 16f32 } else { 0f32 };
                let add2 = if qh & u2 != 0 { 16f32 } else { 0f32 };
                *lo = d1 * ((ql & 0xF) as f32 + add1) - m1;
                *hi = d2 * ((ql >> 4) as f32 + add2) - m2;
            }
            u1 = u1.wrapping_shl(2);
            u2 = u2.wrapping_shl(2);
        }
    }
}

fn q6k(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q6K_BYTES>();
    let (ys, _) = out.as_chunks_mut::<QK_K>();
    for (b, y) in blocks.iter().zip(ys.iter_mut()) {
        let d = f16_le(b[208], b[209]);
        let ql_all = &b[0..128];
        let qh_all = &b[128..192];
        let sc_all = &b[192..208];
        for (h, y) in y.chunks_exact_mut(128).enumerate() {
            let ql = &ql_all[64 * h..64 * h + 64];
            let qh = &qh_all[32 * h..32 * h + 32];
            let sc = &sc_all[8 * h..8 * h + 8];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                y[l] = d * sc[is] as i8 as f32 * q1 as f32;
                y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
            }
        }
    }
}

fn q8k(bytes: &[u8], out: &mut [f32]) {
    let (blocks, _) = bytes.as_chunks::<Q8K_BYTES>();
    let (ys, _) = out.as_chunks_mut::<QK_K>();
    for (b, y) in blocks.iter().zip(ys.iter_mut()) {
        // `bsums` (bytes 260..292) are precomputed sums used by dot products only.
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (dst, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
            *dst = d * q as i8 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: a tiny deterministic generator for the tests.
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
            for b in bytes {
                *b = self.next() as u8;
            }
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn dequant_type_table_is_consistent() {
        let mut ids = Vec::new();
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty), "{ty}");
            ids.push(ty.id());
            assert_eq!(ty.bytes_for(ty.block_size() as u64), Some(ty.type_size() as u64));
            assert_eq!(ty.bytes_for(0), Some(0));
        }
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted, "ALL is in GGUF id order");
        for id in [4, 5, 16, 17, 29, 31, 1000, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), None, "{id}");
        }
        let names: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(
            names,
            [
                "F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
                "Q4_K", "Q5_K", "Q6_K", "Q8_K", "BF16"
            ]
        );
        let sizes: Vec<(usize, usize)> =
            GgmlType::ALL.iter().map(|t| (t.block_size(), t.type_size())).collect();
        assert_eq!(
            sizes,
            [
                (1, 4),
                (1, 2),
                (32, 18),
                (32, 20),
                (32, 22),
                (32, 24),
                (32, 34),
                (32, 36),
                (256, 84),
                (256, 110),
                (256, 144),
                (256, 176),
                (256, 210),
                (256, 292),
                (1, 2)
            ]
        );
        assert_eq!(GgmlType::Q4_0.bytes_for(33), None);
        assert_eq!(GgmlType::Q4K.bytes_for(64 * 256), Some(64 * 144));
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
        assert_eq!(GgmlType::Q8K.bytes_for(u64::MAX / 256 * 256), None);
    }

    #[test]
    fn dequant_q4_0_known_block() {
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16_bytes(0.5));
        for j in 0..16u8 {
            b[2 + j as usize] = j | ((15 - j) << 4);
        }
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
        }
        // All-zero quants decode to -8 d.
        let mut b = vec![0u8; 18 * 2];
        b[..2].copy_from_slice(&f16_bytes(1.0));
        b[18..20].copy_from_slice(&f16_bytes(-0.25));
        let y = dequantize(GgmlType::Q4_0, &b, 64).unwrap();
        assert!(y[..32].iter().all(|&v| v == -8.0));
        assert!(y[32..].iter().all(|&v| v == 2.0));
    }

    #[test]
    fn dequant_q4_1_q5_known_blocks() {
        // Q4_1: y = q d + m.
        let mut b = vec![0u8; 20];
        b[..2].copy_from_slice(&f16_bytes(2.0));
        b[2..4].copy_from_slice(&f16_bytes(-1.0));
        for j in 0..16u8 {
            b[4 + j as usize] = j | (3 << 4);
        }
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 2.0 - 1.0);
            assert_eq!(y[j + 16], 5.0);
        }
        // Q5_0: qh bit j is the 5th bit of element j; bit j + 16 of element j + 16.
        let mut b = vec![0u8; 22];
        b[..2].copy_from_slice(&f16_bytes(1.0));
        b[2..6].copy_from_slice(&0x8000_0001u32.to_le_bytes());
        let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        let mut want = [-16.0f32; 32];
        want[0] = 0.0;
        want[31] = 0.0;
        assert_eq!(y, want);
        // Q5_1 with the same quants: y = q d + m.
        let mut b = vec![0u8; 24];
        b[..2].copy_from_slice(&f16_bytes(0.5));
        b[2..4].copy_from_slice(&f16_bytes(3.0));
        b[4..8].copy_from_slice(&0x8000_0001u32.to_le_bytes());
        b[8] = 0x0F;
        let y = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
        assert_eq!(y[0], 31.0 * 0.5 + 3.0);
        assert_eq!(y[1], 3.0);
        assert_eq!(y[31], 16.0 * 0.5 + 3.0);
    }

    #[test]
    fn dequant_q8_0_and_q8_known_blocks() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16_bytes(0.25));
        for j in 0..32 {
            b[2 + j] = (j as i8 - 16) as u8;
        }
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 0.25);
        }
        // Q8_1 ignores `s`.
        let mut b1 = vec![0u8; 36];
        b1[..2].copy_from_slice(&b[..2]);
        b1[2..4].copy_from_slice(&f16_bytes(f32::NAN));
        b1[4..].copy_from_slice(&b[2..]);
        assert_eq!(dequantize(GgmlType::Q8_1, &b1, 32).unwrap(), y);
        // Q8_K: f32 d.
        let mut b = vec![0u8; 292];
        b[..4].copy_from_slice(&(-1.5f32).to_le_bytes());
        b[4] = 2;
        b[5] = (-128i8) as u8;
        let y = dequantize(GgmlType::Q8K, &b, 256).unwrap();
        assert_eq!(y[0], -3.0);
        assert_eq!(y[1], 192.0);
        assert!(y[2..].iter().all(|&v| v == 0.0));
    }

    /// Pack 8 (scale, min) 6-bit pairs the way ggml's `get_scale_min_k4` unpacks them.
    fn pack_k4_scales(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] & 63;
            s[j + 4] = mn[j] & 63;
        }
        for j in 4..8 {
            s[j + 4] = (sc[j] & 0xF) | ((mn[j] & 0xF) << 4);
            s[j - 4] |= (sc[j] >> 4) << 6;
            s[j] |= (mn[j] >> 4) << 6;
        }
        s
    }

    #[test]
    fn dequant_q4_k_known_blocks() {
        // All-zero quants: every element is -dmin * min of its 32-element group.
        let mn = [0u8, 1, 2, 3, 60, 5, 50, 63];
        let sc = [1u8, 2, 3, 4, 5, 37, 7, 63];
        let mut b = vec![0u8; 144];
        b[..2].copy_from_slice(&f16_bytes(1.0));
        b[2..4].copy_from_slice(&f16_bytes(0.5));
        b[4..16].copy_from_slice(&pack_k4_scales(sc, mn));
        let y = dequantize(GgmlType::Q4K, &b, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, -0.5 * mn[i / 32] as f32, "element {i}");
        }
        // Known quants: element 64c + l takes the low nibble of qs[32c + l], 64c + 32 + l the
        // high nibble; group g = i / 32 uses pair g.
        for (l, q) in b[16..].iter_mut().enumerate() {
            *q = (l % 16) as u8 | (((l * 7) % 16) as u8) << 4;
        }
        let y = dequantize(GgmlType::Q4K, &b, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            let c = i / 64;
            let l = i % 32;
            let byte = 32 * c + l;
            let q = if (i % 64) < 32 { byte % 16 } else { (byte * 7) % 16 };
            let g = i / 32;
            let want = 1.0 * sc[g] as f32 * q as f32 - 0.5 * mn[g] as f32;
            assert_eq!(*v, want, "element {i}");
        }
    }

    #[test]
    fn dequant_q5_k_known_block() {
        let sc = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mn = [0u8; 8];
        let mut b = vec![0u8; 176];
        b[..2].copy_from_slice(&f16_bytes(1.0));
        b[4..16].copy_from_slice(&pack_k4_scales(sc, mn));
        // High bit set for every element of group g where bit g of qh[l] is set: set bit 3 of
        // qh[0] (group 3 = chunk 1 high nibbles, element 96).
        b[16] = 1 << 3;
        b[48 + 32] = 0x21; // chunk 1, l = 0: low nibble 1 (element 64), high nibble 2 (96).
        let y = dequantize(GgmlType::Q5K, &b, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            let want = match i {
                64 => 3.0,
                96 => 4.0 * 18.0,
                _ => 0.0,
            };
            assert_eq!(*v, want, "element {i}");
        }
    }

    #[test]
    fn dequant_q6_k_known_block() {
        // Element e uses scale e / 16 and the 6-bit quant packed as the ggml layout says.
        let q: Vec<u8> = (0..256).map(|e| ((e * 7 + 3) % 64) as u8).collect();
        let mut b = vec![0u8; 210];
        for h in 0..2 {
            for l in 0..32 {
                let e = 128 * h;
                let (q1, q2, q3, q4) = (q[e + l], q[e + l + 32], q[e + l + 64], q[e + l + 96]);
                b[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                b[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                b[128 + 32 * h + l] =
                    (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
        for i in 0..16 {
            b[192 + i] = (i as i8 - 8) as u8;
        }
        b[208..].copy_from_slice(&f16_bytes(2.0));
        let y = dequantize(GgmlType::Q6K, &b, 256).unwrap();
        for (e, v) in y.iter().enumerate() {
            let want = 2.0 * ((e / 16) as f32 - 8.0) * (q[e] as f32 - 32.0);
            assert_eq!(*v, want, "element {e}");
        }
    }

    #[test]
    fn dequant_q2_q3_k_known_blocks() {
        // Q2_K: scale byte 5 (elements 80..96: half 0, shift 4 → bits 4..6 of qs[16..32]).
        let mut b = vec![0u8; 84];
        b[5] = 0x23; // scale 3, min 2
        b[16 + 16] = 0b11 << 4; // element 80 gets q = 3
        b[80..82].copy_from_slice(&f16_bytes(0.5));
        b[82..84].copy_from_slice(&f16_bytes(0.25));
        let y = dequantize(GgmlType::Q2K, &b, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            let want = match i {
                80 => 1.5 * 3.0 - 0.5,
                81..96 => -0.5,
                _ => 0.0,
            };
            assert_eq!(*v, want, "element {i}");
        }
        // Q3_K: all scales 0 (→ -32), no high bits (→ -4), quants 0: y = d * -32 * -4.
        let mut b = vec![0u8; 110];
        b[108..].copy_from_slice(&f16_bytes(0.125));
        let y = dequantize(GgmlType::Q3K, &b, 256).unwrap();
        assert!(y.iter().all(|&v| v == 16.0), "{y:?}");
        // Scale 33 for group 0 (low 4 bits in byte 0, high 2 in byte 8), hmask bit 0 for
        // element 0, quant 1 for element 1.
        b[96] = 1;
        b[104] = 2;
        b[0] = 1;
        b[33] = 1;
        let y = dequantize(GgmlType::Q3K, &b, 256).unwrap();
        assert_eq!(y[0], 0.125 * 1.0 * 0.0);
        assert_eq!(y[1], 0.125 * 1.0 * -3.0);
        assert_eq!(y[2], 0.125 * -4.0);
        assert_eq!(y[16], 16.0);
    }

    #[test]
    fn dequant_floats() {
        let vals = [1.0f32, -2.5, f32::INFINITY, 0.0, -0.0, 1e-40];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let y = dequantize(GgmlType::F32, &bytes, vals.len()).unwrap();
        assert_eq!(
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            vals.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let n = 600; // more than one stack chunk
        let h: Vec<f16> = (0..n).map(|i| f16::from_f32(i as f32 * 0.25 - 7.0)).collect();
        let bytes: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
        let y = dequantize(GgmlType::F16, &bytes, n).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, i as f32 * 0.25 - 7.0);
        }
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| half::bf16::from_f32((i % 256) as f32 - 128.0).to_le_bytes())
            .collect();
        let y = dequantize(GgmlType::BF16, &bytes, n).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (i % 256) as f32 - 128.0);
        }
    }

    #[test]
    fn dequant_length_errors() {
        for ty in GgmlType::ALL {
            let bs = ty.block_size();
            let ts = ty.type_size();
            // Empty is fine.
            assert_eq!(dequantize(ty, &[], 0).unwrap(), Vec::<f32>::new());
            if bs > 1 {
                let e = dequantize(ty, &vec![0; ts], bs + 1).unwrap_err();
                assert!(e.contains("whole number"), "{e}");
                assert!(!e.contains('\n'));
                let mut out = vec![0f32; bs - 1];
                assert!(dequantize_into(ty, &[], &mut out).is_err());
            }
            for len in [0, ts - 1, ts + 1, 2 * ts] {
                let e = dequantize(ty, &vec![0; len], bs).unwrap_err();
                assert!(e.contains(ty.name()) && e.contains("bytes"), "{e}");
                assert!(!e.contains('\n'));
                let mut out = vec![0f32; bs];
                assert!(dequantize_into(ty, &vec![0; len], &mut out).is_err());
            }
            // A huge `n` fails without allocating.
            assert!(dequantize(ty, &[0; 7], usize::MAX / bs * bs).is_err());
            assert!(dequantize(ty, &[0; 7], usize::MAX).is_err());
        }
    }

    #[test]
    fn dequant_random_bytes_never_panic() {
        let mut rng = SplitMix64(0x5EED_F15E_2024);
        for ty in GgmlType::ALL {
            for _ in 0..200 {
                let blocks = rng.below(5) as usize;
                let n = blocks * ty.block_size();
                let mut bytes = vec![0u8; blocks * ty.type_size()];
                rng.fill(&mut bytes);
                let y = dequantize(ty, &bytes, n).unwrap();
                assert_eq!(y.len(), n);
                // Wrong sizes of random lengths are errors, never panics.
                let len = rng.below(3 * ty.type_size() as u64 + 3) as usize;
                let m = rng.below(3 * ty.block_size() as u64 + 3) as usize;
                let mut junk = vec![0u8; len];
                rng.fill(&mut junk);
                let mut out = vec![0f32; m];
                let ok = dequantize_into(ty, &junk, &mut out).is_ok();
                assert_eq!(
                    ok,
                    m.is_multiple_of(ty.block_size())
                        && m / ty.block_size() * ty.type_size() == len
                );
            }
        }
    }
}
