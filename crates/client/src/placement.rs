//! Where a slice's blocks go: rendezvous hashing over live chunk servers.

use cairn_proto::{ChunkServerInfo, ServerId, SliceId};

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// Picks `replicas` distinct live servers with room for `bytes`, highest rendezvous score first.
/// Every client computes the same answer for the same slice and server set.
pub fn place(servers: &[ChunkServerInfo], slice: SliceId, replicas: usize, bytes: u64) -> Vec<ServerId> {
    let mut candidates: Vec<_> = servers.iter().filter(|s| s.alive && s.free > bytes).collect();
    candidates.sort_by_key(|s| std::cmp::Reverse(mix(slice ^ mix(s.id))));
    candidates.into_iter().take(replicas.max(1)).map(|s| s.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: u64, alive: bool, free: u64) -> ChunkServerInfo {
        ChunkServerInfo { id, addr: String::new(), capacity: 1 << 40, free, alive }
    }

    #[test]
    fn distinct_live_servers_with_room() {
        let servers =
            vec![server(1, true, 1 << 30), server(2, false, 1 << 30), server(3, true, 10), server(4, true, 1 << 30)];
        for slice in 0..100 {
            let p = place(&servers, slice, 3, 4096);
            assert_eq!(p.len(), 2);
            assert!(p.contains(&1) && p.contains(&4));
        }
        let many: Vec<_> = (1..=5).map(|i| server(i, true, 1 << 30)).collect();
        let firsts: std::collections::HashSet<_> = (0..100).map(|s| place(&many, s, 1, 1)[0]).collect();
        assert!(firsts.len() >= 4, "placement does not spread: {firsts:?}");
    }
}
