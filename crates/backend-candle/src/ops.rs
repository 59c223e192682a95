//! Differentiable building blocks from candle's elementary ops (their gradients come from the
//! elementary ops' exact derivatives; candle's fused `gelu` backward is imprecise, DESIGN §7).

use candle_core::{Device, Result, Tensor, D};
use fs_checkpoint::StoredMatrix;

/// `√(2/π)`, the constant of the tanh-approximate GELU.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// GPT-2's `gelu_new`: `g(x) = 0.5·x·(1 + tanh(u))`, `u = √(2/π)·(x + 0.044715·x³)`.
///
/// On the CPU a fused op (one pass forward, one pass backward with the exact derivative
/// `g'(x) = 0.5·(1 + tanh u) + 0.5·x·(1 − tanh² u)·√(2/π)·(1 + 3·0.044715·x²)`); elsewhere the
/// composition of elementary ops. Both are tested against finite differences in f64.
pub fn gelu_new(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(GeluNew)
    } else {
        gelu_new_composite(x)
    }
}

/// `gelu_new` from elementary ops (their gradients come from candle's exact elementary
/// derivatives).
pub fn gelu_new_composite(x: &Tensor) -> Result<Tensor> {
    let inner = (x + (x.sqr()? * x)?.affine(0.044715, 0.0)?)?.affine(SQRT_2_OVER_PI, 0.0)?;
    let gate = inner.tanh()?.affine(0.5, 0.5)?;
    x * gate
}

/// The derivative `g'(x)` of [`gelu_new`], elementwise (no gradient of its own): a fused op on
/// the CPU, elementary ops elsewhere.
pub fn gelu_new_derivative(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1_no_bwd(&GeluNewDerivative);
    }
    gelu_new_derivative_composite(x)
}

/// [`gelu_new_derivative`] from elementary ops (any device).
fn gelu_new_derivative_composite(x: &Tensor) -> Result<Tensor> {
    let x2 = x.sqr()?;
    let th = (x + (&x2 * x)?.affine(0.044715, 0.0)?)?.affine(SQRT_2_OVER_PI, 0.0)?.tanh()?;
    let slope = x2.affine(3.0 * 0.044715 * SQRT_2_OVER_PI, SQRT_2_OVER_PI)?;
    let left = th.affine(0.5, 0.5)?;
    let right = ((x * th.sqr()?.affine(-0.5, 0.5)?)? * slope)?;
    left + right
}

/// Elementwise map of a contiguous CPU tensor (f32 or f64), in parallel chunks.
fn map_cpu(
    storage: &candle_core::CpuStorage,
    layout: &candle_core::Layout,
    f32_fn: fn(f32) -> f32,
    f64_fn: fn(f64) -> f64,
) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
    use candle_core::CpuStorage;
    use rayon::prelude::*;
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("elementwise op on a non-contiguous tensor");
    };
    const CHUNK: usize = 1 << 14;
    let out = match storage {
        CpuStorage::F32(v) => {
            let mut out = vec![0f32; end - start];
            out.par_chunks_mut(CHUNK).zip(v[start..end].par_chunks(CHUNK)).for_each(|(o, i)| {
                o.iter_mut().zip(i).for_each(|(o, &x)| *o = f32_fn(x));
            });
            CpuStorage::F32(out)
        }
        CpuStorage::F64(v) => {
            let mut out = vec![0f64; end - start];
            out.par_chunks_mut(CHUNK).zip(v[start..end].par_chunks(CHUNK)).for_each(|(o, i)| {
                o.iter_mut().zip(i).for_each(|(o, &x)| *o = f64_fn(x));
            });
            CpuStorage::F64(out)
        }
        _ => candle_core::bail!("gelu_new supports f32 and f64"),
    };
    Ok((out, layout.shape().clone()))
}

macro_rules! gelu_fns {
    ($t:ty, $value:ident, $deriv:ident) => {
        fn $value(x: $t) -> $t {
            let u = (SQRT_2_OVER_PI as $t) * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + u.tanh())
        }
        fn $deriv(x: $t) -> $t {
            let c = SQRT_2_OVER_PI as $t;
            let th = (c * (x + 0.044715 * x * x * x)).tanh();
            0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * x * x)
        }
    };
}
gelu_fns!(f32, gelu_f32, gelu_deriv_f32);
gelu_fns!(f64, gelu_f64, gelu_deriv_f64);

/// The fused `gelu_new` op (CPU).
struct GeluNew;
/// Its derivative `g'(x)` (CPU, no backward of its own).
struct GeluNewDerivative;

impl candle_core::CustomOp1 for GeluNew {
    fn name(&self) -> &'static str {
        "gelu-new"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        map_cpu(s, l, gelu_f32, gelu_f64)
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((arg.apply_op1_no_bwd(&GeluNewDerivative)? * grad_res)?))
    }
}

impl candle_core::CustomOp1 for GeluNewDerivative {
    fn name(&self) -> &'static str {
        "gelu-new-derivative"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        map_cpu(s, l, gelu_deriv_f32, gelu_deriv_f64)
    }
}

/// The erf GELU `½x(1 + erf(x/√2))` from elementary ops (exact gradients).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let phi = (x * std::f64::consts::FRAC_1_SQRT_2)?.erf()?.affine(0.5, 0.5)?;
    x * phi
}

/// The logistic σ(x) = 1/(1 + e^(−x)) from elementary ops.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// An MLP activation, differentiable (SiLU `x·σ(x)`, candle's own op with its exact backward; the tanh GELU [`gelu_new`], the erf GELU
/// [`gelu_erf`]).
pub fn activation(x: &Tensor, act: fs_checkpoint::Activation) -> Result<Tensor> {
    use fs_checkpoint::Activation as A;
    match act {
        A::Silu => x.silu(),
        A::GeluTanh => gelu_new(x),
        A::GeluErf => gelu_erf(x),
    }
}

/// An MLP activation and its derivative, elementwise (no gradients): SiLU′ = σ(1 + x(1 − σ)),
/// tanh-GELU′ as [`gelu_new_derivative`], erf-GELU′ = Φ(x) + x·φ(x).
pub fn activation_and_derivative(
    x: &Tensor,
    act: fs_checkpoint::Activation,
) -> Result<(Tensor, Tensor)> {
    use fs_checkpoint::Activation as A;
    match act {
        A::Silu => {
            let sig = sigmoid(x)?;
            let deriv = (&sig * ((x * sig.affine(-1.0, 1.0)?)? + 1.0)?)?;
            Ok(((x * sig)?, deriv))
        }
        A::GeluTanh => Ok((gelu_new(x)?, gelu_new_derivative(x)?)),
        A::GeluErf => {
            let cdf = (x * std::f64::consts::FRAC_1_SQRT_2)?.erf()?.affine(0.5, 0.5)?;
            let pdf = (x.sqr()? * -0.5)?.exp()?
                * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
            let deriv = (&cdf + (x * pdf?)?)?;
            Ok(((x * cdf)?, deriv))
        }
    }
}

