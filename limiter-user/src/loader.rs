//! Loads the embedded kernel object, attaches its programs and hands out typed maps.

use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, ProgramArray, RingBuf, SockHash},
    programs::{CgroupAttachMode, ProgramError, SkMsg, SkSkb, SockOps, Xdp, XdpMode},
};
use limiter_common::{AddrKey, Config, DayCounters, OrgLimits, names, programs};
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
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The loaded programs (attached while this lives) and the maps the daemon works with.
pub struct Kernel {
    pub config: Array<MapData, Config>,
    pub ports: HashMap<MapData, u16, u8>,
    pub org_by_addr: LpmTrie<MapData, AddrKey, u32>,
    pub org_limits: Array<MapData, OrgLimits>,
    pub org_conns: Array<MapData, i64>,
    pub org_days: Array<MapData, DayCounters>,
    pub faults: Array<MapData, u64>,
    /// Taken by the event reader task.
    pub events: Option<RingBuf<MapData>>,
    _refuse: ProgramArray<MapData>,
    _api_socks: SockHash<MapData, u64>,
    _push_socks: SockHash<MapData, u64>,
    /// Owns the programs and their links; dropping it detaches everything.
    _ebpf: Ebpf,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
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

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
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
    program::<Xdp>(ebpf, programs::SYN_GATE)?
        .load()
        .map_err(prog_err(programs::SYN_GATE))?;
    Ok(())
}

impl Kernel {
    /// Loads the programs and attaches them: sock_ops to `cgroup`, the verdict to API_SOCKS and
    /// the push counter to PUSH_SOCKS. Nothing is counted until the daemon marks CONFIG ready.
    pub fn load(cgroup: &Path) -> Result<Self, LoadError> {
        let mut ebpf = load_object()?;
        load_programs(&mut ebpf)?;
        // The 429 writer is tail-called by the verdict, never attached.
        let mut refuse: ProgramArray<MapData> = take(&mut ebpf, names::REFUSE)?;
        let fd = program::<SkSkb>(&mut ebpf, programs::REFUSE)?
            .fd()
            .map_err(prog_err(programs::REFUSE))?;
        refuse.set(0, fd, 0).map_err(|source| LoadError::Map {
            name: names::REFUSE,
            source,
        })?;
        let api_socks: SockHash<MapData, u64> = take(&mut ebpf, names::API_SOCKS)?;
        let push_socks: SockHash<MapData, u64> = take(&mut ebpf, names::PUSH_SOCKS)?;
        program::<SkSkb>(&mut ebpf, programs::VERDICT)?
            .attach(api_socks.fd())
            .map_err(prog_err(programs::VERDICT))?;
        program::<SkMsg>(&mut ebpf, programs::PUSH_MSG)?
            .attach(push_socks.fd())
            .map_err(prog_err(programs::PUSH_MSG))?;
        let kernel = Kernel {
            config: take(&mut ebpf, names::CONFIG)?,
            ports: take(&mut ebpf, names::API_PORTS)?,
            org_by_addr: take(&mut ebpf, names::ORG_BY_ADDR)?,
            org_limits: take(&mut ebpf, names::ORG_LIMITS)?,
            org_conns: take(&mut ebpf, names::ORG_CONNS)?,
            org_days: take(&mut ebpf, names::ORG_DAYS)?,
            faults: take(&mut ebpf, names::FAULTS)?,
            events: Some(take(&mut ebpf, names::EVENTS)?),
            _refuse: refuse,
            _api_socks: api_socks,
            _push_socks: push_socks,
            _ebpf: ebpf,
        };
        let mut kernel = kernel;
        let cg = File::open(cgroup).map_err(|source| LoadError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        // Through a bpf_link (kernel >= 5.7) the attachment always coexists with other programs
        // on this cgroup and its parents; the link API wants no mode flags.
        program::<SockOps>(&mut kernel._ebpf, programs::SOCK_OPS)?
            .attach(cg, CgroupAttachMode::Single)
            .map_err(prog_err(programs::SOCK_OPS))?;
        Ok(kernel)
    }

    /// Attaches the XDP SYN gate (`concurrency_mode = "delay"`) to `interfaces`, looked up in the
    /// network namespace `netns` when given (the API may live in another namespace than the
    /// daemon). Native mode where the driver has it, generic otherwise.
    pub fn attach_syn_gate(
        &mut self,
        interfaces: &[String],
        netns: Option<&Path>,
    ) -> Result<(), LoadError> {
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
                    prog.attach(iface, XdpMode::Default)
                        .or_else(|_| prog.attach(iface, XdpMode::Skb))
                        .map_err(|source| LoadError::Interface {
                            iface: iface.clone(),
                            source,
                        })?;
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
