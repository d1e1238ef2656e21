//! Roles, the policy file that gives them to identities, and the layer that
//! checks every request against it.
//!
//! ```toml
//! # Each identity (the first DNS name of a certificate) and its roles.
//! [identities]
//! coordinator = ["coordinator"]
//! p1 = ["participant"]
//! app = ["client"]
//! alice = ["operator"]
//! dashboard = ["observer"]
//! # "*" gives roles to every peer the CA vouches for.
//! ```
//!
//! A request whose caller lacks every role its method accepts is answered
//! PERMISSION_DENIED, naming the roles it needs, before any handler runs:
//! it changes nothing. It is counted ([`DENIED`]) and logged with the
//! identity. Health checks and reflection are open to every peer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};

use crate::Peer;

/// Requests refused by the policy, by method.
pub const DENIED: &str = "decree_requests_denied_total";

/// What a peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Enrolls and heartbeats under its own name only; asks outcomes; enlists.
    Participant,
    /// Sends Prepare, Commit and Abort to participants; migrates keys; replicates.
    Coordinator,
    /// Runs transactions and reads.
    Client,
    /// Resolves, retries, changes the ring, moves participants, changes the group.
    Operator,
    /// Lists and reads status: participants, in-doubt branches, locks, heuristics, stuck branches.
    Observer,
}

impl Role {
    pub const ALL: [Role; 5] =
        [Role::Participant, Role::Coordinator, Role::Client, Role::Operator, Role::Observer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Participant => "participant",
            Role::Coordinator => "coordinator",
            Role::Client => "client",
            Role::Operator => "operator",
            Role::Observer => "observer",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Role, String> {
        Role::ALL.into_iter().find(|role| role.as_str() == text).ok_or_else(|| {
            format!("unknown role {text:?}: one of participant, coordinator, client, operator, observer")
        })
    }
}

use Role::{Client, Coordinator, Observer, Operator, Participant};

/// Every decree RPC and the roles that may call it. A method missing here is
/// refused to everyone (a test checks that every method of the .proto is here).
const METHODS: &[(&str, &[Role])] = &[
    ("/decree.v1.Coordinator/Transact", &[Client]),
    ("/decree.v1.Coordinator/TransactStream", &[Client]),
    ("/decree.v1.Coordinator/Begin", &[Client]),
    ("/decree.v1.Coordinator/Enlist", &[Participant]),
    ("/decree.v1.Coordinator/Commit", &[Client]),
    ("/decree.v1.Coordinator/Abort", &[Client]),
    ("/decree.v1.Coordinator/GetOutcome", &[Client, Participant, Operator, Observer]),
    ("/decree.v1.Coordinator/Retry", &[Operator]),
    ("/decree.v1.Coordinator/ListStuck", &[Operator, Observer]),
    ("/decree.v1.Coordinator/ListTransactions", &[Operator, Observer]),
    ("/decree.v1.Coordinator/GetStats", &[Operator, Observer]),
    ("/decree.v1.Registry/Enroll", &[Participant]),
    ("/decree.v1.Registry/Heartbeat", &[Participant]),
    ("/decree.v1.Registry/MoveParticipant", &[Operator]),
    ("/decree.v1.Registry/ListParticipants", &[Client, Operator, Observer]),
    ("/decree.v1.Registry/GetRing", &[Client, Participant, Coordinator, Operator, Observer]),
    ("/decree.v1.Registry/ChangeRing", &[Operator]),
    ("/decree.v1.Participant/Prepare", &[Coordinator]),
    ("/decree.v1.Participant/PrepareStream", &[Coordinator]),
    ("/decree.v1.Participant/Commit", &[Coordinator]),
    ("/decree.v1.Participant/CommitBatch", &[Coordinator]),
    ("/decree.v1.Participant/CommitStream", &[Coordinator]),
    ("/decree.v1.Participant/Abort", &[Coordinator]),
    ("/decree.v1.Participant/ListInDoubt", &[Operator, Observer]),
    ("/decree.v1.Participant/ListLocks", &[Operator, Observer]),
    ("/decree.v1.Participant/Resolve", &[Operator]),
    ("/decree.v1.Participant/ListHeuristics", &[Operator, Observer]),
    ("/decree.v1.Kv/Get", &[Client, Coordinator]),
    ("/decree.v1.Kv/Execute", &[Client, Coordinator]),
    ("/decree.v1.Kv/ScanMoving", &[Coordinator]),
    ("/decree.v1.Replica/AppendEntries", &[Coordinator]),
    ("/decree.v1.Replica/AppendEntriesStream", &[Coordinator]),
    ("/decree.v1.Replica/Vote", &[Coordinator]),
    ("/decree.v1.Replica/InstallSnapshot", &[Coordinator]),
    ("/decree.v1.Replica/Identify", &[Coordinator, Operator, Observer]),
    ("/decree.v1.Group/GetGroup", &[Operator, Observer]),
    ("/decree.v1.Group/AddReplica", &[Operator]),
    ("/decree.v1.Group/RemoveReplica", &[Operator]),
];

/// Open to every peer: health checks and reflection change nothing and say
/// nothing about transactions.
const OPEN: &[&str] = &["/grpc.health.v1.Health/", "/grpc.reflection.v1.", "/grpc.reflection.v1alpha."];

/// The roles that may call `path` (`None`: no one may, an unknown method).
pub fn needed(path: &str) -> Option<&'static [Role]> {
    if OPEN.iter().any(|open| path.starts_with(open)) {
        return Some(&Role::ALL);
    }
    METHODS.iter().find(|(method, _)| *method == path).map(|(_, roles)| *roles)
}

