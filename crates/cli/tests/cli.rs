//! The `engram` binary as a user runs it.

use std::path::Path;
use std::process::{Command, Output};

fn engram(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_engram")).args(args).output().expect("engram runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_explains_every_command() {
    let o = engram(&["--help"]);
    assert!(o.status.success());
    let text = stdout(&o);
    for cmd in ["demo", "world", "train", "eval", "bench", "inject", "ask"] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
    let o = engram(&["eval", "base", "--help"]);
    assert!(stdout(&o).contains("--seed") && stdout(&o).contains("--json"));
}

#[test]
fn world_sample_shows_every_split_and_task() {
    let o = engram(&["world", "sample", "--count", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for section in ["known people", "fresh people", "reading documents", "held-out question phrasing", "skills"] {
        assert!(text.contains(section), "missing {section}: {text}");
    }
    assert_eq!(text, stdout(&engram(&["world", "sample", "--count", "1"])), "sampling is not deterministic");
    assert_ne!(text, stdout(&engram(&["world", "sample", "--count", "1", "--seed", "2"])));
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let o = engram(&["eval", "base", "--model", "/nonexistent/model-dir"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("/nonexistent/model-dir") && err.contains("config.json"), "{err}");
}

#[test]
fn train_eval_and_bench_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");
    let out_s = out.to_str().unwrap();
    let o = engram(&["train", "base", "--tiny", "--steps", "30", "--out", out_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(Path::new(&out).join("MODEL_CARD.md").is_file());

    let o = engram(&["eval", "base", "--model", out_s, "--json", "--items", "10", "--seed", "5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON object on stdout");
    for key in ["icl_single", "icl_multi", "icl_heldout_phrasing", "closed_book_known", "closed_book_fresh", "skills"] {
        let v = report[key].as_f64().unwrap_or_else(|| panic!("{key} missing"));
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert_eq!(report["seed"], 5);

    let o = engram(&["bench", "forward", "--model", out_s, "--json", "--rounds", "2", "--seq-len", "32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bench: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(bench["ratio"].as_f64().unwrap() > 0.0);
    assert!(bench["max_abs_logit_diff"].as_f64().unwrap() < 1e-4);

    // Inject a document, then ask with the native delta and with its PEFT export: same answer either way.
    let doc = dir.path().join("doc.txt");
    std::fs::write(&doc, "<doc> Fenkin Drerusley works for Rusrusworks . Fenkin Drerusley has a pet eldmavet . </doc>")
        .unwrap();
    let adapter = dir.path().join("adapter");
    let (doc_s, adapter_s) = (doc.to_str().unwrap(), adapter.to_str().unwrap());
    let o = engram(&[
        "inject",
        "--doc",
        doc_s,
        "--out",
        adapter_s,
        "--model",
        out_s,
        "--injector",
        "distill",
        "--steps",
        "3",
        "--peft",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("content hash"), "{}", stdout(&o));
    let q = "where does Fenkin Drerusley work ?";
    let native = engram(&["ask", "--model", out_s, "--adapter", adapter_s, q]);
    let peft = adapter.join("peft");
    let peft = engram(&["ask", "--model", out_s, "--adapter", peft.to_str().unwrap(), q]);
    assert!(native.status.success() && peft.status.success(), "{}{}", stderr(&native), stderr(&peft));
    assert_eq!(stdout(&native), stdout(&peft));

    // Bad input is refused with the reason.
    let o = engram(&["ask", "--model", out_s, "where does Zzyzx work ?"]);
    assert!(!o.status.success() && stderr(&o).contains("outside the model's vocabulary"), "{}", stderr(&o));
    std::fs::write(&doc, "nobody is named here").unwrap();
    let o = engram(&["inject", "--doc", doc_s, "--out", adapter_s, "--model", out_s, "--injector", "distill"]);
    assert!(!o.status.success() && stderr(&o).contains("names nobody"), "{}", stderr(&o));
    // The shipped hypernetwork was trained for the shipped base model, not this one.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/hypernet");
    let o = engram(&["inject", "--doc", doc_s, "--out", adapter_s, "--model", out_s, "--hypernet", shipped]);
    assert!(!o.status.success() && stderr(&o).contains("was trained for base model"), "{}", stderr(&o));
    let o = engram(&["ask", "--model", out_s, "--adapter", doc_s, q]);
    assert!(!o.status.success(), "a file is not an adapter directory");
}
