//! Prometheus metrics (`daemon.metrics = "127.0.0.1:9464"`): today's usage per org and the
//! kernel's fault counters, refreshed by the daemon every second and served at `/metrics`.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::report::Report;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrgLabel {
    org: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabel {
    fault: String,
}

/// The metric families, updated from reports.
pub struct Metrics {
    registry: Registry,
    per_org: Vec<(Field, Family<OrgLabel, Gauge>)>,
    faults: Family<FaultLabel, Gauge>,
    /// The last rendering, what `/metrics` answers.
    text: Arc<Mutex<String>>,
}

type Field = fn(&crate::report::OrgReport) -> u64;

const PER_ORG: [(&str, &str, Field); 10] = [
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
        let faults = Family::<FaultLabel, Gauge>::default();
        registry.register(
            "limiter_faults",
            "Kernel-side faults since the programs were loaded (traffic passed)",
            faults.clone(),
        );
        Metrics {
            registry,
            per_org,
            faults,
            text: Arc::new(Mutex::new(String::new())),
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
            *t = text;
        }
    }

    pub fn text(&self) -> Arc<Mutex<String>> {
        self.text.clone()
    }
}

/// Serves the latest rendering to every HTTP request (any path: it is the only thing here).
pub async fn serve(listener: TcpListener, text: Arc<Mutex<String>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let text = text.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
                .await;
            let body = text.lock().map(|t| t.clone()).unwrap_or_default();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
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
        let report = Report {
            day: "2026-11-28".into(),
            resets_in_seconds: 10,
            orgs: vec![OrgReport::new("acme", &d, 2, 2500, 3)],
            unmapped: UnmappedReport {
                requests: 4,
                ..Default::default()
            },
        };
        m.update(&report, &[("sock_state_full", 1)]);
        let text = m.text().lock().unwrap().clone();
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
    }
}
