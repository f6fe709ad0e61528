//! `colony bench <suite>`: benchmark suites. Each prints a table and, with `--json FILE`,
//! writes `{"suite": …, "cases": [ … ]}` as `shared/benchmarks.md` describes.

pub mod allreduce;
pub mod dht;
pub mod edit;
pub mod infer;
pub mod infer_gpu;
pub mod route;
pub mod train;

use std::path::Path;

use serde::Serialize;

/// Writes a suite's results as JSON.
pub fn write_json<C: Serialize>(path: &Path, suite: &str, cases: &[C]) -> anyhow::Result<()> {
    let doc = serde_json::json!({ "suite": suite, "cases": cases });
    crate::storage::write_atomic(path, serde_json::to_string_pretty(&doc)?.as_bytes(), 0o644)
}

/// The p-th percentile (0..=100) of `xs`, by nearest rank; NaN when empty.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// Resident memory of this process, MiB (Linux; None elsewhere).
pub fn rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(super::percentile(&xs, 50.0), 50.0);
        assert_eq!(super::percentile(&xs, 99.0), 99.0);
        assert_eq!(super::percentile(&xs, 100.0), 100.0);
        assert_eq!(super::percentile(&[3.0], 50.0), 3.0);
        assert!(super::percentile(&[], 50.0).is_nan());
    }
}
