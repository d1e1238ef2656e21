//! Transaction ids and participant names.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::InvalidInput;

/// How long a block of txids leased to a client stream (a coordinator
/// group's `TransactStream`) may be used after it was granted. Shared: the
/// coordinator expires leases by it, and participants keep every tombstone
/// longer than it (a leased txid may start after higher ones are decided).
pub const TXID_LEASE_LIFE: std::time::Duration = std::time::Duration::from_secs(2);

/// A transaction id, unique across coordinator restarts: the coordinator's id,
/// its incarnation (bumped durably at every start) and a sequence number
/// within the incarnation.
///
/// Ordered by (coordinator, incarnation, sequence): within one coordinator a
/// smaller id is an older transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxId {
    pub coordinator: u32,
    pub incarnation: u64,
    pub sequence: u64,
}

impl TxId {
    pub fn new(coordinator: u32, incarnation: u64, sequence: u64) -> Self {
        debug_assert!(incarnation >= 1 && sequence >= 1);
        TxId { coordinator, incarnation, sequence }
    }

    /// Big-endian bytes whose order is the id's order: a key prefix for logs.
    pub fn to_key_bytes(self) -> [u8; 20] {
        let mut out = [0u8; 20];
        out[..4].copy_from_slice(&self.coordinator.to_be_bytes());
        out[4..12].copy_from_slice(&self.incarnation.to_be_bytes());
        out[12..].copy_from_slice(&self.sequence.to_be_bytes());
        out
    }

    /// Inverse of [`TxId::to_key_bytes`].
    pub fn from_key_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 20 {
            return None;
        }
        let coordinator = u32::from_be_bytes(bytes[..4].try_into().ok()?);
        let incarnation = u64::from_be_bytes(bytes[4..12].try_into().ok()?);
        let sequence = u64::from_be_bytes(bytes[12..].try_into().ok()?);
        (incarnation >= 1 && sequence >= 1).then_some(TxId { coordinator, incarnation, sequence })
    }
}

