//! `engram bench broadcast`: how staging time grows with the number of replicas under the pipelined broadcast.
//!
//! On two cores, eight replicas on plain loopback measure the CPU, not the algorithm. So by default the sender and
//! each replica run as separate processes in their own network namespaces, joined through a bridge by veth links that
//! `tc` shapes to a fixed rate in both directions (1 Gbit/s by default), as on a cluster where the link is the
//! bottleneck. The replicas are staging sinks (`engram_transport::sink`): they receive, verify and relay exactly like
//! serving replicas and keep only the hash, since the shipped tiny model's deltas are ~1 MB and this sends hundreds.
//! The bench sets everything up as root and removes it afterwards; `--loopback` runs without namespaces.
//!
//! Fields: `seconds` per replica count; `ratio_8_vs_1` (largest count over one; a sender that sends to each replica in
//! turn scores about the count); `throughput_vs_link` (delta bytes/s to one replica over a raw TCP copy of the same
//! bytes across the same link, measured in the same run); `throughput_vs_loopback` (the same for one replica on
//! loopback without shaping). Every timing is steady state: each sender process stages twice and times the second
//! (raw copies likewise), and every replica has staged one delta before any timing, since a fresh process pays
//! page faults for its buffers on its first delta (`first_delta_cold_s` reports that cost on loopback).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use engram_transport::{sink::Sink, Broadcaster, GrpcStream, Pipelined, Staging, Target, RELAY};
use sha2::{Digest, Sha256};

#[derive(Args, Clone)]
pub struct BroadcastBenchArgs {
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Delta size in MiB.
    #[arg(long, default_value_t = 256)]
    size_mb: usize,
    /// Replica counts to measure, comma-separated.
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    replicas: Vec<usize>,
    /// 1: a chain; K: a K-ary tree.
    #[arg(long, default_value_t = 1)]
    fanout: usize,
    /// Chunk size, KiB: each chunk is checked and relayed on its own.
    #[arg(long, default_value_t = 256)]
    chunk_kb: usize,
    /// Link rate for the namespaces' veth links, Mbit/s.
    #[arg(long, default_value_t = 1000)]
    rate_mbit: u64,
    /// No namespaces, no shaping: everything on loopback.
    #[arg(long)]
    loopback: bool,
    /// Timed rounds per measurement (after an untimed one); each reports its median, the samples beside it.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// A replica or sender process for the bench (hidden subcommands).
#[derive(Args, Clone)]
pub struct NodeArgs {
    /// gRPC address to serve the staging sink on.
    #[arg(long)]
    listen: String,
    /// Address for the raw TCP sink (the link baseline).
    #[arg(long)]
    raw: String,
}

#[derive(Args, Clone)]
pub struct SendArgs {
    /// Targets, `http://host:port` comma-separated, in chain order.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Instead: copy the bytes over raw TCP to this `host:port`.
    #[arg(long)]
    raw: Option<String>,
    #[arg(long)]
    size_mb: usize,
    #[arg(long, default_value_t = 1)]
    fanout: usize,
    #[arg(long, default_value_t = 256)]
    chunk_kb: usize,
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

fn payload(size_mb: usize) -> Staging {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut bytes = Vec::with_capacity(size_mb << 20);
    while bytes.len() < size_mb << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    Staging {
        namespace: "bench".into(),
        version: format!("bench-{size_mb}"),
        chain: vec![],
        hash: hex::encode(Sha256::digest(&bytes)),
        // Both hashes are recorded with a version when its delta is made; the coordinator sends them along.
        blake3: Some(blake3::hash(&bytes).to_hex().to_string()),
        bytes: Bytes::from(bytes),
    }
}

/// A staging sink and a raw TCP sink, until killed.
pub fn node(a: NodeArgs) -> Result<()> {
    crate::service::init_tracing();
    let raw = TcpListener::bind(&a.raw).with_context(|| format!("binding {}", a.raw))?;
    std::thread::spawn(move || {
        for mut s in raw.incoming().flatten() {
            let mut buf = vec![0u8; 1 << 20];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            let _ = s.write_all(b"k");
        }
    });
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("binding {}", a.listen))?;
        let sink = Sink::new(Arc::new(GrpcStream::default()).connector());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        engram_transport::server().add_service(sink.server()).serve_with_incoming(incoming).await?;
        Ok(())
    })
}

