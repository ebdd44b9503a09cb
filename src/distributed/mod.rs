//! Data parallelism across processes on PyTorch's own distributed engine, c10d: a
//! `TCPStore` rendezvous, Gloo process groups (CPU tensors) and NCCL ones (CUDA tensors,
//! in builds against a CUDA libtorch), bound through the small C++ shim `c10d_shim.cpp`
//! that `build.rs` compiles against libtorch's headers. No networking of our own: every
//! byte between ranks goes through c10d.
//!
//! Every collective waits at most the group's timeout and returns an error instead of
//! hanging when a peer is gone (Gloo reports a broken connection at once).

pub mod launch;
pub mod roster;

use std::ffi::{c_char, CString};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

/// Whether this build can make NCCL groups (built against a CUDA libtorch with nccl.h).
pub fn has_nccl() -> bool {
    // SAFETY: a constant query.
    unsafe { cps3d_has_nccl() != 0 }
}

/// The c10d backend for a sibling's group: NCCL for a CUDA device of its own when this build
/// has NCCL, Gloo otherwise (CUDA tensors then travel through host buffers). Both siblings on
/// one GPU take Gloo: two NCCL communicators driven from two threads on one device can
/// deadlock when the ranks launch their collectives in different orders.
/// `CPS3D_DIST_BACKEND=gloo` forces Gloo (two ranks on one GPU, which NCCL refuses; or to
/// rule NCCL out in a hang).
pub fn backend_for(device: Device, siblings_share_device: bool) -> Result<Backend, String> {
    let forced = std::env::var("CPS3D_DIST_BACKEND").ok().filter(|v| !v.is_empty());
    choose_backend(device, siblings_share_device, forced.as_deref(), has_nccl())
}

fn choose_backend(device: Device, shared: bool, forced: Option<&str>, nccl_built: bool) -> Result<Backend, String> {
    let cuda = matches!(device, Device::Cuda(_));
    match forced {
        None if cuda && nccl_built && !shared => Ok(Backend::Nccl),
        None | Some("gloo") => Ok(Backend::Gloo),
        Some("nccl") if !cuda => {
            Err(format!("CPS3D_DIST_BACKEND=nccl: NCCL reduces CUDA tensors; this sibling trains on {device:?}"))
        }
        Some("nccl") if !nccl_built => Err("CPS3D_DIST_BACKEND=nccl: this cps3d was built without NCCL (its \
                                            libtorch has no libtorch_cuda.so, or nccl.h was not found: see \
                                            scripts/setup-libtorch.sh --gpu)"
            .to_string()),
        Some("nccl") if shared => Err(format!(
            "CPS3D_DIST_BACKEND=nccl: both siblings train on {device:?}, and two NCCL groups on one GPU can deadlock; \
             give each sibling its own GPU (--devices cuda:0,cuda:1) or use gloo"
        )),
        Some("nccl") => Ok(Backend::Nccl),
        Some(other) => Err(format!("CPS3D_DIST_BACKEND={other}: expected gloo or nccl")),
    }
}

/// Which c10d backend a group runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

#[repr(C)]
struct RawGroup {
    _private: [u8; 0],
}

#[repr(C)]
struct RawStore {
    _private: [u8; 0],
}

type CTensor = torch_sys::C_tensor;

