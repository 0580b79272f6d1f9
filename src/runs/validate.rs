//! Validation of sync jobs (args_schema, resources, placeholders, the dependency graph) and of
//! run arguments against a job's args_schema. Every error names the field path.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::model::ResourceSpec;
use crate::domain::{check_json_size, check_text, limits};
use crate::error::ApiError;

/// Truto's schemas mark properties with `"required": true` (draft-3 style); JSON Schema since
/// draft 4 wants a `required` array on the parent. Move the booleans into arrays, recursively, so
/// both spellings compile.
pub fn normalize_schema(schema: &Value) -> Value {
    let mut s = schema.clone();
    normalize_in_place(&mut s);
    s
}

fn normalize_in_place(v: &mut Value) {
    match v {
        Value::Object(o) => {
            let mut lifted = Vec::new();
            if let Some(Value::Object(props)) = o.get_mut("properties") {
                for (name, p) in props.iter_mut() {
                    if let Value::Object(po) = p {
                        if let Some(Value::Bool(req)) = po.get("required").cloned() {
                            po.remove("required");
                            if req {
                                lifted.push(Value::String(name.clone()));
                            }
                        }
                    }
                }
            }
            for (_, child) in o.iter_mut() {
                normalize_in_place(child);
            }
            if !lifted.is_empty() {
                match o.get_mut("required") {
                    Some(Value::Array(a)) => {
                        for l in lifted {
                            if !a.contains(&l) {
                                a.push(l);
                            }
                        }
                    }
                    _ => {
                        o.insert("required".into(), Value::Array(lifted));
                    }
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize_in_place),
        _ => {}
    }
}

/// `/a/0/b~1c` (a JSON pointer) as a field path under `prefix`: `prefix.a[0].b/c`. Segments are
/// indexes where the value walked alongside is an array.
fn pointer_to_path(prefix: &str, pointer: &str, mut at: Option<&Value>) -> String {
    let mut out = prefix.to_string();
    if pointer.is_empty() {
        return out;
    }
    for raw in pointer.trim_start_matches('/').split('/') {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        match at {
            Some(Value::Array(a)) if seg.parse::<usize>().is_ok() => {
                let i: usize = seg.parse().unwrap_or(0);
                out.push_str(&format!("[{i}]"));
                at = a.get(i);
            }
            _ => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&seg);
                at = at.and_then(|v| v.get(&seg));
            }
        }
    }
    out
}

/// Compile a job's args_schema: an object with top-level `type: "object"`, valid JSON Schema.
pub fn compile_args_schema(schema: &Value) -> Result<jsonschema::Validator, ApiError> {
    let Value::Object(o) = schema else {
        return Err(ApiError::field("args_schema", "must be a JSON Schema object"));
    };
    match o.get("type") {
        Some(Value::String(t)) if t == "object" => {}
        _ => {
            return Err(ApiError::field(
                "args_schema.type",
                "must be \"object\": a run's args are an object",
            ))
        }
    }
    if let Some(p) = o.get("properties") {
        if !p.is_object() {
            return Err(ApiError::field(
                "args_schema.properties",
                "must be an object of property schemas",
            ));
        }
    }
    let normalized = normalize_schema(schema);
    jsonschema::options().build(&normalized).map_err(|e| {
        let field = pointer_to_path("args_schema", e.instance_path().as_str(), Some(schema));
        ApiError::field(field, format!("is not valid JSON Schema: {e}"))
    })
}

/// Validate run args against a compiled schema; the error names the JSON path (`args.x[0]`).
pub fn validate_args(validator: &jsonschema::Validator, args: &Value) -> Result<(), ApiError> {
    let Some(e) = validator.iter_errors(args).next() else {
        return Ok(());
    };
    let mut field = pointer_to_path("args", e.instance_path().as_str(), Some(args));
    match e.kind() {
        jsonschema::error::ValidationErrorKind::Required { property } => {
            if let Some(p) = property.as_str() {
                field = format!("{field}.{p}");
            }
        }
        jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
            if let Some(p) = unexpected.first() {
                field = format!("{field}.{p}");
            }
        }
        _ => {}
    }
    Err(ApiError::field(field, e.to_string()))
}

