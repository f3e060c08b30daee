//! One quota across many API hosts (`[cluster]`), shared through Redis or Valkey.
//!
//! Every `sync_interval_ms` each host writes its own *absolute* count of today per org into a
//! hash (`HSET limiter:count:<date>:<org> <host> <count>`, expiring after two days) and reads the
//! other hosts' counts back; the daemon writes their sum into ORG_REMOTE, and the kernel refuses
//! when its own count plus that sum reaches the limit. The request path never waits for Redis.
//!
//! Absolute counts rather than INCRBY deltas: a lost reply, a retry, or a Redis restart without
//! persistence can neither lose nor double a count — the next sync simply rewrites it.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use tracing::warn;

use crate::config::Cluster;

/// Keys expire two days after their last write.
const KEY_TTL_SECS: u64 = 2 * 86_400;
/// A host's connection count older than this is ignored (the host is gone).
const CONNS_FRESH_SECS: u64 = 10;
/// No Redis operation may take longer than this.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// This host's counts of today, sent every interval.
#[derive(Debug, Clone, Default)]
pub struct Local {
    pub date: String,
    /// (org, requests used today, connections open now).
    pub orgs: Vec<(String, u64, u64)>,
}

/// What the other hosts report, per org.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Platform {
    pub date: String,
    /// Requests counted by the other hosts today.
    pub others: HashMap<String, u64>,
    /// Connections open on all hosts (this one included).
    pub connections: HashMap<String, u64>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// Key spaces no org name can collide across: `count:` and `conns:` end with the org name, the
// active set with the (digits-only) date.
fn count_key(date: &str, org: &str) -> String {
    format!("limiter:count:{date}:{org}")
}

fn active_key(date: &str) -> String {
    format!("limiter:active:{date}")
}

fn conns_key(org: &str) -> String {
    format!("limiter:conns:{org}")
}

/// `url` with its password (`user:pass@`, `:pass@`, or a `pass=`/`password=` query parameter)
/// replaced by `***`, for log lines and error messages. Works on malformed URLs too: the one
/// that fails to parse is the one most likely to be printed.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // The userinfo ends at the last `@` before the path; a password may itself contain `@`.
    let authority_end = rest
        .rfind('@')
        .map(|at| at + rest[at..].find(['/', '?', '#']).unwrap_or(rest.len() - at))
        .unwrap_or_else(|| rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let (authority, tail) = rest.split_at(authority_end);
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            out.push('@');
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    let (path, query) = match tail.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (tail, None),
    };
    out.push_str(path);
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k == "pass" || k == "password" => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

/// `text` (an error from the Redis client, say) with `url` and its password redacted wherever
/// they appear.
pub fn redact_in(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    // A password of a few characters would redact half the message; such a password is weak
    // anyway, and the URL itself is already replaced above.
    if let Some(pass) = password(url).filter(|p| p.len() >= 4) {
        out = out.replace(pass, "***");
    }
    out
}

/// The password in a Redis URL, if any.
fn password(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    if let Some((userinfo, _)) = rest.rsplit_once('@')
        && let Some((_, pass)) = userinfo.split_once(':')
    {
        return Some(pass);
    }
    let (_, query) = rest.split_once('?')?;
    query.split('&').find_map(|kv| match kv.split_once('=') {
        Some(("pass" | "password", v)) => Some(v),
        _ => None,
    })
}

/// Sum of the other hosts' counts in a count hash (saturating: a corrupt field must not wrap
/// the total into a small number that lets an org through).
pub fn sum_others(fields: &HashMap<String, u64>, host: &str) -> u64 {
    fields
        .iter()
        .filter(|(h, _)| h.as_str() != host)
        .fold(0u64, |sum, (_, v)| sum.saturating_add(*v))
}

/// Sum of the fresh `"<conns>:<unix secs>"` entries of a connection hash.
pub fn sum_fresh_conns(fields: &HashMap<String, String>, now: u64) -> u64 {
    fields
        .values()
        .filter_map(|v| {
            let (c, ts) = v.split_once(':')?;
            let (c, ts) = (c.parse::<u64>().ok()?, ts.parse::<u64>().ok()?);
            (now.saturating_sub(ts) <= CONNS_FRESH_SECS).then_some(c)
        })
        .fold(0u64, u64::saturating_add)
}

/// The integer fields of a count hash. A field that is not one (written by hand, or by
/// something else sharing the Redis) is returned apart, to be logged and skipped: it must not
/// stop the sync of every other org.
pub fn parse_counts(
    fields: HashMap<String, String>,
) -> (HashMap<String, u64>, Vec<(String, String)>) {
    let mut counts = HashMap::with_capacity(fields.len());
    let mut bad = Vec::new();
    for (host, value) in fields {
        match value.trim().parse::<u64>() {
            Ok(n) => {
                counts.insert(host, n);
            }
            Err(_) => bad.push((host, value)),
        }
    }
    (counts, bad)
}