impl fmt::Display for TxId {
    /// `{coordinator:08x}-{incarnation}-{sequence}`, put together by hand
    /// rather than by `write!`: a txid is printed into every protocol message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 8 + 2 * (1 + 20)];
        for (i, digit) in out[..8].iter_mut().enumerate() {
            *digit = HEX[(self.coordinator >> (28 - 4 * i)) as usize & 0xf];
        }
        let mut len = 8;
        for part in [self.incarnation, self.sequence] {
            let mut digits = itoa::Buffer::new();
            let digits = digits.format(part).as_bytes();
            out[len] = b'-';
            out[len + 1..len + 1 + digits.len()].copy_from_slice(digits);
            len += 1 + digits.len();
        }
        f.write_str(std::str::from_utf8(&out[..len]).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for TxId {
    type Err = InvalidInput;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidInput::TxId { text: text.chars().take(100).collect() };
        let mut parts = text.split('-');
        let (Some(c), Some(i), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        // Canonical decimal: no sign, no leading zero, so one txid has one text.
        let digits = |p: &str| {
            !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()) && !p.starts_with('0')
        };
        let hex = c.len() == 8 && c.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex || !digits(i) || !digits(s) {
            return Err(bad());
        }
        let coordinator = u32::from_str_radix(c, 16).map_err(|_| bad())?;
        let incarnation: u64 = i.parse().map_err(|_| bad())?;
        let sequence: u64 = s.parse().map_err(|_| bad())?;
        if incarnation == 0 || sequence == 0 {
            return Err(bad());
        }
        Ok(TxId { coordinator, incarnation, sequence })
    }
}

/// The name a participant enrolls under: 1-64 characters of `[A-Za-z0-9_.-]`.
/// Shared, not copied: a transaction names each of its participants in
/// several places (its branches, the votes it waits for, its deliveries),
/// and a clone is a count raised, not an allocation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParticipantName(Arc<str>);

impl ParticipantName {
    pub const MAX_LEN: usize = 64;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Maps keyed by name are looked up with the text a request carries, before
/// (or instead of) making a name of it: equal, ordered and hashed as its text.
impl Borrow<str> for ParticipantName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ParticipantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ParticipantName {
    type Err = InvalidInput;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let ok = !text.is_empty()
            && text.len() <= Self::MAX_LEN
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if ok {
            Ok(ParticipantName(Arc::from(text)))
        } else {
            Err(InvalidInput::ParticipantName { text: text.chars().take(100).collect() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txid_round_trips_through_text_and_key_bytes() {
        let id = TxId::new(0x3f9a12c0, 2, 17);
        assert_eq!(id.to_string(), "3f9a12c0-2-17");
        assert_eq!("3f9a12c0-2-17".parse::<TxId>(), Ok(id));
        assert_eq!(TxId::from_key_bytes(&id.to_key_bytes()), Some(id));
    }

    #[test]
    fn key_bytes_sort_like_ids() {
        let a = TxId::new(1, 1, 300);
        let b = TxId::new(1, 2, 1);
        assert!(a < b);
        assert!(a.to_key_bytes() < b.to_key_bytes());
    }

    #[test]
    fn malformed_txids_are_refused() {
        for text in [
            "",
            "x",
            "3f9a12c0-2",
            "3f9a12c0-2-17-1",
            "3F9A12C0-2-17",
            "3f9a12c-2-17",
            "3f9a12c0-0-1",
            "3f9a12c0-1-0",
            "3f9a12c0--1",
            "3f9a12c0-+1-1",
            "3f9a12c0-1-99999999999999999999999",
        ] {
            assert!(text.parse::<TxId>().is_err(), "{text:?} was accepted");
        }
    }

    /// A name is found by its text in a map keyed by names, and its clones
    /// share one string.
    #[test]
    fn a_name_is_looked_up_by_its_text_and_shared_by_its_clones() {
        let names: std::collections::BTreeMap<ParticipantName, u32> =
            ["p2", "p10", "p1"].iter().enumerate().map(|(i, t)| (t.parse().unwrap(), i as u32)).collect();
        assert_eq!(names.get("p10"), Some(&1));
        assert_eq!(names.get("p3"), None);
        let (name, _) = names.get_key_value("p1").unwrap();
        assert_eq!(name.as_str(), "p1");
        assert!(std::ptr::eq(name.clone().as_str(), name.as_str()));
    }

    #[test]
    fn participant_names_are_checked() {
        assert!("p-1.a_b".parse::<ParticipantName>().is_ok());
        for text in ["", "a b", "ä", &"x".repeat(65)] {
            assert!(text.parse::<ParticipantName>().is_err(), "{text:?} was accepted");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn every_txid_round_trips_through_text_and_key_bytes(
                coordinator in any::<u32>(),
                incarnation in 1..u64::MAX,
                sequence in 1..u64::MAX,
            ) {
                let id = TxId::new(coordinator, incarnation, sequence);
                prop_assert_eq!(id.to_string().parse::<TxId>().unwrap(), id);
                prop_assert_eq!(TxId::from_key_bytes(&id.to_key_bytes()), Some(id));
            }

            /// The text is the coordinator in eight hex digits, then the two numbers in decimal.
            #[test]
            fn the_text_is_hex_then_decimal(coordinator in any::<u32>(), incarnation in any::<u64>(), sequence in any::<u64>()) {
                let id = TxId { coordinator, incarnation, sequence };
                prop_assert_eq!(id.to_string(), format!("{coordinator:08x}-{incarnation}-{sequence}"));
            }

            /// Key bytes sort as txids do: range deletes and scans below a horizon rely on it.
            #[test]
            fn key_bytes_sort_as_txids(a in (any::<u32>(), 1..u64::MAX, 1..u64::MAX), b in (any::<u32>(), 1..u64::MAX, 1..u64::MAX)) {
                let (a, b) = (TxId::new(a.0, a.1, a.2), TxId::new(b.0, b.1, b.2));
                prop_assert_eq!(a.cmp(&b), a.to_key_bytes().cmp(&b.to_key_bytes()));
            }

            /// Any text either parses to a txid that prints back the same, or is refused.
            #[test]
            fn any_text_parses_back_to_itself_or_is_refused(text in "\\PC{0,40}|[0-9a-f]{8}-[0-9]{1,20}-[0-9]{1,20}") {
                if let Ok(id) = text.parse::<TxId>() {
                    prop_assert_eq!(id.to_string(), text);
                }
            }
        }
    }
}
