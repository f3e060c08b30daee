//! `limiter trace`: the kernel's verdict on each chunk of every inbound API connection, as it
//! happens.
//!
//! The tracer opens the pinned TRACE_ON and TRACE maps of the running layout, writes its pid
//! into TRACE_ON (the verdict writes records only while it is non-zero), prints what arrives in
//! TRACE, and clears the pid when it stops. A tracer that dies without clearing it is noticed by
//! the daemon, which clears a pid that no longer runs (see [`stale_tracer`]). One tracer at a
//! time: a ring buffer has one reader, and a second would take records from the first.

use std::{
    collections::HashMap,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, MapError};
use limiter_common::{
    TRACE_LOST, TRACE_O_COUNTED, TRACE_O_EXEMPT, TRACE_O_PASSED, TRACE_O_REFUSED, TRACE_O_UNPARSED,
    TRACE_PID, TRACE_R_BAD_REQUEST, TRACE_R_CLOSED, TRACE_R_CONCURRENCY, TRACE_R_DAILY,
    TRACE_R_FAULT, TRACE_R_NOT_HTTP, TRACE_VIA_ADDRESS, TraceRecord, UNMAPPED_ORG, day,
    layout::{Handle, MapSpec, ORG_LIMITS, TRACE, TRACE_ON},
    reply::NAME_MAX,
    stream::{Stream, StreamRules},
};
use serde::Serialize;
use thiserror::Error;

use crate::pins::{self, Capacity};

/// Most path bytes shown.
pub const PATH_MAX: usize = 64;

#[derive(Debug, Error)]
pub enum TraceError {
    #[error(
        "no pinned limiter maps with TRACE_ON under {0}: is the daemon running with this config's daemon.pin_dir?"
    )]
    NoPins(String),
    #[error("opening pinned map {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("another `limiter trace` (pid {0}) is running; one tracer at a time")]
    Busy(u64),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn map_err<M: MapSpec>(source: MapError) -> TraceError {
    TraceError::Map {
        name: M::DEF.name,
        source,
    }
}

/// Whether TRACE_ON's `pid` is a tracer that no longer runs (the daemon then clears it).
pub fn stale_tracer(pid: u64, alive: impl Fn(u64) -> bool) -> bool {
    pid != 0 && !alive(pid)
}

/// Whether a `limiter` process with this pid runs: a pid the kernel gave to another program
/// since the tracer died is no tracer.
pub fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm"))
        .is_ok_and(|comm| is_limiter(&comm))
}

/// Whether a `/proc/<pid>/comm` is the `limiter` binary's (the kernel keeps 15 bytes of it).
fn is_limiter(comm: &str) -> bool {
    comm.trim_end() == "limiter"
}

/// One line of the trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    /// UTC, RFC 3339 with milliseconds.
    pub time: String,
    /// The org's name; `-` for traffic of no org.
    pub org: String,
    /// How the org was identified.
    pub via: &'static str,
    /// The first request's method and path (up to [`PATH_MAX`] bytes, lossy UTF-8); null when
    /// the chunk continues an earlier request.
    pub method: Option<String>,
    pub path: Option<String>,
    pub outcome: &'static str,
    /// Why it was refused or not parsed; null otherwise.
    pub reason: Option<&'static str>,
    /// This request's place among the request lines that started in the chunk (1-based), and
    /// how many started: pipelined requests that arrive in one chunk get a line each, and share
    /// the chunk's outcome.
    pub request: u32,
    pub requests: u32,
    /// Requests in the chunk: counted against the quota, and exempt media GETs.
    pub counted: u32,
    pub media: u32,
    pub bytes: u32,
    /// The kernel's cookie of the connection.
    pub conn: u64,
}

pub fn outcome_name(o: u8) -> &'static str {
    match o {
        TRACE_O_COUNTED => "counted",
        TRACE_O_EXEMPT => "exempt",
        TRACE_O_REFUSED => "refused",
        TRACE_O_UNPARSED => "unparsed",
        TRACE_O_PASSED => "passed",
        _ => "unknown",
    }
}