/// Who is calling, as the policy sees them: in the extensions of every
/// request the policy let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: Option<Arc<str>>,
    pub roles: BTreeSet<Role>,
}

impl Caller {
    /// A participant acts under its own name only: enrolling or heartbeating
    /// as `name` needs the identity `name`.
    pub fn may_be(&self, name: &str) -> Result<(), tonic::Status> {
        if self.identity.as_deref() == Some(name) {
            return Ok(());
        }
        let who = self.identity.as_deref().unwrap_or("a peer without identity");
        metrics::counter!(DENIED, "method" => "participant name").increment(1);
        tracing::warn!(identity = who, name, "refused: a participant acts under its own name only");
        Err(tonic::Status::permission_denied(format!(
            "{who} may not act as participant {name:?}: a participant enrolls under the name its certificate gives"
        )))
    }
}

/// Who an audited action (a move, a heuristic decision) is recorded as done
/// by: the caller's identity when a policy is in force (what the request
/// declares is kept beside it when it differs), else what it declares.
pub fn operator_of(caller: Option<&Caller>, declared: &str) -> String {
    match caller.and_then(|caller| caller.identity.as_deref()) {
        Some(identity) if declared.is_empty() || declared == identity => identity.to_owned(),
        Some(identity) => format!("{identity} (declared {declared:?})"),
        None => declared.to_owned(),
    }
}

/// The caller of `request` when a policy is in force (`None`: no policy,
/// every caller may do anything).
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&Caller> {
    request.extensions().get::<Caller>()
}

/// Identities and their roles, as the policy file gives them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    identities: BTreeMap<String, BTreeSet<Role>>,
    anyone: BTreeSet<Role>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    identities: BTreeMap<String, Vec<Role>>,
}

impl Policy {
    /// Reads a policy file (TOML: an `[identities]` table of role lists).
    pub fn parse(text: &str) -> Result<Policy, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut policy = Policy::default();
        for (identity, roles) in file.identities {
            let roles = roles.into_iter().collect();
            if identity == "*" {
                policy.anyone = roles;
            } else {
                policy.identities.insert(identity, roles);
            }
        }
        Ok(policy)
    }

    pub fn read(path: &Path) -> Result<Policy, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Policy::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The roles of `identity`.
    pub fn roles(&self, identity: Option<&str>) -> BTreeSet<Role> {
        let mut roles = self.anyone.clone();
        if let Some(own) = identity.and_then(|identity| self.identities.get(identity)) {
            roles.extend(own.iter().copied());
        }
        roles
    }

    /// Lets `identity` call `path`, or says why not (the roles it needs).
    pub fn check(&self, path: &str, identity: Option<&str>) -> Result<Caller, Denied> {
        let roles = self.roles(identity);
        let needed = needed(path).unwrap_or(&[]);
        if needed.iter().any(|role| roles.contains(role)) {
            return Ok(Caller { identity: identity.map(Arc::from), roles });
        }
        Err(Denied { identity: identity.map(str::to_owned), roles, method: path.to_owned(), needed })
    }

    fn describe(&self) -> String {
        format!("{} identities", self.identities.len())
    }
}

