//! Joining a running cluster: `latchkey serve --join ENDPOINTS`.
//!
//! 1. Before the node starts, and only on a new data dir, [`prepare`] asks
//!    the cluster (through `latchkey-client`, at any of `ENDPOINTS`) for its
//!    members, so that the node knows where its peers are. The node then
//!    bootstraps with no voters at all and waits for the leader's snapshot,
//!    which brings the state machine and the membership.
//! 2. Once the node serves, [`spawn_add_self`] asks the leader to add it as
//!    a learner, unless an operator already did (`latchkey member add`). The
//!    leader checks that this node's peer address answers, which is why the
//!    node must be up first. Retried until it succeeds or
//!    [`JOIN_DEADLINE`] passes.
//!
//! Promotion to voter stays the operator's decision (`latchkey member
//! promote`, once `latchkey member list` shows the learner caught up): a
//! new voter changes the quorum, which nobody should do by accident.
//! A node that already has data ignores `--join` and restarts as it was.

use std::time::Duration;

use latchkey_client::Client;

use crate::config::Config;
use crate::error::StartupError;
use crate::storage::{keys, Engine, CF_RAFT_STATE};
use crate::types::NodeId;

/// How long a joining node keeps asking to be added.
pub const JOIN_DEADLINE: Duration = Duration::from_secs(120);
/// Pause between two requests to be added.
const ADD_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Whether this node joins now: `--join` was given and the data dir is new.
/// If so, fills `config.peers` with the cluster's members.
pub async fn prepare(config: &mut Config, engine: &Engine) -> Result<bool, StartupError> {
    if config.join.is_empty() {
        return Ok(false);
    }
    let fresh = engine
        .get(CF_RAFT_STATE, keys::raft_state::CONF_STATE)
        .map_err(StartupError::from)?
        .is_none();
    if !fresh {
        tracing::info!("data dir already holds a member; --join is ignored");
        config.join.clear();
        return Ok(false);
    }
    let client = connect(config).await?;
    let members = client.members().await.map_err(|e| {
        StartupError::config(format!(
            "cannot read the members of the cluster at {}: {e}",
            config.join.join(",")
        ))
    })?;
    let me = config.peers[&config.id].clone();
    for member in &members {
        if member.id == config.id.0 && member.peer_addr != me {
            return Err(StartupError::config(format!(
                "node {} is already a member with peer address {}, not {me}; pick another --id or fix --advertise-peer",
                member.id, member.peer_addr
            )));
        }
        config
            .peers
            .entry(NodeId(member.id))
            .or_insert_with(|| member.peer_addr.clone());
    }
    Ok(true)
}

async fn connect(config: &Config) -> Result<Client, StartupError> {
    Client::builder(config.join.iter().cloned())
        .sessionless()
        .connect()
        .await
        .map_err(|e| {
            StartupError::config(format!(
                "cannot reach the cluster to join at {}: {e}",
                config.join.join(",")
            ))
        })
}

/// Asks the leader to add this node as a learner, in the background.
pub fn spawn_add_self(config: &Config) {
    let config = config.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + JOIN_DEADLINE;
        // Bounded by JOIN_DEADLINE.
        loop {
            match add_self(&config).await {
                Ok(()) => return,
                Err(error) if tokio::time::Instant::now() >= deadline => {
                    tracing::error!("could not join the cluster within {JOIN_DEADLINE:?}: {error}");
                    return;
                }
                Err(error) => tracing::info!("not added yet: {error}"),
            }
            tokio::time::sleep(ADD_RETRY_PAUSE).await;
        }
    });
}

async fn add_self(config: &Config) -> Result<(), String> {
    let client = connect(config).await.map_err(|e| e.to_string())?;
    let peer_addr = &config.peers[&config.id];
    let members = client.members().await.map_err(|e| e.to_string())?;
    if members.iter().any(|member| member.id == config.id.0) {
        tracing::info!(node = %config.id, "this node is a member; catching up");
        return Ok(());
    }
    client
        .add_member(config.id.0, peer_addr, &config.advertise_client)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(node = %config.id, "added to the cluster as a learner; promote it with `latchkey member promote {}` once it has caught up", config.id);
    Ok(())
}