extern "C" {
    fn cps3d_store_tcp(
        host: *const c_char,
        port: i32,
        rank: i32,
        world: i32,
        agent: i32,
        timeout_ms: i64,
        err: *mut c_char,
        n: usize,
    ) -> *mut RawStore;
    fn cps3d_store_free(s: *mut RawStore);
    fn cps3d_store_add(s: *mut RawStore, key: *const c_char, by: i64, out: *mut i64, err: *mut c_char, n: usize)
        -> i32;
    fn cps3d_store_set(s: *mut RawStore, key: *const c_char, value: *const c_char, err: *mut c_char, n: usize) -> i32;
    fn cps3d_store_get(
        s: *mut RawStore,
        key: *const c_char,
        value: *mut c_char,
        len: usize,
        found: *mut i32,
        err: *mut c_char,
        n: usize,
    ) -> i32;
    fn cps3d_pg_gloo(
        store: *mut RawStore,
        prefix: *const c_char,
        host: *const c_char,
        rank: i32,
        world: i32,
        timeout_ms: i64,
        err: *mut c_char,
        n: usize,
    ) -> *mut RawGroup;
    fn cps3d_has_nccl() -> i32;
    fn cps3d_pg_nccl(
        store: *mut RawStore,
        prefix: *const c_char,
        rank: i32,
        world: i32,
        timeout_ms: i64,
        err: *mut c_char,
        n: usize,
    ) -> *mut RawGroup;
    fn cps3d_pg_free(pg: *mut RawGroup);
    fn cps3d_pg_allreduce_sum(pg: *mut RawGroup, t: *mut CTensor, timeout_ms: i64, err: *mut c_char, n: usize) -> i32;
    fn cps3d_pg_allgather(
        pg: *mut RawGroup,
        input: *mut CTensor,
        outputs: *mut *mut CTensor,
        world: i32,
        timeout_ms: i64,
        err: *mut c_char,
        n: usize,
    ) -> i32;
    fn cps3d_pg_broadcast(
        pg: *mut RawGroup,
        t: *mut CTensor,
        root: i32,
        timeout_ms: i64,
        err: *mut c_char,
        n: usize,
    ) -> i32;
    fn cps3d_pg_barrier(pg: *mut RawGroup, timeout_ms: i64, err: *mut c_char, n: usize) -> i32;
}

/// Room for a c10d error message.
const ERR_LEN: usize = 2048;

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Calls the shim with room for its error: Ok when it returns 0, else its message.
fn call(f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), String> {
    let mut err = vec![0u8; ERR_LEN];
    if f(err.as_mut_ptr() as *mut c_char, ERR_LEN) == 0 {
        Ok(())
    } else {
        Err(message(&err))
    }
}

/// [`call`] for a shim function that makes an object (null when it could not).
fn make<T>(f: impl FnOnce(*mut c_char, usize) -> *mut T) -> Result<*mut T, String> {
    let mut err = vec![0u8; ERR_LEN];
    let raw = f(err.as_mut_ptr() as *mut c_char, ERR_LEN);
    if raw.is_null() {
        Err(message(&err))
    } else {
        Ok(raw)
    }
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// The rendezvous every group of a run meets at: c10d's `TCPStore`, served by rank 0.
pub struct Store {
    raw: *mut RawStore,
    host: String,
    port: u16,
    rank: usize,
    world: usize,
}

// The TCPStore client is thread-safe (c10d locks it).
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// Serves (rank 0) or joins the store at `host:port`, waiting at most `timeout` for
    /// all `world` ranks.
    pub fn tcp(host: &str, port: u16, rank: usize, world: usize, timeout: Duration) -> Result<Store, String> {
        Store::connect(host, port, rank, world, false, timeout)
    }

    /// [`Store::tcp`], or with `agent` a client of a store someone else serves there
    /// (torchrun's agent store, `TORCHELASTIC_USE_AGENT_STORE=True`).
    pub fn connect(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        agent: bool,
        timeout: Duration,
    ) -> Result<Store, String> {
        if world == 0 || rank >= world {
            return Err(format!("rank {rank} of a world of {world}: ranks are 0..world"));
        }
        let c_host = c_string(host)?;
        // SAFETY: the string outlives the call; err has n bytes.
        let raw = make(|err, n| unsafe {
            cps3d_store_tcp(
                c_host.as_ptr(),
                port as i32,
                rank as i32,
                world as i32,
                agent as i32,
                millis(timeout),
                err,
                n,
            )
        })
        .map_err(|e| {
            format!(
                "rank {rank} of {world}: no rendezvous at {host}:{port} within {} s (are all ranks started, and is \
                 the address rank 0's?): {e}",
                timeout.as_secs()
            )
        })?;
        Ok(Store { raw, host: host.to_string(), port, rank, world })
    }
}