/// Broadcasts (or raw copies) from this process: one untimed, then `rounds` timed; prints
/// `{"seconds": median, "samples": [...], "cold_s": the untimed one, "cpu_s": this process's CPU per timed round}`.
pub fn send(a: SendArgs) -> Result<()> {
    let item = payload(a.size_mb);
    let rounds = a.rounds.max(1);
    // A service's runtime, as the coordinator's (the broadcaster moves the work to its staging thread).
    let rt = tokio::runtime::Runtime::new()?;
    let broadcaster = Pipelined::new(a.fanout, a.chunk_kb << 10);
    let once = || -> Result<f64> {
        match &a.raw {
            Some(addr) => raw_copy(addr, &item.bytes),
            None => rt.block_on(stage(&broadcaster, &a.targets, &item)),
        }
    };
    // The first round pays this fresh process's page faults for its send buffers.
    let cold = once()?;
    let cpu = cpu_seconds();
    let samples = (0..rounds).map(|_| once()).collect::<Result<Vec<f64>>>()?;
    let cpu = cpu_seconds().zip(cpu).map(|(after, before)| (after - before) / rounds as f64);
    let seconds = engram_eval::percentile(&samples, 0.5);
    println!("{}", serde_json::json!({ "seconds": seconds, "samples": samples, "cold_s": cold, "cpu_s": cpu }));
    Ok(())
}

/// CPU time this process has used (user and system), from /proc (Linux; 10 ms resolution).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn raw_copy(addr: &str, bytes: &[u8]) -> Result<f64> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).with_context(|| format!("raw copy to {addr}"))?;
    s.write_all(bytes)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Stages `item` as the coordinator does (chunks cut and checksummed as they go, inside the timing); returns the