/// RMSNorm over the last dimension: `w ∘ x / √(mean x² + ε)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// LayerNorm over the last dimension: `(x − μ)/√(σ² + ε) · γ + β` with the biased variance, as
/// `torch.nn.LayerNorm`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(gamma)?.broadcast_add(beta)
}

/// Softmax over the last dimension. The max is subtracted as a constant (detached): the result
/// and its gradient do not depend on the shift.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// A linear layer's weight as the passes use it.
///
/// * `Dense`: an f32 (or, in tests, f64) tensor `[in, out]` on the model's device, uploaded once.
/// * `Stored`: the checkpoint's `[out, in]` matrix in its stored precision (bf16, f16, GGUF
///   quantised blocks) on the host, widened to f32 for each product and dropped after it — the
///   forward product, and again in the backward pass for the input gradient — so a pass holds
///   one layer's f32 weights at a time, never the model's. The widening is exact for bf16/f16
///   and equals the eager dequantisation for quantised blocks; activations, tangents and the
///   products stay f32 (no quantised-activation kernels).
#[derive(Clone)]
pub enum Weight {
    /// `[in, out]` on the device.
    Dense(Tensor),
    /// `[out, in]` as stored, host.
    Stored(StoredMatrix),
}

impl Weight {
    /// A stored `[out, in]` matrix for `device`: kept as stored on the CPU unless it is f32
    /// (then uploaded once, as it would be widened to the same values anyway); widened once and
    /// uploaded on other devices (per-product host widening would cross the bus every pass).
    pub fn new(m: StoredMatrix, device: &Device) -> Result<Weight> {
        Weight::new_in(m, device, candle_core::DType::F32)
    }

    /// [`Weight::new`] for a model computing in `dtype`: a model in another dtype than f32 (the
    /// f64 reference models, [`crate::Float`]) gets every weight dense, widened once.
    pub fn new_in(m: StoredMatrix, device: &Device, dtype: candle_core::DType) -> Result<Weight> {
        if m.is_f32() || !device.is_cpu() || dtype != candle_core::DType::F32 {
            let t = m.to_host_transposed();
            let dense = Tensor::from_vec(t.data, (t.rows, t.cols), device)?;
            Ok(Weight::Dense(dense.to_dtype(dtype)?))
        } else {
            Ok(Weight::Stored(m))
        }
    }

    /// `(in, out)`.
    pub fn in_out(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2(),
            Weight::Stored(m) => Ok((m.cols(), m.rows())),
        }
    }

    /// The identity [`ProductMemo`] keys this weight's products by.
    fn memo_key(&self) -> WeightKey {
        match self {
            Weight::Dense(t) => WeightKey::Dense(t.id()),
            Weight::Stored(m) => WeightKey::Stored(m.storage_id()),
        }
    }

    /// Whether products widen this weight on the fly.
    pub fn is_stored(&self) -> bool {
        matches!(self, Weight::Stored(_))
    }

    /// The `[in, out]` tensor: the dense one, or the stored matrix widened to f32 now (a
    /// transposed view of a fresh `[out, in]` buffer; CPU products with a stored weight use
    /// the chunked `stored_product`).
    pub fn widened(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Stored(m) => {
                Tensor::from_vec(m.to_f32(), (m.rows(), m.cols()), &Device::Cpu)?.t()
            }
        }
    }
}

/// `x · W` for a 2-D `x` and a constant `W` (`[in, out]`, [`Weight`]), as a custom op whose
/// backward pass computes only the input gradient `∂L/∂x = ∂L/∂y · Wᵀ`.
///
/// candle's own `matmul` backward always also forms the weight gradient `xᵀ · ∂L/∂y`, which the
/// Fisher computation never needs: for the readout Jacobian that is a third of all backward
/// flops and a `W`-sized buffer per layer. The forward is candle's own storage-level matmul. A
/// stored weight is widened inside the op (forward, and again in the backward pass), so the
/// autograd graph keeps the stored matrix, not an f32 copy of it.
///
/// Under a [`ReplicatedRows`] declaration the CPU forward multiplies one row per group of equal
/// rows, and reuses the previous such product of the same weight when its rows are bitwise the
/// same ([`ProductMemo`]); the backward is unaffected.
struct ConstMatmul {
    w: Weight,
    /// `R > 1` when the rows come in groups of `R` replicas ([`ReplicatedRows`]): the CPU
    /// forward multiplies the first row of each group (if the group really is `R` equal rows),
    /// or takes the product from [`ProductMemo`], and copies the result; the backward is the
    /// full per-row `∂L/∂y · Wᵀ`.
    replicas: usize,
}

impl ConstMatmul {
    fn dims(&self, layout: &candle_core::Layout) -> Result<(usize, usize, usize)> {
        let (rows, inp) = layout.shape().dims2()?;
        let (w_in, out) = self.w.in_out()?;
        if w_in != inp {
            candle_core::bail!("const matmul: x has {inp} columns, W has {w_in} rows");
        }
        Ok((rows, inp, out))
    }

