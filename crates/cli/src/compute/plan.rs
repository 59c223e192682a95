//! The arguments resolved against the loaded model into a [`Plan`]: layers, tokenised
//! documents, positions per document, the eigenpairs to store; and what the plan records
//! ([`RunSettings`] for run.json, [`MeanSettings`] for the mean accumulator). Every check that
//! needs the model happens here, before the results directory is touched.

use super::args::{ComputeArgs, Estimator, Format};
use crate::inputs::{read_input_file, truncate, Document};
use crate::results::{MeanInput, MeanSettings, RunSettings, Selection};
use crate::Globals;
use anyhow::{bail, Context, Result};
use fs_checkpoint::tokenizers::Tokenizer;
use fs_checkpoint::ModelFiles;
use fs_estimators::FsError;
use fs_traits::ModelDims;

/// What a `compute` run will do, every input checked.
pub(super) struct Plan {
    /// The split layers, sorted, without repeats.
    pub layers: Vec<usize>,
    /// Their TransformerLens hook names (as given, or canonical for an index).
    pub hooks: Vec<String>,
    /// The documents of this run (this shard's), tokenised and truncated.
    pub docs: Vec<Document>,
    /// The positions of each document.
    pub positions: Vec<Vec<usize>>,
    /// `d`.
    pub d: usize,
    /// Eigenpairs stored per matrix (`--eig`, `--eig-top`, at least `--directions`).
    pub eig_rank: Option<usize>,
    /// One `--text` / `--tokens` sequence: its results file is `fisher.EXT`.
    pub single: bool,
    /// `--sae`, read and checked against the model and the layer.
    pub sae: Option<crate::sae::Sae>,
}

impl Plan {
    /// Resolve `args` against the model (`dims`, its HF `model_type`; its tokenizer: the one
    /// that came with the weights, else `files`'). Prints the warnings of `--shard` and
    /// `--max-seq-len`.
    pub fn new(
        args: &ComputeArgs,
        dims: &ModelDims,
        model_type: &str,
        tokenizer: Option<&Tokenizer>,
        files: &ModelFiles,
        g: &Globals,
    ) -> Result<Plan> {
        let named = crate::layers::resolve_layers(
            args.layer.as_deref(),
            args.layers.as_deref(),
            dims.n_layers,
            model_type,
        )?;
        let layers: Vec<usize> = named.iter().map(|l| l.index).collect();
        let hooks = named.into_iter().map(|l| l.hook).collect();
        let sae = match &args.readouts.sae {
            Some(path) => {
                let sae = crate::sae::Sae::load(path)?;
                sae.check_run(path, &layers, dims.d_model, dims.n_layers, model_type)?;
                Some(sae)
            }
            None => None,
        };
        let mut docs = documents(args, tokenizer, files)?;
        if let Some(warning) = crate::dataset::select_shard(&mut docs, args.readouts.shard) {
            if !g.quiet {
                eprintln!("{warning}");
            }
        }
        g.log(&format!("{} document(s) tokenized", docs.len()));
        truncate(&mut docs, args.max_seq_len);
        let mut positions = Vec::with_capacity(docs.len());
        for d in &docs {
            let i = d.index;
            if d.truncated > 0 && !g.quiet {
                eprintln!(
                    "warning: document {i} truncated to {} tokens (--max-seq-len), {} dropped",
                    d.tokens.len(),
                    d.truncated
                );
            }
            match fs_traits::check_tokens(&d.tokens, dims.vocab_size, dims.max_seq_len) {
                Err(FsError::SequenceTooLong { len, max }) => bail!(
                    "document {i} has {len} tokens but the model accepts at most {max}: pass --max-seq-len {max} to truncate, or shorten the text"
                ),
                other => other.with_context(|| format!("document {i}"))?,
            }
            let selected = select_positions(args, d.tokens.len())?;
            if args.estimator == Estimator::Predictive {
                if let (Some(max), Some(&t)) = (dims.max_seq_len, selected.last()) {
                    if t + 2 > max {
                        bail!("the predictive estimator at position {t} of document {i} appends a token at position {}, beyond the model's {max} positions: use --max-seq-len {} or earlier positions", t + 1, max - 1);
                    }
                }
            }
            positions.push(selected);
        }
        let d = dims.d_model;
        let eig_rank = if args.estimator == Estimator::TopK {
            Some(args.top_k.min(d))
        } else if args.eig {
            Some(d)
        } else {
            args.eig_top.map(|k| k.min(d))
        };
        // --directions K stores (at least) the top K eigenpairs its read-outs refer to.
        let eig_rank = match args.readouts.directions.min(d) {
            0 => eig_rank,
            k => Some(eig_rank.unwrap_or(k).max(k)),
        };
        let single = docs.len() == 1 && args.input.is_none();
        Ok(Plan { layers, hooks, docs, positions, d, eig_rank, single, sae })
    }