pub fn reason_name(r: u8) -> Option<&'static str> {
    Some(match r {
        TRACE_R_DAILY => "daily",
        TRACE_R_CONCURRENCY => "concurrency",
        TRACE_R_BAD_REQUEST => "bad_request",
        TRACE_R_CLOSED => "closed",
        TRACE_R_NOT_HTTP => "not_http",
        TRACE_R_FAULT => "fault",
        _ => return None,
    })
}

fn via_name(v: u8) -> &'static str {
    match v {
        TRACE_VIA_ADDRESS => "address",
        _ => "unknown",
    }
}

/// The method and path (its first [`PATH_MAX`] bytes, up to the space that ends it) of the
/// request line that starts `head` (leading empty lines skipped). None when `head` does not
/// start with `METHOD SP target`.
pub fn request_line(head: &[u8]) -> Option<(String, String)> {
    let start = head.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let line = &head[start..];
    let sp = line.iter().position(|b| *b == b' ')?;
    let method = &line[..sp];
    if method.is_empty() || !method.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let rest = &line[sp + 1..];
    let end = rest
        .iter()
        .position(|b| matches!(b, b' ' | b'\r' | b'\n'))
        .unwrap_or(rest.len());
    let path = &rest[..end.min(PATH_MAX)];
    Some((
        String::from_utf8_lossy(method).into_owned(),
        String::from_utf8_lossy(path).into_owned(),
    ))
}

/// RFC 3339 UTC with milliseconds of Unix nanoseconds.
pub fn utc(unix_ns: i64) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let ms = unix_ns.rem_euclid(1_000_000_000) / 1_000_000;
    let (y, m, d) = day::civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// A record as a line; `tai_to_unix_ns` is added to its `CLOCK_TAI` time.
pub fn line(r: &TraceRecord, org: String, tai_to_unix_ns: i64) -> Line {
    // Only a chunk in which a request line started has one to show (not opaque bytes that
    // happen to hold a space).
    let head = if r.starts > 0 {
        &r.head[..(r.head_len as usize).min(r.head.len())]
    } else {
        &[]
    };
    let (method, path) = request_line(head).unzip();
    Line {
        time: utc(r.time_ns as i64 + tai_to_unix_ns),
        org,
        via: via_name(r.via),
        method,
        path,
        outcome: outcome_name(r.outcome),
        reason: reason_name(r.reason),
        request: u32::from(r.starts > 0),
        requests: r.starts,
        counted: r.counted,
        media: r.media,
        bytes: r.len,
        conn: r.cookie,
    }
}

/// No media prefixes: only where request lines start matters here.
struct NoMedia;

impl StreamRules for NoMedia {
    fn all(&self) -> u8 {
        0
    }

    fn matching(&self, _pos: u8, _c: u8) -> u8 {
        0
    }
}

/// Where each request line that starts in `head` (bytes from a request boundary) begins, found
/// by the kernel's own stream parser fed a byte at a time: a request line inside a body is none.
pub fn request_starts(head: &[u8]) -> Vec<usize> {
    let mut stream = Stream::new();
    let mut starts = Vec::new();
    let mut begin = 0;
    for i in 0..head.len() {
        // The last byte at which the stream stood between requests (empty lines are skipped by
        // `request_line`).
        if stream.at_boundary() {
            begin = i;
        }
        if stream.feed(&head[i..=i], &NoMedia).starts > 0 {
            starts.push(begin);
        }
    }
    starts
}

/// A record as one line per request line that started in its chunk (one line when none did).
/// Requests past the captured head get a line without method and path.
pub fn lines(r: &TraceRecord, org: String, tai_to_unix_ns: i64) -> Vec<Line> {
    let first = line(r, org, tai_to_unix_ns);
    if r.starts <= 1 || r.head_len == 0 {
        return vec![first];
    }
    let head = &r.head[..(r.head_len as usize).min(r.head.len())];
    let at = request_starts(head);
    (0..r.starts)
        .map(|k| {
            let (method, path) = at
                .get(k as usize)
                .and_then(|&p| request_line(&head[p..]))
                .unzip();
            Line {
                request: k + 1,
                method,
                path,
                ..first.clone()
            }
        })
        .collect()
}

