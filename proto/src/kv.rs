//! The reference KV participant's operations, validated from the wire.

use crate::v1::kv_op::Kind;
use crate::{v1, InvalidInput};

/// Longest key, in bytes.
pub const KEY_MAX_BYTES: usize = 1024;

/// One validated KV operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    Add {
        key: String,
        delta: i64,
    },
    /// `value: None` expects the key to be absent.
    Expect {
        key: String,
        value: Option<Vec<u8>>,
    },
}

impl KvOp {
    pub fn key(&self) -> &str {
        match self {
            KvOp::Put { key, .. }
            | KvOp::Delete { key }
            | KvOp::Add { key, .. }
            | KvOp::Expect { key, .. } => key,
        }
    }

    /// True for operations that change state (everything but `Expect`).
    pub fn writes(&self) -> bool {
        !matches!(self, KvOp::Expect { .. })
    }

    /// Checks a key: 1 to [`KEY_MAX_BYTES`] bytes.
    pub fn check_key(key: &str) -> Result<(), InvalidInput> {
        let why = if key.is_empty() {
            "empty key"
        } else if key.len() > KEY_MAX_BYTES {
            "key longer than 1024 bytes"
        } else {
            return Ok(());
        };
        Err(InvalidInput::Key { key: key.chars().take(64).collect(), why })
    }
}

impl TryFrom<v1::KvOp> for KvOp {
    type Error = InvalidInput;

    fn try_from(op: v1::KvOp) -> Result<Self, Self::Error> {
        KvOp::check_key(&op.key)?;
        let bad = |why| InvalidInput::Op { key: op.key.clone(), why };
        let kind = Kind::try_from(op.kind).map_err(|_| bad("unknown operation kind"))?;
        Ok(match kind {
            Kind::Unspecified => return Err(bad("operation kind not set")),
            Kind::Put => {
                KvOp::Put { value: op.value.ok_or_else(|| bad("put without a value"))?, key: op.key }
            }
            Kind::Delete => KvOp::Delete { key: op.key },
            Kind::Add => KvOp::Add { key: op.key, delta: op.delta },
            Kind::Expect => KvOp::Expect { key: op.key, value: op.value },
        })
    }
}

impl From<KvOp> for v1::KvOp {
    fn from(op: KvOp) -> Self {
        let (kind, key, value, delta) = match op {
            KvOp::Put { key, value } => (Kind::Put, key, Some(value), 0),
            KvOp::Delete { key } => (Kind::Delete, key, None, 0),
            KvOp::Add { key, delta } => (Kind::Add, key, None, delta),
            KvOp::Expect { key, value } => (Kind::Expect, key, value, 0),
        };
        v1::KvOp { kind: kind as i32, key, value, delta }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_through_the_wire_form() {
        let ops = [
            KvOp::Put { key: "a".into(), value: b"1".to_vec() },
            KvOp::Delete { key: "b".into() },
            KvOp::Add { key: "c".into(), delta: -5 },
            KvOp::Expect { key: "d".into(), value: None },
            KvOp::Expect { key: "e".into(), value: Some(b"x".to_vec()) },
        ];
        for op in ops {
            assert_eq!(KvOp::try_from(v1::KvOp::from(op.clone())), Ok(op));
        }
    }

    #[test]
    fn bad_wire_ops_are_refused() {
        let base = v1::KvOp { kind: Kind::Put as i32, key: "k".into(), value: Some(vec![]), delta: 0 };
        assert!(KvOp::try_from(v1::KvOp { kind: 99, ..base.clone() }).is_err());
        assert!(KvOp::try_from(v1::KvOp { kind: 0, ..base.clone() }).is_err());
        assert!(KvOp::try_from(v1::KvOp { key: String::new(), ..base.clone() }).is_err());
        assert!(KvOp::try_from(v1::KvOp { key: "k".repeat(1025), ..base.clone() }).is_err());
        assert!(KvOp::try_from(v1::KvOp { value: None, ..base }).is_err());
    }
}
