//! Losing nothing: daemon restarts (even SIGKILL), reboots (pins gone, snapshot restored), hot
//! reloads during traffic, and reloads that fail.

use std::net::IpAddr;

use anyhow::Result;
use integration_tests::{World, cidr, gets, n, org_toml};
use limiter_common::day::{civil_from_days, days_from_civil};
use limiter_lab::testbed::{HttpConn, Request, http_requests};
use serde_json::Value;

/// Statuses of `count` GETs from `src`, one connection each.
fn statuses(w: &World, src: IpAddr, count: usize) -> Result<Vec<u16>> {
    let api = w.api4();
    let r =
        w.client(|| async move { http_requests(src, api, &gets("/api/", count), false).await })?;
    Ok(r.iter().map(|r| r.status).collect())
}

/// The kernel keeps counting and enforcing while the daemon is dead (SIGKILL), and the restarted
/// daemon picks up the pinned maps with their counts.
#[test]
fn kill_9_and_restart_lose_nothing() -> Result<()> {
    let mut w = World::new("kill9", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], "daily_requests = 20"))?;
    w.start_daemon()?;
    assert!(statuses(&w, acme, 10)?.iter().all(|s| *s == 200));
    w.kill_daemon()?;
    // No daemon: the kernel still counts, and refuses at the limit.
    let st = statuses(&w, acme, 15)?;
    assert_eq!(st.iter().filter(|s| **s == 200).count(), 10, "{st:?}");
    assert_eq!(st.iter().filter(|s| **s == 429).count(), 5, "{st:?}");
    w.start_daemon()?;
    let org = w.org("acme")?;
    assert_eq!((n(&org, "requests"), n(&org, "rejected")), (20, 5), "{org}");
    assert!(
        w.daemon_log().contains("resumed=true"),
        "{}",
        w.daemon_log()
    );
    assert_eq!(statuses(&w, acme, 2)?, [429, 429]);
    assert_eq!(w.served_from(acme)?.len(), 20);
    Ok(())
}

/// A daemon that was away over two day changes closes both days when it comes back: their totals
/// are logged (`day_end`) and snapshotted. The older day shares its slot with tomorrow, so it
/// must be closed before tomorrow's slots are prepared.
#[test]
fn days_missed_while_away_are_closed_on_restart() -> Result<()> {
    let mut w = World::new("missed", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], ""))?;
    w.start_daemon()?;
    assert!(statuses(&w, acme, 7)?.iter().all(|s| *s == 200));
    let day0 = w.report()?["day"].as_str().unwrap_or_default().to_string();
    // Killed: no shutdown snapshot; the kernel alone holds the day's counts.
    w.kill_daemon()?;
    w.daemon_env.push((
        "LIMITER_TEST_CLOCK_SHIFT_SECS".into(),
        (2 * 86_400).to_string(),
    ));
    w.start_daemon()?;
    let today = w.report()?;
    assert_ne!(today["day"], day0.as_str(), "{today}");
    assert_eq!(n(&today["orgs"][0], "requests"), 0, "{today}");
    let log = w.daemon_log();
    assert!(
        log.lines().any(|l| l.contains("day_end")
            && l.contains(&format!("day={day0}"))
            && l.contains("org=\"acme\"")
            && l.contains("requests=7")),
        "the missed day's totals are logged: {log}"
    );
    let out = w.cli(&["report", "--json", "--day", &day0])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let past: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(n(&past["orgs"][0], "requests"), 7, "{past}");
    Ok(())
}