impl Line {
    /// The text form: time, org, via, method and path, outcome (with its reason) and counts.
    pub fn text(&self) -> String {
        let outcome = match self.reason {
            Some(r) => format!("{} ({r})", self.outcome),
            None => self.outcome.to_string(),
        };
        format!(
            "{} {} via={} {} {} {} request={}/{} counted={} media={} bytes={} conn={}",
            self.time,
            self.org,
            self.via,
            self.method.as_deref().unwrap_or("-"),
            self.path.as_deref().unwrap_or("-"),
            outcome,
            self.request,
            self.requests,
            self.counted,
            self.media,
            self.bytes,
            self.conn
        )
    }
}

/// The layout directory holding TRACE_ON: this config's own when it exists, else the one other
/// layout directory under `pin_dir` (the daemon removes others' once it runs).
pub fn find_layout_dir(pin_dir: &Path, cap: Capacity) -> Result<PathBuf, TraceError> {
    let own = pins::layout_dir(pin_dir, cap);
    if own.join(TRACE_ON::DEF.name).exists() {
        return Ok(own);
    }
    let none = || TraceError::NoPins(pin_dir.display().to_string());
    std::fs::read_dir(pin_dir)
        .map_err(|_| none())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join(TRACE_ON::DEF.name).exists())
        .ok_or_else(none)
}

fn open<M: MapSpec>(dir: &Path) -> Result<Handle<M>, TraceError>
where
    Handle<M>: TryFrom<Map, Error = MapError>,
{
    let path = dir.join(M::DEF.name);
    let open_err = |source| TraceError::Open {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(open_err)?;
    let map = Map::from_map_data(data).map_err(open_err)?;
    Handle::<M>::try_from(map).map_err(map_err::<M>)
}

/// The pid in TRACE_ON under `pin_dir` (0: nobody traces).
pub fn current_tracer(pin_dir: &Path, cap: Capacity) -> Result<u64, TraceError> {
    let dir = find_layout_dir(pin_dir, cap)?;
    open::<TRACE_ON>(&dir)?
        .get(&TRACE_PID, 0)
        .map_err(map_err::<TRACE_ON>)
}

/// How often the tracer reads TRACE when the kernel does not wake it.
const POLL_MS: i32 = 100;

/// Set by SIGINT and SIGTERM.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a handler that only stores to an atomic; no SA_RESTART, so poll(2) returns.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn clock_ns(clock: libc::clockid_t) -> i64 {
    // SAFETY: a zeroed timespec is a valid out value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// The tracer: TRACE_ON holds its pid while it lives.
pub struct Tracer {
    on: Handle<TRACE_ON>,
    records: Handle<TRACE>,
    limits: Handle<ORG_LIMITS>,
    pid: u64,
    /// TRACE_LOST when this tracer started.
    lost_before: u64,
    names: HashMap<u32, String>,
}

impl Tracer {
    /// Opens the maps under `pin_dir` and turns tracing on; refuses while another live tracer
    /// holds the flag.
    pub fn start(pin_dir: &Path, cap: Capacity) -> Result<Self, TraceError> {
        let dir = find_layout_dir(pin_dir, cap)?;
        let mut on = open::<TRACE_ON>(&dir)?;
        let records = open::<TRACE>(&dir)?;
        let limits = open::<ORG_LIMITS>(&dir)?;
        let pid = u64::from(std::process::id());
        let held = on.get(&TRACE_PID, 0).map_err(map_err::<TRACE_ON>)?;
        if held != 0 && held != pid && pid_alive(held) {
            return Err(TraceError::Busy(held));
        }
        let lost_before = on.get(&TRACE_LOST, 0).map_err(map_err::<TRACE_ON>)?;
        on.set(TRACE_PID, pid, 0).map_err(map_err::<TRACE_ON>)?;
        let mut tracer = Tracer {
            on,
            records,
            limits,
            pid,
            lost_before,
            names: HashMap::new(),
        };
        // Records of an earlier tracer that were never read.
        while tracer.records.next().is_some() {}
        Ok(tracer)
    }

    /// The org's name as the kernel has it (ORG_LIMITS), `-` for no org.
    fn org_name(&mut self, org: u32) -> String {
        if org == UNMAPPED_ORG {
            return "-".into();
        }
        if let Some(n) = self.names.get(&org) {
            return n.clone();
        }
        let name = match self.limits.get(&org, 0) {
            Ok(l) => {
                let n = (l.name_len as usize).min(NAME_MAX);
                String::from_utf8_lossy(&l.name[..n]).into_owned()
            }
            Err(_) => format!("#{org}"),
        };
        self.names.insert(org, name.clone());
        name
    }

    /// Prints records (of `org` only, when given) until SIGINT or SIGTERM: text lines, or JSON
    /// lines with `json`. Returns how many records the kernel could not write meanwhile.
    pub fn run(
        &mut self,
        org: Option<&str>,
        json: bool,
        out: &mut impl std::io::Write,
    ) -> Result<u64, TraceError> {
        catch_signals();
        let tai_to_unix = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_TAI);
        let fd = self.records.as_raw_fd();
        let mut checked = Instant::now();
        while !STOP.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd. EINTR (a signal) ends the wait early. The kernel wakes
            // the tracer only once TRACE is a quarter full: otherwise it reads on this timer.
            unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
            loop {
                let Some(item) = self.records.next() else {
                    break;
                };
                let read = bytemuck::try_pod_read_unaligned::<TraceRecord>(&item);
                drop(item);
                let Ok(r) = read else { continue };
                let name = self.org_name(r.org);
                if org.is_some_and(|o| o != name) {
                    continue;
                }
                for l in lines(&r, name, tai_to_unix) {
                    if json {
                        let text = serde_json::to_string(&l).map_err(std::io::Error::other)?;
                        writeln!(out, "{text}")?;
                    } else {
                        writeln!(out, "{}", l.text())?;
                    }
                }
            }
            out.flush()?;
            if checked.elapsed() >= Duration::from_secs(1) {
                checked = Instant::now();
                // Names change on reload; and a daemon that took our flag for a dead tracer's
                // (a pid read just before we started) gets it back.
                self.names.clear();
                if self.on.get(&TRACE_PID, 0).is_ok_and(|p| p == 0) {
                    let _ = self.on.set(TRACE_PID, self.pid, 0);
                }
            }
        }
        let lost = self.on.get(&TRACE_LOST, 0).map_err(map_err::<TRACE_ON>)?;
        Ok(lost.saturating_sub(self.lost_before))
    }
}

