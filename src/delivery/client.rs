//! The only place that knows reqwest. Redirects are never followed, environment proxies are
//! ignored, every attempt has connect and total timeouts, response bodies are read only up to a
//! cap, and the address dialled is checked: a custom resolver drops non-global addresses (unless
//! allowed) so the connection can only go to an address that passed the check, and IP-literal
//! URLs (which skip the resolver) are checked before the request is sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use url::Url;

use super::retry::{parse_retry_after, AttemptResult};
use crate::domain::{embedded_ipv4, is_global, is_loopback_name, literal_ip};

/// How long a target's host name may take to resolve when it is registered.
pub const REGISTRATION_DNS_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub struct AddressPolicy {
    allowed: Arc<Vec<IpNet>>,
}

impl AddressPolicy {
    pub fn new(allowed: Vec<IpNet>) -> Self {
        AddressPolicy {
            allowed: Arc::new(allowed),
        }
    }

    /// May deliveries reach `ip`? Global addresses and `delivery.allowed_cidrs` may; an IPv6
    /// form that embeds an IPv4 address (IPv4-mapped, NAT64, 6to4) is judged by that address.
    pub fn permits(&self, ip: IpAddr) -> bool {
        if self.allowed.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        match ip {
            IpAddr::V6(a) => match embedded_ipv4(a) {
                Some(v4) => self.permits(IpAddr::V4(v4)),
                None => is_global(ip),
            },
            IpAddr::V4(_) => is_global(ip),
        }
    }

    /// May loopback be reached (some loopback range is in `delivery.allowed_cidrs`)?
    fn permits_loopback(&self) -> bool {
        self.permits(IpAddr::V4(Ipv4Addr::LOCALHOST)) || self.permits(IpAddr::V6(Ipv6Addr::LOCALHOST))
    }

    /// What can be judged without DNS: an IP-literal host against the policy, and loopback
    /// host names (`localhost`, `*.localhost`, ...) unless loopback is allowed.
    pub fn check_given(&self, url: &Url) -> Result<(), String> {
        if let Some(ip) = literal_ip(url) {
            if !self.permits(ip) {
                return Err(format!(
                    "{ip} is a non-global address (loopback, private, link-local or reserved) that deliveries may not reach"
                ));
            }
        } else if is_loopback_name(url) && !self.permits_loopback() {
            return Err(format!(
                "host {} names the loopback interface, which deliveries may not reach",
                url.host_str().unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Resolve a URL's host and refuse it when any address it resolves to is not permitted.
    /// Used at registration, where the user can fix the URL.
    pub async fn check_url(&self, url: &Url) -> Result<(), String> {
        let port = url.port_or_known_default().unwrap_or(443);
        let host = url.host_str().unwrap_or_default().to_string();
        let lookup = async move {
            tokio::net::lookup_host((host.as_str(), port))
                .await
                .map(|a| a.map(|a| a.ip()).collect::<Vec<_>>())
                .map_err(|e| format!("host {host} does not resolve ({e})"))
        };
        self.check_url_with(url, lookup, REGISTRATION_DNS_TIMEOUT).await
    }

    /// `check_url` with the lookup given (tests use one that never answers).
    async fn check_url_with(
        &self,
        url: &Url,
        lookup: impl std::future::Future<Output = Result<Vec<IpAddr>, String>>,
        dns_timeout: Duration,
    ) -> Result<(), String> {
        self.check_given(url)?;
        let addrs: Vec<IpAddr> = match literal_ip(url) {
            Some(ip) => vec![ip],
            None => tokio::time::timeout(dns_timeout, lookup).await.map_err(|_| {
                format!(
                    "host {} did not resolve within {} ms",
                    url.host_str().unwrap_or_default(),
                    dns_timeout.as_millis()
                )
            })??,
        };
        match addrs.iter().find(|ip| !self.permits(**ip)) {
            Some(ip) => Err(format!(
                "resolves to {ip}, a non-global address (loopback, private, link-local or reserved) that deliveries may not reach"
            )),
            None if addrs.is_empty() => Err("host resolves to no address".into()),
            None => Ok(()),
        }
    }
}

/// DNS resolution for deliveries: only permitted addresses are returned, so hyper can only dial
/// an address that passed the check (no time-of-check/time-of-use gap).
struct GuardedResolver {
    policy: AddressPolicy,
}

#[derive(Debug, thiserror::Error)]
#[error("all addresses of the host are non-global and not allowed")]
struct Blocked;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok: Vec<SocketAddr> = all.into_iter().filter(|a| policy.permits(a.ip())).collect();
            if ok.is_empty() {
                return Err(Box::new(Blocked) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(ok.into_iter()) as Addrs)
        })
    }
}

#[derive(Clone)]
pub struct DeliveryClient {
    http: reqwest::Client,
    policy: AddressPolicy,
    excerpt_bytes: usize,
    /// reqwest's own timeout (the configured per-attempt timeout): it covers connect, send,
    /// the response head and the capped body, and fires first.
    timeout: Duration,
    /// The outer bound around an attempt, a little longer: a backstop only, so which one fires
    /// is never a race.
    outer_timeout: Duration,
    user_agent: HeaderValue,
}

/// A header a delivery carries besides `content-type` and `user-agent`. Named by a constant
/// rather than by text: reqwest parses and checks a name given as text again for every request
/// (`HeaderName::from_bytes` and the map's appends were 1.1 % of the relay's CPU in the embedded
/// benchmark's throughput phase).
#[derive(Debug, Clone, Copy)]
pub enum DeliveryHeader {
    WebhookId,
    WebhookTimestamp,
    WebhookSignature,
    TrutoSignature,
    WebhookAttempt,
}

impl DeliveryHeader {
    fn name(self) -> HeaderName {
        const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
        const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
        const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
        const TRUTO_SIGNATURE: HeaderName = HeaderName::from_static("x-truto-signature");
        const WEBHOOK_ATTEMPT: HeaderName = HeaderName::from_static("webhook-attempt");
        match self {
            DeliveryHeader::WebhookId => WEBHOOK_ID,
            DeliveryHeader::WebhookTimestamp => WEBHOOK_TIMESTAMP,
            DeliveryHeader::WebhookSignature => WEBHOOK_SIGNATURE,
            DeliveryHeader::TrutoSignature => TRUTO_SIGNATURE,
            DeliveryHeader::WebhookAttempt => WEBHOOK_ATTEMPT,
        }
    }
}

/// How much longer the outer bound around an attempt is than reqwest's own timeout.
const OUTER_TIMEOUT_MARGIN: Duration = Duration::from_millis(500);

/// One attempt, as recorded.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub result: AttemptResult,
    pub status: Option<u16>,
    pub duration: Duration,
    pub excerpt: Option<String>,
    pub error: Option<String>,
}

