//! The `list` and `watch` table: one row per VM. Pure: rows in, text out.

use crate::size::human;

/// What one row shows; None where the backend could not be asked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub name: String,
    pub ram_bytes: Option<u64>,
    pub target_bytes: Option<u64>,
    pub actual_bytes: Option<u64>,
    /// Host memory the balloon gave back (`discarded_bytes`).
    pub returned_bytes: Option<u64>,
    pub guest_available_bytes: Option<u64>,
    pub limit_bytes: Option<u64>,
    /// "yes", "no", or "-" when host-policy has no decision for it.
    pub pressure: String,
    /// "ok", "no guest", "unreachable", "denied".
    pub backend: String,
    /// "reporting", "silent", or "-".
    pub agent: String,
    /// "pinned", "host-policy" or "manual".
    pub control: String,
}

pub const HEADINGS: [&str; 11] = [
    "VM",
    "RAM",
    "TARGET",
    "ACTUAL",
    "RETURNED",
    "AVAILABLE",
    "LIMIT",
    "PRESSURE",
    "BACKEND",
    "AGENT",
    "TARGET BY",
];

fn cell(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), human)
}

/// The rows as an aligned table with a heading line.
pub fn render(rows: &[Row]) -> String {
    let cells: Vec<[String; 11]> = rows
        .iter()
        .map(|row| {
            [
                row.name.clone(),
                cell(row.ram_bytes),
                cell(row.target_bytes),
                cell(row.actual_bytes),
                cell(row.returned_bytes),
                cell(row.guest_available_bytes),
                cell(row.limit_bytes),
                row.pressure.clone(),
                row.backend.clone(),
                row.agent.clone(),
                row.control.clone(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = HEADINGS.iter().map(|h| h.len()).collect();
    for line in &cells {
        for (width, text) in widths.iter_mut().zip(line) {
            *width = (*width).max(text.chars().count());
        }
    }
    let format_line = |texts: &mut dyn Iterator<Item = &str>| -> String {
        let parts: Vec<String> = texts
            .zip(&widths)
            .enumerate()
            .map(|(column, (text, width))| {
                // Names and words left, sizes right.
                if column == 0 || column >= 7 {
                    format!("{text:<width$}")
                } else {
                    format!("{text:>width$}")
                }
            })
            .collect();
        parts.join("  ").trim_end().to_string()
    };
    let mut out = format_line(&mut HEADINGS.iter().copied());
    out.push('\n');
    for line in &cells {
        out.push_str(&format_line(&mut line.iter().map(String::as_str)));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_missing_values_show_a_dash() {
        let rows = [
            Row {
                name: "web".into(),
                ram_bytes: Some(2 << 30),
                target_bytes: Some(512 << 20),
                actual_bytes: Some(512 << 20),
                returned_bytes: Some(510 << 20),
                guest_available_bytes: Some(1 << 30),
                limit_bytes: Some(1331 << 20),
                pressure: "no".into(),
                backend: "ok".into(),
                agent: "reporting".into(),
                control: "host-policy".into(),
            },
            Row {
                name: "database-primary".into(),
                pressure: "-".into(),
                backend: "unreachable".into(),
                agent: "-".into(),
                control: "manual".into(),
                ..Row::default()
            },
        ];
        let table = render(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("VM "), "{table}");
        // Every line has the TARGET column ending at the same place.
        let end = lines[0].find("TARGET").unwrap() + "TARGET".len();
        assert!(lines[1][..end].ends_with("512 MiB"), "{table}");
        assert!(lines[2][..end].trim_end().ends_with('-'), "{table}");
        assert!(lines[2].contains("unreachable"));
    }
}