    /// `x W` on the CPU for contiguous rows `x` (`rows × inp`): a stored weight through
    /// [`stored_product`], a dense one through candle's storage-level matmul.
    fn cpu_product(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<candle_core::CpuStorage> {
        use candle_core::backend::BackendStorage;
        if let Weight::Stored(m) = &self.w {
            let y = stored_product(cpu_f32(storage, layout)?, rows, m, Side::Transposed);
            return Ok(candle_core::CpuStorage::F32(y));
        }
        let w = self.w.widened()?;
        let (w_storage, w_layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("const matmul: the weight is not on the CPU");
        };
        storage.matmul(w, (1, rows, out, inp), layout, w_layout)
    }

    /// The forward product when the `rows` come in groups of `self.replicas` equal rows: the
    /// first row of each group multiplied ([`ConstMatmul::cpu_product`]: one weight stream
    /// instead of `R` rows' worth of GEMM), its result copied to the group. `None` (the caller
    /// forms the full product) when no replication was declared, the rows are not f32/f64, or
    /// they are not in fact equal.
    ///
    /// The product of the first rows goes through this thread's [`ProductMemo`]: when the
    /// previous memoised product of the same weight had bitwise the same first rows, its output
    /// is copied instead of streaming the weight again (the top-K eigensolver's VJPs run this
    /// forward at one point many times). That output is what the product would compute — the
    /// same deterministic product of the same values — so the result is bitwise the same
    /// either way.
    fn replicated_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<Option<candle_core::CpuStorage>> {
        use candle_core::CpuStorage;
        let r = self.replicas;
        let Some((start, end)) = layout.contiguous_offsets() else { return Ok(None) };
        if r < 2 || !rows.is_multiple_of(r) {
            return Ok(None);
        }
        let firsts = match storage {
            CpuStorage::F32(v) => {
                first_of_equal_groups(&v[start..end], inp, r).map(CpuStorage::F32)
            }
            CpuStorage::F64(v) => {
                first_of_equal_groups(&v[start..end], inp, r).map(CpuStorage::F64)
            }
            _ => None,
        };
        let Some(firsts) = firsts else { return Ok(None) };
        let repeat = |y: &CpuStorage| match y {
            CpuStorage::F32(y) => Ok(CpuStorage::F32(repeat_rows(y, out, r))),
            CpuStorage::F64(y) => Ok(CpuStorage::F64(repeat_rows(y, out, r))),
            _ => candle_core::bail!("const matmul: f32/f64 rows gave a product of another type"),
        };
        #[cfg(test)]
        REPLICATED_PRODUCTS.with(|c| c.set(c.get() + 1));
        let key = self.w.memo_key();
        // The memo is borrowed only around the look-up and the insertion, never across the
        // product (whose rayon tasks could run another pass on this thread; such a nested
        // product finds the memo borrowed and computes without it).
        let hit = PRODUCT_MEMO.with(|m| {
            let memo = m.try_borrow().ok()?;
            Some(repeat(memo.get(&key, &firsts)?))
        });
        if let Some(y) = hit {
            #[cfg(test)]
            MEMO_HITS.with(|c| c.set(c.get() + 1));
            return y.map(Some);
        }
        let groups = rows / r;
        let layout = candle_core::Layout::contiguous((groups, inp));
        let y = self.cpu_product(&firsts, &layout, groups, inp, out)?;
        let full = repeat(&y)?;
        PRODUCT_MEMO.with(|m| {
            if let Ok(mut memo) = m.try_borrow_mut() {
                memo.insert(key, firsts, y, groups * (inp + out));
            }
        });
        Ok(Some(full))
    }
}

/// The first row of each group of `r` consecutive rows (`width` values each) of `a`, if every
/// group consists of `r` bitwise-equal rows; `None` at the first row that differs.
fn first_of_equal_groups<T: Copy + PartialEq>(a: &[T], width: usize, r: usize) -> Option<Vec<T>> {
    let group = width * r;
    let mut firsts = Vec::with_capacity(a.len() / r);
    for g in a.chunks_exact(group) {
        let (first, rest) = g.split_at(width);
        // `to_bits` equality would distinguish ±0 and NaN payloads; `==` suffices here since a
        // NaN row fails the comparison and takes the full product.
        if !rest.chunks_exact(width).all(|row| row == first) {
            return None;
        }
        firsts.extend_from_slice(first);
    }
    Some(firsts)
}

/// Each row (`width` values) of `y` repeated `r` times.
fn repeat_rows<T: Copy>(y: &[T], width: usize, r: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(y.len() * r);
    for row in y.chunks_exact(width) {
        for _ in 0..r {
            out.extend_from_slice(row);
        }
    }
    out
}

thread_local! {
    /// The replica count declared by the innermost [`ReplicatedRows`] guard of this thread
    /// (0: none).
    static REPLICAS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
thread_local! {
    /// Forward products that took the one-row-per-group shortcut on this thread (tests),
    /// memo hits included.
    static REPLICATED_PRODUCTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Of those, the products taken from [`PRODUCT_MEMO`] (tests).
    static MEMO_HITS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A weight's identity for [`ProductMemo`]: never equal for two weights of different values.
///
/// * `Dense`: candle's [`candle_core::TensorId`], a process-wide counter, never reused (a view
///   or copy of a tensor is a new tensor with a new id). The weights' tensors are never written
///   in place (no `slice_set` or `Var` on them), so one id is one set of values.
/// * `Stored`: [`fs_checkpoint::StorageId`], `Weak` references to the matrix's data and row
///   index: their allocations cannot be reused while the key exists, and the data is never
///   written, yet the key does not keep a dropped model's weights alive.
#[derive(Clone, PartialEq, Eq, Hash)]
enum WeightKey {
    Dense(candle_core::TensorId),
    Stored(fs_checkpoint::StorageId),
}

/// The memo of [`ConstMatmul::replicated_fwd`]: per weight, the first rows of its latest
/// memoised replicated forward product and that product (before the rows are repeated).
///
/// A look-up hits only for the same weight ([`WeightKey`]) and bitwise the same rows (`to_bits`
/// of every value, so `-0.0` and `0.0`, or NaN payloads, are different rows), f32 or f64; the
/// stored output is then exactly what multiplying would give. Bounded: an entry of more than
/// [`ProductMemo::MAX_ENTRY_VALUES`] values (rows and product) is not kept, and the memo is
/// emptied before it would exceed [`ProductMemo::MAX_ENTRIES`] entries or
/// [`ProductMemo::MAX_VALUES`] values (64 MB of f32). A VJP's forward at one position needs
/// one entry per linear layer of the upper half (Llama-3.1-8B split at layer 16: 112 entries,
/// 1.3 M values).
#[derive(Default)]
struct ProductMemo {
    entries: std::collections::HashMap<WeightKey, MemoEntry>,
    /// Values held by all entries.
    values: usize,
}

/// One weight's entry of [`ProductMemo`].
struct MemoEntry {
    /// The rows multiplied (contiguous, `groups × in`).
    input: candle_core::CpuStorage,
    /// Their product (`groups × out`).
    output: candle_core::CpuStorage,
    /// Values of both.
    values: usize,
}

impl ProductMemo {
    const MAX_ENTRIES: usize = 1024;
    const MAX_ENTRY_VALUES: usize = 1 << 20;
    const MAX_VALUES: usize = 1 << 24;

    /// The memoised product of `key`'s weight with `input`, if its rows were bitwise `input`.
    fn get(
        &self,
        key: &WeightKey,
        input: &candle_core::CpuStorage,
    ) -> Option<&candle_core::CpuStorage> {
        let e = self.entries.get(key)?;
        same_bits(&e.input, input).then_some(&e.output)
    }

    /// Keep `output` as the product of `key`'s weight with `input` (`values` values in all),
    /// replacing the weight's previous entry.
    fn insert(
        &mut self,
        key: WeightKey,
        input: candle_core::CpuStorage,
        output: candle_core::CpuStorage,
        values: usize,
    ) {
        if let Some(old) = self.entries.remove(&key) {
            self.values -= old.values;
        }
        if values > Self::MAX_ENTRY_VALUES {
            return;
        }
        if self.entries.len() >= Self::MAX_ENTRIES || self.values + values > Self::MAX_VALUES {
            self.entries.clear();
            self.values = 0;
        }
        self.values += values;
        self.entries.insert(key, MemoEntry { input, output, values });
    }
}

/// Whether `a` and `b` hold the same values bit for bit (f32 or f64; other types never match).
fn same_bits(a: &candle_core::CpuStorage, b: &candle_core::CpuStorage) -> bool {
    use candle_core::CpuStorage as C;
    match (a, b) {
        (C::F32(a), C::F32(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        }
        (C::F64(a), C::F64(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        }
        _ => false,
    }
}

thread_local! {
    /// This thread's [`ProductMemo`] (the CPU forward runs on the thread that builds the pass,
    /// as does the [`ReplicatedRows`] declaration).
    static PRODUCT_MEMO: std::cell::RefCell<ProductMemo> = std::cell::RefCell::default();
}

/// Empty this thread's [`ProductMemo`] (tests: the next products are computed afresh).
#[cfg(test)]
pub(crate) fn clear_product_memo() {
    PRODUCT_MEMO.with(|m| *m.borrow_mut() = ProductMemo::default());
}

/// Memo hits on this thread so far (tests).
#[cfg(test)]
pub(crate) fn memo_hits() -> usize {
    MEMO_HITS.with(|c| c.get())
}

/// Replicated forward products on this thread so far, memo hits included (tests).
#[cfg(test)]
pub(crate) fn replicated_products() -> usize {
    REPLICATED_PRODUCTS.with(|c| c.get())
}

/// While alive, declares that the rows entering every [`linear`] on this thread come in groups
/// of `r` replicas of one row (the reverse-mode VJP runs the forward pass on `R` copies of the
/// activation, one per cotangent): the forward products multiply one row per group. The rows
/// are still compared before a product relies on it, so a wrong declaration only costs the
/// comparison. Restores the previous declaration on drop.
///
/// Those one-row-per-group products are memoised ([`ProductMemo`]): a product whose weight and
/// rows are bitwise those of the weight's previous one copies its output, so of repeated VJPs at
/// the same point (the top-K eigensolver's) only the first streams the upper half's weights
/// forward (the backward's products, one row per cotangent, still stream them every time).
/// Sound whatever was declared: a hit needs the same weight identity and the same bits, and the
/// product of the same values is the same.
pub(crate) struct ReplicatedRows {
    previous: usize,
}

impl ReplicatedRows {
    pub(crate) fn declare(r: usize) -> ReplicatedRows {
        ReplicatedRows { previous: REPLICAS.with(|c| c.replace(r)) }
    }
}

impl Drop for ReplicatedRows {
    fn drop(&mut self) {
        REPLICAS.with(|c| c.set(self.previous));
    }
}

impl candle_core::CustomOp1 for ConstMatmul {
    fn name(&self) -> &'static str {
        "const-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (rows, inp, out) = self.dims(layout)?;
        let y = match self.replicated_fwd(storage, layout, rows, inp, out)? {
            Some(y) => y,
            None => self.cpu_product(storage, layout, rows, inp, out)?,
        };
        Ok((y, candle_core::Shape::from((rows, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let (rows, inp, out) = self.dims(layout)?;
        let Weight::Dense(w) = &self.w else {
            candle_core::bail!("const matmul: a stored-precision weight on a CUDA pass");
        };
        let (w_storage, w_layout) = w.storage_and_layout();
        let candle_core::Storage::Cuda(w) = &*w_storage else {
            candle_core::bail!("const matmul: the weight is not on the CUDA device");
        };
        let y = storage.matmul(w, (1, rows, out, inp), layout, w_layout)?;
        Ok((y, candle_core::Shape::from((rows, out))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        match &self.w {
            Weight::Stored(m) if grad_res.device().is_cpu() => Ok(Some(stored_times(grad_res, m)?)),
            w => Ok(Some(grad_res.matmul(&w.widened()?.t()?)?)),
        }
    }
}

/// `g · W` for rows `g` `(rows, out)` on the CPU and a stored `W` (`[out, in]`), `(rows, in)`,
/// `W` widened chunk by chunk ([`StoredTimes`]).
pub(crate) fn stored_times(g: &Tensor, w: &StoredMatrix) -> Result<Tensor> {
    g.contiguous()?.apply_op1(StoredTimes { w: w.clone() })
}

/// `g · W` for rows `g` `(rows, out)` and a stored `W` (`[out, in]`): the input gradient of
/// [`ConstMatmul`] with a stored weight, as an op of its own so that it too widens `W` chunk by
/// chunk ([`stored_product`]). First-order only (no backward of its own).
struct StoredTimes {
    w: StoredMatrix,
}

impl candle_core::CustomOp1 for StoredTimes {
    fn name(&self) -> &'static str {
        "stored-times"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (rows, out) = layout.shape().dims2()?;
        if out != self.w.rows() {
            candle_core::bail!("stored times: g has {out} columns, W has {} rows", self.w.rows());
        }
        let y = stored_product(cpu_f32(storage, layout)?, rows, &self.w, Side::Plain);
        Ok((candle_core::CpuStorage::F32(y), candle_core::Shape::from((rows, self.w.cols()))))
    }
}

/// The f32 values of a contiguous CPU tensor.
fn cpu_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        (candle_core::CpuStorage::F32(_), None) => {
            candle_core::bail!("a product with a stored weight needs contiguous rows")
        }
        _ => candle_core::bail!("a product with a stored weight needs f32 rows"),
    }
}

/// Which product [`stored_product`] forms with the stored `W` (`[out, in]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// `x Wᵀ`: `(rows, in) → (rows, out)` (the forward product).
    Transposed,
    /// `g W`: `(rows, out) → (rows, in)` (the input gradient).
    Plain,
}

/// Floats of widened weight rows per chunk: 8 MB, so a chunk is consumed from cache right after
/// it is widened, and the buffer is reused (no fresh pages per product).
const WIDEN_CHUNK_FLOATS: usize = 1 << 21;

thread_local! {
    /// The reused widening buffer of this thread.
    static WIDEN_BUFFER: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The product of `rows` f32 rows `a` (row-major) with a stored `W` (`[out, in]`) on the CPU:
/// `a Wᵀ` (`a` is `rows × in`, the result `rows × out`) for [`Side::Transposed`], `a W` (`a`
/// is `rows × out`, the result `rows × in`) for [`Side::Plain`]. `W` is widened a chunk of its
/// rows at a time into a reused per-thread buffer and multiplied by the `gemm` crate (candle's
/// own CPU GEMM); activations and products stay f32, and nothing of `W` is ever held in f32
/// beyond one chunk per thread. Panics when `a.len()` is not `rows` times the width above.
///
/// Two schedules, chosen by measurement (a bf16 `8192 × 2048` weight on the 2-core CI machine,
/// 2026-11-30; `cargo bench -p fs-benches --bench backends -- stored` times the chosen one). Up
/// to 128 rows, `stored_product_tiled` (per-thread L2-sized chunks,
/// single-threaded GEMMs): 25 rows 30 ms (`a Wᵀ`) / 25 ms (`a W`) against 46 / 41 ms for one
/// multi-threaded GEMM per 8 MB chunk, 1 row 5.8 against 24 ms. More rows run the 8 MB chunks:
/// a thin chunk repacks all the rows for each GEMM (the exact estimator's ~1800-row passes
/// through the `2048 × 8192` down projection took 13% longer tiled), and `a W`'s partial sums
/// cost more than they save (400 rows: 305 ms tiled against 254 ms).
pub fn stored_product(a: &[f32], rows: usize, w: &StoredMatrix, side: Side) -> Vec<f32> {
    let width = match side {
        Side::Transposed => w.cols(),
        Side::Plain => w.rows(),
    };
    assert_eq!(a.len(), rows * width, "stored product: {rows} rows of width {width}");
    if rows <= TILED_MAX_ROWS {
        stored_product_tiled(a, rows, w, side, TILE_CHUNK_FLOATS)
    } else {
        stored_product_in_chunks(a, rows, w, side, WIDEN_CHUNK_FLOATS)
    }
}

/// Floats of widened weight rows per task of [`stored_product_tiled`]: 512 KB, half a core's
/// L2 cache on the CI machine.
const TILE_CHUNK_FLOATS: usize = 1 << 17;

/// Most rows for which [`stored_product`] runs [`stored_product_tiled`].
const TILED_MAX_ROWS: usize = 128;

/// Rows `o0..o0 + n` of `w` widened into this thread's reused buffer, handed to `f`.
fn with_widened_rows<R>(w: &StoredMatrix, o0: usize, n: usize, f: impl FnOnce(&[f32]) -> R) -> R {
    WIDEN_BUFFER.with(|shared| {
        // A rayon worker waiting inside a product may run another product on this thread (work
        // stealing): that one widens into a buffer of its own instead of panicking on a second
        // borrow.
        let mut own = Vec::new();
        let mut borrowed = shared.try_borrow_mut().ok();
        let buffer: &mut Vec<f32> = match borrowed.as_deref_mut() {
            Some(b) => b,
            None => &mut own,
        };
        let len = n * w.cols();
        buffer.resize(len, 0.0);
        w.widen_rows_into(o0..o0 + n, &mut buffer[..len]);
        f(&buffer[..len])
    })
}

/// `y[:, cols] = a · w_rowsᵀ`: `a` is `rows × inp`, `w_rows` is `n × inp`, `y` points at the
/// first of `n` columns of a row-major matrix with row stride `y_stride`.
///
/// # Safety
/// `y` must address `rows` rows of `n` writable floats at stride `y_stride` that nothing else
/// accesses during the call; `a.len() ≥ rows · inp`, `w_rows.len() ≥ n · inp`.
unsafe fn gemm_times_transposed(
    y: *mut f32,
    y_stride: usize,
    a: &[f32],
    rows: usize,
    w_rows: &[f32],
    n: usize,
    threads: gemm::Parallelism,
) {
    let inp = w_rows.len() / n.max(1);
    gemm::gemm(
        rows,
        n,
        inp,
        y,
        1,
        y_stride as isize,
        false,
        a.as_ptr(),
        1,
        inp as isize,
        w_rows.as_ptr(),
        inp as isize,
        1,
        0.0,
        1.0,
        false,
        false,
        false,
        threads,
    )
}

/// `y (+)= a[:, o0..o0 + n] · w_rows`: `a` is `rows × a_stride`, `w_rows` is `n × inp`, `y`
/// is `rows × inp` (added to when `accumulate`).
///
/// # Safety
/// `y.len() ≥ rows · inp`, `a.len() ≥ (rows − 1) · a_stride + o0 + n`, `w_rows.len() ≥ n · inp`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_plain_into(
    y: &mut [f32],
    a: &[f32],
    a_stride: usize,
    o0: usize,
    rows: usize,
    w_rows: &[f32],
    n: usize,
    accumulate: bool,
    threads: gemm::Parallelism,
) {
    let inp = w_rows.len() / n.max(1);
    gemm::gemm(
        rows,
        inp,
        n,
        y.as_mut_ptr(),
        1,
        inp as isize,
        accumulate,
        a.as_ptr().add(o0),
        1,
        a_stride as isize,
        w_rows.as_ptr(),
        1,
        inp as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        threads,
    )
}

/// [`stored_product`] with chunks of about `chunk_floats` widened values, each multiplied by
/// one GEMM on every thread.
fn stored_product_in_chunks(
    a: &[f32],
    rows: usize,
    w: &StoredMatrix,
    side: Side,
    chunk_floats: usize,
) -> Vec<f32> {
    let (out, inp) = (w.rows(), w.cols());
    let result_cols = match side {
        Side::Transposed => out,
        Side::Plain => inp,
    };
    let mut y = vec![0f32; rows * result_cols];
    if rows == 0 || out == 0 || inp == 0 {
        return y;
    }
    let chunk = (chunk_floats / inp).max(1).min(out);
    let threads = gemm::Parallelism::Rayon(rayon::current_num_threads());
    for o0 in (0..out).step_by(chunk) {
        let n = chunk.min(out - o0);
        with_widened_rows(w, o0, n, |w_rows| match side {
            // SAFETY: y[:, o0..o0+n] lies inside y (rows × out); a is rows × inp.
            Side::Transposed => unsafe {
                gemm_times_transposed(y.as_mut_ptr().add(o0), out, a, rows, w_rows, n, threads)
            },
            // SAFETY: y is rows × inp; a is rows × out.
            Side::Plain => unsafe {
                gemm_plain_into(&mut y, a, out, o0, rows, w_rows, n, o0 > 0, threads)
            },
        });
    }
    y
}

/// A raw pointer shared by the tasks of [`stored_product_tiled`], each writing its own columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint column ranges of one buffer that outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The address of column `c` of the first row (a method, so closures capture the whole
    /// `Send` wrapper rather than its raw-pointer field).
    fn column(self, c: usize) -> *mut f32 {
        self.0.wrapping_add(c)
    }
}

/// [`stored_product`] for few rows: every task widens its own `chunk_floats`-value chunk of
/// `W` rows into its thread's buffer (small enough to stay in the core's L2 cache) and runs a
/// single-threaded GEMM on it. `x Wᵀ`: each chunk fills its own output columns. `g W`: the
/// chunks are split into `PARTS` contiguous parts, each summed in order into a partial of its
/// own, and the partials added in order (so the result does not depend on the thread count).
fn stored_product_tiled(
    a: &[f32],
    rows: usize,
    w: &StoredMatrix,
    side: Side,
    chunk_floats: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    const PARTS: usize = 4;
    let (out, inp) = (w.rows(), w.cols());
    let result_cols = match side {
        Side::Transposed => out,
        Side::Plain => inp,
    };
    if rows == 0 || out == 0 || inp == 0 {
        return vec![0f32; rows * result_cols];
    }
    let chunk = (chunk_floats / inp).max(1).min(out);
    let starts: Vec<usize> = (0..out).step_by(chunk).collect();
    let single = gemm::Parallelism::None;
    match side {
        Side::Transposed => {
            let mut y = vec![0f32; rows * out];
            let dst = SharedOut(y.as_mut_ptr());
            starts.par_iter().for_each(|&o0| {
                let n = chunk.min(out - o0);
                // SAFETY: y[:, o0..o0+n] (rows × n, row stride `out`) belongs to this task
                // alone; `a` is rows × inp.
                with_widened_rows(w, o0, n, |w_rows| unsafe {
                    gemm_times_transposed(dst.column(o0), out, a, rows, w_rows, n, single)
                })
            });
            y
        }
        Side::Plain => {
            let per_part = starts.len().div_ceil(PARTS);
            let partials: Vec<Vec<f32>> = starts
                .par_chunks(per_part)
                .map(|part| {
                    let mut acc = vec![0f32; rows * inp];
                    for (i, &o0) in part.iter().enumerate() {
                        let n = chunk.min(out - o0);
                        // SAFETY: acc is rows × inp; a is rows × out.
                        with_widened_rows(w, o0, n, |w_rows| unsafe {
                            gemm_plain_into(&mut acc, a, out, o0, rows, w_rows, n, i > 0, single)
                        })
                    }
                    acc
                })
                .collect();
            let mut parts = partials.into_iter();
            let mut y = parts.next().unwrap_or_else(|| vec![0f32; rows * inp]);
            for p in parts {
                y.iter_mut().zip(&p).for_each(|(y, p)| *y += p);
            }
            y
        }
    }
}

/// `x · W + b` for `x` of shape `(…, in)`, `W` `[in, out]` ([`Weight`]), `b` `[out]`.
/// `W` and `b` are constants: the backward pass only propagates to `x`.
pub fn linear(x: &Tensor, w: &Weight, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (rows, inp) = (dims[..dims.len() - 1].iter().product::<usize>(), dims[dims.len() - 1]);
    let (_, out) = w.in_out()?;
    let x2 = x.reshape((rows, inp))?.contiguous()?;
    let replicas = REPLICAS.with(|c| c.get());
    let y = x2.apply_op1(ConstMatmul { w: w.clone(), replicas })?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().expect("non-empty") = out;
    y.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn fd_check(f: impl Fn(&Tensor) -> Result<Tensor>, xs: &[f64]) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(xs, &dev).unwrap()).unwrap();
        let y = f(x.as_tensor()).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap().get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        for i in 0..xs.len() {
            let eval = |delta: f64| {
                let mut v = xs.to_vec();
                v[i] += delta;
                f(&Tensor::new(v.as_slice(), &dev).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (eval(1e-6) - eval(-1e-6)) / 2e-6;
            assert!((g[i] - fd).abs() < 1e-8 * (1.0 + fd.abs()), "i={i}: {} vs {fd}", g[i]);
        }
    }

    #[test]
    fn gelu_new_value_and_gradient() {
        let x = Tensor::new(&[-3.0f64, -0.5, 0.0, 0.7, 2.5], &Device::Cpu).unwrap();
        let y = gelu_new(&x).unwrap().to_vec1::<f64>().unwrap();
        for (xi, yi) in [-3.0f64, -0.5, 0.0, 0.7, 2.5].iter().zip(y) {
            let e = 0.5 * xi * (1.0 + (SQRT_2_OVER_PI * (xi + 0.044715 * xi.powi(3))).tanh());
            assert!((e - yi).abs() < 1e-15);
        }
        fd_check(gelu_new, &[-3.0, -0.5, 0.0, 0.7, 2.5]);
        fd_check(gelu_new_composite, &[-3.0, -0.5, 0.0, 0.7, 2.5]);
        // The fused f32 op agrees with the composite one.
        let x32 = Tensor::new(&[-4.0f32, -1.3, -0.2, 0.0, 0.4, 1.7, 5.0], &Device::Cpu).unwrap();
        let a = gelu_new(&x32).unwrap().to_vec1::<f32>().unwrap();
        let b = gelu_new_composite(&x32).unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn gelu_new_derivative_matches_finite_differences() {
        let xs = [-4.0f64, -1.3, -0.2, 0.0, 0.4, 1.7, 5.0];
        let x = Tensor::new(&xs, &Device::Cpu).unwrap();
        let fused = gelu_new_derivative(&x).unwrap().to_vec1::<f64>().unwrap();
        let composite = gelu_new_derivative_composite(&x).unwrap().to_vec1::<f64>().unwrap();
        for (i, &xi) in xs.iter().enumerate() {
            let g = |v: f64| {
                gelu_new(&Tensor::new(&[v], &Device::Cpu).unwrap())
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()[0]
            };
            let fd = (g(xi + 1e-6) - g(xi - 1e-6)) / 2e-6;
            assert!((fused[i] - fd).abs() < 1e-8, "x={xi}: fused {} vs FD {fd}", fused[i]);
            assert!(
                (composite[i] - fd).abs() < 1e-8,
                "x={xi}: composite {} vs FD {fd}",
                composite[i]
            );
        }
    }

    #[test]
    fn linear_matches_matmul_and_its_input_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[0.5f64, -1.0, 2.0], [1.5, 0.25, -0.75]], &dev).unwrap();
        let b = Tensor::new(&[0.1f64, 0.2, 0.3], &dev).unwrap();
        let x = Tensor::new(&[[1.0f64, 2.0], [-1.0, 0.5]], &dev).unwrap();
        let expected = x.matmul(&w).unwrap().broadcast_add(&b).unwrap();
        let w = Weight::Dense(w);
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), expected.to_vec2::<f64>().unwrap());
        let c = Tensor::new(&[0.3f64, -1.1, 0.5], &dev).unwrap();
        fd_check(
            |x| linear(&x.reshape((2, 2))?, &w, Some(&b))?.broadcast_mul(&c),
            &[1.0, 2.0, -1.0, 0.5],
        );
    }

    /// Under a [`ReplicatedRows`] declaration, `linear` multiplies one row per group of equal
    /// rows: the output and the per-row input gradients equal the undeclared ones (stored bf16,
    /// dense f32 and dense f64 weights); rows that are not in fact equal take the full product.
    #[test]
    fn declared_replicas_give_the_full_products_and_gradients() {
        let dev = Device::Cpu;
        let (inp, out, r) = (5, 3, 4);
        let values: Vec<f32> = (0..out * inp).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
        let bytes: Vec<u8> =
            values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let stored =
            StoredMatrix::from_bytes(out, inp, fs_checkpoint::GgmlType::BF16, bytes).unwrap();
        let dense = Tensor::from_vec(stored.to_f32(), (out, inp), &dev).unwrap().t().unwrap();
        for (w, dtype) in [
            (Weight::Stored(stored), candle_core::DType::F32),
            (Weight::Dense(dense.clone()), candle_core::DType::F32),
            (
                Weight::Dense(dense.to_dtype(candle_core::DType::F64).unwrap()),
                candle_core::DType::F64,
            ),
        ] {
            // Two positions, each `r` copies of one row; then rows that differ.
            let row: Vec<f32> = (0..2 * inp).map(|i| (i as f32 * 0.7).sin()).collect();
            let equal = Tensor::from_vec(row, (2, 1, inp), &dev)
                .unwrap()
                .broadcast_as((2, r, inp))
                .unwrap()
                .contiguous()
                .unwrap();
            let unequal = Tensor::from_vec(
                (0..2 * r * inp).map(|i| (i as f32 * 0.3).cos()).collect::<Vec<f32>>(),
                (2, r, inp),
                &dev,
            )
            .unwrap();
            let c = Tensor::from_vec(
                (0..2 * r * out).map(|i| i as f32 - 7.5).collect::<Vec<f32>>(),
                (2, r, out),
                &dev,
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
            for (x, shortcut) in [(equal, 1), (unequal, 0)] {
                let before = REPLICATED_PRODUCTS.with(|c| c.get());
                let run = |declare: bool| {
                    let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
                    let y = {
                        let _guard = declare.then(|| ReplicatedRows::declare(r));
                        linear(x.as_tensor(), &w, None).unwrap()
                    };
                    let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                    let gx = g.get(x.as_tensor()).unwrap().clone();
                    let f = |t: Tensor| {
                        t.to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap()
                    };
                    (f(y).to_vec1::<f64>().unwrap(), f(gx).to_vec1::<f64>().unwrap())
                };
                let (y0, g0) = run(false);
                let (y1, g1) = run(true);
                assert_eq!(REPLICATED_PRODUCTS.with(|c| c.get()) - before, shortcut);
                for (a, b) in y0.iter().zip(&y1).chain(g0.iter().zip(&g1)) {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + a.abs()), "{a} vs {b}");
                }
                // The gradients are per row: replicas with different cotangents differ.
                assert_ne!(g1[..inp], g1[inp..2 * inp]);
            }
        }
        assert_eq!(REPLICAS.with(|c| c.get()), 0, "the declaration ends with its guard");
    }

