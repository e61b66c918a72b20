//! Replication and repair with real chunk-server processes: reads survive a killed server,
//! the metadata server rebuilds the lost copies on the survivors, and after that the data
//! survives losing all but one server.

use cairn_tests::*;
use std::io::Write;
use std::time::Duration;

fn repair_count(status: &str, label: &str) -> u64 {
    status_count(status, "repair", label)
}

#[test]
fn lost_copies_are_rebuilt_so_data_survives_all_but_one_server() {
    let c = Cluster::start_with(4, &["--replication", "3", "--separate-zones"]);
    // Several slices of two blocks each; incompressible, so sizes are real.
    let files: Vec<(String, Vec<u8>)> =
        (0..6).map(|i| (format!("f{i}"), pattern(i as u64, (5 << 20) + i * 4099))).collect();
    for (name, data) in &files {
        let mut f = std::fs::File::create(c.path(name)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
    c.kill9("chunk-1");
    c.wait_status("chunk server 1 declared dead", Duration::from_secs(30), |s| s.contains("DEAD"));

    // Reads go on meanwhile, from a client with nothing cached.
    let during = c.mount_again("during", "");
    for (name, data) in &files {
        assert!(std::fs::read(during.join(name)).unwrap() == *data, "{name} while a server is down");
    }
    umount_lazy(&during);

    let s = c.wait_status("the repair to finish", Duration::from_secs(120), |s| {
        repair_count(s, "re-replicated") > 0 && repair_count(s, "slices short") == 0
    });
    assert_eq!(repair_count(&s, "with no live copy"), 0, "{s}");

    // Every slice now has a copy on each of the three survivors: any one of them is enough.
    c.kill9("chunk-2");
    c.kill9("chunk-3");
    let last = c.mount_again("last", "");
    for (name, data) in &files {
        assert!(std::fs::read(last.join(name)).unwrap() == *data, "{name} with only chunk-4 left");
    }
    umount_lazy(&last);
}
