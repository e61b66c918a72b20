//! Pure arithmetic of the data layout: which stored bytes make up a range of a chunk.

use cairn_proto::{HOLE_SLICE, SliceRef};

/// A run of bytes `[start, end)` inside a chunk and where they come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece<'a> {
    pub start: u64,
    pub end: u64,
    /// The slice holding the bytes, or `None` for zeros.
    pub slice: Option<&'a SliceRef>,
}

/// Splits `[start, end)` of a chunk into pieces given its slices in commit order: later slices
/// shadow earlier ones; bytes no slice covers (and holes) read as zeros.
pub fn resolve(slices: &[SliceRef], start: u64, end: u64) -> Vec<Piece<'_>> {
    let mut uncovered = vec![(start, end)];
    let mut pieces = Vec::new();
    for s in slices.iter().rev() {
        if uncovered.is_empty() {
            break;
        }
        let (s_start, s_end) = (s.pos as u64, s.pos as u64 + s.len as u64);
        let mut rest = Vec::with_capacity(uncovered.len() + 1);
        for (a, b) in uncovered {
            let (lo, hi) = (a.max(s_start), b.min(s_end));
            if lo >= hi {
                rest.push((a, b));
                continue;
            }
            pieces.push(Piece { start: lo, end: hi, slice: (s.id != HOLE_SLICE).then_some(s) });
            if a < lo {
                rest.push((a, lo));
            }
            if hi < b {
                rest.push((hi, b));
            }
        }
        uncovered = rest;
    }
    pieces.extend(uncovered.into_iter().map(|(a, b)| Piece { start: a, end: b, slice: None }));
    pieces.sort_by_key(|p| p.start);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(pos: u32, len: u32, id: u64) -> SliceRef {
        SliceRef { pos, len, id, servers: vec![] }
    }

    fn ids(p: &[Piece<'_>]) -> Vec<(u64, u64, u64)> {
        p.iter().map(|p| (p.start, p.end, p.slice.map_or(0, |s| s.id))).collect()
    }

    #[test]
    fn newer_slices_shadow_older_ones() {
        let map = vec![s(0, 100, 1), s(20, 10, 2), s(50, 100, 3), s(60, 5, 0)];
        assert_eq!(
            ids(&resolve(&map, 0, 200)),
            vec![(0, 20, 1), (20, 30, 2), (30, 50, 1), (50, 60, 3), (60, 65, 0), (65, 150, 3), (150, 200, 0)]
        );
        assert_eq!(ids(&resolve(&map, 25, 55)), vec![(25, 30, 2), (30, 50, 1), (50, 55, 3)]);
        assert_eq!(ids(&resolve(&[], 5, 9)), vec![(5, 9, 0)]);
    }

    /// Compares against a byte-by-byte reference model on pseudo-random maps.
    #[test]
    fn matches_a_reference_model() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..200 {
            let map: Vec<SliceRef> = (0..next(12))
                .map(|i| s(next(200) as u32, 1 + next(80) as u32, if next(4) == 0 { 0 } else { i + 1 }))
                .collect();
            let mut model = vec![0u64; 300];
            for sl in &map {
                for b in sl.pos..sl.pos + sl.len {
                    model[b as usize] = sl.id;
                }
            }
            let (a, b) = (next(150), 150 + next(150));
            let pieces = resolve(&map, a, b);
            let mut pos = a;
            for p in &pieces {
                assert_eq!(p.start, pos);
                for byte in p.start..p.end {
                    assert_eq!(model[byte as usize], p.slice.map_or(0, |s| s.id));
                }
                pos = p.end;
            }
            assert_eq!(pos, b);
        }
    }
}
