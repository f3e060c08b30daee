//! Prometheus metrics (`daemon.metrics = "127.0.0.1:9464"`): today's usage per org and the
//! kernel's fault counters, refreshed by the daemon every second and served at `/metrics`.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::warn;

use crate::report::Report;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrgLabel {
    org: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    org: String,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabel {
    fault: String,
}

/// The metric families, updated from reports.
pub struct Metrics {
    registry: Registry,
    per_org: Vec<(Field, Family<OrgLabel, Gauge>)>,
    /// Requests by org and by the source that knew the org.
    identified: Family<SourceLabel, Gauge>,
    unknown_keys: Gauge,
    faults: Family<FaultLabel, Gauge>,
    /// The last rendering, what `/metrics` answers.
    text: Shared,
}

/// The last rendering, shared with the server: each connection takes a reference to it, not a
/// copy (with many orgs the text is megabytes).
pub type Shared = Arc<Mutex<Arc<str>>>;

type Field = fn(&crate::report::OrgReport) -> u64;

const PER_ORG: [(&str, &str, Field); 12] = [
    (
        "limiter_requests_today",
        "Requests that used quota today",
        |o| o.requests,
    ),
    (
        "limiter_rejected_today",
        "Requests refused (or, in dry-run, that would have been) today",
        |o| o.rejected,
    ),
    (
        "limiter_exempt_media_gets_today",
        "Exempt media GETs today",
        |o| o.exempt_media_gets,
    ),
    (
        "limiter_exempt_pushes_today",
        "Exempt outbound pushes today",
        |o| o.exempt_pushes,
    ),
    (
        "limiter_unparsed_today",
        "Connections that opened with non-HTTP bytes today",
        |o| o.unparsed,
    ),
    (
        "limiter_daily_limit",
        "The org's daily request limit",
        |o| o.daily_limit,
    ),
    ("limiter_connections", "Connections open now", |o| {
        o.connections
    }),
    (
        "limiter_peak_connections_today",
        "Most simultaneous connections today",
        |o| o.peak_connections,
    ),
    (
        "limiter_concurrency_breaches_today",
        "Connections that arrived at the concurrency limit today",
        |o| o.concurrency_breaches,
    ),
    ("limiter_remaining_today", "Requests left today", |o| {
        o.remaining
    }),
    (
        "limiter_delayed_syns_today",
        "New connections held back at the concurrency limit today (concurrency_mode delay)",
        |o| o.delayed_syns,
    ),
    (
        "limiter_paced_syns_today",
        "New connections held back while out of quota today (pace_over_quota)",
        |o| o.paced_syns,
    ),
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let mut per_org = Vec::new();
        for (name, help, field) in PER_ORG {
            let family = Family::<OrgLabel, Gauge>::default();
            registry.register(name, help, family.clone());
            per_org.push((field, family));
        }
        let identified = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "limiter_requests_identified_today",
            "Requests today by the api.identify_by source that knew the org (api_key, proxy_protocol, forwarded, address)",
            identified.clone(),
        );
        let unknown_keys = Gauge::default();
        registry.register(
            "limiter_unknown_keys_today",
            "Requests today that carried an API key no org has",
            unknown_keys.clone(),
        );
        let faults = Family::<FaultLabel, Gauge>::default();
        registry.register(
            "limiter_faults",
            "Faults: the kernel's since the programs were loaded (traffic passed), and the daemon's failed snapshot writes since it started",
            faults.clone(),
        );
        Metrics {
            registry,
            per_org,
            identified,
            unknown_keys,
            faults,
            text: Arc::new(Mutex::new(Arc::from(""))),
        }
    }

    /// Replaces every value with the report's (orgs no longer configured disappear).
    pub fn update(&self, report: &Report, faults: &[(&str, u64)]) {
        for (i, (field, family)) in self.per_org.iter().enumerate() {
            family.clear();
            for o in &report.orgs {
                family
                    .get_or_create(&OrgLabel { org: o.org.clone() })
                    .set(field(o) as i64);
            }
            // The first family is requests: unmapped traffic has requests only.
            if i == 0 {
                family
                    .get_or_create(&OrgLabel {
                        org: crate::orgs::UNMAPPED_NAME.into(),
                    })
                    .set(report.unmapped.requests as i64);
            }
        }
        self.identified.clear();
        for o in &report.orgs {
            for (source, n) in o.identified_by.counts() {
                self.identified
                    .get_or_create(&SourceLabel {
                        org: o.org.clone(),
                        source,
                    })
                    .set(n as i64);
            }
        }
        self.unknown_keys.set(report.unmapped.unknown_keys as i64);
        for (name, n) in faults {
            self.faults
                .get_or_create(&FaultLabel {
                    fault: (*name).to_string(),
                })
                .set(*n as i64);
        }
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_ok()
            && let Ok(mut t) = self.text.lock()
        {
            *t = Arc::from(text);
        }
    }

    pub fn text(&self) -> Shared {
        self.text.clone()
    }
}

