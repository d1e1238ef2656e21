//! A bounded cache of the KV store's committed values, in front of its log.
//!
//! Every read of a committed value (a Prepare's validation, a `Kv.Get`, an
//! interactive Execute's reads) went to RocksDB: its memtable, then its
//! files' filters and blocks. The cache keeps the values most recently read
//! or written, at most `capacity` bytes of them, least recently used first out.
//!
//! It never answers a value older than the log's, and a key's value as
//! readers see it only moves forward:
//! - **Writes go through.** A commit's values are put here after its log
//!   write has landed and before its keys' locks go ([`Resource::committed`]
//!   is called there), so a Prepare or a read that the lock kept out finds
//!   the new value. Until then a cached key answers its value from before
//!   the commit, as a read just before the write would have.
//! - **A miss reads the log under its shard's lock**, the lock a commit's
//!   write-through takes too: what it puts here is the log's value when it
//!   read, never one that a write-through has replaced since. (A fill done
//!   outside the lock could put back the value before a commit after a
//!   reader had seen the new one from the log.)
//!
//! The keys are spread over [`SHARDS`] locks by hash, so a miss's log read
//! holds up only the keys of its shard.
//!
//! [`Resource::committed`]: crate::resource::Resource::committed

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};

use foldhash::fast::RandomState;
use lru::LruCache;

/// Bytes an entry is counted for beyond its key and value: the map's slot and
/// list links, and the two allocations' headers.
const ENTRY_OVERHEAD: usize = 96;

/// Locks the keys are spread over.
pub const SHARDS: usize = 16;

/// Committed values by key (`None`: the key has no value), at most `capacity` bytes.
pub struct Cache {
    shards: Vec<Mutex<Shard>>,
    /// Bytes each shard may hold: the cache's capacity over the shards.
    per_shard: usize,
    hasher: RandomState,
}

struct Shard {
    entries: LruCache<String, Option<Vec<u8>>>,
    /// Bytes the entries are counted for.
    bytes: usize,
    hits: u64,
    misses: u64,
}

/// What the cache holds and has answered since it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub hits: u64,
    pub misses: u64,
}

fn cost(key: &str, value: &Option<Vec<u8>>) -> usize {
    key.len() + value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD
}

impl Cache {
    /// A cache of at most `capacity` bytes; under [`SHARDS`] entries' worth keeps nothing
    /// (every read goes to the log).
    pub fn new(capacity: usize) -> Self {
        Self::sharded(capacity, SHARDS)
    }

    fn sharded(capacity: usize, shards: usize) -> Self {
        let shard = || Mutex::new(Shard { entries: LruCache::unbounded(), bytes: 0, hits: 0, misses: 0 });
        let per_shard = capacity / shards;
        Cache { shards: (0..shards).map(|_| shard()).collect(), per_shard, hasher: RandomState::default() }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % self.shards.len()];
        // A panic elsewhere while holding it left whole entries (each change is one call): keep using it.
        shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The committed value of `key`: the cached one, or what `load` reads from the log.
    pub fn read<E>(
        &self,
        key: &str,
        load: impl FnOnce() -> Result<Option<Vec<u8>>, E>,
    ) -> Result<Option<Vec<u8>>, E> {
        let mut shard = self.shard(key);
        if let Some(value) = shard.entries.get(key) {
            let value = value.clone();
            shard.hits += 1;
            return Ok(value);
        }
        shard.misses += 1;
        let value = load()?;
        shard.put(key.to_owned(), value.clone(), self.per_shard);
        Ok(value)
    }

    /// A commit's writes (`None`: deleted), now in the log: every later read answers them.
    pub fn wrote(&self, writes: impl IntoIterator<Item = (String, Option<Vec<u8>>)>) {
        for (key, value) in writes {
            self.shard(&key).put(key, value, self.per_shard);
        }
    }

    /// Forgets every value: for when a commit's writes cannot be known.
    pub fn clear(&self) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            shard.entries.clear();
            shard.bytes = 0;
        }
    }

    pub fn stats(&self) -> CacheStats {
        let mut stats = CacheStats::default();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            stats.entries += shard.entries.len();
            stats.bytes += shard.bytes;
            stats.hits += shard.hits;
            stats.misses += shard.misses;
        }
        stats
    }
}

