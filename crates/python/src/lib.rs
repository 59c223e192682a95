//! `fisher_stein._native`: the compiled half of the `fisher_stein` Python package.
//!
//! A `Model` owns one worker thread that loads the model through the command line's own
//! loader (`fisher_stein::backends::with_model`: any engine, any architecture, GGUF, hub ids)
//! and then serves requests on it, so the weights are read once and stay resident between
//! calls. A computation is `compute`'s own code ([`fisher_stein::compute::run_on`]) on the
//! held model, with its arguments parsed by the same clap definition as the command line, so
//! a result is the command line's result bit for bit and an error is its one-line message.
//! The pure-Python half (`python/fisher_stein`) turns keyword arguments into those arguments and
//! reads the results files into numpy arrays.
//!
//! While a computation runs the GIL is released; every 50 ms the caller's thread takes it
//! back to run Python's signal handlers, and a `KeyboardInterrupt` (Ctrl-C) stops the
//! computation at its next batch of positions ([`fisher_stein::signals::request_interrupt`]).

use clap::Parser;
use fisher_stein::backends::{with_model, Backend, LoadSpec, Loaded, ModelJob};
use fisher_stein::compute::ComputeArgs;
use fisher_stein::{process, signals, Globals};
use fs_checkpoint::tokenizers::Tokenizer;
use fs_checkpoint::ModelOrigin;
use fs_estimators::SplitModel;
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::sync::mpsc;
use std::time::Duration;

/// `compute`'s arguments as the command line parses them.
#[derive(Parser, Debug)]
#[command(name = "fisher_stein.compute", no_binary_name = true)]
struct ComputeCommand {
    #[command(flatten)]
    args: ComputeArgs,
}

/// Work for the model's thread.
enum Request {
    /// Run `compute` and answer with its outcome.
    Compute { args: Box<ComputeArgs>, reply: mpsc::Sender<anyhow::Result<()>> },
}

/// What the model's thread reports once the model is loaded.
struct Ready {
    /// `Model.info` as JSON.
    info: serde_json::Value,
    /// The tokenizer that came with the weights (GGUF), else the model directory's, if any.
    tokenizer: Option<Tokenizer>,
}

/// The job run on the loaded model: report [`Ready`], then answer requests until every sender
/// is gone (the Python object was dropped).
struct Serve {
    requests: mpsc::Receiver<Request>,
    ready: mpsc::Sender<anyhow::Result<Ready>>,
    spec: String,
}

impl ModelJob for Serve {
    type Output = ();
    fn run<M: SplitModel + 'static>(self, model: M, loaded: Loaded) -> anyhow::Result<()> {
        let _ = self.ready.send(ready(&self.spec, &model, &loaded));
        let g = Globals { quiet: true, verbose: false, start: std::time::Instant::now() };
        for request in self.requests {
            match request {
                Request::Compute { args, reply } => {
                    let outcome = fisher_stein::compute::run_on(&model, &loaded, &args, &g);
                    let _ = reply.send(outcome);
                }
            }
        }
        Ok(())
    }
}

/// `Model.info`: what was loaded, how, and the layers it splits at.
fn ready<M: SplitModel>(spec: &str, model: &M, loaded: &Loaded) -> anyhow::Result<Ready> {
    let dims = model.dims();
    let tokenizer = match &loaded.tokenizer {
        Some(t) => Some(t.clone()),
        None => fs_checkpoint::load_tokenizer(&loaded.files.tokenizer).ok(),
    };
    let origin = match &loaded.files.origin {
        ModelOrigin::LocalDir { dir } => serde_json::json!({"kind": "local", "dir": dir}),
        ModelOrigin::HubCache { repo_id, revision, commit, snapshot_dir } => serde_json::json!({
            "kind": "hub-cache", "repo_id": repo_id, "revision": revision, "commit": commit,
            "snapshot_dir": snapshot_dir,
        }),
    };
    let hooks: Vec<String> =
        (0..=dims.n_layers).map(|k| fisher_stein::layers::hook_name(k, dims.n_layers)).collect();
    let info = serde_json::json!({
        "model": spec,
        "model_type": loaded.model_type,
        "family": loaded.arch,
        "n_layers": dims.n_layers,
        "split_layers": (0..=dims.n_layers).collect::<Vec<_>>(),
        "hooks": hooks,
        "d_model": dims.d_model,
        "vocab_size": dims.vocab_size,
        "max_seq_len": dims.max_seq_len,
        "parameters": loaded.parameters,
        "backend": loaded.backend.name(),
        "device": loaded.device,
        "config": loaded.files.config,
        "weights": loaded.files.weights,
        "origin": origin,
        "has_tokenizer": tokenizer.is_some(),
        "load_seconds": loaded.load_s,
    });
    Ok(Ready { info, tokenizer })
}

/// The Python exception for an error of the command line's code, with its one-line message:
/// `KeyboardInterrupt` for an interrupt, `FileNotFoundError` when a file or model is missing,
/// `ValueError` otherwise (bad input, as the command line's exit code 2).
fn to_py(e: anyhow::Error) -> PyErr {
    if e.downcast_ref::<signals::Interrupted>().is_some() {
        return pyo3::exceptions::PyKeyboardInterrupt::new_err("interrupted");
    }
    let message = process::one_line(&e);
    let missing = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<fs_checkpoint::CheckpointError>(),
            Some(
                fs_checkpoint::CheckpointError::NotFound { .. }
                    | fs_checkpoint::CheckpointError::NotInCache { .. }
            )
        ) || c
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    });
    if missing {
        PyFileNotFoundError::new_err(message)
    } else {
        PyValueError::new_err(message)
    }
}

