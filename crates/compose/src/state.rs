//! A strategy's state as bytes: a named list of f64 matrices. Stored as a blob next to each version's delta, so any
//! worker can continue a namespace's chain from any version (after a rollback, or a job another worker did).

use anyhow::{bail, ensure, Context, Result};
use nalgebra::DMatrix;

const MAGIC: &[u8; 8] = b"ENGRAMCS";

/// `strategy` names who wrote it; `restore` refuses another strategy's state.
pub fn encode(strategy: &str, mats: &[&DMatrix<f64>]) -> Vec<u8> {
    let size: usize = mats.iter().map(|m| 16 + 8 * m.len()).sum();
    let mut out = Vec::with_capacity(16 + strategy.len() + size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(strategy.len() as u32).to_le_bytes());
    out.extend_from_slice(strategy.as_bytes());
    out.extend_from_slice(&(mats.len() as u32).to_le_bytes());
    for m in mats {
        out.extend_from_slice(&(m.nrows() as u64).to_le_bytes());
        out.extend_from_slice(&(m.ncols() as u64).to_le_bytes());
        // Row-major, so the bytes read like the matrix.
        for i in 0..m.nrows() {
            for x in m.row(i).iter() {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    out
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        ensure!(self.0.len() >= n, "composer state is truncated");
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
}

/// The matrices `encode` wrote for `strategy`.
pub fn decode(strategy: &str, bytes: &[u8]) -> Result<Vec<DMatrix<f64>>> {
    let mut c = Cursor(bytes);
    ensure!(c.take(8)? == MAGIC, "not a composer state (bad magic)");
    let n = c.u32()? as usize;
    let name = std::str::from_utf8(c.take(n)?).context("composer state names its strategy in UTF-8")?;
    if name != strategy {
        bail!("composer state was written by the {name} strategy, not {strategy}");
    }
    let count = c.u32()? as usize;
    let mut out = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let (r, k) = (c.u64()? as usize, c.u64()? as usize);
        let len = r.checked_mul(k).and_then(|n| n.checked_mul(8)).context("composer state matrix too large")?;
        let data = c.take(len)?;
        let vals = data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")));
        out.push(DMatrix::from_row_iterator(r, k, vals));
    }
    ensure!(c.0.is_empty(), "composer state has {} trailing bytes", c.0.len());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_round_trip_and_bad_bytes_are_refused() {
        let a = DMatrix::from_fn(3, 2, |i, j| i as f64 - 0.5 * j as f64);
        let b = DMatrix::<f64>::zeros(4, 0);
        let bytes = encode("memit", &[&a, &b]);
        let back = decode("memit", &bytes).unwrap();
        assert_eq!(back, vec![a, b]);
        assert!(decode("nullspace", &bytes).unwrap_err().to_string().contains("memit"));
        assert!(decode("memit", &bytes[..bytes.len() - 1]).is_err());
        assert!(decode("memit", b"garbage").is_err());
    }
}