/// How the endpoint protects the daemon from its clients.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once; one more closes the oldest.
    pub max_connections: usize,
    /// A client that sends no request in this time is closed without an answer.
    pub read_timeout: Duration,
    /// A client that does not take the answer in this time is closed.
    pub write_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: 16,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// After a failed accept (EMFILE and the like) the loop waits this long, doubling up to
/// [`ACCEPT_BACKOFF_MAX`] while the failures last, instead of spinning on a full fd table.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why serving on `addr` deserves a warning: the metrics name every org and its usage, and the
/// endpoint has no authentication.
pub fn exposure_warning(addr: SocketAddr) -> Option<String> {
    (!addr.ip().is_loopback()).then(|| {
        format!(
            "daemon.metrics = {addr} is reachable beyond this host: every org's name and usage are served without authentication; bind it to 127.0.0.1 or firewall it"
        )
    })
}

/// Binds the endpoint, warning when it is reachable from other hosts.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if let Some(w) = exposure_warning(addr) {
        warn!(event = "config", metrics = %addr, "{w}");
    }
    TcpListener::bind(addr).await
}

/// Serves the latest rendering to every HTTP request (any path: it is the only thing here).
pub async fn serve(listener: TcpListener, text: Shared) {
    serve_with(listener, text, ServeLimits::default()).await
}