impl Shard {
    /// Caches `key`'s value, replacing any older one, then evicts the least
    /// recently used entries down to `capacity` (one larger than it is not kept).
    fn put(&mut self, key: String, value: Option<Vec<u8>>, capacity: usize) {
        let added = cost(&key, &value);
        if added > capacity {
            if let Some((key, old)) = self.entries.pop_entry(&key) {
                self.bytes -= cost(&key, &old);
            }
            return;
        }
        // A key already cached (a committed write to a key just read, the
        // common case) has its value replaced where it is: one lookup, and
        // no entry freed and allocated again.
        match self.entries.get_mut(&key) {
            Some(slot) => {
                self.bytes = self.bytes - cost(&key, slot) + added;
                *slot = value;
            }
            None => {
                self.bytes += added;
                self.entries.put(key, value);
            }
        }
        while self.bytes > capacity {
            let Some((key, old)) = self.entries.pop_lru() else { break };
            self.bytes -= cost(&key, &old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn value(s: &str) -> Option<Vec<u8>> {
        Some(s.as_bytes().to_vec())
    }

    /// Reads `key` with `log` as the log's value: what it answered, and whether it read the log.
    fn read(cache: &Cache, key: &str, log: &Option<Vec<u8>>) -> (Option<Vec<u8>>, bool) {
        let loaded = Cell::new(false);
        let got = cache
            .read(key, || {
                loaded.set(true);
                Ok::<_, ()>(log.clone())
            })
            .unwrap();
        (got, loaded.get())
    }

    #[test]
    fn a_read_fills_and_the_next_one_hits() {
        let cache = Cache::new(1 << 20);
        assert_eq!(read(&cache, "a", &value("1")), (value("1"), true));
        // The log changed behind the cache's back (no commit does that): the cache answers.
        assert_eq!(read(&cache, "a", &value("2")), (value("1"), false));
        // An absent key is cached as absent.
        assert_eq!(read(&cache, "b", &None), (None, true));
        assert_eq!(read(&cache, "b", &value("x")), (None, false));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (2, 2, 2));
    }

    #[test]
    fn a_commit_writes_through_and_a_delete_is_cached_as_absent() {
        let cache = Cache::new(1 << 20);
        read(&cache, "a", &value("1"));
        cache.wrote([("a".to_owned(), value("2")), ("c".to_owned(), value("3"))]);
        assert_eq!(read(&cache, "a", &value("stale")), (value("2"), false));
        assert_eq!(read(&cache, "c", &None), (value("3"), false));
        cache.wrote([("a".to_owned(), None)]);
        assert_eq!(read(&cache, "a", &value("stale")), (None, false));
        cache.clear();
        assert_eq!(read(&cache, "c", &value("4")), (value("4"), true));
    }

    #[test]
    fn a_failed_load_is_passed_on_and_caches_nothing() {
        let cache = Cache::new(1 << 20);
        assert_eq!(cache.read("a", || Err::<Option<Vec<u8>>, _>("disk")), Err("disk"));
        assert_eq!(read(&cache, "a", &value("1")), (value("1"), true));
    }

    #[test]
    fn it_holds_at_most_its_capacity_least_recently_used_out_first() {
        let each = cost("k0", &value("v"));
        let cache = Cache::sharded(3 * each, 1);
        for key in ["k0", "k1", "k2"] {
            read(&cache, key, &value("v"));
        }
        read(&cache, "k0", &value("v")); // k1 is now the least recently used
        read(&cache, "k3", &value("v"));
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes), (3, 3 * each));
        assert!(!read(&cache, "k0", &value("v")).1, "k0 was used lately: kept");
        assert!(read(&cache, "k1", &value("v")).1, "k1 was the least recently used: evicted");
        // A value larger than the whole cache is answered, not kept, and evicts nothing else.
        let big = Some(vec![b'x'; 4 * each]);
        assert_eq!(read(&cache, "big", &big), (big.clone(), true));
        cache.wrote([("big".to_owned(), big.clone())]);
        assert_eq!(cache.stats().entries, 3);
        assert!(cache.stats().bytes <= 3 * each);
    }

