//! The Lease service. Grant and Revoke go through Raft; KeepAlive is
//! answered by the leader from its lease clock without a Raft write, once a
//! quorum confirmed a round that started after the renewal arrived (see
//! `crate::lease_clock`). Each renewal lists the lease's grants and the
//! cluster's clock drift bound.

use std::future::Future;
use std::pin::Pin;

use std::collections::VecDeque;
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use latchkey_proto::state::v1::{command, command_result, GrantLease, RevokeLease};
use latchkey_proto::v1::lease_server::Lease;
use latchkey_proto::v1::{
    fence, Fence, LeaseGrantRequest, LeaseGrantResponse, LeaseInfo, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseListRequest, LeaseListResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};

use super::{header_at, owner_check, Api};
use crate::auth::Identity;
use crate::coordination::{Kind, LeaseId};
use crate::error::RequestError;
use crate::lease_clock::KeepAlive;
use crate::node::{HeldGrant, KeepAliveAnswer, Role};
use crate::state_machine::{grant_proto, MAX_LEASE_TTL_MS};
use latchkey_proto::v1::PermissionKind;

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for Api {
    async fn grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let identity = self.require(&request, PermissionKind::Lease, "")?;
        let LeaseGrantRequest { ttl_ms, request } = request.into_inner();
        let min_ttl_ms = self.settings.min_lease_ttl_ms;
        if ttl_ms < min_ttl_ms || ttl_ms > MAX_LEASE_TTL_MS {
            return Err(self.status(RequestError::InvalidArgument {
                field: "ttl_ms",
                reason: format!(
                    "{ttl_ms} is outside [{min_ttl_ms}, {MAX_LEASE_TTL_MS}]; the minimum is twice the election timeout, so that a leader change alone cannot outlast a lease"
                ),
            }));
        }
        let (applied, result) = self
            .propose_once(
                command::Command::GrantLease(GrantLease {
                    ttl_ms,
                    owner: identity.name().unwrap_or_default().to_string(),
                    max_owner_leases: self.limits.max_leases_per_identity,
                }),
                request,
            )
            .await?;
        let command_result::Result::LeaseGranted(granted) = result else {
            return Err(Status::internal("grant produced another command's result"));
        };
        Ok(Response::new(LeaseGrantResponse {
            header: Some(header_at(self, &applied)),
            lease: granted.lease,
            ttl_ms: granted.ttl_ms,
            max_clock_drift_ppm: self.settings.max_clock_drift_ppm,
        }))
    }

    async fn revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let identity = self.identify(&request)?;
        let LeaseRevokeRequest { lease, request } = request.into_inner();
        let caller = owner_check(&identity);
        let (applied, _) = self
            .propose_once(
                command::Command::RevokeLease(RevokeLease { lease, caller }),
                request,
            )
            .await?;
        Ok(Response::new(LeaseRevokeResponse {
            header: Some(header_at(self, &applied)),
        }))
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let identity = self.identify(&request)?;
        let renewals = Renewals {
            api: self.clone(),
            identity,
            incoming: request.into_inner(),
            incoming_done: false,
            in_flight: VecDeque::new(),
            stopping: Box::pin(self.stopping()),
            ended: false,
        };
        // Each renewal is read, answered and written by the task that polls
        // the response stream: no task or channel of its own per stream.
        let answers = futures::stream::unfold(renewals, |mut renewals| async move {
            let answer = renewals.next().await?;
            Some((answer, renewals))
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let identity = self.identify(&request)?;
        let LeaseTimeToLiveRequest {
            lease,
            serializable,
        } = request.into_inner();
        self.check_lease_owner(&identity, LeaseId(lease))?;
        if !serializable && self.node.status().role != Role::Leader {
            // Only the leader knows the time left; send the caller there.
            return Err(self.status(RequestError::NotLeader {
                leader_id: Some(self.node.status().leader_id).filter(|id| *id != 0),
                leader_client_addr: None,
            }));
        }
        self.read_point(serializable).await?;
        let remaining = self
            .node
            .lease_remaining(LeaseId(lease))
            .await
            .map_err(|e| self.status(e))?;
        let header = self.header();
        let state = self.reader.coordination();
        let Some(found) = state.lease(LeaseId(lease)) else {
            return Ok(Response::new(LeaseTimeToLiveResponse {
                header: Some(header),
                lease,
                ..LeaseTimeToLiveResponse::default()
            }));
        };
        let grants = state
            .locks_of(LeaseId(lease))
            .map(|(key, grant)| grant_proto(&key.name, grant))
            .collect();
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: Some(header),
            lease,
            found: true,
            remaining_ms: remaining.map_or(found.ttl_ms, |r| r.as_millis() as u64),
            ttl_ms: found.ttl_ms,
            grants,
            waiting: found.waiting.iter().map(|key| key.name.clone()).collect(),
        }))
    }

    async fn list(
        &self,
        request: Request<LeaseListRequest>,
    ) -> Result<Response<LeaseListResponse>, Status> {
        let identity = self.identify(&request)?;
        self.read_point(request.into_inner().serializable).await?;
        let header = self.header();
        // A user that is not an admin sees its own leases only.
        let visible = |lease: &crate::coordination::Lease| {
            !identity.checks_owner() || lease.owner.as_deref() == identity.name()
        };
        let ids: Vec<LeaseId> = self
            .reader
            .coordination()
            .leases()
            .filter(|l| visible(l))
            .map(|l| l.id)
            .collect();
        // Only a leader's lease clock knows the time left; elsewhere it is absent.
        let remaining: std::collections::BTreeMap<LeaseId, std::time::Duration> =
            if self.node.status().role == Role::Leader {
                let times = self
                    .node
                    .leases_remaining(ids.clone())
                    .await
                    .map_err(|e| self.status(e))?;
                ids.into_iter()
                    .zip(times)
                    .filter_map(|(id, left)| Some((id, left?)))
                    .collect()
            } else {
                Default::default()
            };
        let state = self.reader.coordination();
        let leases = state
            .leases()
            .filter(|l| visible(l))
            .map(|lease| LeaseInfo {
                lease: lease.id.0,
                ttl_ms: lease.ttl_ms,
                grants: lease.held.len() as u32,
                remaining_ms: remaining.get(&lease.id).map(|left| left.as_millis() as u64),
            })
            .collect();
        Ok(Response::new(LeaseListResponse {
            header: Some(header),
            leases,
        }))
    }
}

