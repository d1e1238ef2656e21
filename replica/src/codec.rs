//! How the replica's records and messages are encoded: MessagePack
//! (compact, binary: keys and values as bytes), through openraft's serde
//! derives. One encoding for the log, the state machine and the wire.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// `value`, encoded.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec(value).expect("openraft's types and ours serialize")
}

/// A value encoded by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}
