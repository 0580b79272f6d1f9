//! Census-style syncs (CONTRACT §3, Census syncs): a sync subscribes a destination webhook to
//! the records of a sync job's runs, mapped (`mapping`), possibly paused, with alerts
//! (`alerts`). This module is the model: validation of Census's request shape into a
//! [`SyncConfig`], and rendering back into Census's response shape. Routing, pausing and
//! alerting use it from `routing`, the store and `alerts`.

pub mod alerts;
pub mod mapping;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::domain::{check_json_size, check_text, limits, rfc3339_ms};
use crate::error::ApiError;
use crate::store::CensusSyncRow;

/// Field limits of `/syncs` (CONTRACT §3, "Field limits").
pub mod sync_limits {
    /// `mappings` per sync.
    pub const MAPPINGS: usize = 500;
    /// A column path (`from.data` of a column mapping).
    pub const COLUMN: usize = 1024;
    /// A constant mapping's `data`, as compact JSON bytes.
    pub const CONSTANT_BYTES: usize = 16 * 1024;
    /// `alert_attributes` per sync.
    pub const ALERTS: usize = 20;
}

/// The event an alert is delivered as.
pub const ALERT_EVENT: &str = "sync_job_run:alert";

/// The order key prefix of a sync's deliveries: `s:<sync id>:` then the run id.
pub fn order_key_prefix(sync_id: i64) -> String {
    format!("s:{sync_id}:")
}

/// The sync id of a sync delivery's order key.
pub fn sync_of_order_key(key: &str) -> Option<i64> {
    key.strip_prefix("s:")?.split(':').next()?.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    StartCase,
    LowerCase,
    UpperCase,
    CamelCase,
    SnakeCase,
    MatchSourceNames,
}

