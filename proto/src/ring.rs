//! The consistent-hash ring that routes keys to participants, and the routing
//! of a ring while a migration moves keys to a new one.
//!
//! Each member owns `weight x vnodes` points on a 64-bit ring, at
//! `hash("<name>#<i>")` for `i` in `0..weight * vnodes`. A key belongs to the
//! owner of the first point at or after `hash(key)`, wrapping around. Adding a
//! member moves only the keys that now fall on its points: about 1/N.
//!
//! `hash` is stable across versions, platforms and languages, so a client in
//! any language routes exactly like this one: the 64-bit FNV-1a of the UTF-8
//! bytes, then MurmurHash3's `fmix64` finalizer to spread similar inputs.
//!
//! While keys move from ring `current` to ring `target` ([`Routing`]), a key
//! whose owner differs between the two is at its `target` owner if it sorts
//! before the migration's cursor (bytewise), else at its `current` owner.

use std::collections::BTreeMap;

use crate::v1;

/// Points per unit of weight in rings made by this version. With 2048 the
/// largest of 3 to 10 members owns at most ~1.05x the mean share.
pub const VNODES: u32 = 2048;

/// Points per member in rings from before the ring had epochs (max/mean ~1.24).
pub const LEGACY_VNODES: u32 = 128;

/// Largest weight a member may have.
pub const MAX_WEIGHT: u32 = 64;

/// Most points per unit of weight a ring from the wire may ask for.
pub const MAX_VNODES: u32 = 16_384;

/// Most points a ring from the wire may have (64 members of weight 64 at
/// [`VNODES`]; about 128 MiB): a hostile ring cannot make its reader allocate
/// more.
pub const MAX_POINTS: u64 = 1 << 23;

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

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ring {
    /// (point, index into `names`), sorted by point.
    points: Vec<(u64, usize)>,
    names: Vec<String>,
    weights: Vec<u32>,
    vnodes: u32,
    /// Where to look for a hash: see [`Buckets`].
    buckets: Buckets,
}

/// An index over the sorted points, so that a lookup reads a few cache lines
/// rather than binary-searching all of them (a 3-member ring has 6,144
/// points, 96 KiB: a search was ~13 dependent cache misses, and routing was
/// a quarter of a client's CPU). The hash space is cut into `2^bits` equal
/// buckets, about one per point; `first[b]` is the index of the first point
/// at or after bucket `b`'s start (`first[2^bits]` = the number of points).
/// The first point at or after a hash in bucket `b` is then among
/// `first[b]..=first[b + 1]`: every point of a later bucket is larger.
///
/// Most lookups read neither: `owners` cuts the hash space four times finer
/// and holds, for each slice that one member owns whole, that member's index
/// (one byte, 32 KiB for a 3-member ring), [`MIXED`] for a slice that a point
/// splits between two members. A slice's owner is the owner of every point
/// from the first at or after its start to the first at or after its end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Buckets {
    bits: u32,
    first: Vec<u32>,
    owner_bits: u32,
    owners: Vec<u8>,
}

/// An `owners` slice split between members (or owned by a member whose index
/// does not fit a byte): its hashes are looked up in `first` and the points.
const MIXED: u8 = u8::MAX;

impl Buckets {
    fn over(points: &[(u64, usize)]) -> Buckets {
        // At most 2^16 buckets (256 KiB) for the largest rings allowed.
        let bits = points.len().next_power_of_two().trailing_zeros().clamp(1, 16);
        let count = 1usize << bits;
        let mut first = Vec::with_capacity(count + 1);
        let mut at = 0;
        for b in 0..count {
            let start = (b as u64) << (64 - bits);
            while at < points.len() && points[at].0 < start {
                at += 1;
            }
            first.push(at as u32);
        }
        first.push(points.len() as u32);
        let mut buckets = Buckets { bits, first, owner_bits: (bits + 2).min(18), owners: Vec::new() };
        buckets.owners = buckets.slice_owners(points);
        buckets
    }

