//! `engram-nccl`: checks and measures NCCL broadcast between processes on this machine's GPUs.
//!
//! `bench` plays the coordinator: it makes the unique id and hands it to rank processes over their stdin (in the
//! service it travels over gRPC), has the root broadcast a seeded buffer, and checks every rank's SHA-256 against the
//! bytes sent. With `--kill-rank` it then kills one rank with SIGKILL just before the next broadcast, as a replica
//! dying would; the survivors' broadcast must end in a timeout (not a hang), after which it builds a new
//! communicator over the survivors with a fresh id and broadcasts again.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use cudarc::driver::CudaContext;
use engram_nccl::{probe, Communicator, UniqueId};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(about = "NCCL broadcast between processes: probe the libraries, or benchmark and fault-test a broadcast")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Say whether NCCL broadcast can run here (CUDA driver, NCCL library, a GPU) and what falls back if not.
    Probe,
    /// Broadcast a seeded buffer from rank 0 to every rank, check the bytes, time it; optionally kill a rank.
    Bench {
        /// Rank processes (on one GPU several ranks need NCCL >= 2.30; NCCL_MULTI_RANK_GPU_ENABLE=1 is set).
        #[arg(long, default_value_t = 4)]
        ranks: usize,
        #[arg(long, default_value_t = 256)]
        size_mb: usize,
        /// Timed broadcasts before any fault.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Bound on creating a communicator and on each broadcast.
        #[arg(long, default_value_t = 10.0)]
        timeout_s: f64,
        /// Kill this rank (SIGKILL) before one more broadcast, then rebuild over the survivors.
        #[arg(long)]
        kill_rank: Option<usize>,
        /// Never start this rank: the others' communicator must time out and be aborted, then be rebuilt without it
        /// (the case that runs on one GPU with NCCL < 2.30, which refuses two ranks on one device).
        #[arg(long, conflicts_with = "kill_rank")]
        absent_rank: Option<usize>,
        /// One JSON object on stdout instead of text.
        #[arg(long)]
        json: bool,
        /// Bootstrap through an Engram coordinator (`http://host:port`): rank 0 makes the unique id and posts it
        /// (`NcclRendezvous`), the other ranks fetch it over gRPC. Without it the ids go over the ranks' stdin.
        #[arg(long)]
        coordinator: Option<String>,
    },
    /// One rank: reads commands on stdin, answers one JSON line each (started by `bench`).
    #[command(hide = true)]
    Rank {
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Probe => match probe() {
            Ok(rt) => {
                println!("NCCL broadcast available: {rt}");
                Ok(())
            }
            Err(e) => {
                println!("{e}; staging falls back to gRPC streaming");
                std::process::exit(2)
            }
        },
        Cmd::Rank { device } => rank(device),
        Cmd::Bench { ranks, size_mb, rounds, timeout_s, kill_rank, absent_rank, json, coordinator } => {
            let faults = Faults { kill_rank, absent_rank, coordinator };
            bench(ranks, size_mb, rounds, Duration::from_secs_f64(timeout_s), faults, json)
        }
    }
}

