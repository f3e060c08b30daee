//! The answers to the control socket's requests (`limiter report`, `reset`, `reload`, `stop`,
//! and the test hook that steps the clock).

use tracing::{error, info};

use super::{Daemon, maps::KernelMaps};
use crate::{
    control::{Request, Response},
    report, snapshot,
};

impl<M: KernelMaps> Daemon<M> {
    /// Answers one request.
    pub(super) fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Report { org, day } => {
                // A step since the last tick: the report shows the clock's day.
                self.follow_clock();
                self.report(org.as_deref(), day.as_deref())
            }
            Request::Reset { org } => {
                let today = self.clock.today();
                self.reset(org.as_deref(), today)
            }
            Request::Reload => match self.reload() {
                Ok(summary) => Response::ok(summary),
                Err(e) => {
                    error!(event = "reload_failed", error = %e, "config reload failed; the old config stays in force");
                    Response::err(e.to_string())
                }
            },
            Request::Shutdown { unload } => {
                self.unload = unload;
                Response::ok(serde_json::json!({ "unload": unload }))
            }
            #[cfg(feature = "test-hooks")]
            Request::AdvanceClock { .. } if !crate::hooks::enabled() => Response::err(
                "advance-clock is a test hook: start the daemon with LIMITER_TEST_HOOKS=1",
            ),
            #[cfg(feature = "test-hooks")]
            Request::AdvanceClock { secs, kernel_only } => self.advance_clock(secs, kernel_only),
        }
    }

    /// The report of `date` (default: the day in force), of one org or all: from the kernel
    /// while it holds the day, else from the day's snapshot.
    pub(super) fn report(&self, org: Option<&str>, date: Option<&str>) -> Response {
        if let Some(o) = org
            && self.orgs.ids.id(o).is_none()
        {
            return Response::err(format!(
                "no org named {o:?} in {}",
                self.config_path.display()
            ));
        }
        let day = match date {
            None => self.days.day(),
            Some(date) => match self.kernel_day(date) {
                Some(d) => d,
                None => return self.past_report(org, date),
            },
        };
        match report::build(&self.report_inputs(day, org)) {
            Ok(r) => Response::ok(&r),
            Err(e) => Response::err(e.to_string()),
        }
    }

    /// The day of `date` if it is the day in force, or yesterday while the kernel holds it.
    fn kernel_day(&self, date: &str) -> Option<u64> {
        let today = self.days.day();
        (today.saturating_sub(1)..=today)
            .find(|d| self.clock.date(*d) == date)
            .filter(|d| *d == today || self.days.kernel_holds(&self.maps, &self.orgs.ids, *d))
    }

    /// The report of a past day, from its snapshot.
    fn past_report(&self, org: Option<&str>, date: &str) -> Response {
        match snapshot::read(self.days.state_dir(), date) {
            Ok(Some(snap)) => Response::ok(report::from_snapshot(
                &self.orgs.ids,
                &self.orgs.limits,
                &snap,
                org,
            )),
            Ok(None) => Response::err(format!("no counts kept for {date}")),
            Err(e) => Response::err(e.to_string()),
        }
    }

    /// Clears `day`'s counters of one org, or of every org and unmapped traffic.
    pub(super) fn reset(&mut self, org: Option<&str>, day: u64) -> Response {
        let Some(targets) = self.orgs.targets(org) else {
            return Response::err(format!("no org named {:?}", org.unwrap_or_default()));
        };
        let mut done = Vec::new();
        for (id, name) in targets {
            match self.maps.reset_day(id, day) {
                Ok(before) => {
                    info!(event = "reset", org = %name, requests_before = before.requests, rejected_before = before.rejected, "today's counters cleared");
                    done.push(name);
                }
                Err(e) => return Response::err(e.to_string()),
            }
        }
        Response::ok(serde_json::json!({ "reset": done }))
    }

    /// Test hook: steps the clock by `secs`, the kernel's alone with `kernel_only` (as an NTP
    /// step reaches it first).
    #[cfg(feature = "test-hooks")]
    fn advance_clock(&mut self, secs: i64, kernel_only: bool) -> Response {
        let stepped = self.clock.stepped_secs(secs);
        if let Err(e) = self.maps.write_clock(&stepped) {
            return Response::err(e.to_string());
        }
        if kernel_only {
            return Response::ok(
                serde_json::json!({ "kernel_day": stepped.date(stepped.today()) }),
            );
        }
        self.clock = stepped;
        self.tick();
        Response::ok(serde_json::json!({ "day": self.clock.date(self.days.day()) }))
    }
}