/// A call the policy refused: who, with which roles, what, and the roles
/// that would have let it through (none for a method decree does not have).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub identity: Option<String>,
    pub roles: BTreeSet<Role>,
    pub method: String,
    pub needed: &'static [Role],
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = self.identity.as_deref().unwrap_or("a peer without identity");
        let path = &self.method;
        let needed: Vec<&str> = self.needed.iter().map(|role| role.as_str()).collect();
        let needed = match needed.as_slice() {
            [] => return write!(f, "{path} is not a decree method: refused to {who}"),
            [one] => format!("the {one} role"),
            many => format!("one of the roles {}", many.join(", ")),
        };
        let has: Vec<&str> = self.roles.iter().map(|role| role.as_str()).collect();
        let has = if has.is_empty() { "no role".to_owned() } else { format!("roles: {}", has.join(", ")) };
        write!(f, "{who} ({has}) may not call {path}: it needs {needed}")
    }
}

struct Installed {
    path: PathBuf,
    current: RwLock<Arc<Policy>>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Puts the policy in `path` in force for every server of this process, and
/// reloads it on SIGHUP and when the file changes (a file that does not
/// parse leaves the one in force).
pub fn install(path: &Path) -> Result<(), String> {
    let policy = Arc::new(Policy::read(path)?);
    let installed =
        INSTALLED.get_or_init(|| Installed { path: path.to_owned(), current: RwLock::new(policy) });
    if installed.path != path {
        return Err("this process already has a policy".into());
    }
    crate::watch::spawn("policy", vec![path.to_owned()], move || {
        let policy = Policy::read(&installed.path)?;
        let described = policy.describe();
        *installed.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        Ok(described)
    });
    Ok(())
}

/// The policy in force (`None`: everyone may do anything).
pub fn installed() -> Option<Arc<Policy>> {
    INSTALLED.get().map(|installed| installed.current.read().unwrap_or_else(|e| e.into_inner()).clone())
}

/// The tower layer that checks each request against the installed policy
/// (nothing is checked without one).
#[derive(Debug, Clone, Copy, Default)]
pub struct Authorize;

impl<S> tower::Layer<S> for Authorize {
    type Service = Authorized<S>;

