//! Loads the embedded kernel object, attaches its programs and hands out typed maps.

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{Map, MapError},
    programs::{
        CgroupAttachMode, ProgramError, SkMsg, SkSkb, SockOps, Xdp, XdpMode, links::FdLink,
    },
};
use limiter_common::{
    layout::{
        API_KEYS, API_MSG_NEXT, API_PORTS, API_SOCKS, CONFIG, EVENTS, FAULTS, Handle, MAPS,
        MEDIA_MATCH, MapSpec, ORG_BY_ADDR, ORG_BY_HOST, ORG_CONNS, ORG_DAYS, ORG_LIMITS,
        ORG_REMOTE, PUSH_NEXT, PUSH_SOCKS, Pin, REFUSE, SOCK_GEN, TRACE_ON, TRUSTED_PROXIES,
        VERDICT_NEXT,
    },
    programs,
};

use crate::{bpf, pins};
use thiserror::Error;

/// The kernel object, built by build.rs from limiter-ebpf and embedded so `limiter` is one file.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LIMITER_EBPF_OBJ"));

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("attaching the SYN gate (XDP) to interface {iface}: {source}")]
    Interface {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("entering network namespace {path}: {source}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("updating pinned link {path}: {source}")]
    Link {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pins(#[from] pins::PinError),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The loaded programs (attached while this lives) and the maps the daemon works with, each
/// typed as the layout declares it.
pub struct Kernel {
    pub config: Handle<CONFIG>,
    pub ports: Handle<API_PORTS>,
    pub org_by_addr: Handle<ORG_BY_ADDR>,
    /// Single addresses; see `HOST_PREFIX_LEN`.
    pub org_by_host: Handle<ORG_BY_HOST>,
    /// API key digests → org ids.
    pub api_keys: Handle<API_KEYS>,
    pub trusted_proxies: Handle<TRUSTED_PROXIES>,
    pub org_limits: Handle<ORG_LIMITS>,
    pub org_conns: Handle<ORG_CONNS>,
    pub org_days: Handle<ORG_DAYS>,
    pub org_remote: Handle<ORG_REMOTE>,
    pub faults: Handle<FAULTS>,
    /// The media prefixes as the verdict compares them (see `stream::StreamRules`).
    pub media_match: Handle<MEDIA_MATCH>,
    /// Taken by the event reader task.
    pub events: Option<Handle<EVENTS>>,
    /// The tracer's pid (`limiter trace` reads TRACE itself, from its pin).
    pub trace_on: Handle<TRACE_ON>,
    /// Pinned maps of an earlier daemon were reused: the kernel's counts are current.
    pub resumed: bool,
    /// This build's pin directory (`<pin_dir>/<layout>`).
    pub pin_dir: PathBuf,
    /// The shared socket tables' directory.
    pub sock_dir: PathBuf,
    /// `daemon.pin_dir`, where other layouts' directories are found.
    pin_root: PathBuf,
    pub capacity: pins::Capacity,
    /// The org epoch a first start of these maps writes into CONFIG (a restart keeps the one
    /// the maps have): it must differ from every other epoch in the shared socket state.
    pub org_epoch: u32,
    /// This start's programs (unique per start); see `attach`.
    generation: u64,
    _refuse: Handle<REFUSE>,
    api_socks: Handle<API_SOCKS>,
    push_socks: Handle<PUSH_SOCKS>,
    sock_gen: Handle<SOCK_GEN>,
    verdict_next: Handle<VERDICT_NEXT>,
    push_next: Handle<PUSH_NEXT>,
    api_msg_next: Handle<API_MSG_NEXT>,
    /// Owns the programs and their links; dropping it detaches everything.
    _ebpf: Ebpf,
}

/// Takes map `M` out of the object, as the layout types it.
fn take<M: MapSpec>(ebpf: &mut Ebpf) -> Result<Handle<M>, LoadError>
where
    Handle<M>: TryFrom<Map, Error = MapError>,
{
    let name = M::DEF.name;
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    Handle::<M>::try_from(map).map_err(|source| LoadError::Map { name, source })
}

/// A failed write to map `M`.
fn map_error<M: MapSpec>(source: MapError) -> LoadError {
    LoadError::Map {
        name: M::DEF.name,
        source,
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?;
    p.try_into()
        .map_err(|source| LoadError::Program { name, source })
}

/// Points the link pinned at `path` at `prog` (an upgrade or restart swapping programs in place).
fn update_pinned_link(path: &Path, prog: &aya::programs::ProgramFd) -> Result<(), LoadError> {
    bpf::obj_get(path)
        .and_then(|l| bpf::link_update(&l, &prog.as_fd().as_raw_fd()))
        .map_err(|source| LoadError::Link {
            path: path.display().to_string(),
            source,
        })
}

/// Pins a freshly made link so it outlives this process.
fn pin_link<L>(link: L, path: &Path) -> Result<(), LoadError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let fd = FdLink::try_from(link).map_err(|e| LoadError::Link {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    fd.pin(path).map_err(|e| LoadError::Link {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(())
}

/// Attaches the sk_msg program `name` to the socket map `socks` (the map owns the attachment
/// from then on) and puts it in slot 0 of `next`, where the programs of earlier starts hand
/// their sockets' messages to it.
fn attach_msg<M: MapSpec>(
    ebpf: &mut Ebpf,
    name: &'static str,
    socks: &aya::maps::sock::SockMapFd,
    next: &mut aya::maps::ProgramArray<aya::maps::MapData>,
) -> Result<(), LoadError> {
    let prog = program::<SkMsg>(ebpf, name)?;
    let id = prog.attach(socks).map_err(prog_err(name))?;
    std::mem::forget(prog.take_link(id).map_err(prog_err(name))?);
    let fd = prog.fd().map_err(prog_err(name))?;
    next.set(0, fd, 0).map_err(map_error::<M>)
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
}

/// How much the verifier says when a program is refused: `LIMITER_VERIFIER_LOG=stats` keeps
/// only its statistics and verdict (a full log of a large program fills any buffer and hides
/// the verdict at its end), `verbose` adds the state at every instruction.
fn verifier_log_level() -> VerifierLogLevel {
    match std::env::var("LIMITER_VERIFIER_LOG").as_deref() {
        Ok("stats") => VerifierLogLevel::STATS,
        Ok("verbose") => VerifierLogLevel::VERBOSE | VerifierLogLevel::STATS,
        _ => VerifierLogLevel::default(),
    }
}

/// A number no other daemon start used: the time in nanoseconds.
fn new_generation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        .max(1)
}

/// Loads the object into the kernel without attaching anything (used by `limiter check` too).
pub fn load_object() -> Result<Ebpf, LoadError> {
    Ok(EbpfLoader::new().load(EBPF_OBJECT)?)
}

/// Loads every program into the kernel (the verifier runs) without attaching.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    program::<SockOps>(ebpf, programs::SOCK_OPS)?
        .load()
        .map_err(prog_err(programs::SOCK_OPS))?;
    program::<SkSkb>(ebpf, programs::VERDICT)?
        .load()
        .map_err(prog_err(programs::VERDICT))?;
    program::<SkSkb>(ebpf, programs::REFUSE)?
        .load()
        .map_err(prog_err(programs::REFUSE))?;
    program::<SkMsg>(ebpf, programs::PUSH_MSG)?
        .load()
        .map_err(prog_err(programs::PUSH_MSG))?;
    program::<SkMsg>(ebpf, programs::API_MSG)?
        .load()
        .map_err(prog_err(programs::API_MSG))?;
    program::<Xdp>(ebpf, programs::SYN_GATE)?
        .load()
        .map_err(prog_err(programs::SYN_GATE))?;
    Ok(())
}

impl Kernel {
    /// Loads the programs with their maps pinned under `pin_dir` (nothing attached yet: the
    /// daemon writes the tables first, then calls [`Kernel::attach`]).
    ///
    /// Pinned maps that exist are reused, so a restarted or upgraded daemon continues with the
    /// kernel's counts. The socket tables are shared by every layout; the programs of another
    /// layout keep running until `attach` swaps them out.
    pub fn load(pin_dir: &Path, cap: pins::Capacity) -> Result<Self, LoadError> {
        let dirs = pins::prepare(pin_dir, cap)?;
        let dir = dirs.layout;
        let resumed = pins::check_existing(&dir, &pins::layout_maps(cap))?;
        pins::check_existing(&dirs.socks, &pins::socket_maps())?;
        let generation = new_generation();
        let mut loader = EbpfLoader::new();
        loader.verifier_log_level(verifier_log_level());
        let slot_mask = pins::sock_slot_mask();
        let sock_capacity = pins::sock_capacity();
        loader.override_global(limiter_common::SOCK_SLOT_MASK_GLOBAL, &slot_mask, true);
        loader.override_global(limiter_common::SOCK_CAPACITY_GLOBAL, &sock_capacity, true);
        loader.override_global(limiter_common::GENERATION_GLOBAL, &generation, true);
        // Every map sized and pinned as the layout says (the org and address tables follow the
        // config's counts; the socket tables are the same for every layout).
        let sizes = cap.sizes();
        for def in MAPS {
            let pin_dir = match def.pin {
                Pin::Layout => &dir,
                Pin::Sockets => &dirs.socks,
            };
            loader.map_max_entries(def.name, def.max_entries(sizes));
            loader.map_pin_path(def.name, pin_dir.join(def.name));
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        load_programs(&mut ebpf)?;

        // The 429 writer is tail-called by the verdict, never attached.
        let mut refuse = take::<REFUSE>(&mut ebpf)?;
        let fd = program::<SkSkb>(&mut ebpf, programs::REFUSE)?
            .fd()
            .map_err(prog_err(programs::REFUSE))?;
        refuse.set(0, fd, 0).map_err(map_error::<REFUSE>)?;
        Ok(Kernel {
            config: take::<CONFIG>(&mut ebpf)?,
            ports: take::<API_PORTS>(&mut ebpf)?,
            org_by_addr: take::<ORG_BY_ADDR>(&mut ebpf)?,
            org_by_host: take::<ORG_BY_HOST>(&mut ebpf)?,
            api_keys: take::<API_KEYS>(&mut ebpf)?,
            trusted_proxies: take::<TRUSTED_PROXIES>(&mut ebpf)?,
            org_limits: take::<ORG_LIMITS>(&mut ebpf)?,
            org_conns: take::<ORG_CONNS>(&mut ebpf)?,
            org_days: take::<ORG_DAYS>(&mut ebpf)?,
            org_remote: take::<ORG_REMOTE>(&mut ebpf)?,
            faults: take::<FAULTS>(&mut ebpf)?,
            media_match: take::<MEDIA_MATCH>(&mut ebpf)?,
            events: Some(take::<EVENTS>(&mut ebpf)?),
            trace_on: take::<TRACE_ON>(&mut ebpf)?,
            resumed,
            capacity: cap,
            pin_dir: dir,
            sock_dir: dirs.socks,
            pin_root: pin_dir.to_path_buf(),
            org_epoch: (generation ^ (generation >> 32)) as u32 | 1,
            generation,
            _refuse: refuse,
            api_socks: take::<API_SOCKS>(&mut ebpf)?,
            push_socks: take::<PUSH_SOCKS>(&mut ebpf)?,
            sock_gen: take::<SOCK_GEN>(&mut ebpf)?,
            verdict_next: take::<VERDICT_NEXT>(&mut ebpf)?,
            push_next: take::<PUSH_NEXT>(&mut ebpf)?,
            api_msg_next: take::<API_MSG_NEXT>(&mut ebpf)?,
            _ebpf: ebpf,
        })
    }

    /// Attaches the programs once the daemon has written the tables and marked CONFIG ready, so
    /// that no connection meets a program without its config: the verdict to API_SOCKS, the push
    /// counter to PUSH_SOCKS, then sock_ops to `cgroup` (which puts sockets into API_SOCKS), and
    /// the XDP SYN gate to `interfaces` (in `netns` when given). Last, the pins of other layouts
    /// are removed.
    ///
    /// Attachments that exist are swapped to the new programs in place (link update, sockmap
    /// program replace, a link of another layout taken over), so there is no moment without
    /// programs. Sockets already in the socket maps keep the programs they entered with; those
    /// hand their traffic to these (`SOCK_GEN`, `VERDICT_NEXT`, `PUSH_NEXT`). Everything stays
    /// attached after the daemon exits; `limiter unload` removes it.
    pub fn attach(
        &mut self,
        cgroup: &Path,
        interfaces: &[String],
        netns: Option<&Path>,
    ) -> Result<(), LoadError> {
        // Attaching to a sockmap replaces what a previous daemon attached; the attachments are
        // owned by the (pinned) maps from then on, not by this process.
        let ebpf = &mut self._ebpf;
        let verdict = program::<SkSkb>(ebpf, programs::VERDICT)?;
        let id = verdict
            .attach(self.api_socks.fd())
            .map_err(prog_err(programs::VERDICT))?;
        std::mem::forget(verdict.take_link(id).map_err(prog_err(programs::VERDICT))?);
        let fd = verdict.fd().map_err(prog_err(programs::VERDICT))?;
        self.verdict_next
            .set(0, fd, 0)
            .map_err(map_error::<VERDICT_NEXT>)?;
        attach_msg::<PUSH_NEXT>(
            ebpf,
            programs::PUSH_MSG,
            self.push_socks.fd(),
            &mut self.push_next,
        )?;
        // Before sock_ops: every socket it puts into API_SOCKS enters with the egress program.
        attach_msg::<API_MSG_NEXT>(
            ebpf,
            programs::API_MSG,
            self.api_socks.fd(),
            &mut self.api_msg_next,
        )?;
        // From here the programs of earlier starts hand their sockets' traffic to these.
        self.sock_gen
            .set(0, self.generation, 0)
            .map_err(map_error::<SOCK_GEN>)?;

        pins::adopt_links(&self.pin_root, &self.pin_dir)?;
        let sock_ops = program::<SockOps>(ebpf, programs::SOCK_OPS)?;
        let link = self.pin_dir.join("link_sock_ops");
        // A pinned link on another cgroup (api.cgroup changed): drop it, attach anew below.
        if link.exists() {
            let wanted = std::fs::metadata(cgroup)
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .map_err(|source| LoadError::Cgroup {
                    path: cgroup.display().to_string(),
                    source,
                })?;
            let current = bpf::obj_get(&link).and_then(|l| bpf::link_cgroup_id(&l));
            if current.is_ok_and(|id| id != wanted) {
                std::fs::remove_file(&link).map_err(|source| LoadError::Link {
                    path: link.display().to_string(),
                    source,
                })?;
            }
        }
        if link.exists() {
            let fd = sock_ops.fd().map_err(prog_err(programs::SOCK_OPS))?;
            update_pinned_link(&link, fd)?;
        } else {
            let cg = File::open(cgroup).map_err(|source| LoadError::Cgroup {
                path: cgroup.display().to_string(),
                source,
            })?;
            // Through a bpf_link the attachment coexists with other programs on this cgroup and
            // its parents; the link API wants no mode flags.
            let id = sock_ops
                .attach(cg, CgroupAttachMode::Single)
                .map_err(prog_err(programs::SOCK_OPS))?;
            let owned = sock_ops
                .take_link(id)
                .map_err(prog_err(programs::SOCK_OPS))?;
            pin_link(owned, &link)?;
        }
        crate::hooks::pause("LIMITER_TEST_PAUSE_AFTER_ATTACH");
        self.attach_syn_gate(interfaces, netns)?;
        // Other layouts' programs are swapped out by now; their maps go (counts carry over
        // through the day snapshot), the shared socket tables stay.
        pins::unload_others(&self.pin_root, &[&self.pin_dir, &self.sock_dir])?;
        Ok(())
    }

    /// Attaches the XDP SYN gate (`concurrency_mode = "delay"`) to `interfaces`, looked up in the
    /// network namespace `netns` when given (the API may live in another namespace than the
    /// daemon). Native mode where the driver has it, generic otherwise.
    fn attach_syn_gate(
        &mut self,
        interfaces: &[String],
        netns: Option<&Path>,
    ) -> Result<(), LoadError> {
        // Gates on interfaces no longer configured come off.
        if let Ok(entries) = std::fs::read_dir(&self.pin_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(iface) = name.strip_prefix("link_xdp_")
                    && !interfaces.iter().any(|i| i == iface)
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if interfaces.is_empty() {
            return Ok(());
        }
        let ns = netns
            .map(|p| {
                File::open(p).map_err(|source| LoadError::Netns {
                    path: p.display().to_string(),
                    source,
                })
            })
            .transpose()?;
        let dir = self.pin_dir.clone();
        let prog = program::<Xdp>(&mut self._ebpf, programs::SYN_GATE)?;
        // Interface names and the attachment resolve in the calling thread's network namespace,
        // so a scoped thread enters it and the daemon's own threads stay where they are.
        std::thread::scope(|s| {
            s.spawn(|| -> Result<(), LoadError> {
                if let Some(ns) = &ns {
                    // SAFETY: setns on a valid namespace fd, affecting only this thread.
                    if unsafe {
                        libc::setns(std::os::fd::AsRawFd::as_raw_fd(ns), libc::CLONE_NEWNET)
                    } != 0
                    {
                        return Err(LoadError::Netns {
                            path: netns.map(|p| p.display().to_string()).unwrap_or_default(),
                            source: std::io::Error::last_os_error(),
                        });
                    }
                }
                for iface in interfaces {
                    let link = dir.join(format!("link_xdp_{iface}"));
                    if link.exists() {
                        let fd = prog.fd().map_err(prog_err(programs::SYN_GATE))?;
                        update_pinned_link(&link, fd)?;
                        continue;
                    }
                    let id = prog
                        .attach(iface, XdpMode::Default)
                        .or_else(|_| prog.attach(iface, XdpMode::Skb))
                        .map_err(|source| LoadError::Interface {
                            iface: iface.clone(),
                            source,
                        })?;
                    let owned = prog.take_link(id).map_err(prog_err(programs::SYN_GATE))?;
                    pin_link(owned, &link)?;
                }
                Ok(())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(LoadError::Netns {
                    path: "(attach thread panicked)".into(),
                    source: std::io::Error::other("panic"),
                })
            })
        })
    }

    /// Capacity of the org maps (org ids must stay below it).
    pub fn org_capacity(&self) -> u32 {
        self.org_conns.len()
    }
}

#[cfg(test)]
mod tests {
    use aya_obj::generated::bpf_map_type;
    use limiter_common::layout::{MAPS, MapKind, Sizes};

    use super::EBPF_OBJECT;

    fn map_type(kind: MapKind) -> u32 {
        (match kind {
            MapKind::Array => bpf_map_type::BPF_MAP_TYPE_ARRAY,
            MapKind::HashMap | MapKind::LazyHashMap => bpf_map_type::BPF_MAP_TYPE_HASH,
            MapKind::LpmTrie => bpf_map_type::BPF_MAP_TYPE_LPM_TRIE,
            MapKind::PerCpuArray => bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
            MapKind::ProgramArray => bpf_map_type::BPF_MAP_TYPE_PROG_ARRAY,
            MapKind::RingBuf => bpf_map_type::BPF_MAP_TYPE_RINGBUF,
            MapKind::SkStorage => bpf_map_type::BPF_MAP_TYPE_SK_STORAGE,
            MapKind::SockHash => bpf_map_type::BPF_MAP_TYPE_SOCKHASH,
        }) as u32
    }

    #[test]
    fn the_object_holds_the_maps_the_layout_declares() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        // Sections of globals (.rodata, .bss, .data) are maps too; the layout has the rest.
        let mut in_object: Vec<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|name| !name.starts_with('.'))
            .collect();
        in_object.sort_unstable();
        let mut declared: Vec<&str> = MAPS.iter().map(|def| def.name).collect();
        declared.sort_unstable();
        assert_eq!(in_object, declared);
        for def in MAPS {
            let map = &object.maps[def.name];
            assert_eq!(
                (
                    map.map_type(),
                    map.key_size(),
                    map.value_size(),
                    map.max_entries()
                ),
                (
                    map_type(def.kind),
                    def.key_size,
                    def.value_size,
                    def.max_entries(Sizes::BUILT_IN)
                ),
                "{}",
                def.name
            );
            // Hash entries allocated as inserted exactly where the layout says so (LPM tries
            // always are).
            if matches!(def.kind, MapKind::HashMap | MapKind::LazyHashMap) {
                let lazy = map.map_flags() & aya_obj::generated::BPF_F_NO_PREALLOC != 0;
                assert_eq!(lazy, def.kind == MapKind::LazyHashMap, "{}", def.name);
            }
        }
    }
}
