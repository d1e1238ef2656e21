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
    /// Until when the name is held by `address` against enrollment from
    /// another: one liveness window after its holder was last heard from, its
    /// record loaded, or an operator moved it.
    held_until: Instant,
}

/// Why an enrollment was refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error(
        "{name} is held by a live participant at {holder} (heard from {heard}); a second process cannot take \
         its name: stop the one at {holder}, or move the name (decree participants move {name} --address {address})"
    )]
    Taken { name: ParticipantName, holder: String, address: String, heard: String, held_for: Duration },
    #[error("{0} never enrolled")]
    Unknown(ParticipantName),
}

/// Refused if a live participant at another address holds `name`.
fn taken(
    members: &BTreeMap<ParticipantName, Member>,
    name: &ParticipantName,
    address: &str,
    now: Instant,
) -> Result<(), EnrollError> {
    match members.get(name) {
        Some(member) if member.address != address && member.held_until > now => {
            let heard = match member.last_seen {
                Some(seen) => format!("{} ms ago", now.duration_since(seen).as_millis()),
                None => "not yet since the coordinator started".to_owned(),
            };
            Err(EnrollError::Taken {
                holder: member.address.clone(),
                address: address.to_owned(),
                heard,
                held_for: member.held_until - now,
                name: name.clone(),
            })
        }
        _ => Ok(()),
    }
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
    /// Since it was last heard from (None: not since this coordinator started).
    pub heard_ago: Option<std::time::Duration>,
}

/// Enrollments refused because a live participant holds the name.
pub const ENROLLMENTS_REFUSED: &str = "decree_enrollments_refused_total";

impl From<EnrollError> for tonic::Status {
    fn from(err: EnrollError) -> Self {
        let message = err.to_string();
        match err {
            EnrollError::Invalid(_) => tonic::Status::invalid_argument(message),
            EnrollError::Unknown(_) => tonic::Status::not_found(message),
            EnrollError::Taken { held_for, .. } => {
                let mut status = tonic::Status::already_exists(message);
                if let Ok(value) = held_for.as_millis().to_string().parse() {
                    status.metadata_mut().insert(decree_proto::HELD_METADATA, value);
                }
                status
            }
        }
    }
}

/// A participant's address, checked.
pub(crate) fn endpoint(address: &str) -> Result<Endpoint, InvalidInput> {
    let bad = |why: &str| InvalidInput::Field { field: "address", why: format!("{address:?}: {why}") };
    if !(address.starts_with("http://") || address.starts_with("https://")) || address.len() > 256 {
        return Err(bad("expected a URL like http://127.0.0.1:7001"));
    }
    Endpoint::from_shared(address.to_owned()).map_err(|e| bad(&e.to_string()))
}

impl Registry {
    pub fn new(liveness: Duration, max_message_bytes: usize) -> Self {
        Registry { members: Mutex::new(BTreeMap::new()), liveness, max_message_bytes }
    }

    fn members(&self) -> std::sync::MutexGuard<'_, BTreeMap<ParticipantName, Member>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.members.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds or updates a participant. `seen` is false for entries loaded from
    /// disk, which hold their name for one liveness window from now (so a
    /// stranger cannot take it in the moments after a restart, before its
    /// holder is heard from again). A live holder's name is not taken from
    /// another address: [`EnrollError::Taken`], and nothing changes.
    /// Must run inside a tokio runtime (the channel connects lazily in the background).
    pub fn enroll(
        &self,
        name: ParticipantName,
        address: &str,
        role: Role,
        seen: bool,
    ) -> Result<(), EnrollError> {
        let endpoint = endpoint(address)?;
        let mut members = self.members();
        let now = Instant::now();
        let last_seen = seen.then_some(now);
        taken(&members, &name, address, now)?;
        match members.get_mut(&name) {
            Some(member) if member.address == address => {
                member.last_seen = last_seen.or(member.last_seen);
                member.held_until = member.held_until.max(now + self.liveness);
                member.role = role;
            }
            _ => {
                let member = self.member(endpoint, address, role, last_seen, now + self.liveness);
                members.insert(name, member);
            }
        }
        Ok(())
    }

    /// Whether [`Registry::enroll`] would take `name` at `address` now,
    /// changing nothing: checked before an enrollment is recorded, so that a
    /// participant is reachable only once its record is durable (a group's
    /// next leader asks every participant recorded about a txid it holds
    /// nothing of, and must not miss the one that ran it).
    pub fn may_enroll(&self, name: &ParticipantName, address: &str) -> Result<(), EnrollError> {
        endpoint(address)?;
        taken(&self.members(), name, address, Instant::now())
    }

    /// An operator's move of `name` to `address`, whether or not its holder
    /// is live: the new address holds it from now. Answers the old address.
    pub fn relocate(&self, name: &ParticipantName, address: &str) -> Result<String, EnrollError> {
        let endpoint = endpoint(address)?;
        let mut members = self.members();
        let Some(old) = members.get(name) else { return Err(EnrollError::Unknown(name.clone())) };
        let (previous, role) = (old.address.clone(), old.role);
        let now = Instant::now();
        members.insert(name.clone(), self.member(endpoint, address, role, None, now + self.liveness));
        Ok(previous)
    }

