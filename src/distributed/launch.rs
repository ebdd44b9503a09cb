//! Where this process sits in a multi-process run, read as the ecosystem's launchers
//! write it: torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`, else Slurm's `SLURM_PROCID`, `SLURM_NTASKS`,
//! `SLURM_LOCALID`, tasks per node and the first host of `SLURM_JOB_NODELIST`.

/// This process's place in a run of several ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    /// Host and port of rank 0's store.
    pub master_addr: String,
    pub master_port: u16,
    /// "torchrun" or "slurm": which variables said so.
    pub launcher: &'static str,
    /// The store at MASTER_ADDR:MASTER_PORT is torchrun's agent's (every rank a client),
    /// and this is its `restart`-th start of the workers.
    pub agent_store: bool,
    pub restart: usize,
}

/// torchrun's default store port.
pub const DEFAULT_PORT: u16 = 29500;

impl Launch {
    /// The launch the environment describes (`get` reads a variable), or None for a
    /// single process: no launcher variables, or a world of one.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>, String> {
        let number = |name: &str| -> Result<Option<usize>, String> {
            match get(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| format!("{name}={v:?} is not a whole number")),
            }
        };
        let given_port = match get("MASTER_PORT") {
            Some(p) => Some(p.trim().parse::<u16>().map_err(|_| format!("MASTER_PORT={p:?} is not a port"))?),
            None => None,
        };
        let launch = if let (Some(rank), Some(world)) = (number("RANK")?, number("WORLD_SIZE")?) {
            Launch {
                rank,
                world_size: world,
                local_rank: number("LOCAL_RANK")?.unwrap_or(rank),
                local_world_size: number("LOCAL_WORLD_SIZE")?.unwrap_or(world),
                master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                master_port: given_port.unwrap_or(DEFAULT_PORT),
                launcher: "torchrun",
                agent_store: get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")),
                restart: number("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0),
            }
        } else if let (Some(rank), Some(world)) = (number("SLURM_PROCID")?, number("SLURM_NTASKS")?) {
            let nodes = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST"));
            let master_addr = match (get("MASTER_ADDR"), nodes) {
                (Some(a), _) => a,
                (None, Some(list)) => first_host(&list)?,
                (None, None) => return Err("SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST".into()),
            };
            let port = match (given_port, number("SLURM_JOB_ID")?) {
                (Some(p), _) => p,
                // Jobs sharing a node get different ports.
                (None, Some(job)) => 20000 + (job % 10000) as u16,
                (None, None) => DEFAULT_PORT,
            };
            let per_node = match number("SLURM_NTASKS_PER_NODE") {
                Ok(Some(n)) => n,
                _ => get("SLURM_TASKS_PER_NODE").and_then(|t| leading_number(&t)).unwrap_or(1),
            };
            Launch {
                rank,
                world_size: world,
                local_rank: number("SLURM_LOCALID")?.unwrap_or(0),
                local_world_size: per_node,
                master_addr,
                master_port: port,
                launcher: "slurm",
                agent_store: false,
                restart: 0,
            }
        } else {
            return Ok(None);
        };
        if launch.world_size == 0 || launch.rank >= launch.world_size {
            return Err(format!("rank {} of a world of {} ({})", launch.rank, launch.world_size, launch.launcher));
        }
        if launch.local_world_size == 0 || launch.local_rank >= launch.local_world_size {
            return Err(format!(
                "local rank {} of {} on this node ({})",
                launch.local_rank, launch.local_world_size, launch.launcher
            ));
        }
        Ok((launch.world_size > 1).then_some(launch))
    }
}

