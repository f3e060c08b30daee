//! `limiter trace`: the kernel's verdict on each request, streamed while the tracer runs; the
//! flag that turns the records on is off again once it exits, or once the daemon sees it died.

use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use integration_tests::{World, cidr, org_toml, wait_for};
use limiter_lab::testbed::{Request, http_requests, send_raw};
use limiter_user::{config::Config, pins::Capacity, trace};
use serde_json::Value;

/// The pid in TRACE_ON of this world's maps.
fn tracer_flag(w: &World) -> Result<u64> {
    let cfg = Config::load(&w.config)?;
    Ok(trace::current_tracer(
        &cfg.daemon.pin_dir,
        Capacity::for_config(&cfg),
    )?)
}

/// Starts `limiter trace --json` and waits until it says it is tracing.
fn start_tracer(w: &World) -> Result<Child> {
    let mut child = Command::new(&w.exe)
        .args(["trace", "--json", "--config"])
        .arg(&w.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting limiter trace")?;
    let stderr = child.stderr.take().context("the tracer's stderr")?;
    let mut stderr = BufReader::new(stderr);
    let mut first = String::new();
    stderr.read_line(&mut first)?;
    if !first.starts_with("tracing") {
        let _ = child.kill();
        bail!("limiter trace did not start: {first}");
    }
    // The rest of its stderr, read so that the tracer can still write there.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    Ok(child)
}

/// The first traced line whose path is `path`.
fn traced<'a>(lines: &'a [Value], path: &str) -> Result<&'a Value> {
    lines
        .iter()
        .find(|l| l["path"] == path)
        .with_context(|| format!("no trace line for {path} in {lines:#?}"))
}

#[test]
fn each_request_is_traced_with_its_org_and_outcome() -> Result<()> {
    let mut w = World::new("trace", 2, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let stranger = IpAddr::V4(w.tb.clients_v4()[1]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], "daily_requests = 2"))?;
    w.start_daemon()?;
    assert_eq!(tracer_flag(&w)?, 0, "nobody traces yet");

    let tracer = start_tracer(&w)?;
    assert_eq!(tracer_flag(&w)?, u64::from(tracer.id()));
    let api = w.api4();
    w.client(|| async move {
        let reqs = [
            Request::get("/api/one"),
            Request::post("/api/two", b"{}".to_vec()),
            Request::get("/media/cat.png"),
            Request::get("/api/three"),
        ];
        let r = http_requests(acme, api, &reqs, true).await?;
        let status: Vec<u16> = r.iter().map(|r| r.status).collect();
        assert_eq!(status, [200, 200, 200, 429]);
        send_raw(stranger, api, b"\x00\x01\x02 hello, not http\r\n\r\n").await?;
        // Two requests in one write: each gets a line of its own.
        send_raw(
            stranger,
            api,
            b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await?;
        Ok(())
    })?;
    // The verdict wrote each record before its request went on; the tracer prints what it
    // holds before it exits.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGTERM) };
    let out = tracer.wait_with_output()?;
    assert!(out.status.success(), "limiter trace: {out:?}");
    let lines: Vec<Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;

    let one = traced(&lines, "/api/one")?;
    assert_eq!(
        (&one["org"], &one["via"], &one["method"], &one["outcome"]),
        (
            &"acme".into(),
            &"address".into(),
            &"GET".into(),
            &"counted".into()
        ),
        "{one}"
    );
    assert_eq!(one["counted"], 1);
    let two = traced(&lines, "/api/two")?;
    assert_eq!(
        (&two["method"], &two["outcome"]),
        (&"POST".into(), &"counted".into())
    );
    let media = traced(&lines, "/media/cat.png")?;
    assert_eq!(
        (&media["org"], &media["outcome"], &media["media"]),
        (&"acme".into(), &"exempt".into(), &1.into()),
        "{media}"
    );
    let over = traced(&lines, "/api/three")?;
    assert_eq!(
        (&over["org"], &over["outcome"], &over["reason"]),
        (&"acme".into(), &"refused".into(), &"daily".into()),
        "{over}"
    );
    let garbage = lines
        .iter()
        .find(|l| l["outcome"] == "unparsed")
        .with_context(|| format!("no unparsed line in {lines:#?}"))?;
    assert_eq!(
        (&garbage["org"], &garbage["reason"], &garbage["method"]),
        (&"-".into(), &"not_http".into(), &Value::Null),
        "{garbage}"
    );
    let (p1, p2) = (traced(&lines, "/p1")?, traced(&lines, "/p2")?);
    for p in [p1, p2] {
        assert_eq!(
            (&p["org"], &p["method"], &p["outcome"]),
            (&"-".into(), &"GET".into(), &"counted".into()),
            "{p}"
        );
    }
    // Arrived in one chunk (the usual case on loopback): one decision, a line per request.
    if p1["requests"] == 2 {
        assert_eq!((&p1["request"], &p2["request"]), (&1.into(), &2.into()));
        assert_eq!((&p2["requests"], &p2["counted"]), (&2.into(), &2.into()));
    } else {
        // Two chunks: a line each, each its own first request.
        for p in [p1, p2] {
            assert_eq!(
                (&p["request"], &p["requests"]),
                (&1.into(), &1.into()),
                "{p}"
            );
        }
    }
    assert_eq!(tracer_flag(&w)?, 0, "the tracer turned tracing off on exit");
    assert!(
        !w.daemon_log().contains("the tracer is gone"),
        "the tracer cleared its flag itself, not the daemon"
    );
    Ok(())
}

#[test]
fn a_dead_tracer_s_flag_is_cleared_by_the_daemon() -> Result<()> {
    let mut w = World::new("trace-dead", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], ""))?;
    w.start_daemon()?;
    let mut tracer = start_tracer(&w)?;
    let pid = u64::from(tracer.id());
    assert_eq!(tracer_flag(&w)?, pid);
    // A second tracer is refused while the first lives.
    let second = w.cli(&["trace"])?;
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains(&format!("pid {pid}")),
        "{second:?}"
    );
    tracer.kill()?;
    tracer.wait()?;
    wait_for(
        "the daemon clears a dead tracer's flag",
        Duration::from_secs(10),
        || {
            let now = tracer_flag(&w)?;
            Ok(if now == 0 {
                Ok(())
            } else {
                Err(format!("flag {now}"))
            })
        },
    )?;
    w.wait_log("tracing turned off")?;
    Ok(())
}
