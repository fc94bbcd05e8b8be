//! The client API: gRPC services over the node and the state machine.
//!
//! Writes are proposed to Raft and answered once applied. Only the leader
//! accepts them: a follower answers `UNAVAILABLE` with the leader's id and
//! client address in the response metadata ([`LEADER_ID_HEADER`],
//! [`LEADER_ADDR_HEADER`]) so that a client can retry there; it does not
//! forward. Reads are linearizable by default: a ReadIndex round confirms
//! the read point with a quorum, and any node (follower included) answers
//! once its applied index reaches it. `serializable` reads skip that round
//! and may be stale.
//!
//! Every [`RequestError`] becomes a gRPC status in one place,
//! [`status_from`]; every deterministic refusal recorded by apply
//! (`CommandError`) becomes one in [`command_status`], with its typed
//! `latchkey.v1.ErrorDetails` encoded in the status details.
//!
//! # Layout
//! - this file: shared plumbing and the KV service.
//! - `cluster.rs`: Status, membership changes, leader transfer.
//! - `lease.rs`: Grant, Revoke, KeepAlive, TimeToLive, List.
//! - `lock.rs`: Acquire (waiting FIFO), Release, Describe.
//! - `election.rs`: Campaign, Proclaim, Leader, Observe, Resign.
//! - `session.rs`: Open and Close of exactly-once sessions.
//! - `maintenance.rs`: backups (a snapshot streamed to the client).
//! - `auth.rs`: logging in, users, roles, the authentication switch.
//! - `streams.rs`: the bound on calls open at once on one connection.
//!
//! # Authentication
//! Each call first finds out who is asking ([`Authenticator::identify`])
//! and checks the permission it needs on the name it touches, before it
//! reads or proposes anything; a refusal changes nothing. Leases belong to
//! the identity that granted them: a user that is not an admin may only
//! keep alive, inspect, revoke or acquire with its own (checked here for
//! reads and keepalives, and in apply for revokes and acquires, so the
//! check holds whichever node proposed).

mod auth;
mod cluster;
mod election;
mod lease;
mod lock;
mod maintenance;
mod pipeline;
mod session;
pub mod streams;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use latchkey_proto::state::v1::{
    command, command_result, Command, CommandError, Delete, KvRecord, Put,
};
use latchkey_proto::v1::cluster_server::ClusterServer;
use latchkey_proto::v1::kv_server::{Kv, KvServer};
use latchkey_proto::v1::RequestId;
use latchkey_proto::v1::{
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, KeyValue, PutRequest, PutResponse,
    RangeRequest, RangeResponse, ResponseHeader,
};
use prost::Message as _;

use crate::auth::{Authenticator, Identity};
use crate::config::Limits;
use crate::coordination::{CoordinationError, LeaseId};
use crate::error::{FatalError, RequestError};
use crate::metrics::Metrics;
use crate::node::{Applied, NodeHandle};
use crate::state_machine::{Reader, MAX_KEY_BYTES, MAX_RANGE_KEYS, MAX_VALUE_BYTES};
use crate::transport::PeerDirectory;
use crate::types::NodeId;
use latchkey_proto::v1::PermissionKind;

/// Metadata key carrying the leader's node id on `UNAVAILABLE`.
pub const LEADER_ID_HEADER: &str = "latchkey-leader-id";
/// Metadata key carrying the leader's client address on `UNAVAILABLE`.
pub const LEADER_ADDR_HEADER: &str = "latchkey-leader-addr";
/// Largest client request accepted.
pub const MAX_REQUEST_BYTES: usize = MAX_VALUE_BYTES + 64 * 1024;

/// Settings of the client services that come from the node's configuration.
#[derive(Debug, Clone, Copy)]
pub struct ApiSettings {
    /// Shortest lease TTL granted: twice the election timeout, so that a
    /// leader change alone never outlasts a lease.
    pub min_lease_ttl_ms: u64,
    /// The drift bound, told to clients with every grant and renewal.
    pub max_clock_drift_ppm: u64,
    /// How long an idle session lives, told to clients that open one.
    pub session_idle_timeout_ms: u64,
    /// The shortest time after which a follower may start an election.
    pub election_timeout_ms: u64,
    /// Lifetime of the bearer tokens `Auth.Authenticate` issues.
    pub auth_token_ttl: std::time::Duration,
    pub limits: Limits,
}