/// Renewals one `KeepAlive` stream has in flight at most; the stream reads
/// no more requests until one is answered.
const RENEWALS_IN_FLIGHT: usize = 1024;

/// What a renewal of a `KeepAlive` stream comes to: the node's answer for
/// its lease, or a refusal before it reached the node, which ends the
/// stream when its turn comes.
type Outcome = Result<(LeaseId, Result<KeepAliveAnswer, RequestError>), Status>;

/// A renewal read from a stream and not yet answered on it.
enum PendingRenewal {
    /// Handed to the node, which answers on the receiver.
    Asked(
        LeaseId,
        oneshot::Receiver<Result<KeepAliveAnswer, RequestError>>,
    ),
    /// Its outcome is known already; `None` once taken.
    Known(Option<Outcome>),
}

impl Future for PendingRenewal {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match self.get_mut() {
            PendingRenewal::Asked(lease, answer) => Pin::new(answer).poll(cx).map(|answer| {
                let answer = answer.unwrap_or(Err(RequestError::ShuttingDown));
                Ok((*lease, answer))
            }),
            PendingRenewal::Known(outcome) => {
                Poll::Ready(outcome.take().expect("a renewal's outcome is taken once"))
            }
        }
    }
}

/// One `KeepAlive` stream's state: renewals come in, answers go out, and
/// the stream ends when the client closes it (once every renewal it sent is
/// answered), on a failed renewal (after sending its error), or when the
/// server stops.
///
/// A stream may carry renewals of several leases, sent without waiting for
/// the previous answer: each is asked of the node as soon as it is read,
/// so renewals read together share a confirmation round. Answers go out
/// in the order of the requests, which is what lets a client match each
/// answer to the send time it extends its lease from: a renewal is
/// answered once a round that began after it arrived is confirmed, so
/// later requests are not answered sooner anyway. A client that sends one
/// renewal at a time sees no difference.
struct Renewals {
    api: Api,
    identity: Identity,
    incoming: Streaming<LeaseKeepAliveRequest>,
    /// The client closed its side (or it broke): answer what is in flight.
    incoming_done: bool,
    /// Oldest first; only the oldest is waited for, as answers go out in
    /// order (the node answers the others meanwhile, into their receivers).
    in_flight: VecDeque<PendingRenewal>,
    stopping: Pin<Box<dyn Future<Output = ()> + Send>>,
    ended: bool,
}

