//! Settings: defaults compiled in from `config/default.toml`, then an optional file, then
//! environment variables `SYNCRELAY__SECTION__KEY`. Unknown keys and ill-typed values stop the
//! start with an error naming the key (`serde_path_to_error` gives the path).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
pub const ENV_PREFIX: &str = "SYNCRELAY__";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub http: HttpSettings,
    pub auth: AuthSettings,
    pub store: StoreSettings,
    pub bus: BusSettings,
    pub events: EventSettings,
    pub delivery: DeliverySettings,
    pub webhooks: WebhookSettings,
    pub callbacks: CallbackSettings,
    pub runs: RunsSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
    pub max_body_bytes: usize,
    pub workers: usize,
    /// Longest time to receive a request body once its headers are in, in milliseconds.
    pub body_read_timeout_ms: u64,
    pub rate_limit: RateLimitSettings,
}

/// Requests per second per API token (a token bucket); `per_second = 0` turns it off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub per_second: f64,
    /// Requests a token may make at once after being idle; 0 means `per_second` rounded up.
    pub burst: u32,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub tokens: Vec<String>,
}

impl std::fmt::Debug for AuthSettings {
    // Tokens are secrets: never printed, only counted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("tokens", &format!("<{} redacted>", self.tokens.len()))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    pub kind: StoreKind,
    pub path: PathBuf,
    pub url: String,
    pub max_connections: u32,
    pub synchronous: Synchronous,
    /// How long a claim of a queued delivery keeps it from other instances (ms); renewed every
    /// third of it while the attempt runs (both stores).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Base64 of 32 bytes: webhook and callback secrets are stored encrypted with it (empty:
    /// stored as they are, with a warning at start). See `store::secrets`.
    #[serde(default)]
    pub encryption_key: String,
    /// Keys secrets may still be encrypted with (rotation): read, and re-encrypted with
    /// `encryption_key` at start.
    #[serde(default)]
    pub previous_encryption_keys: Vec<String>,
}

fn default_dead_letter_retention_hours() -> u64 {
    720
}

fn default_lease_ms() -> u64 {
    60_000
}

/// SQLite's `synchronous` setting (WAL journal): `full` syncs the log at every commit, so an
/// accepted event survives a power cut; `normal` survives a crash of the process (SIGKILL,
/// OOM) but a power cut may lose the last commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Full,
    Normal,
}

