//! The deployment files (`k8s/`, `deploy/`) hold together without a cluster: every manifest parses, every resource
//! and patch a kustomization names exists and applies, every `engram` container's arguments are accepted by this
//! very binary, and the image build copies paths that exist. (No Kubernetes or Docker here: what they would catch
//! at apply time beyond this is the cluster's business, e.g. a missing ReadWriteMany storage class.)

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().map(|s| s.iter().map(|x| x.as_str().expect("a string").to_string()).collect()).unwrap_or_default()
}

/// Runs `engram ARGS --help` with every `$(VAR)` replaced: clap parses the arguments before `--help`, so an unknown
/// flag or a malformed value fails it.
fn engram_accepts(args: &[String], whence: &str) {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            let mut a = a.clone();
            while let (Some(i), true) = (a.find("$("), a.contains(')')) {
                let j = a[i..].find(')').expect("closing paren") + i;
                a.replace_range(i..=j, "x");
            }
            a
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_engram")).args(&args).arg("--help").output().expect("run engram");
    assert!(
        out.status.success(),
        "{whence}: engram {} is refused: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every resource in a kustomization directory, base resources included, by (kind, name).
fn resources(dir: &Path) -> Vec<Value> {
    let k = documents(&dir.join("kustomization.yaml")).remove(0);
    let mut out = Vec::new();
    for r in strings(&k["resources"]) {
        let p = dir.join(&r);
        assert!(p.exists(), "{}: resource {r} does not exist", dir.display());
        if p.is_dir() {
            out.extend(resources(&p));
        } else {
            out.extend(documents(&p));
        }
    }
    out
}

fn find<'a>(all: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    all.iter().find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
}

/// A JSON pointer (`/a/0/b`) into a YAML value.
fn pointer<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('/').skip(1).try_fold(v, |v, key| match key.parse::<usize>() {
        Ok(i) if v.is_sequence() => v.get(i),
        _ => v.get(key),
    })
}

#[test]
fn kubernetes_manifests_hold_together_and_their_engram_arguments_parse() {
    let mut checked = 0;
    for overlay in ["k8s/base", "k8s/overlays/small"] {
        let dir = root().join(overlay);
        let k = documents(&dir.join("kustomization.yaml")).remove(0);
        let all = resources(&dir);
        for r in k["replicas"].as_sequence().into_iter().flatten() {
            let name = r["name"].as_str().unwrap();
            assert!(
                ["Deployment", "StatefulSet"].iter().any(|kind| find(&all, kind, name).is_some()),
                "{overlay}: replicas names {name}, which is no Deployment or StatefulSet"
            );
        }
        for p in k["patches"].as_sequence().into_iter().flatten() {
            let file = dir.join(p["path"].as_str().unwrap());
            let (kind, name) = (p["target"]["kind"].as_str().unwrap(), p["target"]["name"].as_str().unwrap());
            let target = find(&all, kind, name).unwrap_or_else(|| panic!("{overlay}: patch target {kind}/{name}"));
            // JSON 6902 patches: each `test` must hold on the base, each path must exist.
            for op in documents(&file).remove(0).as_sequence().unwrap() {
                let path = op["path"].as_str().unwrap();
                let at = pointer(target, path).unwrap_or_else(|| panic!("{}: no {path} in {name}", file.display()));
                if op["op"].as_str() == Some("test") {
                    assert_eq!(at, &op["value"], "{}: test at {path} fails on the base", file.display());
                }
            }
        }
        for d in &all {
            let Some(spec) = d["spec"]["template"]["spec"].as_mapping() else { continue };
            let name = d["metadata"]["name"].as_str().unwrap();
            // Every claim and config map a pod refers to is part of the deployment.
            for v in spec.get("volumes").and_then(Value::as_sequence).into_iter().flatten() {
                if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                    assert!(find(&all, "PersistentVolumeClaim", claim).is_some(), "{name}: claim {claim} missing");
                }
            }
            for c in spec["containers"].as_sequence().unwrap() {
                for e in c["envFrom"].as_sequence().into_iter().flatten() {
                    let cm = e["configMapRef"]["name"].as_str().unwrap();
                    assert!(find(&all, "ConfigMap", cm).is_some(), "{name}: config map {cm} missing");
                }
                if c["image"].as_str() == Some("engram") {
                    engram_accepts(&strings(&c["args"]), &format!("{overlay} {name}"));
                    checked += 1;
                }
            }
            // A headless service per StatefulSet, as the advertised addresses assume.
            if d["kind"].as_str() == Some("StatefulSet") {
                let svc = d["spec"]["serviceName"].as_str().unwrap();
                let s = find(&all, "Service", svc).unwrap_or_else(|| panic!("{name}: service {svc} missing"));
                assert_eq!(s["spec"]["clusterIP"].as_str(), Some("None"), "{svc} is not headless");
            }
        }
    }
    assert_eq!(checked, 6, "three engram workloads in the base and in the overlay");
}

#[test]
fn the_compose_file_and_the_image_build_hold_together() {
    let compose = documents(&root().join("deploy/compose.yaml")).remove(0);
    let mut checked = 0;
    for (name, s) in compose["services"].as_mapping().unwrap() {
        let image = s["image"].as_str().or_else(|| compose["x-engram"]["image"].as_str());
        if s.get("command").is_some() && image == Some("engram:dev") && name.as_str() != Some("etcd") {
            engram_accepts(&strings(&s["command"]), &format!("compose {}", name.as_str().unwrap()));
            checked += 1;
        }
    }
    assert_eq!(checked, 5, "coordinator, two workers and two replicas");
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let src = line.split_whitespace().nth(1).unwrap();
        assert!(root().join(src).exists(), "the Dockerfile copies {src}, which does not exist");
    }
    // What the image's defaults name must be in it.
    for model in ["models/base/model.safetensors", "models/hypernet"] {
        assert!(root().join(model).exists(), "{model}");
    }
}
