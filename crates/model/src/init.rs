//! Seeded initialisation. candle's CPU generator cannot be seeded, and a training run must be reproducible from
//! its seed, so trainable models draw their initial weights here.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::{Llama, LlamaConfig, Result};

/// SplitMix64 with Box-Muller normals.
struct Normal {
    state: u64,
}

impl Normal {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn sample(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v) = (self.unit(), self.unit());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos() * std) as f32
            })
            .collect()
    }
}

/// How initial weights are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// GPT-2: normal(0, 0.02) for every matrix and the embeddings.
    #[default]
    Gpt2,
    /// normal(0, 1/sqrt(fan_in)) for matrices, normal(0, 1) for embeddings. At small widths 0.02 makes attention
    /// scores (bilinear in the query and key weights) start near zero, a plateau that content-based attention is
    /// slow to leave.
    FanIn,
}

impl Llama {
    /// A freshly initialised model whose weights are trainable variables in the returned `VarMap`, drawn from
    /// `seed`: normal(0, 0.02) for matrices, scaled down by sqrt(2 * layers) on residual outputs (o_proj,
    /// down_proj), ones for norms.
    pub fn init_trainable(cfg: &LlamaConfig, seed: u64, device: &Device) -> Result<(Llama, VarMap)> {
        Self::init_trainable_with(cfg, seed, Init::Gpt2, device)
    }

    /// As [`Llama::init_trainable`], with the scale chosen by `init`; residual outputs are always scaled down by
    /// sqrt(2 * layers).
    pub fn init_trainable_with(cfg: &LlamaConfig, seed: u64, init: Init, device: &Device) -> Result<(Llama, VarMap)> {
        let vm = VarMap::new();
        let model = Llama::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, device))?;
        let mut rng = Normal { state: seed ^ 0x005E_ED0F_E46A_u64 };
        let depth = (2.0 * cfg.num_hidden_layers as f64).sqrt();
        {
            let vars = vm.data().lock().expect("varmap lock");
            for (name, tensor) in model.named_tensors() {
                let var = &vars[&name];
                let shape = tensor.shape().clone();
                let init = if name.ends_with("norm.weight") {
                    Tensor::ones(&shape, DType::F32, device)?
                } else {
                    let base = match init {
                        Init::Gpt2 => 0.02,
                        Init::FanIn if name.contains("embed_tokens") => 1.0,
                        // Weights are (out, in): the last dimension is the fan-in.
                        Init::FanIn => 1.0 / (shape.dims()[shape.rank() - 1] as f64).sqrt(),
                    };
                    let residual_out = name.contains("o_proj") || name.contains("down_proj");
                    let std = if residual_out { base / depth } else { base };
                    Tensor::from_vec(rng.sample(shape.elem_count(), std), &shape, device)?
                };
                var.set(&init)?;
            }
        }
        Ok((model, vm))
    }
}
