//! The OpenAPI 3.1 document of the whole API, served at `GET /openapi.json` (no token needed).
//!
//! Built from code so that its limits are the ones the handlers enforce (`domain::limits`,
//! `runs::validate::MAX_RESOURCES`, `events.max_batch`, `http.max_body_bytes`, …). It documents
//! exactly the routes of `api::route_table()`; `tests/openapi.rs` checks both directions (every
//! route is documented with its method and path, every documented operation is routed) and
//! that `docs/openapi.json`, the copy for readers, is this document for the default settings
//! (`UPDATE_OPENAPI=1 cargo test --test openapi` rewrites it).

use actix_web::HttpResponse;
use serde_json::{json, Map, Value};

use super::State;
use crate::config::Settings;
use crate::domain::limits;
use crate::runs::validate::MAX_RESOURCES;

/// `GET /openapi.json`.
pub async fn serve(state: State) -> HttpResponse {
    HttpResponse::Ok().json(document(&state.settings))
}

// ---- schema helpers ---------------------------------------------------------------------------

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// A string without control characters (CONTRACT §3, field limits).
fn text(max: usize) -> Value {
    json!({"type": "string", "maxLength": max, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"})
}

/// `schema` or `null`.
fn nullable(schema: Value) -> Value {
    json!({"anyOf": [schema, {"type": "null"}]})
}

fn uuid() -> Value {
    json!({"type": "string", "format": "uuid"})
}

fn time() -> Value {
    json!({"type": "string", "format": "date-time"})
}

fn int() -> Value {
    json!({"type": "integer"})
}

/// An object with exactly these properties (`additionalProperties: false`).
fn object(required: &[&str], props: Value) -> Value {
    json!({
        "type": "object",
        "required": required,
        "properties": props,
        "additionalProperties": false,
    })
}

/// A response object whose every property is always present.
fn record(props: Value) -> Value {
    let required: Vec<String> = props
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    json!({
        "type": "object",
        "required": required,
        "properties": props,
        "additionalProperties": false,
    })
}

/// A string with something besides white space, without control characters.
fn non_blank(max: usize) -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"})
}

/// Eloqua's paged list.
fn eloqua_page(item: Value) -> Value {
    record(json!({
        "items": {"type": "array", "items": item},
        "totalResults": {"type": "integer", "minimum": 0},
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
        "offset": {"type": "integer", "minimum": 0},
        "count": {"type": "integer", "minimum": 0},
        "hasMore": {"type": "boolean"},
    }))
}

fn url() -> Value {
    json!({
        "type": "string",
        "format": "uri",
        "maxLength": limits::URL,
        "description": "http(s) URL with a host and no credentials, refused when its host is not a global address (unless in `delivery.allowed_cidrs`) or names loopback",
    })
}

fn event_name_pattern(wildcard: bool) -> String {
    let part = "[a-z0-9_]{1,64}";
    if wildcard {
        format!("^(\\*|{part}:(\\*|{part}))$")
    } else {
        format!("^{part}:{part}$")
    }
}

/// `whsec_` + canonical padded base64 of 24 to 64 bytes (`signing::Secret::parse`).
const SECRET_PATTERN: &str = "^whsec_(?:(?:[A-Za-z0-9+/]{4}){8,20}(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?|(?:[A-Za-z0-9+/]{4}){21}(?:[A-Za-z0-9+/][AQgw]==)?)$";

// ---- operation helpers ------------------------------------------------------------------------

fn json_content(schema: Value) -> Value {
    json!({ "application/json": { "schema": schema } })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": json_content(schema) })
}

fn error_response(name: &str) -> Value {
    json!({ "$ref": format!("#/components/responses/{name}") })
}

fn path_id(description: &str) -> Value {
    json!({
        "name": "id",
        "in": "path",
        "required": true,
        "description": description,
        "schema": {"type": "string"},
    })
}

fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({
        "name": name,
        "in": "query",
        "required": false,
        "description": description,
        "schema": schema,
    })
}

fn paging() -> Vec<Value> {
    vec![
        query(
            "limit",
            "Page size (default 50).",
            json!({"type": "integer", "minimum": 1, "maximum": 1000}),
        ),
        query(
            "cursor",
            "`next_cursor` of the previous page.",
            json!({"type": "string", "pattern": "^(-?[0-9]{1,18})?$"}),
        ),
    ]
}

fn eloqua_paging() -> Vec<Value> {
    vec![
        query(
            "limit",
            "Page size (default 1000).",
            json!({"type": "integer", "minimum": 1, "maximum": 1000}),
        ),
        query(
            "offset",
            "Items to skip.",
            json!({"type": "integer", "minimum": 0, "maximum": i64::MAX}),
        ),
    ]
}

fn list_of(item: Value) -> Value {
    record(json!({
        "results": {"type": "array", "items": item},
        "next_cursor": nullable(json!({"type": "string"})),
    }))
}

/// What every operation that needs no body can answer besides its own responses.
const COMMON: &[&str] = &["401", "429", "500", "503"];
/// … and with a JSON body.
const WITH_BODY: &[&str] = &["400", "401", "408", "413", "429", "500", "503"];

struct Op {
    id: &'static str,
    summary: &'static str,
    tag: &'static str,
    public: bool,
    params: Vec<Value>,
    body: Option<(Value, Value)>,
    /// The body may be left out (`POST /webhook/{id}/enable`).
    body_optional: bool,
    responses: Vec<(&'static str, Value)>,
    errors: Vec<&'static str>,
    links: Option<(&'static str, Value)>,
}

impl Op {
    fn new(id: &'static str, tag: &'static str, summary: &'static str) -> Op {
        Op {
            id,
            summary,
            tag,
            public: false,
            params: Vec::new(),
            body: None,
            body_optional: false,
            responses: Vec::new(),
            errors: COMMON.to_vec(),
            links: None,
        }
    }
    fn public(mut self) -> Op {
        self.public = true;
        self.errors.retain(|e| *e == "500");
        self
    }
    fn params(mut self, p: Vec<Value>) -> Op {
        self.params.extend(p);
        self
    }
    fn optional_body(mut self) -> Op {
        self.body_optional = true;
        self
    }
    fn body(mut self, schema: Value, example: Value) -> Op {
        self.body = Some((schema, example));
        for e in WITH_BODY {
            if !self.errors.contains(e) {
                self.errors.push(e);
            }
        }
        self
    }
    fn respond(mut self, status: &'static str, response: Value) -> Op {
        self.responses.push((status, response));
        self
    }
    fn errors(mut self, extra: &[&'static str]) -> Op {
        for e in extra {
            if !self.errors.contains(e) {
                self.errors.push(e);
            }
        }
        self
    }
    /// OpenAPI links on the response with this status (stateful testing follows them).
    fn links(mut self, status: &'static str, links: Value) -> Op {
        self.links = Some((status, links));
        self
    }

    fn build(self) -> Value {
        let mut responses = Map::new();
        for (status, mut resp) in self.responses {
            if let Some((s, links)) = &self.links {
                if *s == status {
                    resp["links"] = links.clone();
                }
            }
            responses.insert(status.to_string(), resp);
        }
        let mut errors = self.errors;
        errors.sort();
        for e in errors {
            responses.insert(e.to_string(), error_response(e));
        }
        let mut op = json!({
            "operationId": self.id,
            "summary": self.summary,
            "tags": [self.tag],
            "responses": responses,
        });
        if !self.params.is_empty() {
            op["parameters"] = Value::Array(self.params);
        }
        if let Some((schema, example)) = self.body {
            op["requestBody"] = json!({
                "required": !self.body_optional,
                "content": {"application/json": {"schema": schema, "example": example}},
            });
        }
        if self.public {
            op["security"] = json!([]);
        }
        op
    }
}

fn link(operation: &str, parameters: Value) -> Value {
    json!({ "operationId": operation, "parameters": parameters })
}

// ---- the document -------------------------------------------------------------------------------

/// The document for these settings (limits that are configuration come from them).
pub fn document(settings: &Settings) -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for (method, path, op) in operations() {
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[method] = op.build();
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "syncrelay",
            "version": env!("CARGO_PKG_VERSION"),
            "summary": "Sync job run events in, signed webhooks out",
            "description": "The HTTP API of syncrelay (docs/CONTRACT.md §3). JSON in and out; every route but `/health/*`, `/metrics` and `/openapi.json` needs `Authorization: Bearer <token>` (the scheme in any case). A JSON body that repeats a key in an object is refused (400 naming the key's path; only an event's `payload` is passed on as given). Every string and array field has a maximum, given here and in CONTRACT §3 (field limits). Errors are typed: `{\"type\",\"message\",\"detail\"}` plus a field by type.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "security": [{"bearerAuth": []}],
        "tags": [
            {"name": "webhooks", "description": "Webhook registrations"},
            {"name": "events", "description": "Events in"},
            {"name": "deliveries", "description": "Delivery log and dead letters"},
            {"name": "sync-jobs", "description": "Sync jobs, runs and run commands (Truto's shapes)"},
            {"name": "eloqua", "description": "Eloqua-style bulk syncs"},
            {"name": "devrev", "description": "DevRev-style airdrop sync units"},
            {"name": "census", "description": "Census-style syncs: mapped records of a sync job's runs to a webhook"},
            {"name": "operations", "description": "Health, metrics, this document"},
        ],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of `auth.tokens`.",
                },
            },
            "schemas": schemas(settings),
            "responses": error_responses(),
        },
    })
}