    /// A `out × in` bf16 matrix of values drawn from `seed`.
    fn bf16_matrix(out: usize, inp: usize, seed: f32) -> StoredMatrix {
        let bytes = (0..out * inp)
            .map(|i| ((i as f32 + seed) * 0.37).sin())
            .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        StoredMatrix::from_bytes(out, inp, fs_checkpoint::GgmlType::BF16, bytes).unwrap()
    }

    /// `linear` of `r` replicas of `row`, in the weight's dtype (f64 for a dense f64 weight,
    /// else f32), under a [`ReplicatedRows`] declaration or not; as f64 (exact for f32).
    fn replicated_product(w: &Weight, row: &[f64], r: usize, declare: bool) -> Vec<f64> {
        let dtype = match w {
            Weight::Dense(t) => t.dtype(),
            Weight::Stored(_) => candle_core::DType::F32,
        };
        let x = Tensor::from_slice(row, (1, row.len()), &Device::Cpu)
            .and_then(|x| x.to_dtype(dtype)?.broadcast_as((r, row.len()))?.contiguous())
            .unwrap();
        let _guard = declare.then(|| ReplicatedRows::declare(r));
        let y = linear(&x, w, None).unwrap();
        y.to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The declared product of `w` and `row` taken from the memo (`hit`) or not, as the counters
    /// say; checked against the undeclared product (which multiplies all the replicas).
    fn memo_checked(w: &Weight, row: &[f64], hit: bool) -> Vec<f64> {
        let (hits, products) = (memo_hits(), replicated_products());
        let y = replicated_product(w, row, 3, true);
        assert_eq!(replicated_products() - products, 1, "the one-row shortcut was taken");
        assert_eq!(memo_hits() - hits, usize::from(hit), "memo hit");
        let full = replicated_product(w, row, 3, false);
        for (a, b) in y.iter().zip(&full) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        y
    }

    /// A declared product hits the memo exactly when the weight is the same (a clone of it, not
    /// equal values elsewhere) and the rows are bitwise those of the weight's previous product;
    /// a hit gives bitwise the computed product (stored bf16, dense f32 and dense f64 weights).
    #[test]
    fn replicated_products_are_memoised_by_weight_identity_and_row_bits() {
        clear_product_memo();
        let (out, inp) = (6, 5);
        let row: Vec<f64> = (0..inp).map(|i| (i as f64 * 0.9).cos()).collect();
        let mut other_row = row.clone();
        other_row[2] += 0.5;
        let mut zero_row = row.clone();
        zero_row[0] = 0.0;
        let mut negative_zero_row = row.clone();
        negative_zero_row[0] = -0.0;

        let a = bf16_matrix(out, inp, 0.0);
        let wa = Weight::Stored(a.clone());
        let y1 = memo_checked(&wa, &row, false);
        assert_eq!(bits(&memo_checked(&wa, &row, true)), bits(&y1), "the second is a hit");
        let clone = Weight::Stored(a.clone());
        assert_eq!(bits(&memo_checked(&clone, &row, true)), bits(&y1), "a clone shares the data");
        // Other rows: computed, and they replace the weight's entry.
        let y2 = memo_checked(&wa, &other_row, false);
        assert_ne!(bits(&y2), bits(&y1));
        assert_eq!(bits(&memo_checked(&wa, &row, false)), bits(&y1), "computed again, same bits");
        memo_checked(&wa, &zero_row, false);
        memo_checked(&wa, &negative_zero_row, false);
        memo_checked(&wa, &negative_zero_row, true);
        // Other weights of the same shape: other values, the same values in a new allocation,
        // the same bytes through another row order.
        memo_checked(&wa, &row, false);
        let b = memo_checked(&Weight::Stored(bf16_matrix(out, inp, 1.0)), &row, false);
        assert_ne!(bits(&b), bits(&y1));
        let fresh = memo_checked(&Weight::Stored(bf16_matrix(out, inp, 0.0)), &row, false);
        assert_eq!(bits(&fresh), bits(&y1), "equal values give the same product, computed");
        let permuted = Weight::Stored(a.select_rows(&[5, 4, 3, 2, 1, 0]));
        let p = memo_checked(&permuted, &row, false);
        for (p, y) in p[..out].iter().zip(y1[..out].iter().rev()) {
            assert!((p - y).abs() <= 1e-6 * (1.0 + y.abs()), "the rows reversed: {p} vs {y}");
        }
        memo_checked(&wa, &row, true);

        // Dense weights: by tensor id; a copy is a new tensor.
        let dense = Tensor::from_vec(a.to_f32(), (out, inp), &Device::Cpu).unwrap().t().unwrap();
        for t in [dense.clone(), dense.to_dtype(candle_core::DType::F64).unwrap()] {
            let w = Weight::Dense(t.clone());
            let y = memo_checked(&w, &row, false);
            assert_eq!(bits(&memo_checked(&w, &row, true)), bits(&y));
            assert_eq!(bits(&memo_checked(&Weight::Dense(t.clone()), &row, true)), bits(&y));
            memo_checked(&w, &other_row, false);
            let copy = Weight::Dense(t.copy().unwrap());
            assert_eq!(bits(&memo_checked(&copy, &row, false)), bits(&y));
        }
        // Undeclared products never touch the memo.
        let (hits, products) = (memo_hits(), replicated_products());
        replicated_product(&wa, &row, 3, false);
        assert_eq!((memo_hits(), replicated_products()), (hits, products));
    }

    /// A memo entry neither matches a weight made after its own was dropped (whatever the
    /// values, whatever allocation the new one gets) nor keeps the dropped weight's data alive.
    #[test]
    fn memo_entries_neither_match_nor_keep_dropped_weights() {
        clear_product_memo();
        let (out, inp) = (4, 8);
        let row: Vec<f64> = (0..inp).map(|i| 0.25 * i as f64 - 1.0).collect();
        for i in 0..64 {
            // Alternating values: a stale hit would also give a wrong product.
            let w = Weight::Stored(bf16_matrix(out, inp, (i % 2) as f32));
            memo_checked(&w, &row, false);
            let d = Weight::Dense(
                Tensor::from_vec(vec![i as f32; inp * out], (inp, out), &Device::Cpu).unwrap(),
            );
            memo_checked(&d, &row, false);
        }
        let owner: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(
            (0..out * inp).flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes()).collect(),
        );
        let shared = fs_checkpoint::SharedBytes::new(owner.clone(), 0..owner.len()).unwrap();
        let w = StoredMatrix::from_shared_bytes(out, inp, fs_checkpoint::GgmlType::BF16, shared);
        let w = Weight::Stored(w.unwrap());
        memo_checked(&w, &row, false);
        memo_checked(&w, &row, true);
        assert_eq!(std::sync::Arc::strong_count(&owner), 2);
        drop(w);
        assert!(PRODUCT_MEMO.with(|m| m.borrow().entries.len()) > 1, "the entry is still there");
        assert_eq!(std::sync::Arc::strong_count(&owner), 1, "the memo does not hold the data");
    }