    fn layer(&self, inner: S) -> Authorized<S> {
        Authorized(inner)
    }
}

#[derive(Debug, Clone)]
pub struct Authorized<S>(S);

type Answer<R, E> = futures::future::Either<
    Pin<Box<dyn std::future::Future<Output = Result<R, E>> + Send>>,
    std::future::Ready<Result<R, E>>,
>;

impl<S, B, R> tower::Service<http::Request<B>> for Authorized<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Answer<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let Some(policy) = installed() else {
            return futures::future::Either::Left(Box::pin(self.0.call(request)));
        };
        let identity = request.extensions().get::<Peer>().and_then(|peer| peer.identity.clone());
        let path = request.uri().path().to_owned();
        match policy.check(&path, identity.as_deref()) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                futures::future::Either::Left(Box::pin(self.0.call(request)))
            }
            Err(why) => {
                metrics::counter!(DENIED, "method" => method_label(&path)).increment(1);
                tracing::warn!(identity = identity.as_deref().unwrap_or(""), method = %path, "refused: {why}");
                let status = tonic::Status::permission_denied(why.to_string());
                futures::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// A bounded label: a known method's path, or "unknown".
fn method_label(path: &str) -> &'static str {
    METHODS.iter().find(|(method, _)| *method == path).map(|(method, _)| *method).unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [identities]
        coordinator = ["coordinator"]
        p1 = ["participant"]
        app = ["client"]
        alice = ["operator", "observer"]
        "*" = ["observer"]
    "#;

    #[test]
    fn each_role_reaches_its_methods_and_no_others() {
        let policy = Policy::parse(POLICY).unwrap();
        let may = |who: &str, path: &str| policy.check(path, Some(who)).is_ok();
        assert!(may("app", "/decree.v1.Coordinator/Transact"));
        assert!(!may("app", "/decree.v1.Coordinator/Retry"));
        assert!(!may("app", "/decree.v1.Participant/Prepare"));
        assert!(may("coordinator", "/decree.v1.Participant/Prepare"));
        assert!(!may("coordinator", "/decree.v1.Coordinator/Transact"));
        assert!(may("p1", "/decree.v1.Registry/Enroll"));
        assert!(!may("p1", "/decree.v1.Participant/Resolve"));
        assert!(may("alice", "/decree.v1.Participant/Resolve"));
        assert!(may("alice", "/decree.v1.Registry/ChangeRing"));
        // "*" gives observer to anyone the CA vouches for, with or without a name.
        assert!(may("stranger", "/decree.v1.Participant/ListLocks"));
        assert!(policy.check("/decree.v1.Registry/ListParticipants", None).is_ok());
        assert!(!may("stranger", "/decree.v1.Participant/Resolve"));
        assert!(may("stranger", "/grpc.health.v1.Health/Check"));
        assert!(!may("alice", "/decree.v1.Nothing/Here"));
    }

    #[test]
    fn a_refusal_names_the_identity_and_the_role_needed() {
        let policy = Policy::parse(POLICY).unwrap();
        let why = policy.check("/decree.v1.Participant/Resolve", Some("app")).unwrap_err();
        assert_eq!(
            (why.identity.as_deref(), why.roles.iter().copied().collect::<Vec<_>>(), why.needed),
            (Some("app"), vec![Role::Client, Role::Observer], &[Role::Operator][..])
        );
        let why = why.to_string();
        assert!(
            why.contains("app") && why.contains("needs the operator role") && why.contains("client"),
            "{why}"
        );
        let why = Policy::default().check("/decree.v1.Coordinator/Transact", None).unwrap_err();
        assert_eq!((why.identity.as_deref(), why.roles.len()), (None, 0));
        let why = why.to_string();
        assert!(why.contains("a peer without identity (no role)"), "{why}");
    }

    #[test]
    fn a_bad_policy_file_is_refused_naming_what_is_wrong() {
        let err = Policy::parse("[identities]\napp = [\"admin\"]\n").unwrap_err();
        assert!(err.contains("admin") && err.contains("operator"), "{err}");
        let err = Policy::parse("[identity]\napp = [\"client\"]\n").unwrap_err();
        assert!(err.contains("identity"), "{err}");
    }

    #[test]
    fn an_audited_action_is_recorded_under_the_certificates_identity() {
        let policy = Policy::parse(POLICY).unwrap();
        let alice = policy.check("/decree.v1.Participant/Resolve", Some("alice")).unwrap();
        assert_eq!(operator_of(Some(&alice), ""), "alice");
        assert_eq!(operator_of(Some(&alice), "alice"), "alice");
        assert_eq!(operator_of(Some(&alice), "bob"), "alice (declared \"bob\")");
        assert_eq!(operator_of(None, "bob"), "bob");
    }

    #[test]
    fn a_participant_acts_under_its_own_name_only() {
        let policy = Policy::parse(POLICY).unwrap();
        let p1 = policy.check("/decree.v1.Registry/Enroll", Some("p1")).unwrap();
        assert!(p1.may_be("p1").is_ok());
        let status = p1.may_be("p2").unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("p1") && status.message().contains("p2"), "{}", status.message());
    }

    /// Every rpc of every service in proto/ has its roles: a method added to
    /// the protocol without them would be refused to everyone.
    #[test]
    fn every_method_of_the_protocol_has_its_roles() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/decree/v1");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let mut service = None;
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("service ") {
                    service = rest.split_whitespace().next().map(str::to_owned);
                } else if let Some(rest) = line.strip_prefix("rpc ") {
                    let method = rest.split('(').next().unwrap().trim();
                    let path = format!("/decree.v1.{}/{method}", service.as_deref().unwrap());
                    assert!(needed(&path).is_some(), "{path} has no roles in METHODS");
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, METHODS.len(), "METHODS names a method the protocol does not have");
    }
}
