//! Day snapshots in `daemon.state_dir`: today's counts survive a reboot (the maps do not), and
//! past days stay reportable (`limiter report --day`).
//!
//! One JSON file per quota day, `days/<YYYY-MM-DD>.json`, written atomically: a temporary file,
//! fsync, rename, fsync of the directory.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use limiter_common::DayCounters;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a limiter day snapshot: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Everything counted on this host on one quota day. Names are borrowed when the daemon takes a
/// snapshot (from its id table) and owned when one is read back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaySnapshot<'a> {
    /// Day number (quota days since 1970-01-01).
    pub day: u64,
    /// The date the day starts on (UTC).
    pub date: String,
    /// Unix seconds when taken.
    pub taken_at: u64,
    /// Orgs with traffic that day.
    pub orgs: BTreeMap<Cow<'a, str>, DayCounters>,
    /// Orgs configured that day without any traffic, by name only: a million idle orgs made
    /// a 280 MB snapshot with their counters spelled out.
    #[serde(default)]
    pub idle: Vec<Cow<'a, str>>,
    pub unmapped: DayCounters,
    /// The day has ended and its `day_end` lines were logged. When a clock step brings the day
    /// back, it continues from these counts, and the snapshot follows them, but its `day_end`
    /// lines are not logged a second time.
    #[serde(default)]
    pub closed: bool,
}

pub fn path(state_dir: &Path, date: &str) -> PathBuf {
    state_dir.join("days").join(format!("{date}.json"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes the snapshot atomically, replacing an older one of the same day.
pub fn write(state_dir: &Path, snap: &DaySnapshot<'_>) -> Result<PathBuf, SnapshotError> {
    let target = path(state_dir, &snap.date);
    let dir = target.parent().unwrap_or(state_dir).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tmp = dir.join(format!(".{}.tmp", snap.date));
    // Written as it is encoded: a million orgs' snapshot is not held in memory twice.
    let written = std::fs::File::create(&tmp).and_then(|f| {
        let mut out = std::io::BufWriter::new(f);
        serde_json::to_writer_pretty(&mut out, snap).map_err(std::io::Error::from)?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    std::fs::rename(&tmp, &target).map_err(io(&target))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io(&dir))?;
    Ok(target)
}

/// The snapshot of `date`, if one was written.
pub fn read(state_dir: &Path, date: &str) -> Result<Option<DaySnapshot<'static>>, SnapshotError> {
    let p = path(state_dir, date);
    match std::fs::read(&p) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| SnapshotError::Parse {
                    path: p.display().to_string(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&p)(e)),
    }
}

/// Whether the snapshot of `date` says its day was closed. Reads the file without keeping it:
/// a million orgs' snapshot is not decoded for one flag.
pub fn is_closed(state_dir: &Path, date: &str) -> bool {
    #[derive(Deserialize)]
    struct Flag {
        #[serde(default)]
        closed: bool,
    }
    std::fs::File::open(path(state_dir, date))
        .ok()
        .and_then(|f| serde_json::from_reader::<_, Flag>(std::io::BufReader::new(f)).ok())
        .is_some_and(|f| f.closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_roundtrip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let mut snap = DaySnapshot {
            day: 20_785,
            date: "2026-11-28".into(),
            taken_at: 1,
            ..Default::default()
        };
        let mut d = DayCounters::for_day(20_785);
        d.requests = 7;
        d.rejected = 2;
        snap.orgs.insert("acme".into(), d);
        snap.idle.push("initech".into());
        let p = write(dir.path(), &snap).unwrap();
        assert!(p.ends_with("days/2026-11-28.json"));
        assert_eq!(read(dir.path(), "2026-11-28").unwrap(), Some(snap.clone()));
        assert!(!is_closed(dir.path(), "2026-11-28"));
        snap.closed = true;
        write(dir.path(), &snap).unwrap();
        assert!(is_closed(dir.path(), "2026-11-28"));
        assert!(!is_closed(dir.path(), "2026-11-27"));
        // A second write replaces the first; no temporary file is left behind.
        snap.taken_at = 2;
        write(dir.path(), &snap).unwrap();
        assert_eq!(read(dir.path(), "2026-11-28").unwrap().unwrap().taken_at, 2);
        let files: Vec<_> = std::fs::read_dir(dir.path().join("days"))
            .unwrap()
            .collect();
        assert_eq!(files.len(), 1);
        assert_eq!(read(dir.path(), "2026-11-27").unwrap(), None);
        std::fs::write(path(dir.path(), "2026-11-26"), "garbage").unwrap();
        let err = read(dir.path(), "2026-11-26").unwrap_err().to_string();
        assert!(err.contains("2026-11-26.json"), "{err}");
    }
}
