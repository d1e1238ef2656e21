//! Local clusters of real decree processes: what `decree demo` and `decree
//! bench` run, and what crash tests (ours in `tests/`, and yours) are built on.
//!
//! [`Cluster::start`] runs a coordinator and N KV participants as child
//! processes of the `decree` binary, on 127.0.0.1 ports of their own, each in
//! its own data directory under one temporary directory. A test can kill any
//! process with SIGKILL ([`Cluster::kill`]), arm crash points for its next
//! start ([`Cluster::restart_with`]), wait for a process to die at a crash
//! point ([`Cluster::wait_exit`]), restart it on the same directory, and wait,
//! by polling with a deadline, until nothing is in doubt
//! ([`Cluster::wait_settled`]). [`postgres::PgServer`] is a throwaway
//! PostgreSQL server, for the bench's baseline and for tests.
//!
//! This crate ships inside the `decree` binary: it holds no test assertions
//! (the invariant checks live in the `decree-tests` crate).

pub mod faults;
pub mod ports;
pub mod postgres;

pub use faults::{Fault, FaultProxy};
pub use ports::{free_port, free_ports, PortLease};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use decree_client::{Client, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("client: {0}")]
    Client(#[from] ClientError),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, HarnessError>;

/// Which process of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeId {
    /// The coordinator; in a group, its first replica.
    Coordinator,
    /// A replica of a coordinator group by index: `Replica(0)` is
    /// [`NodeId::Coordinator`], replica id 1.
    Replica(usize),
    /// Participant by index: `Participant(0)` is named "p1".
    Participant(usize),
}

struct Node {
    name: String,
    port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    crash_at: Option<String>,
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    pub participants: usize,
    /// Replicas of the coordinator: 1 is a single coordinator; more is a
    /// group, bootstrapped by the first at its first start.
    pub coordinators: usize,
    /// Crash points armed at a node's first start, by name ("c1": a group's
    /// first replica, which bootstraps it and so leads first).
    pub crash_at_for: Vec<(String, String)>,
    /// Start returns only once every participant is enrolled (and the ring
    /// formed); false: as soon as every process is started.
    pub wait: bool,
    /// The `decree` binary; `None` means [`decree_binary`].
    pub binary: Option<PathBuf>,
    /// Keep the directory after the cluster is dropped.
    pub keep_dir: bool,
    /// Extra flags for the coordinator (e.g. a short prepare timeout).
    pub coordinator_args: Vec<String>,
    /// Extra flags for every participant.
    pub participant_args: Vec<String>,
    /// Extra flags for one participant, by name ("p2": the second), or for
    /// one replica of a coordinator group ("c2").
    pub participant_args_for: Vec<(String, Vec<String>)>,
    /// Another program for one participant, by name, in place of `decree
    /// participant`: a service built on the participant library that takes
    /// its flags (e.g. the inventory example).
    pub participant_program_for: Vec<(String, PathBuf)>,
    /// KV participants start with `--join`, and start waits until they are
    /// all in the ring (the ring forms one member at a time).
    pub join: bool,
    /// Only the first this many KV participants join (the others enroll as
    /// members outside the ring, for `decree ring add`).
    pub join_first: Option<usize>,
    /// Every `decree participant` is a named service (`--role service`): a KV
    /// store that takes any key addressed to it by name, in no ring. For
    /// tests that send the same keys to several participants by name.
    pub services: bool,
    /// Every link between the coordinator and a participant, both ways, goes
    /// through a [`FaultProxy`] of its own ([`Cluster::link`]), and so may
    /// clients ([`Cluster::proxied_url`]). A single coordinator only.
    pub faults: bool,
    /// Environment variables for one node, by name ("coordinator", "p2",
    /// "c1"), e.g. an `LD_PRELOAD` that injects faults.
    pub env_for: Vec<(String, String, String)>,
    /// Mutual TLS everywhere, with the certificates and policy in this
    /// directory (made by [`dev_pki`] if absent): each node speaks as its
    /// own identity (a group's replicas as `coordinator`), and this process
    /// as `harness` (client, operator and observer), installed for every
    /// channel it opens. One directory per test process.
    pub tls: Option<PathBuf>,
}

