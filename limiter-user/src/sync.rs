//! One quota across many API hosts (`[cluster]`), shared through Redis or Valkey.
//!
//! Every `sync_interval_ms` each host writes its own *absolute* count of today per org into a
//! hash (`HSET limiter:<date>:<org> <host> <count>`, expiring after two days) and reads the other
//! hosts' counts back; the daemon writes their sum into ORG_REMOTE, and the kernel refuses when its
//! own count plus that sum reaches the limit. The request path never waits for Redis.
//!
//! Absolute counts rather than INCRBY deltas: a lost reply, a retry, or a Redis restart without
//! persistence can neither lose nor double a count — the next sync simply rewrites it.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

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

/// Sum of the other hosts' counts in a count hash.
pub fn sum_others(fields: &HashMap<String, u64>, host: &str) -> u64 {
    fields
        .iter()
        .filter(|(h, _)| h.as_str() != host)
        .map(|(_, v)| *v)
        .sum()
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
        .sum()
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
        let counts: HashMap<String, u64> = redis::from_redis_value(counts)?;
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

/// The sync task: takes this host's counts, answers with the platform's. A failure is reported
/// and retried with the next batch; since counts are absolute nothing waits to be resent.
pub async fn run(
    cluster: Cluster,
    mut batches: mpsc::Receiver<Local>,
    results: mpsc::Sender<Result<Platform, String>>,
) {
    let client = match redis::Client::open(cluster.redis.as_str()) {
        Ok(c) => c,
        Err(e) => {
            let _ = results
                .send(Err(format!("cluster.redis {}: {e}", cluster.redis)))
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
                    let _ = results.send(Err(format!("{}: {e}", cluster.redis))).await;
                    continue;
                }
                Err(_) => {
                    let _ = results
                        .send(Err(format!("{}: connect timed out", cluster.redis)))
                        .await;
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
                Err(format!("{}: {e}", cluster.redis))
            }
            Err(_) => {
                con = None;
                Err(format!("{}: timed out", cluster.redis))
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
