//! The commands that go through the coordinator when `--coordinator` is given: head moves then reach the replicas
//! (staged, swapped, committed) instead of only the store, and the operator needs no store credentials.

use anyhow::Result;
use engram_sdk::pb;

use crate::{print_json, table, Cli, Command};

fn short(id: &str) -> &str {
    if id.is_empty() {
        "base"
    } else {
        &id[..id.len().min(12)]
    }
}

fn metrics(m: &std::collections::HashMap<String, f64>) -> String {
    let mut kv: Vec<_> = m.iter().collect();
    kv.sort_by(|a, b| a.0.cmp(b.0));
    kv.iter().map(|(k, v)| format!("{k}={v:.3}")).collect::<Vec<_>>().join(" ")
}

fn time(ms: i64) -> String {
    engram_lineage::format_ms(ms.max(0) as u64)
}

/// Runs the command through the coordinator; `Ok(false)` when this command only exists against the store.
pub async fn run(cli: &Cli, address: &str) -> Result<bool> {
    let client = engram_sdk::Client::connect(address).await?.with_actor(&cli.actor);
    let mut raw = client.raw();
    match &cli.command {
        Command::CreateNamespace { namespace, base_model } => {
            let ns = client.create_namespace(namespace, base_model).await?;
            if cli.json {
                print_json(&serde_json::json!({ "name": ns.name, "base_model": ns.base_model, "head": ns.head }))?;
            } else {
                println!("created namespace {} over base model {}", ns.name, ns.base_model);
            }
        }
        Command::Log { namespace, limit } => {
            let log = client.versions(namespace, *limit as u32).await?;
            if cli.json {
                let rows: Vec<_> = log
                    .versions
                    .iter()
                    .map(|v| serde_json::json!({ "id": v.id, "status": v.status, "parent": v.parent, "job": v.job, "injector": v.injector, "metrics": v.metrics }))
                    .collect();
                return print_json(&serde_json::json!({ "head": log.head, "versions": rows })).map(|_| true);
            }
            table(
                &["VERSION", "STATUS", "PARENT", "CREATED", "CREATOR", "INJECTOR", "METRICS"],
                log.versions
                    .iter()
                    .map(|v| {
                        let mark = if v.id == log.head { " *" } else { "" };
                        vec![
                            format!("{}{mark}", short(&v.id)),
                            v.status.clone(),
                            short(&v.parent).to_string(),
                            time(v.created_ms),
                            v.created_by.clone(),
                            v.injector.clone(),
                            metrics(&v.metrics),
                        ]
                    })
                    .collect(),
            );
        }
        Command::Show { version, namespace } => {
            let r =
                pb::GetVersionRequest { namespace: namespace.clone().unwrap_or_default(), version: version.clone() };
            let v = raw.get_version(r).await?.into_inner();
            if cli.json {
                return print_json(&serde_json::json!({ "id": v.id, "namespace": v.namespace, "status": v.status, "parent": v.parent, "delta_hash": v.delta_hash, "delta_bytes": v.delta_bytes, "job": v.job, "injector": v.injector, "metrics": v.metrics, "created_by": v.created_by })).map(|_| true);
            }
            println!("version     {}", v.id);
            println!("namespace   {}", v.namespace);
            println!("status      {}", v.status);
            println!("parent      {}", if v.parent.is_empty() { "base" } else { &v.parent });
            println!("delta       sha256:{} ({} bytes)", v.delta_hash, v.delta_bytes);
            println!("injector    {}", v.injector);
            println!("job         {}", v.job);
            println!("documents   {}", v.document_digests.join(", "));
            println!("metrics     {}", metrics(&v.metrics));
            println!("created     {} by {}", time(v.created_ms), v.created_by);
        }
        Command::Rollback { namespace, to, reason } => {
            let before = client.versions(namespace, 1).await?.head;
            let target = if to == "base" { "" } else { to.as_str() };
            let ns = client.rollback(namespace, target, reason).await?;
            if cli.json {
                return print_json(&serde_json::json!({ "namespace": ns.name, "head": ns.head, "seq": ns.seq }))
                    .map(|_| true);
            }
            println!(
                "{namespace}: head {} -> {} on every replica (rolled back by {})",
                short(&before),
                short(&ns.head),
                cli.actor
            );
        }
        Command::Promote { namespace, version } => {
            let before = client.versions(namespace, 1).await?.head;
            let r = pb::PromoteRequest {
                namespace: namespace.clone(),
                version: version.clone(),
                expected_head: before.clone(),
                actor: cli.actor.clone(),
            };
            let ns = raw.promote(r).await?.into_inner();
            if cli.json {
                return print_json(&serde_json::json!({ "namespace": ns.name, "head": ns.head, "seq": ns.seq }))
                    .map(|_| true);
            }
            println!("{namespace}: head {} -> {} on every replica", short(&before), short(&ns.head));
        }
        Command::Job { id } => {
            let j = client.job(id).await?;
            let t = j.timings.unwrap_or_default();
            if cli.json {
                return print_json(&serde_json::json!({ "id": j.id, "namespace": j.namespace, "state": format!("{:?}", j.state()), "version": j.version, "attempts": j.attempts, "error": j.error, "queue_ms": t.queue_ms, "inject_ms": t.inject_ms, "stage_ms": t.stage_ms, "commit_ms": t.commit_ms })).map(|_| true);
            }
            println!("job         {}", j.id);
            println!("namespace   {}", j.namespace);
            println!("state       {:?}", j.state());
            println!("version     {}", if j.version.is_empty() { "-" } else { &j.version });
            println!("attempts    {} (last worker {})", j.attempts, if j.worker.is_empty() { "-" } else { &j.worker });
            if !j.error.is_empty() {
                println!("error       {}", j.error);
            }
            println!(
                "timings     queue {:.0} ms, worker {:.0} ms, stage {:.0} ms, commit {:.0} ms",
                t.queue_ms, t.inject_ms, t.stage_ms, t.commit_ms
            );
        }
        Command::Replicas => {
            let rs = client.replicas("").await?;
            if cli.json {
                let rows: Vec<_> = rs.iter().map(|r| serde_json::json!({ "id": r.id, "address": r.address, "ready": r.ready, "serving": r.serving, "transports": r.transports })).collect();
                return print_json(&rows).map(|_| true);
            }
            table(
                &["REPLICA", "ADDRESS", "READY", "SERVING"],
                rs.iter()
                    .map(|r| {
                        let mut s: Vec<String> = r.serving.iter().map(|(n, v)| format!("{n}={}", short(v))).collect();
                        s.sort();
                        vec![r.id.clone(), r.address.clone(), r.ready.to_string(), s.join(" ")]
                    })
                    .collect(),
            );
        }
        _ => return Ok(false),
    }
    Ok(true)
}