/// A date `days` after (or before) `date` (YYYY-MM-DD).
fn date_plus(date: &str, days: i64) -> String {
    let mut parts = date.split('-').map(|p| p.parse::<i64>().unwrap_or(0));
    let (y, m, d) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    let (y, m, d) = civil_from_days(days_from_civil(y, m as u32, d as u32) + days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Steps the running daemon's clock by `days` (the offset it and the kernel share: the host's
/// clock is not touched); returns the report's day afterwards.
fn step_days(w: &World, days: i64) -> Result<String> {
    advance_clock(w, days, false)?;
    Ok(w.report()?["day"].as_str().unwrap_or_default().to_string())
}

/// `limiter debug advance-clock` by `days`; with `kernel_only`, only the kernel's clock moves, as
/// an NTP step reaches the kernel before the daemon's next tick.
fn advance_clock(w: &World, days: i64, kernel_only: bool) -> Result<()> {
    let secs = (days * 86_400).to_string();
    let mut args = vec!["debug", "advance-clock", secs.as_str()];
    if kernel_only {
        args.push("--kernel-only");
    }
    let out = w.cli(&args)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Polls the snapshot of `date` until org `org` has `(requests, rejected)` in it; fails after a
/// generous deadline with what it last held.
fn wait_snapshot(w: &World, date: &str, org: &str, want: (u64, u64)) -> Result<()> {
    let path = w.dir().join("state/days").join(format!("{date}.json"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let snap: Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let o = &snap["orgs"][org];
        if (o["requests"].as_u64(), o["rejected"].as_u64()) == (Some(want.0), Some(want.1)) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the snapshot of {date} never had {want:?} for {org}: {snap}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A clock step of days, forward or back, moves the quota day with it. Each step reaches the
/// kernel first, as an NTP step does, and the daemon after some traffic: the kernel counts and
/// refuses in the new day from zero on its own, then the daemon follows, keeps those counts and
/// reports the new day. Forward two days: a fresh quota. Back three days, to a day whose slot held
/// the later day: still counted and refused, not passed uncounted. The day the test began, when
/// the normal rollover brings it back, continues from its counts (it was used up), and its
/// `day_end` lines are not logged twice.
///
/// A step of three days gives the new day the slot of the day in force, so when the kernel sees
/// it first it starts the new day over that day's counts: the day in force keeps what its last
/// snapshot held, which the daemon, snapshotting every second here, is waited for to take.
#[test]
fn clock_steps_move_the_quota_day_both_ways() -> Result<()> {
    let limit = 3;
    let mut w = World::new("clkstep", 1, 0)?;
    w.daemon_extra = "snapshot_interval_secs = 1".into();
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let quota = format!("daily_requests = {limit}");
    w.write_config("", &org_toml("acme", &[cidr(acme)], &quota))?;
    w.start_daemon()?;
    // `limit` requests pass, then `over` are refused: each day refuses a different number, so
    // that one day's counts cannot pass for another's.
    let used_up = |over: usize| -> Vec<u16> { [vec![200; limit], vec![429; over]].concat() };
    let counts = |w: &World| -> Result<(u64, u64)> {
        let org = w.org("acme")?;
        Ok((n(&org, "requests"), n(&org, "rejected")))
    };
    let full = limit as u64;
    let day0 = w.report()?["day"].as_str().unwrap_or_default().to_string();
    assert_eq!(statuses(&w, acme, limit + 1)?, used_up(1));

    advance_clock(&w, 2, true)?;
    assert_eq!(
        statuses(&w, acme, limit + 2)?,
        used_up(2),
        "two days on, the kernel counts a new quota"
    );
    let day2 = step_days(&w, 2)?;
    assert_eq!(day2, date_plus(&day0, 2));
    let jumped = format!("day={}", date_plus(&day0, 1));
    let log = w.daemon_log();
    assert!(
        !log.lines()
            .any(|l| l.contains("day_end") && l.contains(&jumped)),
        "the day jumped over was never in force: {log}"
    );
    assert_eq!(counts(&w)?, (full, 2));

    wait_snapshot(&w, &day2, "acme", (full, 2))?;
    advance_clock(&w, -3, true)?;
    assert_eq!(
        statuses(&w, acme, limit + 3)?,
        used_up(3),
        "after the step back the kernel still counts and refuses"
    );
    let back = step_days(&w, -3)?;
    assert_eq!(back, date_plus(&day0, -1));
    assert_eq!(counts(&w)?, (full, 3));

    // The normal rollover brings back the first day, whose quota was used up.
    assert_eq!(step_days(&w, 1)?, day0);
    assert_eq!(counts(&w)?, (full, 1));
    assert_eq!(statuses(&w, acme, 1)?, [429]);
    assert_eq!(counts(&w)?, (full, 2));
    // Two rollovers on, the day left by the step back comes round again and continues too.
    step_days(&w, 1)?;
    let out = w.cli(&["report", "--json", "--day", &day0])?;
    let yesterday: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        (
            n(&yesterday["orgs"][0], "requests"),
            n(&yesterday["orgs"][0], "rejected")
        ),
        (full, 2),
        "{yesterday}"
    );
    assert_eq!(step_days(&w, 1)?, day2);
    assert_eq!(counts(&w)?, (full, 2));
    assert_eq!(statuses(&w, acme, 1)?, [429]);
    // The day the first step left has the counts of both its turns in its snapshot.
    let out = w.cli(&["report", "--json", "--day", &day0])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let past: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        (
            n(&past["orgs"][0], "requests"),
            n(&past["orgs"][0], "rejected")
        ),
        (full, 2),
        "{past}"
    );

    assert_eq!(
        w.served_from(acme)?.len(),
        3 * limit,
        "the server saw every passed request"
    );
    let log = w.daemon_log();
    let steps: Vec<&str> = log.lines().filter(|l| l.contains("clock_step")).collect();
    assert_eq!(steps.len(), 2, "{log}");
    assert!(
        steps[0].contains(&format!("from={day0}")) && steps[0].contains(&format!("to={day2}")),
        "{log}"
    );
    assert!(
        steps[1].contains(&format!("from={day2}")) && steps[1].contains(&format!("to={back}")),
        "{log}"
    );
    // Each day's lines, once, with the totals it had when it first ended.
    let day_end = |day: &str| -> Vec<&str> {
        log.lines()
            .filter(|l| {
                l.contains("day_end") && l.contains(&format!("day={day}")) && l.contains("acme")
            })
            .collect()
    };
    for (day, rejected) in [(&day0, 1), (&back, 3)] {
        let lines = day_end(day);
        assert_eq!(lines.len(), 1, "{day}: {log}");
        assert!(
            lines[0].contains(&format!("requests={limit} rejected={rejected} ")),
            "{day}: {log}"
        );
    }
    Ok(())
}

/// Thousands of orgs take the batch paths: the map writes, the counter reads and a restart's
/// read-back of ids, limits and the single-address table. After a SIGKILL restart every org has
/// its limit and counts, the restarted daemon finds nothing to rewrite, and the snapshot names
/// the idle orgs. acme comes last: its day slots are past the first batch chunk (16,384 slots,
/// three per org), so its counts are read from a later chunk.
#[test]
fn thousands_of_orgs_survive_a_restart() -> Result<()> {
    const FILLER: usize = 6000;
    let mut w = World::new("many", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let mut orgs = String::new();
    for i in 0..FILLER {
        orgs.push_str(&org_toml(
            &format!("f{i}"),
            &[format!("100.64.{}.{}/32", i / 256, i % 256)],
            &format!("daily_requests = {}", 1000 + i),
        ));
    }
    orgs.push_str(&org_toml("acme", &[cidr(acme)], "daily_requests = 20"));
    w.write_config("", &orgs)?;
    w.start_daemon()?;
    assert!(statuses(&w, acme, 5)?.iter().all(|s| *s == 200));
    w.kill_daemon()?;
    w.start_daemon()?;
    let log = w.daemon_log();
    let starts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("limiter started"))
        .collect();
    assert_eq!(starts.len(), 2, "{log}");
    assert!(
        starts[0].contains(&format!(" cidrs={} ", FILLER + 1)),
        "{}",
        starts[0]
    );
    // The second daemon read back every table as it was: not one address rewritten.
    assert!(
        starts[1].contains("resumed=true") && starts[1].contains(" cidrs=0 "),
        "{}",
        starts[1]
    );
    let st = statuses(&w, acme, 16)?;
    assert_eq!(st.iter().filter(|s| **s == 200).count(), 15, "{st:?}");
    let report = w.report()?;
    let entries = report["orgs"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries.len(), FILLER + 1);
    for e in &entries {
        let name = e["org"].as_str().unwrap_or_default();
        if name == "acme" {
            assert_eq!((n(e, "requests"), n(e, "rejected")), (20, 1), "{e}");
        } else {
            let i: u64 = name.trim_start_matches('f').parse()?;
            assert_eq!(n(e, "daily_limit"), 1000 + i, "{e}");
            assert_eq!(n(e, "requests"), 0, "{e}");
        }
    }
    w.stop_daemon()?;
    let day = report["day"].as_str().unwrap_or_default().to_string();
    let snap: Value = serde_json::from_str(&std::fs::read_to_string(
        w.tb.dir().join("state/days").join(format!("{day}.json")),
    )?)?;
    assert_eq!(
        snap["idle"].as_array().map(Vec::len),
        Some(FILLER),
        "idle orgs by name"
    );
    assert_eq!(snap["orgs"]["acme"]["requests"], 20);
    Ok(())
}

/// A reboot loses the maps; today's counts come back from the snapshot the daemon wrote. Past
/// days stay reportable from their snapshots.
#[test]
fn reboot_restores_today_from_the_snapshot() -> Result<()> {
    let mut w = World::new("reboot", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    w.write_config("", &org_toml("acme", &[cidr(acme)], "daily_requests = 10"))?;
    w.start_daemon()?;
    assert!(statuses(&w, acme, 7)?.iter().all(|s| *s == 200));
    w.stop_daemon()?;
    // What a reboot does to the kernel side: every pinned map and link is gone.
    let out = w.cli(&["unload"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pins = std::fs::read_dir(w.tb.bpffs().join("limiter"))?.count();
    assert_eq!(pins, 0, "unload removed the pins");
    w.start_daemon()?;
    let org = w.org("acme")?;
    assert_eq!(n(&org, "requests"), 7, "restored from the snapshot: {org}");
    assert!(
        w.daemon_log().contains("restored_orgs=1"),
        "{}",
        w.daemon_log()
    );
    let st = statuses(&w, acme, 5)?;
    assert_eq!(
        st,
        [200, 200, 200, 429, 429],
        "the quota continues from the restored count"
    );

    // Two days later the kernel no longer holds that day; its snapshot answers.
    let day1 = w.report()?["day"].as_str().unwrap_or_default().to_string();
    for _ in 0..2 {
        assert!(
            w.cli(&["debug", "advance-clock", "86400"])?
                .status
                .success()
        );
    }
    let out = w.cli(&["report", "--json", "--day", &day1])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let past: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(past["day"], day1.as_str());
    assert_eq!(
        (
            n(&past["orgs"][0], "requests"),
            n(&past["orgs"][0], "rejected")
        ),
        (10, 2),
        "{past}"
    );
    let out = w.cli(&["report", "--json", "--day", "2001-01-01"])?;
    assert!(!out.status.success());
    Ok(())
}

/// Reloads during traffic: added, removed and changed orgs, no count reset, no unmapped window
/// for orgs that stay; the counts add up exactly to what the server saw.
#[test]
fn reload_during_traffic_keeps_counts_exact() -> Result<()> {
    let mut w = World::new("reload", 3, 0)?;
    let [a, b, c] = [0, 1, 2].map(|i| IpAddr::V4(w.tb.clients_v4()[i]));
    let before = [org_toml("a", &[cidr(a)], ""), org_toml("b", &[cidr(b)], "")].concat();
    let after = [
        org_toml("a", &[cidr(a)], "daily_requests = 5000"),
        org_toml("c", &[cidr(c)], ""),
    ]
    .concat();
    w.write_config("", &before)?;
    w.start_daemon()?;
    let api = w.api4();
    let (to_main, reload_now) = std::sync::mpsc::channel::<()>();
    let (reloaded, wait_reload) = std::sync::mpsc::channel::<()>();
    let reload_out = std::thread::scope(|s| -> Result<std::process::Output> {
        // b: one connection per request, throughout.
        let wb = &w;
        let background = s.spawn(move || {
            wb.client(|| async move {
                for i in 0..30 {
                    let r = http_requests(b, api, &gets(&format!("/api/b{i}/"), 10), false).await?;
                    assert!(r.iter().all(|r| r.status == 200));
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Ok(())
            })
        });
        // a and c: keep-alive connections opened before the reload and used after it.
        let wf = &w;
        let foreground = s.spawn(move || {
            wf.client(|| async move {
                let mut ca = HttpConn::connect(Some(a), api).await?;
                let mut cc = HttpConn::connect(Some(c), api).await?;
                for round in 0..2 {
                    for i in 0..100 {
                        let path = format!("/api/r{round}/{i}");
                        assert_eq!(
                            ca.send(&Request::get(path.as_str()), true).await?.status,
                            200
                        );
                        assert_eq!(
                            cc.send(&Request::get(path.as_str()), true).await?.status,
                            200
                        );
                    }
                    if round == 0 {
                        let _ = to_main.send(());
                        let _ = wait_reload.recv_timeout(std::time::Duration::from_secs(20));
                    }
                }
                Ok(())
            })
        });
        let _ = reload_now.recv_timeout(std::time::Duration::from_secs(20));
        w.write_config("", &after)?;
        let out = w.cli(&["reload"])?;
        let _ = reloaded.send(());
        foreground
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))??;
        background
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))??;
        Ok(out)
    })?;
    let text = String::from_utf8_lossy(&reload_out.stdout);
    assert!(
        reload_out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&reload_out.stderr)
    );
    // `limiter reload` prints one line per list: added c, removed b, a's limit changed.
    let listed = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        [listed("added"), listed("removed"), listed("changed")],
        ["c", "b", "a"],
        "{text}"
    );
    let r = w.report()?;
    let org = |name: &str| {
        r["orgs"]
            .as_array()
            .and_then(|o| o.iter().find(|x| x["org"] == name).cloned())
    };
    let a_org = org("a").expect("a stays");
    assert!(org("b").is_none(), "b was removed: {r}");
    let c_org = org("c").expect("c was added");
    // a was mapped throughout: exact. b's and c's requests split between their org and
    // unmapped around the reload, and add up exactly.
    assert_eq!(n(&a_org, "requests"), w.served_from(a)?.len() as u64);
    assert_eq!(n(&a_org, "requests"), 200);
    assert_eq!(n(&a_org, "daily_limit"), 5000, "a's limit changed");
    let served_bc = (w.served_from(b)?.len() + w.served_from(c)?.len()) as u64;
    assert_eq!(served_bc, 500);
    // b's count up to its removal is in the reload's log line.
    let log = w.daemon_log();
    let b_removed: u64 = log
        .lines()
        .find(|l| l.contains("org_removed") && l.contains("org=\"b\""))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("requests="))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no org_removed line for b: {log}"));
    assert_eq!(
        n(&c_org, "requests"),
        100,
        "c's keep-alive connection counts for c from its first request after the reload: {c_org}"
    );
    assert_eq!(
        b_removed + n(&c_org, "requests") + n(&r["unmapped"], "requests"),
        served_bc,
        "b before removal + c after addition + unmapped = what the server saw"
    );
    Ok(())
}

/// A reload with a broken config changes nothing and says where the problem is.
#[test]
fn a_bad_reload_changes_nothing() -> Result<()> {
    let mut w = World::new("badreload", 1, 0)?;
    let acme = IpAddr::V4(w.tb.clients_v4()[0]);
    let good = org_toml("acme", &[cidr(acme)], "daily_requests = 50");
    w.write_config("", &good)?;
    w.start_daemon()?;
    assert!(statuses(&w, acme, 5)?.iter().all(|s| *s == 200));
    let cfg = std::fs::read_to_string(&w.config)?;
    std::fs::write(
        &w.config,
        cfg.replace("daily_requests = 50", "daily_requests = \"many\""),
    )?;
    let out = w.cli(&["reload"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("limiter.toml:") && err.contains("daily_requests"),
        "{err}"
    );
    assert!(w.daemon_log().contains("reload_failed"));
    let org = w.org("acme")?;
    assert_eq!(
        (n(&org, "requests"), n(&org, "daily_limit")),
        (5, 50),
        "old config in force: {org}"
    );
    assert!(statuses(&w, acme, 3)?.iter().all(|s| *s == 200));
    assert_eq!(n(&w.org("acme")?, "requests"), 8);
    Ok(())
}

/// Orgs listed in `api.orgs_file` are counted like `[[orgs]]` ones, and a reload reads the file
/// again.
#[test]
fn orgs_file_is_counted_and_reread_on_reload() -> Result<()> {
    let mut w = World::new("orgsfile", 2, 0)?;
    let clients = w.tb.clients_v4();
    let (acme, beta) = (IpAddr::V4(clients[0]), IpAddr::V4(clients[1]));
    let orgs = w.dir().join("orgs");
    std::fs::write(&orgs, format!("acme {} daily_requests=40\n", cidr(acme)))?;
    w.write_config_with(
        &format!("orgs_file = {:?}", orgs.display().to_string()),
        "",
        "",
    )?;
    w.start_daemon()?;
    assert!(statuses(&w, acme, 3)?.iter().all(|s| *s == 200));
    let org = w.org("acme")?;
    assert_eq!(
        (n(&org, "requests"), n(&org, "daily_limit")),
        (3, 40),
        "{org}"
    );
    std::fs::write(
        &orgs,
        format!(
            "# reloaded\nacme {} daily_requests=50\nbeta {}\n",
            cidr(acme),
            cidr(beta)
        ),
    )?;
    let out = w.cli(&["reload"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(statuses(&w, beta, 2)?.iter().all(|s| *s == 200));
    let org = w.org("acme")?;
    assert_eq!(
        (n(&org, "requests"), n(&org, "daily_limit")),
        (3, 50),
        "{org}"
    );
    assert_eq!(n(&w.org("beta")?, "requests"), 2);
    Ok(())
}
