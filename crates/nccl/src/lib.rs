//! NCCL broadcast between GPUs, for staging deltas on replicas that hold their weights on a GPU.
//!
//! Built on cudarc with dynamic loading, so it compiles on machines without CUDA; at run time [`probe`] checks that
//! the CUDA driver, NCCL and a GPU are there, so a caller falls back to gRPC streaming with a reason instead of
//! panicking inside cudarc (which panics when a library is missing).
//!
//! Nothing here can hang. Communicators are created non-blocking and polled against a deadline; a broadcast is
//! polled on its stream and on the communicator's asynchronous error; on a timeout or a peer's failure the
//! communicator is aborted and the caller builds a new one over the survivors with a fresh [`UniqueId`], which the
//! coordinator hands out. (checkpoint-engine's failure mode is a dead rank hanging everyone for ten minutes.)

use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{sys as cu, CudaContext, CudaSlice, CudaStream, DevicePtrMut};
use cudarc::nccl::sys as nc;

pub mod poll;

pub use poll::{await_done, Poll};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NCCL unavailable: {0}")]
    Unavailable(String),
    #[error("{what} timed out after {after:.1?}")]
    Timeout { what: String, after: Duration },
    #[error("{what} failed: {code}")]
    Nccl { what: String, code: String },
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("NCCL unique id: {0}")]
    BadId(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What [`probe`] found.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// NCCL's version code (e.g. 22803 for 2.28.3).
    pub nccl_version: i32,
    /// The CUDA driver's version (e.g. 13000).
    pub driver_version: i32,
    pub devices: i32,
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.nccl_version;
        let d = self.driver_version;
        write!(
            f,
            "NCCL {}.{}.{}, CUDA driver {}.{}, {} GPU(s)",
            v / 10000,
            v / 100 % 100,
            v % 100,
            d / 1000,
            d % 1000 / 10,
            self.devices
        )
    }
}

