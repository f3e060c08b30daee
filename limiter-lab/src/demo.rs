//! `limiter-lab demo` (what `limiter demo` runs): a private world, a real API server, the real
//! daemon and kernel programs, traffic from several simulated orgs, a live usage table, and a
//! final check of the report against what the API server itself saw.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
    process::{Child, Command, ExitCode, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use limiter_user::{
    control::{self, Request as Ctl},
    report::{OrgReport, Report},
};

use crate::testbed::{
    self, AccessEntry, PushArgs, Request, ServeArgs, Side, Testbed, TestbedOptions, http_requests,
    open_idle, send_raw,
};

const API_PORT: u16 = 8080;
const PUSH_PORT: u16 = 9090;
/// Small enough to run out within seconds.
const GLOBEX_QUOTA: u64 = 25;

/// Who is who in the demo.
struct Cast {
    acme: IpAddr,
    acme6: IpAddr,
    globex: IpAddr,
    initech: IpAddr,
    umbrella: IpAddr,
    stranger: IpAddr,
}

fn config_text(tb: &Testbed, cast: &Cast) -> String {
    format!(
        r#"# limiter demo: quotas scaled down so one org runs out within seconds.
[api]
ports = [{API_PORT}]
cgroup = "{cgroup}"
media_get_prefixes = ["/media/"]

[limits]
daily_requests = 2500
concurrent_connections = 3
concurrency_mode = "observe"
quota_mode = "enforce"

[daemon]
pin_dir = "{pin}"
state_dir = "{state}"
log_format = "text"

[[orgs]]
name = "acme"              # well under quota, IPv4 and IPv6, receives webhook pushes
cidrs = ["{acme}/32", "{acme6}/128"]

[[orgs]]
name = "globex"            # runs out of its (demo-sized) quota
cidrs = ["{globex}/32"]
daily_requests = {GLOBEX_QUOTA}

[[orgs]]
name = "initech"           # opens more than 3 connections at once
cidrs = ["{initech}/32"]

[[orgs]]
name = "umbrella"          # mostly media downloads, plus some garbage bytes
cidrs = ["{umbrella}/32"]
"#,
        cgroup = tb.cgroup().display(),
        pin = tb.bpffs().join("limiter").display(),
        state = tb.dir().join("state").display(),
        acme = cast.acme,
        acme6 = cast.acme6,
        globex = cast.globex,
        initech = cast.initech,
        umbrella = cast.umbrella,
    )
}

fn gets(prefix: &str, n: usize) -> Vec<Request> {
    (0..n)
        .map(|i| Request::get(format!("{prefix}{i}")))
        .collect()
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    globex_429: u64,
    sample_429: Option<String>,
}

/// The simulated orgs' traffic, phase by phase (runs inside the client netns).
async fn traffic(
    cast: &Cast,
    api4: SocketAddr,
    api6: SocketAddr,
    say: &(dyn Fn(&str) + Sync),
) -> Result<Seen> {
    let mut seen = Seen::default();
    say(
        "acme: 40 API calls (keep-alive) + 10 over IPv6; umbrella: 15 media downloads + 5 calls; an unknown client: 12 calls",
    );
    let (items, orders, media) = (
        gets("/api/v1/items/", 40),
        gets("/api/v1/orders/", 10),
        gets("/media/photo-", 15),
    );
    let (sources, public) = (gets("/api/v1/sources/", 5), gets("/api/v1/public/", 12));
    let (a, b, c, d, e) = tokio::join!(
        http_requests(cast.acme, api4, &items, true),
        http_requests(cast.acme6, api6, &orders, true),
        http_requests(cast.umbrella, api4, &media, false),
        http_requests(cast.umbrella, api4, &sources, true),
        http_requests(cast.stranger, api4, &public, false),
    );
    for r in [a, b, c, d, e] {
        r?;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;

    say(&format!(
        "globex: 35 calls against a quota of {GLOBEX_QUOTA}: the kernel answers the excess with 429"
    ));
    for chunk in gets("/api/v1/datasource/", 35).chunks(5) {
        for r in http_requests(cast.globex, api4, chunk, true).await? {
            if r.status == 429 {
                seen.globex_429 += 1;
                if seen.sample_429.is_none() {
                    let head: String = r
                        .headers
                        .iter()
                        .map(|(k, v)| format!("  {k}: {}\n", v.trim()))
                        .collect();
                    let body = r.text();
                    seen.sample_429 = Some(format!(
                        "  HTTP/1.1 429 Too Many Requests\n{head}\n  {}",
                        body.trim_end()
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(sample) = &seen.sample_429 {
        say(&format!(
            "the first 429 globex received (X-Pad pads it to the request's length):\n{sample}"
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    say("initech: opens 5 connections at once (soft limit 3), one call on each, then closes them");
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(open_idle(cast.initech, api4).await?);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    drop(idle);
    http_requests(cast.initech, api4, &gets("/api/v1/report/", 5), false).await?;

    say("umbrella: 2 connections of garbage / TLS bytes on the API port");
    send_raw(
        cast.umbrella,
        api4,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http",
    )
    .await?;
    send_raw(cast.umbrella, api4, b"\x00\x00\x00\x00garbage\r\n\r\n").await?;
    Ok(seen)
}

fn ask_report(socket: &Path) -> Result<Report> {
    let resp = control::call(
        socket,
        &Ctl::Report {
            org: None,
            day: None,
        },
    )?;
    if !resp.ok {
        bail!("report failed: {}", resp.error.unwrap_or_default());
    }
    Ok(resp.parse()?)
}

fn spawn_daemon(exe: &Path, config: &Path) -> Result<Child> {
    let mut child = Command::new(exe)
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the daemon")?;
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                println!("  log │ {line}");
            }
        });
    }
    Ok(child)
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One comparison of the final check.
struct Verdict {
    what: String,
    limiter: u64,
    server: u64,
}

fn compare(
    report: &Report,
    cast: &Cast,
    served: &[AccessEntry],
    pushed: usize,
    seen: &Seen,
) -> Vec<Verdict> {
    let from = |ips: &[IpAddr], media: Option<bool>, garbage: bool| {
        served
            .iter()
            .filter(|e| ips.contains(&e.client))
            .filter(|e| (e.method == "GARBAGE") == garbage)
            .filter(|e| media.is_none_or(|m| e.path.starts_with("/media/") == m))
            .count() as u64
    };
    let org = |name: &str| report.orgs.iter().find(|o| o.org == name);
    let mut out = Vec::new();
    let mut check = |what: String, limiter: u64, server: u64| {
        out.push(Verdict {
            what,
            limiter,
            server,
        })
    };
    let groups: [(&str, Vec<IpAddr>); 4] = [
        ("acme", vec![cast.acme, cast.acme6]),
        ("globex", vec![cast.globex]),
        ("initech", vec![cast.initech]),
        ("umbrella", vec![cast.umbrella]),
    ];
    for (name, ips) in &groups {
        let o = org(name);
        let get = |f: fn(&OrgReport) -> u64| o.map(f).unwrap_or(u64::MAX);
        check(
            format!("{name}: API calls"),
            get(|o| o.requests),
            from(ips, Some(false), false),
        );
        check(
            format!("{name}: media downloads (exempt)"),
            get(|o| o.exempt_media_gets),
            from(ips, Some(true), false),
        );
        check(
            format!("{name}: unparsed connections"),
            get(|o| o.unparsed),
            from(ips, None, true),
        );
    }
    let get = |name: &str, f: fn(&OrgReport) -> u64| org(name).map(f).unwrap_or(u64::MAX);
    check(
        "acme: webhook pushes (exempt)".into(),
        get("acme", |o| o.exempt_pushes),
        pushed as u64,
    );
    check(
        "unknown client: API calls (unmapped)".into(),
        report.unmapped.requests,
        from(&[cast.stranger], Some(false), false),
    );
    check(
        "globex: refused (429s its client got)".into(),
        get("globex", |o| o.rejected),
        seen.globex_429,
    );
    check(
        "globex: refused (35 sent - quota)".into(),
        get("globex", |o| o.rejected),
        35 - GLOBEX_QUOTA,
    );
    check(
        "initech: peak connections".into(),
        get("initech", |o| o.peak_connections),
        5,
    );
    check(
        "initech: concurrency breaches".into(),
        get("initech", |o| o.concurrency_breaches),
        2,
    );
    check(
        "initech: connections open at the end".into(),
        get("initech", |o| o.connections),
        0,
    );
    out
}

/// Runs the demo; exits non-zero when its report disagrees with what the server saw.
pub fn run() -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo loads eBPF programs and makes network namespaces: run it as root");
    }
    let started = Instant::now();
    let _ = testbed::cleanup_stale();
    println!("== limiter demo: building a private world (2 network namespaces, a cgroup, a bpffs)");
    let tb = Testbed::new(TestbedOptions {
        name: "demo".into(),
        clients_v4: 5,
        clients_v6: 1,
    })?;
    let v4 = tb.clients_v4();
    let cast = Cast {
        acme: IpAddr::V4(v4[0]),
        acme6: IpAddr::V6(tb.clients_v6()[0]),
        globex: IpAddr::V4(v4[1]),
        initech: IpAddr::V4(v4[2]),
        umbrella: IpAddr::V4(v4[3]),
        stranger: IpAddr::V4(v4[4]),
    };
    let exe = testbed::limiter_exe()?;
    let lab = testbed::lab_exe()?;
    let access_log = tb.dir().join("api-access.log");
    let push_log = tb.dir().join("webhook-receiver.log");
    tb.spawn_in_server(testbed::serve_command(
        &lab,
        &ServeArgs {
            listen: vec![SocketAddr::from((Ipv6Addr::UNSPECIFIED, API_PORT))],
            log: access_log.clone(),
            body_bytes: 0,
            proxy_protocol: false,
        },
    ))?;
    tb.wait_listening(Side::Server, API_PORT, Duration::from_secs(10))?;
    let IpAddr::V4(acme4) = cast.acme else {
        bail!("acme has no IPv4 address")
    };
    tb.spawn_in_client(testbed::serve_command(
        &lab,
        &ServeArgs {
            listen: vec![SocketAddr::from((acme4, PUSH_PORT))],
            log: push_log.clone(),
            body_bytes: 0,
            proxy_protocol: false,
        },
    ))?;
    tb.wait_listening(Side::Client, PUSH_PORT, Duration::from_secs(10))?;
    println!(
        "== API server (tokio, epoll) on [::]:{API_PORT} in the API host's namespace; acme's webhook receiver on {acme4}:{PUSH_PORT}"
    );

    let config = tb.dir().join("limiter.toml");
    std::fs::write(&config, config_text(&tb, &cast))?;
    let socket = tb.dir().join("state").join("control.sock");
    println!("== starting `limiter run --config {}`", config.display());
    let mut daemon = spawn_daemon(&exe, &config)?;
    let result = (|| -> Result<ExitCode> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while ask_report(&socket).is_err() {
            if let Some(status) = daemon.try_wait()? {
                bail!("the daemon exited ({status}) before it was ready");
            }
            if Instant::now() > deadline {
                bail!("the daemon did not come up within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let api4 = SocketAddr::from((tb.server_v4(), API_PORT));
        let api6 = SocketAddr::from((tb.server_v6(), API_PORT));
        let done = AtomicBool::new(false);
        let say = |s: &str| println!("\n>> {s}");
        let outcome = std::thread::scope(|scope| {
            let traffic = scope.spawn(|| {
                let r = tb.in_client(|| -> Result<Seen> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(traffic(&cast, api4, api6, &say))
                });
                done.store(true, Ordering::SeqCst);
                r
            });
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(900));
                if let Ok(r) = ask_report(&socket) {
                    println!("\n-- live usage --\n{}", r.table());
                }
            }
            traffic
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the traffic thread panicked")))
        });
        let seen = outcome?;

        println!("\n>> the API platform pushes 6 webhooks to acme (outbound POSTs: not counted)");
        let status = tb
            .spawn_in_server(testbed::push_command(
                &lab,
                &PushArgs {
                    to: SocketAddr::from((acme4, PUSH_PORT)),
                    count: 6,
                    path: "/hooks/datasource-changed".into(),
                    body_bytes: 512,
                },
            ))?
            .wait()?;
        if !status.success() {
            bail!("the push sender failed");
        }
        // Closed connections settle asynchronously (the server side sees the FIN).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut report = ask_report(&socket)?;
        while report.orgs.iter().any(|o| o.connections > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            report = ask_report(&socket)?;
        }
        println!("\n== final report (limiter report)\n{}", report.table());
        println!(
            "== limiter report --json\n{}",
            serde_json::to_string_pretty(&report)?
        );
        if let Some(g) = report.orgs.iter().find(|o| o.org == "globex") {
            println!(
                "\nglobex is OUT OF QUOTA: {} calls used of {}, {} refused by the kernel with 429 (the API server never saw them)",
                g.requests, g.daily_limit, g.rejected
            );
        }

        let served = testbed::read_access_log(&access_log)?;
        let pushed = testbed::read_access_log(&push_log)?.len();
        let verdicts = compare(&report, &cast, &served, pushed, &seen);
        println!(
            "\n== checking the report against what the API server and the webhook receiver saw"
        );
        let mut bad = 0;
        for v in &verdicts {
            let ok = v.limiter == v.server;
            bad += usize::from(!ok);
            println!(
                "  {} {:<44} limiter {:>4}   server {:>4}",
                if ok { "ok " } else { "BAD" },
                v.what,
                v.limiter,
                v.server
            );
        }
        println!(
            "\n== {} of {} checks agree ({:.1} s)",
            verdicts.len() - bad,
            verdicts.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(if bad == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })();
    stop(daemon);
    tb.close()?;
    println!("== removed the namespaces, cgroup, bpffs and scratch files");
    result
}