fn error_responses() -> Value {
    let e = |description: &str, schema: &str| ok(description, r(schema));
    let mut too_many = e("The token exceeded `http.rate_limit`.", "TooManyRequestsError");
    too_many["headers"] = json!({
        "Retry-After": {
            "description": "Seconds to wait, as in `retry_after`.",
            "required": true,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    });
    let mut unavailable = e(
        "A dependency (the store, the bus) cannot take the request just now — PostgreSQL restarting or out of connections, SQLite busy or its disk full, the bus not acknowledging: send it again after `Retry-After`.",
        "ServiceUnavailableError",
    );
    unavailable["headers"] = json!({
        "Retry-After": {
            "description": "Seconds to wait before sending the request again.",
            "required": true,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    });
    json!({
        "400": e("Invalid request: `detail.field` names the field (`events[3].payload`, `resources[0].query.a`).", "BadRequestError"),
        "401": e("Missing or invalid bearer token.", "UnauthenticatedError"),
        "404": e("No such object (or no such route).", "NotFoundError"),
        "405": e("The path is routed, but not for this method (the `Allow` header lists those that are); not listed per operation.", "MethodNotAllowedError"),
        "408": e("The body did not arrive within `http.body_read_timeout_ms` (the connection is closed).", "RequestTimeoutError"),
        "409": e("Conflicts with the object's state.", "ConflictError"),
        "413": e("The body (or one event) is larger than its limit.", "RequestEntityTooLargeError"),
        "429": too_many,
        "500": e("Unexpected error; quote `reference_id`.", "InternalError"),
        "503": unavailable,
    })
}

fn error_schema(kind: &str, detail: Value, extra: Value) -> Value {
    let mut props = json!({
        "type": {"const": kind},
        "message": {"type": "string"},
        "detail": detail,
    });
    let mut required = vec!["type".to_string(), "message".to_string(), "detail".to_string()];
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            required.push(k.clone());
            props[k] = v;
        }
    }
    json!({
        "type": "object",
        "required": required,
        "properties": props,
        "additionalProperties": false,
    })
}