impl ApiSettings {
    pub fn election_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.election_timeout_ms)
    }
}

/// State shared by the client services of one node.
#[derive(Clone)]
pub struct Api {
    id: NodeId,
    node: NodeHandle,
    reader: Reader,
    directory: PeerDirectory,
    settings: ApiSettings,
    /// Where backup files are written before they are streamed.
    snapshot_dir: std::path::PathBuf,
    /// Turns true when the server stops: long-lived streams (Observe,
    /// KeepAlive) then end with `UNAVAILABLE`, so their clients move to
    /// another node instead of waiting on a node that no longer serves.
    stopping: watch::Receiver<bool>,
    auth: Authenticator,
    limits: Limits,
    /// Where requests that are not calls of their own are counted.
    metrics: Option<Arc<Metrics>>,
}

/// The owner a non-admin user's lease-using command must match; `None`
/// for admins and when authentication is off.
pub(super) fn owner_check(identity: &Identity) -> Option<String> {
    identity
        .checks_owner()
        .then(|| identity.name().unwrap_or_default().to_string())
}

impl Api {
    pub fn new(
        id: NodeId,
        node: NodeHandle,
        reader: Reader,
        directory: PeerDirectory,
        settings: ApiSettings,
        snapshot_dir: std::path::PathBuf,
        stopping: watch::Receiver<bool>,
    ) -> Api {
        let auth = Authenticator::new(reader.auth(), settings.auth_token_ttl);
        let limits = settings.limits;
        Api {
            id,
            node,
            reader,
            directory,
            settings,
            snapshot_dir,
            stopping,
            auth,
            limits,
            metrics: None,
        }
    }

