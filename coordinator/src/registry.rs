//! The participants that enrolled: name, address, role, a reused gRPC channel, liveness.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use decree_proto::v1::participant_client::ParticipantClient;
use decree_proto::{InvalidInput, ParticipantName};
use tonic::transport::{Channel, Endpoint};

/// What a participant enrolled as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Of the keyspace: may be in the ring.
    Member,
    /// Branches by name only; never in the ring.
    Service,
}

impl Role {
    /// From `decree.v1.Role` (unset, from before roles: a member).
    pub fn from_wire(role: i32) -> Role {
        match decree_proto::v1::Role::try_from(role) {
            Ok(decree_proto::v1::Role::Service) => Role::Service,
            _ => Role::Member,
        }
    }

    pub fn to_wire(self) -> i32 {
        match self {
            Role::Member => decree_proto::v1::Role::Member as i32,
            Role::Service => decree_proto::v1::Role::Service as i32,
        }
    }
}

struct Member {
    address: String,
    role: Role,
    channel: Channel,
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
    pub role: Role,
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
    pub fn enroll(
        &self,
        name: ParticipantName,
        address: &str,
        role: Role,
        seen: bool,
    ) -> Result<(), InvalidInput> {
        let bad = |why: &str| InvalidInput::Field { field: "address", why: format!("{address:?}: {why}") };
        if !(address.starts_with("http://") || address.starts_with("https://")) || address.len() > 256 {
            return Err(bad("expected a URL like http://127.0.0.1:7001"));
        }
        let endpoint = Endpoint::from_shared(address.to_owned()).map_err(|e| bad(&e.to_string()))?;
        let mut members = self.members();
        let last_seen = seen.then(Instant::now);
        match members.get_mut(&name) {
            Some(member) if member.address == address => {
                member.last_seen = last_seen.or(member.last_seen);
                member.role = role;
            }
            _ => {
                let channel = endpoint
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .connect_lazy();
                let client = ParticipantClient::new(channel.clone())
                    .max_decoding_message_size(self.max_message_bytes * 2)
                    .max_encoding_message_size(self.max_message_bytes * 2);
                members
                    .insert(name, Member { address: address.to_owned(), role, channel, client, last_seen });
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

    /// The channel to a participant (for its other services, e.g. Kv).
    pub fn channel(&self, name: &ParticipantName) -> Option<Channel> {
        self.members().get(name).map(|m| m.channel.clone())
    }

    /// The role and liveness of a participant, if it enrolled.
    pub fn status(&self, name: &ParticipantName) -> Option<(Role, bool)> {
        let now = Instant::now();
        self.members()
            .get(name)
            .map(|m| (m.role, m.last_seen.is_some_and(|seen| now.duration_since(seen) <= self.liveness)))
    }

    pub fn list(&self) -> Vec<Listed> {
        let now = Instant::now();
        self.members()
            .iter()
            .map(|(name, m)| Listed {
                name: name.clone(),
                address: m.address.clone(),
                role: m.role,
                up: m.last_seen.is_some_and(|seen| now.duration_since(seen) <= self.liveness),
            })
            .collect()
    }
}