    /// The memo's bounds: at most `MAX_ENTRIES` entries and `MAX_VALUES` values (emptied when
    /// full), no entry over `MAX_ENTRY_VALUES` (which also drops the weight's previous entry).
    #[test]
    fn product_memo_is_bounded() {
        use candle_core::CpuStorage;
        let key = || {
            WeightKey::Dense(Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap().id())
        };
        let rows = |v: f32| CpuStorage::F32(vec![v]);
        let mut memo = ProductMemo::default();
        let first = key();
        memo.insert(first.clone(), rows(1.0), rows(2.0), 2);
        for _ in 1..ProductMemo::MAX_ENTRIES {
            memo.insert(key(), rows(1.0), rows(2.0), 2);
        }
        assert_eq!(memo.entries.len(), ProductMemo::MAX_ENTRIES);
        assert!(memo.get(&first, &rows(1.0)).is_some() && memo.get(&first, &rows(-1.0)).is_none());
        memo.insert(key(), rows(1.0), rows(2.0), 2);
        assert_eq!((memo.entries.len(), memo.values), (1, 2), "emptied when full");
        assert!(memo.get(&first, &rows(1.0)).is_none());
        let k = key();
        memo.insert(k.clone(), rows(1.0), rows(2.0), 2);
        memo.insert(k.clone(), rows(3.0), rows(4.0), ProductMemo::MAX_ENTRY_VALUES + 1);
        assert!(memo.get(&k, &rows(1.0)).is_none() && memo.get(&k, &rows(3.0)).is_none());
        assert_eq!((memo.entries.len(), memo.values), (1, 2));
        for _ in 0..ProductMemo::MAX_VALUES / ProductMemo::MAX_ENTRY_VALUES {
            memo.insert(key(), rows(1.0), rows(2.0), ProductMemo::MAX_ENTRY_VALUES);
            assert!(memo.values <= ProductMemo::MAX_VALUES);
        }
        assert_eq!(memo.entries.len(), 1, "emptied before exceeding the values");
        assert!(!same_bits(&CpuStorage::F32(vec![0.0]), &CpuStorage::F32(vec![-0.0])));
        assert!(!same_bits(&CpuStorage::F32(vec![1.0]), &CpuStorage::F64(vec![1.0])));
    }