impl Renewals {
    /// The answer to the next renewal that completes; `None` once the
    /// stream is over.
    async fn next(&mut self) -> Option<Result<LeaseKeepAliveResponse, Status>> {
        // Bounded: each turn reads a request or yields an answer, and the
        // stream ends once its requests are over and all are answered.
        loop {
            if self.ended || (self.incoming_done && self.in_flight.is_empty()) {
                self.ended = true;
                return None;
            }
            let reading = !self.incoming_done && self.in_flight.len() < RENEWALS_IN_FLIGHT;
            tokio::select! {
                // `Streaming::message` is cancel safe: a request is never
                // lost to the other branch winning.
                message = self.incoming.message(), if reading => {
                    let Ok(Some(LeaseKeepAliveRequest { lease })) = message else {
                        self.incoming_done = true;
                        continue;
                    };
                    let lease = LeaseId(lease);
                    if let Err(refused) = self.api.check_lease_owner(&self.identity, lease) {
                        // Answered in its turn, like any other; nothing is
                        // read after it, as the stream ends there.
                        self.incoming_done = true;
                        self.in_flight.push_back(PendingRenewal::Known(Some(Err(refused))));
                        continue;
                    }
                    let pending = match self.api.node.ask_keep_alive(lease).await {
                        Ok(answer) => PendingRenewal::Asked(lease, answer),
                        Err(e) => PendingRenewal::Known(Some(Ok((lease, Err(e))))),
                    };
                    self.in_flight.push_back(pending);
                }
                answer = oldest(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    self.in_flight.pop_front();
                    let answer = answer
                        .and_then(|(lease, answer)| self.api.keep_alive_answer(lease, answer));
                    self.ended = answer.is_err();
                    return Some(answer);
                }
                () = &mut self.stopping => {
                    self.ended = true;
                    return Some(Err(Status::unavailable("the node is shutting down")));
                }
            }
        }
    }
}

/// The outcome of the oldest renewal in flight, once it is known.
fn oldest(in_flight: &mut VecDeque<PendingRenewal>) -> impl Future<Output = Outcome> + '_ {
    std::future::poll_fn(move |cx| match in_flight.front_mut() {
        Some(renewal) => Pin::new(renewal).poll(cx),
        None => Poll::Pending,
    })
}

impl Api {
    /// The response to the node's answer to a renewal of `lease`.
    fn keep_alive_answer(
        &self,
        lease: LeaseId,
        answer: Result<KeepAliveAnswer, RequestError>,
    ) -> Result<LeaseKeepAliveResponse, Status> {
        let KeepAliveAnswer { answer, grants } = answer.map_err(|e| self.status(e))?;
        let header = Some(self.header());
        let max_clock_drift_ppm = self.settings.max_clock_drift_ppm;
        match answer {
            KeepAlive::Renewed { ttl_ms } => Ok(LeaseKeepAliveResponse {
                header,
                lease: lease.0,
                found: true,
                remaining_ms: ttl_ms,
                ttl_ms,
                grants: grants.into_iter().map(fence_of).collect(),
                max_clock_drift_ppm,
            }),
            KeepAlive::NotFound => Ok(LeaseKeepAliveResponse {
                header,
                lease: lease.0,
                max_clock_drift_ppm,
                ..LeaseKeepAliveResponse::default()
            }),
            KeepAlive::NotReady => Err(Status::unavailable(
                "the leader has not yet applied an entry of its term; retry shortly",
            )),
            KeepAlive::Unconfirmed => Err(Status::unavailable(
                "no quorum confirmed this node's leadership in time; it may have been deposed: try another node",
            )),
        }
    }
}

/// A held grant as the fence a write under it would carry.
fn fence_of(grant: HeldGrant) -> Fence {
    let kind = match grant.kind {
        Kind::Lock => fence::Kind::Lock,
        Kind::Election => fence::Kind::Election,
    };
    Fence {
        name: grant.name,
        token: grant.token.0,
        kind: kind.into(),
    }
}
