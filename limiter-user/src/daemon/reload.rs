//! Reloads (`limiter reload`, SIGHUP): the config is read again and only the differences are
//! applied. On any error nothing changes and the old config stays in force.

use tracing::info;

use super::{Daemon, maps::KernelMaps, plan::Plan, release_freed_memory};
use crate::{config::Config, orgs::OrgIds};

/// The names in `new` and not in `old`, and those in `old` and not in `new`.
fn added_and_removed(old: &OrgIds, new: &OrgIds) -> (Vec<String>, Vec<String>) {
    let only_in = |a: &OrgIds, b: &OrgIds| -> Vec<String> {
        a.iter()
            .filter(|(_, name)| b.id(name).is_none())
            .map(|(_, name)| name.to_string())
            .collect()
    };
    (only_in(new, old), only_in(old, new))
}

impl<M: KernelMaps> Daemon<M> {
    /// Re-reads the config file and applies only the differences.
    pub(super) fn reload(&mut self) -> anyhow::Result<serde_json::Value> {
        let new_cfg = Config::load(&self.config_path)?;
        self.reload_with(new_cfg)
    }

    /// Applies `new_cfg` (read from the config file) in place of the config in force.
    fn reload_with(&mut self, new_cfg: Config) -> anyhow::Result<serde_json::Value> {
        let path = self.config_path.display().to_string();
        // What is opened, bound or scheduled at startup cannot change under a running daemon;
        // the config's types say which settings those are.
        self.settings
            .sections()
            .check_reload(&new_cfg.sections(), &self.config_path)?;
        let capacity = self.maps.cidr_capacity();
        if new_cfg.cidr_count() > capacity as usize {
            anyhow::bail!(
                "{path}: {} CIDRs do not fit the kernel's address table ({capacity}): restart the daemon to resize it",
                new_cfg.cidr_count(),
            );
        }
        let key_capacity = self.maps.key_capacity();
        if new_cfg.key_count() > key_capacity as usize {
            anyhow::bail!(
                "{path}: {} API keys do not fit the kernel's key table ({key_capacity}): restart the daemon to resize it",
                new_cfg.key_count(),
            );
        }
        let names = new_cfg.orgs.iter().map(|o| o.name.as_str());
        let ids = OrgIds::assign(names, Some(&self.orgs.ids), self.maps.org_capacity())
            .map_err(|e| anyhow::anyhow!("{path}: {e}: restart the daemon to resize the maps"))?;
        let clock = self.clock.with_day_start(*new_cfg.limits.day_start_secs);
        // The old side is what the maps hold: the daemon keeps no copy of it.
        let old = self.maps.read_applied()?;
        let mut plan = Plan::new(new_cfg, ids, &clock)?;
        let (added, removed) = added_and_removed(&self.orgs.ids, &plan.orgs.ids);
        let today = clock.today();
        for name in &added {
            if let Some(id) = plan.orgs.ids.id(name) {
                self.maps.clear_org(id)?;
                self.maps.prepare_day(id, today)?;
                self.maps.prepare_day(id, today + 1)?;
            }
        }
        plan.keep_new_secret();
        let stats = plan
            .apply_or_roll_back(&mut self.maps, &old)
            .map_err(|e| anyhow::anyhow!("{path}: applying the new config failed: {e}"))?;
        // Orgs that stay keep their ids; those whose addresses or limits differ changed.
        let changed: Vec<String> = stats
            .orgs_changed
            .iter()
            .filter_map(|&id| {
                let name = plan.orgs.ids.name(id)?;
                (self.orgs.ids.id(name) == Some(id)).then(|| name.to_string())
            })
            .collect();
        // After the apply: nothing new is attributed to a removed org from here on.
        self.log_removed(&removed);
        info!(
            event = "reload",
            added = ?added,
            removed = ?removed,
            changed = ?changed,
            ports = ?plan.settings.api.ports,
            cidrs_written = stats.cidrs_written,
            cidrs_removed = stats.cidrs_removed,
            limits_written = stats.limits_written,
            keys_written = stats.keys_written,
            keys_removed = stats.keys_removed,
            "config reloaded"
        );
        (self.settings, self.orgs) = plan.into_parts();
        self.clock = clock;
        drop(old);
        release_freed_memory();
        Ok(serde_json::json!({ "added": added, "removed": removed, "changed": changed }))
    }

    /// The last line of each removed org: its counts of the day in force.
    fn log_removed(&self, removed: &[String]) {
        for name in removed {
            if let Some(id) = self.orgs.ids.id(name)
                && let Ok((d, _)) = self.maps.usage(id, self.days.day())
            {
                info!(
                    event = "org_removed",
                    org = name.as_str(),
                    requests = d.requests,
                    rejected = d.rejected,
                    exempt_media_gets = d.exempt_media_gets,
                    exempt_pushes = d.exempt_pushes,
                    "org removed; its counts of today end here"
                );
            }
        }
    }
}