fn schemas(settings: &Settings) -> Value {
    let event_id = json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"});
    let routed = record(json!({
        "id": {"type": "string"},
        "status": {"enum": ["queued", "dead_lettered", "filtered", "dropped", "batched", "produced"]},
        "reason": {"type": "string"},
        "deliveries": nullable(json!({"type": "integer", "minimum": 0})),
    }));
    let mut routed_optional_reason = routed;
    routed_optional_reason["required"] = json!(["id", "status", "deliveries"]);

    let overrides = json!({
        "type": "object",
        "additionalProperties": false,
        "description": "this webhook's delivery settings replacing the configured ones",
        "properties": {
            "max_in_flight": nullable(json!({"type": "integer", "minimum": 1, "maximum": settings.delivery.max_in_flight, "description": "cap of requests in progress (replaces delivery.max_in_flight_per_webhook; the adaptive limit stays under it); null or absent: the configured one"})),
            "retry": nullable(json!({
                "type": "object",
                "additionalProperties": false,
                "description": "replaces keys of delivery.retry (null or absent: the configured value); together they must make a valid policy",
                "properties": {
                    "initial_interval_ms": nullable(json!({"type": "integer", "minimum": 1, "maximum": 2_592_000_000u64})),
                    "multiplier": nullable(json!({"type": "number", "minimum": 1, "maximum": 100})),
                    "max_interval_ms": nullable(json!({"type": "integer", "minimum": 1, "maximum": 2_592_000_000u64})),
                    "max_attempts": nullable(json!({"type": "integer", "minimum": 1, "maximum": 1000})),
                    "max_elapsed_ms": nullable(json!({"type": "integer", "minimum": 1, "maximum": 2_592_000_000u64})),
                },
            })),
        },
    });
    let webhook_props = json!({
        "overrides": nullable(overrides.clone()),
        "id": uuid(),
        "target_url": {"type": "string"},
        "event_types": {"type": "array", "items": {"type": "string"}},
        "is_active": {"type": "boolean"},
        "description": nullable(json!({"type": "string"})),
        "previous_secret_expires_at": nullable(time()),
        "created_at": time(),
        "updated_at": time(),
    });
    let mut with_state = webhook_props.clone();
    with_state["delivery"] = record(json!({
        "breaker": {"enum": ["closed", "open", "half_open", "held"], "description": "this instance's circuit breaker for the webhook (`held`: the webhook is disabled, its pending events are kept)"},
        "concurrency_limit": {"type": "integer", "minimum": 1, "description": "requests this instance may have in progress to the webhook now (adaptive)"},
        "failing_since": nullable(time()),
    }));
    let mut with_secret = webhook_props.clone();
    with_secret["secret"] = json!({"type": "string", "pattern": "^whsec_"});

    let resource = object(
        &["resource", "method"],
        json!({
            "resource": {
                "type": "string", "maxLength": limits::NAME,
                "pattern": "^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)?$",
                "description": "`unified_api/resource` (persisted) or a proxy resource name",
            },
            "method": {"type": "string", "maxLength": limits::METHOD, "pattern": "^[A-Za-z0-9_-]+$"},
            "id": nullable(json!({"type": "string", "maxLength": limits::RESOURCE_ID, "description": "may hold placeholders `{{args.X}}`, `{{resources.A.B.F}}`, `{{previous_run_date}}`"})),
            "query": nullable(json!({"type": "object", "description": format!("at most {} bytes as compact JSON; string values may hold placeholders", limits::QUERY_BYTES)})),
            "loop_on": nullable(json!({"type": "string", "minLength": 1, "maxLength": limits::NAME, "description": "an array argument of args_schema"})),
            "depends_on": nullable(json!({"type": "string", "minLength": 1, "maxLength": limits::NAME, "description": "another resource of the job; no cycles"})),
            "persist": nullable(json!({"type": "boolean"})),
        }),
    );
    let resource_out = {
        let mut r = resource.clone();
        r["required"] = json!(["resource", "method", "persist"]);
        for f in ["id", "query", "loop_on", "depends_on"] {
            r["properties"][f] = r["properties"][f]["anyOf"][0].clone();
        }
        r["properties"]["persist"] = json!({"type": "boolean"});
        r
    };
    let args_schema = json!({
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"const": "object"}, "properties": {"type": "object"}},
        "description": format!("JSON Schema of a run's `args`, top-level `\"type\": \"object\"`, at most {} bytes as compact JSON (Truto's `\"required\": true` on a property is accepted)", limits::SCHEMA_BYTES),
    });
    let stats = json!({
        "type": "object",
        "additionalProperties": record(json!({
            "records": int(), "errors": int(), "records_delivered": int(),
            "records_dead_lettered": int(), "dropped": int(),
        })),
    });
    let attempt = record(json!({
        "attempt": {"type": "integer", "minimum": 1},
        "started_at": time(),
        "duration_ms": int(),
        "status": nullable(int()),
        "error": nullable(json!({"type": "string"})),
        "response_excerpt": nullable(json!({"type": "string"})),
    }));
    let delivery_props = json!({
        "id": {"type": "string"},
        "event_id": {"type": "string"},
        "event": {"type": "string"},
        "sync_job_run_id": nullable(json!({"type": "string"})),
        "kind": {"enum": ["webhook", "callback", "sync"]},
        "webhook_id": nullable(json!({"type": "string"})),
        "status": {"enum": ["pending", "queued", "paused", "delivered", "dead", "dropped"]},
        "attempts_made": int(),
        "next_attempt_at": nullable(time()),
        "last_status": nullable(int()),
        "last_error": nullable(json!({"type": "string"})),
        "created_at": time(),
        "finished_at": nullable(time()),
    });
    let mut delivery_detail = delivery_props.clone();
    delivery_detail["attempts"] = json!({"type": "array", "items": attempt});
    delivery_detail["body"] = json!({"description": "the signed delivery body (CONTRACT §2), or null"});

    let mut all = Map::new();
    let mut add = |v: Value| {
        if let Value::Object(o) = v {
            all.extend(o);
        }
    };
    add(json!({
        // -- errors
        "Error": {
            "description": "Every error: `type` tells which, `detail` says more (the field for `bad_request`).",
            "oneOf": [
                r("BadRequestError"), r("UnauthenticatedError"), r("NotFoundError"), r("ConflictError"),
                r("RequestEntityTooLargeError"), r("RequestTimeoutError"), r("TooManyRequestsError"),
                r("InternalError"), r("ServiceUnavailableError"), r("MethodNotAllowedError"),
            ],
            "discriminator": {"propertyName": "type", "mapping": {
                "bad_request": "#/components/schemas/BadRequestError",
                "unauthenticated": "#/components/schemas/UnauthenticatedError",
                "not_found": "#/components/schemas/NotFoundError",
                "conflict": "#/components/schemas/ConflictError",
                "request_entity_too_large": "#/components/schemas/RequestEntityTooLargeError",
                "request_timeout": "#/components/schemas/RequestTimeoutError",
                "too_many_requests": "#/components/schemas/TooManyRequestsError",
                "internal_error": "#/components/schemas/InternalError",
                "service_unavailable": "#/components/schemas/ServiceUnavailableError",
                "method_not_allowed": "#/components/schemas/MethodNotAllowedError",
            }},
        },
        "BadRequestError": error_schema("bad_request", record(json!({
            "field": nullable(json!({"type": "string"})),
            "reason": {"type": "string"},
        })), json!({})),
        "UnauthenticatedError": error_schema("unauthenticated", record(json!({"header": {"const": "authorization"}})), json!({})),
        "NotFoundError": error_schema("not_found", json!({"type": "null"}), json!({})),
        "ConflictError": error_schema("conflict", json!({"type": "null"}), json!({})),
        "MethodNotAllowedError": error_schema("method_not_allowed", record(json!({
            "method": {"type": "string"},
            "allowed": {"type": "array", "items": {"type": "string"}},
        })), json!({})),
        "RequestEntityTooLargeError": error_schema("request_entity_too_large", record(json!({
            "field": nullable(json!({"type": "string"})),
        })), json!({"max_bytes": {"type": "integer", "minimum": 0}})),
        "RequestTimeoutError": error_schema("request_timeout", record(json!({
            "field": {"const": "body"},
            "timeout_ms": {"type": "integer", "minimum": 0},
        })), json!({})),
        "TooManyRequestsError": error_schema("too_many_requests", json!({"type": "null"}),
            json!({"retry_after": {"type": "integer", "minimum": 1}})),
        "InternalError": error_schema("internal_error", json!({"type": "null"}), json!({"reference_id": uuid()})),
        "ServiceUnavailableError": error_schema("service_unavailable", json!({"type": "null"}), json!({})),
        "Valid": record(json!({"valid": {"const": true}})),

    }));
    add(json!({
        // -- webhooks
        "WebhookCreate": object(&["target_url"], json!({
            "target_url": url(),
            "event_types": {
                "type": "array", "maxItems": limits::EVENT_TYPES,
                "description": "empty = every event; `entity:*` and `*` are wildcards",
                "items": {"type": "string", "pattern": event_name_pattern(true)},
            },
            "is_active": {"type": "boolean", "default": true},
            "description": nullable(json!({"type": "string", "maxLength": limits::DESCRIPTION, "pattern": "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f]*$"})),
            "secret": nullable(json!({"type": "string", "maxLength": limits::SECRET, "pattern": SECRET_PATTERN, "description": "your own secret: `whsec_` + base64 of 24-64 bytes; generated when absent"})),
            "validate_only": {"type": "boolean", "default": false},
        })),
        "WebhookUpdate": object(&[], json!({
            "target_url": nullable(url()),
            "event_types": nullable(json!({
                "type": "array", "maxItems": limits::EVENT_TYPES,
                "items": {"type": "string", "pattern": event_name_pattern(true)},
            })),
            "is_active": nullable(json!({"type": "boolean"})),
            "description": nullable(json!({"type": "string", "maxLength": limits::DESCRIPTION, "pattern": "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f]*$"})),
            "overrides": nullable(overrides),
        })),
        "Webhook": record(webhook_props),
        "WebhookWithState": record(with_state.clone()),
        "WebhookEnabled": record({
            let mut p = with_state;
            p["replayed"] = json!({"type": "integer", "minimum": 0, "description": "dead letters re-queued (with `replay`)"});
            p
        }),
        "WebhookEnable": {
            "type": "object",
            "additionalProperties": false,
            "properties": {"replay": {"type": "boolean", "default": false, "description": "also re-queue what was dead-lettered because the webhook was disabled (reason `webhook_disabled`), in per-run order"}},
        },
        "WebhookWithSecret": record(with_secret),
        "WebhookList": list_of(r("Webhook")),
        "WebhookTest": record(json!({
            "event_id": {"type": "string"},
            "delivered": {"type": "boolean"},
            "attempt": record(json!({
                "status": nullable(int()),
                "duration_ms": {"type": "integer", "minimum": 0},
                "response_excerpt": nullable(json!({"type": "string"})),
                "error": nullable(json!({"type": "string"})),
            })),
        })),

    }));
    add(json!({
        // -- events
        "Event": {
            "type": "object",
            "description": "One event (CONTRACT §1). Keys other than these are ignored.",
            "required": ["id", "event", "payload"],
            "properties": {
                "id": event_id,
                "event": {"type": "string", "pattern": event_name_pattern(false)},
                "sync_job_run_id": nullable(uuid()),
                "webhook_id": nullable(uuid()),
                "callback_url": nullable(url()),
                "environment_id": nullable(text(limits::NAME)),
                "created_at": nullable(json!({"type": "string", "format": "date-time", "description": "RFC 3339, between 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z in UTC; defaults to the time the relay first saw the event"})),
                "payload": {"type": "object", "description": "passed on as given"},
            },
            "allOf": [
                {
                    "if": {"required": ["event"], "properties": {"event": {"type": "string", "pattern": "^sync_job_run:"}}},
                    "then": {"required": ["sync_job_run_id"], "properties": {"sync_job_run_id": uuid()}},
                },
                {"anyOf": [
                    {"required": ["webhook_id"], "properties": {"webhook_id": uuid()}},
                    {"required": ["sync_job_run_id"], "properties": {"sync_job_run_id": uuid()}},
                ]},
            ],
        },
        "EventBatch": {
            "type": "object",
            "required": ["events"],
            "properties": {
                "events": {
                    "type": "array", "minItems": 1, "maxItems": settings.events.max_batch,
                    "description": format!("each event at most {} bytes (`events.max_event_bytes`)", settings.events.max_event_bytes),
                    "items": r("Event"),
                },
                "validate_only": nullable(json!({"type": "boolean"})),
            },
        },
        "EventsIn": {
            "description": "One event, or `{\"events\":[…]}`; `validate_only: true` only validates.",
            "anyOf": [
                {"allOf": [r("Event"), {"properties": {"validate_only": nullable(json!({"type": "boolean"}))}}], "not": {"required": ["events"]}},
                r("EventBatch"),
            ],
        },
        "EventsAccepted": record(json!({
            "accepted": {"type": "integer", "minimum": 0},
            "events": {"type": "array", "items": routed_optional_reason.clone()},
        })),
        "EventsValid": record(json!({"valid": {"const": true}, "events": {"type": "integer", "minimum": 1}})),
        "Routed": routed_optional_reason,

    }));
    add(json!({
        // -- deliveries and dead letters
        "Delivery": record(delivery_props),
        "DeliveryDetail": record(delivery_detail),
        "DeliveryList": list_of(r("Delivery")),
        "DeadLetter": record(json!({
            "id": {"type": "string"},
            "delivery_id": nullable(json!({"type": "string"})),
            "event_id": {"type": "string"},
            "event": {"type": "string"},
            "webhook_id": nullable(json!({"type": "string"})),
            "kind": {"enum": ["webhook", "callback", "sync"]},
            "reason": {"type": "string"},
            "attempts": int(),
            "last_status": nullable(int()),
            "last_error": nullable(json!({"type": "string"})),
            "event_body": {"description": "the event as received (normalised), or null"},
            "created_at": time(),
            "replayed_at": nullable(time()),
        })),
        "DeadLetterList": list_of(r("DeadLetter")),
        "Replay": {
            "type": "object",
            "description": "Dead letters by `ids`, or every open one matching the filters (at least one of the four).",
            "properties": {
                "ids": nullable(json!({"type": "array", "maxItems": limits::REPLAY_IDS, "items": text(limits::ID)})),
                "webhook_id": nullable(text(limits::ID)),
                "reason": nullable(text(limits::ID)),
                "event_id": nullable(text(limits::ID)),
                "limit": nullable(json!({"type": "integer", "minimum": 1, "maximum": limits::REPLAY_IDS, "default": 1000})),
            },
            "additionalProperties": false,
            "anyOf": [
                {"required": ["ids"], "properties": {"ids": {"type": "array"}}},
                {"required": ["webhook_id"], "properties": {"webhook_id": {"type": "string"}}},
                {"required": ["reason"], "properties": {"reason": {"type": "string"}}},
                {"required": ["event_id"], "properties": {"event_id": {"type": "string"}}},
            ],
        },
        "Replayed": record(json!({
            "replayed": {"type": "integer", "minimum": 0},
            "requeued": {"type": "integer", "minimum": 0},
            "rerouted": {"type": "array", "items": r("Routed")},
        })),

    }));
    add(json!({
        // -- sync jobs
        "Resource": resource,
        "ResourceOut": resource_out,
        "SyncJobCreate": object(&["integration_name", "resources"], json!({
            "integration_name": {"type": "string", "minLength": 1, "maxLength": limits::NAME, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"},
            "args_schema": nullable(args_schema.clone()),
            "resources": {"type": "array", "minItems": 1, "maxItems": MAX_RESOURCES, "items": r("Resource")},
            "environment_id": nullable(text(limits::NAME)),
            "validate_only": {"type": "boolean", "default": false},
        })),
        "SyncJobUpdate": object(&[], json!({
            "integration_name": nullable(json!({"type": "string", "minLength": 1, "maxLength": limits::NAME})),
            "args_schema": nullable(args_schema),
            "resources": nullable(json!({"type": "array", "minItems": 1, "maxItems": MAX_RESOURCES, "items": r("Resource")})),
            "environment_id": nullable(text(limits::NAME)),
        })),
        "SyncJob": record(json!({
            "id": uuid(),
            "integration_name": {"type": "string"},
            "args_schema": nullable(json!({"type": "object"})),
            "resources": {"type": "array", "items": r("ResourceOut")},
            "environment_id": nullable(json!({"type": "string"})),
            "created_at": time(),
            "updated_at": time(),
        })),
        "SyncJobList": list_of(r("SyncJob")),

    }));
    add(json!({
        // -- runs
        "RunStatus": {"enum": ["created", "running", "rate_limited", "completed", "failed", "stopped"]},
        "ErrorHandling": {"enum": ["fail_fast", "ignore", "batch"]},
        "SyncJobRunCreate": {
            "type": "object",
            "required": ["sync_job_id", "integrated_account_id"],
            "description": "Exactly one of `webhook_id` (an active webhook) and `daemon_group_key`.",
            "properties": {
                "sync_job_id": uuid(),
                "integrated_account_id": uuid(),
                "webhook_id": nullable(uuid()),
                "daemon_group_key": nullable(text(limits::NAME)),
                "args": nullable(json!({"type": "object", "description": format!("validated against the job's args_schema; at most {} bytes as compact JSON", limits::SCHEMA_BYTES)})),
                "error_handling": nullable(r("ErrorHandling")),
                "ignore_previous_run": {"type": "boolean", "default": false},
                "callback_url": nullable(url()),
                "sync_unit_id": nullable(json!({"type": "string", "maxLength": limits::ID, "description": "a DevRev-style sync unit (not archived) this run syncs"})),
                "validate_only": {"type": "boolean", "default": false},
            },
            "additionalProperties": false,
        },
        "SyncJobRunUpdate": object(&["status"], json!({"status": {"const": "stopped"}})),
        "SyncJobRun": record(json!({
            "id": uuid(),
            "sync_job_id": uuid(),
            "integrated_account_id": uuid(),
            "status": r("RunStatus"),
            "args": {"type": "object"},
            "resources": {"type": "array", "items": r("ResourceOut")},
            "daemon_id": nullable(json!({"type": "string"})),
            "daemon_group_key": nullable(json!({"type": "string"})),
            "webhook_id": nullable(uuid()),
            "callback_url": nullable(json!({"type": "string"})),
            "error_handling": r("ErrorHandling"),
            "ignore_previous_run": {"type": "boolean"},
            "resource_stats": stats,
            "illegal_transitions": int(),
            "stop_reason": nullable(json!({"type": "string"})),
            "created_at": time(),
            "updated_at": time(),
            "started_at": nullable(time()),
            "finished_at": nullable(time()),
            "sync_unit_id": nullable(json!({"type": "string"})),
            "sync_job": {
                "description": "the job as the run started it; an Eloqua sync's run has `{\"type\":\"eloqua_sync\",\"syncedInstanceUri\"}`",
                "anyOf": [r("SyncJob"), record(json!({"type": {"const": "eloqua_sync"}, "syncedInstanceUri": {"type": "string"}}))],
            },
        })),
        "SyncJobRunList": list_of(r("SyncJobRun")),
        "RunCommand": record(json!({
            "key": {"type": "string"},
            "command": {"type": "object", "description": "`{\"type\":\"start\",\"run\",\"sync_job\",\"previous_run_date\"}` or `{\"type\":\"stop\",\"run_id\",\"reason\"}`"},
            "created_at": time(),
        })),
        "RunCommandList": list_of(r("RunCommand")),

    }));
    add(json!({
        // -- eloqua
        "EloquaSyncCreate": object(&["syncedInstanceUri"], json!({
            "syncedInstanceUri": {"type": "string", "minLength": 2, "maxLength": limits::URI, "pattern": "^/[^\\s\\u0000-\\u001f\\u007f-\\u009f]+$"},
            "callbackURL": nullable(url()),
            "webhookId": nullable(json!({"type": "string", "format": "uuid", "description": "relay extension: an active webhook that receives the sync's run events"})),
            "validate_only": {"type": "boolean", "default": false},
        })),
        "EloquaSync": {
            "type": "object",
            "required": ["syncedInstanceUri", "callbackUrl", "status", "createdAt", "createdBy", "uri"],
            "properties": {
                "syncedInstanceUri": {"type": "string"},
                "callbackUrl": nullable(json!({"type": "string"})),
                "status": {"enum": ["pending", "active", "success", "warning", "error"]},
                "createdAt": time(),
                "createdBy": {"type": "string"},
                "uri": {"type": "string", "pattern": "^/syncs/[0-9]+$"},
                "syncStartedAt": time(),
                "syncEndedAt": time(),
                "sync_job_run_id": uuid(),
            },
            "additionalProperties": false,
        },
        "EloquaSyncPage": eloqua_page(r("EloquaSync")),
        // -- Census-style syncs
        "CensusSyncCreate": census_sync_input(&["source_attributes", "destination_attributes", "operation"]),
        "CensusSyncUpdate": census_sync_input(&[]),
        "CensusSync": {
            "type": "object",
            "required": ["id", "status", "created_at", "updated_at", "label", "operation", "paused", "source_attributes",
                "destination_attributes", "mappings", "field_behavior", "field_normalization", "field_order", "alert_attributes",
                "failed_run_notifications_enabled", "failed_record_notifications_enabled", "failed_record_notifications_threshold_percent"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "status": {"enum": ["ready", "paused"]},
                "created_at": time(),
                "updated_at": time(),
                "label": nullable(json!({"type": "string"})),
                "operation": {"enum": ["append", "insert", "mirror", "update", "upsert"]},
                "paused": {"type": "boolean"},
                "source_attributes": record(json!({"object": record(json!({"type": {"const": "sync_job"}, "id": uuid()}))})),
                "destination_attributes": record(json!({"connection_id": uuid(), "object": {"type": "string"}})),
                "mappings": {"type": "array", "items": r("CensusMapping")},
                "field_behavior": {"enum": ["specific_properties", "sync_all_properties"]},
                "field_normalization": nullable(json!({"enum": ["start_case", "lower_case", "upper_case", "camel_case", "snake_case", "match_source_names"]})),
                "field_order": {"enum": ["alphabetical_column_name", "mapping_order"]},
                "alert_attributes": {"type": "array", "items": r("CensusAlert")},
                "failed_run_notifications_enabled": {"type": "boolean"},
                "failed_record_notifications_enabled": {"type": "boolean"},
                "failed_record_notifications_threshold_percent": nullable(json!({"type": "number", "minimum": 0, "maximum": 100})),
                "held_deliveries": {"type": "integer", "minimum": 0, "description": "deliveries held while paused"},
            },
            "additionalProperties": false,
        },
        "CensusMapping": object(&["from", "to"], json!({
            "from": {"oneOf": [
                object(&["type", "data"], json!({
                    "type": {"const": "column"},
                    "data": {"type": "string", "minLength": 1, "maxLength": crate::syncs::sync_limits::COLUMN, "description": "a column name or dot path into the record"},
                })),
                object(&["type", "data"], json!({
                    "type": {"const": "constant_value"},
                    "data": object(&["value"], json!({"value": {}, "basic_type": nullable(text(limits::NAME))})),
                })),
            ]},
            "to": {"type": "string", "minLength": 1, "maxLength": limits::NAME, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"},
            "is_primary_identifier": {"type": "boolean", "default": false},
        })),
        "CensusAlert": object(&["type"], json!({
            "type": {"enum": ["InvalidRecordPercent", "InvalidRecordPercentAlertConfiguration", "Failure", "FailureAlertConfiguration", "Status", "StatusAlertConfiguration"]},
            "send_for": nullable(json!({"enum": ["first_time", "every_time"]})),
            "should_send_recovery": nullable(json!({"type": "boolean", "default": true})),
            "options": nullable(json!({"type": "object", "description": "InvalidRecordPercent: {threshold: 0-100 (number or numeric string)}; Status: {status: started|completed}"})),
        })),
        "CensusSyncCreated": record(json!({"status": {"const": "created"}, "data": record(json!({"sync_id": {"type": "integer", "minimum": 1}}))})),
        "CensusSyncValidated": record(json!({"status": {"const": "success"}, "data": record(json!({"sync_id": nullable(json!({"type": "integer"})), "validate_only": {"const": true}}))})),
        "CensusSyncOne": record(json!({"status": {"const": "success"}, "data": r("CensusSync")})),
        "CensusSyncUpdated": record(json!({"status": {"const": "updated"}, "data": r("CensusSync")})),
        "CensusSyncDeleted": record(json!({"status": {"const": "deleted"}, "data": record(json!({"sync_id": {"type": "integer"}}))})),
        "CensusSyncPage": record(json!({
            "status": {"const": "success"},
            "pagination": record(json!({
                "total_records": {"type": "integer", "minimum": 0},
                "per_page": {"type": "integer", "minimum": 1, "maximum": 100},
                "page": {"type": "integer", "minimum": 1},
                "prev_page": nullable(json!({"type": "integer", "minimum": 1})),
                "next_page": nullable(json!({"type": "integer", "minimum": 2})),
                "last_page": {"type": "integer", "minimum": 1},
            })),
            "data": {"type": "array", "items": r("CensusSync")},
        })),
        "EloquaSyncLogPage": eloqua_page(record(json!({
            "syncUri": {"type": "string"},
            "count": {"type": "integer", "minimum": 0},
            "severity": {"enum": ["information", "warning", "error"]},
            "statusCode": {"type": "string", "pattern": "^ELQ-[0-9]{5}$"},
            "message": {"type": "string"},
            "createdAt": time(),
        }))),
    }));
    add(json!({
        // -- devrev
        "SyncUnitsCreate": {
            "type": "object",
            "required": ["sync_units"],
            "description": format!("All or nothing; the body is at most {} bytes.", super::devrev::MAX_BULK_BYTES),
            "properties": {
                "sync_units": {
                    "type": "array", "minItems": 1, "maxItems": super::devrev::MAX_BULK_UNITS,
                    "items": object(&["external_sync_unit", "keyring"], json!({
                        "external_sync_unit": non_blank(limits::NAME),
                        "keyring": non_blank(limits::NAME),
                    })),
                },
            },
        },
        "SyncUnitUpdate": object(&["id"], json!({
            "id": {"type": "string"},
            "is_archived": nullable(json!({"type": "boolean"})),
            "name": nullable(non_blank(limits::NAME)),
        })),
        "SyncUnit": record(json!({
            "id": {"type": "string", "pattern": "^don:integration:"},
            "display_id": {"type": "string", "pattern": "^SYNCUNIT-[0-9]+$"},
            "created_by": r("DevRevUser"),
            "modified_by": r("DevRevUser"),
            "created_date": time(),
            "modified_date": time(),
            "object_version": {"type": "integer", "minimum": 1},
            "external_sync_unit_id": {"type": "string"},
            "external_sync_unit_name": {"type": "string"},
            "external_system_name": {"type": "string"},
            "external_system_type": {"const": "keyring"},
            "is_archived": {"type": "boolean"},
            "name": {"type": "string"},
            "sync_run": nullable(record(json!({
                "id": uuid(),
                "started_at": nullable(time()),
                "ended_at": nullable(time()),
                "mode": {"enum": ["initial", "incremental"]},
                "progress": record(json!({"state": {"enum": ["starting", "in_progress", "rate_limited", "completed", "completed_with_errors", "failed", "cancelled"]}})),
            }))),
            "sync_type": {"const": "airdrop"},
        })),
        "DevRevUser": record(json!({
            "type": {"type": "string"},
            "id": {"type": "string"},
            "display_name": {"type": "string"},
            "display_id": {"type": "string"},
        })),
        "SyncUnitOne": record(json!({"sync_unit": r("SyncUnit")})),
        "SyncUnitList": record(json!({
            "sync_units": {"type": "array", "items": r("SyncUnit")},
            "next_cursor": nullable(json!({"type": "string"})),
        })),
        "SyncUnitsCreated": record(json!({"sync_units": {"type": "array", "items": r("SyncUnit")}})),

        // -- operations
        "Live": record(json!({"status": {"const": "ok"}})),
        "Ready": record(json!({"status": {"const": "ok"}, "store": {"const": "ok"}, "bus": {"enum": ["embedded", "kafka"]}})),
    }));
    Value::Object(all)
}

/// Every documented operation: (method, path, operation). Paths and methods are those of
/// `api::route_table()`.
fn operations() -> Vec<(&'static str, &'static str, Op)> {
    let webhook_id = || path_id("Webhook id (UUID).");
    let job_id = || path_id("Sync job id (UUID).");
    let run_id = || path_id("Sync job run id (UUID).");
    let id_filter = |name: &str, what: &str| query(name, what, text(limits::ID));
    let webhook_links = json!({
        "CreateRunForWebhook": {
            "operationId": "createSyncJobRun",
            "requestBody": {"webhook_id": "$response.body#/id"},
        },
        "EventToWebhook": {
            "operationId": "ingestEvents",
            "requestBody": {"webhook_id": "$response.body#/id"},
        },
        "GetWebhook": link("getWebhook", json!({"id": "$response.body#/id"})),
        "UpdateWebhook": link("updateWebhook", json!({"id": "$response.body#/id"})),
        "RotateWebhookSecret": link("rotateWebhookSecret", json!({"id": "$response.body#/id"})),
        "TestWebhook": link("testWebhook", json!({"id": "$response.body#/id"})),
        "DeleteWebhook": link("deleteWebhook", json!({"id": "$response.body#/id"})),
    });
    let job_links = json!({
        "CreateRunOfJob": {
            "operationId": "createSyncJobRun",
            "requestBody": {"sync_job_id": "$response.body#/id"},
        },
        "GetSyncJob": link("getSyncJob", json!({"id": "$response.body#/id"})),
        "UpdateSyncJob": link("updateSyncJob", json!({"id": "$response.body#/id"})),
        "DeleteSyncJob": link("deleteSyncJob", json!({"id": "$response.body#/id"})),
    });
    let run_links = json!({
        "EventOfRun": {
            "operationId": "ingestEvents",
            "requestBody": {"sync_job_run_id": "$response.body#/id", "webhook_id": "$response.body#/webhook_id"},
        },
        "GetSyncJobRun": link("getSyncJobRun", json!({"id": "$response.body#/id"})),
        "StopSyncJobRun": link("updateSyncJobRun", json!({"id": "$response.body#/id"})),
        "DeleteSyncJobRun": link("deleteSyncJobRun", json!({"id": "$response.body#/id"})),
    });
    vec![
        (
            "get",
            "/health/live",
            Op::new("live", "operations", "Liveness")
                .public()
                .respond("200", ok("Alive.", r("Live"))),
        ),
        (
            "get",
            "/health/ready",
            Op::new("ready", "operations", "Readiness: a round trip to the store and the bus")
                .public()
                .respond("200", ok("Ready.", r("Ready")))
                .errors(&["503"]),
        ),
        (
            "get",
            "/metrics",
            Op::new("metrics", "operations", "Prometheus metrics (text format)")
                .public()
                .respond(
                    "200",
                    json!({"description": "Prometheus text format 0.0.4.", "content": {"text/plain": {"schema": {"type": "string"}}}}),
                ),
        ),
        (
            "get",
            "/openapi.json",
            Op::new("openapi", "operations", "This document")
                .public()
                .respond("200", ok("The OpenAPI 3.1 document.", json!({"type": "object"}))),
        ),
        (
            "post",
            "/webhook",
            Op::new("createWebhook", "webhooks", "Register a webhook; the response carries its secret")
                .body(r("WebhookCreate"), json!({"target_url": "http://127.0.0.1:9000/hook", "event_types": ["sync_job_run:*"], "description": "executor runs"}))
                .respond("201", ok("Created; `secret` is shown only here and on rotate.", r("WebhookWithSecret")))
                .respond("200", ok("`validate_only`: valid.", r("Valid")))
                .links("201", webhook_links),
        ),
        (
            "get",
            "/webhook",
            Op::new("listWebhooks", "webhooks", "List webhooks")
                .params(paging())
                .respond("200", ok("A page of webhooks.", r("WebhookList")))
                .errors(&["400"]),
        ),
        (
            "get",
            "/webhook/{id}",
            Op::new("getWebhook", "webhooks", "Read a webhook (never its secret)")
                .params(vec![webhook_id()])
                .respond("200", ok("The webhook, with its delivery state.", r("WebhookWithState")))
                .errors(&["404"]),
        ),
        (
            "patch",
            "/webhook/{id}",
            Op::new("updateWebhook", "webhooks", "Update a webhook (the URL is checked again)")
                .params(vec![webhook_id()])
                .body(r("WebhookUpdate"), json!({"is_active": false}))
                .respond("200", ok("The updated webhook.", r("Webhook")))
                .errors(&["404"]),
        ),
        (
            "delete",
            "/webhook/{id}",
            Op::new("deleteWebhook", "webhooks", "Delete a webhook")
                .params(vec![webhook_id()])
                .respond("204", json!({"description": "Deleted."}))
                .errors(&["404"]),
        ),
        (
            "post",
            "/webhook/{id}/rotate-secret",
            Op::new("rotateWebhookSecret", "webhooks", "New secret; the old one keeps signing for the grace period")
                .params(vec![webhook_id()])
                .respond("200", ok("The webhook with its new secret.", r("WebhookWithSecret")))
                .errors(&["404"]),
        ),
        (
            "post",
            "/webhook/{id}/test",
            Op::new("testWebhook", "webhooks", "Send a signed `webhook:test` event now")
                .params(vec![webhook_id()])
                .respond("200", ok("The attempt (a failed attempt is still 200).", r("WebhookTest")))
                .errors(&["404", "409"]),
        ),
        (
            "post",
            "/webhook/{id}/enable",
            Op::new("enableWebhook", "webhooks", "Enable a webhook; its held events go again, and with `replay` what was dead-lettered while it was disabled")
                .params(vec![webhook_id()])
                .body(r("WebhookEnable"), json!({"replay": true}))
                .optional_body()
                .respond("200", ok("The enabled webhook and how many dead letters were re-queued.", r("WebhookEnabled")))
                .errors(&["404"]),
        ),
        (
            "post",
            "/events",
            Op::new("ingestEvents", "events", "Ingest one event or a batch; 202 once durably queued")
                .body(r("EventsIn"), json!({"id": "evt_1", "event": "sync_job_run:record", "sync_job_run_id": "3f1c8a8e-3c1a-4a53-9d7a-3a0f0c5f9b11", "webhook_id": "8d0f1a52-3c55-4bb4-9a43-2f6f7f0c1e10", "payload": {"resource": "ticketing/tickets", "id": "T-1"}}))
                .respond("202", ok("Accepted (each event's outcome).", r("EventsAccepted")))
                .respond("200", ok("`validate_only`: valid.", r("EventsValid")))
                .errors(&["503"]),
        ),
        (
            "get",
            "/deliveries",
            Op::new("listDeliveries", "deliveries", "The delivery log")
                .params(paging())
                .params(vec![
                    id_filter("event_id", "Only this event's deliveries."),
                    id_filter("webhook_id", "Only this webhook's deliveries."),
                    id_filter("sync_job_run_id", "Only this run's deliveries."),
                    query(
                        "status",
                        "Only deliveries in this state.",
                        json!({"enum": ["pending", "queued", "paused", "delivered", "dead", "dropped"]}),
                    ),
                ])
                .respond("200", ok("A page of deliveries.", r("DeliveryList")))
                .errors(&["400"]),
        ),
        (
            "get",
            "/deliveries/{id}",
            Op::new("getDelivery", "deliveries", "One delivery with every attempt")
                .params(vec![path_id("Delivery id.")])
                .respond("200", ok("The delivery.", r("DeliveryDetail")))
                .errors(&["404"]),
        ),
        (
            "get",
            "/dead-letters",
            Op::new("listDeadLetters", "deliveries", "Dead letters")
                .params(paging())
                .params(vec![
                    id_filter("webhook_id", "Only this webhook's."),
                    id_filter("reason", "Only with this reason."),
                    id_filter("event_id", "Only this event's."),
                    query(
                        "include_replayed",
                        "Also those already replayed.",
                        json!({"type": "boolean"}),
                    ),
                ])
                .respond("200", ok("A page of dead letters.", r("DeadLetterList")))
                .errors(&["400"]),
        ),
        (
            "post",
            "/dead-letters/replay",
            Op::new("replayDeadLetters", "deliveries", "Re-drive dead letters (same `webhook-id`)")
                .body(r("Replay"), json!({"reason": "unknown_webhook", "limit": 100}))
                .respond("202", ok("Replayed.", r("Replayed"))),
        ),
        (
            "get",
            "/sync-job-run-commands",
            Op::new("listRunCommands", "sync-jobs", "Run commands for executors to poll (embedded bus)")
                .params(paging())
                .respond("200", ok("A page of commands.", r("RunCommandList")))
                .errors(&["400"]),
        ),
        (
            "post",
            "/sync-job",
            Op::new("createSyncJob", "sync-jobs", "Create a sync job")
                .body(r("SyncJobCreate"), json!({
                    "integration_name": "jira",
                    "args_schema": {"type": "object", "properties": {"project": {"type": "string", "required": true}}},
                    "resources": [
                        {"resource": "ticketing/tickets", "method": "list", "query": {"project": "{{args.project}}", "updated_after": "{{previous_run_date}}"}},
                        {"resource": "ticketing/comments", "method": "list", "depends_on": "ticketing/tickets", "query": {"ticket_id": "{{resources.ticketing.tickets.id}}"}},
                    ],
                }))
                .respond("201", ok("Created.", r("SyncJob")))
                .respond("200", ok("`validate_only`: valid.", r("Valid")))
                .links("201", job_links),
        ),
        (
            "get",
            "/sync-job",
            Op::new("listSyncJobs", "sync-jobs", "List sync jobs")
                .params(paging())
                .params(vec![query(
                    "integration_name",
                    "Only this integration's jobs.",
                    text(limits::NAME),
                )])
                .respond("200", ok("A page of sync jobs.", r("SyncJobList")))
                .errors(&["400"]),
        ),
        (
            "get",
            "/sync-job/{id}",
            Op::new("getSyncJob", "sync-jobs", "Read a sync job")
                .params(vec![job_id()])
                .respond("200", ok("The sync job.", r("SyncJob")))
                .errors(&["404"]),
        ),
        (
            "patch",
            "/sync-job/{id}",
            Op::new("updateSyncJob", "sync-jobs", "Update a sync job (validated as a whole)")
                .params(vec![job_id()])
                .body(r("SyncJobUpdate"), json!({"integration_name": "jira-cloud"}))
                .respond("200", ok("The updated sync job.", r("SyncJob")))
                .errors(&["404"]),
        ),
        (
            "delete",
            "/sync-job/{id}",
            Op::new("deleteSyncJob", "sync-jobs", "Delete a sync job without active runs")
                .params(vec![job_id()])
                .respond("204", json!({"description": "Deleted."}))
                .errors(&["404", "409"]),
        ),
        (
            "post",
            "/sync-job-run",
            Op::new("createSyncJobRun", "sync-jobs", "Create a run: publishes a start command, delivers `sync_job_run:created`")
                .body(r("SyncJobRunCreate"), json!({"sync_job_id": "5b0c3a7e-8e1f-4f5e-9d3c-0a1b2c3d4e5f", "integrated_account_id": "0e7d1c9a-2b3c-4d5e-8f90-a1b2c3d4e5f6", "webhook_id": "8d0f1a52-3c55-4bb4-9a43-2f6f7f0c1e10", "args": {"project": "OPS"}, "error_handling": "fail_fast"}))
                .respond("201", ok("Created.", r("SyncJobRun")))
                .respond("200", ok("`validate_only`: valid.", r("Valid")))
                .errors(&["503"])
                .links("201", run_links),
        ),
        (
            "get",
            "/sync-job-run",
            Op::new("listSyncJobRuns", "sync-jobs", "List runs")
                .params(paging())
                .params(vec![
                    query("sync_job_id", "Only this job's runs.", uuid()),
                    query("status", "Only runs in this status.", r("RunStatus")),
                    query("integrated_account_id", "Only this account's runs.", uuid()),
                    query("webhook_id", "Only runs delivering to this webhook.", uuid()),
                ])
                .respond("200", ok("A page of runs.", r("SyncJobRunList")))
                .errors(&["400"]),
        ),
        (
            "get",
            "/sync-job-run/{id}",
            Op::new("getSyncJobRun", "sync-jobs", "Read a run")
                .params(vec![run_id()])
                .respond("200", ok("The run.", r("SyncJobRun")))
                .errors(&["404"]),
        ),
        (
            "patch",
            "/sync-job-run/{id}",
            Op::new("updateSyncJobRun", "sync-jobs", "Stop an active run (`{\"status\":\"stopped\"}`)")
                .params(vec![run_id()])
                .body(r("SyncJobRunUpdate"), json!({"status": "stopped"}))
                .respond("200", ok("The run.", r("SyncJobRun")))
                .errors(&["404", "409"]),
        ),
        (
            "delete",
            "/sync-job-run/{id}",
            Op::new("deleteSyncJobRun", "sync-jobs", "Delete a run (stopping it first when active)")
                .params(vec![run_id()])
                .respond("204", json!({"description": "Deleted."}))
                .errors(&["404"]),
        ),
        (
            "post",
            "/api/bulk/2.0/syncs",
            Op::new("createEloquaSync", "eloqua", "Create an Eloqua-style sync (and the run that carries it out)")
                .body(r("EloquaSyncCreate"), json!({"syncedInstanceUri": "/contacts/exports/1", "callbackURL": "http://127.0.0.1:9000/eloqua"}))
                .respond("201", {
                    let mut created = ok("Created.", r("EloquaSync"));
                    created["headers"] = json!({"Location": {
                        "description": "`/api/bulk/2.0/syncs/<n>`: where the sync is read",
                        "required": true,
                        "schema": {"type": "string", "pattern": "^/api/bulk/2\\.0/syncs/[0-9]+$"},
                    }});
                    created
                })
                .respond("200", ok("`validate_only`: valid.", r("Valid")))
                .links(
                    "201",
                    json!({
                        // `#regex:` is schemathesis's extractor (the number at the end of Location).
                        "GetEloquaSync": link("getEloquaSync", json!({"id": "$response.header.Location#regex:/syncs/([0-9]+)$"})),
                        "GetEloquaSyncLogs": link("getEloquaSyncLogs", json!({"id": "$response.header.Location#regex:/syncs/([0-9]+)$"})),
                    }),
                ),
        ),
        (
            "get",
            "/api/bulk/2.0/syncs",
            Op::new("listEloquaSyncs", "eloqua", "List Eloqua-style syncs (Eloqua's paging)")
                .params(eloqua_paging())
                .respond("200", ok("A page of syncs.", r("EloquaSyncPage")))
                .errors(&["400"]),
        ),
        (
            "get",
            "/api/bulk/2.0/syncs/{id}/logs",
            Op::new("getEloquaSyncLogs", "eloqua", "A sync's log items")
                .params(vec![path_id("The number in the sync's `uri` (`/syncs/<n>`).")])
                .params(eloqua_paging())
                .respond("200", ok("A page of log items.", r("EloquaSyncLogPage")))
                .errors(&["400", "404"]),
        ),
        (
            "post",
            "/airdrop.sync-units.create.bulk",
            Op::new("createSyncUnits", "devrev", "Create sync units, all or nothing")
                .body(r("SyncUnitsCreate"), json!({"sync_units": [{"external_sync_unit": "project-OPS", "keyring": "jira-cloud"}]}))
                .respond("201", ok("Created.", r("SyncUnitsCreated")))
                .links(
                    "201",
                    json!({
                        "GetSyncUnit": link("getSyncUnit", json!({"query.id": "$response.body#/sync_units/0/id"})),
                        "UpdateSyncUnit": {
                            "operationId": "updateSyncUnit",
                            "requestBody": {"id": "$response.body#/sync_units/0/id"},
                        },
                        "CreateRunOfUnit": {
                            "operationId": "createSyncJobRun",
                            "requestBody": {"sync_unit_id": "$response.body#/sync_units/0/id"},
                        },
                    }),
                ),
        ),
        (
            "get",
            "/airdrop.sync-units.get",
            Op::new("getSyncUnit", "devrev", "Read a sync unit with its latest run")
                .params(vec![json!({"name": "id", "in": "query", "required": true, "description": "The unit's id (`don:integration:…`).", "schema": {"type": "string"}})])
                .respond("200", ok("The unit.", r("SyncUnitOne")))
                .errors(&["400", "404"]),
        ),
        (
            "get",
            "/airdrop.sync-units.list",
            Op::new("listSyncUnits", "devrev", "List sync units")
                .params(paging())
                .respond("200", ok("A page of units.", r("SyncUnitList")))
                .errors(&["400"]),
        ),
        (
            "post",
            "/airdrop.sync-units.update",
            Op::new("updateSyncUnit", "devrev", "Archive or rename a sync unit")
                .body(r("SyncUnitUpdate"), json!({"id": "don:integration:dvrv-us-1:devo/syncrelay:sync_unit/0", "is_archived": true}))
                .respond("200", ok("The unit.", r("SyncUnitOne")))
                .errors(&["404"]),
        ),
        (
            "post",
            "/syncs",
            Op::new("createCensusSync", "census", "Create a Census-style sync (or only validate it)")
                .body(r("CensusSyncCreate"), json!({
                    "source_attributes": {"object": {"type": "sync_job", "id": "5b0c3a7e-8e1f-4f5e-9d3c-0a1b2c3d4e5f"}},
                    "destination_attributes": {"connection_id": "8d0f1a52-3c55-4bb4-9a43-2f6f7f0c1e10", "object": "contact"},
                    "operation": "upsert",
                    "mappings": [
                        {"from": {"type": "column", "data": "email"}, "to": "Email", "is_primary_identifier": true},
                        {"from": {"type": "constant_value", "data": {"value": "syncrelay"}}, "to": "Source"}
                    ],
                    "alert_attributes": [{"type": "InvalidRecordPercent", "send_for": "first_time", "options": {"threshold": 50}}]
                }))
                .respond("201", {
                    let mut created = ok("Created.", r("CensusSyncCreated"));
                    created["headers"] = json!({"Location": {
                        "description": "`/syncs/<sync_id>`: where the sync is read",
                        "required": true,
                        "schema": {"type": "string", "pattern": "^/syncs/[0-9]+$"},
                    }});
                    created
                })
                .respond("200", ok("`validate_only`: valid; nothing was created.", r("CensusSyncValidated")))
                .links(
                    "201",
                    json!({
                        "GetCensusSync": link("getCensusSync", json!({"id": "$response.body#/data/sync_id"})),
                        "UpdateCensusSync": link("updateCensusSync", json!({"id": "$response.body#/data/sync_id"})),
                    }),
                ),
        ),
        (
            "get",
            "/syncs",
            Op::new("listCensusSyncs", "census", "List Census-style syncs (Census's paging)")
                .params(census_paging())
                .respond("200", ok("A page of syncs.", r("CensusSyncPage")))
                .errors(&["400"]),
        ),
        (
            "get",
            "/syncs/{id}",
            Op::new("getCensusSync", "census", "Read a Census-style sync")
                .params(vec![path_id("The sync's id (`sync_id`).")])
                .respond("200", ok("The sync.", r("CensusSyncOne")))
                .errors(&["404"]),
        ),
        (
            "patch",
            "/syncs/{id}",
            Op::new("updateCensusSync", "census", "Update a Census-style sync (top-level fields replace; `paused` holds or releases its deliveries)")
                .params(vec![path_id("The sync's id (`sync_id`).")])
                .body(r("CensusSyncUpdate"), json!({"paused": true}))
                .respond("200", ok("The sync as updated (or, with `validate_only`, valid).", json!({"anyOf": [r("CensusSyncUpdated"), r("CensusSyncValidated")]})))
                .errors(&["400", "404"]),
        ),
        (
            "delete",
            "/syncs/{id}",
            Op::new("deleteCensusSync", "census", "Delete a Census-style sync (deliveries it held are released)")
                .params(vec![path_id("The sync's id (`sync_id`).")])
                .respond("200", ok("Deleted.", r("CensusSyncDeleted")))
                .errors(&["404"]),
        ),
        (
            "get",
            "/api/bulk/2.0/syncs/{id}",
            Op::new("getEloquaSync", "eloqua", "Read an Eloqua-style sync")
                .params(vec![path_id("The number in the sync's `uri` (`/syncs/<n>`).")])
                .respond("200", ok("The sync.", r("EloquaSync")))
                .errors(&["404"]),
        ),
    ]
}

/// The body of `POST /syncs` (`required` as given) and `PATCH /syncs/{id}` (nothing required).
fn census_sync_input(required: &[&str]) -> Value {
    object(
        required,
        json!({
            "source_attributes": object(&["object"], json!({"object": object(&["type", "id"], json!({"type": {"const": "sync_job"}, "id": uuid()}))})),
            "destination_attributes": object(&["connection_id", "object"], json!({
                "connection_id": {"type": "string", "format": "uuid", "description": "the destination webhook's id"},
                "object": non_blank(limits::NAME),
            })),
            "operation": {"enum": ["append", "insert", "mirror", "update", "upsert"], "description": "update, upsert and mirror need exactly one mapping with is_primary_identifier"},
            "mappings": {"type": "array", "maxItems": crate::syncs::sync_limits::MAPPINGS, "items": r("CensusMapping")},
            "label": nullable(text(limits::NAME)),
            "paused": nullable(json!({"type": "boolean", "default": false})),
            "validate_only": {"type": "boolean", "default": false},
            "field_behavior": nullable(json!({"enum": ["specific_properties", "sync_all_properties"]})),
            "field_normalization": nullable(json!({"enum": ["start_case", "lower_case", "upper_case", "camel_case", "snake_case", "match_source_names"]})),
            "field_order": nullable(json!({"enum": ["alphabetical_column_name", "mapping_order"]})),
            "alert_attributes": nullable(json!({"type": "array", "maxItems": crate::syncs::sync_limits::ALERTS, "items": r("CensusAlert")})),
            "failed_run_notifications_enabled": nullable(json!({"type": "boolean", "deprecated": true})),
            "failed_record_notifications_enabled": nullable(json!({"type": "boolean", "deprecated": true})),
            "failed_record_notifications_threshold_percent": nullable(json!({"anyOf": [{"type": "number", "minimum": 0, "maximum": 100}, {"type": "string"}], "deprecated": true})),
        }),
    )
}

fn census_paging() -> Vec<Value> {
    vec![
        query(
            "page",
            "Page number (default 1).",
            json!({"type": "integer", "minimum": 1, "maximum": 1_000_000}),
        ),
        query(
            "per_page",
            "Page size (default 25).",
            json!({"type": "integer", "minimum": 1, "maximum": 100}),
        ),
    ]
}

/// `(METHOD, path)` of every documented operation.
pub fn documented_operations(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            if let Some(item) = item.as_object() {
                for method in item.keys() {
                    out.push((method.to_ascii_uppercase(), path.clone()));
                }
            }
        }
    }
    out.sort();
    out
}
