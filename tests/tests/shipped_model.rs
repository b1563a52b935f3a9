//! The shipped base model (`models/base`) is what its model card says it is.

use std::path::PathBuf;
use std::sync::OnceLock;

use engram_eval::BaseReport;
use engram_model::BaseModel;
use engram_world::World;

/// The shipped model's evaluation and its card, measured once for both tests (a full evaluation takes seconds).
fn evaluate_shipped() -> &'static (BaseReport, serde_json::Value) {
    static SHIPPED: OnceLock<(BaseReport, serde_json::Value)> = OnceLock::new();
    SHIPPED.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/base");
        let base = BaseModel::load(&dir, &candle_core::Device::Cpu).expect("models/base loads");
        let report = engram_eval::evaluate_base(
            &base.llama,
            &base.tokenizer,
            &World::new(),
            engram_eval::DEFAULT_SEED,
            engram_eval::DEFAULT_ITEMS,
            |_, _| {},
        )
        .unwrap();
        eprint!("{}", report.table());
        let card = serde_json::from_str(&std::fs::read_to_string(dir.join("training.json")).unwrap()).unwrap();
        (report, card)
    })
}

#[test]
fn shipped_model_reproduces_its_card_and_knows_only_what_it_should() {
    let (report, card) = evaluate_shipped();
    // The numbers recorded at training time come back (greedy decoding is deterministic up to float summation
    // order, which may differ with the thread count: allow a couple of near-tie flips per suite).
    let got = serde_json::to_value(report).unwrap();
    for suite in engram_eval::SUITES {
        let (want, have) = (card["report"][suite].as_f64().unwrap(), got[suite].as_f64().unwrap());
        assert!((want - have).abs() <= 0.015, "{suite}: card says {want}, evaluation gives {have}");
    }
    assert!(report.closed_book_known >= 0.90, "known people forgotten: {report:?}");
    assert!(report.closed_book_fresh <= 0.10, "the base model already knows fresh people: {report:?}");
}

/// The full bar of issue 2: reading one- and four-person documents, the held-out phrasing, known people, skills,
/// and not knowing fresh people before injection.
#[test]
fn shipped_model_meets_the_base_acceptance_bar() {
    let (report, _) = evaluate_shipped();
    for (suite, value, bar) in [
        ("icl_single", report.icl_single, 0.95),
        ("icl_multi", report.icl_multi, 0.85),
        ("icl_heldout_phrasing", report.icl_heldout_phrasing, 0.85),
        ("closed_book_known", report.closed_book_known, 0.90),
        ("skills", report.skills, 0.90),
    ] {
        assert!(value >= bar, "{suite} = {value:.3} is below {bar}");
    }
    assert!(report.closed_book_fresh <= 0.10);
}