impl Drop for Tracer {
    /// Turns tracing off, unless another tracer has taken over since.
    fn drop(&mut self) {
        if self.on.get(&TRACE_PID, 0).is_ok_and(|p| p == self.pid) {
            let _ = self.on.set(TRACE_PID, 0, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            request_line(b"GET /api/x?y=1 HTTP/1.1\r\nHost: a\r\n"),
            Some(("GET".into(), "/api/x?y=1".into()))
        );
        assert_eq!(
            request_line(b"\r\nPOST /p HTTP/1.1\r\n"),
            Some(("POST".into(), "/p".into()))
        );
        // A line cut short by the chunk's end.
        assert_eq!(
            request_line(b"PUT /abc"),
            Some(("PUT".into(), "/abc".into()))
        );
        assert_eq!(request_line(b"\x16\x03\x01 tls"), None);
        assert_eq!(request_line(b"no-space"), None);
        assert_eq!(request_line(b""), None);
    }

    #[test]
    fn paths_are_cut_at_64_bytes() {
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(200));
        let (_, path) = request_line(long.as_bytes()).expect("a request line");
        assert_eq!(path.len(), PATH_MAX);
        assert!(path.starts_with("/aaa"));
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        let ns = (day::days_from_civil(2026, 12, 2) * 86_400 + 3 * 3600 + 4 * 60 + 5)
            * 1_000_000_000
            + 678_000_000;
        assert_eq!(utc(ns), "2026-12-02T03:04:05.678Z");
    }