impl Store {
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Adds `by` to the counter `key` (0 reads it) and returns its new value.
    pub fn add(&self, key: &str, by: i64) -> Result<i64, String> {
        let c_key = c_string(key)?;
        let mut out = 0i64;
        // SAFETY: the store is live; key and out outlive the call; err has n bytes.
        call(|err, n| unsafe { cps3d_store_add(self.raw, c_key.as_ptr(), by, &mut out, err, n) })?;
        Ok(out)
    }

    pub fn set(&self, key: &str, value: &str) -> Result<(), String> {
        let (c_key, c_value) = (c_string(key)?, c_string(value)?);
        // SAFETY: as in add.
        call(|err, n| unsafe { cps3d_store_set(self.raw, c_key.as_ptr(), c_value.as_ptr(), err, n) })
    }

    /// The value of `key`, None when no rank has set it (without waiting for it).
    pub fn get(&self, key: &str) -> Result<Option<String>, String> {
        let c_key = c_string(key)?;
        let mut value = vec![0u8; ERR_LEN];
        let mut found = 0i32;
        // SAFETY: as in add; value has ERR_LEN bytes.
        call(|err, n| unsafe {
            cps3d_store_get(self.raw, c_key.as_ptr(), value.as_mut_ptr() as *mut c_char, ERR_LEN, &mut found, err, n)
        })?;
        Ok((found != 0).then(|| message(&value)))
    }
}

fn c_string(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} holds a NUL byte"))
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: raw came from cps3d_store_tcp and is freed once (groups hold their own reference).
        unsafe { cps3d_store_free(self.raw) }
    }
}

/// One process group: this rank's handle on a set of ranks that reduce together.
pub struct ProcessGroup {
    raw: *mut RawGroup,
    /// Where the group's tensors live: the CPU for Gloo, the rank's GPU for NCCL.
    device: Device,
    rank: usize,
    world: usize,
    timeout: Duration,
    name: String,
    /// Names the rank that stopped when a collective fails.
    roster: Option<std::sync::Arc<roster::Roster>>,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessGroup({}, rank {} of {})", self.name, self.rank, self.world)
    }
}

