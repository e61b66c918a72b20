//! Where a slice's blocks go: weighted rendezvous hashing over live chunk servers, at most one
//! copy per failure domain. Clients place new slices with it, and the metadata server places
//! the copies it adds when it repairs one.

use crate::{ChunkServerInfo, ServerId, SliceId};

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// Weighted rendezvous score of `server` for `slice`: `-free / ln(u)` for a hash `u` in
/// (0, 1), so each server comes first for a share of slices proportional to its free space,
/// and adding or removing a server only moves the slices it wins or held.
fn score(slice: SliceId, server: &ChunkServerInfo) -> f64 {
    let u = ((mix(slice ^ mix(server.id)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(server.free as f64) / u.ln()
}

/// Picks the servers that bring a slice already on `holders` up to `replicas` copies: live
/// servers with room for `bytes`, in zones no holder or earlier pick is in (so distinct
/// servers), best score first. Fewer when fewer zones qualify. Every client computes the same
/// answer from the same server list.
pub fn place(
    servers: &[ChunkServerInfo],
    slice: SliceId,
    replicas: usize,
    bytes: u64,
    holders: &[ServerId],
) -> Vec<ServerId> {
    let mut candidates: Vec<_> =
        servers.iter().filter(|s| s.alive && !s.draining && s.free > bytes).map(|s| (score(slice, s), s)).collect();
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
    let mut zones: Vec<&str> = servers.iter().filter(|s| holders.contains(&s.id)).map(|s| s.zone.as_str()).collect();
    let mut chosen = Vec::new();
    for (_, s) in candidates {
        if chosen.len() + holders.len() >= replicas.max(1) {
            break;
        }
        if !zones.contains(&s.zone.as_str()) && !holders.contains(&s.id) {
            zones.push(&s.zone);
            chosen.push(s.id);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn server(id: u64, zone: &str, alive: bool, free: u64) -> ChunkServerInfo {
        let (draining, slices, bytes) = (false, 0, 0);
        ChunkServerInfo {
            id,
            addr: String::new(),
            zone: zone.into(),
            capacity: 1 << 40,
            free,
            alive,
            draining,
            slices,
            bytes,
        }
    }

    proptest! {
        /// Never two copies on one server or in one zone; only live, non-draining servers with
        /// room; as many copies as asked when enough zones qualify.
        #[test]
        fn copies_go_to_distinct_zones_of_live_servers_with_room(
            spec in proptest::collection::vec((0u8..4, any::<bool>(), 0u64..3, any::<bool>()), 0..12),
            slice in any::<u64>(),
            replicas in 1usize..5,
        ) {
            let servers: Vec<_> = spec
                .iter()
                .enumerate()
                .map(|(id, &(zone, alive, room, draining))| ChunkServerInfo {
                    draining,
                    ..server(id as u64, &format!("z{zone}"), alive, room << 30)
                })
                .collect();
            let bytes = 1 << 30;
            let chosen = place(&servers, slice, replicas, bytes, &[]);
            let info = |id: &u64| servers.iter().find(|s| s.id == *id && s.alive && !s.draining && s.free > bytes);
            let mut zones = std::collections::HashSet::new();
            for id in &chosen {
                let s = info(id);
                prop_assert!(s.is_some(), "server {} is dead, draining, full or unknown", id);
                prop_assert!(zones.insert(s.unwrap().zone.clone()), "two copies in one zone: {:?}", chosen);
            }
            prop_assert!(chosen.iter().collect::<std::collections::HashSet<_>>().len() == chosen.len());
            let eligible_zones: std::collections::HashSet<_> =
                servers.iter().filter(|s| s.alive && !s.draining && s.free > bytes).map(|s| s.zone.clone()).collect();
            prop_assert_eq!(chosen.len(), replicas.min(eligible_zones.len()));
        }
    }

    #[test]
    fn first_copies_follow_free_space() {
        let servers = vec![server(1, "a", true, 3 << 30), server(2, "b", true, 1 << 30)];
        let on_big = (0..10_000).filter(|&s| place(&servers, s, 1, 1, &[])[0] == 1).count();
        assert!((7_000..8_000).contains(&on_big), "{on_big} of 10000 slices on the server with 3/4 of the room");
        let many: Vec<_> = (1..=5).map(|i| server(i, &i.to_string(), true, 1 << 30)).collect();
        let firsts: std::collections::HashSet<_> = (0..100).map(|s| place(&many, s, 1, 1, &[])[0]).collect();
        assert_eq!(firsts.len(), 5, "placement does not spread: {firsts:?}");
    }
}