/// [`serve`] with explicit limits.
///
/// At the limit, a new connection closes the oldest one: clients that connect and then hold on
/// (sending nothing, or reading the answer a byte at a time) cannot lock a scraper out.
pub async fn serve_with(listener: TcpListener, text: Shared, limits: ServeLimits) {
    let mut live: VecDeque<JoinHandle<()>> = VecDeque::with_capacity(limits.max_connections);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(e) => {
                if backoff == ACCEPT_BACKOFF_MIN {
                    warn!(event = "fault", error = %e, "metrics endpoint: accept failed; backing off");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        live.retain(|c| !c.is_finished());
        while live.len() >= limits.max_connections.max(1) {
            if let Some(oldest) = live.pop_front() {
                oldest.abort();
            }
        }
        let text = text.clone();
        live.push_back(tokio::spawn(async move {
            answer(stream, &text, limits).await;
        }));
    }
}

/// Reads the request (whatever it is) and answers with the latest rendering.
async fn answer(mut stream: TcpStream, text: &Shared, limits: ServeLimits) {
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(limits.read_timeout, stream.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => {}
        // Nothing sent in time, closed, or failed: no answer.
        _ => return,
    }
    let body = text
        .lock()
        .map(|t| Arc::clone(&t))
        .unwrap_or_else(|_| Arc::from(""));
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(limits.write_timeout, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{OrgReport, UnmappedReport};
    use limiter_common::DayCounters;

    #[test]
    fn renders_per_org_values() {
        let m = Metrics::new();
        let mut d = DayCounters::for_day(1);
        d.requests = 12;
        d.rejected = 3;
        d.by_api_key = 10;
        d.by_forwarded = 5;
        let report = Report {
            day: "2026-11-28".into(),
            resets_in_seconds: 10,
            orgs: vec![OrgReport::new("acme", &d, 2, 2500, 3)],
            unmapped: UnmappedReport {
                requests: 4,
                unknown_keys: 6,
                ..Default::default()
            },
        };
        m.update(&report, &[("sock_state_full", 1)]);
        let text = m.text().lock().unwrap().to_string();
        assert!(
            text.contains("limiter_requests_today{org=\"acme\"} 12"),
            "{text}"
        );
        assert!(
            text.contains("limiter_requests_today{org=\"unmapped\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("limiter_rejected_today{org=\"acme\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("limiter_connections{org=\"acme\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("limiter_faults{fault=\"sock_state_full\"} 1"),
            "{text}"
        );
        for (source, n) in [
            ("api_key", 10),
            ("forwarded", 5),
            ("proxy_protocol", 0),
            ("address", 0),
        ] {
            let line = format!(
                "limiter_requests_identified_today{{org=\"acme\",source=\"{source}\"}} {n}"
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains("limiter_unknown_keys_today 6"), "{text}");
    }

    /// A request on a fresh connection: the answer, or "" when the server closed it unanswered.
    async fn get(addr: SocketAddr) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out).await;
        out
    }

    /// Bytes a connection receives before the server closes it (a close with the request
    /// unread arrives as a reset).
    async fn until_closed(c: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        // The bound only keeps a broken server from hanging the test.
        match tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut out))
            .await
            .expect("the server never closed the connection")
        {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        out
    }

    #[tokio::test]
    async fn answers_from_the_shared_rendering_and_bounds_connections() {
        let m = Metrics::new();
        let report = Report {
            day: "2026-11-28".into(),
            resets_in_seconds: 10,
            orgs: vec![OrgReport::new("acme", &DayCounters::for_day(1), 0, 2500, 3)],
            unmapped: UnmappedReport::default(),
        };
        m.update(&report, &[]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServeLimits {
            max_connections: 2,
            read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
        };
        tokio::spawn(serve_with(listener, m.text(), limits));
        let answer = get(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(
            answer.contains("limiter_daily_limit{org=\"acme\"} 2500"),
            "{answer}"
        );
        // Two idle clients take both slots (accepted in order); a third closes the oldest and
        // is answered.
        let mut idle1 = TcpStream::connect(addr).await.unwrap();
        let mut idle2 = TcpStream::connect(addr).await.unwrap();
        let third = get(addr).await;
        assert!(third.starts_with("HTTP/1.1 200 OK"), "{third}");
        assert_eq!(until_closed(&mut idle1).await, b"");
        // The other one was left alone: its request is answered.
        idle2.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let answered = String::from_utf8(until_closed(&mut idle2).await).unwrap();
        assert!(answered.starts_with("HTTP/1.1 200 OK"), "{answered}");
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_after_the_read_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServeLimits {
            max_connections: 4,
            read_timeout: Duration::from_millis(100),
            write_timeout: Duration::from_secs(60),
        };
        tokio::spawn(serve_with(listener, Metrics::new().text(), limits));
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert_eq!(until_closed(&mut silent).await, b"");
    }

    #[test]
    fn non_loopback_addresses_are_warned_about() {
        for addr in ["127.0.0.1:9464", "[::1]:9464"] {
            assert_eq!(exposure_warning(addr.parse().unwrap()), None, "{addr}");
        }
        for addr in ["0.0.0.0:9464", "10.0.0.5:9464", "[::]:9464"] {
            let w = exposure_warning(addr.parse().unwrap());
            assert!(w.is_some_and(|w| w.contains(addr)), "{addr}");
        }
    }
}
