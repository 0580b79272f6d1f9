//! What a Census-style sync does to a record before it is signed (CONTRACT §3, Census syncs).
//! Pure: no I/O, no clock; the routing calls it once per (event, sync).
//!
//! - The records of an event are the elements of `payload.records` when that is an array, else
//!   `payload.record` when that is an object, else the payload itself; each is replaced in place
//!   by its mapped form.
//! - A mapped record holds only the mapped fields: `column` mappings (a dot path into the
//!   record, `null` when absent), `constant_value` mappings, and with `sync_all_properties`
//!   every top-level property of the record under its normalised name (explicit mappings win a
//!   name both produce).
//! - Field order: `alphabetical_column_name` (Census's default) sorts by destination field name;
//!   `mapping_order` keeps the mappings' order, then the remaining properties in the record's.
//! - The payload gains `operation`, `destination_object`, `sync_id` and, when a mapping is the
//!   primary identifier, `primary_identifier` (its destination field name).

use serde_json::{Map, Value};

use super::{FieldOrder, From, Normalization, SyncConfig};

/// The largest mapped payload, in bytes as compact JSON (about): mappings may repeat a value or
/// add constants to every record of a `records` array, so a small event could otherwise map to
/// a huge body. Above it the event is dead-lettered for that sync (`payload_too_large`).
pub const MAX_MAPPED_BYTES: usize = 4 * 1024 * 1024;

/// Compact JSON size of a value, without writing it anywhere.
fn json_size(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    let _ = serde_json::to_writer(&mut n, v);
    n.0
}

/// The payload as the sync's destination receives it.
pub fn map_payload(payload: &Map<String, Value>, sync_id: i64, c: &SyncConfig) -> Map<String, Value> {
    map_payload_within(payload, sync_id, c, usize::MAX).expect("no bound")
}

/// [`map_payload`], or `None` as soon as the mapped records pass `max` bytes (about; nothing
/// much larger than `max` is built).
pub fn map_payload_within(
    payload: &Map<String, Value>,
    sync_id: i64,
    c: &SyncConfig,
    max: usize,
) -> Option<Map<String, Value>> {
    let mut budget = max;
    let mut out = payload.clone();
    match out.get_mut("records") {
        Some(Value::Array(records)) => {
            for r in records.iter_mut() {
                *r = Value::Object(map_record_within(r, c, &mut budget)?);
            }
        }
        _ => match out.get_mut("record") {
            Some(r @ Value::Object(_)) => *r = Value::Object(map_record_within(r, c, &mut budget)?),
            _ => out = map_record_within(&Value::Object(payload.clone()), c, &mut budget)?,
        },
    }
    out.insert("operation".into(), Value::String(c.operation.clone()));
    out.insert("destination_object".into(), Value::String(c.destination_object.clone()));
    out.insert("sync_id".into(), Value::from(sync_id));
    if let Some(m) = c.mappings.iter().find(|m| m.is_primary_identifier) {
        out.insert("primary_identifier".into(), Value::String(m.to.clone()));
    }
    Some(out)
}

/// One record, mapped. A record that is not an object has no properties (only constants map).
pub fn map_record(record: &Value, c: &SyncConfig) -> Map<String, Value> {
    let mut unbounded = usize::MAX;
    map_record_within(record, c, &mut unbounded).expect("no bound")
}