    #[test]
    fn a_rewrite_replaces_the_entry_and_its_size() {
        let cache = Cache::new(1 << 20);
        cache.wrote([("a".to_owned(), Some(vec![0; 1000]))]);
        cache.wrote([("a".to_owned(), value("1"))]);
        assert_eq!(cache.stats().bytes, cost("a", &value("1")));
        assert_eq!(cache.stats().entries, 1);
    }

    /// A rewrite in place still makes its key the most recently used, and a
    /// rewrite that grows evicts the least recently used others, never itself.
    #[test]
    fn a_rewrite_is_a_use_and_its_growth_evicts_others() {
        let each = cost("k0", &value("v"));
        let cache = Cache::sharded(3 * each, 1);
        cache.wrote(["k0", "k1", "k2"].map(|key| (key.to_owned(), value("v"))));
        cache.wrote([("k0".to_owned(), value("w"))]); // k1 is now the least recently used
        cache.wrote([("k3".to_owned(), value("v"))]);
        assert!(!read(&cache, "k0", &value("x")).1, "k0 was rewritten lately: kept");
        assert!(read(&cache, "k1", &value("v")).1, "k1 was the least recently used: evicted");
        let grown = Some(vec![b'g'; 2 * each]);
        cache.wrote([("k3".to_owned(), grown.clone())]);
        assert_eq!(read(&cache, "k3", &None), (grown.clone(), false), "the grown entry stays");
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes), (1, cost("k3", &grown)), "the others made room");
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let cache = Cache::new(0);
        assert_eq!(read(&cache, "a", &value("1")), (value("1"), true));
        cache.wrote([("a".to_owned(), value("2"))]);
        assert_eq!(read(&cache, "a", &value("3")), (value("3"), true));
        assert_eq!(cache.stats().entries, 0);
    }

    /// A writer commits rising values to a few keys as the runtime does (the
    /// log first, then the write-through) while readers read them through a
    /// cache too small to hold them all, so misses fill while commits land:
    /// every reader sees each key's value only rise, and at the end every key
    /// reads what the log holds.
    #[test]
    fn under_concurrent_commits_reads_only_move_forward_and_end_at_the_log() {
        const KEYS: u64 = 6;
        let log: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let load = |log: &Mutex<HashMap<String, u64>>, key: &str| {
            Ok::<_, ()>(log.lock().unwrap().get(key).map(|v| v.to_string().into_bytes()))
        };
        let number =
            |v: Option<Vec<u8>>| v.map_or(0, |v| String::from_utf8(v).unwrap().parse::<u64>().unwrap());
        // Room for about two keys in each of two shards.
        let cache = Arc::new(Cache::sharded(4 * cost("k0", &value("1000000")), 2));
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (cache, log, done) = (cache.clone(), log.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut seen = [0u64; KEYS as usize];
                    let mut reads = 0u64;
                    while !done.load(Ordering::Relaxed) {
                        for k in 0..KEYS {
                            let key = format!("k{k}");
                            let now = number(cache.read(&key, || load(&log, &key)).unwrap());
                            assert!(
                                now >= seen[k as usize],
                                "{key} went back from {} to {now}",
                                seen[k as usize]
                            );
                            seen[k as usize] = now;
                            reads += 1;
                        }
                    }
                    reads
                })
            })
            .collect();
        for i in 1..=60_000u64 {
            let key = format!("k{}", i % KEYS);
            log.lock().unwrap().insert(key.clone(), i);
            std::thread::yield_now();
            cache.wrote([(key, Some(i.to_string().into_bytes()))]);
        }
        done.store(true, Ordering::Relaxed);
        let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        for k in 0..KEYS {
            let key = format!("k{k}");
            assert_eq!(cache.read(&key, || load(&log, &key)).unwrap(), load(&log, &key).unwrap());
        }
        let stats = cache.stats();
        assert!(reads > 1000 && stats.misses > 100 && stats.hits > 100, "{reads} reads, {stats:?}");
    }
}