    /// Counts the requests of `Lock.Pipeline` streams in `metrics`, each
    /// under its unary call's method (the layer around the services counts
    /// calls, and sees a stream once).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Api {
        self.metrics = Some(metrics);
        self
    }

    /// Who is asking; `UNAUTHENTICATED` when authentication is on and the
    /// request proves no identity.
    pub(super) fn identify<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        self.auth.identify(request)
    }

    /// Who is asking, if they hold `kind` on `resource`.
    pub(super) fn require<T>(
        &self,
        request: &Request<T>,
        kind: PermissionKind,
        resource: &str,
    ) -> Result<Identity, Status> {
        let identity = self.identify(request)?;
        identity.require(kind, resource)?;
        Ok(identity)
    }

    /// Refuses a user that is not an admin a lease it does not own, as this
    /// node has applied it. An unknown lease passes (the call reports it).
    pub(super) fn check_lease_owner(
        &self,
        identity: &Identity,
        lease: LeaseId,
    ) -> Result<(), Status> {
        if !identity.checks_owner() {
            return Ok(());
        }
        let caller = crate::coordination::Caller {
            identity: owner_check(identity),
            check_owner: true,
            ..Default::default()
        };
        let checked = self.reader.coordination().check_owner(lease, &caller);
        checked.map_err(|e| {
            let user = identity.name().unwrap_or_default();
            tracing::info!(%user, %lease, "request refused: not the lease's owner");
            refusal("", e)
        })
    }

    /// Completes once the server is stopping.
    pub(super) fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.clone();
        async move {
            // An error means the server is gone altogether: stopping too.
            let _ = stopping.wait_for(|stopping| *stopping).await;
        }
    }

    /// The gRPC names of every client service above, for health and
    /// reflection.
    pub const SERVICE_NAMES: [&'static str; 8] = {
        use tonic::server::NamedService;
        [
            <KvServer<Api> as NamedService>::NAME,
            <ClusterServer<Api> as NamedService>::NAME,
            <latchkey_proto::v1::lease_server::LeaseServer<Api> as NamedService>::NAME,
            <latchkey_proto::v1::lock_server::LockServer<Api> as NamedService>::NAME,
            <latchkey_proto::v1::election_server::ElectionServer<Api> as NamedService>::NAME,
            <latchkey_proto::v1::session_server::SessionServer<Api> as NamedService>::NAME,
            <latchkey_proto::v1::maintenance_server::MaintenanceServer<Api> as NamedService>::NAME,
            <latchkey_proto::v1::auth_server::AuthServer<Api> as NamedService>::NAME,
        ]
    };

    // Every service refuses a request larger than --max-request-bytes
    // before decoding it (`RESOURCE_EXHAUSTED`, naming the size).

    pub fn lease_service(&self) -> latchkey_proto::v1::lease_server::LeaseServer<Api> {
        latchkey_proto::v1::lease_server::LeaseServer::new(self.clone())
            .max_decoding_message_size(self.limits.max_request_bytes)
    }

    pub fn lock_service(&self) -> latchkey_proto::v1::lock_server::LockServer<Api> {
        latchkey_proto::v1::lock_server::LockServer::new(self.clone())
            .max_decoding_message_size(self.limits.max_request_bytes)
    }

    pub fn election_service(&self) -> latchkey_proto::v1::election_server::ElectionServer<Api> {
        latchkey_proto::v1::election_server::ElectionServer::new(self.clone())
            .max_decoding_message_size(self.limits.max_request_bytes)
    }

    pub fn kv_service(&self) -> KvServer<Api> {
        KvServer::new(self.clone())
            .max_decoding_message_size(self.limits.max_request_bytes)
            .max_encoding_message_size(usize::MAX)
    }

    pub fn cluster_service(&self) -> ClusterServer<Api> {
        ClusterServer::new(self.clone()).max_decoding_message_size(self.limits.max_request_bytes)
    }

    pub fn session_service(&self) -> latchkey_proto::v1::session_server::SessionServer<Api> {
        latchkey_proto::v1::session_server::SessionServer::new(self.clone())
            .max_decoding_message_size(self.limits.max_request_bytes)
    }

    pub fn maintenance_service(
        &self,
    ) -> latchkey_proto::v1::maintenance_server::MaintenanceServer<Api> {
        latchkey_proto::v1::maintenance_server::MaintenanceServer::new(self.clone())
            .max_decoding_message_size(self.limits.max_request_bytes)
    }

    pub fn auth_service(&self) -> latchkey_proto::v1::auth_server::AuthServer<Api> {
        latchkey_proto::v1::auth_server::AuthServer::new(self.clone())
            .max_decoding_message_size(self.limits.max_request_bytes)
    }

    fn status(&self, error: RequestError) -> Status {
        status_from(error, &self.directory)
    }

    fn fatal(&self, error: FatalError) -> Status {
        let message = error.to_string();
        self.node.report_fatal(error);
        Status::data_loss(message)
    }

    fn header(&self) -> ResponseHeader {
        let status = self.node.status();
        ResponseHeader {
            node_id: self.id.0,
            term: status.term,
            revision: status.applied_index,
        }
    }

    /// Proposes `command` under an exactly-once request id; a recorded
    /// refusal comes back as its gRPC status.
    async fn propose_once(
        &self,
        command: command::Command,
        request: Option<RequestId>,
    ) -> Result<(Applied, command_result::Result), Status> {
        let command = Command {
            command: Some(command),
            request,
        };
        let applied = self
            .node
            .propose(command)
            .await
            .map_err(|e| self.status(e))?;
        let result = applied
            .result
            .result
            .clone()
            .ok_or_else(|| Status::internal("command produced no result"))?;
        if let command_result::Result::Error(error) = result {
            return Err(command_status(error));
        }
        Ok((applied, result))
    }

    async fn read_point(&self, serializable: bool) -> Result<(), Status> {
        if serializable {
            return Ok(());
        }
        self.node
            .read_index()
            .await
            .map(|_| ())
            .map_err(|e| self.status(e))
    }
}

/// A refusal found before proposing (a bad name or value), with the same
/// code and typed details as the refusal apply would record.
pub(super) fn refusal(name: &str, error: CoordinationError) -> Status {
    match crate::state_machine::coordination_error(name, error).result {
        Some(command_result::Result::Error(error)) => command_status(error),
        _ => Status::internal("a refusal produced no error"),
    }
}

/// Maps a refusal recorded by apply to its gRPC status with typed details.
pub fn command_status(error: CommandError) -> Status {
    let code = tonic::Code::from_i32(error.code);
    let details = error.details.map(|d| d.encode_to_vec()).unwrap_or_default();
    Status::with_details(code, error.message, details.into())
}