/// What this host last wrote, so each sync sends only changes (plus a full rewrite now and
/// then, and after every reconnect, in case Redis lost its data).
#[derive(Default)]
struct Sent {
    date: String,
    counts: HashMap<String, u64>,
    conns: HashMap<String, u64>,
    full_at: Option<std::time::Instant>,
}

/// How often everything is rewritten even when unchanged.
const FULL_REWRITE_EVERY: Duration = Duration::from_secs(10);

async fn exchange(
    con: &mut ConnectionManager,
    host: &str,
    local: &Local,
    sent: &mut Sent,
) -> redis::RedisResult<Platform> {
    let now = now_secs();
    if sent.date != local.date {
        *sent = Sent {
            date: local.date.clone(),
            ..Sent::default()
        };
    }
    let full = sent
        .full_at
        .is_none_or(|t| t.elapsed() >= FULL_REWRITE_EVERY);
    let mut write = redis::pipe();
    let active = active_key(&local.date);
    let mut counts = Vec::new();
    let mut conns_now = Vec::new();
    for (org, requests, conns) in &local.orgs {
        let last = sent.counts.get(org).copied();
        // Counts go up from 0, or back to 0 after a reset; orgs never used are skipped.
        if (*requests > 0 || last.is_some()) && (full || last != Some(*requests)) {
            let key = count_key(&local.date, org);
            write.hset(&key, host, *requests).ignore();
            write.expire(&key, KEY_TTL_SECS as i64).ignore();
            write.sadd(&active, org).ignore();
            counts.push((org, *requests));
        }
        // Open connections are refreshed while non-zero (readers ignore entries older than
        // 10 s), and written once more when they drop to 0.
        if *conns > 0 || sent.conns.get(org).is_some_and(|c| *c > 0) {
            let ck = conns_key(org);
            write.hset(&ck, host, format!("{conns}:{now}")).ignore();
            write.expire(&ck, 300).ignore();
            conns_now.push((org, *conns));
        }
    }
    write.expire(&active, KEY_TTL_SECS as i64).ignore();
    write.smembers(&active);
    let (orgs,): (Vec<String>,) = write.query_async(con).await?;
    for (org, n) in counts {
        sent.counts.insert(org.clone(), n);
    }
    for (org, n) in conns_now {
        sent.conns.insert(org.clone(), n);
    }
    if full {
        sent.full_at = Some(std::time::Instant::now());
    }

    let mut read = redis::pipe();
    for org in &orgs {
        read.hgetall(count_key(&local.date, org));
        read.hgetall(conns_key(org));
    }
    let replies: Vec<redis::Value> = read.query_async(con).await?;
    let mut platform = Platform {
        date: local.date.clone(),
        ..Platform::default()
    };
    for (org, pair) in orgs.iter().zip(replies.chunks(2)) {
        let [counts, conns] = pair else { continue };
        let (counts, bad) = parse_counts(redis::from_redis_value(counts)?);
        for (field, value) in bad {
            warn!(
                event = "cluster",
                key = %count_key(&local.date, org),
                field = %field,
                value = %value.chars().take(64).collect::<String>(),
                "a shared count is not an integer; skipped"
            );
        }
        let conns: HashMap<String, String> = redis::from_redis_value(conns)?;
        platform
            .others
            .insert(org.clone(), sum_others(&counts, host));
        platform
            .connections
            .insert(org.clone(), sum_fresh_conns(&conns, now));
    }
    Ok(platform)
}

/// This host's own counts of `date` as it last wrote them to Redis (its field of every active
/// org's hash), for a start whose day snapshot is missing or damaged. Blocking, bounded by
/// [`OP_TIMEOUT`] per step: it runs once, before the kernel counts anything.
pub fn own_counts(cluster: &Cluster, date: &str) -> Result<Vec<(String, u64)>, String> {
    let fail = |e: &dyn std::fmt::Display| {
        redact_in(
            &format!("{}: {e}", redact_url(&cluster.redis)),
            &cluster.redis,
        )
    };
    let client = redis::Client::open(cluster.redis.as_str()).map_err(|e| fail(&e))?;
    let mut con = client
        .get_connection_with_timeout(OP_TIMEOUT)
        .map_err(|e| fail(&e))?;
    con.set_read_timeout(Some(OP_TIMEOUT))
        .and_then(|()| con.set_write_timeout(Some(OP_TIMEOUT)))
        .map_err(|e| fail(&e))?;
    let orgs: Vec<String> = redis::cmd("SMEMBERS")
        .arg(active_key(date))
        .query(&mut con)
        .map_err(|e| fail(&e))?;
    let mut read = redis::pipe();
    for org in &orgs {
        read.hget(count_key(date, org), &cluster.host_id);
    }
    let values: Vec<Option<String>> = read.query(&mut con).map_err(|e| fail(&e))?;
    let mut out = Vec::new();
    for (org, value) in orgs.into_iter().zip(values) {
        let Some(value) = value else { continue };
        match value.trim().parse::<u64>() {
            Ok(n) => out.push((org, n)),
            Err(_) => warn!(
                event = "cluster",
                key = %count_key(date, &org),
                field = %cluster.host_id,
                value = %value.chars().take(64).collect::<String>(),
                "this host's shared count is not an integer; not restored"
            ),
        }
    }
    Ok(out)
}

