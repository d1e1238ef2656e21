//! The consistent-hash ring that routes keys to participants.
//!
//! Each participant owns [`VNODES`] points on a 64-bit ring, at
//! `hash("<name>#<i>")` for `i` in `0..VNODES`. A key belongs to the owner of
//! the first point at or after `hash(key)`, wrapping around. Adding a
//! participant moves only the keys that now fall on its points: about 1/N.
//!
//! `hash` is stable across versions, platforms and languages, so a client in
//! any language routes exactly like this one: the 64-bit FNV-1a of the UTF-8
//! bytes, then MurmurHash3's `fmix64` finalizer to spread similar inputs.

/// Points per participant.
pub const VNODES: u32 = 128;

/// FNV-1a (64-bit) followed by MurmurHash3's fmix64.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[derive(Debug, Clone, Default)]
pub struct Ring {
    /// (point, index into `names`), sorted by point.
    points: Vec<(u64, usize)>,
    names: Vec<String>,
}

impl Ring {
    /// A ring over `names` (order does not matter; duplicates count once).
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        let mut names: Vec<String> = names.into_iter().map(Into::into).collect();
        names.sort();
        names.dedup();
        let mut points: Vec<(u64, usize)> = names
            .iter()
            .enumerate()
            .flat_map(|(i, name)| (0..VNODES).map(move |v| (hash(format!("{name}#{v}").as_bytes()), i)))
            .collect();
        // Ties (astronomically rare) go to the smaller name, deterministically.
        points.sort_unstable();
        Ring { points, names }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The participant that owns `key`, or `None` on an empty ring.
    pub fn route(&self, key: &str) -> Option<&str> {
        if self.points.is_empty() {
            return None;
        }
        let h = hash(key.as_bytes());
        let at = self.points.partition_point(|(point, _)| *point < h);
        let (_, owner) = self.points[at % self.points.len()];
        Some(&self.names[owner])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_the_documented_function() {
        // Computed independently (FNV-1a 64, then fmix64); other-language clients must match.
        assert_eq!(hash(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash(b"a"), 0x82a2_a958_a9be_ce5b);
        assert_eq!(hash(b"account-1"), 0x4ea9_6e94_7d43_b847);
        assert_eq!(hash(b"p1#0"), 0xec62_3844_a2dd_46c2);
    }

    #[test]
    fn routing_is_deterministic_and_order_free() {
        let a = Ring::new(["p1", "p2", "p3"]);
        let b = Ring::new(["p3", "p1", "p2", "p1"]);
        for i in 0..1000 {
            let key = format!("k{i}");
            assert_eq!(a.route(&key), b.route(&key));
        }
        assert_eq!(Ring::new(Vec::<String>::new()).route("k"), None);
    }

    #[test]
    fn keys_spread_over_every_participant() {
        let ring = Ring::new(["p1", "p2", "p3"]);
        let mut counts = std::collections::HashMap::new();
        for i in 0..30_000 {
            *counts.entry(ring.route(&format!("account-{i}")).unwrap().to_owned()).or_insert(0) += 1;
        }
        for (name, count) in &counts {
            assert!((7_000..13_000).contains(count), "{name} got {count} of 30000");
        }
    }

    #[test]
    fn adding_a_participant_moves_about_one_nth_of_the_keys() {
        let before = Ring::new(["p1", "p2", "p3"]);
        let after = Ring::new(["p1", "p2", "p3", "p4"]);
        let keys: Vec<String> = (0..20_000).map(|i| format!("key{i}")).collect();
        let moved: Vec<&String> = keys.iter().filter(|k| before.route(k) != after.route(k)).collect();
        // Every moved key moved to the new participant.
        assert!(moved.iter().all(|k| after.route(k) == Some("p4")));
        let share = moved.len() as f64 / keys.len() as f64;
        assert!((0.15..0.35).contains(&share), "moved {share:.3} of the keys, expected about 0.25");
    }
}