impl Options {
    pub fn new(participants: usize) -> Self {
        Options {
            participants,
            coordinators: 1,
            crash_at_for: Vec::new(),
            wait: true,
            binary: None,
            // DECREE_KEEP_DIRS=1 keeps every cluster's data and logs, to look into a failure.
            keep_dir: std::env::var_os("DECREE_KEEP_DIRS").is_some(),
            coordinator_args: Vec::new(),
            participant_args: Vec::new(),
            participant_args_for: Vec::new(),
            participant_program_for: Vec::new(),
            join: true,
            join_first: None,
            services: false,
            faults: false,
            env_for: Vec::new(),
            tls: None,
        }
    }
}

/// The identities [`dev_pki`] makes: a coordinator (a group's replicas share
/// it), participants p1 to p8, `client`, `operator` and `observer` (one role
/// each, for tests that act as them), and `harness`, the test process itself.
pub const PKI_PARTICIPANTS: usize = 8;

/// Makes (once per directory) a development CA, a certificate for each
/// identity a cluster may need, and the policy giving each its role (see
/// [`Options::tls`]).
pub fn dev_pki(dir: &Path) -> Result<()> {
    use decree_tls::certs;
    if certs::cert_path(dir, "harness").exists() {
        return Ok(());
    }
    let mut identities = vec![certs::Identity::parse("coordinator")];
    identities.extend((1..=PKI_PARTICIPANTS).map(|i| certs::Identity::parse(&format!("p{i}"))));
    identities.extend(["client", "operator", "observer"].map(certs::Identity::parse));
    identities.push(certs::Identity::parse("harness=client+operator+observer"));
    let identities =
        identities.into_iter().collect::<std::result::Result<Vec<_>, _>>().map_err(HarnessError::Other)?;
    certs::make(dir, &identities).map_err(HarnessError::Other)?;
    Ok(())
}

/// The PKI of this test process: one directory for every TLS cluster it
/// starts (the process has one identity), removed at exit only by the OS's
/// temporary-file cleaning; made at the first call.
pub fn shared_pki() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("decree-pki-{}", std::process::id()));
        dev_pki(&dir).expect("a development PKI");
        dir
    })
    .clone()
}

/// The `decree` binary: `$DECREE_BIN`, else `decree` next to the running
/// test's target directory (`target/<profile>/decree`).
pub fn decree_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("DECREE_BIN") {
        return PathBuf::from(bin);
    }
    built_program("decree")
}

/// A running cluster. Dropping it kills every process.
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    options: Options,
    /// The coordinator, or every replica of its group.
    coordinators: Vec<Node>,
    participants: Vec<Node>,
    /// A group's first replica bootstraps it at its first start only.
    bootstrapped: bool,
    /// With [`Options::faults`]: per participant, the links to it and from it;
    /// and the clients' link to the coordinator.
    links: Vec<(FaultProxy, FaultProxy)>,
    client_link: Option<FaultProxy>,
    /// The nodes' ports, held while the cluster lives: a node down for a
    /// restart finds its port where it left it.
    _leases: Vec<PortLease>,
}

/// A link of a cluster started with [`Options::faults`]; requests flow the way
/// it names, answers back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The coordinator to participant `i` (Prepares, Commits, Aborts), and
    /// clients reading from it by the address it enrolled with.
    ToParticipant(usize),
    /// Participant `i` to the coordinator (enrollment, heartbeats, outcome
    /// queries of branches in doubt).
    FromParticipant(usize),
    /// Clients connected by [`Cluster::proxied_url`] to the coordinator.
    Client,
}