    /// The chunked products with a stored weight (both schedules; several chunks, a remainder,
    /// and `g W`'s parts of unequal length) against the dense products of the widened values.
    #[test]
    fn chunked_stored_products_match_dense_ones() {
        let (out, inp, rows) = (11, 6, 4);
        let values: Vec<f32> = (0..out * inp).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
        let bytes: Vec<u8> =
            values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let w = StoredMatrix::from_bytes(out, inp, fs_checkpoint::GgmlType::BF16, bytes).unwrap();
        let wf = w.to_f32();
        let x: Vec<f32> = (0..rows * inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..rows * out).map(|i| (i as f32 * 0.21).cos()).collect();
        type Schedule = fn(&[f32], usize, &StoredMatrix, Side, usize) -> Vec<f32>;
        let schedules: [Schedule; 2] = [stored_product_in_chunks, stored_product_tiled];
        for (product, chunk_floats) in
            schedules.into_iter().flat_map(|f| [3 * inp, 4 * inp, 100 * inp, 1].map(|c| (f, c)))
        {
            let y = product(&x, rows, &w, Side::Transposed, chunk_floats);
            let gx = product(&g, rows, &w, Side::Plain, chunk_floats);
            for i in 0..rows {
                for o in 0..out {
                    let want: f32 = (0..inp).map(|k| x[i * inp + k] * wf[o * inp + k]).sum();
                    assert!((y[i * out + o] - want).abs() <= 1e-5, "x Wᵀ ({i}, {o})");
                }
                for k in 0..inp {
                    let want: f32 = (0..out).map(|o| g[i * out + o] * wf[o * inp + k]).sum();
                    assert!((gx[i * inp + k] - want).abs() <= 1e-5, "g W ({i}, {k})");
                }
            }
        }
    }

