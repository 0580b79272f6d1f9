//! Prometheus text format, parsed: `Metrics::parse(text)`, then `value` (panics when the series
//! is absent) or `get` (`None` when absent) by metric name and a subset of labels.

use std::collections::BTreeMap;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parse Prometheus text exposition format (comments and blank lines skipped).
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_line(l).unwrap_or_else(|| panic!("not a Prometheus sample line: {l:?}")))
            .collect();
        Metrics { samples }
    }

    /// The series of metric `name` whose labels include every `(label, value)` of `labels`.
    pub fn series<'a>(&'a self, name: &'a str, labels: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
        })
    }

    /// Sum of the matching series (see [`Metrics::series`]); `None` when there is none.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = false;
        let sum = self
            .series(name, labels)
            .inspect(|_| found = true)
            .map(|s| s.value)
            .sum();
        found.then_some(sum)
    }

    /// Sum of the matching series; panics, listing the series of that name that do exist, when
    /// there is none (an absent series is a failure, not 0).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let present: Vec<String> = self
                .samples
                .iter()
                .filter(|s| s.name == name)
                .map(|s| format!("{:?}", s.labels))
                .collect();
            panic!(
                "metric series {name}{labels:?} is absent; series of {name} present: {}",
                if present.is_empty() {
                    "none".to_string()
                } else {
                    present.join(", ")
                }
            )
        })
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut s) = rest.strip_prefix('{') {
        loop {
            s = s.trim_start_matches([',', ' ']);
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = s.find('=')?;
            let key = s[..eq].trim().to_string();
            s = s[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = s.char_indices();
            let close = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            s = &s[close + 1..];
            labels.insert(key, value);
        }
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name, labels, value })
}