/// The property schemas of an args_schema (after normalisation).
fn arg_properties(schema: Option<&Value>) -> Map<String, Value> {
    schema
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn is_array_schema(p: &Value) -> bool {
    match p.get("type") {
        Some(Value::String(t)) => t == "array",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "array"),
        _ => false,
    }
}

/// A placeholder found in a string: `{{ ... }}`, trimmed.
fn placeholders(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            return Err("has an unterminated placeholder: `{{` without `}}`".into());
        };
        out.push(after[..j].trim().to_string());
        rest = &after[j + 2..];
    }
    Ok(out)
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn valid_name_part(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

struct Ctx<'a> {
    props: &'a Map<String, Value>,
    /// Resource name -> indexes of the job's resources with that name.
    names: &'a HashMap<&'a str, Vec<usize>>,
    /// The dependency graph by resource name, with what each name depends on transitively.
    graph: &'a DepGraph<'a>,
    /// Resource index -> its name.
    resource_names: &'a [&'a str],
}

impl Ctx<'_> {
    fn check_placeholder(&self, i: usize, field: &str, p: &str) -> Result<(), ApiError> {
        let err = |m: String| ApiError::field(field.to_string(), m);
        if p == "previous_run_date" {
            return Ok(());
        }
        let segs: Vec<&str> = p.split('.').collect();
        match segs[0] {
            "args" => {
                let Some(name) = segs.get(1).filter(|n| !n.is_empty()) else {
                    return Err(err(format!("placeholder {{{{{p}}}}} must name an argument: {{{{args.NAME}}}}")));
                };
                if !self.props.contains_key(*name) {
                    return Err(err(format!(
                        "placeholder {{{{{p}}}}} names argument `{name}`, which is not a property of args_schema"
                    )));
                }
                Ok(())
            }
            "resources" => {
                let (target, field_len) = if segs.len() >= 4 && self.names.contains_key(format!("{}/{}", segs[1], segs[2]).as_str()) {
                    (format!("{}/{}", segs[1], segs[2]), segs.len() - 3)
                } else if segs.len() >= 3 && self.names.contains_key(segs[1]) && !segs[1].contains('/') {
                    (segs[1].to_string(), segs.len() - 2)
                } else {
                    return Err(err(format!(
                        "placeholder {{{{{p}}}}} names no resource of this job: use {{{{resources.UNIFIED_API.RESOURCE.FIELD}}}}"
                    )));
                };
                if field_len == 0 || segs.iter().any(|s| s.is_empty()) {
                    return Err(err(format!("placeholder {{{{{p}}}}} must name a field of the resource")));
                }
                if !self.graph.depends_on(self.resource_names[i], &target) {
                    return Err(err(format!(
                        "placeholder {{{{{p}}}}} uses resource {target}, which this resource does not depend on (set depends_on)"
                    )));
                }
                Ok(())
            }
            _ => Err(err(format!(
                "unknown placeholder {{{{{p}}}}}: expected {{{{args.NAME}}}}, {{{{resources.UNIFIED_API.RESOURCE.FIELD}}}} or {{{{previous_run_date}}}}"
            ))),
        }
    }

    fn walk(&self, i: usize, field: &str, v: &Value) -> Result<(), ApiError> {
        match v {
            Value::String(s) => {
                for p in placeholders(s).map_err(|m| ApiError::field(field.to_string(), m))? {
                    self.check_placeholder(i, field, &p)?;
                }
                Ok(())
            }
            Value::Array(a) => {
                for (k, x) in a.iter().enumerate() {
                    self.walk(i, &format!("{field}[{k}]"), x)?;
                }
                Ok(())
            }
            Value::Object(o) => {
                for (k, x) in o {
                    let f = format!("{field}.{k}");
                    if !placeholders(k).map_err(|m| ApiError::field(f.clone(), m))?.is_empty() {
                        return Err(ApiError::field(f, "placeholders are allowed in values, not in keys"));
                    }
                    self.walk(i, &f, x)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// `user_ids`, `args.user_ids` or `{{args.user_ids}}`: the argument a resource loops on.
pub fn loop_on_arg(s: &str) -> &str {
    let s = s.trim();
    let s = s
        .strip_prefix("{{")
        .and_then(|x| x.strip_suffix("}}"))
        .map(str::trim)
        .unwrap_or(s);
    s.strip_prefix("args.").unwrap_or(s)
}

/// Most resources one sync job may hold (CONTRACT §3, field limits).
pub const MAX_RESOURCES: usize = 500;

/// The `depends_on` graph of a job by resource name (several resources may share a name, one
/// per method), checked for cycles by one depth-first search with colours, with the names each
/// name depends on transitively as a bitset per name (filled in post-order, so in one pass).
struct DepGraph<'a> {
    ids: HashMap<&'a str, usize>,
    /// Bitsets over name ids: `ancestors[n]` holds every name `n` depends on, transitively.
    ancestors: Vec<Vec<u64>>,
}

impl<'a> DepGraph<'a> {
    /// `Err((i, cycle))` names the resource whose `depends_on` closes a cycle and the cycle's
    /// names, starting and ending with that resource's name.
    fn build(resources: &'a [ResourceSpec]) -> Result<DepGraph<'a>, (usize, Vec<&'a str>)> {
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut names: Vec<&str> = Vec::new();
        for r in resources {
            ids.entry(r.resource.as_str()).or_insert_with(|| {
                names.push(r.resource.as_str());
                names.len() - 1
            });
        }
        let n = names.len();
        // Edges by name id; an edge remembers the first resource that declared it.
        let mut edges: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n];
        for (i, r) in resources.iter().enumerate() {
            if let Some(d) = r.depends_on.as_deref().and_then(|d| ids.get(d)) {
                edges[ids[r.resource.as_str()]].push((*d, i));
            }
        }
        const WHITE: u8 = 0;
        const GREY: u8 = 1;
        const BLACK: u8 = 2;
        let words = n.div_ceil(64);
        let mut colour = vec![WHITE; n];
        let mut ancestors = vec![Vec::new(); n];
        for start in 0..n {
            if colour[start] != WHITE {
                continue;
            }
            // (node, next edge to follow)
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            colour[start] = GREY;
            while let Some(top) = stack.last_mut() {
                let (node, k) = *top;
                if let Some(&(d, _)) = edges[node].get(k) {
                    top.1 += 1;
                    match colour[d] {
                        WHITE => {
                            colour[d] = GREY;
                            stack.push((d, 0));
                        }
                        GREY => return Err(Self::cycle(resources, &names, &edges, &stack, d)),
                        _ => {}
                    }
                } else {
                    // Every name this one depends on is finished: union their sets.
                    let mut set = vec![0u64; words];
                    for &(d, _) in &edges[node] {
                        set[d / 64] |= 1 << (d % 64);
                        for (w, x) in set.iter_mut().zip(&ancestors[d]) {
                            *w |= *x;
                        }
                    }
                    ancestors[node] = set;
                    colour[node] = BLACK;
                    stack.pop();
                }
            }
        }
        Ok(DepGraph { ids, ancestors })
    }

    /// The cycle closed by an edge from the top of `stack` back to `to` (on the stack), told
    /// from the resource with the lowest index among those declaring its edges.
    fn cycle(
        resources: &'a [ResourceSpec],
        names: &[&'a str],
        edges: &[Vec<(usize, usize)>],
        stack: &[(usize, usize)],
        to: usize,
    ) -> (usize, Vec<&'a str>) {
        let from = stack.iter().position(|(n, _)| *n == to).unwrap_or(0);
        let mut ring: Vec<usize> = stack[from..].iter().map(|(n, _)| *n).collect();
        // The resource declaring each edge ring[j] -> ring[j+1] (lowest index).
        let declared = |a: usize, b: usize| {
            edges[a]
                .iter()
                .filter(|(d, _)| *d == b)
                .map(|(_, i)| *i)
                .min()
                .unwrap_or(usize::MAX)
        };
        let k = ring.len();
        let (j, i) = (0..k)
            .map(|j| (j, declared(ring[j], ring[(j + 1) % k])))
            .min_by_key(|(_, i)| *i)
            .unwrap_or((0, 0));
        ring.rotate_left(j);
        let mut path: Vec<&str> = ring.iter().map(|n| names[*n]).collect();
        path.push(names[ring[0]]);
        let i = if i == usize::MAX { 0 } else { i };
        debug_assert_eq!(resources[i].resource, path[0]);
        (i, path)
    }

    /// Does resource name `from` depend on `target`, directly or transitively?
    fn depends_on(&self, from: &str, target: &str) -> bool {
        match (self.ids.get(from), self.ids.get(target)) {
            (Some(&f), Some(&t)) => self.ancestors[f].get(t / 64).is_some_and(|w| w & (1 << (t % 64)) != 0),
            _ => false,
        }
    }
}

/// Validate a whole job (create, or the result of a PATCH) and fill in `persist` defaults.
pub fn validate_job(
    integration_name: &str,
    args_schema: Option<&Value>,
    resources: &mut [ResourceSpec],
) -> Result<(), ApiError> {
    if integration_name.trim().is_empty() {
        return Err(ApiError::field("integration_name", "must not be empty"));
    }
    check_text("integration_name", integration_name, limits::NAME, false)?;
    if resources.len() > MAX_RESOURCES {
        return Err(ApiError::field(
            "resources",
            format!(
                "holds {} resources; at most {MAX_RESOURCES} are allowed",
                resources.len()
            ),
        ));
    }
    if let Some(s) = args_schema {
        check_json_size("args_schema", s, limits::SCHEMA_BYTES)?;
        compile_args_schema(s)?;
    }
    if resources.is_empty() {
        return Err(ApiError::field("resources", "must hold at least one resource"));
    }
    let normalized = args_schema.map(normalize_schema);
    let props = arg_properties(normalized.as_ref());

    // Names, methods, duplicates.
    let mut names: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for (i, r) in resources.iter().enumerate() {
        let f = |x: &str| format!("resources[{i}].{x}");
        check_text(&f("resource"), &r.resource, limits::NAME, false)?;
        check_text(&f("method"), &r.method, limits::METHOD, false)?;
        if let Some(id) = &r.id {
            check_text(&f("id"), id, limits::RESOURCE_ID, false)?;
        }
        if let Some(q) = &r.query {
            check_json_size(&f("query"), &Value::Object(q.clone()), limits::QUERY_BYTES)?;
        }
        if let Some(l) = &r.loop_on {
            check_text(&f("loop_on"), l, limits::NAME, false)?;
        }
        if let Some(d) = &r.depends_on {
            check_text(&f("depends_on"), d, limits::NAME, false)?;
        }
        let parts: Vec<&str> = r.resource.split('/').collect();
        if !(parts.len() <= 2 && parts.iter().all(|p| valid_name_part(p))) {
            return Err(ApiError::field(
                f("resource"),
                "must be `unified_api/resource` (e.g. ticketing/tickets) or a proxy resource name",
            ));
        }
        if !valid_name_part(&r.method) {
            return Err(ApiError::field(
                f("method"),
                "must be a method name such as list or get",
            ));
        }
        if let Some(j) = seen.insert((r.resource.clone(), r.method.clone()), i) {
            return Err(ApiError::field(
                f("method"),
                format!("resources[{j}] already syncs {} with method {}", r.resource, r.method),
            ));
        }
        names.entry(r.resource.as_str()).or_default().push(i);
    }

    // depends_on: another resource of the job.
    for (i, r) in resources.iter().enumerate() {
        if let Some(d) = &r.depends_on {
            let field = format!("resources[{i}].depends_on");
            if d == &r.resource {
                return Err(ApiError::field(field, "must name another resource, not this one"));
            }
            if !names.contains_key(d.as_str()) {
                return Err(ApiError::field(
                    field,
                    format!("names {d}, which is not a resource of this job"),
                ));
            }
        }
    }
    // The graph (by resource name) must have no cycle; what each name depends on, transitively,
    // is computed once (linear in the number of resources and edges, plus a bitset per name).
    let graph = DepGraph::build(resources).map_err(|(i, cycle)| {
        ApiError::field(
            format!("resources[{i}].depends_on"),
            format!("forms a cycle: {}", cycle.join(" -> ")),
        )
    })?;
    let resource_names: Vec<&str> = resources.iter().map(|r| r.resource.as_str()).collect();

    let ctx = Ctx {
        props: &props,
        names: &names,
        graph: &graph,
        resource_names: &resource_names,
    };
    for (i, r) in resources.iter().enumerate() {
        if let Some(l) = &r.loop_on {
            let field = format!("resources[{i}].loop_on");
            let name = loop_on_arg(l);
            if !valid_segment(name) {
                return Err(ApiError::field(field, "must name an array argument, e.g. user_ids"));
            }
            match props.get(name) {
                None => {
                    return Err(ApiError::field(
                        field,
                        format!("names argument `{name}`, which is not a property of args_schema"),
                    ))
                }
                Some(p) if !is_array_schema(p) => {
                    return Err(ApiError::field(
                        field,
                        format!("names argument `{name}`, which is not an array (args_schema type must be \"array\")"),
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(id) = &r.id {
            ctx.walk(i, &format!("resources[{i}].id"), &Value::String(id.clone()))?;
        }
        if let Some(q) = &r.query {
            ctx.walk(i, &format!("resources[{i}].query"), &Value::Object(q.clone()))?;
        }
    }

    for r in resources.iter_mut() {
        if r.is_unified() {
            r.persist = Some(true);
        } else if r.persist.is_none() {
            r.persist = Some(false);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(e: ApiError) -> String {
        match e {
            ApiError::BadRequest { field, .. } => field.unwrap_or_default(),
            other => panic!("{other:?}"),
        }
    }

    fn res(v: Value) -> Vec<ResourceSpec> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn seed_job_is_valid_and_persist_defaults_apply() {
        let schema = json!({"type":"object","properties":{
            "project_slug":{"type":"string","required":true},
            "user_ids":{"type":"array","items":{"type":"string"}}}});
        let mut r = res(json!([
            {"resource":"ticketing/tickets","method":"list","query":{"project":"{{args.project_slug}}","updated_after":"{{previous_run_date}}"}},
            {"resource":"ticketing/comments","method":"list","depends_on":"ticketing/tickets","query":{"ticket_id":"{{resources.ticketing.tickets.id}}"}},
            {"resource":"users","method":"get","loop_on":"user_ids","id":"{{ args.user_ids }}"}
        ]));
        validate_job("jira", Some(&schema), &mut r).unwrap();
        assert_eq!(r[0].persist, Some(true));
        assert_eq!(r[2].persist, Some(false));
        let v = compile_args_schema(&schema).unwrap();
        assert_eq!(field(validate_args(&v, &json!({})).unwrap_err()), "args.project_slug");
        assert_eq!(
            field(validate_args(&v, &json!({"project_slug": 3})).unwrap_err()),
            "args.project_slug"
        );
        assert_eq!(
            field(validate_args(&v, &json!({"project_slug": "a", "user_ids": ["x", 2]})).unwrap_err()),
            "args.user_ids[1]"
        );
        validate_args(&v, &json!({"project_slug": "a"})).unwrap();
    }

    #[test]
    fn job_errors_name_the_field() {
        let schema = json!({"type":"object","properties":{"a":{"type":"string"},"ids":{"type":"array"}}});
        let cases = [
            (
                json!([{"resource":"x","method":"list","depends_on":"x"}]),
                "resources[0].depends_on",
            ),
            (
                json!([{"resource":"x","method":"list","depends_on":"y"}]),
                "resources[0].depends_on",
            ),
            (
                json!([{"resource":"x","method":"list","depends_on":"y"},{"resource":"y","method":"list","depends_on":"z"},{"resource":"z","method":"list","depends_on":"x"}]),
                "resources[0].depends_on",
            ),
            (
                json!([{"resource":"x","method":"list"},{"resource":"x","method":"list"}]),
                "resources[1].method",
            ),
            (
                json!([{"resource":"x","method":"list","loop_on":"a"}]),
                "resources[0].loop_on",
            ),
            (
                json!([{"resource":"x","method":"list","loop_on":"nope"}]),
                "resources[0].loop_on",
            ),
            (
                json!([{"resource":"x","method":"list","id":"{{args.zz}}"}]),
                "resources[0].id",
            ),
            (
                json!([{"resource":"x","method":"list","query":{"q":{"r":["{{args.zz}}"]}}}]),
                "resources[0].query.q.r[0]",
            ),
            (
                json!([{"resource":"x","method":"list","id":"{{nope}}"}]),
                "resources[0].id",
            ),
            (
                json!([{"resource":"x","method":"list","id":"{{args.a"}]),
                "resources[0].id",
            ),
            (
                json!([{"resource":"a/b","method":"list"},{"resource":"c/d","method":"list","id":"{{resources.a.b.id}}"}]),
                "resources[1].id",
            ),
            (json!([{"resource":"a/b/c","method":"list"}]), "resources[0].resource"),
            (json!([{"resource":"x","method":""}]), "resources[0].method"),
        ];
        for (r, f) in cases {
            let mut r2 = res(r.clone());
            assert_eq!(field(validate_job("i", Some(&schema), &mut r2).unwrap_err()), f, "{r}");
        }
        let mut ok = res(json!([{"resource":"x","method":"list"}]));
        for (s, f) in [
            (json!([]), "args_schema"),
            (json!({"type":"array"}), "args_schema.type"),
            (
                json!({"type":"object","properties":{"a":{"type":"nonsense"}}}),
                "args_schema.properties.a.type",
            ),
            (json!({"type":"object","properties":3}), "args_schema.properties"),
        ] {
            assert_eq!(field(validate_job("i", Some(&s), &mut ok).unwrap_err()), f, "{s}");
        }
        assert_eq!(field(validate_job("", None, &mut ok).unwrap_err()), "integration_name");
        assert_eq!(field(validate_job("i", None, &mut []).unwrap_err()), "resources");
    }

    /// `r0 <- r1 <- ... <- r{n-1}`: each depends on the one before; the last one's query uses
    /// the first one's fields (a transitive dependency at the far end of the chain).
    fn chain(n: usize) -> Vec<ResourceSpec> {
        (0..n)
            .map(|i| ResourceSpec {
                resource: format!("api/r{i}"),
                method: "list".into(),
                id: None,
                query: (i == n - 1).then(|| serde_json::from_value(json!({"q": "{{resources.api.r0.id}}"})).unwrap()),
                loop_on: None,
                depends_on: (i > 0).then(|| format!("api/r{}", i - 1)),
                persist: None,
            })
            .collect()
    }

    #[test]
    fn long_chains_validate_and_the_resource_count_is_capped() {
        let mut ok = chain(MAX_RESOURCES);
        validate_job("i", None, &mut ok).unwrap();
        let mut too_many = chain(5_000);
        let e = validate_job("i", None, &mut too_many).unwrap_err();
        assert_eq!(field(e), "resources");
        // A cycle through the whole chain is still found, named at its lowest resource.
        let mut ring = chain(MAX_RESOURCES);
        ring[0].depends_on = Some(format!("api/r{}", MAX_RESOURCES - 1));
        match validate_job("i", None, &mut ring).unwrap_err() {
            ApiError::BadRequest { field, message } => {
                assert_eq!(field.as_deref(), Some("resources[0].depends_on"));
                assert!(
                    message.starts_with("forms a cycle: api/r0 -> api/r499 -> api/r498"),
                    "{message}"
                );
                assert!(message.ends_with("api/r1 -> api/r0"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // A placeholder naming a resource the chain does not reach is refused.
        let mut two = chain(3);
        two[1].depends_on = None;
        assert_eq!(
            field(validate_job("i", None, &mut two).unwrap_err()),
            "resources[2].query.q"
        );
    }
}