/// Wait for `rx` with the GIL released, running Python's signal handlers every 50 ms; on an
/// exception from them (Ctrl-C), raise it — after interrupting the computation and waiting for
/// it to stop (at its next batch of positions) when `stop_computation`; a load is not waited
/// for (its thread finishes loading, finds nobody to serve, and frees the model).
fn wait<T: Send>(py: Python<'_>, rx: mpsc::Receiver<T>, stop_computation: bool) -> PyResult<T> {
    let mut rx = rx;
    loop {
        // The receiver moves into the GIL-free closure and back (it is not `Sync`).
        let (got, back) = py.detach(move || (rx.recv_timeout(Duration::from_millis(50)), rx));
        rx = back;
        match got {
            Ok(v) => return Ok(v),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    if stop_computation {
                        signals::request_interrupt();
                        // It stops at its next batch; its own outcome is dropped.
                        let _ = py.detach(move || rx.recv());
                        signals::clear_interrupt();
                    }
                    return Err(e);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err(
                    "the model's worker thread stopped unexpectedly: load the model again",
                ))
            }
        }
    }
}

/// A model loaded once and kept resident; computations run on its own thread.
#[pyclass(module = "fisher_stein._native", frozen)]
struct Model {
    requests: mpsc::Sender<Request>,
    info: String,
    tokenizer: Option<Tokenizer>,
}

#[pymethods]
impl Model {
    /// Load `model` (a model directory, a `.gguf` file, or a hub id `org/name[@revision]`) on
    /// `backend` (`candle`, `burn`, `dfdx`) and `device` (`cpu`, `cuda:N`, `wgpu`).
    /// `batch_size`: positions per batched readout pass (`None`: the engine's memory budget).
    #[new]
    #[pyo3(signature = (model, backend = "candle", device = "cpu", batch_size = None))]
    fn new(
        py: Python<'_>,
        model: String,
        backend: &str,
        device: &str,
        batch_size: Option<usize>,
    ) -> PyResult<Self> {
        let device = device.to_string();
        let backend = <Backend as clap::ValueEnum>::from_str(backend, false).map_err(|_| {
            let names: Vec<&str> = Backend::ALL.iter().map(|b| b.name()).collect();
            PyValueError::new_err(format!(
                "backend {backend:?} is not an engine: use one of {}",
                names.join(", ")
            ))
        })?;
        let (requests, inbox) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let load_failed = ready_tx.clone();
        let serve = Serve { requests: inbox, ready: ready_tx, spec: model.clone() };
        std::thread::Builder::new()
            .name("fisher-stein model".into())
            .spawn(move || {
                let g = Globals { quiet: true, verbose: false, start: std::time::Instant::now() };
                let spec = LoadSpec { model: &model, backend, device: &device, batch: batch_size };
                if let Err(e) = with_model(&spec, &g, serve) {
                    // Only reaches anyone when the load failed (before `Ready` was sent).
                    let _ = load_failed.send(Err(e));
                }
            })
            .map_err(|e| {
                PyRuntimeError::new_err(format!("cannot start the model's thread: {e}"))
            })?;
        let ready = wait(py, ready_rx, false)?.map_err(to_py)?;
        Ok(Model { requests, info: ready.info.to_string(), tokenizer: ready.tokenizer })
    }

    /// What was loaded, as JSON (the Python wrapper's `Model.info` parses it).
    fn info_json(&self) -> String {
        self.info.clone()
    }

    /// Token ids of `text` as `compute --text` makes them (the tokenizer's own special tokens:
    /// BOS for Gemma and Llama 3, none for GPT-2).
    fn tokenize(&self, text: &str) -> PyResult<Vec<u32>> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            PyValueError::new_err(
                "this model has no tokenizer (tokenizer.json or vocab.json + merges.txt): pass token ids",
            )
        })?;
        let enc = tok
            .encode(text, true)
            .map_err(|e| PyValueError::new_err(format!("tokenizing failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of token ids (special tokens kept).
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("this model has no tokenizer to decode with"))?;
        tok.decode(&ids, false).map_err(|e| PyValueError::new_err(format!("decoding failed: {e}")))
    }

    /// Run `fisher-stein compute` with these arguments (without the subcommand name; `--model`,
    /// `--backend` and `--device` are recorded, the held model is used) on the held model.
    fn compute(&self, py: Python<'_>, argv: Vec<String>) -> PyResult<()> {
        let args = ComputeCommand::try_parse_from(&argv)
            .map_err(|e| PyValueError::new_err(process::usage_error_line(&e)))?
            .args;
        signals::clear_interrupt();
        let (reply, outcome) = mpsc::channel();
        self.requests.send(Request::Compute { args: Box::new(args), reply }).map_err(|_| {
            PyRuntimeError::new_err("the model's worker thread has stopped: load the model again")
        })?;
        wait(py, outcome, true)?.map_err(to_py)
    }
}

/// The engines compiled into this build (`candle`, `burn`, `dfdx`).
#[pyfunction]
fn backends() -> Vec<&'static str> {
    Backend::compiled_in().into_iter().map(Backend::name).collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    process::tune_allocator();
    process::pin_thread_count();
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(backends, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