impl std::fmt::Debug for StoreSettings {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("synchronous", &self.synchronous)
            .field("lease_ms", &self.lease_ms)
            .field("url", &if self.url.is_empty() { "" } else { "<redacted>" })
            .field(
                "encryption_key",
                &if self.encryption_key.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("previous_encryption_keys", &self.previous_encryption_keys.len())
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    Embedded,
    Kafka,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusSettings {
    pub kind: BusKind,
    pub kafka: KafkaSettings,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub group_id: String,
    pub topics: Vec<String>,
    pub commands_topic: String,
    pub dlq_topic: String,
    pub max_buffered_per_partition: usize,
    pub max_buffered_bytes_per_partition: usize,
    pub inline_attempts: u32,
    pub inline_max_delay_ms: u64,
    pub produce_timeout_ms: u64,
    pub librdkafka: BTreeMap<String, LibrdkafkaValue>,
}

/// A librdkafka property value: written as a string, number or boolean, passed on as a string.
#[derive(Clone, Deserialize)]
#[serde(untagged)]
pub enum LibrdkafkaValue {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for LibrdkafkaValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LibrdkafkaValue::String(s) => f.write_str(s),
            LibrdkafkaValue::Integer(i) => write!(f, "{i}"),
            LibrdkafkaValue::Float(x) => write!(f, "{x}"),
            LibrdkafkaValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl std::fmt::Debug for KafkaSettings {
    // librdkafka properties include sasl.password and ssl keys: print names only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("librdkafka", &self.librdkafka.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    pub max_event_bytes: usize,
    pub max_batch: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    pub max_in_flight: usize,
    pub max_in_flight_per_webhook: usize,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub response_excerpt_bytes: usize,
    pub allowed_cidrs: Vec<IpNet>,
    pub https_only: bool,
    pub poll_interval_ms: u64,
    pub retention_hours: u64,
    /// Dead letters, and dead and dropped rows with their attempts, are kept this long (hours);
    /// 0 keeps them for ever.
    #[serde(default = "default_dead_letter_retention_hours")]
    pub dead_letter_retention_hours: u64,
    /// Which finished deliveries are kept in the delivery log (`GET /deliveries`).
    pub log: LogMode,
    pub retry: RetrySettings,
    pub adaptive: AdaptiveSettings,
    pub breaker: BreakerSettings,
}

/// `delivery.adaptive`: the in-flight limit of each target follows its receiver (AIMD).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveSettings {
    pub enabled: bool,
    /// The limit never goes below this.
    pub min: usize,
    /// The limit a target starts with (then doubled per round trip until the first overload).
    pub initial: usize,
    /// On an overload signal the limit is multiplied by this.
    pub decrease_factor: f64,
    /// A 2xx slower than this many times the target's baseline latency is an overload signal…
    pub latency_factor: f64,
    /// …when also slower than this (ms): fast receivers' jitter is no signal.
    pub latency_floor_ms: u64,
}

/// `delivery.breaker`: a circuit breaker per target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    pub enabled: bool,
    /// Attempts counted over this window (ms)…
    pub window_ms: u64,
    /// …at least this many of them…
    pub min_requests: u32,
    /// …this share of them failures: open.
    pub failure_ratio: f64,
    /// Or this many failures in a row: open. 0: only the ratio.
    pub consecutive_failures: u32,
    /// Open this long (ms) before one probe (half-open) decides.
    pub cool_down_ms: u64,
}

/// `delivery.log`: which finished deliveries the delivery log keeps. Failures (dead letters,
/// retries) are always kept: replay needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogMode {
    /// Every delivery with every attempt.
    All,
    /// Only deliveries that needed more than one attempt or were dead-lettered.
    Failures,
    /// Nothing beyond what the queue and dead letters need.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub initial_interval_ms: u64,
    pub multiplier: f64,
    pub max_interval_ms: u64,
    pub randomization_factor: f64,
    pub max_attempts: u32,
    pub max_elapsed_ms: u64,
    pub retry_after_ceiling_ms: u64,
    /// 429 and timeouts are never retried sooner than this (ms).
    pub overload_floor_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub secret_rotation_grace_seconds: u64,
    /// A webhook whose deliveries failed this long (seconds) with no success is disabled.
    /// 0: never.
    pub disable_after_seconds: u64,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackSettings {
    pub secret: String,
}

impl std::fmt::Debug for CallbackSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackSettings")
            .field(
                "secret",
                &if self.secret.is_empty() {
                    "<generated>"
                } else {
                    "<redacted>"
                },
            )
            .finish()
    }
}

/// The run lifecycle the relay enforces (`runs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsSettings {
    pub batch: RunBatchSettings,
}

/// When `error_handling = "batch"` record errors are flushed as one `sync_job_run:record_error`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunBatchSettings {
    pub max_errors: usize,
    pub max_bytes: usize,
    pub max_age_ms: u64,
}

