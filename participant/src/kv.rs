//! The reference KV participant's [`Resource`]: put, delete, add, expect.
//!
//! Values live under `k/<key>` in the participant's log. A branch's payload is
//! a [`v1::KvBatch`]; its redo is the final value of each written key.

use std::collections::BTreeMap;
use std::sync::Arc;

use decree_proto::v1;
use decree_proto::{KvOp, TxId};
use decree_runtime::{record, Log, LogError, Storage, Write};
use prost::Message;

use crate::cache::{Cache, CacheStats};
use crate::engine::Validated;
use crate::membership::Ownership;
use crate::resource::Resource;
use decree_proto::ring::Routing;

const DATA: &[u8] = b"k/";

#[derive(Clone, PartialEq, prost::Message)]
struct KvRedo {
    #[prost(message, repeated, tag = "1")]
    writes: Vec<KvWrite>,
    /// A migration batch's branch: the ring state it leads to (without entries).
    #[prost(message, optional, tag = "2")]
    migration: Option<v1::MigrationStep>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct KvWrite {
    #[prost(string, tag = "1")]
    key: String,
    /// Unset deletes the key.
    #[prost(bytes = "vec", optional, tag = "2")]
    value: Option<Vec<u8>>,
}

fn data_key(key: &str) -> Vec<u8> {
    [DATA, key.as_bytes()].concat()
}

/// Bytes of committed values a store caches unless told otherwise (see [`crate::cache`]).
pub const CACHE_BYTES: usize = 64 << 20;

/// The KV store over a participant's log (any [`Storage`]).
#[derive(Clone)]
pub struct KvStore<S = Log> {
    log: S,
    ownership: Ownership,
    /// Shared by the store's clones: the resource and the Kv service read through one cache.
    cache: Arc<Cache>,
}

impl<S: Storage> KvStore<S> {
    /// A store that takes every key sent to it (in no ring).
    pub fn new(log: S) -> Self {
        KvStore { log, ownership: Ownership::default(), cache: Arc::new(Cache::new(CACHE_BYTES)) }
    }

    /// The store of ring member `name`: it serves the keys its recorded ring gives it.
    pub fn member(log: S, name: &str) -> Result<Self, String> {
        let ownership = Ownership::load(&log, name)?;
        Ok(KvStore { log, ownership, cache: Arc::new(Cache::new(CACHE_BYTES)) })
    }

    /// The store with a cache of at most `bytes` of committed values (0: none).
    /// Call before the store is cloned or used: its clones share the cache.
    pub fn with_cache(self, bytes: usize) -> Self {
        KvStore { cache: Arc::new(Cache::new(bytes)), ..self }
    }

    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }

    /// The committed value of `key`.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, LogError> {
        self.cache.read(key, || self.log.get(&data_key(key)))
    }

    /// What the cache of committed values holds and has answered.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Every key from `after` on with its value's size, in key order.
    pub fn keys_from(&self, after: &str) -> Result<Vec<(String, usize)>, LogError> {
        self.keys_between(after, None)
    }

    /// Every key in `[from, to)` (`to` unset: to the last key) with its value's size, in key order.
    pub fn keys_between(&self, from: &str, to: Option<&str>) -> Result<Vec<(String, usize)>, LogError> {
        let end = to.map_or_else(|| vec![b'k', b'/' + 1], data_key);
        let entries = self.log.scan_range(&data_key(from), &end)?;
        Ok(entries
            .into_iter()
            .filter_map(|(k, v)| Some((String::from_utf8(k[DATA.len()..].to_vec()).ok()?, v.len())))
            .collect())
    }
}

fn show(value: &Option<Vec<u8>>) -> String {
    match value {
        None => "nothing".into(),
        Some(bytes) => format!("{:?}", String::from_utf8_lossy(bytes)),
    }
}

/// Each key's value as a branch sees it after its ops, and whether the branch wrote it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Overlay {
    values: BTreeMap<String, (Option<Vec<u8>>, bool)>,
}