    /// A bf16 weight kept as stored gives the products (forward and input gradient) of its
    /// widened f32 values: equal up to the GEMM's summation order (the widened weight is a
    /// transposed view, which the kernel walks differently), i.e. a few f32 ulps.
    #[test]
    fn stored_weight_products_equal_the_widened_dense_ones() {
        let dev = Device::Cpu;
        let (out, inp) = (5, 7);
        let values: Vec<f32> = (0..out * inp).map(|i| ((i * 13 % 17) as f32 - 8.0) / 7.0).collect();
        let bytes: Vec<u8> =
            values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let stored =
            StoredMatrix::from_bytes(out, inp, fs_checkpoint::GgmlType::BF16, bytes).unwrap();
        let widened = stored.to_host_transposed();
        let dense = Weight::Dense(Tensor::from_vec(widened.data, (inp, out), &dev).unwrap());
        let w = Weight::new(stored, &dev).unwrap();
        assert!(w.is_stored() && !dense.is_stored());
        let x = Tensor::from_vec(
            (0..3 * inp).map(|i| (i as f32).sin()).collect::<Vec<_>>(),
            (3, inp),
            &dev,
        )
        .unwrap();
        let c = Tensor::from_vec(
            (0..3 * out).map(|i| (i as f32).cos()).collect::<Vec<_>>(),
            (3, out),
            &dev,
        )
        .unwrap();
        let run = |w: &Weight| {
            let xv = candle_core::Var::from_tensor(&x).unwrap();
            let y = linear(xv.as_tensor(), w, None).unwrap();
            let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            (y.to_vec2::<f32>().unwrap(), g.get(xv.as_tensor()).unwrap().to_vec2::<f32>().unwrap())
        };
        let ((y1, g1), (y2, g2)) = (run(&w), run(&dense));
        for (a, b) in y1
            .iter()
            .flatten()
            .chain(g1.iter().flatten())
            .zip(y2.iter().flatten().chain(g2.iter().flatten()))
        {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn layer_norm_and_softmax_gradients() {
        let dev = Device::Cpu;
        let gamma = Tensor::new(&[1.3f64, 0.7, -0.4, 2.0], &dev).unwrap();
        let beta = Tensor::new(&[0.1f64, -0.2, 0.3, 0.0], &dev).unwrap();
        let w = Tensor::new(&[0.3f64, -1.1, 0.5, 0.9], &dev).unwrap();
        let ln = |x: &Tensor| layer_norm(x, &gamma, &beta, 1e-5)?.broadcast_mul(&w);
        fd_check(ln, &[0.5, -1.0, 2.0, 0.25]);
        let sm = |x: &Tensor| softmax_last_dim(x)?.broadcast_mul(&w);
        fd_check(sm, &[0.5, -1.0, 2.0, 0.25]);
    }
}