impl RunsSettings {
    pub fn batch_limits(&self) -> crate::runs::BatchLimits {
        crate::runs::BatchLimits {
            max_errors: self.batch.max_errors,
            max_bytes: self.batch.max_bytes,
            max_age_ms: self.batch.max_age_ms.min(i64::MAX as u64) as i64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {message}")]
    File { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("configuration key `{key}`: {message}")]
    Key { key: String, message: String },
}

impl Settings {
    /// Defaults, then `file` (if any), then the given environment variables.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut tree: toml::Value = toml::from_str(DEFAULT_TOML).expect("default.toml parses");
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            // toml's own rendering quotes the offending line, which may hold a secret: give
            // the line number and the parser's message only.
            let overlay: toml::Value = toml::from_str(&text).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                message: match e.span() {
                    Some(span) => format!(
                        "line {}: {}",
                        text[..span.start.min(text.len())].matches('\n').count() + 1,
                        e.message()
                    ),
                    None => e.message().to_string(),
                },
            })?;
            merge(&mut tree, overlay);
        }
        let mut env: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
        env.sort();
        for (var, raw) in env {
            let path: Vec<String> = var[ENV_PREFIX.len()..]
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(ConfigError::Env {
                    var,
                    message: "empty key segment".into(),
                });
            }
            let value = env_value(&raw);
            set_path(&mut tree, &path, value).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
        }
        let settings: Settings =
            serde_path_to_error::deserialize(tree).map_err(|e: serde_path_to_error::Error<_>| {
                // toml appends where it was ("\nin `webhooks`"): the key says that already.
                let message = e.inner().to_string();
                let message = message.split('\n').next().unwrap_or_default().to_string();
                let mut key = e.path().to_string();
                // An unknown field: name the full key once ("unknown key"), whether or not the
                // path already ends with it, then what is expected there.
                if let Some(rest) = message.strip_prefix("unknown field `") {
                    let field = rest.split('`').next().unwrap_or_default();
                    if key == "." || key.is_empty() {
                        key = field.to_string();
                    } else if key != field && !key.ends_with(&format!(".{field}")) {
                        key = format!("{key}.{field}");
                    }
                    let expected = rest.split_once("`, ").map(|(_, e)| e).unwrap_or("");
                    let message = if expected.is_empty() {
                        "unknown key".to_string()
                    } else {
                        format!("unknown key, {expected}")
                    };
                    return ConfigError::Key { key, message };
                }
                // A value of the wrong type is quoted by serde; a secret must not be.
                let message = if is_secret_key(&key) {
                    redact_quoted(&message)
                } else {
                    message
                };
                ConfigError::Key { key, message }
            })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| {
            Err(ConfigError::Key {
                key: key.into(),
                message: message.into(),
            })
        };
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("http.listen", "must be an address like 127.0.0.1:8080");
        }
        if self.http.max_body_bytes < 1024 {
            return bad("http.max_body_bytes", "must be at least 1024");
        }
        if self.events.max_event_bytes == 0 || self.events.max_event_bytes > self.http.max_body_bytes {
            return bad("events.max_event_bytes", "must be between 1 and http.max_body_bytes");
        }
        if self.events.max_batch == 0 {
            return bad("events.max_batch", "must be at least 1");
        }
        if self.delivery.max_in_flight == 0 {
            return bad("delivery.max_in_flight", "must be at least 1");
        }
        if self.delivery.max_in_flight_per_webhook == 0 {
            return bad("delivery.max_in_flight_per_webhook", "must be at least 1");
        }
        let r = &self.delivery.retry;
        if r.multiplier < 1.0 {
            return bad("delivery.retry.multiplier", "must be >= 1.0");
        }
        if !(0.0..1.0).contains(&r.randomization_factor) {
            return bad("delivery.retry.randomization_factor", "must be in [0, 1)");
        }
        for (i, t) in self.auth.tokens.iter().enumerate() {
            if t.trim().is_empty() {
                return Err(ConfigError::Key {
                    key: format!("auth.tokens[{i}]"),
                    message: "must not be empty (an empty token would be a password anyone knows)".into(),
                });
            }
            if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::Key {
                    key: format!("auth.tokens[{i}]"),
                    message: "must not contain spaces or control characters".into(),
                });
            }
        }
        let rl = &self.http.rate_limit;
        if !(rl.per_second >= 0.0 && rl.per_second.is_finite()) {
            return bad("http.rate_limit.per_second", "must be 0 (off) or a positive number");
        }
        if self.http.body_read_timeout_ms == 0 {
            return bad("http.body_read_timeout_ms", "must be at least 1");
        }
        if r.max_attempts == 0 {
            return bad("delivery.retry.max_attempts", "must be at least 1");
        }
        if r.initial_interval_ms == 0 || r.initial_interval_ms > r.max_interval_ms {
            return bad(
                "delivery.retry.initial_interval_ms",
                "must be between 1 and delivery.retry.max_interval_ms",
            );
        }
        if r.overload_floor_ms > r.retry_after_ceiling_ms {
            return bad(
                "delivery.retry.overload_floor_ms",
                "must not exceed delivery.retry.retry_after_ceiling_ms",
            );
        }
        let a = &self.delivery.adaptive;
        if a.min == 0 || a.min > self.delivery.max_in_flight_per_webhook {
            return bad(
                "delivery.adaptive.min",
                "must be between 1 and delivery.max_in_flight_per_webhook",
            );
        }
        if a.initial < a.min {
            return bad("delivery.adaptive.initial", "must be at least delivery.adaptive.min");
        }
        if !(a.decrease_factor > 0.0 && a.decrease_factor < 1.0) {
            return bad("delivery.adaptive.decrease_factor", "must be in (0, 1)");
        }
        if !(a.latency_factor > 1.0 && a.latency_factor.is_finite()) {
            return bad("delivery.adaptive.latency_factor", "must be a number above 1");
        }
        let b = &self.delivery.breaker;
        if b.window_ms == 0 {
            return bad("delivery.breaker.window_ms", "must be at least 1");
        }
        if b.min_requests == 0 {
            return bad("delivery.breaker.min_requests", "must be at least 1");
        }
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            return bad("delivery.breaker.failure_ratio", "must be in (0, 1]");
        }
        if b.cool_down_ms == 0 {
            return bad("delivery.breaker.cool_down_ms", "must be at least 1");
        }
        match self.store.kind {
            StoreKind::Postgres if self.store.url.is_empty() => {
                return bad("store.url", "required when store.kind = \"postgres\"")
            }
            _ if self.store.lease_ms < 1000 => return bad("store.lease_ms", "must be at least 1000"),
            StoreKind::Sqlite if self.store.path.as_os_str().is_empty() => {
                return bad("store.path", "must not be empty")
            }
            _ => {}
        }
        if self.bus.kind == BusKind::Kafka {
            let k = &self.bus.kafka;
            if !k.librdkafka.contains_key("bootstrap.servers") && !k.librdkafka.contains_key("metadata.broker.list") {
                return bad(
                    "bus.kafka.librdkafka",
                    "needs \"bootstrap.servers\" when bus.kind = \"kafka\"",
                );
            }
            if k.topics.is_empty() {
                return bad("bus.kafka.topics", "must name at least one topic");
            }
            if k.group_id.is_empty() {
                return bad("bus.kafka.group_id", "must not be empty");
            }
            if k.max_buffered_per_partition == 0 {
                return bad("bus.kafka.max_buffered_per_partition", "must be at least 1");
            }
            if k.max_buffered_bytes_per_partition == 0 {
                return bad("bus.kafka.max_buffered_bytes_per_partition", "must be at least 1");
            }
            if k.inline_attempts == 0 {
                return bad("bus.kafka.inline_attempts", "must be at least 1");
            }
        }
        if self.runs.batch.max_errors == 0 {
            return bad("runs.batch.max_errors", "must be at least 1");
        }
        if self.runs.batch.max_bytes < 1024 {
            return bad("runs.batch.max_bytes", "must be at least 1024");
        }
        if self.runs.batch.max_age_ms == 0 {
            return bad("runs.batch.max_age_ms", "must be at least 1");
        }
        if !self.store.encryption_key.is_empty() {
            if let Err(m) = crate::store::secrets::check_key(&self.store.encryption_key) {
                return bad("store.encryption_key", &m);
            }
        }
        for (i, k) in self.store.previous_encryption_keys.iter().enumerate() {
            if let Err(m) = crate::store::secrets::check_key(k) {
                return bad(&format!("store.previous_encryption_keys[{i}]"), &m);
            }
        }
        if !self.callbacks.secret.is_empty() && crate::signing::Secret::parse(&self.callbacks.secret).is_err() {
            return bad(
                "callbacks.secret",
                "must be whsec_ followed by base64 of at least 24 bytes",
            );
        }
        Ok(())
    }

    pub fn is_allowed_ip(&self, ip: IpAddr) -> bool {
        self.delivery.allowed_cidrs.iter().any(|n| n.contains(&ip))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.delivery.request_timeout_ms)
    }
}

