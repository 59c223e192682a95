//! The results formats, as serde types, in one place: everything `compute` and `merge` write
//! and `compute --resume`, `inspect`, `report` and `merge` read back.
//!
//! | file | type | written by | read by |
//! |---|---|---|---|
//! | `metadata.json` | [`Metadata`] (`compute`), [`MergeMetadata`] (`merge`) | `compute`, `merge` | [`MetadataView`]: `inspect`, `report`, `merge` |
//! | `run.json` | [`RunSettings`] | `compute` | `compute --resume` (compared as JSON) |
//! | `.state/seq_NNNNNN.json` | [`SequenceState`] | `compute` | `compute --resume` |
//! | `mean.safetensors` header | [`MeanHeader`] ([`MeanSettings`]) | `compute --mean`, `merge` | `merge`, `inspect`, `report`, `--resume` |
//! | `fisher*.safetensors` / `.npz` | [`Arrays`] ([`read_results`]) | `compute` | `inspect`, `report` |
//!
//! Byte-stable JSON: every JSON file is written through a `serde_json::Value` ([`pretty_json`],
//! [`compact_json`]), whose maps are sorted by key (this workspace does not enable serde_json's
//! `preserve_order`), so the keys come out sorted whatever the order of the struct fields, as
//! they did when these files were built with `json!`. `None` is written as `null`; only the
//! read-out fields of a [`PositionSummary`] are left out when absent. serde_json writes a NaN or
//! an infinity as `null`; the readers read such a `null` back as NaN ([`finite`] gives what a
//! reader of the file sees).
//!
//! Readers are as tolerant as the files' history needs: fields later versions added are
//! `#[serde(default)]`, and [`MetadataView`] (what `inspect`, `report` and `merge` take from
//! either kind of metadata.json) reads each top-level field on its own, leaving out what is
//! missing or not of the expected type.

mod files;
mod metadata;
mod settings;
mod state;

pub(crate) use files::safetensors_arrays;
pub use files::{read_results, read_results_bytes, results_files, Array, Arrays};
pub use metadata::{
    ComputeSplit, DirectionSummary, FailedPosition, LayerSummaryRow, MeanSummaryRow, MergeMetadata,
    MergedInput, Metadata, MetadataView, ModelInfo, ModelRef, Origin, PositionSummary, SaeFeature,
    SaeFeatureCosine, SaeSummary, SequenceInfo, SettingsRef, Timings, TokenEffect, TopKSummary,
    WeightHash,
};
pub use settings::{
    EstimatorSettings, MeanHeader, MeanInput, MeanSettings, ReadoutSettings, RunSettings,
    Selection, MEAN_FORMAT,
};
pub use state::SequenceState;

use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize};

/// The `tool` field of every metadata.json.
pub const TOOL: &str = "fisher-stein";

/// This build's version, the `version` field of every metadata.json.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `value` as pretty-printed JSON with sorted keys (see the module docs).
pub fn pretty_json<T: Serialize>(value: &T) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec_pretty(&serde_json::to_value(value)?)
}

/// `value` as compact JSON with sorted keys (see the module docs).
pub fn compact_json<T: Serialize>(value: &T) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&serde_json::to_value(value)?)
}

/// `value` as one line of JSON with sorted keys, for messages and tables (`null` if it cannot be
/// serialised).
pub fn json_text<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).map_or_else(|_| "null".into(), |v| v.to_string())
}

/// A number as a reader of the JSON file sees it: `None` for NaN and infinities, which
/// serde_json writes as `null`.
pub fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// The first three finite values of an eigenvalue list, `1.234e-2, …`, for the summary tables
/// (a non-finite value, read back from `null`, is left out).
pub fn top_three(values: &[f64]) -> String {
    let shown = values.iter().take(3).filter_map(|&x| finite(x));
    shown.map(|x| format!("{x:.3e}")).collect::<Vec<_>>().join(", ")
}

/// Deserialise a number written by serde_json: `null` (a NaN or an infinity when written) is NaN.
pub(crate) fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// [`nan_if_null`] for every element of a list.
fn nans_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    Ok(Vec::<Option<f64>>::deserialize(d)?.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
}