    /// Positions to compute in all (layer × position × sequence).
    pub fn total(&self) -> usize {
        self.positions.iter().map(|p| p.len() * self.layers.len()).sum()
    }

    /// The token ids of every document.
    pub fn token_ids(&self) -> Vec<Vec<u32>> {
        self.docs.iter().map(|d| d.tokens.clone()).collect()
    }

    /// The results file of sequence `i` (`fisher.EXT` when the run has a single text).
    pub fn sequence_file(&self, i: usize, format: Format) -> String {
        let ext = format.extension();
        if self.single {
            format!("fisher.{ext}")
        } else {
            format!("fisher_seq_{i:06}.{ext}")
        }
    }

    /// The settings that make two runs the same run (run.json, checked by `--resume`).
    pub fn run_settings(&self, args: &ComputeArgs) -> RunSettings {
        RunSettings {
            model: args.model.clone(),
            layers: self.layers.clone(),
            estimator: args.estimator_settings(),
            distribution: args.distribution.recorded(),
            positions: self.positions.clone(),
            token_ids: self.token_ids(),
            eig_rank: self.eig_rank,
            format: format!("{:?}", args.format),
            readouts: args.readouts.settings(),
        }
    }

    /// What the mean accumulator records and a merge must agree on (hashes the weights).
    pub fn mean_settings(&self, args: &ComputeArgs, files: &ModelFiles) -> Result<MeanSettings> {
        let weights_sha256 = files
            .weights
            .iter()
            .map(|p| fs_checkpoint::sha256_file(p).map_err(anyhow::Error::from))
            .collect::<Result<Vec<_>>>()?;
        let input = match (&args.input, &args.text, &args.tokens) {
            (Some(p), _, _) => MeanInput::File(p.clone()),
            (None, Some(t), _) => MeanInput::Text(t.clone()),
            (None, None, t) => MeanInput::Tokens(t.clone()),
        };
        Ok(MeanSettings {
            model: args.model.clone(),
            weights_sha256,
            d_model: self.d,
            layers: self.layers.clone(),
            estimator: Some(args.estimator_settings()),
            distribution: args.distribution.recorded(),
            selection: Selection {
                positions: format!("{:?}", args.positions),
                position_skip: args.position_skip,
                max_positions: args.max_positions,
                max_seq_len: args.max_seq_len,
            },
            input: Some(input),
        })
    }
}

/// Tokenise / collect the documents the user gave.
fn documents(
    args: &ComputeArgs,
    tokenizer: Option<&Tokenizer>,
    files: &ModelFiles,
) -> Result<Vec<Document>> {
    let texts: Vec<String> = match (&args.tokens, &args.text, &args.input) {
        (Some(t), _, _) => {
            if t.is_empty() {
                bail!("--tokens is empty: give at least one token id");
            }
            return Ok(vec![Document { index: 0, tokens: t.clone(), text: None, truncated: 0 }]);
        }
        (None, Some(text), _) => {
            if text.trim().is_empty() {
                bail!("--text is empty: give some text to analyse");
            }
            vec![text.clone()]
        }
        (None, None, Some(path)) => read_input_file(path)?,
        (None, None, None) => {
            bail!("give the input as --text \"...\", --input FILE or --tokens 1,2,3")
        }
    };
    let start = args.start_sequence;
    if start >= texts.len() {
        bail!("--start-sequence {start} skips every document: the input has {}", texts.len());
    }
    let take = args.num_sequences.unwrap_or(usize::MAX);
    let tok = match tokenizer {
        Some(t) => t.clone(),
        None => fs_checkpoint::load_tokenizer(&files.tokenizer)?,
    };
    texts
        .into_iter()
        .enumerate()
        .skip(start)
        .take(take)
        .map(|(i, text)| {
            let ids = crate::inputs::token_ids(&tok, &text, &format!("document {i}"))?;
            Ok(Document { index: i, tokens: ids, text: Some(text), truncated: 0 })
        })
        .collect()
}

/// The positions of one document: `--positions`, then `--position-skip`, then `--max-positions`.
fn select_positions(args: &ComputeArgs, len: usize) -> Result<Vec<usize>> {
    let all = args.positions.resolve(len)?;
    let k = args.position_skip;
    let mut kept: Vec<usize> = all.iter().copied().skip(k - 1).step_by(k).collect();
    if let Some(m) = args.max_positions {
        kept.truncate(m);
    }
    if kept.is_empty() {
        bail!(
            "--positions {:?} with --position-skip {k} selects no position of a {len}-token sequence: lower the skip",
            args.positions
        );
    }
    Ok(kept)
}