    /// Each slice's owner ([`MIXED`] if not one member's), as `owners` holds them.
    fn slice_owners(&self, points: &[(u64, usize)]) -> Vec<u8> {
        if points.is_empty() {
            return Vec::new();
        }
        let owner_at = |i: usize| points[i % points.len()].1;
        let shift = 64 - self.owner_bits;
        (0..1u64 << self.owner_bits)
            .map(|slice| {
                let start = slice << shift;
                let (from, to) =
                    (self.find(points, start), self.find(points, start | (u64::MAX >> self.owner_bits)));
                let owner = owner_at(from);
                match u8::try_from(owner) {
                    Ok(byte) if byte != MIXED && (from..=to).all(|i| owner_at(i) == owner) => byte,
                    _ => MIXED,
                }
            })
            .collect()
    }

    /// The member (an index into the ring's names) that owns `h`: the owner
    /// of the first point at or after it, wrapping past the last to the first.
    fn owner(&self, points: &[(u64, usize)], h: u64) -> usize {
        match self.owners[(h >> (64 - self.owner_bits)) as usize] {
            MIXED => points.get(self.find(points, h)).unwrap_or(&points[0]).1,
            owner => usize::from(owner),
        }
    }

    /// The index of the first of `points` at or after `h` (`points.len()` if none).
    fn find(&self, points: &[(u64, usize)], h: u64) -> usize {
        let b = (h >> (64 - self.bits)) as usize;
        let (lo, hi) = (self.first[b] as usize, self.first[b + 1] as usize);
        lo + points[lo..hi].partition_point(|(point, _)| *point < h)
    }
}

impl Ring {
    /// A ring over `names`, each of weight 1 (order does not matter; duplicates count once).
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        Ring::weighted(names.into_iter().map(|n| (n.into(), 1)), VNODES)
    }

    /// A ring over `(name, weight)` members with `vnodes` points per unit of
    /// weight. A weight of 0 counts as 1; a name given twice keeps its first weight.
    pub fn weighted(members: impl IntoIterator<Item = (String, u32)>, vnodes: u32) -> Self {
        let mut kept: BTreeMap<String, u32> = BTreeMap::new();
        for (name, weight) in members {
            kept.entry(name).or_insert(weight.clamp(1, MAX_WEIGHT));
        }
        let members = kept;
        let vnodes = vnodes.max(1);
        let names: Vec<String> = members.keys().cloned().collect();
        let weights: Vec<u32> = members.values().copied().collect();
        let mut points: Vec<(u64, usize)> = names
            .iter()
            .zip(&weights)
            .enumerate()
            .flat_map(|(i, (name, weight))| {
                (0..weight.saturating_mul(vnodes)).map(move |v| (hash(format!("{name}#{v}").as_bytes()), i))
            })
            .collect();
        // Ties (astronomically rare) go to the smaller name, deterministically.
        points.sort_unstable();
        let buckets = Buckets::over(&points);
        Ring { points, names, weights, vnodes, buckets }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The members, in name order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.binary_search_by(|n| n.as_str().cmp(name)).is_ok()
    }

    /// `(name, weight)` of every member, in name order.
    pub fn members(&self) -> impl Iterator<Item = (&str, u32)> {
        self.names.iter().map(String::as_str).zip(self.weights.iter().copied())
    }

    pub fn weight(&self, name: &str) -> Option<u32> {
        self.members().find(|(n, _)| *n == name).map(|(_, w)| w)
    }

    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// The member that owns `key`, or `None` on an empty ring.
    pub fn route(&self, key: &str) -> Option<&str> {
        if self.points.is_empty() {
            return None;
        }
        Some(&self.names[self.buckets.owner(&self.points, hash(key.as_bytes()))])
    }

    /// Each member's share of the hash space (they sum to 1), in name order.
    pub fn shares(&self) -> Vec<(String, f64)> {
        let mut owned = vec![0u128; self.names.len()];
        for (i, (point, owner)) in self.points.iter().enumerate() {
            // The arc that ends at this point, from the point before it (wrapping).
            let previous = if i == 0 { self.points[self.points.len() - 1].0 } else { self.points[i - 1].0 };
            owned[*owner] += u128::from(point.wrapping_sub(previous));
        }
        if self.points.len() == 1 {
            owned[0] = 1 << 64;
        }
        self.names.iter().cloned().zip(owned.into_iter().map(|o| o as f64 / 2f64.powi(64))).collect()
    }

    /// The largest share over the mean share (1.0 is perfect balance).
    pub fn max_over_mean(&self) -> f64 {
        let shares = self.shares();
        let max = shares.iter().map(|(_, s)| *s).fold(0.0, f64::max);
        max * shares.len().max(1) as f64
    }

    pub fn to_wire(&self) -> v1::RingDescriptor {
        v1::RingDescriptor {
            members: self
                .members()
                .map(|(name, weight)| v1::RingMember { name: name.into(), weight })
                .collect(),
            vnodes: self.vnodes,
        }
    }

    pub fn from_wire(ring: &v1::RingDescriptor) -> Ring {
        let vnodes = if ring.vnodes == 0 { VNODES } else { ring.vnodes };
        Ring::weighted(ring.members.iter().map(|m| (m.name.clone(), m.weight)), vnodes)
    }

    /// Whether a ring from a peer is within bounds ([`MAX_VNODES`],
    /// [`MAX_POINTS`]): check before [`Ring::from_wire`] on what a stranger
    /// may have sent.
    pub fn check_wire(ring: &v1::RingDescriptor) -> Result<(), String> {
        let vnodes = if ring.vnodes == 0 { VNODES } else { ring.vnodes };
        if vnodes > MAX_VNODES {
            return Err(format!("a ring of {vnodes} points per weight (at most {MAX_VNODES})"));
        }
        let weights: u64 = ring.members.iter().map(|m| u64::from(m.weight.clamp(1, MAX_WEIGHT))).sum();
        let points = weights.saturating_mul(u64::from(vnodes));
        if points > MAX_POINTS {
            return Err(format!("a ring of {points} points (at most {MAX_POINTS})"));
        }
        Ok(())
    }
}

