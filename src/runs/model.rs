//! Sync jobs and sync job runs as the API shows them (Truto's shapes).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::domain::rfc3339_ms;

/// One resource of a sync job. `persist` is filled in by validation (false by default for proxy
/// resources, always true for unified `api/resource` ones).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    pub resource: String,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_on: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist: Option<bool>,
}

impl ResourceSpec {
    pub fn is_unified(&self) -> bool {
        self.resource.contains('/')
    }
}

#[derive(Debug, Clone)]
pub struct SyncJob {
    pub id: String,
    pub integration_name: String,
    pub args_schema: Option<Value>,
    pub resources: Vec<ResourceSpec>,
    pub environment_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub seq: i64,
}

impl SyncJob {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "integration_name": self.integration_name,
            "args_schema": self.args_schema,
            "resources": self.resources,
            "environment_id": self.environment_id,
            "created_at": rfc3339_ms(self.created_at),
            "updated_at": rfc3339_ms(self.updated_at),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ErrorHandling {
    FailFast,
    #[default]
    Ignore,
    Batch,
}

impl ErrorHandling {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorHandling::FailFast => "fail_fast",
            ErrorHandling::Ignore => "ignore",
            ErrorHandling::Batch => "batch",
        }
    }
    pub fn parse(s: &str) -> ErrorHandling {
        match s {
            "fail_fast" => ErrorHandling::FailFast,
            "batch" => ErrorHandling::Batch,
            _ => ErrorHandling::Ignore,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    RateLimited,
    Completed,
    Failed,
    Stopped,
}

impl Status {
    pub const ALL: [&'static str; 6] = ["created", "running", "rate_limited", "completed", "failed", "stopped"];
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::RateLimited => "rate_limited",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Stopped => "stopped",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "created" => Status::Created,
            "running" => Status::Running,
            "rate_limited" => Status::RateLimited,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "stopped" => Status::Stopped,
            _ => return None,
        })
    }
    /// Created, running or rate limited: an executor may still be working on it.
    pub fn is_active(self) -> bool {
        matches!(self, Status::Created | Status::Running | Status::RateLimited)
    }
}

/// Per-resource counters of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ResourceStats {
    /// `sync_job_run:record` events accepted for delivery.
    #[serde(default)]
    pub records: i64,
    /// `sync_job_run:record_error` events accepted (delivered one by one, or batched).
    #[serde(default)]
    pub errors: i64,
    #[serde(default)]
    pub records_delivered: i64,
    #[serde(default)]
    pub records_dead_lettered: i64,
    /// Records and record errors refused (after a fail_fast failure, or of a finished run).
    #[serde(default)]
    pub dropped: i64,
}

pub type Stats = std::collections::BTreeMap<String, ResourceStats>;

#[derive(Debug, Clone)]
pub struct Run {
    pub id: String,
    pub sync_job_id: String,
    pub integrated_account_id: String,
    pub webhook_id: Option<String>,
    pub daemon_group_key: Option<String>,
    pub daemon_id: Option<String>,
    pub callback_url: Option<String>,
    pub args: Value,
    pub resources: Value,
    pub sync_job: Value,
    pub error_handling: ErrorHandling,
    pub ignore_previous_run: bool,
    pub status: Status,
    pub resource_stats: Stats,
    pub illegal_transitions: i64,
    pub stop_reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The DevRev-style sync unit the run syncs (CONTRACT §3, DevRev sync units).
    pub sync_unit_id: Option<String>,
    pub seq: i64,
}

fn opt_time(ms: Option<i64>) -> Value {
    ms.map(|m| Value::String(rfc3339_ms(m))).unwrap_or(Value::Null)
}

impl Run {
    /// The run as the API shows it (Truto's shape, plus the relay's counters).
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "sync_job_id": self.sync_job_id,
            "integrated_account_id": self.integrated_account_id,
            "status": self.status.as_str(),
            "args": self.args,
            "resources": self.resources,
            "daemon_id": self.daemon_id,
            "daemon_group_key": self.daemon_group_key,
            "webhook_id": self.webhook_id,
            "callback_url": self.callback_url,
            "error_handling": self.error_handling.as_str(),
            "ignore_previous_run": self.ignore_previous_run,
            "resource_stats": self.resource_stats,
            "illegal_transitions": self.illegal_transitions,
            "stop_reason": self.stop_reason,
            "created_at": rfc3339_ms(self.created_at),
            "updated_at": rfc3339_ms(self.updated_at),
            "started_at": opt_time(self.started_at),
            "finished_at": opt_time(self.finished_at),
            "sync_unit_id": self.sync_unit_id,
            "sync_job": self.sync_job,
        })
    }
}
