//! The metric catalogue (docs/METRICS.md), the Grafana dashboard (dashboards/syncrelay.json) and the
//! alert rules (dashboards/alerts.yml) agree with the metrics the code registers (src/metrics.rs).
//!
//! No Prometheus or Grafana needed: tests/prometheus/check.sh evaluates the same queries against a
//! real Prometheus.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;
use syncrelay::metrics::{self, Metrics};

fn read(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A gathered metric family: its type (`counter`, `gauge`, `histogram`, ...) and label names.
struct Family {
    kind: String,
    labels: BTreeSet<String>,
}

/// Every family the registry exports, by name.
fn registry_families() -> BTreeMap<String, Family> {
    let m = Metrics::new();
    // A registry omits vectors that have no series yet; the API series only appear with the first
    // request, so create one of each here. (If a new labelled metric is added without pre-created
    // series, touch it here too, or its documentation row is reported as unknown.)
    m.http_requests
        .with_label_values(&["/catalogue-test", "GET", "2xx"])
        .inc();
    m.http_request_duration
        .with_label_values(&["/catalogue-test"])
        .observe(0.001);
    m.kafka_consumer_lag
        .with_label_values(&["sync_job_run.events", "0"])
        .set(0);
    m.kafka_committed_offset
        .with_label_values(&["sync_job_run.events", "0"])
        .set(0);
    m.target_breaker_state.with_label_values(&["catalogue-test"]).set(0);
    m.target_concurrency_limit.with_label_values(&["catalogue-test"]).set(1);
    let mut out = BTreeMap::new();
    for mf in m.registry.gather() {
        let labels = mf
            .get_metric()
            .iter()
            .flat_map(|metric| metric.get_label().iter().map(|l| l.name().to_string()))
            .collect();
        let kind = format!("{:?}", mf.get_field_type()).to_lowercase();
        out.insert(mf.name().to_string(), Family { kind, labels });
    }
    out
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `<prefix>\w+` word in `text` (whole words only, so `x_syncrelay_y` does not count).
fn names_with_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    let mut prev: Option<char> = None;
    while let Some(pos) = rest.find(prefix) {
        let before = if pos == 0 {
            prev
        } else {
            rest[..pos].chars().next_back()
        };
        let tail = &rest[pos..];
        let len = tail.find(|c: char| !is_word(c)).unwrap_or(tail.len());
        let word = &tail[..len];
        if !before.is_some_and(is_word) && word.len() > prefix.len() {
            out.insert(word.to_string());
        }
        prev = word.chars().next_back();
        rest = &tail[len.max(prefix.len())..];
    }
    out
}

/// The family a sample name belongs to: itself, or itself minus a histogram/summary suffix.
fn family_of<'a>(name: &'a str, families: &BTreeMap<String, Family>) -> Option<&'a str> {
    if families.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix))
        .find(|base| families.contains_key(*base))
}

fn assert_names_exist(source: &str, text: &str, families: &BTreeMap<String, Family>) {
    let mut unknown: Vec<String> = names_with_prefix(text, "syncrelay_")
        .into_iter()
        .filter(|n| family_of(n, families).is_none())
        .collect();
    if cfg!(target_os = "linux") {
        unknown.extend(
            names_with_prefix(text, "process_")
                .into_iter()
                .filter(|n| family_of(n, families).is_none()),
        );
    }
    assert!(
        unknown.is_empty(),
        "{source} uses metric names the registry (src/metrics.rs) does not export: {unknown:?}"
    );
}

/// The catalogue rows of docs/METRICS.md: `| \`syncrelay_...\` | type | labels | meaning | used by |`.
struct Row {
    name: String,
    kind: String,
    /// label name -> the backticked values listed after it (empty for open sets like `route`).
    labels: BTreeMap<String, BTreeSet<String>>,
}

