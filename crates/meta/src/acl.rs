//! POSIX ACLs as the kernel hands them over (`system.posix_acl_access` / `_default` xattrs
//! in the `posix_acl_xattr` format). The kernel enforces them (FUSE_POSIX_ACL); the metadata
//! server keeps them consistent with the mode, as a local filesystem does: the access ACL and
//! the permission bits are two views of one thing (chmod rewrites the ACL, setting the ACL
//! rewrites the mode), and new inodes inherit their directory's default ACL instead of the
//! umask.

use crate::error::{MetaError, Result};
use cairn_proto::ErrorCode;

/// The xattr holding an inode's access ACL.
pub(crate) const ACCESS: &[u8] = b"system.posix_acl_access";
/// The xattr holding a directory's default ACL, inherited by what is created in it.
pub(crate) const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// One ACL entry: tag, rwx bits, and the uid or gid for named entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A decoded ACL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Acl(Vec<Entry>);

impl Acl {
    /// Decodes an ACL xattr value; anything malformed is EINVAL.
    pub(crate) fn parse(value: &[u8]) -> Result<Acl> {
        let bad = || MetaError::fs(ErrorCode::Invalid, "malformed POSIX ACL");
        let (head, body) = value.split_at_checked(4).ok_or_else(bad)?;
        if u32::from_le_bytes(head.try_into().expect("4 bytes")) != VERSION || body.len() % 8 != 0 {
            return Err(bad());
        }
        let entries: Vec<Entry> = body
            .chunks_exact(8)
            .map(|e| Entry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]) & 7,
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
            .collect();
        let count = |tag| entries.iter().filter(|e| e.tag == tag).count();
        let named = count(USER) + count(GROUP);
        if count(USER_OBJ) != 1 || count(GROUP_OBJ) != 1 || count(OTHER) != 1 || count(MASK) > 1 {
            return Err(bad());
        }
        if named > 0 && count(MASK) == 0 || entries.len() != 3 + named + count(MASK) {
            return Err(bad());
        }
        Ok(Acl(entries))
    }

    /// Encodes the ACL as its xattr value.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = VERSION.to_le_bytes().to_vec();
        for e in &self.0 {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    /// True if the permission bits say all the ACL says (no named entries, no mask): then no
    /// ACL is stored, as on a local filesystem.
    pub(crate) fn is_mode_only(&self) -> bool {
        self.0.len() == 3
    }

    fn perm_of(&self, tag: u16) -> Option<u32> {
        self.0.iter().find(|e| e.tag == tag).map(|e| u32::from(e.perm))
    }

    /// The rwx bits (0o777) this access ACL gives the mode: owner, mask (or owning group),
    /// other.
    pub(crate) fn mode_bits(&self) -> u32 {
        let group = self.perm_of(MASK).or(self.perm_of(GROUP_OBJ)).unwrap_or(0);
        self.perm_of(USER_OBJ).unwrap_or(0) << 6 | group << 3 | self.perm_of(OTHER).unwrap_or(0)
    }

    /// Which permission-bit triple (its shift in the mode) entry `e` mirrors: the owner,
    /// the mask (or the owning group when there is no mask), and other.
    fn mode_shift(&self, e: &Entry) -> Option<u32> {
        match e.tag {
            USER_OBJ => Some(6),
            MASK => Some(3),
            GROUP_OBJ if self.perm_of(MASK).is_none() => Some(3),
            OTHER => Some(0),
            _ => None,
        }
    }

    /// Applies a chmod to the access ACL: the owner, mask (or owning group) and other entries
    /// take the new bits.
    pub(crate) fn chmod(&mut self, perm: u32) {
        let shifts: Vec<_> = self.0.iter().map(|e| self.mode_shift(e)).collect();
        for (e, shift) in self.0.iter_mut().zip(shifts) {
            if let Some(shift) = shift {
                e.perm = ((perm >> shift) & 7) as u16;
            }
        }
    }

    /// The access ACL of an inode created with `perm` under a directory whose default ACL is
    /// `self` (POSIX.1e): each of owner, mask (or owning group) and other keeps only the bits
    /// both allow. Returns the ACL and the inode's permission bits (special bits kept).
    pub(crate) fn inherit(&self, perm: u32) -> (Acl, u32) {
        let mut acl = self.clone();
        for (e, shift) in acl.0.iter_mut().zip(self.0.iter().map(|e| self.mode_shift(e))) {
            if let Some(shift) = shift {
                e.perm &= ((perm >> shift) & 7) as u16;
            }
        }
        let bits = acl.mode_bits();
        (acl, perm & !0o777 | bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Acl {
        Acl(entries.iter().map(|&(tag, perm, id)| Entry { tag, perm, id }).collect())
    }

    #[test]
    fn round_trips_and_rejects_malformed_values() {
        let a = acl(&[(USER_OBJ, 7, 0), (USER, 5, 1000), (GROUP_OBJ, 5, 0), (MASK, 7, 0), (OTHER, 0, 0)]);
        assert_eq!(Acl::parse(&a.encode()).unwrap(), a);
        assert!(Acl::parse(&a.encode()[..10]).is_err());
        // A named entry needs a mask.
        let no_mask = acl(&[(USER_OBJ, 7, 0), (USER, 5, 1000), (GROUP_OBJ, 5, 0), (OTHER, 0, 0)]);
        assert!(Acl::parse(&no_mask.encode()).is_err());
        let mut wrong_version = a.encode();
        wrong_version[0] = 1;
        assert!(Acl::parse(&wrong_version).is_err());
    }

    #[test]
    fn mode_and_chmod_use_the_mask_when_there_is_one() {
        let mut a = acl(&[(USER_OBJ, 7, 0), (USER, 7, 1000), (GROUP_OBJ, 5, 0), (MASK, 6, 0), (OTHER, 4, 0)]);
        assert_eq!(a.mode_bits(), 0o764);
        a.chmod(0o750);
        assert_eq!(a.mode_bits(), 0o750);
        assert_eq!(a.perm_of(GROUP_OBJ), Some(5), "chmod changes the mask, not the owning group");
        let mut plain = acl(&[(USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (OTHER, 4, 0)]);
        plain.chmod(0o600);
        assert_eq!(plain.mode_bits(), 0o600);
        assert!(plain.is_mode_only());
    }

    #[test]
    fn inheritance_masks_the_default_acl_with_the_create_mode() {
        let d = acl(&[(USER_OBJ, 7, 0), (USER, 7, 1000), (GROUP_OBJ, 7, 0), (MASK, 7, 0), (OTHER, 5, 0)]);
        let (a, perm) = d.inherit(0o2644);
        assert_eq!(perm, 0o2644);
        assert_eq!(a.perm_of(USER), Some(7), "named entries are kept; the mask limits them");
        assert_eq!(a.perm_of(MASK), Some(4));
    }
}
