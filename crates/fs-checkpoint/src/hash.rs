//! File hashing for results metadata.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{CheckpointError, Result};

/// SHA-256 of a file as lowercase hex (for results metadata: which exact weights were used).
/// The file is streamed, never read whole.
pub fn sha256_file(path: &Path) -> Result<String> {
    digest_file(Sha256::new(), path)
}

/// Feed the file at `path` (streamed) into `hasher` — which may already hold a prefix, as a
/// git blob id's `blob {len}\0` — and return the digest as lowercase hex.
pub(crate) fn digest_file<D: Digest>(mut hasher: D, path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CheckpointError::io(path, e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        std::fs::write(&p, b"").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Longer than one buffer.
        std::fs::write(&p, vec![b'a'; 1_000_000]).unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
        let e = sha256_file(&t.path().join("absent")).unwrap_err();
        assert!(matches!(e, CheckpointError::Io { .. }) && e.to_string().contains("absent"));
    }
}
