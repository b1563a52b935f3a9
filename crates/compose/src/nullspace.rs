//! The null-space guard (AlphaEdit, ICLR 2025, with GPM's growing basis): every new delta's `A` is projected off a
//! protected subspace of each layer's key space, so `delta * k ~ 0` for every protected key `k` and what the model
//! did on those keys stays as it was.
//!
//! The protected subspace starts as the top eigenvectors of the base model's key second moment over everything that
//! must be kept (known facts, in-context reading, skills), cut where they hold `energy` of it (a relative eigenvalue
//! cut was far too weak on this model: see the sequential-composition probe). After each accepted injection it
//! grows by the directions that hold `grow_energy` of that injection's own keys (the document and the questions it
//! answers, read by the updated model), so later deltas leave earlier ones alone too.

use anyhow::{bail, Result};
use engram_lora::Delta;
use engram_model::{Llama, Module, Tokenizer};
use engram_world::World;
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use serde::{Deserialize, Serialize};

use crate::keys::{keys, second_moment};
use crate::Strategy;

/// An orthonormal basis (columns of `u`, `in x k`) of the protected part of one layer's key space.
#[derive(Debug, Clone)]
pub struct Basis {
    pub u: DMatrix<f64>,
}

impl Basis {
    pub fn empty(dim: usize) -> Self {
        Self { u: DMatrix::zeros(dim, 0) }
    }

    pub fn dims(&self) -> usize {
        self.u.ncols()
    }

    /// The top eigenvectors of the (symmetric) second moment `c` that hold `energy` of its trace.
    pub fn from_moment(c: &DMatrix<f64>, energy: f64) -> Self {
        let eig = SymmetricEigen::new(c.clone());
        let mut order: Vec<usize> = (0..eig.eigenvalues.len()).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
        let total: f64 = eig.eigenvalues.iter().map(|v| v.max(0.0)).sum();
        let mut kept = Vec::new();
        let mut held = 0.0;
        for &i in &order {
            if held >= energy * total {
                break;
            }
            held += eig.eigenvalues[i].max(0.0);
            kept.push(eig.eigenvectors.column(i).into_owned());
        }
        let mut u = DMatrix::zeros(c.nrows(), kept.len());
        for (j, v) in kept.iter().enumerate() {
            u.set_column(j, v);
        }
        Self { u }
    }

    /// Fraction of the energy of `k`'s rows (`n x in`) outside the protected subspace.
    pub fn free_energy(&self, k: &DMatrix<f64>) -> f64 {
        let total = k.norm_squared();
        if total == 0.0 {
            return 0.0;
        }
        let r = k - (k * &self.u) * self.u.transpose();
        r.norm_squared() / total
    }

    /// Adds the fewest directions after which the basis holds `energy` of the energy of `k`'s rows. Returns how
    /// many were added.
    pub fn grow(&mut self, k: &DMatrix<f64>, energy: f64) -> usize {
        let total = k.norm_squared();
        let r = k - (k * &self.u) * self.u.transpose();
        let mut missing = r.norm_squared() - (1.0 - energy) * total;
        if missing <= 0.0 {
            return 0;
        }
        // Principal directions of the residual rows, through the smaller Gram matrix.
        let (n, d) = r.shape();
        let (values, dirs): (Vec<f64>, Vec<DVector<f64>>) = if n < d {
            let eig = SymmetricEigen::new(&r * r.transpose());
            let mut pairs: Vec<(f64, DVector<f64>)> = (0..n)
                .filter(|&i| eig.eigenvalues[i] > 0.0)
                .map(|i| {
                    let s = eig.eigenvalues[i];
                    (s, r.transpose() * eig.eigenvectors.column(i) / s.sqrt())
                })
                .collect();
            pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
            pairs.into_iter().unzip()
        } else {
            let eig = SymmetricEigen::new(r.transpose() * &r);
            let mut pairs: Vec<(f64, DVector<f64>)> =
                (0..d).map(|i| (eig.eigenvalues[i], eig.eigenvectors.column(i).into_owned())).collect();
            pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
            pairs.into_iter().unzip()
        };
        let mut added = 0;
        for (s, mut v) in values.into_iter().zip(dirs) {
            if missing <= 0.0 || self.u.ncols() >= d {
                break;
            }
            // Re-orthogonalise against the basis (twice: the residual's directions are orthogonal to it only up
            // to rounding, and rounding compounds over a thousand injections).
            for _ in 0..2 {
                let c = self.u.transpose() * &v;
                v -= &self.u * c;
            }
            let norm = v.norm();
            if norm < 1e-6 {
                continue;
            }
            v /= norm;
            let cols = self.u.ncols();
            self.u = self.u.clone().insert_column(cols, 0.0);
            self.u.set_column(cols, &v);
            missing -= s;
            added += 1;
        }
        added
    }

