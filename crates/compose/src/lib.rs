//! Composing many deltas without silent damage.
//!
//! A namespace's served state is its base model plus the chain of accepted deltas. Each new document's candidate
//! delta comes from an injector that read it with the base model; a [`Strategy`] turns the candidate into the delta
//! actually appended, given the current head, and learns from every accepted one. The [`gate::Gate`] scores the
//! candidate state on canaries and rejects what would damage the model. [`sequential`] measures a strategy over
//! hundreds of injections (`engram bench sequential`).
#![forbid(unsafe_code)]

pub mod gate;
pub mod keys;
pub mod memit;
pub mod memory;
pub mod nullspace;
pub mod plot;
pub mod sequential;
pub mod state;

use anyhow::{bail, Result};
use engram_lora::Delta;
use engram_model::{Llama, Tokenizer};

pub use gate::{Gate, GateConfig, GateReport};
pub use memit::{Memit, MemitConfig};
pub use memory::{MemoryConfig, SideMemoryStrategy};
pub use nullspace::{NullSpace, NullSpaceConfig};

/// How a candidate delta joins a namespace's chain.
pub trait Strategy: Send {
    fn name(&self) -> &'static str;
    /// The delta to append for `candidate` (made from `document`), given the current `head` state.
    fn compose(&mut self, head: &Llama, document: &str, candidate: Delta) -> Result<Delta>;
    /// Called once the composed delta is accepted; `head` is the new state with it merged.
    fn accepted(&mut self, head: &Llama, document: &str) -> Result<()>;
    /// Protected directions per layer (0 for strategies that protect nothing).
    fn protected_dims(&self) -> Vec<usize> {
        Vec::new()
    }
    /// What the next `compose` builds on, as bytes (empty for a stateless strategy), so another process can
    /// continue the chain with [`Strategy::restore`].
    fn save(&self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    /// What [`restored_strategy`] needs to build this strategy on the bare base model without measuring its protected
    /// keys again: a worker caches it on local disk per base model. It may be large (it is never stored per version);
    /// by default the state `save` writes.
    fn setup(&self) -> Result<Vec<u8>> {
        self.save()
    }
    /// Replaces the state with one `save` wrote (after the same accepted versions).
    fn restore(&mut self, state: &[u8]) -> Result<()> {
        if state.is_empty() {
            Ok(())
        } else {
            bail!("the {} strategy keeps no state, but {} bytes of state were given", self.name(), state.len())
        }
    }
}

/// Adds every delta as it comes: the contrast every other strategy is measured against.
pub struct Naive;

impl Strategy for Naive {
    fn name(&self) -> &'static str {
        "naive"
    }

    fn compose(&mut self, _head: &Llama, _document: &str, candidate: Delta) -> Result<Delta> {
        Ok(candidate)
    }

    fn accepted(&mut self, _head: &Llama, _document: &str) -> Result<()> {
        Ok(())
    }
}

/// The strategies by name, as the CLI and the worker name them.
pub const STRATEGIES: [&str; 4] = ["naive", "nullspace", "memit", "memory"];

/// Builds a strategy by name from what `setup` wrote on the bare base model with the same configuration, skipping
/// the measurement of protected keys (seconds to tens of seconds on a CPU).
pub fn restored_strategy(name: &str, base: &Llama, tokenizer: &Tokenizer, state: &[u8]) -> Result<Box<dyn Strategy>> {
    Ok(match name {
        "naive" => Box::new(Naive),
        "nullspace" => {
            let mut s = NullSpace::empty(base, tokenizer, NullSpaceConfig::default());
            s.restore(state)?;
            Box::new(s)
        }
        "memit" => Box::new(Memit::restored(base, tokenizer, MemitConfig::default(), state)?),
        // Stateless (its entries live in the chain): the setup is the protected positions' residuals.
        "memory" if state.is_empty() => Box::new(SideMemoryStrategy::new(base, tokenizer, MemoryConfig::default())?),
        "memory" => Box::new(SideMemoryStrategy::from_setup(base, tokenizer, MemoryConfig::default(), state)?),
        other => bail!("unknown strategy {other:?}; expected one of {}", STRATEGIES.join(", ")),
    })
}

/// Builds a strategy by name for a namespace whose base model is `base`.
pub fn strategy(name: &str, base: &Llama, tokenizer: &Tokenizer) -> Result<Box<dyn Strategy>> {
    Ok(match name {
        "naive" => Box::new(Naive),
        "nullspace" => Box::new(NullSpace::new(base, tokenizer, NullSpaceConfig::default())?),
        "memit" => Box::new(Memit::new(base, tokenizer, MemitConfig::default())?),
        "memory" => Box::new(SideMemoryStrategy::new(base, tokenizer, MemoryConfig::default())?),
        other => bail!("unknown strategy {other:?}; expected one of {}", STRATEGIES.join(", ")),
    })
}