/// How far a migration has gone: keys that sort before it have moved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cursor {
    /// Keys before this one (bytewise) have moved; `Key("")`: none yet.
    Key(String),
    /// Every key has moved.
    End,
}

impl Cursor {
    /// True if `key` is behind the cursor (it has moved).
    pub fn passed(&self, key: &str) -> bool {
        match self {
            Cursor::End => true,
            Cursor::Key(cursor) => key.as_bytes() < cursor.as_bytes(),
        }
    }

    /// True if `key` lies in `[lo, self)`.
    pub fn covers(&self, lo: &str, key: &str) -> bool {
        key.as_bytes() >= lo.as_bytes() && self.passed(key)
    }
}

/// A migration: keys whose owner differs between the routing's current ring
/// and `target` move in key order; `cursor` says how far they have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub target: Ring,
    pub cursor: Cursor,
}

/// Where every key lives at one ring epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub epoch: u64,
    pub current: Ring,
    pub migration: Option<Move>,
}

impl Routing {
    /// The owner of `key` now.
    pub fn route(&self, key: &str) -> Option<&str> {
        let current = self.current.route(key);
        match &self.migration {
            Some(m) if m.cursor.passed(key) => m.target.route(key).or(current),
            _ => current,
        }
    }

    /// `(from, to)` if `key` changes owner in this routing's migration.
    pub fn moving<'a>(&'a self, key: &str) -> Option<(Option<&'a str>, &'a str)> {
        let m = self.migration.as_ref()?;
        let to = m.target.route(key)?;
        let from = self.current.route(key);
        (from != Some(to)).then_some((from, to))
    }

    /// The ring once the migration (if any) ends.
    pub fn settled(&self) -> &Ring {
        self.migration.as_ref().map_or(&self.current, |m| &m.target)
    }

    pub fn to_wire(&self) -> v1::Routing {
        let (target, cursor, cursor_end) = match &self.migration {
            None => (None, String::new(), false),
            Some(Move { target, cursor: Cursor::Key(key) }) => (Some(target.to_wire()), key.clone(), false),
            Some(Move { target, cursor: Cursor::End }) => (Some(target.to_wire()), String::new(), true),
        };
        v1::Routing { epoch: self.epoch, current: Some(self.current.to_wire()), target, cursor, cursor_end }
    }

    /// [`Ring::check_wire`] for both rings of a routing from a peer.
    pub fn check_wire(routing: &v1::Routing) -> Result<(), String> {
        routing.current.iter().chain(&routing.target).try_for_each(Ring::check_wire)
    }

    pub fn from_wire(routing: &v1::Routing) -> Routing {
        let current = routing.current.as_ref().map(Ring::from_wire).unwrap_or_default();
        let migration = routing.target.as_ref().map(|target| Move {
            target: Ring::from_wire(target),
            cursor: if routing.cursor_end { Cursor::End } else { Cursor::Key(routing.cursor.clone()) },
        });
        Routing { epoch: routing.epoch, current, migration }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The owner's index by searching every point, as routing did before the
    /// bucket index: the reference the index must agree with.
    fn searched(ring: &Ring, h: u64) -> usize {
        ring.points.partition_point(|(point, _)| *point < h)
    }

    /// The member that owns `h` by that search.
    fn searched_owner(ring: &Ring, h: u64) -> usize {
        ring.points[searched(ring, h) % ring.points.len()].1
    }

    fn rings() -> Vec<Ring> {
        let weighted = [("a".to_owned(), 1), ("b".to_owned(), 3), ("c".to_owned(), 64)];
        vec![
            Ring::weighted([("solo".to_owned(), 1)], 1),
            Ring::weighted([("x".to_owned(), 1), ("y".to_owned(), 1)], 3),
            Ring::new(["p1", "p2", "p3"]),
            Ring::weighted(weighted, LEGACY_VNODES),
            Ring::new((0..10).map(|i| format!("member-{i}"))),
            // More members than a byte of `owners` can name.
            Ring::weighted((0..300).map(|i| (format!("m{i:03}"), 1)), 4),
        ]
    }

    /// The slice table answers most lookups alone: in a 3-member ring of
    /// 2,048 points each, more than four slices in five are one member's.
    #[test]
    fn most_slices_of_a_ring_have_one_owner() {
        let ring = Ring::new(["p1", "p2", "p3"]);
        let whole = ring.buckets.owners.iter().filter(|o| **o != MIXED).count();
        assert!(whole * 5 > ring.buckets.owners.len() * 4, "{whole} of {}", ring.buckets.owners.len());
    }

    /// Every hash finds the point a search of all points finds: at each point,
    /// just before and after it, at the ends of the hash space and at random.
    #[test]
    fn the_bucket_index_finds_what_a_search_of_every_point_finds() {
        for ring in rings() {
            let mut hashes = vec![0, 1, u64::MAX, u64::MAX - 1, 1 << 63];
            for (point, _) in &ring.points {
                hashes.extend([*point, point.wrapping_sub(1), point.wrapping_add(1)]);
            }
            for bits in [ring.buckets.bits, ring.buckets.owner_bits] {
                for b in 0..=(1u64 << bits).min(1 << 12) {
                    let start = b.checked_shl(64 - bits).unwrap_or(0);
                    hashes.extend([start, start.wrapping_sub(1)]);
                }
            }
            hashes.extend((0..20_000u64).map(|i| hash(&i.to_le_bytes())));
            for h in hashes {
                assert_eq!(
                    ring.buckets.find(&ring.points, h),
                    searched(&ring, h),
                    "hash {h:#x}, {} points",
                    ring.points.len()
                );
                assert_eq!(ring.buckets.owner(&ring.points, h), searched_owner(&ring, h), "owner of {h:#x}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_hash_is_found_as_a_search_finds_it(h in proptest::prelude::any::<u64>()) {
            for ring in rings() {
                proptest::prop_assert_eq!(ring.buckets.find(&ring.points, h), searched(&ring, h));
                proptest::prop_assert_eq!(ring.buckets.owner(&ring.points, h), searched_owner(&ring, h));
            }
        }
    }

    fn wire(members: usize, weight: u32, vnodes: u32) -> v1::RingDescriptor {
        let members = (0..members).map(|i| v1::RingMember { name: format!("p{i}"), weight }).collect();
        v1::RingDescriptor { members, vnodes }
    }

    /// A ring a stranger sends cannot make its reader allocate without bound;
    /// every ring this version makes passes.
    #[test]
    fn rings_from_the_wire_are_bounded() {
        assert_eq!(Ring::check_wire(&Ring::new(["p1", "p2", "p3"]).to_wire()), Ok(()));
        assert_eq!(Ring::check_wire(&wire(64, MAX_WEIGHT, VNODES)), Ok(()), "the largest ring allowed");
        assert_eq!(Ring::check_wire(&wire(1, 1, 0)), Ok(()), "0: the default");
        for (hostile, what) in [
            (wire(1, 1, u32::MAX), "points per weight"),
            (wire(9, MAX_WEIGHT, MAX_VNODES), "points"),
            (wire(65, MAX_WEIGHT, VNODES), "points"),
            (wire(200_000, 1, VNODES), "points"),
        ] {
            let refused = Ring::check_wire(&hostile).expect_err(what);
            assert!(refused.contains(what), "{refused}");
            let routing = v1::Routing { target: Some(hostile), ..Default::default() };
            assert!(Routing::check_wire(&routing).is_err(), "a routing's target is checked too");
        }
        // Unchecked, a weight times the vnodes saturates instead of wrapping.
        assert_eq!(MAX_WEIGHT.saturating_mul(u32::MAX), u32::MAX);
    }

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
            assert!((9_000..11_000).contains(count), "{name} got {count} of 30000");
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
        assert!((0.22..0.28).contains(&share), "moved {share:.3} of the keys, expected about 0.25");
    }

    #[test]
    fn shares_sum_to_one_and_stay_within_a_tenth_of_the_mean() {
        for n in 3..=10 {
            let ring = Ring::new((1..=n).map(|i| format!("p{i}")));
            let total: f64 = ring.shares().iter().map(|(_, s)| s).sum();
            assert!((total - 1.0).abs() < 1e-9, "{n} members: shares sum to {total}");
            assert!(ring.max_over_mean() <= 1.1, "{n} members: max/mean {:.3}", ring.max_over_mean());
        }
        let legacy = (3..=10)
            .map(|n| Ring::weighted((1..=n).map(|i| (format!("p{i}"), 1)), LEGACY_VNODES).max_over_mean())
            .fold(0.0, f64::max);
        assert!(legacy > 1.2, "the legacy ring is the unbalanced one: {legacy:.3}");
        assert_eq!(Ring::new(["solo"]).shares(), vec![("solo".to_owned(), 1.0)]);
    }

    #[test]
    fn weight_scales_the_share() {
        let ring = Ring::weighted([("big".to_owned(), 3), ("small".to_owned(), 1)], VNODES);
        let shares: BTreeMap<String, f64> = ring.shares().into_iter().collect();
        assert!((shares["big"] - 0.75).abs() < 0.03, "{shares:?}");
    }

    #[test]
    fn a_migration_moves_keys_behind_its_cursor_only() {
        let current = Ring::new(["p1", "p2", "p3"]);
        let target = Ring::new(["p1", "p2", "p3", "p4"]);
        let at = |cursor| Routing {
            epoch: 2,
            current: current.clone(),
            migration: Some(Move { target: target.clone(), cursor }),
        };
        let keys: Vec<String> = (0..2000).map(|i| format!("key{i:04}")).collect();
        let start = at(Cursor::Key(String::new()));
        let middle = at(Cursor::Key("key1000".into()));
        let end = at(Cursor::End);
        for key in &keys {
            assert_eq!(start.route(key), current.route(key));
            assert_eq!(end.route(key), target.route(key));
            let expected = if key.as_str() < "key1000" { target.route(key) } else { current.route(key) };
            assert_eq!(middle.route(key), expected, "{key}");
            assert_eq!(middle.moving(key).is_some(), current.route(key) != target.route(key));
        }
        let wire = middle.to_wire();
        assert_eq!(Routing::from_wire(&wire), middle);
        assert_eq!(Routing::from_wire(&end.to_wire()), end);
    }
}
