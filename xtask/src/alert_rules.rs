//! The Prometheus alerting rules the package ships
//! (`packaging/prometheus/balloon-stack-alerts.yml`), checked by Debian's
//! promtool: the rules parse, and each alert fires on its sample series
//! and stays quiet on the others (`balloon-stack-alerts.test.yml`).

#[cfg(test)]
mod tests {
    use std::process::Command;

    use crate::provision::{ensure_packages, workspace_root};

    fn promtool(args: &[&str]) -> String {
        ensure_packages(&[("promtool", "prometheus")]).unwrap();
        let output = Command::new("promtool")
            .current_dir(workspace_root().join("packaging/prometheus"))
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "promtool {args:?}:\n{text}");
        text
    }

    #[test]
    fn the_shipped_alert_rules_parse() {
        let text = promtool(&["check", "rules", "balloon-stack-alerts.yml"]);
        assert!(text.contains("SUCCESS: 6 rules found"), "{text}");
    }

    #[test]
    fn each_alert_fires_on_its_sample_series_and_only_there() {
        promtool(&["test", "rules", "balloon-stack-alerts.test.yml"]);
    }
}
