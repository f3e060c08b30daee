//! What one wrk run reports, read from its summary: the bench checks every row's status codes
//! with it (a row that claims refusals must have them, a passing row must have none).

use serde::Serialize;

/// The summary of one wrk run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WrkRun {
    /// `Requests/sec:`.
    pub rps: f64,
    /// Responses read (`N requests in …`).
    pub requests: u64,
    /// Responses with a status of 400 or more (`Non-2xx or 3xx responses:`; wrk omits the line
    /// when there are none).
    pub refused: u64,
    /// The 99th percentile of latency in microseconds, when wrk ran with `--latency`.
    pub p99_us: Option<f64>,
}

/// Parses wrk's summary; `None` when it has no `Requests/sec:` or no request count.
pub fn parse(out: &str) -> Option<WrkRun> {
    let mut rps = None;
    let mut requests = None;
    let mut refused = 0;
    let mut p99_us = None;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            refused = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("99%") {
            p99_us = duration_us(v.trim());
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            requests = n.trim().parse().ok();
        }
    }
    Some(WrkRun {
        rps: rps?,
        requests: requests?,
        refused,
        p99_us,
    })
}

/// A wrk duration such as `108.00us`, `4.26ms` or `1.02s`, in microseconds.
fn duration_us(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSED: &str = "Running 1s test @ http://10.1.2.1:8080/refuse/ok.txt
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   379.71us    0.99ms  12.16ms   92.55%
    Req/Sec    55.12k     9.22k   68.49k    60.00%
  Latency Distribution
     50%  108.00us
     75%  170.00us
     90%  528.00us
     99%    4.26ms
  54844 requests in 1.00s, 17.36MB read
  Non-2xx or 3xx responses: 54843
Requests/sec:  54767.00
Transfer/sec:     17.34MB
";

    #[test]
    fn refused_run_with_latency() {
        let r = parse(REFUSED).expect("parses");
        assert_eq!(r.rps, 54767.0);
        assert_eq!(r.requests, 54844);
        assert_eq!(r.refused, 54843);
        assert_eq!(r.p99_us, Some(4260.0));
    }

    #[test]
    fn passing_run_without_latency() {
        let out = "Running 1s test @ http://x/\n  1 threads and 1 connections\n  12345 requests in 1.00s, 1.2MB read\nRequests/sec:  12345.67\nTransfer/sec:  1.2MB\n";
        let r = parse(out).expect("parses");
        assert_eq!(
            (r.rps, r.requests, r.refused, r.p99_us),
            (12345.67, 12345, 0, None)
        );
        assert_eq!(parse("nothing"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(duration_us("108.00us"), Some(108.0));
        assert_eq!(duration_us("1.50s"), Some(1_500_000.0));
        assert_eq!(duration_us("2.00m"), Some(120e6));
        assert_eq!(duration_us("fast"), None);
    }
}
