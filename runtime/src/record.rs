//! The envelope every durable record is stored in: a format byte, a CRC-32C of
//! the body, then the body (a prost message).
//!
//! A record that fails its checksum is an error, never "absent": reading a
//! corrupted prepared record as missing would let a participant forget a YES
//! vote and break atomicity.

const FORMAT_V1: u8 = 1;
const HEADER: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record is {len} bytes, shorter than its header")]
    Truncated { len: usize },
    #[error("record has unknown format {0}")]
    Format(u8),
    #[error("record checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("record body does not decode: {0}")]
    Decode(String),
}

/// A txid as a record body: the horizons both servers keep (below which what
/// they knew of old transactions is forgotten) are stored as this.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct TxIdRecord {
    #[prost(uint32, tag = "1")]
    pub coordinator: u32,
    #[prost(uint64, tag = "2")]
    pub incarnation: u64,
    #[prost(uint64, tag = "3")]
    pub sequence: u64,
}

impl From<decree_proto::TxId> for TxIdRecord {
    fn from(txid: decree_proto::TxId) -> Self {
        TxIdRecord { coordinator: txid.coordinator, incarnation: txid.incarnation, sequence: txid.sequence }
    }
}

impl From<TxIdRecord> for decree_proto::TxId {
    fn from(record: TxIdRecord) -> Self {
        decree_proto::TxId {
            coordinator: record.coordinator,
            incarnation: record.incarnation,
            sequence: record.sequence,
        }
    }
}

/// Encodes `message` in the envelope.
pub fn encode<M: prost::Message>(message: &M) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + message.encoded_len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&[0; 4]);
    message.encode(&mut out).expect("a Vec grows as needed");
    let crc = crc32fast::hash(&out[HEADER..]);
    out[1..HEADER].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a record written by [`encode`], checking its checksum.
pub fn decode<M: prost::Message + Default>(bytes: &[u8]) -> Result<M, RecordError> {
    if bytes.len() < HEADER {
        return Err(RecordError::Truncated { len: bytes.len() });
    }
    if bytes[0] != FORMAT_V1 {
        return Err(RecordError::Format(bytes[0]));
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let computed = crc32fast::hash(&bytes[HEADER..]);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    M::decode(&bytes[HEADER..]).map_err(|err| RecordError::Decode(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Sample {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(uint64, repeated, tag = "2")]
        numbers: Vec<u64>,
    }

    #[test]
    fn round_trip() {
        let sample = Sample { name: "p1".into(), numbers: vec![1, 2, 3] };
        assert_eq!(decode::<Sample>(&encode(&sample)), Ok(sample));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = encode(&Sample { name: "participant".into(), numbers: vec![7; 10] });
        for i in 0..bytes.len() * 8 {
            let mut corrupt = bytes.clone();
            corrupt[i / 8] ^= 1 << (i % 8);
            assert!(decode::<Sample>(&corrupt).is_err(), "bit {i} flipped unnoticed");
        }
    }

    #[test]
    fn truncation_is_an_error() {
        let bytes = encode(&Sample { name: "x".into(), numbers: vec![] });
        for len in 0..bytes.len() {
            assert!(decode::<Sample>(&bytes[..len]).is_err(), "truncated to {len} accepted");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn any_record_round_trips(name in ".{0,64}", value in any::<u64>()) {
                let sample = Sample { name, numbers: vec![value] };
                prop_assert_eq!(decode::<Sample>(&encode(&sample)).unwrap(), sample);
            }

            /// Any change to a stored record is an error, never another record or "absent".
            #[test]
            fn any_flipped_bit_or_truncation_is_an_error(
                name in ".{0,64}",
                value in any::<u64>(),
                flip in any::<prop::sample::Index>(),
                bit in 0..8u8,
                cut in any::<prop::sample::Index>(),
            ) {
                let bytes = encode(&Sample { name, numbers: vec![value] });
                let mut flipped = bytes.clone();
                let at = flip.index(flipped.len());
                flipped[at] ^= 1 << bit;
                prop_assert!(decode::<Sample>(&flipped).is_err(), "flipped bit {bit} of byte {at} decoded");
                let short = &bytes[..cut.index(bytes.len())];
                prop_assert!(decode::<Sample>(short).is_err(), "a record cut to {} bytes decoded", short.len());
            }
        }
    }
}
