//! `decree coordinators`: a coordinator group's members, leader, term and
//! each replica's log position and lag; `add` and `remove` change the
//! membership (Raft membership change, asked of the leader).

use std::time::Duration;

use decree_client::v1::group_client::GroupClient;
use decree_client::{leader, v1, Coordinators};
use serde_json::json;

use crate::{Failure, Target};

#[derive(clap::Args)]
pub(crate) struct CoordinatorsArgs {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    target: Target,
}

impl CoordinatorsArgs {
    pub fn tls(&self) -> &decree_tls::TlsArgs {
        &self.target.tls
    }
}

#[derive(clap::Subcommand)]
enum Action {
    /// Add replica ID, started at ADDRESS (HOST:PORT) with an empty data directory and
    /// --replicas naming the group's replicas and itself: it catches up, then votes.
    Add { id: u64, address: String },
    /// Remove replica ID from the group (it may then be stopped). The last one cannot be removed.
    Remove { id: u64 },
}

/// How long a change waits for a leader to take it.
const LEADER_WAIT: Duration = Duration::from_secs(15);

pub(crate) async fn run(args: CoordinatorsArgs) -> Result<(), Failure> {
    let coordinators = Coordinators::new(&args.target.coordinator)?;
    let group = GroupClient::new(coordinators.clone());
    let status = match args.action {
        None => return show(&coordinators, args.target.json).await,
        Some(Action::Add { id, address }) => {
            let request = v1::AddReplicaRequest { id, address };
            at_leader(|| {
                let (mut group, request) = (group.clone(), request.clone());
                async move { group.add_replica(request).await }
            })
            .await?
        }
        Some(Action::Remove { id }) => {
            at_leader(|| {
                let mut group = group.clone();
                async move { group.remove_replica(v1::RemoveReplicaRequest { id }).await }
            })
            .await?
        }
    };
    print(&status, &[], args.target.json);
    Ok(())
}

/// Sends a change until a leader takes it (a follower refuses and names the leader).
async fn at_leader<F, Fut>(call: F) -> Result<v1::GroupStatus, Failure>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<v1::GroupStatus>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        match call().await {
            Ok(status) => return Ok(status.into_inner()),
            Err(status)
                if (leader::is_not_leader(&status) || status.code() == tonic::Code::Unavailable)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                return Err(Failure("this coordinator is not a group (started without --replicas)".into()))
            }
            Err(status) => return Err(Failure(status.message().to_owned())),
        }
    }
}

/// Asks every member for its own view: the leader's gives each member's
/// replicated position and lag, each member's its role and term.
async fn show(coordinators: &Coordinators, json: bool) -> Result<(), Failure> {
    let mut first = None;
    let mut errors = Vec::new();
    for url in coordinators.urls() {
        match view(&url).await {
            Ok(status) => {
                first = Some(status);
                break;
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                return Err(Failure(format!("{url} is a single coordinator, not a group (no --replicas)")))
            }
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                return Err(Failure(format!("permission denied: {}", status.message())))
            }
            Err(status) => errors.push(format!("{url}: {}", status.message())),
        }
    }
    let Some(first) = first else {
        return Err(Failure(format!("no replica answered: {}", errors.join("; "))));
    };
    let leader = match first.leader_url.is_empty() || first.role == "leader" {
        true => first.clone(),
        false => view(&first.leader_url).await.unwrap_or(first.clone()),
    };
    let mut each = Vec::new();
    for member in &leader.members {
        let answer = view(&decree_replica_url(&member.address)).await;
        each.push((member.id, answer.ok()));
    }
    print(&leader, &each, json);
    Ok(())
}

fn decree_replica_url(address: &str) -> String {
    let scheme = if decree_tls::installed().is_some() { "https" } else { "http" };
    format!("{scheme}://{address}")
}

async fn view(url: &str) -> Result<v1::GroupStatus, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2));
    let channel = decree_tls::channel(channel);
    Ok(GroupClient::new(channel).get_group(v1::GetGroupRequest {}).await?.into_inner())
}

/// Prints the group as `status` (the leader's view, where reached) sees
/// it, with each member's own answer in `each`.
fn print(status: &v1::GroupStatus, each: &[(u64, Option<v1::GroupStatus>)], json: bool) {
    let own = |id: u64| each.iter().find(|(m, _)| *m == id).and_then(|(_, s)| s.clone());
    // A member whose data directory is not the one the group admitted (wiped
    // or replaced): it refuses the group's messages until removed and added back.
    let replaced = |m: &v1::GroupMember, own: &Option<v1::GroupStatus>| {
        own.as_ref().is_some_and(|s| m.identity != 0 && s.identity != 0 && s.identity != m.identity)
    };
    if json {
        let members: Vec<_> = status
            .members
            .iter()
            .map(|m| {
                let own = own(m.id);
                json!({
                    "id": m.id,
                    "address": m.address,
                    "voter": m.voter,
                    "role": own.as_ref().map(|s| s.role.clone()).unwrap_or_else(|| "unreachable".into()),
                    "term": own.as_ref().map(|s| s.term),
                    "last_log_index": own.as_ref().map(|s| s.last_log_index),
                    "applied_index": own.as_ref().map(|s| s.applied_index),
                    "matched_index": m.replication_known.then_some(m.matched_index),
                    "lag": m.replication_known.then_some(m.lag),
                    "identity": format!("{:016x}", m.identity),
                    "replaced": replaced(m, &own),
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "leader": status.leader_id,
                "leader_url": status.leader_url,
                "term": status.term,
                "last_log_index": status.last_log_index,
                "leader_changes": status.leader_changes,
                "members": members,
            })
        );
        return;
    }
    let leader = match status.leader_id {
        0 => "none known".to_owned(),
        id => format!("{id} ({})", status.leader_url),
    };
    println!("leader {leader}, term {}, log at {}", status.term, status.last_log_index);
    println!(
        "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:>8}",
        "id", "address", "role", "term", "log", "applied", "lag"
    );
    for m in &status.members {
        let own = own(m.id);
        let role = match &own {
            Some(_) if replaced(m, &own) => "replaced".to_owned(),
            Some(s) if m.voter => s.role.clone(),
            Some(_) => "learner".to_owned(),
            None if each.is_empty() => if m.voter { "voter" } else { "learner" }.to_owned(),
            None => "unreachable".to_owned(),
        };
        let cell = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:>8}",
            m.id,
            m.address,
            role,
            cell(own.as_ref().map(|s| s.term)),
            cell(own.as_ref().map(|s| s.last_log_index)),
            cell(own.as_ref().map(|s| s.applied_index)),
            cell(m.replication_known.then_some(m.lag)),
        );
    }
    for m in status.members.iter().filter(|m| replaced(m, &own(m.id))) {
        println!(
            "replica {id}'s data directory is not the one the group admitted (wiped or replaced): it takes no \
             part until removed and added back: decree coordinators remove {id}; decree coordinators add {id} {addr}",
            id = m.id,
            addr = m.address
        );
    }
}