fn header_at(api: &Api, applied: &Applied) -> ResponseHeader {
    ResponseHeader {
        node_id: api.id.0,
        term: applied.term,
        revision: applied.index.0,
    }
}

/// `UNAVAILABLE` with a `NotLeader` detail (nothing was proposed; resend
/// elsewhere) and, when known, the leader's id and client address in the
/// detail and the metadata.
fn not_leader_status(
    message: String,
    leader_id: Option<u64>,
    leader_client_addr: Option<String>,
) -> Status {
    let details = latchkey_proto::v1::ErrorDetails {
        detail: Some(latchkey_proto::v1::error_details::Detail::NotLeader(
            latchkey_proto::v1::NotLeader {
                leader_id: leader_id.unwrap_or(0),
                leader_client_addr: leader_client_addr.clone().unwrap_or_default(),
            },
        )),
    };
    let mut status = Status::with_details(
        tonic::Code::Unavailable,
        message,
        details.encode_to_vec().into(),
    );
    if let Some(id) = leader_id {
        status
            .metadata_mut()
            .insert(LEADER_ID_HEADER, MetadataValue::from(id));
    }
    if let Some(value) = leader_client_addr.and_then(|a| MetadataValue::try_from(a).ok()) {
        status.metadata_mut().insert(LEADER_ADDR_HEADER, value);
    }
    status
}

/// Maps a request error to its gRPC status, adding the leader hint.
pub fn status_from(error: RequestError, directory: &PeerDirectory) -> Status {
    match error {
        RequestError::NotLeader { leader_id, .. } => {
            let leader_client_addr = leader_id
                .and_then(|id| directory.get(NodeId(id)))
                .map(|info| info.client_addr)
                .filter(|addr| !addr.is_empty());
            let error = RequestError::NotLeader {
                leader_id,
                leader_client_addr: leader_client_addr.clone(),
            };
            not_leader_status(error.to_string(), leader_id, leader_client_addr)
        }
        RequestError::LeadershipLost | RequestError::ShuttingDown | RequestError::Restoring => {
            Status::unavailable(error.to_string())
        }
        // Typed as "not the leader, none known": clients then resend at once
        // to another node, and know that nothing was proposed.
        RequestError::SyncStalled => not_leader_status(error.to_string(), None, None),
        RequestError::Timeout(_) => Status::deadline_exceeded(error.to_string()),
        RequestError::Conflict(_) => Status::failed_precondition(error.to_string()),
        RequestError::NoQuorum(_) => Status::failed_precondition(error.to_string()),
        RequestError::InvalidArgument { field, ref reason } => {
            let details = latchkey_proto::v1::ErrorDetails {
                detail: Some(latchkey_proto::v1::error_details::Detail::InvalidField(
                    latchkey_proto::v1::InvalidField {
                        field: field.to_string(),
                        reason: reason.clone(),
                    },
                )),
            };
            Status::with_details(
                tonic::Code::InvalidArgument,
                error.to_string(),
                details.encode_to_vec().into(),
            )
        }
    }
}