    #[test]
    fn only_a_limiter_process_is_a_live_tracer() {
        assert!(is_limiter("limiter\n"));
        assert!(!is_limiter("nginx\n"));
        assert!(!is_limiter("limiter-lab\n"));
        // This test binary runs, but it is no tracer.
        assert!(!pid_alive(u64::from(std::process::id())));
        // A process named `limiter` is.
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("limiter");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let mut child = std::process::Command::new(&exe).arg("5").spawn().unwrap();
        // Until it has exec'd, the child still carries this test's name.
        let alive = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            pid_alive(u64::from(child.id()))
        });
        let _ = child.kill();
        let _ = child.wait();
        assert!(alive, "a running `limiter` is a live tracer");
        assert!(!pid_alive(u64::from(u32::MAX)));
    }

    #[test]
    fn stale_tracers() {
        assert!(!stale_tracer(0, |_| false));
        assert!(stale_tracer(42, |_| false));
        assert!(!stale_tracer(42, |p| p == 42));
        // A running process that is not `limiter` (this test) holds no trace.
        assert!(stale_tracer(u64::from(std::process::id()), pid_alive));
    }

    #[test]
    fn pipelined_requests_get_a_line_each() {
        let head: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /b HTTP/1.1\r\nContent-Length: 18\r\n\r\nGET /body HTTP/1.1\
            GET /c?x=1 HTTP/1.1\r\n\r\nDELETE /d";
        let starts = request_starts(head);
        let methods: Vec<_> = starts
            .iter()
            .map(|&p| request_line(&head[p..]).unwrap())
            .collect();
        assert_eq!(
            methods,
            [
                ("GET".into(), "/a".into()),
                ("POST".into(), "/b".into()),
                ("GET".into(), "/c?x=1".into()),
                ("DELETE".into(), "/d".into()),
            ],
            "the body's `GET /body` is no request"
        );
        let mut r: TraceRecord = bytemuck::Zeroable::zeroed();
        r.head[..head.len()].copy_from_slice(head);
        r.head_len = head.len() as u32;
        r.outcome = TRACE_O_REFUSED;
        r.reason = TRACE_R_DAILY;
        r.starts = 6; // two more past the captured bytes
        r.counted = 6;
        let ls = lines(&r, "acme".into(), 0);
        assert_eq!(ls.len(), 6);
        let got: Vec<_> = ls
            .iter()
            .map(|l| (l.request, l.method.as_deref(), l.path.as_deref(), l.outcome))
            .collect();
        assert_eq!(
            got,
            [
                (1, Some("GET"), Some("/a"), "refused"),
                (2, Some("POST"), Some("/b"), "refused"),
                (3, Some("GET"), Some("/c?x=1"), "refused"),
                (4, Some("DELETE"), Some("/d"), "refused"),
                (5, None, None, "refused"),
                (6, None, None, "refused"),
            ]
        );
        assert!(
            ls[1]
                .text()
                .contains("POST /b refused (daily) request=2/6 counted=6")
        );
    }

    #[test]
    fn records_become_lines() {
        let mut r: TraceRecord = bytemuck::Zeroable::zeroed();
        let head = b"GET /media/cat.png HTTP/1.1\r\n";
        r.head[..head.len()].copy_from_slice(head);
        r.head_len = head.len() as u32;
        r.outcome = TRACE_O_EXEMPT;
        r.via = TRACE_VIA_ADDRESS;
        r.media = 1;
        r.starts = 1;
        r.len = 40;
        let l = line(&r, "acme".into(), 0);
        assert_eq!(l.method.as_deref(), Some("GET"));
        assert_eq!(l.path.as_deref(), Some("/media/cat.png"));
        assert_eq!((l.outcome, l.reason, l.via), ("exempt", None, "address"));
        assert!(
            l.text()
                .contains("acme via=address GET /media/cat.png exempt")
        );

        r.outcome = TRACE_O_REFUSED;
        r.reason = TRACE_R_DAILY;
        r.head_len = 0;
        let l = line(&r, "acme".into(), 0);
        assert_eq!((&l.method, &l.path), (&None, &None));
        assert_eq!((l.outcome, l.reason), ("refused", Some("daily")));
        assert!(l.text().contains("- - refused (daily)"));

        // Opaque bytes with a space in them are no request line.
        let junk = b"hello world, not http";
        r.head[..junk.len()].copy_from_slice(junk);
        r.head_len = junk.len() as u32;
        r.starts = 0;
        r.outcome = TRACE_O_UNPARSED;
        r.reason = TRACE_R_NOT_HTTP;
        let l = line(&r, "-".into(), 0);
        assert_eq!(
            (&l.method, l.outcome, l.reason),
            (&None, "unparsed", Some("not_http"))
        );
    }
}