impl Normalization {
    const ALL: [&'static str; 6] = [
        "start_case",
        "lower_case",
        "upper_case",
        "camel_case",
        "snake_case",
        "match_source_names",
    ];
    fn parse(s: &str) -> Option<Normalization> {
        serde_json::from_value(Value::String(s.into())).ok()
    }
    fn as_str(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum FieldOrder {
    /// Census's default: by destination field name.
    #[default]
    Alphabetical,
    MappingOrder,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum From {
    Column(String),
    Constant { value: Value, basic_type: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mapping {
    pub from: From,
    pub to: String,
    pub is_primary_identifier: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum AlertKind {
    InvalidRecordPercent,
    Failure,
    Status,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::InvalidRecordPercent => "InvalidRecordPercent",
            AlertKind::Failure => "Failure",
            AlertKind::Status => "Status",
        }
    }
    /// Census names them `<Kind>AlertConfiguration`; the short name is accepted too.
    fn parse(s: &str) -> Option<AlertKind> {
        match s.strip_suffix("AlertConfiguration").unwrap_or(s) {
            "InvalidRecordPercent" => Some(AlertKind::InvalidRecordPercent),
            "Failure" => Some(AlertKind::Failure),
            "Status" => Some(AlertKind::Status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub kind: AlertKind,
    /// The `type` as the client wrote it (echoed back).
    pub type_name: String,
    /// `every_time` (true) or `first_time` (false, the default).
    pub every_time: bool,
    pub should_send_recovery: bool,
    /// InvalidRecordPercent: 0–100.
    pub threshold: Option<f64>,
    /// Status: only this status (`started` or `completed`), else both.
    pub status: Option<String>,
}

/// A sync's validated settings (what is stored as `config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SyncConfig {
    pub label: Option<String>,
    pub operation: String,
    pub destination_object: String,
    pub mappings: Vec<Mapping>,
    /// `field_behavior: sync_all_properties`, with its normalisation.
    pub sync_all_properties: Option<Normalization>,
    pub field_order: FieldOrder,
    pub alerts: Vec<Alert>,
    /// The alerts came from the deprecated `failed_*_notifications_*` fields (a PATCH that
    /// changes those alone then still means something).
    pub alerts_from_deprecated: bool,
}

/// A sync as the relay holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sync {
    pub id: i64,
    pub sync_job_id: String,
    pub webhook_id: String,
    pub paused: bool,
    pub config: SyncConfig,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Sync {
    pub fn from_row(r: &CensusSyncRow) -> anyhow::Result<Sync> {
        Ok(Sync {
            id: r.id,
            sync_job_id: r.sync_job_id.clone(),
            webhook_id: r.webhook_id.clone(),
            paused: r.paused,
            config: serde_json::from_str(&r.config)?,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }

    pub fn to_row(&self) -> CensusSyncRow {
        CensusSyncRow {
            id: self.id,
            sync_job_id: self.sync_job_id.clone(),
            webhook_id: self.webhook_id.clone(),
            paused: self.paused,
            config: serde_json::to_string(&self.config).expect("config serializes"),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }

    /// Census's shape (reads). `held`: deliveries held while paused, when known.
    pub fn to_json(&self, held: Option<i64>) -> Value {
        let c = &self.config;
        let mut v = self.input_json();
        let o = v.as_object_mut().expect("object");
        o.shift_remove("validate_only");
        let invalid = c.alerts.iter().find(|a| a.kind == AlertKind::InvalidRecordPercent);
        let mut out = Map::new();
        out.insert("id".into(), json!(self.id));
        out.insert("status".into(), json!(if self.paused { "paused" } else { "ready" }));
        out.insert("created_at".into(), json!(rfc3339_ms(self.created_at)));
        out.insert("updated_at".into(), json!(rfc3339_ms(self.updated_at)));
        for (k, x) in std::mem::take(o) {
            out.insert(k, x);
        }
        out.insert("alert_attributes".into(), Value::Array(self.alerts_json()));
        // The deprecated fields, as what the alerts amount to.
        out.insert(
            "failed_run_notifications_enabled".into(),
            json!(c.alerts.iter().any(|a| a.kind == AlertKind::Failure)),
        );
        out.insert("failed_record_notifications_enabled".into(), json!(invalid.is_some()));
        out.insert(
            "failed_record_notifications_threshold_percent".into(),
            json!(invalid.and_then(|a| a.threshold)),
        );
        if let Some(h) = held {
            out.insert("held_deliveries".into(), json!(h));
        }
        Value::Object(out)
    }

    /// `alert_attributes` in Census's shape.
    pub fn alerts_json(&self) -> Vec<Value> {
        self.config
            .alerts
            .iter()
            .map(|a| {
                let options = match a.kind {
                    AlertKind::InvalidRecordPercent => json!({"threshold": a.threshold}),
                    AlertKind::Status => match &a.status {
                        Some(s) => json!({"status": s}),
                        None => Value::Null,
                    },
                    AlertKind::Failure => Value::Null,
                };
                json!({
                    "type": a.type_name,
                    "send_for": if a.every_time { "every_time" } else { "first_time" },
                    "should_send_recovery": a.should_send_recovery,
                    "options": options,
                })
            })
            .collect()
    }

    /// The sync as a create request would give it (PATCH merges into this).
    pub fn input_json(&self) -> Value {
        let c = &self.config;
        let mappings: Vec<Value> = c
            .mappings
            .iter()
            .map(|m| {
                let from = match &m.from {
                    From::Column(d) => json!({"type": "column", "data": d}),
                    From::Constant { value, basic_type } => {
                        let mut d = json!({"value": value});
                        if let Some(b) = basic_type {
                            d["basic_type"] = json!(b);
                        }
                        json!({"type": "constant_value", "data": d})
                    }
                };
                json!({"from": from, "to": m.to, "is_primary_identifier": m.is_primary_identifier})
            })
            .collect();
        let alerts = self.alerts_json();
        let mut v = json!({
            "label": c.label,
            "operation": c.operation,
            "paused": self.paused,
            "source_attributes": {"object": {"type": "sync_job", "id": self.sync_job_id}},
            "destination_attributes": {"connection_id": self.webhook_id, "object": c.destination_object},
            "mappings": mappings,
            "field_behavior": if c.sync_all_properties.is_some() { "sync_all_properties" } else { "specific_properties" },
            "field_normalization": c.sync_all_properties.map(Normalization::as_str),
            "field_order": match c.field_order { FieldOrder::Alphabetical => "alphabetical_column_name", FieldOrder::MappingOrder => "mapping_order" },
        });
        if c.alerts_from_deprecated {
            let invalid = c.alerts.iter().find(|a| a.kind == AlertKind::InvalidRecordPercent);
            v["failed_run_notifications_enabled"] = json!(c.alerts.iter().any(|a| a.kind == AlertKind::Failure));
            v["failed_record_notifications_enabled"] = json!(invalid.is_some());
            if let Some(t) = invalid.and_then(|a| a.threshold) {
                v["failed_record_notifications_threshold_percent"] = json!(t);
            }
        } else {
            v["alert_attributes"] = json!(alerts);
        }
        v
    }
}

// ---- the request ------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncInput {
    source_attributes: SourceAttributes,
    destination_attributes: DestinationAttributes,
    operation: String,
    #[serde(default)]
    mappings: Vec<MappingInput>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    paused: Option<bool>,
    #[serde(default)]
    pub validate_only: bool,
    #[serde(default)]
    field_behavior: Option<String>,
    #[serde(default)]
    field_normalization: Option<String>,
    #[serde(default)]
    field_order: Option<String>,
    #[serde(default)]
    alert_attributes: Option<Vec<AlertInput>>,
    #[serde(default)]
    failed_run_notifications_enabled: Option<bool>,
    #[serde(default)]
    failed_record_notifications_enabled: Option<bool>,
    #[serde(default)]
    failed_record_notifications_threshold_percent: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceAttributes {
    object: SourceObject,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceObject {
    #[serde(rename = "type")]
    kind: String,
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationAttributes {
    connection_id: String,
    object: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingInput {
    from: FromInput,
    to: String,
    #[serde(default)]
    is_primary_identifier: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FromInput {
    #[serde(rename = "type")]
    kind: String,
    data: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertInput {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    send_for: Option<String>,
    #[serde(default)]
    should_send_recovery: Option<bool>,
    #[serde(default)]
    options: Option<Value>,
}

/// A validated request: what to store, and the ids the API must find (job, webhook).
pub struct Validated {
    pub sync_job_id: String,
    pub webhook_id: String,
    pub paused: bool,
    pub config: SyncConfig,
    pub validate_only: bool,
}

const OPERATIONS: [&str; 5] = ["append", "insert", "mirror", "update", "upsert"];

/// A threshold: a number, or a string holding one (Census's examples use both), 0–100.
fn threshold(field: &str, v: &Value) -> Result<f64, ApiError> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n.is_finite() && (0.0..=100.0).contains(&n) => Ok(n),
        _ => Err(ApiError::field(field, "must be a number from 0 to 100")),
    }
}

impl SyncInput {
    /// Check everything that needs no lookup; errors name the field path.
    pub fn validate(self) -> Result<Validated, ApiError> {
        if self.source_attributes.object.kind != "sync_job" {
            return Err(ApiError::field(
                "source_attributes.object.type",
                "must be \"sync_job\" (a sync's source is a sync job)",
            ));
        }
        let sync_job_id = crate::domain::parse_uuid("source_attributes.object.id", &self.source_attributes.object.id)?;
        let webhook_id = crate::domain::parse_uuid(
            "destination_attributes.connection_id",
            &self.destination_attributes.connection_id,
        )?;
        let object = &self.destination_attributes.object;
        check_text("destination_attributes.object", object, limits::NAME, false)?;
        if object.trim().is_empty() {
            return Err(ApiError::field("destination_attributes.object", "must not be empty"));
        }
        if !OPERATIONS.contains(&self.operation.as_str()) {
            return Err(ApiError::field(
                "operation",
                format!("must be one of {}", OPERATIONS.join(", ")),
            ));
        }
        if let Some(l) = &self.label {
            check_text("label", l, limits::NAME, false)?;
        }
        let sync_all = match self.field_behavior.as_deref() {
            None | Some("specific_properties") => false,
            Some("sync_all_properties") => true,
            Some(_) => {
                return Err(ApiError::field(
                    "field_behavior",
                    "must be specific_properties or sync_all_properties",
                ))
            }
        };
        let normalization = match self.field_normalization.as_deref() {
            None => None,
            Some(s) => match Normalization::parse(s) {
                Some(n) if sync_all => Some(n),
                Some(_) => {
                    return Err(ApiError::field(
                        "field_normalization",
                        "applies only when field_behavior is sync_all_properties",
                    ))
                }
                None => {
                    return Err(ApiError::field(
                        "field_normalization",
                        format!("must be one of {}", Normalization::ALL.join(", ")),
                    ))
                }
            },
        };
        let field_order = match self.field_order.as_deref() {
            None | Some("alphabetical_column_name") => FieldOrder::Alphabetical,
            Some("mapping_order") => FieldOrder::MappingOrder,
            Some(_) => {
                return Err(ApiError::field(
                    "field_order",
                    "must be alphabetical_column_name or mapping_order",
                ))
            }
        };
        if self.mappings.len() > sync_limits::MAPPINGS {
            return Err(ApiError::field(
                "mappings",
                format!("must have at most {} items", sync_limits::MAPPINGS),
            ));
        }
        if self.mappings.is_empty() && !sync_all {
            return Err(ApiError::field(
                "mappings",
                "must have at least one mapping unless field_behavior is sync_all_properties",
            ));
        }
        let mut mappings = Vec::with_capacity(self.mappings.len());
        let mut names = HashSet::new();
        for (i, m) in self.mappings.into_iter().enumerate() {
            let at = |f: &str| format!("mappings[{i}].{f}");
            check_text(&at("to"), &m.to, limits::NAME, false)?;
            if m.to.is_empty() {
                return Err(ApiError::field(at("to"), "must not be empty"));
            }
            if !names.insert(m.to.clone()) {
                return Err(ApiError::field(at("to"), format!("maps \"{}\" a second time", m.to)));
            }
            let from = match m.from.kind.as_str() {
                "column" => {
                    let Value::String(d) = m.from.data else {
                        return Err(ApiError::field(at("from.data"), "must be a column name or dot path"));
                    };
                    check_text(&at("from.data"), &d, sync_limits::COLUMN, false)?;
                    if d.is_empty() || d.split('.').any(str::is_empty) {
                        return Err(ApiError::field(
                            at("from.data"),
                            "must be a column name or a dot path without empty parts",
                        ));
                    }
                    From::Column(d)
                }
                "constant_value" => {
                    let Value::Object(mut d) = m.from.data else {
                        return Err(ApiError::field(at("from.data"), "must be an object with a value"));
                    };
                    let Some(value) = d.shift_remove("value") else {
                        return Err(ApiError::field(at("from.data.value"), "is required"));
                    };
                    check_json_size(&at("from.data.value"), &value, sync_limits::CONSTANT_BYTES)?;
                    let basic_type = match d.shift_remove("basic_type") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) => {
                            check_text(&at("from.data.basic_type"), &s, limits::NAME, false)?;
                            Some(s)
                        }
                        Some(_) => return Err(ApiError::field(at("from.data.basic_type"), "must be a string")),
                    };
                    if let Some(k) = d.keys().next() {
                        return Err(ApiError::field(at(&format!("from.data.{k}")), "is not a known field"));
                    }
                    From::Constant { value, basic_type }
                }
                _ => return Err(ApiError::field(at("from.type"), "must be column or constant_value")),
            };
            if m.is_primary_identifier && matches!(from, From::Constant { .. }) {
                return Err(ApiError::field(
                    at("is_primary_identifier"),
                    "a constant cannot identify records",
                ));
            }
            mappings.push(Mapping {
                from,
                to: m.to,
                is_primary_identifier: m.is_primary_identifier,
            });
        }
        let primaries: Vec<usize> = mappings
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_primary_identifier)
            .map(|(i, _)| i)
            .collect();
        let needs_one = matches!(self.operation.as_str(), "update" | "upsert" | "mirror");
        if primaries.len() > 1 {
            return Err(ApiError::field(
                format!("mappings[{}].is_primary_identifier", primaries[1]),
                "only one mapping may be the primary identifier",
            ));
        }
        if needs_one && primaries.is_empty() {
            return Err(ApiError::field(
                "mappings",
                format!(
                    "operation {} needs exactly one mapping with is_primary_identifier: true",
                    self.operation
                ),
            ));
        }
        // Census's rule for the deprecated fields: `alert_attributes`, when given, is the
        // configuration and they are ignored; without it they are translated into alerts.
        let (alerts, from_deprecated) = match self.alert_attributes {
            Some(list) => (alerts(list)?, false),
            None => {
                let mut out = Vec::new();
                if self.failed_run_notifications_enabled == Some(true) {
                    out.push(Alert {
                        kind: AlertKind::Failure,
                        type_name: "FailureAlertConfiguration".into(),
                        every_time: false,
                        should_send_recovery: true,
                        threshold: None,
                        status: None,
                    });
                }
                let t = match &self.failed_record_notifications_threshold_percent {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(threshold("failed_record_notifications_threshold_percent", v)?),
                };
                if self.failed_record_notifications_enabled == Some(true) {
                    let Some(t) = t else {
                        return Err(ApiError::field(
                            "failed_record_notifications_threshold_percent",
                            "is required when failed_record_notifications_enabled is true",
                        ));
                    };
                    out.push(Alert {
                        kind: AlertKind::InvalidRecordPercent,
                        type_name: "InvalidRecordPercentAlertConfiguration".into(),
                        every_time: false,
                        should_send_recovery: true,
                        threshold: Some(t),
                        status: None,
                    });
                }
                let any = self.failed_run_notifications_enabled.is_some()
                    || self.failed_record_notifications_enabled.is_some();
                (out, any)
            }
        };
        Ok(Validated {
            sync_job_id,
            webhook_id,
            paused: self.paused.unwrap_or(false),
            config: SyncConfig {
                label: self.label,
                operation: self.operation,
                destination_object: self.destination_attributes.object,
                mappings,
                sync_all_properties: sync_all.then(|| normalization.unwrap_or(Normalization::MatchSourceNames)),
                field_order,
                alerts,
                alerts_from_deprecated: from_deprecated,
            },
            validate_only: self.validate_only,
        })
    }
}

fn alerts(list: Vec<AlertInput>) -> Result<Vec<Alert>, ApiError> {
    if list.len() > sync_limits::ALERTS {
        return Err(ApiError::field(
            "alert_attributes",
            format!("must have at most {} items", sync_limits::ALERTS),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, a) in list.into_iter().enumerate() {
        let at = |f: &str| format!("alert_attributes[{i}].{f}");
        let Some(kind) = AlertKind::parse(&a.kind) else {
            return Err(ApiError::field(
                at("type"),
                "must be InvalidRecordPercent, Failure or Status (optionally with the AlertConfiguration suffix)",
            ));
        };
        if !seen.insert(kind) {
            return Err(ApiError::field(at("type"), "this alert type is configured twice"));
        }
        let every_time = match a.send_for.as_deref() {
            None | Some("first_time") => false,
            Some("every_time") => true,
            Some(_) => return Err(ApiError::field(at("send_for"), "must be first_time or every_time")),
        };
        let options = match a.options {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(o)) => o,
            Some(_) => return Err(ApiError::field(at("options"), "must be an object")),
        };
        let allowed: &[&str] = match kind {
            AlertKind::InvalidRecordPercent => &["threshold"],
            AlertKind::Status => &["status"],
            AlertKind::Failure => &[],
        };
        if let Some(k) = options.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::field(
                at(&format!("options.{k}")),
                "is not a known option of this alert type",
            ));
        }
        let threshold = match kind {
            AlertKind::InvalidRecordPercent => match options.get("threshold") {
                Some(v) => Some(threshold(&at("options.threshold"), v)?),
                None => return Err(ApiError::field(at("options.threshold"), "is required")),
            },
            _ => None,
        };
        let status = match options.get("status") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "started" || s == "completed" => Some(s.clone()),
            Some(_) => return Err(ApiError::field(at("options.status"), "must be started or completed")),
        };
        check_text(&at("type"), &a.kind, limits::NAME, false)?;
        out.push(Alert {
            kind,
            type_name: a.kind,
            every_time,
            should_send_recovery: a.should_send_recovery.unwrap_or(true),
            threshold,
            status,
        });
    }
    Ok(out)
}

// ---- the cache routing reads ------------------------------------------------------------------

/// Syncs by id and by source job, kept in step by the API and refreshed by housekeeping (other
/// instances sharing the store).
#[derive(Default)]
pub struct SyncCache {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<i64, Arc<Sync>>,
    by_job: HashMap<String, Vec<Arc<Sync>>>,
}

impl Inner {
    fn reindex(&mut self) {
        let mut by_job: HashMap<String, Vec<Arc<Sync>>> = HashMap::new();
        let mut all: Vec<&Arc<Sync>> = self.by_id.values().collect();
        all.sort_by_key(|s| s.id);
        for s in all {
            by_job.entry(s.sync_job_id.clone()).or_default().push(s.clone());
        }
        self.by_job = by_job;
    }
}

impl SyncCache {
    pub fn get(&self, id: i64) -> Option<Arc<Sync>> {
        self.inner.read().expect("lock").by_id.get(&id).cloned()
    }
    /// The syncs whose source is this job, by id.
    pub fn for_job(&self, job: &str) -> Vec<Arc<Sync>> {
        self.inner
            .read()
            .expect("lock")
            .by_job
            .get(job)
            .cloned()
            .unwrap_or_default()
    }
    pub fn is_empty(&self) -> bool {
        self.inner.read().expect("lock").by_id.is_empty()
    }
    pub fn put(&self, s: Sync) {
        let mut i = self.inner.write().expect("lock");
        i.by_id.insert(s.id, Arc::new(s));
        i.reindex();
    }
    pub fn remove(&self, id: i64) {
        let mut i = self.inner.write().expect("lock");
        i.by_id.remove(&id);
        i.reindex();
    }
    /// Replace everything with what the store holds.
    pub fn replace(&self, all: Vec<Sync>) {
        let mut i = self.inner.write().expect("lock");
        i.by_id = all.into_iter().map(|s| (s.id, Arc::new(s))).collect();
        i.reindex();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(v: Value) -> Result<Validated, ApiError> {
        let bytes = serde_json::to_vec(&v).unwrap();
        crate::error::parse_json::<SyncInput>(&bytes)?.validate()
    }

    fn field_of(e: ApiError) -> String {
        match e {
            ApiError::BadRequest { field, .. } => field.unwrap_or_default(),
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    fn base() -> Value {
        json!({
            "source_attributes": {"object": {"type": "sync_job", "id": "5b0c3a7e-8e1f-4f5e-9d3c-0a1b2c3d4e5f"}},
            "destination_attributes": {"connection_id": "8d0f1a52-3c55-4bb4-9a43-2f6f7f0c1e10", "object": "contact"},
            "operation": "upsert",
            "mappings": [
                {"from": {"type": "column", "data": "email"}, "to": "Email", "is_primary_identifier": true},
                {"from": {"type": "constant_value", "data": {"value": "web"}}, "to": "Source"},
                {"from": {"type": "column", "data": "name"}, "to": "Name"}
            ]
        })
    }

    #[test]
    fn errors_name_the_field() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|v| v["mappings"][2]["to"] = json!("")), "mappings[2].to"),
            (Box::new(|v| v["mappings"][2]["to"] = json!("Email")), "mappings[2].to"),
            (Box::new(|v| v["mappings"][2]["to"] = json!(5)), "mappings[2].to"),
            (
                Box::new(|v| v["mappings"][1]["from"]["type"] = json!("sql")),
                "mappings[1].from.type",
            ),
            (
                Box::new(|v| v["mappings"][1]["from"]["data"] = json!({})),
                "mappings[1].from.data.value",
            ),
            (
                Box::new(|v| v["mappings"][2]["from"]["data"] = json!("a..b")),
                "mappings[2].from.data",
            ),
            (
                Box::new(|v| v["mappings"][2]["is_primary_identifier"] = json!(true)),
                "mappings[2].is_primary_identifier",
            ),
            (
                Box::new(|v| v["mappings"][0]["is_primary_identifier"] = json!(false)),
                "mappings",
            ),
            (Box::new(|v| v["operation"] = json!("merge")), "operation"),
            (
                Box::new(|v| v["source_attributes"]["object"]["type"] = json!("model")),
                "source_attributes.object.type",
            ),
            (
                Box::new(|v| v["source_attributes"]["object"]["id"] = json!("x")),
                "source_attributes.object.id",
            ),
            (
                Box::new(|v| v["destination_attributes"]["connection_id"] = json!("x")),
                "destination_attributes.connection_id",
            ),
            (
                Box::new(|v| v["destination_attributes"]["object"] = json!("")),
                "destination_attributes.object",
            ),
            (
                Box::new(|v| v["field_normalization"] = json!("snake_case")),
                "field_normalization",
            ),
            (Box::new(|v| v["field_order"] = json!("random")), "field_order"),
            (
                Box::new(|v| {
                    v["alert_attributes"] = json!([{"type": "InvalidRecordPercent", "options": {"threshold": "101"}}])
                }),
                "alert_attributes[0].options.threshold",
            ),
            (
                Box::new(|v| v["alert_attributes"] = json!([{"type": "Failure"}, {"type": "Nope"}])),
                "alert_attributes[1].type",
            ),
            (
                Box::new(|v| v["alert_attributes"] = json!([{"type": "Failure", "send_for": "sometimes"}])),
                "alert_attributes[0].send_for",
            ),
            (
                Box::new(|v| v["failed_record_notifications_enabled"] = json!(true)),
                "failed_record_notifications_threshold_percent",
            ),
            (Box::new(|v| v["schedule"] = json!("daily")), "schedule"),
        ];
        for (edit, field) in cases {
            let mut v = base();
            edit(&mut v);
            let e = input(v.clone()).err().unwrap_or_else(|| panic!("accepted {v}"));
            assert_eq!(field_of(e), field, "{v}");
        }
    }

    #[test]
    fn append_and_insert_need_no_primary_identifier_but_allow_one() {
        for op in ["append", "insert"] {
            let mut v = base();
            v["operation"] = json!(op);
            v["mappings"][0]["is_primary_identifier"] = json!(false);
            assert!(input(v.clone()).is_ok());
            v["mappings"][0]["is_primary_identifier"] = json!(true);
            assert!(input(v).is_ok());
        }
    }

    #[test]
    fn alert_attributes_take_precedence_over_the_deprecated_fields() {
        let mut v = base();
        v["failed_run_notifications_enabled"] = json!(true);
        v["failed_record_notifications_enabled"] = json!(true);
        v["failed_record_notifications_threshold_percent"] = json!(20);
        let c = input(v.clone()).unwrap().config;
        assert!(c.alerts_from_deprecated);
        assert_eq!(c.alerts.len(), 2);
        assert_eq!(c.alerts[1].threshold, Some(20.0));
        v["alert_attributes"] = json!([{"type": "InvalidRecordPercentAlertConfiguration", "send_for": "every_time", "options": {"threshold": "50"}}]);
        let c = input(v).unwrap().config;
        assert!(!c.alerts_from_deprecated);
        assert_eq!(c.alerts.len(), 1);
        assert_eq!(
            (
                c.alerts[0].threshold,
                c.alerts[0].every_time,
                c.alerts[0].should_send_recovery
            ),
            (Some(50.0), true, true)
        );
    }

    #[test]
    fn a_sync_reads_back_as_it_was_written() {
        let mut v = base();
        v["alert_attributes"] = json!([{"type": "Status", "options": {"status": "started"}}]);
        v["field_behavior"] = json!("sync_all_properties");
        v["field_normalization"] = json!("camel_case");
        v["field_order"] = json!("mapping_order");
        let val = input(v).unwrap();
        let s = Sync {
            id: 3,
            sync_job_id: val.sync_job_id,
            webhook_id: val.webhook_id,
            paused: val.paused,
            config: val.config,
            created_at: 0,
            updated_at: 0,
        };
        let again = input(s.input_json()).unwrap();
        assert_eq!(again.config, s.config);
        let back = Sync::from_row(&s.to_row()).unwrap();
        assert_eq!(back, s);
        let j = s.to_json(Some(2));
        assert_eq!(j["held_deliveries"], json!(2));
        assert_eq!(j["status"], json!("ready"));
        assert_eq!(j["failed_run_notifications_enabled"], json!(false));
    }
}