impl Cluster {
    /// Starts a coordinator and `options.participants` participants, and waits
    /// until every participant is enrolled.
    pub async fn start(options: Options) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("decree-").tempdir()?;
        let path = dir.path().to_path_buf();
        Self::start_in(Some(dir), path, options).await
    }

    /// Like [`Cluster::start`], in a directory the caller owns.
    pub async fn start_in_dir(path: PathBuf, options: Options) -> Result<Cluster> {
        std::fs::create_dir_all(&path)?;
        Self::start_in(None, path, options).await
    }

    async fn start_in(dir: Option<tempfile::TempDir>, path: PathBuf, options: Options) -> Result<Cluster> {
        let replicas = options.coordinators.max(1);
        if let Some(pki) = &options.tls {
            if options.participants > PKI_PARTICIPANTS {
                return Err(HarnessError::Other(format!(
                    "Options::tls: at most {PKI_PARTICIPANTS} participants"
                )));
            }
            dev_pki(pki)?;
            let files = decree_tls::certs::files(pki, "harness");
            decree_tls::install(
                decree_tls::Tls::load(files).map_err(|e| HarnessError::Other(e.to_string()))?,
            )
            .map_err(HarnessError::Other)?;
        }
        // The proxies' ports first, held: the nodes' free ports cannot be among them.
        let mut proxy_ports = Vec::new();
        if options.faults {
            for _ in 0..options.participants * 2 + 1 {
                proxy_ports.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
            }
        }
        let leases = free_ports(options.participants + replicas)?;
        let mut ports = leases.iter().map(PortLease::port);
        let mut node = |name: &str| -> Result<Node> {
            Ok(Node {
                name: name.to_owned(),
                port: ports.next().expect("one port per node"),
                data_dir: path.join(name),
                log: path.join(format!("{name}.log")),
                child: None,
                crash_at: None,
            })
        };
        let coordinators = match replicas {
            1 => vec![node("coordinator")?],
            n => (1..=n).map(|i| node(&format!("c{i}"))).collect::<Result<Vec<_>>>()?,
        };
        let participants =
            (1..=options.participants).map(|i| node(&format!("p{i}"))).collect::<Result<Vec<_>>>()?;
        if options.faults && replicas > 1 {
            return Err(HarnessError::Other("Options::faults: a single coordinator only".into()));
        }
        let (mut links, mut client_link) = (Vec::new(), None);
        if options.faults {
            let coordinator = std::net::SocketAddr::from(([127, 0, 0, 1], coordinators[0].port));
            let mut proxy_ports = proxy_ports.into_iter();
            let mut next = || proxy_ports.next().expect("one port per proxy");
            for p in &participants {
                let to = FaultProxy::on(next(), std::net::SocketAddr::from(([127, 0, 0, 1], p.port)))?;
                links.push((to, FaultProxy::on(next(), coordinator)?));
            }
            client_link = Some(FaultProxy::on(next(), coordinator)?);
        }
        let mut cluster = Cluster {
            dir,
            path,
            options,
            coordinators,
            participants,
            bootstrapped: false,
            links,
            client_link,
            _leases: leases,
        };
        for (name, points) in cluster.options.crash_at_for.clone() {
            let node = cluster
                .coordinators
                .iter_mut()
                .chain(cluster.participants.iter_mut())
                .find(|n| n.name == name);
            node.unwrap_or_else(|| panic!("no node named {name}")).crash_at = Some(points);
        }
        for i in 0..replicas {
            cluster.spawn(NodeId::Replica(i))?;
        }
        for i in 0..cluster.participants.len() {
            cluster.spawn(NodeId::Participant(i))?;
        }
        if !cluster.options.wait {
            return Ok(cluster);
        }
        if let Err(err) = cluster.wait_enrolled(Duration::from_secs(30)).await {
            return Err(HarnessError::Other(format!("{err}\n{}", cluster.report())));
        }
        let members = cluster.joining();
        if let Err(err) = cluster.wait_ring(&members, Duration::from_secs(60)).await {
            return Err(HarnessError::Other(format!("{err}\n{}", cluster.report())));
        }
        Ok(cluster)
    }

    /// The participants started with `--join`: KV stores that are not services.
    fn joining(&self) -> Vec<String> {
        (0..self.participants.len())
            .filter(|i| self.joins(*i))
            .map(|i| self.participants[i].name.clone())
            .collect()
    }

    fn custom(&self, name: &str) -> bool {
        self.options.participant_program_for.iter().any(|(n, _)| n == name)
    }

    fn joins(&self, i: usize) -> bool {
        let name = &self.participants[i].name;
        let args = self.participant_args(name);
        let service = args
            .windows(2)
            .any(|w| (w[0] == "--backend" && w[1] == "postgres") || (w[0] == "--role" && w[1] == "service"));
        self.options.join && !self.custom(name) && !service && self.options.join_first.is_none_or(|n| i < n)
    }

    fn participant_args(&self, name: &str) -> Vec<String> {
        let own = self.options.participant_args_for.iter().filter(|(n, _)| n == name);
        let mut args = self.options.participant_args.clone();
        if self.options.services && !self.custom(name) {
            args.extend(["--role".to_owned(), "service".to_owned()]);
        }
        args.extend(own.flat_map(|(_, a)| a.iter().cloned()));
        args
    }

    /// Waits until the ring's members are exactly `members` and no key is moving.
    pub async fn wait_ring(&self, members: &[String], timeout: Duration) -> Result<()> {
        let mut want = members.to_vec();
        want.sort();
        poll(timeout, &format!("the ring to be {want:?} with nothing moving"), || async {
            let client = Client::connect(&self.coordinator_url()).await.ok()?;
            let ring = client.ring_status().await.ok()?;
            let routing = decree_client::Routing::from_wire(ring.routing.as_ref()?);
            (routing.migration.is_none() && ring.queued.is_empty() && routing.current.names() == want)
                .then_some(())
        })
        .await
    }

    /// The directory holding every data directory and log.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The coordinator's URL; a group's replicas' URLs, separated by commas.
    pub fn coordinator_url(&self) -> String {
        let urls: Vec<String> = self.coordinators.iter().map(|c| self.url_at(c.port)).collect();
        urls.join(",")
    }

    /// The URL of a node's port: https with [`Options::tls`].
    fn url_at(&self, port: u16) -> String {
        let scheme = if self.options.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{port}")
    }

    /// The proxy of `link` (the cluster started with [`Options::faults`]).
    pub fn link(&self, link: Link) -> &FaultProxy {
        assert!(self.options.faults, "links have proxies only with Options::faults");
        match link {
            Link::ToParticipant(i) => &self.links[i].0,
            Link::FromParticipant(i) => &self.links[i].1,
            Link::Client => self.client_link.as_ref().expect("faults: a client link"),
        }
    }

    /// Every link of the cluster (none without [`Options::faults`]).
    pub fn links(&self) -> Vec<Link> {
        let each = (0..self.links.len()).flat_map(|i| [Link::ToParticipant(i), Link::FromParticipant(i)]);
        each.chain(self.client_link.iter().map(|_| Link::Client)).collect()
    }

    /// Lifts every fault.
    pub fn heal_all(&self) {
        for link in self.links() {
            self.link(link).heal();
        }
    }

    /// The coordinator's URL through [`Link::Client`]'s proxy (with
    /// [`Options::faults`]), for clients whose link a test breaks.
    pub fn proxied_url(&self) -> String {
        self.link(Link::Client).url()
    }

    /// The ids of the coordinator group's replicas (one for a single coordinator).
    pub fn replicas(&self) -> Vec<NodeId> {
        (0..self.coordinators.len()).map(NodeId::Replica).collect()
    }

    /// The replica that leads the group now, once it coordinates (serves the
    /// registry); a single coordinator is its own leader.
    pub async fn leader(&self, timeout: Duration) -> Result<NodeId> {
        self.leader_other_than(None, timeout).await
    }

    /// Like [`Cluster::leader`], a replica other than `old` (a leader cut
    /// off from the others still believes it leads).
    pub async fn leader_other_than(&self, old: Option<NodeId>, timeout: Duration) -> Result<NodeId> {
        use decree_client::v1;
        if !self.group() {
            return Ok(NodeId::Coordinator);
        }
        poll(timeout, "a leader that coordinates", || async {
            for (i, node) in self.coordinators.iter().enumerate() {
                if old == Some(NodeId::Replica(i)) {
                    continue;
                }
                let url = self.url_at(node.port);
                let Some(channel) = tonic::transport::Endpoint::from_shared(url).ok() else { continue };
                let Ok(channel) =
                    decree_tls::connect(channel.connect_timeout(Duration::from_millis(300))).await
                else {
                    continue;
                };
                let status = v1::group_client::GroupClient::new(channel.clone())
                    .get_group(v1::GetGroupRequest {})
                    .await;
                if status.is_ok_and(|s| s.get_ref().role == "leader") {
                    let mut registry = v1::registry_client::RegistryClient::new(channel);
                    if registry.list_participants(v1::ListParticipantsRequest {}).await.is_ok() {
                        return Some(NodeId::Replica(i));
                    }
                }
            }
            None
        })
        .await
    }

    /// Replica `id`'s own view of its group (`Group.GetGroup`): its role,
    /// term, log position and the members as it sees them.
    pub async fn group_status(&self, id: NodeId) -> Result<decree_client::v1::GroupStatus> {
        use decree_client::v1;
        let endpoint = tonic::transport::Endpoint::from_shared(self.url_of(id))
            .map_err(|e| HarnessError::Other(e.to_string()))?
            .connect_timeout(Duration::from_millis(300));
        let channel = decree_tls::connect(endpoint).await.map_err(|e| HarnessError::Other(e.to_string()))?;
        let status = v1::group_client::GroupClient::new(channel).get_group(v1::GetGroupRequest {}).await;
        status.map(tonic::Response::into_inner).map_err(|e| HarnessError::Other(e.to_string()))
    }

    /// A group: more than one coordinator replica.
    fn group(&self) -> bool {
        self.coordinators.len() > 1
    }

    pub fn participant_names(&self) -> Vec<String> {
        self.participants.iter().map(|p| p.name.clone()).collect()
    }

    pub fn participant_count(&self) -> usize {
        self.participants.len()
    }

    /// A participant's id by name.
    pub fn participant(&self, name: &str) -> NodeId {
        let index = self.participants.iter().position(|p| p.name == name);
        NodeId::Participant(index.unwrap_or_else(|| panic!("no participant named {name}")))
    }

    fn node(&mut self, id: NodeId) -> &mut Node {
        match id {
            NodeId::Coordinator => &mut self.coordinators[0],
            NodeId::Replica(i) => &mut self.coordinators[i],
            NodeId::Participant(i) => &mut self.participants[i],
        }
    }

    fn node_ref(&self, id: NodeId) -> &Node {
        match id {
            NodeId::Coordinator => &self.coordinators[0],
            NodeId::Replica(i) => &self.coordinators[i],
            NodeId::Participant(i) => &self.participants[i],
        }
    }

    /// Every process of the cluster.
    fn all(&self) -> Vec<NodeId> {
        self.replicas().into_iter().chain((0..self.participants.len()).map(NodeId::Participant)).collect()
    }

    /// Each node: running or how it exited, and the end of its log.
    pub fn report(&mut self) -> String {
        let ids = self.all();
        let mut out = String::new();
        for id in ids {
            let node = self.node(id);
            let state = match node.child.as_mut().map(|c| c.try_wait()) {
                None => "not started".to_owned(),
                Some(Ok(None)) => "running".to_owned(),
                Some(Ok(Some(status))) => format!("exited: {status}"),
                Some(Err(err)) => format!("unknown: {err}"),
            };
            let (name, port) = (node.name.clone(), node.port);
            let log = self.log_of(id);
            let tail: Vec<&str> = log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            out.push_str(&format!("--- {name} (port {port}): {state}\n{}\n", tail.join("\n")));
        }
        out
    }

    /// The process log of a node (its stderr and stdout).
    pub fn log_of(&self, id: NodeId) -> String {
        std::fs::read_to_string(&self.node_ref(id).log).unwrap_or_default()
    }

    fn spawn(&mut self, id: NodeId) -> Result<()> {
        let coordinator_url = self.coordinator_url();
        let binary = self.options.binary.clone().unwrap_or_else(decree_binary);
        let group = self.group();
        let replicas: Vec<String> = self
            .coordinators
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{}=127.0.0.1:{}", i + 1, c.port))
            .collect();
        let extra = match id {
            NodeId::Coordinator | NodeId::Replica(_) if group => {
                let index = if let NodeId::Replica(i) = id { i } else { 0 };
                let mut args = vec![
                    "--replica-id".to_owned(),
                    (index + 1).to_string(),
                    "--replicas".to_owned(),
                    replicas.join(","),
                ];
                if index == 0 && !self.bootstrapped {
                    self.bootstrapped = true;
                    args.push("--bootstrap".to_owned());
                }
                args.extend(self.options.coordinator_args.iter().cloned());
                let name = &self.coordinators[index].name;
                let own = self.options.participant_args_for.iter().filter(|(n, _)| n == name);
                args.extend(own.flat_map(|(_, a)| a.iter().cloned()));
                args
            }
            NodeId::Coordinator | NodeId::Replica(_) => self.options.coordinator_args.clone(),
            NodeId::Participant(i) => {
                let name = &self.participants[i].name;
                let mut args = self.participant_args(name);
                if self.joins(i) {
                    args.push("--join".into());
                }
                if let Some((to, _)) = self.links.get(i) {
                    args.extend(["--advertise-url".to_owned(), to.url()]);
                }
                args
            }
        };
        let coordinator_url = match id {
            NodeId::Participant(i) => self.links.get(i).map_or(coordinator_url, |(_, from)| from.url()),
            _ => coordinator_url,
        };
        let program = match id {
            NodeId::Coordinator | NodeId::Replica(_) => None,
            NodeId::Participant(i) => {
                let name = &self.participants[i].name;
                self.options.participant_program_for.iter().find(|(n, _)| n == name).map(|(_, p)| p.clone())
            }
        };
        let name = self.node_ref(id).name.clone();
        let mut env: Vec<(String, String)> = Vec::new();
        if let Some(pki) = &self.options.tls {
            let identity = match id {
                NodeId::Participant(_) => name.as_str(),
                _ => "coordinator",
            };
            let files = decree_tls::certs::files(pki, identity);
            let path = |p: &Path| p.display().to_string();
            env.extend([
                ("DECREE_TLS_CERT".to_owned(), path(&files.cert)),
                ("DECREE_TLS_KEY".to_owned(), path(&files.key)),
                ("DECREE_TLS_CA".to_owned(), path(&files.ca)),
                ("DECREE_POLICY".to_owned(), path(&decree_tls::certs::policy_path(pki))),
            ]);
            // The CA's revocation list (empty unless something was revoked): checked at every handshake.
            let crl = decree_tls::certs::crl_path(pki);
            if crl.exists() {
                env.push(("DECREE_TLS_CRL".to_owned(), path(&crl)));
            }
        }
        env.extend(
            (self.options.env_for.iter())
                .filter(|(n, _, _)| *n == name)
                .map(|(_, k, v)| (k.clone(), v.clone())),
        );
        let node = self.node(id);
        assert!(node.child.is_none(), "{} is already running", node.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let mut command = Command::new(program.as_ref().unwrap_or(&binary));
        match id {
            NodeId::Coordinator | NodeId::Replica(_) => command.arg("coordinator"),
            NodeId::Participant(_) => {
                if program.is_none() {
                    command.arg("participant");
                }
                command.args(["--coordinator", &coordinator_url, "--name", &node.name])
            }
        };
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", node.port))
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(extra)
            .env_remove("DECREE_CRASH_AT")
            .env("RUST_LOG", std::env::var("DECREE_NODE_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(points) = &node.crash_at {
            command.env("DECREE_CRASH_AT", points);
        }
        command.envs(env);
        node.child = Some(command.spawn()?);
        Ok(())
    }

    /// The process id of a running node.
    pub fn pid(&self, id: NodeId) -> Option<u32> {
        self.node_ref(id).child.as_ref().map(Child::id)
    }

    /// SIGTERM: asks the node to shut down gracefully (see [`Cluster::wait_exit`]).
    pub fn terminate(&mut self, id: NodeId) {
        if let Some(pid) = self.pid(id) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// SIGKILL: no cleanup, no flush.
    pub fn kill(&mut self, id: NodeId) {
        if let Some(mut child) = self.node(id).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// True if the node's process is running (not exited).
    pub fn is_running(&mut self, id: NodeId) -> bool {
        match &mut self.node(id).child {
            None => false,
            Some(child) => matches!(child.try_wait(), Ok(None)),
        }
    }

    /// Restarts a node (killed or exited) on the same data directory and port,
    /// with no crash points armed.
    pub fn restart(&mut self, id: NodeId) -> Result<()> {
        self.restart_with(id, None)
    }

    /// Restarts a node with `crash_at` armed (`DECREE_CRASH_AT`). A running node
    /// is killed first. Returns once the process started; see [`Cluster::wait_serving`].
    pub fn restart_with(&mut self, id: NodeId, crash_at: Option<&str>) -> Result<()> {
        self.kill(id);
        self.node(id).crash_at = crash_at.map(str::to_owned);
        self.spawn(id)
    }

    /// The URL a node serves gRPC at.
    pub fn url_of(&self, id: NodeId) -> String {
        self.url_at(self.node_ref(id).port)
    }

    /// Waits until the node's process answers gRPC on its port (it has
    /// finished recovery: both servers serve only after it).
    pub async fn wait_serving(&self, id: NodeId, timeout: Duration) -> Result<()> {
        use decree_client::v1;
        let url = self.url_of(id);
        poll(timeout, &format!("{url} to serve"), || async {
            let channel =
                decree_tls::connect(tonic::transport::Endpoint::from_shared(url.clone()).ok()?).await.ok()?;
            match id {
                // A replica serves the group's view whether or not it leads.
                NodeId::Coordinator | NodeId::Replica(_) if self.group() => {
                    let mut group = v1::group_client::GroupClient::new(channel);
                    group.get_group(v1::GetGroupRequest {}).await.ok().map(|_| ())
                }
                NodeId::Coordinator | NodeId::Replica(_) => {
                    let mut registry = v1::registry_client::RegistryClient::new(channel);
                    registry.list_participants(v1::ListParticipantsRequest {}).await.ok().map(|_| ())
                }
                NodeId::Participant(_) => {
                    let mut participant = v1::participant_client::ParticipantClient::new(channel);
                    participant.list_in_doubt(v1::ListInDoubtRequest {}).await.ok().map(|_| ())
                }
            }
        })
        .await
    }

    /// Restarts a node with `crash_at` armed and waits until it serves and, for
    /// a participant, has enrolled again.
    pub async fn restart_armed(&mut self, id: NodeId, crash_at: &str) -> Result<()> {
        self.restart_with(id, Some(crash_at))?;
        self.wait_back(id).await
    }

    /// Waits until a restarted node serves (the coordinator reaches a
    /// participant at its unchanged address) and every participant is listed.
    pub async fn wait_back(&self, id: NodeId) -> Result<()> {
        self.wait_serving(id, Duration::from_secs(30)).await?;
        self.wait_enrolled(Duration::from_secs(30)).await
    }

    /// Waits until the node exits by itself (e.g. at a crash point).
    pub async fn wait_exit(&mut self, id: NodeId, timeout: Duration) -> Result<ExitStatus> {
        let node = self.node(id);
        let name = node.name.clone();
        let Some(child) = node.child.as_mut() else {
            return Err(HarnessError::Other(format!("{name} is not running")));
        };
        let status = poll(timeout, &format!("{name} to exit"), || {
            // try_wait is synchronous: the probe's future holds no borrow.
            let exited = child.try_wait().ok().flatten();
            async move { exited }
        })
        .await?;
        node.child = None;
        Ok(status)
    }

    /// A client of the cluster (participants listed now).
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.coordinator_url()).await?)
    }

    /// Waits until the coordinator answers and lists every participant as up.
    pub async fn wait_enrolled(&self, timeout: Duration) -> Result<()> {
        let want = self.participants.len();
        poll(timeout, "every participant to enroll", || async {
            let client = Client::connect(&self.coordinator_url()).await.ok()?;
            let listed = client.participants().await.ok()?;
            (listed.iter().filter(|p| p.state == "up").count() == want).then_some(())
        })
        .await
    }

    /// Waits until every participant answers and none has a branch in doubt.
    pub async fn wait_settled(&self, timeout: Duration) -> Result<()> {
        poll(timeout, "no branch in doubt at any participant", || async {
            let client = Client::connect(&self.coordinator_url()).await.ok()?;
            let (in_doubt, unreachable) = client.in_doubt().await.ok()?;
            (in_doubt.is_empty()
                && unreachable.is_empty()
                && client.participants().await.ok()?.len() == self.participants.len())
            .then_some(())
        })
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in self.all() {
            self.kill(id);
        }
        if self.options.keep_dir {
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
        }
    }
}

/// A program built next to the running test (`target/<profile>/<relative>`),
/// e.g. `decree` or `examples/inventory`.
pub fn built_program(relative: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    // target/<profile>/deps/<test> -> target/<profile>/<relative>
    let profile_dir =
        exe.parent().and_then(Path::parent).expect("test binaries live in target/<profile>/deps");
    let program = profile_dir.join(relative);
    assert!(
        program.exists(),
        "{} is missing: build it first (`cargo build --release --workspace --bins --examples`; `make test` does)",
        program.display()
    );
    program
}

/// Polls `probe` until it returns `Some`, or fails after `timeout`.
pub async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Timeout(timeout, what.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
