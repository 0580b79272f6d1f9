//! Every metric syncrelay exports, in one place (CONTRACT §5): names start with `syncrelay_`,
//! counters end in `_total`, durations are `_seconds` histograms, and label values come from the
//! small fixed sets listed beside each metric — never a URL, an id or an error string.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// `source`: `api`, `kafka`.
pub const INGEST_SOURCES: &[&str] = &["api", "kafka"];
/// `result` of one attempt.
pub const ATTEMPT_RESULTS: &[&str] = &[
    "success",
    "http_3xx",
    "http_4xx",
    "http_5xx",
    "timeout",
    "connect_error",
    "blocked_address",
    "other_error",
];
/// `outcome` of a delivery (terminal).
pub const DELIVERY_OUTCOMES: &[&str] = &["delivered", "dead_lettered"];
/// `reason` of a dead letter.
pub const DEAD_LETTER_REASONS: &[&str] = &[
    "attempts_exhausted",
    "payload_too_large",
    "webhook_disabled",
    "unknown_webhook",
    "unknown_run",
    "blocked_address",
    "malformed",
    "event_too_large",
    "run_finished",
    "run_stopped",
];
/// `reason` a run event was dropped (not delivered, not dead-lettered): a transition the run's
/// state refuses, a record after a fail_fast failure, an event queued behind a `started` its
/// webhook answered 400.
pub const RUN_DROP_REASONS: &[&str] = &["illegal_transition", "run_failed", "run_stopped"];
/// `status` a run ended with.
pub const RUN_END_STATUSES: &[&str] = &["completed", "failed", "stopped"];
/// `kind` of a delivery target.
pub const TARGET_KINDS: &[&str] = &["webhook", "callback", "sync"];
/// `alert_type` of a Census-style sync alert.
pub const SYNC_ALERT_TYPES: &[&str] = &["InvalidRecordPercent", "Failure", "Status"];
/// `state` of a sync alert.
pub const SYNC_ALERT_STATES: &[&str] = &["triggered", "recovered"];
/// `status` of a finished Eloqua bulk sync (its callback's payload).
pub const ELOQUA_SYNC_STATUSES: &[&str] = &["success", "warning", "error"];
/// `status_class` of an API response.
pub const STATUS_CLASSES: &[&str] = &["2xx", "3xx", "4xx", "5xx"];

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub events_ingested: IntCounterVec,
    pub events_filtered: IntCounter,
    pub writes_joined: IntCounter,
    pub attempts: IntCounterVec,
    pub attempt_duration: HistogramVec,
    pub deliveries: IntCounterVec,
    pub retries: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub dead_letters_replayed: IntCounter,
    pub in_flight: IntGauge,
    pub queue_depth: IntGauge,
    pub oldest_undelivered_age: prometheus::Gauge,
    pub end_to_end_latency: Histogram,
    pub attempts_per_delivery: Histogram,
    pub webhooks_disabled: IntCounter,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub http_rate_limited: IntCounter,
    pub kafka_messages: IntCounterVec,
    pub kafka_consumer_lag: IntGaugeVec,
    pub kafka_committed_offset: IntGaugeVec,
    pub kafka_paused_partitions: IntGauge,
    pub kafka_assigned_partitions: IntGauge,
    pub kafka_rebalances: IntCounterVec,
    pub parked: IntCounter,
    pub leases_lost: IntCounter,
    pub run_events_dropped: IntCounterVec,
    pub runs_finished: IntCounterVec,
    pub sync_alerts: IntCounterVec,
    pub sync_deliveries_held: IntGauge,
    pub eloqua_callbacks: IntCounterVec,
    pub sync_units_created: IntCounter,
    pub sync_unit_runs: IntCounter,
    pub breaker_transitions: IntCounterVec,
    pub breakers_open: IntGauge,
    pub target_breaker_state: IntGaugeVec,
    pub target_concurrency_limit: IntGaugeVec,
    pub adaptive_decreases: IntCounterVec,
    pub target_pauses: IntCounter,
    pub held_attempts: IntCounter,
    pub operational_events: IntCounterVec,
}

/// `to`: the state a target's circuit breaker moved to.
pub const BREAKER_STATES: &[&str] = &["open", "half_open", "closed"];
/// `signal` that shrank a target's adaptive limit.
pub const ADAPTIVE_SIGNALS: &[&str] = &["http_429", "http_503", "timeout", "connect_error", "latency"];
/// `event` of an operational event the relay emitted.
pub const OPERATIONAL_EVENTS: &[&str] = &[
    "webhook:disabled",
    "webhook:enabled",
    "webhook:secret_rotated",
    "webhook:failing",
    "webhook:recovered",
    "delivery:exhausted",
];