/// Whether NCCL broadcast can run here. Never panics: a missing library or GPU is an [`Error::Unavailable`] that says
/// what is missing.
pub fn probe() -> Result<Runtime> {
    // SAFETY: only tries to dlopen the library names; loads no symbol.
    if !unsafe { cu::is_culib_present() } {
        return Err(Error::Unavailable("the CUDA driver library (libcuda.so.1) is not installed".into()));
    }
    if !unsafe { nc::is_culib_present() } {
        return Err(Error::Unavailable(
            "no NCCL library on the library path (cudarc opens libnccl.so; NCCL 2.x ships libnccl.so.2, so put a \
             libnccl.so link to it on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    let devices = CudaContext::device_count().map_err(|e| Error::Unavailable(format!("no usable GPU: {e}")))?;
    if devices < 1 {
        return Err(Error::Unavailable("no GPU visible".into()));
    }
    let mut driver_version = 0;
    // SAFETY: writes one int.
    unsafe { cu::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(|e| Error::Unavailable(format!("CUDA driver version: {e}")))?;
    let nccl_version = cudarc::nccl::result::get_nccl_version()
        .map_err(|e| Error::Unavailable(format!("NCCL version: {}", code_name(e.0 as u32))))?;
    Ok(Runtime { nccl_version, driver_version, devices })
}

/// An NCCL unique id: made by the root, carried to every rank out of band (over gRPC, through the coordinator).
#[derive(Clone, Copy)]
pub struct UniqueId(nc::ncclUniqueId);

impl UniqueId {
    pub const LEN: usize = 128;

    /// A fresh id (NCCL opens a bootstrap listener on this host for it).
    pub fn new() -> Result<Self> {
        cudarc::nccl::result::get_uniqueid()
            .map(Self)
            .map_err(|e| Error::Nccl { what: "making a unique id".into(), code: code_name(e.0 as u32) })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal.iter().map(|&c| c as u8).collect()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != Self::LEN {
            return Err(Error::BadId(format!("{} bytes, expected {}", bytes.len(), Self::LEN)));
        }
        let mut internal = [0 as std::ffi::c_char; Self::LEN];
        for (d, &b) in internal.iter_mut().zip(bytes) {
            *d = b as std::ffi::c_char;
        }
        Ok(Self(nc::ncclUniqueId { internal }))
    }
}

/// The name of an NCCL result code (read as a plain integer: a newer library may return codes this binding lacks).
pub fn code_name(code: u32) -> String {
    let name = match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError (a CUDA call failed)",
        2 => "ncclSystemError (a system call or the network failed; a peer may have died)",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage (e.g. two ranks on one GPU without NCCL_MULTI_RANK_GPU_ENABLE=1 on NCCL >= 2.30)",
        6 => "ncclRemoteError (a peer failed)",
        7 => "ncclInProgress",
        8 => "ncclTimeout",
        _ => return format!("NCCL result {code}"),
    };
    name.to_string()
}

/// The version of `ncclConfig_t` this binding lays out (cudarc's `nccl-02028`: the struct of NCCL 2.28). A newer
/// library reads the fields up to `size` and defaults the rest, so the prefix is safe.
pub const CONFIG_VERSION: u32 = 22800;
const CONFIG_MAGIC: u32 = 0xcafe_beef;
const UNDEF: i32 = i32::MIN;

/// `NCCL_CONFIG_INITIALIZER` (every field undefined, so NCCL picks its default), with blocking off: init and
/// collectives return at once and are polled.
pub fn nonblocking_config() -> nc::ncclConfig_t {
    nc::ncclConfig_t {
        size: std::mem::size_of::<nc::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

/// One rank's membership of a communicator. Dropping it aborts the communicator (never a blocking destroy).
pub struct Communicator {
    comm: nc::ncclComm_t,
    stream: Arc<CudaStream>,
    pub rank: usize,
    pub world: usize,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not concurrent; `&mut self` on
// every call here ensures that.
unsafe impl Send for Communicator {}

impl Communicator {
    /// Joins communicator `id` as `rank` of `world` on `stream`'s GPU. Fails with [`Error::Timeout`] when not every
    /// rank joined within `timeout` (a rank that died before joining), after aborting.
    pub fn init(stream: Arc<CudaStream>, id: &UniqueId, rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        if rank >= world {
            return Err(Error::Nccl { what: format!("rank {rank} of {world}"), code: "rank out of range".into() });
        }
        stream.context().bind_to_thread().map_err(|e| Error::Cuda(e.to_string()))?;
        let mut comm: nc::ncclComm_t = std::ptr::null_mut();
        let mut config = nonblocking_config();
        // SAFETY: valid out-pointer and config; the id is passed by value.
        let r = unsafe { nc::ncclCommInitRankConfig(&mut comm, world as i32, id.0, rank as i32, &mut config) } as u32;
        let me = Self { comm, stream, rank, world };
        if r != 0 && r != 7 {
            return Err(Error::Nccl { what: "creating the communicator".into(), code: code_name(r) });
        }
        await_done("creating the communicator (waiting for every rank to join)", timeout, || me.state())?;
        Ok(me)
    }

    /// The communicator's asynchronous state: in progress, done, or failed (e.g. a peer died).
    fn state(&self) -> Poll {
        let mut code: u32 = 0;
        // SAFETY: NCCL writes one ncclResult_t (a C enum: an int) through the pointer; reading it as u32 keeps an
        // unknown code from a newer library from becoming an invalid Rust enum.
        unsafe { nc::ncclCommGetAsyncError(self.comm, &mut code as *mut u32 as *mut nc::ncclResult_t) };
        match code {
            0 => Poll::Done,
            7 => Poll::Pending,
            c => Poll::Failed(code_name(c)),
        }
    }

    /// Broadcasts `buf` from `root` to every rank (in place: the root's bytes overwrite everyone's), waiting at most
    /// `timeout` for it to finish on this GPU. On a timeout or a failure the caller should drop this communicator
    /// (which aborts it) and build a new one over the ranks still alive.
    pub fn broadcast(&mut self, buf: &mut CudaSlice<u8>, root: usize, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let len = buf.len();
        let stream = self.stream.clone();
        {
            let (ptr, _sync) = buf.device_ptr_mut(&stream);
            // SAFETY: `ptr` is `len` bytes on this communicator's GPU, alive until the stream is done with it (the
            // SyncOnDrop guard records that); the stream handle is the driver's CUstream, the same object as the
            // runtime's cudaStream_t.
            let r = unsafe {
                nc::ncclBroadcast(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    len,
                    nc::ncclDataType_t::ncclUint8,
                    root as i32,
                    self.comm,
                    stream.cu_stream() as nc::cudaStream_t,
                )
            } as u32;
            if r != 0 && r != 7 {
                return Err(Error::Nccl { what: "the broadcast".into(), code: code_name(r) });
            }
            // Non-blocking communicators may still be enqueueing when the call returns.
            await_done("enqueueing the broadcast", timeout, || self.state())?;
        }
        let left = timeout.saturating_sub(start.elapsed());
        await_done(&format!("the broadcast of {len} bytes"), left, || match self.state() {
            Poll::Failed(e) => Poll::Failed(e),
            _ => {
                // SAFETY: queries a live stream.
                match unsafe { cu::cuStreamQuery(stream.cu_stream()) } {
                    cu::CUresult::CUDA_SUCCESS => Poll::Done,
                    cu::CUresult::CUDA_ERROR_NOT_READY => Poll::Pending,
                    e => Poll::Failed(format!("CUDA stream: {e:?}")),
                }
            }
        })
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // Abort, not destroy: destroy waits for peers that may be dead; abort returns and frees.
            // SAFETY: the communicator is ours and not used again.
            let r = unsafe { nc::ncclCommAbort(self.comm) } as u32;
            if r != 0 {
                eprintln!("aborting an NCCL communicator: {}", code_name(r));
            }
            self.comm = std::ptr::null_mut();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_says_what_is_missing() {
        match probe() {
            Ok(rt) => assert!(rt.devices >= 1 && rt.nccl_version >= 20000, "{rt}"),
            Err(Error::Unavailable(why)) => {
                assert!(why.contains("CUDA") || why.contains("NCCL") || why.contains("GPU"), "{why}")
            }
            Err(e) => panic!("probe failed with an error other than Unavailable: {e}"),
        }
    }

    #[test]
    fn the_config_is_nccls_initializer_with_blocking_off() {
        let c = nonblocking_config();
        assert_eq!(c.size, std::mem::size_of::<nc::ncclConfig_t>());
        assert_eq!((c.magic, c.version, c.blocking), (0xcafebeef, 22800, 0));
        // Everything else undefined, so NCCL chooses; 0 would mean "zero CTAs", "no cluster", ...
        for v in [c.cgaClusterSize, c.minCTAs, c.maxCTAs, c.splitShare, c.collnetEnable, c.CTAPolicy, c.nvlsCTAs] {
            assert_eq!(v, i32::MIN);
        }
        assert!(c.netName.is_null() && c.commName.is_null());
    }

    #[test]
    fn unique_ids_travel_as_bytes_and_bad_ones_are_named() {
        let bytes: Vec<u8> = (0..128u32).map(|i| (i * 7 % 256) as u8).collect();
        let id = UniqueId::from_bytes(&bytes).unwrap();
        assert_eq!(id.to_bytes(), bytes);
        let err = UniqueId::from_bytes(&bytes[..100]).err().unwrap().to_string();
        assert!(err.contains("100 bytes, expected 128"), "{err}");
    }

    #[test]
    fn result_codes_are_named_including_unknown_ones() {
        assert!(code_name(5).contains("ncclInvalidUsage"));
        assert!(code_name(2).contains("peer may have died"));
        assert_eq!(code_name(42), "NCCL result 42");
    }
}