/// seconds, or an error unless every replica acknowledged a verified copy.
async fn stage(broadcaster: &Pipelined, targets: &[String], item: &Staging) -> Result<f64> {
    let list: Vec<Target> = targets
        .iter()
        .enumerate()
        .map(|(i, a)| Target { id: format!("r{i}"), address: a.clone(), transports: vec![RELAY.to_string()] })
        .collect();
    let start = Instant::now();
    let outcomes = broadcaster.stage(&list, item, Duration::from_secs(600)).await;
    let seconds = start.elapsed().as_secs_f64();
    let ok = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(ack) if ack.ready && ack.received == item.bytes.len() as u64))
        .count();
    if ok != targets.len() {
        bail!("{ok} of {} replicas staged: {outcomes:?}", targets.len());
    }
    Ok(seconds)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().with_context(|| format!("ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn tc(args: &[&str]) -> Result<()> {
    let out = Command::new("tc").args(args).output().with_context(|| format!("tc {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("tc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The namespaces, bridge and links of one run; removed on drop.
struct Net {
    tag: u32,
    names: Vec<String>,
}

impl Net {
    /// Namespace `i` (0 = the sender) at 10.216.{tag}.{10 + i}, its veth shaped to `rate` Mbit/s both ways.
    fn build(n: usize, rate: u64) -> Result<Self> {
        let tag = std::process::id() % 250;
        let mut me = Self { tag, names: Vec::new() };
        let bridge = me.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["link", "set", &bridge, "up"])?;
        let rate = format!("{rate}mbit");
        for i in 0..n {
            let ns = format!("engram-bb{tag}-{i}");
            ip(&["netns", "add", &ns])?;
            me.names.push(ns.clone());
            let (host, inner) = (format!("ebb{tag}h{i}"), format!("ebb{tag}n{i}"));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &host, "master", &bridge])?;
            ip(&["link", "set", &host, "up"])?;
            let exec = |args: &[&str]| ip(&[&["netns", "exec", &ns, "ip"][..], args].concat());
            exec(&["addr", "add", &format!("{}/24", me.addr(i)), "dev", &inner])?;
            exec(&["link", "set", &inner, "up"])?;
            exec(&["link", "set", "lo", "up"])?;
            // Egress of both ends: what the namespace sends, and what it receives.
            let shape = ["root", "tbf", "rate", rate.as_str(), "burst", "1mb", "latency", "100ms"];
            tc(&[&["qdisc", "add", "dev", &host][..], &shape].concat())?;
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "tc", "qdisc", "add", "dev", &inner])
                .args(shape)
                .output()?;
            if !out.status.success() {
                bail!("tc in {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        Ok(me)
    }

    fn bridge(&self) -> String {
        format!("ebb{}br", self.tag)
    }

    fn addr(&self, i: usize) -> String {
        format!("10.216.{}.{}", self.tag, 10 + i)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

fn engram_cmd(wrapper: &[&str]) -> Result<Command> {
    let exe = std::env::current_exe()?;
    Ok(match wrapper.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(exe);
            c
        }
        None => Command::new(exe),
    })
}

/// Waits until something listens on `addr` (loopback only; inside namespaces the sender retries instead).
fn wait_port(addr: &str) -> Result<()> {
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("nothing listening on {addr} after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Runs `engram bench broadcast-send` (in the sender's namespace) and returns its report.
fn run_send(wrapper: &[&str], args: &[String]) -> Result<serde_json::Value> {
    for attempt in 0..50 {
        let out = engram_cmd(wrapper)?.args(["bench", "broadcast-send"]).args(args).stderr(Stdio::piped()).output()?;
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            v["seconds"].as_f64().context("no seconds in the sender's report")?;
            return Ok(v);
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        // The nodes may still be starting: connection refused is retried.
        if attempt < 49 && (err.contains("refused") || err.contains("transport error")) {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        bail!("broadcast-send failed: {err}");
    }
    unreachable!()
}

pub fn run(a: BroadcastBenchArgs) -> Result<()> {
    let max = a.replicas.iter().copied().max().unwrap_or(0);
    if max == 0 || a.size_mb == 0 || a.fanout == 0 {
        bail!("--replicas, --size-mb and --fanout must be at least 1");
    }
    let mut report = serde_json::json!({
        "size_mb": a.size_mb, "fanout": a.fanout, "chunk_kb": a.chunk_kb,
        "mode": if a.loopback { "loopback".to_string() } else { format!("namespaces, {} Mbit/s links", a.rate_mbit) },
    });
    let common = |targets: &[String], rounds: usize| -> Vec<String> {
        vec![
            "--targets".into(),
            targets.join(","),
            "--size-mb".into(),
            a.size_mb.to_string(),
            "--fanout".into(),
            a.fanout.to_string(),
            "--chunk-kb".into(),
            a.chunk_kb.to_string(),
            "--rounds".into(),
            rounds.to_string(),
        ]
    };
    let rounds = a.rounds.to_string();
    // The median of a sender's timed rounds; the samples go into the report under `name`.
    let mut samples = serde_json::Map::new();
    let mut measure = |name: &str, wrapper: &[&str], args: &[String]| -> Result<f64> {
        let v = run_send(wrapper, args)?;
        samples.insert(name.to_string(), v["samples"].clone());
        Ok(v["seconds"].as_f64().unwrap_or(f64::NAN))
    };

    // One replica on loopback, unshaped: staging vs a raw TCP copy.
    {
        let (g, r) = (free_addr()?, free_addr()?);
        let _node = Proc(
            engram_cmd(&[])?
                .args(["bench", "broadcast-node", "--listen", &g, "--raw", &r])
                .stderr(Stdio::null())
                .spawn()?,
        );
        wait_port(&g)?;
        wait_port(&r)?;
        let raw_args =
            ["--raw".into(), r.clone(), "--size-mb".into(), a.size_mb.to_string(), "--rounds".into(), rounds.clone()];
        // Steady state: every sender's first round is untimed, and so is a fresh replica's first delta (it
        // page-faults in its buffers) before this: the first sender's untimed round.
        let first = run_send(&[], &common(&[format!("http://{g}")], 1))?;
        let raw = measure("loopback_raw", &[], &raw_args)?;
        let staged = measure("loopback_staged", &[], &common(&[format!("http://{g}")], a.rounds))?;
        report["first_delta_cold_s"] = first["cold_s"].clone();
        report["loopback"] = serde_json::json!({ "raw_s": raw, "staged_s": staged });
        report["throughput_vs_loopback"] = serde_json::json!(raw / staged);
        eprintln!("loopback, one replica: raw TCP {raw:.2} s, staged {staged:.2} s");
    }

    let net = if a.loopback {
        None
    } else {
        Some(Net::build(max + 1, a.rate_mbit).context(
            "setting up network namespaces and shaped links (needs root and iproute2; --loopback runs without)",
        )?)
    };
    let mut nodes = Vec::new();
    let mut grpc = Vec::new();
    let mut raw_addr = String::new();
    for i in 0..max {
        let (wrapper, g, r): (Vec<String>, String, String) = match &net {
            Some(n) => (
                vec!["ip".into(), "netns".into(), "exec".into(), n.names[i + 1].clone()],
                format!("{}:7400", n.addr(i + 1)),
                format!("{}:7401", n.addr(i + 1)),
            ),
            None => (vec![], free_addr()?, free_addr()?),
        };
        let w: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        nodes.push(Proc(
            engram_cmd(&w)?
                .args(["bench", "broadcast-node", "--listen", &g, "--raw", &r])
                .stderr(Stdio::null())
                .spawn()?,
        ));
        if i == 0 {
            raw_addr = r.clone();
        }
        grpc.push(format!("http://{g}"));
    }
    let sender: Vec<String> = match &net {
        Some(n) => vec!["ip".into(), "netns".into(), "exec".into(), n.names[0].clone()],
        None => vec![],
    };
    let sw: Vec<&str> = sender.iter().map(String::as_str).collect();

    // Warm every replica up (see above), untimed; the raw copy too.
    let warm = run_send(&sw, &common(&grpc, 1))?["cold_s"].as_f64().unwrap_or(f64::NAN);
    eprintln!("warm-up broadcast to all {max} replicas: {warm:.2} s");
    let raw_args = ["--raw".into(), raw_addr, "--size-mb".into(), a.size_mb.to_string(), "--rounds".into(), rounds];
    let raw = measure("link_raw", &sw, &raw_args)?;
    report["link_raw_s"] = serde_json::json!(raw);
    eprintln!("raw TCP copy of {} MiB to one replica: {raw:.2} s", a.size_mb);
    let mut seconds = serde_json::Map::new();
    let mut by_count = std::collections::BTreeMap::new();
    for &n in &a.replicas {
        let s = measure(&n.to_string(), &sw, &common(&grpc[..n], a.rounds))?;
        eprintln!("{n} replica(s): {s:.2} s");
        seconds.insert(n.to_string(), serde_json::json!(s));
        by_count.insert(n, s);
    }
    report["seconds"] = serde_json::Value::Object(seconds);
    if let (Some(&one), Some((&most, &s))) = (by_count.get(&1), by_count.iter().next_back()) {
        report[format!("ratio_{most}_vs_1")] = serde_json::json!(s / one);
        report["throughput_vs_link"] = serde_json::json!(raw / one);
    }
    report["samples"] = serde_json::Value::Object(samples);
    report["rounds"] = serde_json::json!(a.rounds);
    drop(nodes);
    drop(net);
    if a.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn free_addr() -> Result<String> {
    let port = engram_lineage::local_etcd::free_loopback_port().ok_or_else(|| anyhow!("no free loopback port"))?;
    Ok(format!("127.0.0.1:{port}"))
}