/// Keys whose values are secrets: never quoted in an error.
fn is_secret_key(key: &str) -> bool {
    [
        "auth.tokens",
        "callbacks.secret",
        "store.url",
        "store.encryption_key",
        "store.previous_encryption_keys",
        "bus.kafka.librdkafka",
    ]
    .iter()
    .any(|k| key == *k || key.starts_with(&format!("{k}.")) || key.starts_with(&format!("{k}[")))
}

/// `invalid type: string "s3cr3t", expected a sequence` -> `invalid type: string (value not
/// shown), expected a sequence`: everything between the first and the last double quote goes.
fn redact_quoted(message: &str) -> String {
    match (message.find('"'), message.rfind('"')) {
        (Some(a), Some(b)) if b > a => format!("{}(value not shown){}", &message[..a], &message[b + 1..]),
        _ => message.to_string(),
    }
}

/// Environment values: JSON when they parse as JSON (numbers, booleans, lists, tables),
/// otherwise the raw string.
fn env_value(raw: &str) -> toml::Value {
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(serde_json::Value::Null) | Err(_) => toml::Value::String(raw.to_string()),
        Ok(json) => json_to_toml(json).unwrap_or_else(|| toml::Value::String(raw.to_string())),
    }
}

fn json_to_toml(v: serde_json::Value) -> Option<toml::Value> {
    Some(match v {
        serde_json::Value::Null => return None,
        serde_json::Value::Bool(b) => toml::Value::Boolean(b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        serde_json::Value::String(s) => toml::Value::String(s),
        serde_json::Value::Array(a) => toml::Value::Array(a.into_iter().map(json_to_toml).collect::<Option<_>>()?),
        serde_json::Value::Object(o) => toml::Value::Table(
            o.into_iter()
                .map(|(k, v)| json_to_toml(v).map(|v| (k, v)))
                .collect::<Option<_>>()?,
        ),
    })
}

fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_table() && v.is_table() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn set_path(tree: &mut toml::Value, path: &[String], value: toml::Value) -> Result<(), String> {
    let mut node = tree;
    for (i, seg) in path.iter().enumerate() {
        let table = node
            .as_table_mut()
            .ok_or_else(|| format!("`{}` is not a section", path[..i].join(".")))?;
        if i == path.len() - 1 {
            match (table.get_mut(seg), value) {
                (Some(existing @ toml::Value::Table(_)), v @ toml::Value::Table(_)) => merge(existing, v),
                (_, v) => {
                    table.insert(seg.clone(), v);
                }
            }
            return Ok(());
        }
        node = table
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_load_and_match_the_contract() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert_eq!(s.http.listen, "127.0.0.1:8080");
        assert!(s.auth.tokens.is_empty());
        assert_eq!(s.store.kind, StoreKind::Sqlite);
        assert_eq!(s.store.path, PathBuf::from("./data/syncrelay.db"));
        assert_eq!(s.bus.kind, BusKind::Embedded);
        assert_eq!(s.bus.kafka.group_id, "syncrelay");
        assert_eq!(s.bus.kafka.topics, vec!["sync_job_run.events"]);
        assert_eq!(s.bus.kafka.commands_topic, "sync_job_run.commands");
        assert_eq!(s.bus.kafka.dlq_topic, "sync_job_run.events.dlq");
        assert!(s.delivery.allowed_cidrs.is_empty());
        let b = s.runs.batch_limits();
        assert_eq!((b.max_errors, b.max_bytes, b.max_age_ms), (100, 262144, 5000));
    }

    #[test]
    fn env_overrides_with_json_lists_and_numbers() {
        let s = Settings::load(
            None,
            env(&[
                ("SYNCRELAY__AUTH__TOKENS", r#"["t1","t2"]"#),
                ("SYNCRELAY__DELIVERY__RETRY__MAX_ATTEMPTS", "3"),
                ("SYNCRELAY__DELIVERY__ALLOWED_CIDRS", r#"["127.0.0.0/8"]"#),
                ("SYNCRELAY__HTTP__LISTEN", "0.0.0.0:9000"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.auth.tokens, vec!["t1", "t2"]);
        assert_eq!(s.delivery.retry.max_attempts, 3);
        assert!(s.is_allowed_ip("127.0.0.1".parse().unwrap()));
        assert!(!s.is_allowed_ip("10.0.0.1".parse().unwrap()));
        assert_eq!(s.http.listen, "0.0.0.0:9000");
    }

    #[test]
    fn librdkafka_properties_pass_through_from_env_json() {
        let s = Settings::load(
            None,
            env(&[
                ("SYNCRELAY__BUS__KIND", "kafka"),
                (
                    "SYNCRELAY__BUS__KAFKA__LIBRDKAFKA",
                    r#"{"bootstrap.servers":"127.0.0.1:9092","session.timeout.ms":6000,"enable.idempotence":true}"#,
                ),
            ]),
        )
        .unwrap();
        let l = &s.bus.kafka.librdkafka;
        assert_eq!(l["bootstrap.servers"].to_string(), "127.0.0.1:9092");
        assert_eq!(l["session.timeout.ms"].to_string(), "6000");
        assert_eq!(l["enable.idempotence"].to_string(), "true");
        let e = Settings::load(None, env(&[("SYNCRELAY__BUS__KIND", "kafka")])).unwrap_err();
        assert!(e.to_string().contains("bus.kafka.librdkafka"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Settings::load(None, env(&[("SYNCRELAY__DELIVERY__MAX_INFLIGHT", "3")])).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("delivery.max_inflight"), "{msg}");
    }

    #[test]
    fn ill_typed_value_is_named() {
        let e = Settings::load(None, env(&[("SYNCRELAY__DELIVERY__RETRY__MULTIPLIER", "fast")])).unwrap_err();
        assert!(e.to_string().contains("delivery.retry.multiplier"), "{e}");
    }

    #[test]
    fn file_overlay_applies_and_unknown_file_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[http]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(Settings::load(Some(&p), env(&[])).unwrap().http.listen, "127.0.0.1:0");
        std::fs::write(&p, "[htp]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let e = Settings::load(Some(&p), env(&[])).unwrap_err();
        assert!(e.to_string().contains("htp"), "{e}");
        // A syntax error is located by line, without quoting the line (it may hold a secret).
        std::fs::write(&p, "[auth]\ntokens = [\"s3cret-in-file\" \"x\"]\n").unwrap();
        let e = Settings::load(Some(&p), env(&[])).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains("s3cret-in-file"), "{e}");
        std::fs::write(&p, "[auth]\ntokens = \"s3cret-in-file\"\n").unwrap();
        let e = Settings::load(Some(&p), env(&[])).unwrap_err().to_string();
        assert!(e.contains("auth.tokens") && !e.contains("s3cret-in-file"), "{e}");
    }

    #[test]
    fn unknown_key_is_named_once() {
        for (var, key) in [
            ("SYNCRELAY__WEBHOOKS__X", "webhooks.x"),
            ("SYNCRELAY__DELIVERY__RETRY__FOO", "delivery.retry.foo"),
            ("SYNCRELAY__NOPE", "nope"),
        ] {
            let msg = Settings::load(None, env(&[(var, "3")])).unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("configuration key `{key}`: unknown key")),
                "{msg}"
            );
            let last = key.rsplit('.').next().unwrap();
            assert_eq!(msg.matches(&format!("{last}`")).count(), 1, "{msg}");
            assert!(!msg.contains("field `") && !msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn empty_tokens_are_refused_and_secrets_never_echoed() {
        for tokens in [r#"["ok",""]"#, r#"["ok","  "]"#] {
            let e = Settings::load(None, env(&[("SYNCRELAY__AUTH__TOKENS", tokens)])).unwrap_err();
            assert!(e.to_string().contains("auth.tokens[1]"), "{e}");
        }
        let e = Settings::load(None, env(&[("SYNCRELAY__AUTH__TOKENS", "sup3r-s3cret-t0ken")])).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("auth.tokens"), "{msg}");
        assert!(!msg.contains("sup3r-s3cret-t0ken"), "{msg}");
        let e = Settings::load(None, env(&[("SYNCRELAY__CALLBACKS__SECRET", "[\"whsec_leak\"]")])).unwrap_err();
        assert!(!e.to_string().contains("whsec_leak"), "{e}");
        // Encryption keys: a bad one names the key, never the value (nor does the debug print).
        for (k, v, named) in [
            (
                "SYNCRELAY__STORE__ENCRYPTION_KEY",
                "c2hvcnQta2V5LWxlYWs=",
                "store.encryption_key",
            ),
            (
                "SYNCRELAY__STORE__ENCRYPTION_KEY",
                "[\"c2hvcnQta2V5LWxlYWs=\"]",
                "store.encryption_key",
            ),
            (
                "SYNCRELAY__STORE__PREVIOUS_ENCRYPTION_KEYS",
                "[\"c2hvcnQta2V5LWxlYWs=\"]",
                "store.previous_encryption_keys[0]",
            ),
        ] {
            let e = Settings::load(None, env(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(named) && !e.contains("c2hvcnQta2V5LWxlYWs"), "{e}");
        }
        let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
        let s = Settings::load(None, env(&[("SYNCRELAY__STORE__ENCRYPTION_KEY", key)])).unwrap();
        assert!(!format!("{s:?}").contains(key));
    }

    #[test]
    fn semantic_validation_names_the_key() {
        let e = Settings::load(
            None,
            env(&[("SYNCRELAY__DELIVERY__RETRY__RANDOMIZATION_FACTOR", "1.5")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("delivery.retry.randomization_factor"), "{e}");
    }
}