/// The sync task: takes this host's counts, answers with the platform's. A failure is reported
/// and retried with the next batch; since counts are absolute nothing waits to be resent.
pub async fn run(
    cluster: Cluster,
    mut batches: mpsc::Receiver<Local>,
    results: mpsc::Sender<Result<Platform, String>>,
) {
    // Every message names the server without its password.
    let url = redact_url(&cluster.redis);
    let fail = |e: &dyn std::fmt::Display| redact_in(&format!("{url}: {e}"), &cluster.redis);
    let client = match redis::Client::open(cluster.redis.as_str()) {
        Ok(c) => c,
        Err(e) => {
            let _ = results
                .send(Err(format!("cluster.redis {}", fail(&e))))
                .await;
            return;
        }
    };
    let mut con: Option<ConnectionManager> = None;
    let mut sent = Sent::default();
    while let Some(local) = batches.recv().await {
        if con.is_none() {
            match tokio::time::timeout(OP_TIMEOUT, client.get_connection_manager()).await {
                Ok(Ok(c)) => {
                    // Redis may have restarted empty: rewrite everything.
                    sent.full_at = None;
                    con = Some(c);
                }
                Ok(Err(e)) => {
                    let _ = results.send(Err(fail(&e))).await;
                    continue;
                }
                Err(_) => {
                    let _ = results.send(Err(fail(&"connect timed out"))).await;
                    continue;
                }
            }
        }
        let Some(c) = con.as_mut() else { continue };
        let answer = match tokio::time::timeout(
            OP_TIMEOUT,
            exchange(c, &cluster.host_id, &local, &mut sent),
        )
        .await
        {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => {
                // Start over with a fresh connection next time.
                con = None;
                Err(fail(&e))
            }
            Err(_) => {
                con = None;
                Err(fail(&"timed out"))
            }
        };
        if results.send(answer).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn others_exclude_this_host() {
        let m: HashMap<String, u64> = [("a".into(), 5), ("b".into(), 7), ("me".into(), 100)].into();
        assert_eq!(sum_others(&m, "me"), 12);
        assert_eq!(sum_others(&HashMap::new(), "me"), 0);
    }

    #[test]
    fn sums_saturate() {
        let m: HashMap<String, u64> = [("a".into(), u64::MAX), ("b".into(), 7)].into();
        assert_eq!(sum_others(&m, "me"), u64::MAX);
        let c: HashMap<String, String> = [
            ("a".into(), format!("{}:1000", u64::MAX)),
            ("b".into(), "2:1000".into()),
        ]
        .into();
        assert_eq!(sum_fresh_conns(&c, 1000), u64::MAX);
    }

    #[test]
    fn a_non_integer_count_is_set_apart() {
        let fields: HashMap<String, String> = [
            ("a".into(), "5".into()),
            ("b".into(), "lots".into()),
            ("c".into(), "-1".into()),
            ("d".into(), "7".into()),
        ]
        .into();
        let (counts, mut bad) = parse_counts(fields);
        bad.sort();
        assert_eq!(counts, [("a".into(), 5), ("d".into(), 7)].into());
        assert_eq!(
            bad,
            [("b".into(), "lots".into()), ("c".into(), "-1".into())]
        );
        assert_eq!(sum_others(&counts, "me"), 12);
    }

    #[test]
    fn passwords_are_redacted() {
        for (url, want) in [
            ("redis://10.0.0.5:6379", "redis://10.0.0.5:6379"),
            (
                "redis://:s3cret@10.0.0.5:6379/0",
                "redis://:***@10.0.0.5:6379/0",
            ),
            (
                "rediss://app:s3cret@redis.example:6380",
                "rediss://app:***@redis.example:6380",
            ),
            ("redis://app@redis.example", "redis://app@redis.example"),
            ("valkey://u:p@ss:w@rd@host:1/2", "valkey://u:***@host:1/2"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "redis://u:s3cret@host/0?password=s3cret",
                "redis://u:***@host/0?password=***",
            ),
            ("u:s3cret@host", "u:***@host"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
            assert!(!redact_url(url).contains("s3cret"), "{url}");
        }
        let url = "redis://app:s3cret@host:1";
        let msg = redact_in(&format!("{url}: AUTH s3cret refused"), url);
        assert_eq!(msg, "redis://app:***@host:1: AUTH *** refused");
    }

    #[test]
    fn stale_connection_entries_are_ignored() {
        let m: HashMap<String, String> = [
            ("a".into(), "3:1000".into()),
            ("b".into(), "2:995".into()),
            ("c".into(), "9:900".into()),
            ("d".into(), "garbage".into()),
        ]
        .into();
        assert_eq!(sum_fresh_conns(&m, 1000), 5);
    }
}