/// [`map_record`], spending `budget` bytes (each field's name and value as JSON); `None` when
/// it runs out (checked before each value is copied).
fn map_record_within(record: &Value, c: &SyncConfig, budget: &mut usize) -> Option<Map<String, Value>> {
    let mut spend = |name: &str, v: &Value| -> Option<()> {
        *budget = budget.checked_sub(name.len() + json_size(v) + 4)?;
        Some(())
    };
    let mut fields: Vec<(String, Value)> = Vec::with_capacity(c.mappings.len());
    for m in &c.mappings {
        let v = match &m.from {
            From::Column(path) => lookup(record, path).unwrap_or(&Value::Null),
            From::Constant { value, .. } => value,
        };
        spend(&m.to, v)?;
        fields.push((m.to.clone(), v.clone()));
    }
    if let (Some(norm), Value::Object(props)) = (c.sync_all_properties, record) {
        let mut names: std::collections::HashSet<String> = fields.iter().map(|(n, _)| n.clone()).collect();
        for (k, v) in props {
            let name = normalize(k, norm);
            // Explicit mappings, and properties seen first, keep a name.
            if names.insert(name.clone()) {
                spend(&name, v)?;
                fields.push((name, v.clone()));
            }
        }
    }
    if c.field_order == FieldOrder::Alphabetical {
        // Stable: equal names cannot occur (names are unique above).
        fields.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Some(fields.into_iter().collect())
}

/// A column: the property named exactly `path`, else the dot path through objects (and arrays,
/// by index).
pub fn lookup<'a>(record: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = record.as_object().and_then(|o| o.get(path)) {
        return Some(v);
    }
    let mut at = record;
    for part in path.split('.') {
        at = match at {
            Value::Object(o) => o.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(at)
}

/// The words of a property name: runs of letters split where lower case turns upper
/// (`fooBar`), before the last capital of an acronym (`HTMLParser`), between letters and
/// digits, and at anything not alphanumeric.
pub fn words(s: &str) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut cur = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_alphanumeric() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if let Some(&p) = cur.chars().last().as_ref() {
            let next = chars.get(i + 1).copied();
            let boundary = (p.is_lowercase() && c.is_uppercase())
                || (p.is_uppercase() && c.is_uppercase() && next.is_some_and(|n| n.is_lowercase()))
                || (p.is_alphabetic() && c.is_numeric())
                || (p.is_numeric() && c.is_alphabetic());
            if boundary {
                out.push(std::mem::take(&mut cur));
            }
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn capitalize(w: &str, rest_lower: bool) -> String {
    let mut cs = w.chars();
    match cs.next() {
        Some(f) => {
            let rest: String = cs.collect();
            let rest = if rest_lower { rest.to_lowercase() } else { rest };
            f.to_uppercase().collect::<String>() + &rest
        }
        None => String::new(),
    }
}

/// A property name under a normalisation. A name with no words (`"__"`) is kept as it is.
pub fn normalize(name: &str, n: Normalization) -> String {
    if n == Normalization::MatchSourceNames {
        return name.to_string();
    }
    let ws = words(name);
    if ws.is_empty() {
        return name.to_string();
    }
    match n {
        Normalization::MatchSourceNames => name.to_string(),
        Normalization::StartCase => ws.iter().map(|w| capitalize(w, false)).collect::<Vec<_>>().join(" "),
        Normalization::LowerCase => ws.iter().map(|w| w.to_lowercase()).collect::<Vec<_>>().join(" "),
        Normalization::UpperCase => ws.iter().map(|w| w.to_uppercase()).collect::<Vec<_>>().join(" "),
        Normalization::SnakeCase => ws.iter().map(|w| w.to_lowercase()).collect::<Vec<_>>().join("_"),
        Normalization::CamelCase => ws
            .iter()
            .enumerate()
            .map(|(i, w)| if i == 0 { w.to_lowercase() } else { capitalize(w, true) })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syncs::{Mapping, SyncConfig};
    use serde_json::json;

    fn config(mappings: Vec<Mapping>, order: FieldOrder, all: Option<Normalization>) -> SyncConfig {
        SyncConfig {
            operation: "upsert".into(),
            destination_object: "contact".into(),
            mappings,
            sync_all_properties: all,
            field_order: order,
            ..SyncConfig::default()
        }
    }

    fn col(data: &str, to: &str, primary: bool) -> Mapping {
        Mapping {
            from: From::Column(data.into()),
            to: to.into(),
            is_primary_identifier: primary,
        }
    }

    fn constant(v: Value, to: &str) -> Mapping {
        Mapping {
            from: From::Constant {
                value: v,
                basic_type: None,
            },
            to: to.into(),
            is_primary_identifier: false,
        }
    }

    fn keys(m: &Map<String, Value>) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    #[test]
    fn only_mapped_fields_renamed_with_constants_in_alphabetical_order_by_default() {
        let c = config(
            vec![
                col("email", "Email", true),
                col("profile.name.first", "FirstName", false),
                constant(json!("web"), "Source"),
                col("missing.path", "Absent", false),
            ],
            FieldOrder::Alphabetical,
            None,
        );
        let r = json!({"email": "a@x", "profile": {"name": {"first": "Ann"}}, "secret": 1});
        let m = map_record(&r, &c);
        assert_eq!(keys(&m), ["Absent", "Email", "FirstName", "Source"]);
        assert_eq!(
            Value::Object(m),
            json!({"Absent": null, "Email": "a@x", "FirstName": "Ann", "Source": "web"})
        );
    }

    #[test]
    fn mapping_order_keeps_the_mappings_order() {
        let c = config(
            vec![col("b", "Zed", false), col("a", "Alpha", true)],
            FieldOrder::MappingOrder,
            None,
        );
        let m = map_record(&json!({"a": 1, "b": 2}), &c);
        assert_eq!(keys(&m), ["Zed", "Alpha"]);
    }

    #[test]
    fn a_literal_dotted_column_wins_over_the_path_and_arrays_are_indexed() {
        let r = json!({"a.b": 1, "a": {"b": 2}, "l": [{"x": 3}]});
        assert_eq!(lookup(&r, "a.b"), Some(&json!(1)));
        assert_eq!(lookup(&r, "l.0.x"), Some(&json!(3)));
        assert_eq!(lookup(&r, "l.9.x"), None);
        assert_eq!(lookup(&json!(5), "a"), None);
    }

    #[test]
    fn each_normalization() {
        let cases = [
            (Normalization::StartCase, "First Name", "HTML Parser 2"),
            (Normalization::LowerCase, "first name", "html parser 2"),
            (Normalization::UpperCase, "FIRST NAME", "HTML PARSER 2"),
            (Normalization::CamelCase, "firstName", "htmlParser2"),
            (Normalization::SnakeCase, "first_name", "html_parser_2"),
            (Normalization::MatchSourceNames, "first_name", "HTMLParser2"),
        ];
        for (n, a, b) in cases {
            assert_eq!(normalize("first_name", n), a, "{n:?}");
            assert_eq!(normalize("HTMLParser2", n), b, "{n:?}");
            assert_eq!(normalize("__", n), "__", "{n:?}");
        }
        assert_eq!(normalize("firstName", Normalization::SnakeCase), "first_name");
        assert_eq!(normalize("first-name", Normalization::StartCase), "First Name");
    }

    #[test]
    fn sync_all_properties_maps_every_property_and_explicit_mappings_win() {
        let c = config(
            vec![col("id", "id", true)],
            FieldOrder::MappingOrder,
            Some(Normalization::SnakeCase),
        );
        let m = map_record(&json!({"firstName": "Ann", "id": 7, "Last Name": "Lee"}), &c);
        assert_eq!(
            Value::Object(m.clone()),
            json!({"id": 7, "first_name": "Ann", "last_name": "Lee"})
        );
        assert_eq!(keys(&m), ["id", "first_name", "last_name"]);
        let c = config(vec![], FieldOrder::Alphabetical, Some(Normalization::StartCase));
        let m = map_record(&json!({"z_field": 1, "a_field": 2}), &c);
        assert_eq!(keys(&m), ["A Field", "Z Field"]);
    }

    #[test]
    fn a_mapping_that_would_blow_up_the_payload_stops_at_the_bound() {
        let c = config(
            vec![constant(json!("x".repeat(1000)), "Big"), col("n", "N", false)],
            FieldOrder::Alphabetical,
            None,
        );
        let records: Vec<Value> = (0..100).map(|n| json!({"n": n})).collect();
        let p = json!({"records": records});
        let p = p.as_object().unwrap();
        assert!(map_payload_within(p, 1, &c, 50_000).is_none(), "100 × 1 KB constants");
        let out = map_payload_within(p, 1, &c, 200_000).unwrap();
        assert_eq!(out["records"].as_array().unwrap().len(), 100);
    }

    #[test]
    fn records_are_found_in_records_then_record_then_the_payload() {
        let c = config(vec![col("n", "N", true)], FieldOrder::Alphabetical, None);
        let p = json!({"resource": "r", "records": [{"n": 1, "x": 0}, {"n": 2}]});
        let out = map_payload(p.as_object().unwrap(), 4, &c);
        assert_eq!(
            Value::Object(out),
            json!({"resource": "r", "records": [{"N": 1}, {"N": 2}], "operation": "upsert",
                   "destination_object": "contact", "sync_id": 4, "primary_identifier": "N"})
        );
        let p = json!({"resource": "r", "record": {"n": 1, "x": 0}});
        let out = map_payload(p.as_object().unwrap(), 4, &c);
        assert_eq!(out["record"], json!({"N": 1}));
        assert_eq!(out["resource"], json!("r"));
        // `record` not an object: the payload is the record.
        let p = json!({"n": 3, "record": 5});
        let out = map_payload(p.as_object().unwrap(), 4, &c);
        assert_eq!(
            Value::Object(out),
            json!({"N": 3, "operation": "upsert", "destination_object": "contact", "sync_id": 4,
                   "primary_identifier": "N"})
        );
    }
}
