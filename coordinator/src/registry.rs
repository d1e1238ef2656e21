//! The participants that enrolled: name, address, a reused gRPC channel, liveness.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use decree_proto::v1::participant_client::ParticipantClient;
use decree_proto::{InvalidInput, ParticipantName};
use tonic::transport::{Channel, Endpoint};

struct Member {
    address: String,
    client: ParticipantClient<Channel>,
    last_seen: Option<Instant>,
}

/// One HTTP/2 channel per participant, shared by every transaction.
pub struct Registry {
    members: Mutex<BTreeMap<ParticipantName, Member>>,
    liveness: Duration,
    max_message_bytes: usize,
}

/// A participant as listed to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: ParticipantName,
    pub address: String,
    pub up: bool,
}

impl Registry {
    pub fn new(liveness: Duration, max_message_bytes: usize) -> Self {
        Registry { members: Mutex::new(BTreeMap::new()), liveness, max_message_bytes }
    }

    fn members(&self) -> std::sync::MutexGuard<'_, BTreeMap<ParticipantName, Member>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.members.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds or updates a participant. `seen` is false for entries loaded from disk.
    /// Must run inside a tokio runtime (the channel connects lazily in the background).
    pub fn enroll(&self, name: ParticipantName, address: &str, seen: bool) -> Result<(), InvalidInput> {
        let bad = |why: &str| InvalidInput::Field { field: "address", why: format!("{address:?}: {why}") };
        if !(address.starts_with("http://") || address.starts_with("https://")) || address.len() > 256 {
            return Err(bad("expected a URL like http://127.0.0.1:7001"));
        }
        let endpoint = Endpoint::from_shared(address.to_owned()).map_err(|e| bad(&e.to_string()))?;
        let mut members = self.members();
        let last_seen = seen.then(Instant::now);
        match members.get_mut(&name) {
            Some(member) if member.address == address => member.last_seen = last_seen.or(member.last_seen),
            _ => {
                let channel = endpoint
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .connect_lazy();
                let client = ParticipantClient::new(channel)
                    .max_decoding_message_size(self.max_message_bytes * 2)
                    .max_encoding_message_size(self.max_message_bytes * 2);
                members.insert(name, Member { address: address.to_owned(), client, last_seen });
            }
        }
        Ok(())
    }

    /// Records a heartbeat; false if the participant is unknown.
    pub fn heartbeat(&self, name: &ParticipantName) -> bool {
        match self.members().get_mut(name) {
            Some(member) => {
                member.last_seen = Some(Instant::now());
                true
            }
            None => false,
        }
    }

    pub fn client(&self, name: &ParticipantName) -> Option<ParticipantClient<Channel>> {
        self.members().get(name).map(|m| m.client.clone())
    }

    pub fn contains(&self, name: &ParticipantName) -> bool {
        self.members().contains_key(name)
    }

    pub fn list(&self) -> Vec<Listed> {
        let now = Instant::now();
        self.members()
            .iter()
            .map(|(name, m)| Listed {
                name: name.clone(),
                address: m.address.clone(),
                up: m.last_seen.is_some_and(|seen| now.duration_since(seen) <= self.liveness),
            })
            .collect()
    }
}