/// `status` of a consumed Kafka message.
pub const KAFKA_MESSAGE_RESULTS: &[&str] = &["accepted", "poison"];
/// `event` of a rebalance.
pub const REBALANCE_KINDS: &[&str] = &["assign", "revoke"];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };

        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let oldest = prometheus::Gauge::new(
            "syncrelay_oldest_undelivered_age_seconds",
            "Age of the oldest event not yet delivered or dead-lettered.",
        )
        .expect("valid metric");
        registry.register(Box::new(oldest.clone())).expect("unique metric");

        let m = Metrics {
            events_ingested: counter_vec(
                "syncrelay_events_ingested_total",
                "Events accepted and durably queued, by source.",
                &["source"],
            ),
            events_filtered: counter(
                "syncrelay_events_filtered_total",
                "Events not delivered to a webhook because its event_types do not include them.",
            ),
            writes_joined: counter(
                "syncrelay_queue_writes_joined_total",
                "Writes of new rows that joined another caller's store transaction instead of making their own.",
            ),
            attempts: counter_vec(
                "syncrelay_delivery_attempts_total",
                "HTTP delivery attempts, by result.",
                &["result", "kind"],
            ),
            attempt_duration: histogram_vec(
                "syncrelay_delivery_attempt_duration_seconds",
                "Duration of one delivery attempt (connect to end of capped response body).",
                &["kind"],
            ),
            deliveries: counter_vec(
                "syncrelay_deliveries_total",
                "Deliveries that reached a terminal outcome.",
                &["outcome", "kind"],
            ),
            retries: counter_vec(
                "syncrelay_delivery_retries_total",
                "Failed attempts that were scheduled for another attempt.",
                &["kind"],
            ),
            dead_letters: counter_vec(
                "syncrelay_dead_letters_total",
                "Events or deliveries dead-lettered, by reason.",
                &["reason"],
            ),
            dead_letters_replayed: counter(
                "syncrelay_dead_letters_replayed_total",
                "Dead letters re-driven by replay.",
            ),
            in_flight: gauge(
                "syncrelay_deliveries_in_flight",
                "Delivery attempts in progress.",
            ),
            queue_depth: gauge(
                "syncrelay_queue_depth",
                "Deliveries queued (ready, waiting behind their run, or in retry).",
            ),
            oldest_undelivered_age: oldest,
            end_to_end_latency: histogram(
                "syncrelay_delivery_latency_seconds",
                "From the event's ingest to its 2xx answer.",
                LATENCY_BUCKETS.to_vec(),
            ),
            attempts_per_delivery: histogram(
                "syncrelay_delivery_attempts_per_delivery",
                "Attempts a delivered event needed.",
                vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0],
            ),
            webhooks_disabled: counter(
                "syncrelay_webhooks_disabled_total",
                "Webhooks disabled by the relay (410 Gone, or failing for webhooks.disable_after_seconds).",
            ),
            http_requests: counter_vec(
                "syncrelay_http_requests_total",
                "API requests, by route template, method and status class.",
                &["route", "method", "status_class"],
            ),
            http_request_duration: histogram_vec(
                "syncrelay_http_request_duration_seconds",
                "API request duration, by route template.",
                &["route"],
            ),
            http_rate_limited: counter(
                "syncrelay_http_rate_limited_total",
                "API requests refused with 429 because their token exceeded http.rate_limit.",
            ),
            kafka_messages: counter_vec(
                "syncrelay_kafka_messages_total",
                "Kafka messages consumed, by status (poison messages go to the dead-letter topic).",
                &["status"],
            ),
            kafka_consumer_lag: gauge_vec(
                "syncrelay_kafka_consumer_lag",
                "Messages between the committed offset and the log end, per assigned partition (librdkafka statistics).",
                &["topic", "partition"],
            ),
            kafka_committed_offset: gauge_vec(
                "syncrelay_kafka_committed_offset",
                "Committed offset per assigned partition (librdkafka statistics).",
                &["topic", "partition"],
            ),
            kafka_paused_partitions: gauge(
                "syncrelay_kafka_paused_partitions",
                "Partitions paused because their buffered events reached bus.kafka.max_buffered_per_partition (or max_buffered_bytes_per_partition).",
            ),
            kafka_assigned_partitions: gauge(
                "syncrelay_kafka_assigned_partitions",
                "Partitions currently assigned to this instance by the consumer group.",
            ),
            kafka_rebalances: counter_vec(
                "syncrelay_kafka_rebalances_total",
                "Consumer group rebalance events (partitions assigned or revoked).",
                &["event"],
            ),
            parked: counter(
                "syncrelay_deliveries_parked_total",
                "Deliveries moved from memory to the store's retry queue (failing receiver, or behind a parked event of their run).",
            ),
            leases_lost: counter(
                "syncrelay_leases_lost_total",
                "Claimed deliveries whose lease this instance lost before recording them (it expired and another instance took the row); their outcome here was discarded.",
            ),
            run_events_dropped: counter_vec(
                "syncrelay_run_events_dropped_total",
                "Run events not delivered because the run lifecycle refused them, by reason.",
                &["reason"],
            ),
            runs_finished: counter_vec(
                "syncrelay_runs_total",
                "Runs that reached a final status, by status.",
                &["status"],
            ),
            sync_alerts: counter_vec(
                "syncrelay_sync_alerts_total",
                "Census-style sync alerts sent (sync_job_run:alert events), by alert type and state.",
                &["alert_type", "state"],
            ),
            sync_deliveries_held: gauge(
                "syncrelay_sync_deliveries_held",
                "Deliveries held for paused Census-style syncs (accepted, not attempted until unpaused).",
            ),
            eloqua_callbacks: counter_vec(
                "syncrelay_eloqua_sync_callbacks_total",
                "Eloqua bulk syncs that finished and had their one callback queued, by the sync's final status.",
                &["status"],
            ),
            sync_units_created: counter(
                "syncrelay_sync_units_created_total",
                "DevRev-style sync units created (airdrop.sync-units.create.bulk).",
            ),
            sync_unit_runs: counter(
                "syncrelay_sync_unit_runs_total",
                "Sync job runs created naming a DevRev-style sync unit (sync_unit_id).",
            ),
            breaker_transitions: counter_vec(
                "syncrelay_breaker_transitions_total",
                "Circuit breaker state changes of delivery targets, by the state entered.",
                &["to"],
            ),
            breakers_open: gauge(
                "syncrelay_breakers_open",
                "Delivery targets whose circuit breaker is open or half-open now.",
            ),
            target_breaker_state: gauge_vec(
                "syncrelay_target_breaker_state",
                "Circuit breaker of a delivery target: 0 closed, 1 half-open, 2 open (at most 200 targets exported; `target` is a webhook id or callback:host:port).",
                &["target"],
            ),
            target_concurrency_limit: gauge_vec(
                "syncrelay_target_concurrency_limit",
                "Adaptive in-flight limit of a delivery target (at most 200 targets exported; `target` is a webhook id or callback:host:port).",
                &["target"],
            ),
            adaptive_decreases: counter_vec(
                "syncrelay_adaptive_decreases_total",
                "Times a target's adaptive in-flight limit was cut, by the signal.",
                &["signal"],
            ),
            target_pauses: counter(
                "syncrelay_target_pauses_total",
                "Times a whole target was paused by a Retry-After on 429/503.",
            ),
            held_attempts: counter(
                "syncrelay_breaker_held_total",
                "Deliveries ready to go but held because their target's breaker was open (not attempts; Kafka deliveries parked for it included).",
            ),
            operational_events: counter_vec(
                "syncrelay_operational_events_total",
                "Operational events emitted (before fan-out to subscribers), by event.",
                &["event_type"],
            ),
            registry,
        };
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        // Pre-create every labelled series so dashboards and alerts see zeros, not gaps.
        for s in INGEST_SOURCES {
            m.events_ingested.with_label_values(&[s]);
        }
        for k in TARGET_KINDS {
            for r in ATTEMPT_RESULTS {
                m.attempts.with_label_values(&[r, k]);
            }
            for o in DELIVERY_OUTCOMES {
                m.deliveries.with_label_values(&[o, k]);
            }
            m.retries.with_label_values(&[k]);
            m.attempt_duration.with_label_values(&[k]);
        }
        for r in DEAD_LETTER_REASONS {
            m.dead_letters.with_label_values(&[r]);
        }
        for r in KAFKA_MESSAGE_RESULTS {
            m.kafka_messages.with_label_values(&[r]);
        }
        for r in RUN_DROP_REASONS {
            m.run_events_dropped.with_label_values(&[r]);
        }
        for s in RUN_END_STATUSES {
            m.runs_finished.with_label_values(&[s]);
        }
        for st in ELOQUA_SYNC_STATUSES {
            m.eloqua_callbacks.with_label_values(&[st]);
        }
        for t in SYNC_ALERT_TYPES {
            for st in SYNC_ALERT_STATES {
                m.sync_alerts.with_label_values(&[t, st]);
            }
        }
        for k in REBALANCE_KINDS {
            m.kafka_rebalances.with_label_values(&[k]);
        }
        for k in BREAKER_STATES {
            m.breaker_transitions.with_label_values(&[k]);
        }
        for k in ADAPTIVE_SIGNALS {
            m.adaptive_decreases.with_label_values(&[k]);
        }
        for k in OPERATIONAL_EVENTS {
            m.operational_events.with_label_values(&[k]);
        }
        m
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