impl Overlay {
    /// Applies `ops` in order over the committed values that `read` returns
    /// (asked once per key). An op that cannot apply refuses the whole batch.
    pub fn apply(
        &mut self,
        ops: &[KvOp],
        mut read: impl FnMut(&str) -> Result<Option<Vec<u8>>, String>,
    ) -> Result<(), String> {
        for op in ops {
            let key = op.key();
            if !self.values.contains_key(key) {
                let value = read(key).map_err(|e| format!("reading {key:?}: {e}"))?;
                self.values.insert(key.to_owned(), (value, false));
            }
            let (value, written) = self.values.get_mut(key).expect("inserted above");
            match op {
                KvOp::Put { value: new, .. } => (*value, *written) = (Some(new.clone()), true),
                KvOp::Delete { .. } => (*value, *written) = (None, true),
                KvOp::Add { delta, .. } => {
                    let current = match value {
                        None => 0,
                        Some(bytes) => std::str::from_utf8(bytes)
                            .ok()
                            .and_then(|s| s.parse::<i64>().ok())
                            .ok_or_else(|| {
                                format!("add on key {key:?}: value {} is not a decimal integer", show(value))
                            })?,
                    };
                    let sum = current
                        .checked_add(*delta)
                        .ok_or_else(|| format!("add on key {key:?}: {current} + {delta} overflows"))?;
                    (*value, *written) = (Some(sum.to_string().into_bytes()), true);
                }
                KvOp::Expect { value: expected, .. } => {
                    if value != expected {
                        return Err(format!(
                            "expect on key {key:?} failed: expected {}, found {}",
                            show(expected),
                            show(value)
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The value of `key` as the branch sees it, if the branch touched it.
    pub fn value(&self, key: &str) -> Option<&Option<Vec<u8>>> {
        self.values.get(key).map(|(value, _)| value)
    }

    /// The keys the branch wrote and their final values (`None`: deleted), in key order.
    pub fn writes(self) -> Vec<(String, Option<Vec<u8>>)> {
        self.values.into_iter().filter(|(_, (_, written))| *written).map(|(k, (v, _))| (k, v)).collect()
    }
}

/// Decodes a [`v1::KvBatch`] payload into checked ops.
pub fn ops(payload: &[u8]) -> Result<Vec<KvOp>, String> {
    Ok(batch(payload)?.0)
}

/// Decodes a [`v1::KvBatch`] payload into checked ops and its migration step, if any.
pub fn batch(payload: &[u8]) -> Result<(Vec<KvOp>, Option<v1::MigrationStep>), String> {
    let batch = v1::KvBatch::decode(payload).map_err(|e| format!("invalid KV payload: {e}"))?;
    let ops: Result<Vec<KvOp>, String> =
        batch.ops.into_iter().map(|op| KvOp::try_from(op).map_err(|e| e.to_string())).collect();
    Ok((ops?, batch.migration))
}

/// The distinct keys of `ops`, sorted.
pub fn keys(ops: &[KvOp]) -> Vec<String> {
    let mut keys: Vec<String> = ops.iter().map(|op| op.key().to_owned()).collect();
    keys.sort();
    keys.dedup();
    keys
}

impl<S: Storage> KvStore<S> {
    /// The branch's view after `ops` over the committed values here.
    pub fn evaluate(&self, ops: &[KvOp]) -> Result<Overlay, String> {
        let mut overlay = Overlay::default();
        overlay.apply(ops, |key| self.get(key).map_err(|e| e.to_string()))?;
        Ok(overlay)
    }

    /// What the branch `payload` would do here: its redo, or why it cannot commit.
    pub fn validate(&self, payload: &[u8]) -> Validated {
        self.validate_for(None, payload)
    }

    /// [`KvStore::validate`] for the branch of `txid`, whose keys are locked:
    /// a key this participant does not own now is refused with a redirect.
    pub fn validate_for(&self, txid: Option<TxId>, payload: &[u8]) -> Validated {
        let (ops, migration) = match batch(payload) {
            Ok(batch) => batch,
            Err(reason) => return Validated::Refused { reason },
        };
        if migration.is_none() {
            if let Err(refusal) = self.ownership.check_all(txid, ops.iter().map(KvOp::key)) {
                return Validated::NotOwned { code: refusal.code, reason: refusal.reason };
            }
        }
        let writes = match self.evaluate(&ops) {
            Ok(overlay) => overlay.writes(),
            Err(reason) => return Validated::Refused { reason },
        };
        // A migration batch records its ring state even where no key moves.
        if writes.is_empty() && migration.is_none() {
            return Validated::ReadOnly;
        }
        let writes = writes.into_iter().map(|(key, value)| KvWrite { key, value }).collect();
        let migration = migration.map(|step| v1::MigrationStep { entries: Vec::new(), ..step });
        Validated::Ready { redo: record::encode(&KvRedo { writes, migration }) }
    }

    /// The writes that apply `redo` (made by [`KvStore::validate`]).
    pub fn apply(&self, redo: &[u8]) -> Result<Vec<Write>, String> {
        let redo: KvRedo = record::decode(redo).map_err(|e| format!("corrupt redo: {e}"))?;
        let mut writes: Vec<Write> = redo
            .writes
            .into_iter()
            .map(|w| match w.value {
                Some(value) => Write::put(data_key(&w.key), value),
                None => Write::delete(data_key(&w.key)),
            })
            .collect();
        if let Some(step) = migration_routing(&redo.migration) {
            writes.push(self.ownership.record(&step));
        }
        Ok(writes)
    }

    /// A migration batch's routing and range start, from its redo.
    fn migration_of(redo: &[u8]) -> Option<(Routing, String)> {
        let redo: KvRedo = record::decode(redo).ok()?;
        migration_step(&redo)
    }
}

fn migration_step(redo: &KvRedo) -> Option<(Routing, String)> {
    let lo = redo.migration.as_ref()?.lo.clone();
    Some((migration_routing(&redo.migration)?, lo))
}

fn migration_routing(step: &Option<v1::MigrationStep>) -> Option<Routing> {
    step.as_ref()?.routing.as_ref().map(Routing::from_wire)
}

#[async_trait::async_trait]
impl<S: Storage> Resource for KvStore<S> {
    fn keys(&self, payload: &[u8]) -> Result<Vec<String>, String> {
        let (ops, migration) = batch(payload)?;
        if migration.is_some() {
            // Only a migration batch's own steps (Kv.Execute) may carry one: it would bypass ownership.
            return Err("a branch payload may not carry a migration step".into());
        }
        Ok(keys(&ops))
    }

    async fn prepare(&self, txid: TxId, payload: &[u8]) -> Validated {
        self.validate_for(Some(txid), payload)
    }

    async fn commit(&self, _txid: TxId, redo: &[u8]) -> Result<Vec<Write>, String> {
        self.apply(redo)
    }

    /// Validation and apply read the log and compute: nothing waits.
    fn answers_at_once(&self) -> bool {
        true
    }

    /// Called once the commit's writes are in the log, before its keys'
    /// locks go: the cache answers them from here on.
    fn committed(&self, txid: TxId, redo: &[u8]) {
        let redo: KvRedo = match record::decode(redo) {
            Ok(redo) => redo,
            Err(_) => {
                // Not one of ours (apply refused it, so nothing was written): cache nothing stale.
                self.cache.clear();
                return;
            }
        };
        if let Some((step, _)) = migration_step(&redo) {
            self.ownership.applied(txid, &step);
        }
        self.cache.wrote(redo.writes.into_iter().map(|w| (w.key, w.value)));
    }

    async fn abort(&self, txid: TxId) -> Result<(), String> {
        self.ownership.release(txid);
        Ok(())
    }

    fn in_doubt(&self, txid: TxId, redo: &[u8]) {
        if let Some((step, lo)) = Self::migration_of(redo) {
            self.ownership.recovered(txid, &lo, &step);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(ops: Vec<KvOp>) -> Vec<u8> {
        v1::KvBatch { ops: ops.into_iter().map(Into::into).collect(), migration: None }.encode_to_vec()
    }

    fn put(k: &str, v: &str) -> KvOp {
        KvOp::Put { key: k.into(), value: v.as_bytes().to_vec() }
    }

    fn add(k: &str, delta: i64) -> KvOp {
        KvOp::Add { key: k.into(), delta }
    }

    fn expect(k: &str, v: Option<&str>) -> KvOp {
        KvOp::Expect { key: k.into(), value: v.map(|v| v.as_bytes().to_vec()) }
    }

    async fn store_with(values: &[(&str, &str)]) -> (tempfile::TempDir, KvStore) {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path()).unwrap();
        let writes = values.iter().map(|(k, v)| Write::put(data_key(k), v.as_bytes())).collect();
        log.write(writes, false).await.unwrap();
        (dir, KvStore::new(log))
    }

    /// Validates and commits `ops` as the runtime does: the writes to the log, then `committed`.
    async fn commit(store: &KvStore, ops: Vec<KvOp>) -> Validated {
        let validated = store.validate(&payload(ops));
        if let Validated::Ready { redo } = &validated {
            store.log.write(store.apply(redo).unwrap(), false).await.unwrap();
            store.committed(TxId::new(7, 1, 1), redo);
        }
        validated
    }

    fn value(store: &KvStore, key: &str) -> Option<String> {
        store.get(key).unwrap().map(|v| String::from_utf8(v).unwrap())
    }

    #[tokio::test]
    async fn put_delete_add_apply_in_order() {
        let (_dir, store) = store_with(&[("a", "1"), ("gone", "x")]).await;
        let ops = vec![
            add("a", 5),
            add("b", -5),
            put("c", "hi"),
            KvOp::Delete { key: "gone".into() },
            add("c2", 1),
            add("c2", 1),
        ];
        assert!(matches!(commit(&store, ops).await, Validated::Ready { .. }));
        assert_eq!(value(&store, "a").as_deref(), Some("6"));
        assert_eq!(value(&store, "b").as_deref(), Some("-5"));
        assert_eq!(value(&store, "c").as_deref(), Some("hi"));
        assert_eq!(value(&store, "c2").as_deref(), Some("2"));
        assert_eq!(value(&store, "gone"), None);
    }

    #[tokio::test]
    async fn expect_guards_and_sees_earlier_ops_of_the_branch() {
        let (_dir, store) = store_with(&[("a", "1")]).await;
        assert!(matches!(
            commit(&store, vec![expect("a", Some("9")), put("b", "7")]).await,
            Validated::Refused { .. }
        ));
        assert_eq!(value(&store, "b"), None, "a refused branch changes nothing");
        assert!(matches!(
            commit(&store, vec![expect("z", None), put("z", "1"), expect("z", Some("1"))]).await,
            Validated::Ready { .. }
        ));
        assert_eq!(commit(&store, vec![expect("a", Some("1"))]).await, Validated::ReadOnly);
    }

    #[tokio::test]
    async fn add_refuses_non_numbers_and_overflow() {
        let (_dir, store) = store_with(&[("s", "abc"), ("max", &i64::MAX.to_string())]).await;
        let refusals = [
            (vec![add("s", 1)], "add on key \"s\": value \"abc\" is not a decimal integer"),
            (vec![add("max", 1)], "add on key \"max\": 9223372036854775807 + 1 overflows"),
            (vec![add("n", i64::MIN), add("n", -1)], "add on key \"n\": -9223372036854775808 + -1 overflows"),
        ];
        for (ops, expected) in refusals {
            match commit(&store, ops).await {
                Validated::Refused { reason } => assert_eq!(reason, expected),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(value(&store, "max"), Some(i64::MAX.to_string()));
    }

    #[tokio::test]
    async fn keys_are_deduplicated_and_bad_payloads_refused() {
        let (_dir, store) = store_with(&[]).await;
        assert_eq!(
            store.keys(&payload(vec![put("b", "1"), expect("a", None), add("b", 1)])).unwrap(),
            vec!["a", "b"]
        );
        assert!(store.keys(b"\xff\xff\xff").is_err());
        let smuggled = v1::KvBatch { ops: Vec::new(), migration: Some(v1::MigrationStep::default()) };
        assert!(store.keys(&smuggled.encode_to_vec()).is_err(), "a payload may not carry a migration step");
        assert!(matches!(store.validate(b"\xff\xff\xff"), Validated::Refused { .. }));
    }

    /// A batch moving a key from q to p, in both commit orders and through a
    /// crash of q with its branch prepared: at every step at most one of them
    /// serves the key, and the one that does holds its latest committed value.
    mod migration {
        use super::*;
        use decree_proto::ring::{Cursor, Move, Ring, Routing};
        use decree_proto::Reason;
        use decree_runtime::MemLog;

        fn txid(sequence: u64) -> TxId {
            TxId::new(7, 1, sequence)
        }

        fn settled(members: &[&str], epoch: u64) -> Routing {
            Routing {
                epoch,
                current: Ring::new(Vec::<String>::new()),
                migration: Some(Move { target: Ring::new(members.iter().copied()), cursor: Cursor::End }),
            }
        }

        /// q and p, each a member that has recorded the ring {q}; `k` holds "v1" at q.
        async fn members() -> (KvStore<MemLog>, KvStore<MemLog>, String) {
            let step = settled(&["q"], 1);
            let mut stores = Vec::new();
            for name in ["q", "p"] {
                let store = KvStore::member(MemLog::new(), name).unwrap();
                store.log.write(vec![store.ownership.record(&step)], true).await.unwrap();
                store.ownership.applied(txid(0), &step);
                stores.push(store);
            }
            let moving = Routing {
                epoch: 2,
                current: Ring::new(["q"]),
                migration: Some(Move { target: Ring::new(["q", "p"]), cursor: Cursor::End }),
            };
            let key = (0..1000).map(|i| format!("k{i}")).find(|k| moving.moving(k).is_some()).unwrap();
            stores[0].log.write(vec![Write::put(data_key(&key), b"v1".to_vec())], true).await.unwrap();
            let p = stores.pop().unwrap();
            (stores.pop().unwrap(), p, key)
        }

        fn step() -> Routing {
            Routing {
                epoch: 2,
                current: Ring::new(["q"]),
                migration: Some(Move { target: Ring::new(["q", "p"]), cursor: Cursor::End }),
            }
        }

        fn batch(ops: Vec<KvOp>) -> Vec<u8> {
            let migration = v1::MigrationStep { routing: Some(step().to_wire()), ..Default::default() };
            v1::KvBatch { ops: ops.into_iter().map(Into::into).collect(), migration: Some(migration) }
                .encode_to_vec()
        }

        fn redo(validated: Validated) -> Vec<u8> {
            match validated {
                Validated::Ready { redo } => redo,
                other => panic!("expected a ready branch, got {other:?}"),
            }
        }

        /// Who serves `key` now, and with what value.
        fn serving(stores: &[&KvStore<MemLog>], key: &str) -> Vec<(String, Option<Vec<u8>>)> {
            stores
                .iter()
                .filter(|s| s.ownership.check(None, key).is_ok())
                .map(|s| (s.ownership.name().to_owned(), s.get(key).unwrap()))
                .collect()
        }

        async fn commit(store: &KvStore<MemLog>, tx: TxId, redo: &[u8]) {
            store.log.write(store.apply(redo).unwrap(), true).await.unwrap();
            store.committed(tx, redo);
        }

        #[tokio::test]
        async fn in_either_commit_order_at_most_one_owner_serves_the_latest_value() {
            for p_first in [true, false] {
                let (q, p, key) = members().await;
                let tx = txid(1);
                assert_eq!(serving(&[&q, &p], &key), vec![("q".to_owned(), Some(b"v1".to_vec()))]);
                q.ownership.fence(tx, "", &step()).unwrap();
                let user = q.validate_for(Some(txid(2)), &payload(vec![put(&key, "v2")]));
                assert!(matches!(user, Validated::NotOwned { code: Reason::Migrating, .. }), "{user:?}");
                let out = redo(q.validate_for(Some(tx), &batch(vec![KvOp::Delete { key: key.clone() }])));
                let into = redo(p.validate_for(Some(tx), &batch(vec![put(&key, "v1")])));
                assert!(serving(&[&q, &p], &key).is_empty(), "fenced at q, not yet p's");
                let (first, second) =
                    if p_first { ((&p, &into), (&q, &out)) } else { ((&q, &out), (&p, &into)) };
                commit(first.0, tx, first.1).await;
                let between = serving(&[&q, &p], &key);
                assert!(
                    between.is_empty() || between == vec![("p".to_owned(), Some(b"v1".to_vec()))],
                    "{between:?}"
                );
                commit(second.0, tx, second.1).await;
                assert_eq!(serving(&[&q, &p], &key), vec![("p".to_owned(), Some(b"v1".to_vec()))]);
                let late = q.validate_for(Some(txid(3)), &payload(vec![put(&key, "v3")]));
                assert!(matches!(late, Validated::NotOwned { code: Reason::WrongOwner, .. }), "{late:?}");
                assert_eq!(q.get(&key).unwrap(), None, "nothing left behind at q");
            }
        }

        #[tokio::test]
        async fn an_old_owner_restarted_with_the_batch_prepared_holds_the_fence_until_the_decision() {
            let (q, p, key) = members().await;
            let tx = txid(1);
            q.ownership.fence(tx, "", &step()).unwrap();
            let out = redo(q.validate_for(Some(tx), &batch(vec![KvOp::Delete { key: key.clone() }])));
            let into = redo(p.validate_for(Some(tx), &batch(vec![put(&key, "v1")])));
            commit(&p, tx, &into).await;
            // q crashes with its branch prepared (kill -9), and starts again on its log.
            let q = KvStore::member(q.log.crash_process(), "q").unwrap();
            assert!(q.ownership.check(None, &key).is_ok(), "before recovery q would serve a stale copy...");
            q.in_doubt(tx, &out);
            assert_eq!(
                q.ownership.check(None, &key).unwrap_err().code,
                Reason::Migrating,
                "...so it fences first"
            );
            assert_eq!(serving(&[&q, &p], &key), vec![("p".to_owned(), Some(b"v1".to_vec()))]);
            commit(&q, tx, &out).await;
            assert_eq!(serving(&[&q, &p], &key), vec![("p".to_owned(), Some(b"v1".to_vec()))]);
            let q = KvStore::member(q.log.crash_process(), "q").unwrap();
            assert_eq!(
                q.ownership.check(None, &key).unwrap_err().code,
                Reason::WrongOwner,
                "the ring record survived"
            );
        }
    }
}

/// Hostile payloads: whatever bytes a stranger sends as a branch, decoding
/// and validating them answers (a refusal, or ops checked like any others),
/// never panics, and a huge length prefix allocates nothing.
#[cfg(test)]
mod hostile {
    use super::*;
    use decree_runtime::MemLog;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_are_answered_never_a_panic(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let store = KvStore::new(MemLog::new());
            let _ = batch(&payload);
            let _ = store.validate(&payload);
        }

        /// Well-formed messages with arbitrary field values: keys of any
        /// length and content, values, deltas, kinds beyond the enum.
        #[test]
        fn any_field_values_are_checked(
            fields in proptest::collection::vec(
                (any::<i32>(), ".{0,40}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)), any::<i64>()),
                0..16,
            )
        ) {
            let wire: Vec<v1::KvOp> = fields
                .into_iter()
                .map(|(kind, key, value, delta)| v1::KvOp { kind, key, value, delta })
                .collect();
            let payload = v1::KvBatch { ops: wire, migration: None }.encode_to_vec();
            let store = KvStore::new(MemLog::new());
            if let Ok(checked) = ops(&payload) {
                for op in &checked {
                    prop_assert!(KvOp::check_key(op.key()).is_ok(), "an accepted op has a valid key");
                }
            }
            let _ = store.validate(&payload);
        }
    }

    #[test]
    fn a_four_gib_length_prefix_is_refused_without_allocating_it() {
        // Field 1 (ops), length-delimited, length 0xFFFF_FFFF, then nothing.
        let payload = [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f];
        let refused = batch(&payload).expect_err("a length past the buffer");
        assert!(refused.contains("invalid KV payload"), "{refused}");
        assert!(matches!(KvStore::new(MemLog::new()).validate(&payload), Validated::Refused { .. }));
    }
}