    /// `a` (`rank x in`, row-major) with every row projected off the protected subspace.
    pub fn project_rows(&self, a: &mut [f32], rank: usize) {
        if self.u.ncols() == 0 {
            return;
        }
        let d = self.u.nrows();
        let m = DMatrix::from_row_slice(rank, d, &a.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
        let p = &m - (&m * &self.u) * self.u.transpose();
        for i in 0..rank {
            for j in 0..d {
                a[i * d + j] = p[(i, j)] as f32;
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NullSpaceConfig {
    /// Share of the protected keys' energy the initial basis holds.
    pub energy: f64,
    /// Share of each accepted injection's key energy added to the basis.
    pub grow_energy: f64,
    /// Texts sampled per protected kind (known facts, known biographies, reading, skills).
    pub protected_samples: usize,
    pub seed: u64,
}

impl Default for NullSpaceConfig {
    fn default() -> Self {
        Self { energy: 0.99, grow_energy: 0.9, protected_samples: 400, seed: 0x5AFE }
    }
}

/// What must be kept, as texts (prompt and answer together, so the answer tokens' keys count too): every known
/// person's trained questions and biographies, documents read in context followed by questions (reading-split
/// people, never the evaluation's fresh people), and skill tasks.
pub fn protected_texts(world: &World, samples: usize, seed: u64) -> Vec<String> {
    let mut rng = engram_world::Rng::derive(seed, 0xC0);
    let mut texts = Vec::new();
    for p in world.known() {
        for probe in world.closed_book_probes_all(p) {
            texts.push(format!("{} {}", probe.prompt, probe.answer));
        }
        texts.push(format!("<bos> {} <eos>", p.bio(rng.below(4))));
    }
    for i in 0..samples {
        texts.push(world.reading_sample(&mut rng, 1 + i % 4).text());
        texts.push(world.skill_sample(&mut rng).text());
    }
    texts
}

/// The keys an injection adds: its document, and every trained question about each person it names.
pub fn injection_texts(world: &World, document: &str) -> Vec<String> {
    let mut texts = vec![format!("<bos> {document}")];
    for name in world.names_in(document) {
        texts.extend(world.questions_about(&name).into_iter().map(|(_, q)| format!("<bos> {q}")));
    }
    texts
}

/// AlphaEdit-style projection with a growing protected basis. Adapts `mlp.down_proj` only.
pub struct NullSpace {
    cfg: NullSpaceConfig,
    world: World,
    tokenizer: Tokenizer,
    /// Per layer.
    bases: Vec<Basis>,
    protected_tokens: usize,
}

impl NullSpace {
    /// Builds the initial protected bases from the base model's keys.
    pub fn new(base: &Llama, tokenizer: &Tokenizer, cfg: NullSpaceConfig) -> Result<Self> {
        let world = World::new();
        let texts = protected_texts(&world, cfg.protected_samples, cfg.seed);
        let (moments, tokens) = second_moment(base, tokenizer, &texts, None)?;
        let bases = moments.iter().map(|c| Basis::from_moment(c, cfg.energy)).collect();
        Ok(Self { cfg, world, tokenizer: tokenizer.clone(), bases, protected_tokens: tokens })
    }

    /// A strategy with nothing protected yet, to `restore` a saved state into.
    pub fn empty(base: &Llama, tokenizer: &Tokenizer, cfg: NullSpaceConfig) -> Self {
        let (inp, _) = Module::Down.dims(base.config());
        let bases = (0..base.config().num_hidden_layers).map(|_| Basis::empty(inp)).collect();
        Self { cfg, world: World::new(), tokenizer: tokenizer.clone(), bases, protected_tokens: 0 }
    }

    pub fn bases(&self) -> &[Basis] {
        &self.bases
    }

    pub fn protected_tokens(&self) -> usize {
        self.protected_tokens
    }
}

impl Strategy for NullSpace {
    fn name(&self) -> &'static str {
        "nullspace"
    }

    fn compose(&mut self, _head: &Llama, _document: &str, mut candidate: Delta) -> Result<Delta> {
        let down = Module::Down.path();
        for ((layer, module), f) in candidate.adapters.iter_mut() {
            if module != down {
                bail!("the nullspace strategy guards {down} only; this delta also adapts layer {layer} {module}");
            }
            let basis = self.bases.get(*layer).ok_or_else(|| anyhow::anyhow!("delta adapts missing layer {layer}"))?;
            basis.project_rows(&mut f.a, f.rank);
        }
        Ok(candidate)
    }

    fn accepted(&mut self, head: &Llama, document: &str) -> Result<()> {
        let k = keys(head, &self.tokenizer, &injection_texts(&self.world, document))?;
        for (basis, k) in self.bases.iter_mut().zip(&k) {
            basis.grow(k, self.cfg.grow_energy);
        }
        Ok(())
    }

    fn protected_dims(&self) -> Vec<usize> {
        self.bases.iter().map(Basis::dims).collect()
    }

    fn save(&self) -> Result<Vec<u8>> {
        Ok(crate::state::encode(self.name(), &self.bases.iter().map(|b| &b.u).collect::<Vec<_>>()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mats = crate::state::decode(self.name(), state)?;
        if mats.len() != self.bases.len() || mats.iter().zip(&self.bases).any(|(m, b)| m.nrows() != b.u.nrows()) {
            bail!("nullspace state does not fit this model's layers");
        }
        self.bases = mats.into_iter().map(|u| Basis { u }).collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, d: usize, seed: u64) -> DMatrix<f64> {
        let mut rng = engram_world::Rng::new(seed);
        DMatrix::from_fn(n, d, |_, _| rng.below(2001) as f64 / 1000.0 - 1.0)
    }

    #[test]
    fn projected_rows_are_orthogonal_to_the_basis_and_growth_reaches_its_energy() {
        let d = 24;
        // Keys living mostly in a 4-dimensional subspace, plus a little noise.
        let span = random(4, d, 1);
        let k = random(60, 4, 2) * &span + random(60, d, 3) * 0.01;
        let c = k.transpose() * &k;
        let basis = Basis::from_moment(&c, 0.99);
        assert!(basis.dims() <= 5, "a rank-4 moment needs about 4 directions, took {}", basis.dims());
        assert!(basis.free_energy(&k) <= 0.011, "free energy {}", basis.free_energy(&k));
        // Columns orthonormal.
        let gram = basis.u.transpose() * &basis.u;
        assert!((gram - DMatrix::identity(basis.dims(), basis.dims())).abs().max() < 1e-9);

        let mut a: Vec<f32> = random(3, d, 4).iter().map(|&x| x as f32).collect();
        // nalgebra iterates column-major; the layout does not matter for random values.
        basis.project_rows(&mut a, 3);
        let m = DMatrix::from_row_slice(3, d, &a.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
        assert!((m * &basis.u).abs().max() < 1e-5);

        // New keys in a fresh direction: growth captures them to the asked energy.
        let mut grown = basis.clone();
        let new = random(10, d, 5);
        let added = grown.grow(&new, 0.9);
        assert!(added > 0);
        assert!(grown.free_energy(&new) <= 0.1 + 1e-9, "free {}", grown.free_energy(&new));
        let gram = grown.u.transpose() * &grown.u;
        assert!((gram - DMatrix::identity(grown.dims(), grown.dims())).abs().max() < 1e-9);
        // Already covered keys add nothing.
        assert_eq!(grown.grow(&new, 0.5), 0);
    }
}
