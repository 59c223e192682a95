//! A minimal `.npz` writer (and a reader for the files it writes): a zip archive with one
//! uncompressed (stored) `NAME.npy` entry per array, NPY format 1.0, little-endian. `numpy.load`
//! reads it; the original script's users load `.npz`.

use crate::output::OwnedTensor;
use anyhow::{bail, Context, Result};
use safetensors::tensor::Dtype;

fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

fn descr(dtype: Dtype) -> Result<&'static str> {
    Ok(match dtype {
        Dtype::F32 => "<f4",
        Dtype::F64 => "<f8",
        Dtype::I64 => "<i8",
        other => bail!("npz output does not support dtype {other:?}"),
    })
}

/// One array as NPY 1.0 bytes.
fn npy(t: &OwnedTensor) -> Result<Vec<u8>> {
    let shape = match t.shape().len() {
        0 => "()".to_string(),
        1 => format!("({},)", t.shape()[0]),
        _ => {
            format!("({})", t.shape().iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "))
        }
    };
    let mut header =
        format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}", descr(t.dtype())?);
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.bytes().len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(t.bytes());
    Ok(out)
}

/// Serialise named arrays as an uncompressed `.npz` archive.
pub fn npz_bytes(tensors: &[(&str, OwnedTensor)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, t) in tensors {
        let data = npy(t)?;
        let fname = format!("{name}.npy");
        if out.len() > u32::MAX as usize || data.len() > u32::MAX as usize {
            bail!("the results exceed 4 GiB, which this npz writer does not support: use --format safetensors");
        }
        let (crc, size, offset) = (crc32(&data), data.len() as u32, out.len() as u32);
        let common = |v: &mut Vec<u8>| {
            v.extend_from_slice(&20u16.to_le_bytes()); // version needed
            v.extend_from_slice(&0u16.to_le_bytes()); // flags
            v.extend_from_slice(&0u16.to_le_bytes()); // stored
            v.extend_from_slice(&0u16.to_le_bytes()); // time
            v.extend_from_slice(&0x21u16.to_le_bytes()); // date 1980-01-01
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&size.to_le_bytes());
            v.extend_from_slice(&size.to_le_bytes());
            v.extend_from_slice(&(fname.len() as u16).to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes()); // extra length
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend_from_slice(fname.as_bytes());
        out.extend_from_slice(&data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        common(&mut central);
        central.extend_from_slice(&[0u8; 6]); // comment length, disk number, internal attrs
        central.extend_from_slice(&0u32.to_le_bytes()); // external attrs
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(fname.as_bytes());
    }
    let cd_offset = out.len() as u32;
    let n = tensors.len() as u16;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    Ok(out)
}

/// An array read back from an `.npz` written by [`npz_bytes`], as `f64`.
pub struct NpyArray {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, converted to `f64`.
    pub data: Vec<f64>,
}

/// Read the arrays of an uncompressed `.npz` — ours ([`npz_bytes`]) or numpy's (`np.savez`,
/// whose entries carry ZIP64 extra fields) — through the central directory, as zip readers do.
/// Files written by this tool before its central directory was fixed are read through their
/// local headers instead. Every size is checked against the buffer; errors name the entry.
pub fn read_npz(bytes: &[u8]) -> Result<Vec<(String, NpyArray)>> {
    let entries = match central_directory(bytes) {
        Ok(entries) => entries,
        Err(_) if bytes.starts_with(&0x0403_4b50u32.to_le_bytes()) => {
            return read_local_headers(bytes)
        }
        Err(e) => return Err(e),
    };
    entries
        .into_iter()
        .map(|(name, start, size)| {
            let data = bytes
                .get(start..start.checked_add(size).context("npz size overflow")?)
                .with_context(|| {
                    format!("npz entry {name} declares {size} bytes beyond the end of the file")
                })?;
            let array = parse_npy(data).with_context(|| format!("npz entry {name}"))?;
            Ok((name, array))
        })
        .collect()
}

/// The stored entries of a zip archive from its central directory (ZIP64 included): name
/// without `.npy`, data offset, size.
fn central_directory(bytes: &[u8]) -> Result<Vec<(String, usize, usize)>> {
    let u16_at = |p: usize| -> Result<usize> {
        Ok(u16::from_le_bytes(bytes.get(p..p + 2).context("truncated npz")?.try_into()?) as usize)
    };
    let u32_at = |p: usize| -> Result<usize> {
        Ok(u32::from_le_bytes(bytes.get(p..p + 4).context("truncated npz")?.try_into()?) as usize)
    };
    let u64_at = |p: usize| -> Result<usize> {
        let v = u64::from_le_bytes(bytes.get(p..p + 8).context("truncated npz")?.try_into()?);
        usize::try_from(v).context("npz offset overflows")
    };
    let lowest = bytes.len().saturating_sub(22 + 65535);
    let eocd = (lowest..bytes.len().saturating_sub(21))
        .rev()
        .find(|&p| u32_at(p).ok() == Some(0x0605_4b50))
        .context("no end-of-central-directory record: not a zip archive")?;
    let (mut count, mut cd_offset) = (u16_at(eocd + 10)?, u32_at(eocd + 16)?);
    if count == 0xFFFF || cd_offset == 0xFFFF_FFFF {
        let locator = eocd.checked_sub(20).context("truncated ZIP64 locator")?;
        if u32_at(locator)? != 0x0706_4b50 {
            bail!("ZIP64 sizes without a ZIP64 locator");
        }
        let record = u64_at(locator + 8)?;
        if u32_at(record)? != 0x0606_4b50 {
            bail!("the ZIP64 locator points at no ZIP64 record");
        }
        count = u64_at(record + 32)?;
        cd_offset = u64_at(record + 48)?;
    }
    if cd_offset > bytes.len() {
        bail!("the central directory offset {cd_offset} lies beyond the end of the file");
    }
    let mut entries = Vec::with_capacity(count.min(4096));
    let mut at = cd_offset;
    for _ in 0..count {
        if u32_at(at)? != 0x0201_4b50 {
            bail!("central directory entry at byte {at} has no signature");
        }
        let method = u16_at(at + 10)?;
        let (mut size, name_len) = (u32_at(at + 20)?, u16_at(at + 28)?);
        let (extra_len, comment_len) = (u16_at(at + 30)?, u16_at(at + 32)?);
        let mut local = u32_at(at + 42)?;
        let name_bytes = bytes.get(at + 46..at + 46 + name_len).context("truncated npz")?;
        let name = String::from_utf8_lossy(name_bytes).trim_end_matches(".npy").to_string();
        // ZIP64: the fields that overflow 32 bits live in extra field 0x0001, in the order
        // uncompressed size, compressed size, local header offset (only those that overflow).
        let uncompressed = u32_at(at + 24)?;
        let mut e = at + 46 + name_len;
        let extra_end = e + extra_len;
        while e + 4 <= extra_end {
            let (id, len) = (u16_at(e)?, u16_at(e + 2)?);
            if id == 0x0001 {
                let mut f = e + 4;
                if uncompressed == 0xFFFF_FFFF {
                    f += 8;
                }
                if size == 0xFFFF_FFFF {
                    size = u64_at(f)?;
                    f += 8;
                }
                if local == 0xFFFF_FFFF {
                    local = u64_at(f)?;
                }
            }
            e += 4 + len;
        }
        if local > bytes.len() {
            bail!(
                "npz entry {name}: its local header offset {local} lies beyond the end of the file"
            );
        }
        if method != 0 {
            bail!("npz entry {name} is compressed (np.savez_compressed): only uncompressed npz files are read; re-save it with np.savez");
        }
        if u32_at(local)? != 0x0403_4b50 {
            bail!("npz entry {name}: its local header at byte {local} has no signature");
        }
        let start = local + 30 + u16_at(local + 26)? + u16_at(local + 28)?;
        entries.push((name, start, size));
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

/// The entries of an `.npz` read through its local headers, one after the other.
fn read_local_headers(bytes: &[u8]) -> Result<Vec<(String, NpyArray)>> {
    let mut arrays = Vec::new();
    let mut pos = 0usize;
    let u16_at = |p: usize| -> Result<usize> {
        Ok(u16::from_le_bytes(bytes.get(p..p + 2).context("truncated npz")?.try_into()?) as usize)
    };
    let u32_at = |p: usize| -> Result<usize> {
        Ok(u32::from_le_bytes(bytes.get(p..p + 4).context("truncated npz")?.try_into()?) as usize)
    };
    while u32_at(pos)? == 0x0403_4b50 {
        if u16_at(pos + 8)? != 0 {
            bail!("npz entry at byte {pos} is compressed: only uncompressed npz files are read");
        }
        let size = u32_at(pos + 18)?;
        let (name_len, extra_len) = (u16_at(pos + 26)?, u16_at(pos + 28)?);
        let name_start = pos + 30;
        let name = String::from_utf8_lossy(
            bytes.get(name_start..name_start + name_len).context("truncated npz")?,
        )
        .trim_end_matches(".npy")
        .to_string();
        let data_start = name_start + name_len + extra_len;
        let data = bytes
            .get(data_start..data_start.checked_add(size).context("npz size overflow")?)
            .with_context(|| {
                format!("npz entry {name} declares {size} bytes beyond the end of the file")
            })?;
        arrays.push((name.clone(), parse_npy(data).with_context(|| format!("npz entry {name}"))?));
        pos = data_start + size;
    }
    Ok(arrays)
}

/// One `.npy` array (format versions 1–3, C order; f4, f8, i8, i4), as `f64`.
pub(crate) fn parse_npy(data: &[u8]) -> Result<NpyArray> {
    if data.len() < 10 || &data[..6] != b"\x93NUMPY" {
        bail!("not an NPY array");
    }
    // Version 1 has a 2-byte header length, versions 2 and 3 a 4-byte one.
    let (hlen, hstart) = if data[6] == 1 {
        (u16::from_le_bytes([data[8], data[9]]) as usize, 10)
    } else {
        let b = data.get(8..12).context("truncated NPY header")?;
        (u32::from_le_bytes(b.try_into()?) as usize, 12)
    };
    let header =
        std::str::from_utf8(data.get(hstart..hstart + hlen).context("truncated NPY header")?)?;
    if header.contains("'fortran_order': True") {
        bail!("the array is in Fortran order: save it C-contiguous (np.ascontiguousarray)");
    }
    let field = |key: &str| -> Result<&str> {
        let i = header.find(key).with_context(|| format!("NPY header lacks {key}"))?;
        Ok(&header[i + key.len()..])
    };
    let descr = field("'descr': '")?.split('\'').next().unwrap_or("");
    let shape_s = field("'shape': (")?.split(')').next().unwrap_or("");
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<Result<_, _>>()?;
    let body = &data[hstart + hlen..];
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .with_context(|| format!("NPY shape {shape:?} overflows"))?;
    let values: Vec<f64> = match descr {
        "<f4" => {
            body.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        }
        "<f8" => body.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        "<i8" => {
            body.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        }
        "<i4" => {
            body.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        }
        other => bail!("unsupported NPY dtype {other}"),
    };
    if values.len() != n {
        bail!("NPY body has {} values, shape {shape:?} needs {n}", values.len());
    }
    Ok(NpyArray { shape, data: values })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn round_trip() {
        let t = vec![
            ("a", OwnedTensor::f32(vec![2, 3], (0..6).map(|x| x as f32))),
            ("b", OwnedTensor::i64(vec![4], [1i64, -2, 3, 4])),
            ("c", OwnedTensor::f64(vec![1], [0.5f64])),
        ];
        let bytes = npz_bytes(&t).unwrap();
        let back = read_npz(&bytes).unwrap();
        assert_eq!(back[0].0, "a");
        assert_eq!(back[0].1.shape, vec![2, 3]);
        assert_eq!(back[0].1.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(back[1].1.data, vec![1.0, -2.0, 3.0, 4.0]);
        assert_eq!(back[2].1.shape, vec![1]);
        assert!(read_npz(&bytes[..bytes.len() / 2]).is_err());
    }

    /// The archive read as zip tools and `numpy.load` read it — from the end-of-central-directory
    /// record, through each 46-byte-plus-name central entry, to the local header it points at —
    /// not through the local headers alone as [`read_npz`] does. (A central entry 2 bytes too
    /// long once made every file unreadable by numpy while `round_trip` passed.)
    #[test]
    fn central_directory_is_what_zip_readers_expect() {
        let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as usize;
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let t = vec![
            ("fisher", OwnedTensor::f32(vec![2, 2], [1.0f32, 2.0, 2.0, 5.0])),
            ("positions", OwnedTensor::i64(vec![2], [0i64, 7])),
            ("probs_entropy", OwnedTensor::f64(vec![2], [0.25f64, 1.5])),
        ];
        let bytes = npz_bytes(&t).unwrap();
        let end = bytes.len() - 22;
        assert_eq!(u32_at(&bytes, end), 0x0605_4b50, "end record at len - 22");
        let entries = u16_at(&bytes, end + 10);
        let cd_size = u32_at(&bytes, end + 12) as usize;
        let cd_offset = u32_at(&bytes, end + 16) as usize;
        assert_eq!(entries, t.len());
        assert_eq!(cd_offset + cd_size, end, "central directory ends at the end record");
        let mut at = cd_offset;
        for (name, _) in &t {
            assert_eq!(u32_at(&bytes, at), 0x0201_4b50, "{name}: central signature");
            let (csize, name_len) = (u32_at(&bytes, at + 20) as usize, u16_at(&bytes, at + 28));
            let (extra, comment) = (u16_at(&bytes, at + 30), u16_at(&bytes, at + 32));
            let local = u32_at(&bytes, at + 42) as usize;
            let cname = std::str::from_utf8(&bytes[at + 46..at + 46 + name_len]).unwrap();
            assert_eq!(cname, format!("{name}.npy"));
            assert_eq!(u32_at(&bytes, local), 0x0403_4b50, "{name}: local signature");
            let lname_len = u16_at(&bytes, local + 26);
            assert_eq!(&bytes[local + 30..local + 30 + lname_len], cname.as_bytes());
            let data = local + 30 + lname_len + u16_at(&bytes, local + 28);
            assert_eq!(&bytes[data..data + 6], b"\x93NUMPY", "{name}: npy magic");
            assert_eq!(crc32(&bytes[data..data + csize]), u32_at(&bytes, at + 16));
            at += 46 + name_len + extra + comment;
        }
        assert_eq!(at, end);
    }

    /// An archive numpy wrote (`np.savez`: ZIP64 extra fields in the local headers, whose size
    /// fields then read 0xFFFFFFFF) is read through its central directory.
    #[test]
    fn reads_numpys_savez() {
        let bytes =
            include_bytes!("../../../tests/fixtures/sae/gemma-scope/layer_1/width_96/params.npz");
        assert_eq!(u32::from_le_bytes(bytes[18..22].try_into().unwrap()), 0xFFFF_FFFF);
        let arrays = read_npz(bytes).unwrap();
        let names: Vec<&str> = arrays.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]);
        assert_eq!(arrays[0].1.shape, [48, 96]);
        assert_eq!(arrays[2].1.shape, [96, 48]);
        // The decoder rows are unit vectors (tools/make_sae_fixtures.py), up to f32 rounding.
        let w_dec = &arrays[2].1.data;
        for i in 0..96 {
            let n: f64 = w_dec[i * 48..(i + 1) * 48].iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-6, "row {i}: {n}");
        }
        assert!(read_npz(&bytes[..bytes.len() - 30]).is_err());
    }
}
