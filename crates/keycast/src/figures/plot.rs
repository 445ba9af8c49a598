//! A figure's data, written as CSV and drawn as SVG and PNG (plotters, with a font compiled
//! into the binary so PNG text needs no system font).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

/// DejaVu Sans (Bitstream Vera licence, see assets/fonts/DejaVuSans-LICENSE.txt).
static FONT: &[u8] = include_bytes!("../../../../assets/fonts/DejaVuSans.ttf");
const SIZE: (u32, u32) = (900, 560);

/// One line of a figure.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed-looking (points only, no line): closed forms and references.
    pub reference: bool,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, reference: false }
    }

    pub fn reference(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, reference: true }
    }
}

/// A figure: its file stem, axes and lines, and the one line for figures.md.
#[derive(Clone, Debug)]
pub struct Figure {
    pub stem: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
    /// What the paper reported.
    pub paper: String,
    /// What keycast measured, in one line.
    pub measured: String,
}

impl Figure {
    /// A figure on linear axes, with nothing yet said of the paper or the measurement.
    pub fn new(stem: &str, title: &str, x_label: &str, y_label: &str, series: Vec<Series>) -> Figure {
        Figure {
            stem: stem.into(),
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            log_x: false,
            log_y: false,
            series,
            paper: String::new(),
            measured: String::new(),
        }
    }

    /// Long-form CSV: one row per point.
    pub fn csv(&self) -> String {
        let mut out = format!("series,{},{}\n", csv_field(&self.x_label), csv_field(&self.y_label));
        for s in &self.series {
            for (x, y) in &s.points {
                let _ = writeln!(out, "{},{x},{y}", csv_field(&s.name));
            }
        }
        out
    }

    /// Writes DIR/stem.csv, .svg and .png.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::write(dir.join(format!("{}.csv", self.stem)), self.csv()).map_err(|e| e.to_string())?;
        register_font();
        let svg = dir.join(format!("{}.svg", self.stem));
        self.draw(SVGBackend::new(&svg, SIZE).into_drawing_area())?;
        let png = dir.join(format!("{}.png", self.stem));
        self.draw(BitMapBackend::new(&png, SIZE).into_drawing_area())
    }

    fn bounds(&self) -> ((f64, f64), (f64, f64)) {
        let points = || self.series.iter().flat_map(|s| s.points.iter().copied());
        let fold = |f: fn(&(f64, f64)) -> f64| {
            points().map(|p| f(&p)).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
        };
        let pad = |(lo, hi): (f64, f64), log: bool| {
            if log {
                (lo.max(1e-9) / 1.2, hi * 1.2)
            } else {
                let span = (hi - lo).max(hi.abs() * 0.1).max(1e-9);
                (if lo >= 0.0 { 0.0 } else { lo - 0.05 * span }, hi + 0.08 * span)
            }
        };
        (pad(fold(|p| p.0), self.log_x), pad(fold(|p| p.1), self.log_y))
    }

    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let ((x0, x1), (y0, y1)) = self.bounds();
        let mut builder = ChartBuilder::on(&root);
        builder.caption(&self.title, ("sans-serif", 20)).margin(14).x_label_area_size(48).y_label_area_size(72);
        macro_rules! chart {
            ($x:expr, $y:expr) => {{
                let mut chart = builder.build_cartesian_2d($x, $y).map_err(|e| e.to_string())?;
                chart
                    .configure_mesh()
                    .x_desc(&self.x_label)
                    .y_desc(&self.y_label)
                    .label_style(("sans-serif", 14))
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| tick(*v))
                    .draw()
                    .map_err(|e| e.to_string())?;
                // Closed forms and references last, so a measured line never hides them.
                let mut order: Vec<(usize, &Series)> = self.series.iter().enumerate().collect();
                order.sort_by_key(|(_, s)| s.reference);
                for (i, s) in order {
                    let color = SERIES_COLORS[i % SERIES_COLORS.len()].to_rgba();
                    let points = s.points.clone();
                    let drawn = if s.reference {
                        chart.draw_series(points.into_iter().map(move |p| Cross::new(p, 5, color.stroke_width(2))))
                    } else {
                        chart.draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(2))
                    };
                    drawn.map_err(|e| e.to_string())?.label(s.name.clone()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .label_font(("sans-serif", 13))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .draw()
                    .map_err(|e| e.to_string())?;
            }};
        }
        match (self.log_x, self.log_y) {
            (false, false) => chart!(x0..x1, y0..y1),
            (true, false) => chart!((x0..x1).log_scale(), y0..y1),
            (false, true) => chart!(x0..x1, (y0..y1).log_scale()),
            (true, true) => chart!((x0..x1).log_scale(), (y0..y1).log_scale()),
        }
        root.present().map_err(|e| e.to_string())
    }
}

/// Strong colours only (Tableau 10): Palette99 drew some series in pale yellow.
const SERIES_COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// An axis tick as people write it: 1M, 250k, 4096, 0.5 (not 1000000.0).
fn tick(value: f64) -> String {
    let short = |v: f64| {
        let text = format!("{v:.2}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    match value.abs() {
        a if a >= 1e6 => format!("{}M", short(value / 1e6)),
        a if a >= 1e4 => format!("{}k", short(value / 1e3)),
        _ => short(value),
    }
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            if plotters::style::register_font("sans-serif", style, FONT).is_err() {
                panic!("the bundled DejaVu Sans does not parse");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn ticks_read_as_people_write_numbers() {
        let ticks: Vec<String> = [1_000_000.0, 1_500_000.0, 250_000.0, 4096.0, 0.5, 0.0, 12.25].into_iter().map(super::tick).collect();
        assert_eq!(ticks, ["1M", "1.5M", "250k", "4096", "0.5", "0", "12.25"]);
    }
}
