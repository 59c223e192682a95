//! Helpers shared by the CLI's integration tests. The results readers here are written against
//! the `safetensors` crate directly, independent of the binary's own readers (`results/`), so a
//! bug there cannot hide itself.

use std::collections::HashMap;
use std::path::Path;

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
