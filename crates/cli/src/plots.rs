//! Plots of a results directory, drawn with `plotters` into SVG (text as `<text>`, for the HTML
//! report) and PNG (rasterised with the vendored DejaVu Sans subset in `assets/fonts`, encoded by
//! the `png` crate):
//!
//! * the eigenvalue spectrum of F per layer (log scale; the mean F over the analysed positions);
//! * effective rank and participation ratio vs layer;
//! * next-token entropy vs trace of F, one point per analysed position, coloured by layer.

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// The font every plot's text is drawn with (registered as `sans-serif`).
static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans-subset.ttf");

/// Width and height of every plot, in pixels.
pub const SIZE: (u32, u32) = (900, 540);

/// A plot in both formats.
pub struct Plot {
    /// File stem (`spectra`, `effective_rank`, `entropy_trace`).
    pub name: &'static str,
    /// A one-line caption.
    pub caption: String,
    /// The SVG document.
    pub svg: String,
    /// The PNG file.
    pub png: Vec<u8>,
}

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| register_font_now().is_ok());
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the vendored plot font assets/fonts/DejaVuSans-subset.ttf is invalid"))
    }
}

fn register_font_now() -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("invalid font"))
}

/// Something that draws itself on any plotters backend.
trait Drawer {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>;
}

/// Draw `d` into an SVG string and a PNG image.
fn render<D: Drawer>(name: &'static str, caption: String, d: &D) -> Result<Plot> {
    register_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        d.draw(&root)?;
        root.present().map_err(|e| anyhow!("drawing {name}.svg: {e}"))?;
    }
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        d.draw(&root)?;
        root.present().map_err(|e| anyhow!("drawing {name}.png: {e}"))?;
    }
    Ok(Plot { name, caption, svg, png: encode_png(&rgb, SIZE)? })
}

fn encode_png(rgb: &[u8], (w, h): (u32, u32)) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("encoding PNG")?;
        writer.write_image_data(rgb).context("encoding PNG")?;
    }
    Ok(out)
}

/// A colour per layer: blue (first) → red (last).
fn layer_color(i: usize, n: usize) -> RGBColor {
    let t = if n <= 1 { 0.0 } else { i as f64 / (n - 1) as f64 };
    // Piecewise-linear through a perceptually ordered palette (viridis-like endpoints).
    let stops = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (220.0, 160.0, 0.0),
    ];
    let x = t * (stops.len() - 1) as f64;
    let k = (x.floor() as usize).min(stops.len() - 2);
    let f = x - k as f64;
    let lerp = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    RGBColor(
        lerp(stops[k].0, stops[k + 1].0),
        lerp(stops[k].1, stops[k + 1].1),
        lerp(stops[k].2, stops[k + 1].2),
    )
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

struct SpectraPlot<'a> {
    layers: &'a [(usize, Vec<f64>)],
    floor: f64,
    min: f64,
    max: f64,
    d: usize,
    n: usize,
}

impl Drawer for SpectraPlot<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let SpectraPlot { layers, floor, min, max, d, n } = *self;
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(root)
            .caption("Fisher eigenvalue spectra", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(1f64..d as f64, (min * 0.8..max * 1.25).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("eigenvalue index i (descending)")
            .y_desc("eigenvalue λ")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (i, (layer, eig)) in layers.iter().enumerate() {
            let color = layer_color(i, n);
            let points: Vec<(f64, f64)> = eig
                .iter()
                .enumerate()
                .filter(|(_, &x)| x >= floor)
                .map(|(k, &x)| ((k + 1) as f64, x))
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(err)?
                .label(format!("layer {layer}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
        }
        if n <= 12 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(err)?;
        } else {
            let style = TextStyle::from(("sans-serif", 13).into_font()).color(&BLACK);
            root.draw_text(
                &format!("colour: layer {} (dark) → {} (yellow)", layers[0].0, layers[n - 1].0),
                &style,
                (SIZE.0 as i32 - 330, 50),
            )
            .map_err(err)?;
        }
        Ok(())
    }
}

struct EffectiveRankPlot<'a> {
    rows: &'a [RankRow],
    lmin: i32,
    lmax: i32,
    ymax: f64,
}

