//! Day snapshots in `daemon.state_dir`: today's counts survive a reboot (the maps do not), and
//! past days stay reportable (`limiter report --day`).
//!
//! One JSON file per quota day, `days/<YYYY-MM-DD>.json`, written atomically: a temporary file,
//! fsync, rename, fsync of the directory. The files hold every org's usage: they are 0600 in a
//! 0700 directory.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fs::{DirBuilder, OpenOptions, Permissions},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
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
    #[error("{0:?} is not a date: expected YYYY-MM-DD")]
    BadDate(String),
}

/// Checks that `date` is a calendar date written `YYYY-MM-DD`, and nothing else: it becomes a
/// file name, so `/` or `..` must never get through.
pub fn check_date(date: &str) -> Result<(), SnapshotError> {
    let bad = || SnapshotError::BadDate(date.chars().take(64).collect());
    let b = date.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let (Some(year), Some(month), Some(day)) = (digits(0..4), digits(5..7), digits(8..10)) else {
        return Err(bad());
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if day == 0 || day > days_in_month {
        return Err(bad());
    }
    Ok(())
}

/// Creates `state_dir` and its `days` directory as 0700, and makes them 0700 when they exist
/// with wider modes (an older version, or a hand-made directory).
pub fn prepare_dir(state_dir: &Path) -> Result<(), SnapshotError> {
    let days = state_dir.join("days");
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&days)
        .map_err(io(&days))?;
    for dir in [state_dir, days.as_path()] {
        std::fs::set_permissions(dir, Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    Ok(())
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
    check_date(&snap.date)?;
    let target = path(state_dir, &snap.date);
    let dir = target.parent().unwrap_or(state_dir).to_path_buf();
    prepare_dir(state_dir)?;
    let tmp = dir.join(format!(".{}.tmp", snap.date));
    // A temporary file left by a crash is ours to replace; anything put there (a symlink, say)
    // is removed, not followed.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&tmp)(e)),
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io(&tmp))?;
    // Written as it is encoded: a million orgs' snapshot is not held in memory twice.
    let written = (|| {
        let mut out = std::io::BufWriter::new(file);
        serde_json::to_writer_pretty(&mut out, snap).map_err(std::io::Error::from)?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    })()
    .map_err(io(&tmp));
    // Test hook: the temporary file is complete, the day's file not replaced yet.
    crate::hooks::pause("LIMITER_TEST_PAUSE_SNAPSHOT_RENAME");
    let written = written.and_then(|()| std::fs::rename(&tmp, &target).map_err(io(&target)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io(&dir))?;
    Ok(target)
}

/// The snapshot of `date`, if one was written.
pub fn read(state_dir: &Path, date: &str) -> Result<Option<DaySnapshot<'static>>, SnapshotError> {
    check_date(date)?;
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
        d.by_api_key = 5;
        d.by_forwarded = 4;
        snap.orgs.insert("acme".into(), d);
        snap.idle.push("initech".into());
        snap.unmapped.unknown_keys = 3;
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

    #[test]
    fn only_dates_become_file_names() {
        for good in ["2026-11-28", "2024-02-29", "2000-02-29", "1999-12-31"] {
            assert!(check_date(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "2026-11-2",
            "2026-13-01",
            "2026-00-10",
            "2026-11-31",
            "2023-02-29",
            "1900-02-29",
            "../../etc/x",
            "2026/11/28",
            "2026-11-28/",
            "+026-11-28",
            "2026-1a-28",
            "２026-11-28",
        ] {
            let e = check_date(bad).unwrap_err().to_string();
            assert!(e.contains("YYYY-MM-DD"), "{bad}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let e = read(dir.path(), "../days/x").unwrap_err().to_string();
        assert!(e.contains("not a date"), "{e}");
    }

    #[test]
    fn files_are_private_and_the_directory_is_fixed() {
        use std::os::unix::fs::{PermissionsExt as _, symlink};
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("days")).unwrap();
        for d in [&state, &state.join("days")] {
            std::fs::set_permissions(d, Permissions::from_mode(0o755)).unwrap();
        }
        let snap = DaySnapshot {
            day: 20_785,
            date: "2026-11-28".into(),
            ..Default::default()
        };
        let p = write(&state, &snap).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join("days")), 0o700);
        // A symlink where the temporary file goes is removed, never written through.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        symlink(&victim, state.join("days/.2026-11-28.tmp")).unwrap();
        write(&state, &snap).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(read(&state, "2026-11-28").unwrap(), Some(snap.clone()));
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let snap = DaySnapshot {
            day: 20_785,
            date: "2026-11-28".into(),
            ..Default::default()
        };
        // The target is a non-empty directory: the rename fails after the data was written.
        std::fs::create_dir_all(path(dir.path(), "2026-11-28").join("x")).unwrap();
        assert!(write(dir.path(), &snap).is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("days"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("2026-11-28.json")]);
    }
}