fn backticked(s: &str) -> Vec<String> {
    s.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

fn catalogue_rows(doc: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    for line in doc.lines() {
        let line = line.trim();
        if !line.starts_with("| `syncrelay_") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert!(cells.len() >= 5, "catalogue row needs 5 columns: {line}");
        let name = backticked(cells[0]).into_iter().next().expect("name in backticks");
        let mut labels = BTreeMap::new();
        for part in cells[2].split("<br>") {
            let part = part.trim();
            if part.is_empty() || part == "—" || part == "-" {
                continue;
            }
            let (label, values) = part
                .split_once(':')
                .unwrap_or_else(|| panic!("{name}: label cell part must read \"`label`: values\": {part}"));
            let label = backticked(label)
                .into_iter()
                .next()
                .unwrap_or_else(|| panic!("{name}: label name in backticks: {part}"));
            labels.insert(label, backticked(values).into_iter().collect());
        }
        rows.push(Row {
            name,
            kind: cells[1].to_lowercase(),
            labels,
        });
    }
    rows
}

#[test]
fn every_metric_is_documented_and_every_documented_metric_exists() {
    let families = registry_families();
    let doc = read("docs/METRICS.md");
    let rows = catalogue_rows(&doc);
    let documented: BTreeSet<&str> = rows.iter().map(|r| r.name.as_str()).collect();

    let undocumented: Vec<&String> = families
        .keys()
        .filter(|n| n.starts_with("syncrelay_") && !documented.contains(n.as_str()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "metrics missing from the table in docs/METRICS.md: {undocumented:?}"
    );

    assert_names_exist("docs/METRICS.md", &doc, &families);

    let mut seen = BTreeSet::new();
    for row in &rows {
        assert!(
            seen.insert(row.name.as_str()),
            "docs/METRICS.md documents {} twice",
            row.name
        );
    }
}

#[test]
fn catalogue_types_and_labels_match_the_registry() {
    let families = registry_families();
    let fixed_sets: BTreeMap<&str, &[&str]> = [
        ("source", metrics::INGEST_SOURCES),
        ("result", metrics::ATTEMPT_RESULTS),
        ("outcome", metrics::DELIVERY_OUTCOMES),
        ("reason", metrics::DEAD_LETTER_REASONS),
        ("kind", metrics::TARGET_KINDS),
        ("status_class", metrics::STATUS_CLASSES),
        ("status", metrics::KAFKA_MESSAGE_RESULTS),
        ("event", metrics::REBALANCE_KINDS),
        ("to", metrics::BREAKER_STATES),
        ("signal", metrics::ADAPTIVE_SIGNALS),
        ("event_type", metrics::OPERATIONAL_EVENTS),
    ]
    .into_iter()
    .collect();

    // Labels whose name is shared with another metric but whose fixed values are their own.
    let per_metric: BTreeMap<(&str, &str), &[&str]> = [
        (
            ("syncrelay_run_events_dropped_total", "reason"),
            metrics::RUN_DROP_REASONS,
        ),
        (("syncrelay_runs_total", "status"), metrics::RUN_END_STATUSES),
        (("syncrelay_sync_alerts_total", "alert_type"), metrics::SYNC_ALERT_TYPES),
        (("syncrelay_sync_alerts_total", "state"), metrics::SYNC_ALERT_STATES),
        (
            ("syncrelay_eloqua_sync_callbacks_total", "status"),
            metrics::ELOQUA_SYNC_STATUSES,
        ),
    ]
    .into_iter()
    .collect();

    for row in catalogue_rows(&read("docs/METRICS.md")) {
        let Some(family) = families.get(&row.name) else {
            continue;
        }; // reported by the other test
        assert_eq!(row.kind, family.kind, "docs/METRICS.md: type of {}", row.name);
        let documented: BTreeSet<String> = row.labels.keys().cloned().collect();
        assert_eq!(
            documented, family.labels,
            "docs/METRICS.md: label names of {}",
            row.name
        );
        for (label, values) in &row.labels {
            let expected = per_metric
                .get(&(row.name.as_str(), label.as_str()))
                .or_else(|| fixed_sets.get(label.as_str()));
            if let Some(expected) = expected {
                let expected: BTreeSet<String> = expected.iter().map(|v| v.to_string()).collect();
                assert_eq!(
                    values, &expected,
                    "docs/METRICS.md: values of label `{label}` of {}",
                    row.name
                );
            }
        }
    }
}

/// Every panel, including those nested in collapsed rows.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Every `"datasource"` object anywhere in the document, with a JSON-pointer-ish path.
fn datasource_refs<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let p = format!("{path}/{k}");
                if k == "datasource" && child.is_object() {
                    out.push((p.clone(), child));
                }
                datasource_refs(child, p, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                datasource_refs(child, format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn dashboard_imports() {
    let text = read("dashboards/syncrelay.json");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboards/syncrelay.json is valid JSON");
    let variable = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});

    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert!(dashboard["title"].is_string(), "title");

    let templating = dashboard["templating"]["list"].as_array().expect("templating.list");
    assert!(
        templating
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "a `datasource` variable of type datasource (prometheus) is declared"
    );

    let panels = all_panels(&dashboard);
    assert!(!panels.is_empty(), "dashboard has panels");
    let mut ids = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("<untitled>");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?} has a numeric id"));
        assert!(ids.insert(id), "panel id {id} ({title:?}) is not unique");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"], variable,
            "panel {title:?} datasource is the ${{datasource}} variable"
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title:?} has targets"));
        assert!(!targets.is_empty(), "panel {title:?} has at least one target");
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            let ref_id = t["refId"].as_str().filter(|s| !s.is_empty());
            let ref_id = ref_id.unwrap_or_else(|| panic!("a target of panel {title:?} has no refId"));
            assert!(ref_ids.insert(ref_id), "panel {title:?}: refId {ref_id} repeated");
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "panel {title:?} target {ref_id} has no expr"
            );
            if !t["datasource"].is_null() {
                assert_eq!(t["datasource"], variable, "panel {title:?} target {ref_id} datasource");
            }
        }
    }

    // No hard-coded datasource uid anywhere (annotations may use Grafana's built-in source).
    let mut refs = Vec::new();
    datasource_refs(&dashboard, String::new(), &mut refs);
    for (path, ds) in refs {
        let builtin = ds["uid"] == "-- Grafana --" || ds["type"] == "grafana" || ds["type"] == "datasource";
        assert!(
            ds == &variable || builtin,
            "{path}: datasource {ds} is not the ${{datasource}} variable"
        );
    }
}