// c10d backends are thread-safe (PyTorch calls them from any thread).
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// This rank's Gloo group `name` over every rank of the store, each collective waiting
    /// at most `timeout`.
    pub fn gloo(store: &Store, name: &str, timeout: Duration) -> Result<Self, String> {
        let c_name = c_string(name)?;
        // The master's address: the shim binds to loopback for a run on this machine, else
        // to this host's own address (or GLOO_SOCKET_IFNAME's interfaces).
        let c_host = c_string(if store.host == "localhost" { "127.0.0.1" } else { &store.host })?;
        let (rank, world, ms) = (store.rank as i32, store.world as i32, millis(timeout));
        // SAFETY: store is live; the strings outlive the call; err has n bytes.
        let raw = make(|err, n| unsafe {
            cps3d_pg_gloo(store.raw, c_name.as_ptr(), c_host.as_ptr(), rank, world, ms, err, n)
        });
        ProcessGroup::made(raw, store, name, Device::Cpu, timeout)
    }

    /// This rank's NCCL group `name` for tensors on `device` (a CUDA device).
    pub fn nccl(store: &Store, name: &str, device: Device, timeout: Duration) -> Result<Self, String> {
        if !matches!(device, Device::Cuda(_)) {
            return Err(format!("group {name}: NCCL reduces CUDA tensors, not {device:?}"));
        }
        let c_name = c_string(name)?;
        let (rank, world, ms) = (store.rank as i32, store.world as i32, millis(timeout));
        // SAFETY: store is live; the string outlives the call; err has n bytes.
        let raw = make(|err, n| unsafe { cps3d_pg_nccl(store.raw, c_name.as_ptr(), rank, world, ms, err, n) });
        ProcessGroup::made(raw, store, name, device, timeout)
    }

    /// The group the shim made, or why it could not.
    fn made(
        raw: Result<*mut RawGroup, String>,
        store: &Store,
        name: &str,
        device: Device,
        timeout: Duration,
    ) -> Result<Self, String> {
        let raw = raw.map_err(|e| {
            format!(
                "rank {} could not form group {name} ({} ranks, store at {}:{}) within {} s: {e}",
                store.rank,
                store.world,
                store.host,
                store.port,
                timeout.as_secs()
            )
        })?;
        Ok(ProcessGroup {
            raw,
            device,
            rank: store.rank,
            world: store.world,
            timeout,
            name: name.to_string(),
            roster: None,
        })
    }

    /// This rank's group `name` on `backend` for tensors on `device` (see [`backend_for`]).
    pub fn new(backend: Backend, store: &Store, name: &str, device: Device, timeout: Duration) -> Result<Self, String> {
        match backend {
            Backend::Gloo => ProcessGroup::gloo(store, name, timeout),
            Backend::Nccl => ProcessGroup::nccl(store, name, device, timeout),
        }
    }

    /// The group, whose failed collectives then say which rank stopped answering.
    pub fn with_roster(mut self, roster: std::sync::Arc<roster::Roster>) -> Self {
        self.roster = Some(roster);
        self
    }

    /// Where this group's collectives take their tensors.
    pub fn device(&self) -> Device {
        self.device
    }

    pub fn backend(&self) -> Backend {
        if self.device == Device::Cpu {
            Backend::Gloo
        } else {
            Backend::Nccl
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    fn timeout_ms(&self) -> i64 {
        millis(self.timeout)
    }

    fn check_tensor(&self, t: &Tensor, what: &str) -> Result<(), String> {
        if t.device() != self.device {
            return Err(format!(
                "{what} in group {}: its tensors live on {:?}, this one on {:?}",
                self.name,
                self.device,
                t.device()
            ));
        }
        if !t.is_contiguous() {
            return Err(format!("{what}: the tensor must be contiguous"));
        }
        Ok(())
    }

    /// A collective's outcome, its failure said with the group, the timeout and (with a
    /// roster) the rank that stopped answering.
    fn check(&self, what: &str, outcome: Result<(), String>) -> Result<(), String> {
        outcome.map_err(|e| {
            let who = match &self.roster {
                Some(r) => format!("; {}", r.diagnose()),
                None => String::new(),
            };
            format!(
                "rank {} of group {} ({} ranks): {what} failed (a peer died, hung past {} s or lost its network): \
                 {e}{who}",
                self.rank,
                self.name,
                self.world,
                self.timeout.as_secs()
            )
        })
    }

    /// Sums `t` (contiguous, on the group's device) over the ranks, in place.
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), String> {
        self.check_tensor(t, "all-reduce")?;
        let ms = self.timeout_ms();
        // SAFETY: t is a live tch tensor (an at::Tensor*); err has n bytes.
        self.check("all-reduce", call(|err, n| unsafe { cps3d_pg_allreduce_sum(self.raw, t.as_mut_ptr(), ms, err, n) }))
    }

    /// Every rank's `t`, in rank order.
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>, String> {
        let mut input = t.contiguous();
        self.check_tensor(&input, "all-gather")?;
        let mut outputs: Vec<Tensor> = (0..self.world).map(|_| input.empty_like()).collect();
        let mut ptrs: Vec<*mut CTensor> = outputs.iter_mut().map(|o| o.as_mut_ptr()).collect();
        let (world, ms) = (self.world as i32, self.timeout_ms());
        // SAFETY: input and outputs live through the call; ptrs has world entries.
        let outcome = call(|err, n| unsafe {
            cps3d_pg_allgather(self.raw, input.as_mut_ptr(), ptrs.as_mut_ptr(), world, ms, err, n)
        });
        self.check("all-gather", outcome)?;
        Ok(outputs)
    }

    /// Rank `root`'s `t` on every rank, in place.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), String> {
        self.check_tensor(t, "broadcast")?;
        let ms = self.timeout_ms();
        // SAFETY: as in all_reduce_sum.
        let outcome = call(|err, n| unsafe { cps3d_pg_broadcast(self.raw, t.as_mut_ptr(), root as i32, ms, err, n) });
        self.check("broadcast", outcome)
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<(), String> {
        let ms = self.timeout_ms();
        // SAFETY: a live group; err has n bytes.
        self.check("barrier", call(|err, n| unsafe { cps3d_pg_barrier(self.raw, ms, err, n) }))
    }

    /// The mean over the ranks of each tensor, in place, in one all-reduce.
    pub fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<(), String> {
        self.all_reduce_packed(tensors, 1.0 / self.world as f64)
    }

    /// The sum over the ranks of each tensor, in place, in one all-reduce.
    pub fn all_reduce_sum_many(&self, tensors: &mut [Tensor]) -> Result<(), String> {
        self.all_reduce_packed(tensors, 1.0)
    }

    /// Rank `root`'s values of every tensor on every rank, in place, in one broadcast.
    pub fn broadcast_many(&self, tensors: &mut [Tensor], root: usize) -> Result<(), String> {
        let Some(mut buffer) = pack(tensors, self.device) else { return Ok(()) };
        self.broadcast(&mut buffer, root)?;
        self.unpack(&buffer, tensors);
        Ok(())
    }

    /// Each tensor summed over the ranks and scaled by `scale`, in place, in one
    /// all-reduce: the tensors (gradients, say) are packed into one buffer on the group's
    /// device, as DDP's buckets are.
    fn all_reduce_packed(&self, tensors: &mut [Tensor], scale: f64) -> Result<(), String> {
        let Some(mut buffer) = pack(tensors, self.device) else { return Ok(()) };
        self.all_reduce_sum(&mut buffer)?;
        if scale != 1.0 {
            let _ = buffer.g_mul_scalar_(scale);
        }
        self.unpack(&buffer, tensors);
        Ok(())
    }

    /// Copies the packed `buffer` back into the tensors, each on its device and kind.
    fn unpack(&self, buffer: &Tensor, tensors: &mut [Tensor]) {
        let mut offset = 0;
        for t in tensors.iter_mut() {
            let n = t.numel() as i64;
            let part = buffer.narrow(0, offset, n).reshape(t.size()).to_kind(t.kind()).to_device(t.device());
            tch::no_grad(|| t.copy_(&part));
            offset += n;
        }
    }
}