impl Drawer for EffectiveRankPlot<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let EffectiveRankPlot { rows, lmin, lmax, ymax } = *self;
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(root)
            .caption("Effective dimension of F vs layer", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((lmin..lmax).into_segmented(), 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("layer k")
            .y_desc("directions")
            .x_labels((lmax - lmin + 1) as usize)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(k) | SegmentValue::Exact(k) => format!("{k}"),
                SegmentValue::Last => String::new(),
            })
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        type Series<'s> = (&'s str, RGBColor, Box<dyn Fn(&RankRow) -> Option<f64>>);
        let series: [Series<'_>; 3] = [
            ("effective rank", RGBColor(31, 119, 180), Box::new(|r| Some(r.effective_rank))),
            (
                "participation ratio",
                RGBColor(214, 39, 40),
                Box::new(|r| Some(r.participation_ratio)),
            ),
            (
                "effective rank of mean F",
                RGBColor(44, 160, 44),
                Box::new(|r| r.mean_fisher_effective_rank),
            ),
        ];
        for (label, color, f) in series.iter() {
            let pts: Vec<(SegmentValue<i32>, f64)> = rows
                .iter()
                .filter_map(|r| f(r).map(|y| (SegmentValue::CenterOf(r.layer as i32), y)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let c = *color;
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(err)?
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        Ok(())
    }
}

struct EntropyTracePlot<'a> {
    points: &'a [(usize, f64, f64)],
    layers: &'a [usize],
    xmax: f64,
    tmin: f64,
    tmax: f64,
    n: usize,
}

impl Drawer for EntropyTracePlot<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let EntropyTracePlot { points, layers, xmax, tmin, tmax, n } = *self;
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(root)
            .caption("Entropy vs trace of F", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xmax, (tmin..tmax).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("entropy H(p) (nats)")
            .y_desc("tr F")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (i, &layer) in layers.iter().enumerate() {
            let c = layer_color(i, n);
            let pts: Vec<(f64, f64)> =
                points.iter().filter(|p| p.0 == layer && p.2 > 0.0).map(|p| (p.1, p.2)).collect();
            let s = chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))
                .map_err(err)?;
            if n <= 12 {
                s.label(format!("layer {layer}"))
                    .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
            }
        }
        if n <= 12 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(err)?;
        }
        Ok(())
    }
}

/// The eigenvalue spectra (descending, log scale) of one Fisher matrix per layer.
pub fn spectra(layers: &[(usize, Vec<f64>)], what: &str) -> Result<Plot> {
    let max = layers.iter().flat_map(|(_, e)| e.iter().copied()).fold(0.0f64, f64::max);
    let floor = if max > 0.0 { max * 1e-10 } else { 1e-12 };
    let min = layers
        .iter()
        .flat_map(|(_, e)| e.iter().copied())
        .filter(|&x| x >= floor)
        .fold(max.max(floor), f64::min);
    let d = layers.iter().map(|(_, e)| e.len()).max().unwrap_or(1).max(2);
    let n = layers.len();
    let caption = format!(
        "Eigenvalue spectrum of {what} per layer (descending, log scale; eigenvalues below 1e-10·max omitted)"
    );
    render("spectra", caption, &SpectraPlot { layers, floor, min, max, d, n })
}

/// One layer's summary for [`effective_rank`].
pub struct RankRow {
    /// The split layer.
    pub layer: usize,
    /// Mean effective rank over the analysed positions.
    pub effective_rank: f64,
    /// Mean participation ratio over the analysed positions.
    pub participation_ratio: f64,
    /// Effective rank of the mean Fisher (if a dataset mean was accumulated).
    pub mean_fisher_effective_rank: Option<f64>,
}

/// Effective rank and participation ratio vs layer.
pub fn effective_rank(rows: &[RankRow]) -> Result<Plot> {
    let lmin = rows.iter().map(|r| r.layer).min().unwrap_or(0) as i32;
    let lmax = rows.iter().map(|r| r.layer).max().unwrap_or(0) as i32;
    let ymax = rows
        .iter()
        .flat_map(|r| {
            [r.effective_rank, r.participation_ratio, r.mean_fisher_effective_rank.unwrap_or(0.0)]
        })
        .fold(1.0f64, f64::max)
        * 1.15;
    let caption = "Effective rank exp(H(λ/Σλ)) and participation ratio (Σλ)²/Σλ² of F vs layer (means over the analysed positions)".to_string();
    render("effective_rank", caption, &EffectiveRankPlot { rows, lmin, lmax, ymax })
}

