//! The error type shared by models and estimators.

/// `Result` with [`FsError`].
pub type Result<T, E = FsError> = std::result::Result<T, E>;

/// Everything that can go wrong between a model and an estimator. Every message names the
/// offending value and the range or shape that was expected, in one line.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum FsError {
    /// An array had the wrong length or shape.
    #[error("dimension mismatch in {what}: expected {expected}, got {got}")]
    DimensionMismatch {
        /// Which array.
        what: String,
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// A split layer outside `0..=n_layers`.
    #[error("layer {layer} is out of range: this model splits at layers 0..={n_layers} (0 = embeddings, {n_layers} = last block before the final norm)")]
    LayerOutOfRange {
        /// Requested layer.
        layer: usize,
        /// Number of blocks.
        n_layers: usize,
    },
    /// A position outside `0..seq_len`.
    #[error(
        "position {position} is out of range: the sequence has {seq_len} positions (0..{seq_len})"
    )]
    PositionOutOfRange {
        /// Requested position.
        position: usize,
        /// Sequence length.
        seq_len: usize,
    },
    /// A token id `≥ V`.
    #[error("token id {token} at index {index} is out of range: the vocabulary has {vocab_size} tokens (ids 0..={})", vocab_size.saturating_sub(1))]
    TokenOutOfRange {
        /// The token id.
        token: u32,
        /// Where it was in the input.
        index: usize,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// No tokens.
    #[error("the token sequence is empty: give at least one token")]
    EmptySequence,
    /// A sequence longer than the model's context.
    #[error("the sequence has {len} tokens but the model accepts at most {max}: shorten the text or truncate it")]
    SequenceTooLong {
        /// Sequence length.
        len: usize,
        /// Model limit.
        max: usize,
    },
    /// A NaN or infinity where finite numbers are required.
    #[error("non-finite value {value} in {what} at index {index}")]
    NonFinite {
        /// Which array.
        what: String,
        /// First bad index.
        index: usize,
        /// The value (NaN or ±inf).
        value: f64,
    },
    /// A probability vector that is negative somewhere or does not sum to 1.
    #[error("{what} is not a probability vector: {detail}")]
    NotAProbability {
        /// Which array.
        what: String,
        /// What is wrong, with the numbers.
        detail: String,
    },
    /// An argument outside its valid range (samples = 0, top-p outside (0, 1], …).
    #[error("invalid {name} = {value}: {expected}")]
    InvalidArgument {
        /// Argument name.
        name: String,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// A linear-algebra routine failed (e.g. an eigensolver did not converge).
    #[error("linear algebra failed in {0}")]
    LinearAlgebra(String),
    /// A failure inside a model backend, with the backend's message.
    #[error("backend error: {0}")]
    Backend(String),
    /// An optional [`SplitModel`](crate::SplitModel) capability the model does not implement
    /// (the message names the method and what needs it).
    #[error("not supported by this model: {0}")]
    Unsupported(String),
}

impl FsError {
    /// Shorthand for [`FsError::InvalidArgument`].
    pub fn invalid(
        name: impl Into<String>,
        value: impl ToString,
        expected: impl Into<String>,
    ) -> Self {
        FsError::InvalidArgument {
            name: name.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}