impl Launch {
    /// The GPUs of this rank. `--devices` names one rank's GPUs (`cuda:0,cuda:1`: a pair;
    /// `cuda:0`: both siblings on one). Local rank l takes the l-th such set when the node
    /// shows `visible` GPUs enough for every local rank, as torchrun's `cuda:LOCAL_RANK`
    /// does for one GPU per rank; the names stay as given when the launcher `bound` each rank
    /// to its own GPUs (Slurm's per-task CUDA_VISIBLE_DEVICES), or when ranks `may_share`
    /// GPUs (Gloo; NCCL refuses two ranks on one GPU). CPU devices stay as they are.
    pub fn rank_devices(
        &self,
        devices: &[tch::Device],
        visible: usize,
        bound: bool,
        may_share: bool,
    ) -> Result<Vec<tch::Device>, String> {
        let per_rank =
            devices.iter().filter_map(|d| if let tch::Device::Cuda(i) = d { Some(i + 1) } else { None }).max();
        let Some(per_rank) = per_rank else { return Ok(devices.to_vec()) };
        let offset = if visible >= per_rank * self.local_world_size {
            per_rank * self.local_rank
        } else if (bound || may_share) && visible >= per_rank {
            0
        } else {
            return Err(format!(
                "{} local ranks with {per_rank} GPU(s) each need {} GPUs on this node, it shows {visible}: start \
                 fewer ranks per node, name fewer GPUs per rank (--devices cuda:0 puts both siblings on one), \
                 give each rank its own GPUs (Slurm: --gpus-per-task), or let ranks share GPUs through Gloo \
                 (CPS3D_DIST_BACKEND=gloo)",
                self.local_world_size,
                per_rank * self.local_world_size
            ));
        };
        Ok(devices
            .iter()
            .map(|d| if let tch::Device::Cuda(i) = d { tch::Device::Cuda(i + offset) } else { *d })
            .collect())
    }
}

/// `host:port` moved to port + `local_rank`, so that the ranks of one node each listen on
/// their own port (port 0 stays 0: any free port).
pub fn rank_port(addr: &str, local_rank: usize) -> Result<String, String> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| "expected HOST:PORT".to_string())?;
    let port: u16 = port.parse().map_err(|_| format!("{port:?} is not a port"))?;
    if port == 0 {
        return Ok(addr.to_string());
    }
    let moved = port as usize + local_rank;
    let moved = u16::try_from(moved).map_err(|_| format!("port {port} + local rank {local_rank} is past 65535"))?;
    Ok(format!("{host}:{moved}"))
}