/// Deserialise any JSON value and keep it if it has the expected type, else the default: a
/// field a tolerant reader does without when it is malformed.
fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    let value = serde_json::Value::deserialize(d)?;
    Ok(T::deserialize(value).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Unsorted {
        zeta: u32,
        alpha: Option<u32>,
        mid: f64,
    }

    #[test]
    fn keys_come_out_sorted_and_none_and_nan_as_null() {
        let v = Unsorted { zeta: 1, alpha: None, mid: f64::NAN };
        assert_eq!(compact_json(&v).unwrap(), br#"{"alpha":null,"mid":null,"zeta":1}"#);
        assert_eq!(
            String::from_utf8(pretty_json(&v).unwrap()).unwrap(),
            "{\n  \"alpha\": null,\n  \"mid\": null,\n  \"zeta\": 1\n}"
        );
        assert_eq!(json_text(&v), r#"{"alpha":null,"mid":null,"zeta":1}"#);
        assert_eq!(finite(f64::INFINITY), None);
        assert_eq!(finite(1.5), Some(1.5));
    }

    /// A summary with a non-finite number is written with `null`, read back as NaN and written
    /// again with the same bytes (what `--resume` and `merge` do with it).
    #[test]
    fn summaries_round_trip_with_null_for_nan() {
        let s = PositionSummary {
            sequence: 1,
            layer: 2,
            position: 3,
            token_id: 4,
            entropy: 0.5,
            trace: f64::NAN,
            top_eigenvalues: vec![2.0, f64::INFINITY],
            effective_rank: 1.0,
            participation_ratio: 1.0,
            clamped_negative_eigenvalues: 0,
            trace_std_error: None,
            top_k: None,
            token: None,
            directions: None,
            sae: None,
        };
        let state = SequenceState { summaries: vec![s], failed: Vec::new() };
        let bytes = compact_json(&state).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains(r#""top_eigenvalues":[2.0,null],"trace":null"#), "{text}");
        assert!(!text.contains("directions") && !text.contains("\"token\""), "{text}");
        let back = SequenceState::from_bytes(std::path::Path::new("s.json"), &bytes).unwrap();
        assert!(back.summaries[0].trace.is_nan());
        assert_eq!(compact_json(&back).unwrap(), bytes);
        let e = SequenceState::from_bytes(std::path::Path::new("s.json"), br#"{"summaries": []}"#)
            .unwrap_err();
        assert_eq!(e.to_string(), "s.json is corrupt: re-run with --force to start over");
    }

    /// What `inspect` and `report` read: any JSON; a field of another type is left out.
    #[test]
    fn metadata_view_is_tolerant() {
        assert!(MetadataView::from_json(b"{").is_err());
        assert_eq!(MetadataView::from_json(b"[1, 2]").unwrap(), MetadataView::default());
        let v = MetadataView::from_json(
            br#"{"model": {"spec": "m"}, "layers": "all", "d_model": 8, "summary": 3,
                 "settings": {"model": "n", "estimator": {"name": "exact", "biased": false}}}"#,
        )
        .unwrap();
        assert_eq!((v.model_spec(), v.layers.as_ref(), v.d_model), (Some("m"), None, Some(8)));
        assert!(v.summary.is_empty());
        assert_eq!(v.estimator(), Some(&EstimatorSettings::Exact { biased: false }));
    }

    /// The mean accumulator's header: written and read back; settings written by hand (the fuzz
    /// seeds) read with defaults.
    #[test]
    fn mean_header_round_trip_and_partial_settings() {
        let h = MeanHeader {
            settings: MeanSettings {
                model: "m".into(),
                d_model: 3,
                estimator: Some(EstimatorSettings::Sampled {
                    samples: 4,
                    seed: 7,
                    temperature: 0.7,
                    top_p: 0.9,
                    biased: true,
                }),
                input: Some(MeanInput::Tokens(None)),
                ..Default::default()
            },
            shard: "0/2".into(),
        };
        let meta = h.to_metadata().unwrap();
        assert!(meta.values().any(|v| v.contains(r#""input":{"tokens":null}"#)), "{meta:?}");
        assert_eq!(MeanHeader::from_metadata(&meta).unwrap(), h);
        let mut meta = meta;
        meta.insert(
            "settings".into(),
            r#"{"weights_sha256": ["00"], "d_model": 3, "estimator": {"kind": "exact"}}"#.into(),
        );
        let read = MeanHeader::from_metadata(&meta).unwrap();
        assert_eq!((read.settings.d_model, read.settings.estimator), (3, None));
        meta.remove("format");
        assert_eq!(
            MeanHeader::from_metadata(&meta).unwrap_err(),
            "no fisher-stein accumulator header"
        );
    }
}