impl Api {
    fn check_key(&self, key: &[u8]) -> Result<(), RequestError> {
        if key.is_empty() {
            return Err(RequestError::InvalidArgument {
                field: "key",
                reason: "must not be empty".into(),
            });
        }
        let limit = self.limits.max_key_bytes.min(MAX_KEY_BYTES);
        if key.len() > limit {
            return Err(RequestError::InvalidArgument {
                field: "key",
                reason: format!(
                    "is {} bytes; the limit is {limit} (--max-key-bytes)",
                    key.len()
                ),
            });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), RequestError> {
        let limit = self.limits.max_value_bytes.min(MAX_VALUE_BYTES);
        if value.len() > limit {
            return Err(RequestError::InvalidArgument {
                field: "value",
                reason: format!(
                    "is {} bytes; the limit is {limit} (--max-value-bytes)",
                    value.len()
                ),
            });
        }
        Ok(())
    }
}

/// A key as the name permissions match against.
fn key_name(key: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(key)
}

fn key_value(key: Vec<u8>, record: KvRecord) -> KeyValue {
    KeyValue {
        key,
        value: record.value,
        create_revision: record.create_revision,
        mod_revision: record.mod_revision,
        token: record.token,
        fence_name: record.fence_name,
    }
}

#[tonic::async_trait]
impl Kv for Api {
    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.require(
            &request,
            PermissionKind::Write,
            &key_name(&request.get_ref().key),
        )?;
        let PutRequest {
            key,
            value,
            fence,
            request,
            expected_mod_revision,
        } = request.into_inner();
        self.check_key(&key)
            .and_then(|()| self.check_value(&value))
            .map_err(|e| self.status(e))?;
        if let Some(fence) = &fence {
            crate::coordination::validate_name(&fence.name).map_err(|e| match e {
                CoordinationError::InvalidArgument { reason, .. } => refusal(
                    &fence.name,
                    CoordinationError::InvalidArgument {
                        field: "fence.name",
                        reason,
                    },
                ),
                other => refusal(&fence.name, other),
            })?;
        }
        let put = Put {
            key,
            value,
            fence,
            expected_mod_revision,
        };
        let (applied, result) = self
            .propose_once(command::Command::Put(put), request)
            .await?;
        let command_result::Result::Put(put) = result else {
            return Err(Status::internal("put produced another command's result"));
        };
        Ok(Response::new(PutResponse {
            header: Some(header_at(self, &applied)),
            revision: put.revision,
        }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.require(
            &request,
            PermissionKind::Read,
            &key_name(&request.get_ref().key),
        )?;
        let GetRequest { key, serializable } = request.into_inner();
        self.check_key(&key).map_err(|e| self.status(e))?;
        self.read_point(serializable).await?;
        let header = self.header();
        let record = self.reader.get(&key).map_err(|e| self.fatal(e))?;
        Ok(Response::new(GetResponse {
            header: Some(header),
            kv: record.map(|record| key_value(key, record)),
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        self.require(
            &request,
            PermissionKind::Write,
            &key_name(&request.get_ref().key),
        )?;
        let DeleteRequest {
            key,
            fence,
            request,
            expected_mod_revision,
        } = request.into_inner();
        self.check_key(&key).map_err(|e| self.status(e))?;
        let delete = Delete {
            key,
            fence,
            expected_mod_revision,
        };
        let (applied, result) = self
            .propose_once(command::Command::Delete(delete), request)
            .await?;
        let command_result::Result::Delete(delete) = result else {
            return Err(Status::internal("delete produced another command's result"));
        };
        Ok(Response::new(DeleteResponse {
            header: Some(header_at(self, &applied)),
            deleted: delete.deleted,
            revision: delete.revision,
        }))
    }

    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        self.require(
            &request,
            PermissionKind::Read,
            &key_name(&request.get_ref().prefix),
        )?;
        let RangeRequest {
            prefix,
            limit,
            serializable,
        } = request.into_inner();
        if prefix.len() > MAX_KEY_BYTES {
            return Err(self.status(RequestError::InvalidArgument {
                field: "prefix",
                reason: format!("is {} bytes; the limit is {MAX_KEY_BYTES}", prefix.len()),
            }));
        }
        let limit = match limit as usize {
            0 => MAX_RANGE_KEYS,
            n => n.min(MAX_RANGE_KEYS),
        };
        self.read_point(serializable).await?;
        let header = self.header();
        let (records, more) = self
            .reader
            .range(&prefix, limit)
            .map_err(|e| self.fatal(e))?;
        Ok(Response::new(RangeResponse {
            header: Some(header),
            kvs: records.into_iter().map(|(k, r)| key_value(k, r)).collect(),
            more,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_node_refuses_as_not_the_leader_with_none_known() {
        let addr: std::net::SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        let config = crate::config::Config::with_defaults(
            NodeId(1),
            "/nonexistent/latchkey-api-test".into(),
            addr,
            addr,
            std::collections::BTreeMap::from([(NodeId(1), "127.0.0.1:1".to_string())]),
        );
        let status = status_from(RequestError::SyncStalled, &PeerDirectory::new(&config));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("not proposed"), "{status:?}");
        // What clients read as "nothing was proposed; try another node".
        let details = latchkey_proto::v1::ErrorDetails::decode(status.details()).expect("details");
        assert_eq!(
            details.detail,
            Some(latchkey_proto::v1::error_details::Detail::NotLeader(
                latchkey_proto::v1::NotLeader::default()
            ))
        );
        assert!(status.metadata().get(LEADER_ADDR_HEADER).is_none());
    }
}
