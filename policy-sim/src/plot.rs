//! Runs side by side in one SVG: a column per run (policy), a row per
//! quantity; panels of a row share their y range so columns compare at a
//! glance. Used by `simulate --compare` and by the real-guest benchmark.

use std::path::Path;

use plotters::prelude::*;

use crate::SimError;
/// The colours callers outside this crate name their lines with.
pub use plotters::style::{colors, RGBColor};

/// A named series of (seconds, value) points.
pub struct Line {
    pub name: String,
    pub colour: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title (shown on the first row only) and its lines.
pub struct Panel {
    pub title: String,
    pub lines: Vec<Line>,
}

/// Width of one column, height of one row, in pixels.
const COLUMN_PX: u32 = 480;
const ROW_PX: u32 = 360;

/// Draws `columns` (each a list of panels, one per row of `row_units`)
/// over 0..`x_max_s` seconds.
pub fn grid_svg(
    path: &Path,
    x_max_s: f64,
    row_units: &[&str],
    columns: &[Vec<Panel>],
) -> Result<(), SimError> {
    let plot = |e: &dyn std::fmt::Display| SimError::Plot(e.to_string());
    let column_count = u32::try_from(columns.len().max(1)).map_err(|e| plot(&e))?;
    let row_count = u32::try_from(row_units.len().max(1)).map_err(|e| plot(&e))?;
    let size = (
        COLUMN_PX.saturating_mul(column_count),
        ROW_PX.saturating_mul(row_count),
    );
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot(&e))?;
    let areas = root.split_evenly((row_units.len().max(1), columns.len().max(1)));
    for (row, unit) in row_units.iter().enumerate() {
        let values = || {
            columns
                .iter()
                .filter_map(|panels| panels.get(row))
                .flat_map(|panel| &panel.lines)
                .flat_map(|line| line.points.iter().map(|(_, y)| *y))
        };
        let max_y = values().fold(1.0f64, f64::max);
        // Below zero only when a series is (a guest's free memory can be).
        let min_y = values().fold(0.0f64, f64::min);
        for (column, panels) in columns.iter().enumerate() {
            let (Some(panel), Some(area)) = (
                panels.get(row),
                areas.get(row * columns.len().max(1) + column),
            ) else {
                continue;
            };
            let caption = if row == 0 { panel.title.as_str() } else { "" };
            let mut chart = ChartBuilder::on(area)
                .caption(caption, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(0f64..x_max_s, min_y..max_y * 1.05)
                .map_err(|e| plot(&e))?;
            chart
                .configure_mesh()
                .x_desc("seconds")
                .y_desc(*unit)
                .draw()
                .map_err(|e| plot(&e))?;
            for line in &panel.lines {
                let colour = line.colour;
                chart
                    .draw_series(LineSeries::new(
                        line.points.iter().copied(),
                        colour.stroke_width(2),
                    ))
                    .map_err(|e| plot(&e))?
                    .label(line.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
            }
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(|e| plot(&e))?;
        }
    }
    root.present().map_err(|e| plot(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_has_every_panel_and_legend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.svg");
        let panel = |title: &str, name: &str| Panel {
            title: title.into(),
            lines: vec![Line {
                name: name.into(),
                colour: BLUE,
                points: vec![(0.0, 1.0), (10.0, 5.0)],
            }],
        };
        let columns = vec![
            vec![panel("ours", "host available"), panel("ours", "pressure")],
            vec![panel("mom", "host available"), panel("mom", "pressure")],
        ];
        grid_svg(&path, 10.0, &["MiB", "%"], &columns).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in ["ours", "mom", "host available", "pressure", "MiB"] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert_eq!(svg.matches("host available").count(), 2);
    }
}