/// The tensors flattened into one float64 buffer on `device` (None when there are none).
/// float64: a sum of the ranks' float32 parts is then rounded once, as one process's would be.
fn pack(tensors: &[Tensor], device: Device) -> Option<Tensor> {
    if tensors.is_empty() {
        return None;
    }
    let flat: Vec<Tensor> =
        tensors.iter().map(|t| t.detach().to_device(device).to_kind(Kind::Double).reshape([-1])).collect();
    Some(Tensor::cat(&flat, 0))
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: raw came from cps3d_pg_gloo or cps3d_pg_nccl and is freed once.
        unsafe { cps3d_pg_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_for_cuda_when_built_with_it_gloo_otherwise() {
        let gpu = Device::Cuda(1);
        assert_eq!(choose_backend(gpu, false, None, true), Ok(Backend::Nccl));
        assert_eq!(choose_backend(gpu, false, None, false), Ok(Backend::Gloo));
        // Both siblings on one GPU: Gloo, unless NCCL is forced, which is refused with why.
        assert_eq!(choose_backend(gpu, true, None, true), Ok(Backend::Gloo));
        assert!(choose_backend(gpu, true, Some("nccl"), true).unwrap_err().contains("can deadlock"));
        assert_eq!(choose_backend(Device::Cpu, false, None, true), Ok(Backend::Gloo));
        assert_eq!(choose_backend(gpu, false, Some("gloo"), true), Ok(Backend::Gloo));
        assert!(choose_backend(gpu, false, Some("nccl"), false).unwrap_err().contains("built without NCCL"));
        assert!(choose_backend(Device::Cpu, false, Some("nccl"), true).unwrap_err().contains("CUDA tensors"));
        assert!(choose_backend(gpu, false, Some("mpi"), true).unwrap_err().contains("expected gloo or nccl"));
        // This CPU build: no NCCL, and asking for an NCCL group says so instead of crashing.
        if !has_nccl() {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let store = Store::tcp("127.0.0.1", port, 0, 1, Duration::from_secs(5)).unwrap();
            let e = ProcessGroup::nccl(&store, "g", gpu, Duration::from_secs(5)).unwrap_err();
            assert!(e.contains("built without NCCL"), "{e}");
        }
    }
}