/// A seeded buffer (xorshift), the same on every host, so the launcher knows the hash without receiving the bytes.
fn seeded(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---- the rank process ----

fn rank(device: usize) -> Result<()> {
    let ctx = CudaContext::new(device).context("CUDA context")?;
    let stream = ctx.new_stream().context("CUDA stream")?;
    let mut comm: Option<Communicator> = None;
    let mut buf: Option<cudarc::driver::CudaSlice<u8>> = None;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["init", id, r, world, timeout_ms] => {
                drop(comm.take()); // aborts a previous communicator
                let id = UniqueId::from_bytes(&hex::decode(id)?)?;
                let timeout = Duration::from_millis(timeout_ms.parse()?);
                let start = Instant::now();
                match Communicator::init(stream.clone(), &id, r.parse()?, world.parse()?, timeout) {
                    Ok(c) => {
                        comm = Some(c);
                        json!({"ok": true, "seconds": start.elapsed().as_secs_f64()})
                    }
                    Err(e) => json!({"ok": false, "error": e.to_string(), "seconds": start.elapsed().as_secs_f64()}),
                }
            }
            ["init-via", coordinator, group, r, world, timeout_ms] => {
                drop(comm.take());
                let (r, world): (u32, u32) = (r.parse()?, world.parse()?);
                let timeout = Duration::from_millis(timeout_ms.parse()?);
                let start = Instant::now();
                let joined = rendezvous(coordinator, group, r, world, timeout)
                    .and_then(|id| Ok(Communicator::init(stream.clone(), &id, r as usize, world as usize, timeout)?));
                match joined {
                    Ok(c) => {
                        comm = Some(c);
                        json!({"ok": true, "seconds": start.elapsed().as_secs_f64()})
                    }
                    Err(e) => json!({"ok": false, "error": format!("{e:#}"), "seconds": start.elapsed().as_secs_f64()}),
                }
            }
            ["bcast", len, seed, timeout_ms] => {
                let len: usize = len.parse()?;
                let c = comm.as_mut().ok_or_else(|| anyhow!("bcast before init"))?;
                if buf.as_ref().map(|b| b.len()) != Some(len) {
                    buf = Some(stream.alloc_zeros::<u8>(len)?);
                }
                let b = buf.as_mut().expect("allocated");
                if c.rank == 0 {
                    stream.memcpy_htod(&seeded(len, seed.parse()?), b)?;
                } else {
                    stream.memset_zeros(b)?;
                }
                stream.synchronize()?;
                let start = Instant::now();
                match c.broadcast(b, 0, Duration::from_millis(timeout_ms.parse()?)) {
                    Ok(()) => {
                        let seconds = start.elapsed().as_secs_f64();
                        let host = stream.clone_dtoh(b)?;
                        json!({"ok": true, "seconds": seconds, "sha256": hex::encode(Sha256::digest(&host))})
                    }
                    Err(e) => {
                        // The communicator is unusable after a failed collective: abort it now.
                        drop(comm.take());
                        json!({"ok": false, "error": e.to_string(), "seconds": start.elapsed().as_secs_f64()})
                    }
                }
            }
            ["id"] => json!({"ok": true, "id": hex::encode(UniqueId::new()?.to_bytes())}),
            ["exit"] => break,
            _ => json!({"ok": false, "error": format!("unknown command {line:?}")}),
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

/// The NCCL unique id of `group` through the coordinator: rank 0 makes and posts it, the others fetch it.
fn rendezvous(coordinator: &str, group: &str, rank: u32, world: u32, wait: Duration) -> Result<UniqueId> {
    use engram_proto::v1::{membership_client::MembershipClient, NcclRendezvousRequest};
    let unique_id = if rank == 0 { UniqueId::new()?.to_bytes() } else { Vec::new() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = rt.block_on(async {
        let mut c = MembershipClient::connect(coordinator.to_string()).await?;
        let req = NcclRendezvousRequest {
            group: group.to_string(),
            rank,
            world,
            unique_id,
            wait_ms: wait.as_millis() as u32,
        };
        anyhow::Ok(c.nccl_rendezvous(req).await?.into_inner())
    })?;
    Ok(UniqueId::from_bytes(&reply.unique_id)?)
}

// ---- the launcher ----

struct RankProc {
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<String>,
}

impl RankProc {
    fn start() -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("rank")
            .env("NCCL_MULTI_RANK_GPU_ENABLE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a rank process")?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, stdin, replies })
    }

    fn send(&mut self, cmd: &str) -> Result<()> {
        writeln!(self.stdin, "{cmd}")?;
        Ok(self.stdin.flush()?)
    }

    /// The reply to the last command; a rank that stays silent past `wait` is a bug in the bounds, reported as such.
    fn reply(&mut self, wait: Duration) -> Result<Value> {
        let line = self.replies.recv_timeout(wait).map_err(|_| anyhow!("a rank gave no answer within {wait:?}"))?;
        Ok(serde_json::from_str(&line)?)
    }
}

