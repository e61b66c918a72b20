//! The ioctls Cairn answers: the inode-flag ioctls behind `chattr`/`lsattr` and the shutdown
//! ioctl xfstests' `godown` sends. The kernel passes these restricted ioctls with their
//! argument sizes; anything else is `ENOTTY`.

use cairn_proto::inode_flags;

/// `XFS_IOC_GOINGDOWN` = `EXT4_IOC_SHUTDOWN` = `_IOR('X', 125, u32)`: shut the filesystem down.
pub(crate) const GOINGDOWN: u32 = 0x8004_587d;
/// `FS_IOC_GETFLAGS` and the others: sent by the kernel for `chattr`/`lsattr`/`xfs_io chattr`.
pub(crate) const FS_IOC_GETFLAGS: u32 = 0x8008_6601;
pub(crate) const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
pub(crate) const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
pub(crate) const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
/// `FS_XFLAG_*` bits of `struct fsxattr` and the `FS_*_FL` flags they stand for.
const XFLAGS: [(u32, u32); 5] = [
    (0x08, inode_flags::IMMUTABLE),
    (0x10, inode_flags::APPEND),
    (0x20, inode_flags::SYNC),
    (0x40, inode_flags::NOATIME),
    (0x80, inode_flags::NODUMP),
];

/// The answer to a get-flags ioctl: the `FS_*_FL` word, or a `struct fsxattr` (28 bytes,
/// only `fsx_xflags` set), cut to what the kernel asked for.
pub(crate) fn flags_out(flags: u32, fsxattr: bool, out_size: u32) -> Vec<u8> {
    let mut out = match fsxattr {
        false => flags.to_le_bytes().to_vec(),
        true => {
            let x = XFLAGS.iter().filter(|(_, f)| flags & f != 0).fold(0u32, |x, (bit, _)| x | bit);
            let mut v = vec![0u8; 28];
            v[..4].copy_from_slice(&x.to_le_bytes());
            v
        }
    };
    out.resize(out_size as usize, 0);
    out
}

/// The `FS_*_FL` flags a set-flags ioctl asks for; `None` if it asks for anything Cairn does
/// not support (extent sizes, project ids, other flags).
pub(crate) fn flags_in(data: &[u8], fsxattr: bool) -> Option<u32> {
    let word = u32::from_le_bytes(data.get(..4)?.try_into().ok()?);
    if !fsxattr {
        return (word & !inode_flags::SUPPORTED == 0).then_some(word);
    }
    let known = XFLAGS.iter().fold(0u32, |x, (bit, _)| x | bit);
    let rest_zero = data.get(4..16).is_some_and(|r| r.iter().all(|b| *b == 0));
    (word & !known == 0 && rest_zero)
        .then(|| XFLAGS.iter().filter(|(bit, _)| word & bit != 0).fold(0, |f, (_, fl)| f | fl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_round_trip_through_both_ioctl_forms() {
        let f = inode_flags::IMMUTABLE | inode_flags::NOATIME;
        assert_eq!(flags_in(&flags_out(f, false, 4), false), Some(f));
        assert_eq!(flags_in(&flags_out(f, true, 28), true), Some(f));
        assert_eq!(flags_in(&0x4000u32.to_le_bytes(), false), None, "unsupported flag");
        let mut extsize = flags_out(f, true, 28);
        extsize[4] = 1;
        assert_eq!(flags_in(&extsize, true), None, "extent size hints are not supported");
    }
}