/// Next-token entropy vs trace of F, one point per analysed (layer, position).
pub fn entropy_trace(points: &[(usize, f64, f64)], layers: &[usize]) -> Result<Plot> {
    let xmax = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.08;
    let tmax = points.iter().map(|p| p.2).fold(0.0f64, f64::max);
    let tmin = points.iter().map(|p| p.2).filter(|&t| t > 0.0).fold(tmax.max(1e-30), f64::min);
    let (tmin, tmax) = if tmax > 0.0 { (tmin * 0.7, tmax * 1.4) } else { (1e-3, 1.0) };
    let n = layers.len();
    let caption =
        "Next-token entropy (nats) vs tr F, one point per analysed position, coloured by layer"
            .to_string();
    render("entropy_trace", caption, &EntropyTracePlot { points, layers, xmax, tmin, tmax, n })
}

struct SteeringPlot<'a> {
    series: &'a [(String, Vec<(f64, f64)>)],
    lo: f64,
    hi: f64,
}

impl Drawer for SteeringPlot<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let SteeringPlot { series, lo, hi } = *self;
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(root)
            .caption("Off-target KL at matched target probability", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((lo..hi).log_scale(), (lo..hi).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("Fisher direction (F + λI)⁻¹g")
            .y_desc("other method")
            .x_label_formatter(&|v| format!("{v:.0e}"))
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(LineSeries::new(vec![(lo, lo), (hi, hi)], grey.stroke_width(1)))
            .map_err(err)?
            .label("equal (above: Fisher lower)")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], grey.stroke_width(1))
            });
        for (i, (name, points)) in series.iter().enumerate() {
            let c = layer_color(i, series.len().max(2));
            let pts: Vec<(f64, f64)> =
                points.iter().copied().filter(|(x, y)| *x > 0.0 && *y > 0.0).collect();
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 5, c.filled())))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| Circle::new((x + 8, y), 5, c.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        Ok(())
    }
}

/// Each method's off-target KL against the Fisher direction's at the same target probability,
/// one point per steered pair (`(fisher, method)` per series), log-log with the diagonal.
pub fn steering_scatter(series: &[(String, Vec<(f64, f64)>)]) -> Result<Plot> {
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().flat_map(|&(x, y)| [x, y]))
        .filter(|x| x.is_finite() && *x > 0.0)
        .collect();
    let hi = all.iter().copied().fold(f64::MIN_POSITIVE, f64::max) * 2.0;
    let lo = all.iter().copied().fold(hi, f64::min) / 2.0;
    let lo = if lo < hi { lo } else { hi / 10.0 };
    let caption = "Off-target KL (KL between the renormalised non-target distributions) of each steered pair, each method against the Fisher direction at the same target probability (for a method that stopped short, Fisher's interpolated along its path at the probability the method reached); points above the diagonal cost more than Fisher steering".to_string();
    render("steering", caption, &SteeringPlot { series, lo, hi })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_render_in_both_formats() {
        let spectra_in: Vec<(usize, Vec<f64>)> = (0..3)
            .map(|l| (l, (0..20).map(|i| 10f64.powf(-(i as f64) * 0.3 - l as f64)).collect()))
            .collect();
        let p = spectra(&spectra_in, "F").unwrap();
        assert!(p.svg.starts_with("<svg") && p.svg.contains("layer 2"), "{}", &p.svg[..200]);
        assert_eq!(&p.png[1..4], b"PNG");
        let rows: Vec<RankRow> = (0..3)
            .map(|l| RankRow {
                layer: l,
                effective_rank: 3.0 + l as f64,
                participation_ratio: 2.0,
                mean_fisher_effective_rank: Some(4.0),
            })
            .collect();
        let p = effective_rank(&rows).unwrap();
        assert!(p.svg.contains("participation ratio"));
        let p = entropy_trace(&[(0, 1.0, 0.5), (1, 2.0, 0.1), (1, 0.0, 0.0)], &[0, 1]).unwrap();
        assert!(p.svg.contains("tr F"));
        // Degenerate inputs (a single layer, all-zero spectrum) still draw.
        assert!(spectra(&[(5, vec![0.0; 4])], "F").is_ok());
        assert!(entropy_trace(&[], &[]).is_ok());
        let pts = vec![
            ("euclidean".to_string(), vec![(1e-2, 3e-2), (2e-3, 1e-3)]),
            ("contrast".to_string(), vec![(1e-2, 1e-1)]),
        ];
        let p = steering_scatter(&pts).unwrap();
        assert!(p.svg.contains("Fisher direction") && p.svg.contains("contrast"));
        assert_eq!(&p.png[1..4], b"PNG");
        assert!(steering_scatter(&[]).is_ok());
    }
}