#[test]
fn dashboard_and_alerts_only_use_exported_metrics() {
    let families = registry_families();
    let dashboard: Value = serde_json::from_str(&read("dashboards/syncrelay.json")).expect("valid JSON");
    let exprs: String = all_panels(&dashboard)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(exprs.contains("syncrelay_"), "dashboard queries syncrelay metrics");
    assert_names_exist("dashboards/syncrelay.json", &exprs, &families);
    assert_names_exist("dashboards/alerts.yml", &read("dashboards/alerts.yml"), &families);
}

/// GitHub's heading anchor: lower case, spaces to dashes, punctuation other than - and _ dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_has_for_severity_summary_and_a_runbook_that_exists() {
    let rules = read("dashboards/alerts.yml");
    let ops = read("docs/OPERATIONS.md");
    let anchors: BTreeSet<String> = ops
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();

    let chunks: Vec<&str> = rules.split("- alert:").skip(1).collect();
    assert!(chunks.len() >= 5, "alerts.yml has the five alerts");
    for chunk in chunks {
        let name = chunk.split_whitespace().next().unwrap_or("<unnamed>");
        for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
            assert!(chunk.contains(key), "alert {name} has no `{key}`");
        }
        let link = format!("docs/OPERATIONS.md#{}", name.to_lowercase());
        assert!(chunk.contains(&link), "alert {name} points the operator to {link}");
        assert!(
            anchors.contains(&name.to_lowercase()),
            "docs/OPERATIONS.md has no heading for alert {name} (anchor #{})",
            name.to_lowercase()
        );
    }
}
