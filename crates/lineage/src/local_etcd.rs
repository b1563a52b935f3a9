//! A throwaway etcd on loopback, for tests and benchmarks: one member ([`LocalEtcd`]) or a cluster
//! ([`LocalEtcdCluster`]); free ports, temporary data directories, killed when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

pub struct LocalEtcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Addresses besides loopback the client port listens on (a veth into a test's network namespace).
    also_on: Vec<String>,
}

fn free_port() -> Result<u16> {
    free_loopback_port().ok_or_else(|| Error::Unavailable("no free loopback port below the ephemeral range".into()))
}

/// A loopback port that is free now, for a server a test or benchmark starts next.
///
/// Port 0 cannot be used for that: the kernel hands the port it picked to the next outbound connection as soon as the
/// probing listener closes, and one CI run lost a 3-member etcd to exactly that ("bind: address already in use").
/// So ports come from below the ephemeral range, which the kernel never assigns by itself, starting at an offset drawn
/// from the process id and clock (parallel test processes spread out) and stepping on through a process-wide
/// counter (parallel tests in one process never get the same port twice).
pub fn free_loopback_port() -> Option<u16> {
    free_loopback_ports(1)
}

/// The first of `n` consecutive loopback ports that are all free now (for `engram up --replica-listen P`, which
/// takes P, P+1, ...), reserved from the same process-wide counter in one step, so a parallel test cannot take one
/// from the middle of the block. See [`free_loopback_port`].
pub fn free_loopback_ports(n: u16) -> Option<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static OFFSET: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FLOOR: u32 = 20_000;
    let n = u32::from(n.max(1));
    let ceiling = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|&lo| lo > FLOOR + 1_000)
        .unwrap_or(32_768);
    let span = ceiling - FLOOR;
    let offset = *OFFSET.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(2_654_435_761).wrapping_add(nanos)
    });
    for _ in 0..span / n {
        let first = FLOOR + offset.wrapping_add(NEXT.fetch_add(n, Ordering::SeqCst)) % span;
        if first + n > ceiling {
            continue; // a block never wraps past the top of the range
        }
        if (first..first + n).all(|p| TcpListener::bind(("127.0.0.1", p as u16)).is_ok()) {
            return Some(first as u16);
        }
    }
    None
}

/// The etcd binary: `$ENGRAM_ETCD_BIN`, else `etcd` on the PATH.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENGRAM_ETCD_BIN") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("etcd")).find(|p| p.is_file())
}

/// For tests: whether an etcd binary is here to test against. Without one, a test should skip, except when the
/// test script promised etcd (`ENGRAM_REQUIRE_ETCD=1`): then this panics, so a missing install fails the run.
pub fn etcd_available_for_tests() -> bool {
    if etcd_binary().is_some() {
        return true;
    }
    assert!(
        std::env::var("ENGRAM_REQUIRE_ETCD").as_deref() != Ok("1"),
        "ENGRAM_REQUIRE_ETCD=1 but no etcd binary is installed (etcd-server, or set ENGRAM_ETCD_BIN)"
    );
    eprintln!("skipping: no etcd binary (install etcd-server, or set ENGRAM_ETCD_BIN)");
    false
}

/// Starts again on fresh ports when a port was taken between choosing it and etcd binding it (another process can
/// still bind any port explicitly).
fn retry_taken_ports<T>(mut start: impl FnMut() -> Result<T>) -> Result<T> {
    let mut tries = 0;
    loop {
        match start() {
            Err(Error::Unavailable(m)) if m.contains("address already in use") && tries < 3 => tries += 1,
            other => return other,
        }
    }
}

impl LocalEtcd {
    pub fn start() -> Result<Self> {
        Self::start_also_on(&[])
    }

    /// Like [`LocalEtcd::start`], with the client port also listening on `hosts` (IPv4 addresses of this machine).
    pub fn start_also_on(hosts: &[&str]) -> Result<Self> {
        retry_taken_ports(|| {
            let dir = tempfile::tempdir().map_err(|e| Error::Unavailable(format!("temporary directory: {e}")))?;
            let also_on = hosts.iter().map(|h| h.to_string()).collect();
            let mut me = Self { child: None, dir, client_port: free_port()?, peer_port: free_port()?, also_on };
            me.spawn()?;
            Ok(me)
        })
    }

    fn spawn(&mut self) -> Result<()> {
        let initial = format!("engram-test=http://127.0.0.1:{}", self.peer_port);
        self.launch("engram-test", &initial)?;
        self.wait_ready()
    }

    fn launch(&mut self, name: &str, initial_cluster: &str) -> Result<()> {
        let bin = etcd_binary().ok_or_else(|| Error::Unavailable("no etcd binary (install etcd-server)".into()))?;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let listen_client: Vec<String> = std::iter::once(client.clone())
            .chain(self.also_on.iter().map(|h| format!("http://{h}:{}", self.client_port)))
            .collect();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let child = Command::new(&bin)
            .arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", self.dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={}", listen_client.join(",")))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| Error::Unavailable(e.to_string()))?)
            .stderr(log)
            .spawn()
            .map_err(|e| Error::Unavailable(format!("starting {}: {e}", bin.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Ready when the client port accepts connections.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                return Err(Error::Unavailable(format!("etcd exited with {status}: {tail}")));
            }
            if Instant::now() > deadline {
                return Err(Error::Unavailable("etcd did not open its client port within 20 s".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `host:port` of the client endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The client port (also open on the `start_also_on` addresses).
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// A store URL for this server under `prefix` (which starts with '/').
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{}{prefix}", self.endpoint())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server and starts it again on the same data and ports.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A throwaway multi-member etcd cluster on loopback; members can be killed and restarted one by one.
pub struct LocalEtcdCluster {
    members: Vec<LocalEtcd>,
}

impl LocalEtcdCluster {
    pub fn start(n: usize) -> Result<Self> {
        retry_taken_ports(|| Self::start_once(n))
    }

    fn start_once(n: usize) -> Result<Self> {
        let mut members = Vec::with_capacity(n);
        for _ in 0..n {
            let dir = tempfile::tempdir().map_err(|e| Error::Unavailable(format!("temporary directory: {e}")))?;
            members.push(LocalEtcd {
                child: None,
                dir,
                client_port: free_port()?,
                peer_port: free_port()?,
                also_on: Vec::new(),
            });
        }
        let initial: Vec<String> =
            members.iter().enumerate().map(|(i, m)| format!("m{i}=http://127.0.0.1:{}", m.peer_port)).collect();
        let initial = initial.join(",");
        // Members wait for each other before they serve: start every one, then wait for all.
        for (i, m) in members.iter_mut().enumerate() {
            m.launch(&format!("m{i}"), &initial)?;
        }
        for m in &mut members {
            m.wait_ready()?;
        }
        Ok(Self { members })
    }

    /// A store URL naming every member.
    pub fn url(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self.members.iter().map(LocalEtcd::endpoint).collect();
        format!("etcd://{}{prefix}", hosts.join(","))
    }

    /// SIGKILL of member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again on its data (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let initial: Vec<String> =
            self.members.iter().enumerate().map(|(j, m)| format!("m{j}=http://127.0.0.1:{}", m.peer_port)).collect();
        let m = &mut self.members[i];
        m.kill();
        m.launch(&format!("m{i}"), &initial.join(","))?;
        m.wait_ready()
    }
}