impl DeliveryClient {
    pub fn new(policy: AddressPolicy, connect_timeout: Duration, timeout: Duration, excerpt_bytes: usize) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .dns_resolver(Arc::new(GuardedResolver { policy: policy.clone() }))
            .build()
            .expect("reqwest client builds");
        DeliveryClient {
            http,
            policy,
            excerpt_bytes,
            timeout,
            outer_timeout: timeout + OUTER_TIMEOUT_MARGIN,
            user_agent: HeaderValue::from_static(concat!("syncrelay/", env!("CARGO_PKG_VERSION"))),
        }
    }

    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
    }

    /// POST `body` with the given headers. Never panics, never follows redirects.
    pub async fn post(&self, url: &Url, headers: &[(DeliveryHeader, String)], body: String) -> Attempt {
        let started = Instant::now();
        if let Err(reason) = self.policy.check_given(url) {
            return Attempt {
                result: AttemptResult::BlockedAddress,
                status: None,
                duration: started.elapsed(),
                excerpt: None,
                error: Some(reason),
            };
        }
        let mut map = HeaderMap::with_capacity(headers.len() + 2);
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        map.insert(USER_AGENT, self.user_agent.clone());
        let mut builder = self.http.post(url.clone());
        for (k, v) in headers {
            match HeaderValue::try_from(v.as_str()) {
                Ok(v) => {
                    map.append(k.name(), v);
                }
                // Never for the ids, numbers and signatures the relay makes; were one invalid,
                // the builder keeps its error and the attempt fails with it, as it always did.
                Err(_) => builder = builder.header(k.name(), v.as_str()),
            }
        }
        let req = builder.body(body).build();
        // reqwest's timeout also bounds reading the (capped) body: a 2xx whose body does not
        // arrive in time is a timeout, not a delivery (the body's error is not swallowed).
        let fut = async {
            let mut req = req?;
            // Set whole: `RequestBuilder::headers` merges a map into the request's one header
            // at a time, as costly as naming them (0.7 – 1.0 % in the same profile).
            *req.headers_mut() = map;
            let resp = self.http.execute(req).await?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let mut excerpt = Vec::new();
            let mut resp = resp;
            while let Some(chunk) = resp.chunk().await? {
                let room = self.excerpt_bytes.saturating_sub(excerpt.len());
                excerpt.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if excerpt.len() >= self.excerpt_bytes {
                    break;
                }
            }
            Ok::<_, reqwest::Error>((status, retry_after, excerpt))
        };
        let outcome = tokio::time::timeout(self.outer_timeout, fut).await;
        let duration = started.elapsed();
        match outcome {
            Ok(Ok((code, retry_after, excerpt))) => Attempt {
                result: AttemptResult::Status { code, retry_after },
                status: Some(code),
                duration,
                excerpt: Some(String::from_utf8_lossy(&excerpt).into_owned()),
                error: None,
            },
            Ok(Err(e)) => {
                let (result, error) = describe(&e);
                Attempt {
                    result,
                    status: None,
                    duration,
                    excerpt: None,
                    error: Some(error),
                }
            }
            Err(_) => Attempt {
                result: AttemptResult::Timeout,
                status: None,
                duration,
                excerpt: None,
                error: Some(format!("timed out after {} ms", self.timeout.as_millis())),
            },
        }
    }
}