impl Drop for RankProc {
    fn drop(&mut self) {
        let _ = self.send("exit");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `init` on every rank at once (they must all be inside init together); returns each one's reply.
fn init_all(ranks: &mut [&mut RankProc], timeout: Duration) -> Result<Vec<Value>> {
    let world = ranks.len();
    init_as(ranks, &(0..world).collect::<Vec<_>>(), world, timeout)
}

/// Where ranks get the unique id: over their stdin from here, or through a coordinator.
static COORDINATOR: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// `init` with a fresh id, process `i` joining as rank `numbers[i]` of `world`.
fn init_as(ranks: &mut [&mut RankProc], numbers: &[usize], world: usize, timeout: Duration) -> Result<Vec<Value>> {
    static GENERATION: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    match COORDINATOR.get().cloned().flatten() {
        Some(c) => {
            let g = GENERATION.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let group = format!("engram-nccl-bench-{}-{g}", std::process::id());
            for (p, r) in ranks.iter_mut().zip(numbers) {
                p.send(&format!("init-via {c} {group} {r} {world} {}", timeout.as_millis()))?;
            }
        }
        None => {
            let hex_id = hex::encode(UniqueId::new()?.to_bytes());
            for (p, r) in ranks.iter_mut().zip(numbers) {
                p.send(&format!("init {hex_id} {r} {world} {}", timeout.as_millis()))?;
            }
        }
    }
    ranks.iter_mut().map(|p| p.reply(timeout + Duration::from_secs(10))).collect()
}

fn bcast_all(ranks: &mut [&mut RankProc], len: usize, seed: u64, timeout: Duration) -> Result<Vec<Value>> {
    for p in ranks.iter_mut() {
        p.send(&format!("bcast {len} {seed} {}", timeout.as_millis()))?;
    }
    ranks.iter_mut().map(|p| p.reply(timeout + Duration::from_secs(30))).collect()
}

fn all_ok(replies: &[Value]) -> bool {
    replies.iter().all(|r| r["ok"] == json!(true))
}

fn errors(replies: &[Value]) -> Vec<String> {
    replies.iter().filter_map(|r| r["error"].as_str().map(String::from)).collect()
}

fn max_seconds(replies: &[Value]) -> f64 {
    replies.iter().filter_map(|r| r["seconds"].as_f64()).fold(0.0, f64::max)
}

/// Every rank holds exactly the root's bytes.
fn verify(replies: &[Value], expected: &str) -> Result<()> {
    for (r, v) in replies.iter().enumerate() {
        if v["sha256"].as_str() != Some(expected) {
            bail!("rank {r} holds different bytes: {v}");
        }
    }
    Ok(())
}

struct Faults {
    kill_rank: Option<usize>,
    absent_rank: Option<usize>,
    coordinator: Option<String>,
}

fn bench(n: usize, size_mb: usize, rounds: usize, timeout: Duration, faults: Faults, json_out: bool) -> Result<()> {
    if n == 0 || size_mb == 0 || rounds == 0 {
        bail!("--ranks, --size-mb and --rounds must be at least 1");
    }
    for (flag, r) in [("--kill-rank", faults.kill_rank), ("--absent-rank", faults.absent_rank)] {
        if r.is_some_and(|r| r == 0 || r >= n) {
            bail!("{flag} must name a receiving rank, 1..{n} (rank 0 is the sender)");
        }
    }
    let rt = probe()?;
    eprintln!("{rt}; {n} rank processes, {size_mb} MiB, timeout {timeout:?}");
    let _ = COORDINATOR.set(faults.coordinator.clone());
    let len = size_mb << 20;
    let bootstrap = faults.coordinator.as_deref().map_or("stdin".to_string(), |c| format!("coordinator {c}"));
    let mut report = json!({"runtime": rt.to_string(), "ranks": n, "size_mb": size_mb, "bootstrap": bootstrap});
    let kill_rank = faults.kill_rank;
    let mut procs: Vec<RankProc>;
    if let Some(a) = faults.absent_rank {
        // Every rank but `a` joins a communicator of `n`: the join must time out (not hang) on each of them.
        procs = (0..n - 1).map(|_| RankProc::start()).collect::<Result<_>>()?;
        let numbers: Vec<usize> = (0..n).filter(|&r| r != a).collect();
        let start = Instant::now();
        let replies = init_as(&mut procs.iter_mut().collect::<Vec<_>>(), &numbers, n, timeout)?;
        let detected = start.elapsed().as_secs_f64();
        if all_ok(&replies) {
            bail!("a communicator of {n} was created although rank {a} never joined");
        }
        let failed = errors(&replies);
        eprintln!("rank {a} absent: joining ended in {detected:.2} s on every other rank: {failed:?}");
        report["absent"] = json!({"absent_rank": a, "detected_s": detected, "errors": failed});
        report["ranks"] = json!(n - 1);
        // The rounds below run on a communicator rebuilt over the ranks that are there.
        let start = Instant::now();
        let replies = init_all(&mut procs.iter_mut().collect::<Vec<_>>(), timeout)?;
        report["absent"]["rebuild_s"] = json!(start.elapsed().as_secs_f64());
        if !all_ok(&replies) {
            bail!("rebuilding without rank {a} failed: {:?}", errors(&replies));
        }
    } else {
        procs = (0..n).map(|_| RankProc::start()).collect::<Result<_>>()?;
    }
    let replies = if faults.absent_rank.is_some() {
        vec![json!({"ok": true, "seconds": report["absent"]["rebuild_s"]})]
    } else {
        init_all(&mut procs.iter_mut().collect::<Vec<_>>(), timeout)?
    };
    report["init_s"] = json!(max_seconds(&replies));
    if !all_ok(&replies) {
        report["error"] = json!(errors(&replies));
        println!("{report}");
        bail!("creating the communicator failed: {:?}", errors(&replies));
    }
    let mut seconds = Vec::new();
    for round in 0..rounds {
        let seed = 1000 + round as u64;
        let replies = bcast_all(&mut procs.iter_mut().collect::<Vec<_>>(), len, seed, timeout)?;
        if !all_ok(&replies) {
            bail!("broadcast {round} failed: {:?}", errors(&replies));
        }
        verify(&replies, &hex::encode(Sha256::digest(seeded(len, seed))))?;
        seconds.push(max_seconds(&replies));
        eprintln!("broadcast {round}: {:.4} s, every rank verified", seconds[round]);
    }
    let best = seconds.iter().copied().fold(f64::INFINITY, f64::min);
    report["seconds"] = json!(seconds);
    report["gb_per_s"] = json!(len as f64 / best / 1e9);

    if let Some(k) = kill_rank {
        // The rank dies before it joins the next broadcast: the others are left waiting inside the collective.
        procs[k].child.kill()?;
        procs[k].child.wait()?;
        let killed = Instant::now();
        let mut survivors: Vec<&mut RankProc> =
            procs.iter_mut().enumerate().filter(|(i, _)| *i != k).map(|(_, p)| p).collect();
        let replies = bcast_all(&mut survivors, len, 7, timeout)?;
        let detected = killed.elapsed().as_secs_f64();
        if all_ok(&replies) {
            bail!("the broadcast finished although rank {k} was dead");
        }
        let failed = errors(&replies);
        eprintln!("rank {k} killed: the survivors' broadcast ended in {detected:.2} s: {failed:?}");
        // Rebuild over the survivors with a fresh id, then broadcast again.
        let start = Instant::now();
        let init = init_all(&mut survivors, timeout)?;
        if !all_ok(&init) {
            bail!("rebuilding over the survivors failed: {:?}", errors(&init));
        }
        let rebuilt = start.elapsed().as_secs_f64();
        let replies = bcast_all(&mut survivors, len, 8, timeout)?;
        if !all_ok(&replies) {
            bail!("the broadcast over the survivors failed: {:?}", errors(&replies));
        }
        verify(&replies, &hex::encode(Sha256::digest(seeded(len, 8))))?;
        eprintln!("rebuilt over {} survivors in {rebuilt:.2} s; their broadcast verified", survivors.len());
        report["fault"] = json!({
            "killed_rank": k,
            "detected_s": detected,
            "errors": failed,
            "rebuild_s": rebuilt,
            "survivors": survivors.len(),
            "after_rebuild_s": max_seconds(&replies),
        });
    }
    if json_out {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
