//! `engramctl`: the operator's view of Engram's adapter lineage: what each namespace serves, where it came from,
//! and how to take it back. With `--coordinator` (or `ENGRAM_COORDINATOR`) the commands the coordinator serves go
//! through its API, so head moves reach the replicas; everything else, and every command without it, reads and
//! writes the lineage store directly (disaster recovery: it works with the coordinator down).
#![forbid(unsafe_code)]

mod api;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use engram_lineage::{admin, format_ms, ops::show, BlobStore, Event, EventKind, LineageStore, NewVersion, Version};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "engramctl",
    version,
    about = "Inspect and operate Engram's adapter lineage: log, show, diff, rollback, promote, tag, history, gc"
)]
pub(crate) struct Cli {
    /// Lineage store: file://DIR (embedded) or etcd://HOST:PORT[,HOST:PORT...][/PREFIX].
    #[arg(long, global = true, env = "ENGRAM_STORE", default_value = "file://engram-data")]
    store: String,
    /// Blob store holding delta bytes: file://DIR or s3://BUCKET[/PREFIX]. Defaults to DIR/blobs for a file:// store.
    #[arg(long, global = true, env = "ENGRAM_BLOBS")]
    blobs: Option<String>,
    /// Machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The coordinator (http://HOST:PORT). Log, show, create-namespace, rollback, promote, job and replicas then go
    /// through its API (rollback and promote reach every replica); the rest still use --store.
    #[arg(long, global = true, env = "ENGRAM_COORDINATOR")]
    coordinator: Option<String>,
    /// Who is acting, recorded in the history.
    #[arg(long, global = true, env = "USER", default_value = "operator")]
    actor: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// List namespaces and the version each serves.
    Namespaces,
    /// Create a namespace over a base model.
    CreateNamespace {
        namespace: String,
        /// Hash of the base model (see the model's MODEL_CARD or `engram eval base --json`).
        #[arg(long)]
        base_model: String,
    },
    /// A namespace's versions, newest first.
    Log {
        namespace: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One version's metadata and ancestry. VERSION: id, unique id prefix, or (with --namespace) a tag or `head`.
    Show {
        version: String,
        #[arg(long, short)]
        namespace: Option<String>,
    },
    /// Per-layer norms of the weight change from version A to version B.
    Diff {
        a: String,
        b: String,
        #[arg(long, short)]
        namespace: Option<String>,
    },
    /// Move a namespace's head back to an ancestor (or `base`: no adapter).
    Rollback {
        namespace: String,
        /// The ancestor to serve: id, prefix, tag, or `base`.
        #[arg(long)]
        to: String,
        /// Why; recorded in the history.
        #[arg(long)]
        reason: String,
    },
    /// Move a namespace's head forward to a candidate built on it.
    Promote { namespace: String, version: String },
    /// Name a version (moving the tag if it exists).
    Tag { namespace: String, tag: String, version: String },
    /// A namespace's append-only event history, newest first.
    History {
        namespace: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Record a delta file (engram LoRA safetensors) as a candidate version of a namespace.
    Import {
        namespace: String,
        delta: PathBuf,
        /// Parent version (default: the current head).
        #[arg(long)]
        parent: Option<String>,
        /// Promote it right away (compare-and-swap on the parent).
        #[arg(long)]
        promote: bool,
    },
    /// Print head changes of a namespace as they happen.
    Watch {
        namespace: String,
        /// Stop after this many changes (the first is the current head).
        #[arg(long)]
        count: Option<usize>,
    },
    /// A consolidation job's state, version and timings (needs --coordinator).
    Job { id: String },
    /// Serving replicas and the version each serves per namespace (needs --coordinator).
    Replicas,
    /// Delete blobs no head or tag can reach. Dry run unless --apply.
    Gc {
        #[arg(long)]
        apply: bool,
        /// Spare blobs younger than this many seconds (a writer may be about to record them).
        #[arg(long, default_value_t = 3600)]
        min_age_s: u64,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("ENGRAM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("engramctl: {e:#}");
        std::process::exit(1);
    }
}

fn blob_url(cli: &Cli) -> Result<String> {
    if let Some(b) = &cli.blobs {
        return Ok(b.clone());
    }
    match cli.store.strip_prefix("file://") {
        Some(dir) => Ok(format!("file://{}", std::path::Path::new(dir).join("blobs").display())),
        None => bail!("this command reads delta bytes: pass --blobs (or ENGRAM_BLOBS) for a non-file store"),
    }
}

pub(crate) fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Left-aligned columns, two spaces apart.
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn describe(kind: &EventKind) -> String {
    match kind {
        EventKind::NamespaceCreated { base_model } => format!("namespace created over base model {base_model}"),
        EventKind::VersionCreated { version, parent } => {
            format!("version {} created on {}", version.short(), show(parent))
        }
        EventKind::Promoted { from, to } => format!("head {} -> {} (promote)", show(from), to.short()),
        EventKind::RolledBack { from, to } => format!("head {} -> {} (rollback)", show(from), show(to)),
        EventKind::Rejected { version } => format!("version {} rejected", version.short()),
        EventKind::Tagged { tag, version } => format!("tag {tag} -> {}", version.short()),
    }
}

fn metrics(m: &BTreeMap<String, f64>) -> String {
    m.iter().map(|(k, v)| format!("{k}={v:.3}")).collect::<Vec<_>>().join(" ")
}

async fn run(cli: Cli) -> Result<()> {
    if let Some(address) = &cli.coordinator {
        if api::run(&cli, address).await? {
            return Ok(());
        }
    } else if matches!(cli.command, Command::Job { .. } | Command::Replicas) {
        bail!("this command asks the coordinator: pass --coordinator http://HOST:PORT (or ENGRAM_COORDINATOR)");
    }
    let store: Arc<dyn LineageStore> =
        engram_lineage::open(&cli.store).await.with_context(|| format!("opening lineage store {}", cli.store))?;
    let s = store.as_ref();
    match &cli.command {
        Command::Namespaces => {
            let all = s.namespaces().await?;
            if cli.json {
                return print_json(&all);
            }
            table(
                &["NAMESPACE", "HEAD", "BASE MODEL", "EVENTS", "CREATED"],
                all.iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            show(&n.head),
                            n.base_model.clone(),
                            n.seq.to_string(),
                            format_ms(n.created_at_ms),
                        ]
                    })
                    .collect(),
            );
        }
        Command::CreateNamespace { namespace, base_model } => {
            let ns = s.create_namespace(namespace, base_model, &cli.actor).await?;
            if cli.json {
                return print_json(&ns);
            }
            println!("created namespace {} over base model {}", ns.name, ns.base_model);
        }
        Command::Log { namespace, limit } => {
            let head = s.namespace(namespace).await?.head;
            let log = s.log(namespace, Some(*limit)).await?;
            if cli.json {
                return print_json(&log);
            }
            table(
                &["VERSION", "STATUS", "PARENT", "CREATED", "CREATOR", "INJECTOR", "GATE"],
                log.iter()
                    .map(|v| {
                        let mark = if Some(&v.id) == head.as_ref() { " *" } else { "" };
                        vec![
                            format!("{}{mark}", v.id.short()),
                            v.status.to_string(),
                            show(&v.parent),
                            format_ms(v.created_at_ms),
                            v.creator.clone(),
                            v.injector.clone(),
                            metrics(&v.gate_metrics),
                        ]
                    })
                    .collect(),
            );
        }
        Command::Show { version, namespace } => {
            let id = s.resolve(namespace.as_deref(), version).await?;
            let v = s.version(&id).await?;
            let ancestry: Vec<Version> = s.ancestry(&id, None).await?;
            if cli.json {
                #[derive(Serialize)]
                struct Shown<'a> {
                    version: &'a Version,
                    ancestry: Vec<&'a engram_lineage::VersionId>,
                }
                return print_json(&Shown { version: &v, ancestry: ancestry.iter().skip(1).map(|a| &a.id).collect() });
            }
            println!("version     {}", v.id);
            println!("namespace   {}", v.namespace);
            println!("status      {}", v.status);
            println!("parent      {}", v.parent.as_ref().map_or("base".to_string(), |p| p.to_string()));
            println!("base model  {}", v.base_model);
            println!("delta       sha256:{} ({} bytes)", v.delta_hash, v.delta_size);
            if let Some(b) = &v.delta_blake3 {
                println!("            blake3:{b} (what replicas check a staged copy against)");
            }
            println!("injector    {}", v.injector);
            println!("job         {}", v.job_id);
            println!("documents   {}", v.document_digests.join(", "));
            println!("gate        {}", metrics(&v.gate_metrics));
            if !v.compacts.is_empty() {
                let replaced: Vec<&str> = v.compacts.iter().map(|c| c.short()).collect();
                println!("compacts    {} (rollback can still reach each of them)", replaced.join(" -> "));
            }
            println!("created     {} by {}", format_ms(v.created_at_ms), v.creator);
            let chain: Vec<&str> = ancestry.iter().map(|a| a.id.short()).collect();
            println!("ancestry    {} -> base", chain.join(" -> "));
        }
        Command::Diff { a, b, namespace } => {
            let blobs = BlobStore::open(&blob_url(&cli)?)?;
            let (a, b) = (s.resolve(namespace.as_deref(), a).await?, s.resolve(namespace.as_deref(), b).await?);
            let d = admin::diff(s, &blobs, &a, &b).await?;
            if cli.json {
                return print_json(&d);
            }
            let ids =
                |v: &[engram_lineage::VersionId]| v.iter().map(|i| i.short().to_string()).collect::<Vec<_>>().join(" ");
            println!("from {} to {} (common ancestor {})", a.short(), b.short(), show(&d.common_ancestor));
            println!("removes [{}], adds [{}]", ids(&d.removed), ids(&d.added));
            table(
                &["LAYER", "||dW||_F"],
                d.layer_norms.iter().map(|(l, n)| vec![l.to_string(), format!("{n:.6}")]).collect(),
            );
        }
        Command::Rollback { namespace, to, reason } => {
            let head = s.namespace(namespace).await?.head;
            let target = if to == "base" { None } else { Some(s.resolve(Some(namespace), to).await?) };
            let c = s.rollback(namespace, head.as_ref(), target.as_ref(), &cli.actor, reason).await?;
            if cli.json {
                return print_json(&c);
            }
            println!("{namespace}: head {} -> {} (rolled back by {})", show(&head), show(&c.head), cli.actor);
        }
        Command::Promote { namespace, version } => {
            let head = s.namespace(namespace).await?.head;
            let id = s.resolve(Some(namespace), version).await?;
            let c = s.promote(namespace, head.as_ref(), &id, &cli.actor).await?;
            if cli.json {
                return print_json(&c);
            }
            println!("{namespace}: head {} -> {}", show(&head), show(&c.head));
        }
        Command::Tag { namespace, tag, version } => {
            let id = s.resolve(Some(namespace), version).await?;
            s.tag(namespace, tag, &id, &cli.actor).await?;
            if cli.json {
                return print_json(&serde_json::json!({"namespace": namespace, "tag": tag, "version": id}));
            }
            println!("{namespace}: tag {tag} -> {}", id.short());
        }
        Command::History { namespace, limit } => {
            let events: Vec<Event> = s.history(namespace, Some(*limit)).await?;
            if cli.json {
                return print_json(&events);
            }
            table(
                &["SEQ", "TIME", "ACTOR", "EVENT", "REASON"],
                events
                    .iter()
                    .map(|e| {
                        vec![
                            e.seq.to_string(),
                            format_ms(e.at_ms),
                            e.actor.clone(),
                            describe(&e.kind),
                            e.reason.clone().unwrap_or_default(),
                        ]
                    })
                    .collect(),
            );
        }
        Command::Import { namespace, delta, parent, promote } => {
            let bytes = std::fs::read(delta).with_context(|| format!("reading {}", delta.display()))?;
            engram_lora::Delta::decode(&bytes)
                .with_context(|| format!("{} is not an engram LoRA delta", delta.display()))?;
            let blobs = BlobStore::open(&blob_url(&cli)?)?;
            let parent = match parent {
                Some(p) => Some(s.resolve(Some(namespace), p).await?),
                None => s.namespace(namespace).await?.head,
            };
            let new = NewVersion {
                namespace: namespace.clone(),
                parent: parent.clone(),
                injector: "import".into(),
                job_id: format!("import:{}", delta.display()),
                creator: cli.actor.clone(),
                ..Default::default()
            };
            let v = admin::record(s, &blobs, new, bytes.into()).await?;
            if *promote {
                s.promote(namespace, parent.as_ref(), &v.id, &cli.actor).await?;
            }
            if cli.json {
                return print_json(&s.version(&v.id).await?);
            }
            println!(
                "{namespace}: recorded {} on {}{}",
                v.id.short(),
                show(&parent),
                if *promote { ", now the head" } else { "" }
            );
        }
        Command::Watch { namespace, count } => {
            let mut w = s.watch_head(namespace).await?;
            let mut seen = 0;
            while let Some(c) = w.next().await {
                let c = c?;
                if cli.json {
                    println!("{}", serde_json::to_string(&c)?);
                } else {
                    println!("{}  {namespace}: head {}", format_ms(engram_lineage::now_ms()), show(&c.head));
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
        }
        Command::Job { .. } | Command::Replicas => unreachable!("answered by the coordinator above"),
        Command::Gc { apply, min_age_s } => {
            let blobs = BlobStore::open(&blob_url(&cli)?)?;
            let r = admin::gc(s, &blobs, *apply, min_age_s * 1000).await?;
            if cli.json {
                return print_json(&r);
            }
            let verb = if *apply { "deleted" } else { "would delete (dry run; --apply to delete)" };
            println!(
                "{} blobs: {} reachable, {} too young to judge, {verb} {} ({} bytes)",
                r.blobs,
                r.kept,
                r.too_young,
                r.unreachable.len(),
                r.unreachable_bytes
            );
            for h in &r.unreachable {
                println!("  {h}");
            }
        }
    }
    Ok(())
}