/// Classify a reqwest error without leaking the URL (it may carry a token in its query).
fn describe(e: &reqwest::Error) -> (AttemptResult, String) {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.is::<Blocked>() {
            return (AttemptResult::BlockedAddress, Blocked.to_string());
        }
        source = s.source();
    }
    let chain = {
        let mut parts = Vec::new();
        let mut s = std::error::Error::source(e);
        while let Some(x) = s {
            parts.push(x.to_string());
            s = x.source();
        }
        parts.join(": ")
    };
    if e.is_timeout() {
        (AttemptResult::Timeout, "timed out".into())
    } else if e.is_connect() {
        (AttemptResult::Connect, format!("connection failed: {chain}"))
    } else {
        (AttemptResult::Other, format!("request failed: {chain}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The address policy, with and without an allow-list: every IPv6 form of a refused IPv4
    /// address is refused too, and an allowed IPv4 range admits its embedded forms.
    #[test]
    fn address_policy_table() {
        let none = AddressPolicy::new(vec![]);
        let loopback = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let private = AddressPolicy::new(vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()]);
        // (address, permitted with no list, with loopback allowed, with 10/8 + fd00::/8 allowed)
        let table: &[(&str, bool, bool, bool)] = &[
            ("8.8.8.8", true, true, true),
            ("2606:4700::1111", true, true, true),
            ("127.0.0.1", false, true, false),
            ("10.1.2.3", false, false, true),
            ("169.254.169.254", false, false, false),
            ("::1", false, false, false),
            ("::ffff:127.0.0.1", false, true, false),
            ("::ffff:10.1.2.3", false, false, true),
            ("::ffff:8.8.8.8", true, true, true),
            ("::127.0.0.1", false, false, false),
            ("::ffff:0:7f00:1", false, false, false),
            ("64:ff9b::a9fe:a9fe", false, false, false),
            ("64:ff9b::808:808", true, true, true),
            ("2002:7f00:1::1", false, true, false),
            ("2002:a9fe:a9fe::1", false, false, false),
            ("2002:a01:203::1", false, false, true),
            ("2002:808:808::1", true, true, true),
            ("2001::1", false, false, false),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", false, false, false),
            ("2001:2::1", false, false, false),
            ("fec0::1", false, false, false),
            ("100::1", false, false, false),
            ("3fff::1", false, false, false),
            ("fd00::1", false, false, true),
            ("fe80::1", false, false, false),
        ];
        for (a, n, l, p) in table {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(none.permits(ip), *n, "{a} with no allow-list");
            assert_eq!(loopback.permits(ip), *l, "{a} with 127.0.0.0/8 allowed");
            assert_eq!(private.permits(ip), *p, "{a} with 10.0.0.0/8 and fd00::/8 allowed");
        }
    }

    #[tokio::test]
    async fn registration_dns_lookup_has_a_timeout() {
        let policy = AddressPolicy::new(vec![]);
        let url = Url::parse("https://hangs.example/hook").unwrap();
        let never = std::future::pending::<Result<Vec<IpAddr>, String>>();
        let started = Instant::now();
        let e = policy
            .check_url_with(&url, never, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(e.contains("did not resolve within"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // An answer in time is judged as before.
        let quick = async { Ok(vec!["10.0.0.1".parse().unwrap()]) };
        let e = policy
            .check_url_with(&url, quick, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.contains("non-global"), "{e}");
        let quick = async { Ok(vec!["8.8.8.8".parse().unwrap()]) };
        policy
            .check_url_with(&url, quick, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(REGISTRATION_DNS_TIMEOUT, Duration::from_secs(3));
    }

    /// The connect-time half: a name that resolves only to refused addresses is never handed to
    /// the connector, and refused addresses are filtered out of a mixed answer.
    #[tokio::test]
    async fn the_resolver_hands_out_permitted_addresses_only() {
        use std::str::FromStr;
        let blocked = GuardedResolver {
            policy: AddressPolicy::new(vec![]),
        };
        let err = match blocked.resolve(Name::from_str("localhost").unwrap()).await {
            Err(e) => e,
            Ok(a) => panic!("resolved to {:?}", a.collect::<Vec<_>>()),
        };
        assert!(err.is::<Blocked>(), "{err}");
        let v4_only = GuardedResolver {
            policy: AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
        };
        let addrs: Vec<SocketAddr> = match v4_only.resolve(Name::from_str("localhost").unwrap()).await {
            Ok(a) => a.collect(),
            Err(e) => panic!("{e}"),
        };
        assert!(!addrs.is_empty());
        assert!(
            addrs.iter().all(|a| a.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addrs:?}"
        );
    }

    /// IP literals and loopback names are refused before anything is sent.
    #[tokio::test]
    async fn post_refuses_blocked_targets_without_dialling() {
        let client = DeliveryClient::new(
            AddressPolicy::new(vec![]),
            Duration::from_secs(1),
            Duration::from_secs(1),
            64,
        );
        for u in [
            "http://127.0.0.1:9/x",
            "http://[2002:7f00:1::1]:9/x",
            "http://LocalHost.:9/x",
        ] {
            let a = client.post(&Url::parse(u).unwrap(), &[], "{}".into()).await;
            assert!(matches!(a.result, AttemptResult::BlockedAddress), "{u}: {a:?}");
        }
    }
}