fn leading_number(s: &str) -> Option<usize> {
    let digits: String = s.trim().chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The first host of a Slurm node list: `gpu[03-05,9],cpu1` → `gpu03`.
pub fn first_host(list: &str) -> Result<String, String> {
    let bad = || format!("SLURM_JOB_NODELIST {list:?} is not a Slurm host list");
    let list = list.trim();
    let (prefix, rest) = match list.find(['[', ',']) {
        None => return if list.is_empty() { Err(bad()) } else { Ok(list.to_string()) },
        Some(i) => list.split_at(i),
    };
    if prefix.is_empty() {
        return Err(bad());
    }
    if rest.starts_with(',') {
        return Ok(prefix.to_string());
    }
    let inside = rest[1..].split(']').next().ok_or_else(bad)?;
    let first = inside.split([',', '-']).next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
    Ok(format!("{prefix}{first}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_variables_are_read_first() {
        let e = env(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29511"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
        ]);
        let l = Launch::from_env(e).unwrap().unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank, l.local_world_size), (5, 8, 1, 4));
        assert_eq!((l.master_addr.as_str(), l.master_port, l.launcher), ("node7", 29511, "torchrun"));
        assert_eq!((l.agent_store, l.restart), (false, 0));
        let e = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ]);
        let l = Launch::from_env(e).unwrap().unwrap();
        assert_eq!((l.agent_store, l.restart, l.master_port), (true, 2, DEFAULT_PORT));
    }

    #[test]
    fn slurm_variables_give_the_first_node_and_a_port_from_the_job() {
        let e = env(&[
            ("SLURM_PROCID", "6"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "2"),
            ("SLURM_TASKS_PER_NODE", "4(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[03-04]"),
            ("SLURM_JOB_ID", "123456"),
        ]);
        let l = Launch::from_env(e).unwrap().unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank, l.local_world_size), (6, 8, 2, 4));
        assert_eq!((l.master_addr.as_str(), l.master_port, l.launcher), ("gpu03", 23456, "slurm"));
    }

    #[test]
    fn no_launcher_or_a_world_of_one_is_a_single_process_and_nonsense_is_refused() {
        assert_eq!(Launch::from_env(env(&[])).unwrap(), None);
        assert_eq!(
            Launch::from_env(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_JOB_NODELIST", "a")]))
                .unwrap(),
            None
        );
        assert!(Launch::from_env(env(&[("RANK", "2"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .contains("rank 2 of a world of 2"));
        assert!(Launch::from_env(env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err().contains("RANK"));
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")]);
        assert!(Launch::from_env(e).unwrap_err().contains("MASTER_PORT"));
    }

    #[test]
    fn first_hosts_of_slurm_node_lists() {
        for (list, host) in [
            ("node17", "node17"),
            ("a1,b2", "a1"),
            ("gpu[03-05,9],cpu1", "gpu03"),
            ("n[7,2]", "n7"),
            ("rack1-n[001-016]", "rack1-n001"),
        ] {
            assert_eq!(first_host(list).unwrap(), host, "{list}");
        }
        for bad in ["", "[1-2]", "x[]"] {
            assert!(first_host(bad).is_err(), "{bad}");
        }
    }

    fn local(rank: usize, of: usize) -> Launch {
        Launch::from_env(env(&[
            ("RANK", &rank.to_string()),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", &rank.to_string()),
            ("LOCAL_WORLD_SIZE", &of.to_string()),
        ]))
        .unwrap()
        .unwrap()
    }

    #[test]
    fn each_local_rank_listens_on_its_own_metrics_port() {
        assert_eq!(rank_port("0.0.0.0:9100", 3).unwrap(), "0.0.0.0:9103");
        assert_eq!(rank_port("[::1]:9100", 1).unwrap(), "[::1]:9101");
        assert_eq!(rank_port("127.0.0.1:0", 5).unwrap(), "127.0.0.1:0");
        assert!(rank_port("127.0.0.1:65535", 1).unwrap_err().contains("past 65535"));
        assert!(rank_port("localhost", 1).is_err());
    }

    #[test]
    fn each_local_rank_takes_its_own_gpus() {
        use tch::Device::{Cpu, Cuda};
        let pair = [Cuda(0), Cuda(1)];
        // 8 GPUs, 4 ranks per node, a sibling pair each: rank 3 on GPUs 6 and 7.
        assert_eq!(local(3, 4).rank_devices(&pair, 8, false, false).unwrap(), vec![Cuda(6), Cuda(7)]);
        // Both siblings on one GPU: 8 ranks on 8 GPUs.
        assert_eq!(local(5, 8).rank_devices(&[Cuda(0)], 8, false, false).unwrap(), vec![Cuda(5)]);
        // Slurm --gpus-per-task=2: each rank sees its own two as cuda:0 and cuda:1.
        assert_eq!(local(3, 4).rank_devices(&pair, 2, true, false).unwrap(), vec![Cuda(0), Cuda(1)]);
        // Four ranks cannot share two unbound GPUs under NCCL: refused with the numbers…
        let e = local(3, 4).rank_devices(&pair, 2, false, false).unwrap_err();
        assert!(e.contains("need 8 GPUs on this node, it shows 2"), "{e}");
        // …but may through Gloo.
        assert_eq!(local(3, 4).rank_devices(&pair, 2, false, true).unwrap(), vec![Cuda(0), Cuda(1)]);
        assert_eq!(local(1, 2).rank_devices(&[Cpu, Cpu], 0, false, false).unwrap(), vec![Cpu, Cpu]);
    }
}