    fn member(
        &self,
        endpoint: Endpoint,
        address: &str,
        role: Role,
        last_seen: Option<Instant>,
        held_until: Instant,
    ) -> Member {
        let channel = decree_tls::channel(
            endpoint
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10)),
        );
        let client = ParticipantClient::new(channel.clone())
            .max_decoding_message_size(self.max_message_bytes * 2)
            .max_encoding_message_size(self.max_message_bytes * 2);
        Member { address: address.to_owned(), role, channel, client, last_seen, held_until }
    }

    /// Records a heartbeat; false if the participant is unknown, or `address`
    /// (when given) no longer holds its name, which then refreshes nothing.
    pub fn heartbeat(&self, name: &ParticipantName, address: &str) -> bool {
        match self.members().get_mut(name) {
            Some(member) if address.is_empty() || member.address == address => {
                let now = Instant::now();
                member.last_seen = Some(now);
                member.held_until = member.held_until.max(now + self.liveness);
                true
            }
            _ => false,
        }
    }

    pub fn client(&self, name: &ParticipantName) -> Option<ParticipantClient<Channel>> {
        self.members().get(name).map(|m| m.client.clone())
    }

    pub fn contains(&self, name: &ParticipantName) -> bool {
        self.members().contains_key(name)
    }

    /// The enrolled participant called `text`, as the registry holds its name
    /// (shared, so a request's branches make no name of their own).
    pub fn named(&self, text: &str) -> Option<ParticipantName> {
        self.members().get_key_value(text).map(|(name, _)| name.clone())
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
                heard_ago: m.last_seen.map(|seen| now.duration_since(seen)),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> ParticipantName {
        n.parse().unwrap()
    }

    const A: &str = "http://127.0.0.1:7001";
    const B: &str = "http://127.0.0.1:7002";

    fn address_of(registry: &Registry, n: &str) -> String {
        registry.list().into_iter().find(|p| p.name.as_str() == n).unwrap().address
    }

    #[tokio::test]
    async fn a_live_holders_name_is_not_taken_from_another_address() {
        let registry = Registry::new(Duration::from_secs(60), 1 << 20);
        registry.enroll(name("p1"), A, Role::Member, true).unwrap();
        // Again from its own address: fine.
        registry.enroll(name("p1"), A, Role::Member, true).unwrap();
        match registry.enroll(name("p1"), B, Role::Service, true) {
            Err(EnrollError::Taken { holder, held_for, .. }) => {
                assert_eq!(holder, A);
                assert!(held_for > Duration::from_secs(50), "{held_for:?}");
            }
            other => panic!("expected Taken, got {other:?}"),
        }
        assert_eq!(address_of(&registry, "p1"), A, "nothing changed");
        assert_eq!(registry.status(&name("p1")), Some((Role::Member, true)));
        // Its heartbeats count; the newcomer's do not.
        assert!(registry.heartbeat(&name("p1"), A));
        assert!(!registry.heartbeat(&name("p1"), B));
        assert!(registry.heartbeat(&name("p1"), ""), "a heartbeat without an address is not checked");
    }

    #[tokio::test]
    async fn a_loaded_record_holds_its_name_for_a_window_and_a_silent_holder_lets_it_go() {
        let liveness = Duration::from_millis(40);
        let registry = Registry::new(liveness, 1 << 20);
        registry.enroll(name("p1"), A, Role::Member, false).unwrap();
        assert_eq!(registry.status(&name("p1")), Some((Role::Member, false)), "loaded: not heard from");
        assert!(matches!(registry.enroll(name("p1"), B, Role::Member, true), Err(EnrollError::Taken { .. })));
        std::thread::sleep(liveness * 2);
        registry.enroll(name("p1"), B, Role::Member, true).unwrap();
        assert_eq!(address_of(&registry, "p1"), B);
        // The old holder, back, is now the newcomer.
        assert!(!registry.heartbeat(&name("p1"), A));
        assert!(matches!(registry.enroll(name("p1"), A, Role::Member, true), Err(EnrollError::Taken { .. })));
    }

    #[tokio::test]
    async fn an_operator_moves_a_live_holders_name() {
        let registry = Registry::new(Duration::from_secs(60), 1 << 20);
        registry.enroll(name("p1"), A, Role::Service, true).unwrap();
        assert_eq!(registry.relocate(&name("p1"), B).unwrap(), A);
        assert_eq!(address_of(&registry, "p1"), B);
        assert_eq!(
            registry.status(&name("p1")),
            Some((Role::Service, false)),
            "role kept; not heard from yet"
        );
        assert!(!registry.heartbeat(&name("p1"), A), "the old process's heartbeats stop counting");
        assert!(matches!(
            registry.enroll(name("p1"), A, Role::Service, true),
            Err(EnrollError::Taken { .. })
        ));
        registry.enroll(name("p1"), B, Role::Service, true).unwrap();
        assert!(matches!(registry.relocate(&name("p9"), B), Err(EnrollError::Unknown(_))));
        assert!(matches!(registry.relocate(&name("p1"), "ftp://x"), Err(EnrollError::Invalid(_))));
        assert_eq!(address_of(&registry, "p1"), B, "a refused move changes nothing");
    }
}
