//! The Election service: a lock whose holder publishes a value.

use std::pin::Pin;

use latchkey_proto::v1::PermissionKind;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use latchkey_proto::state::v1::{command, Proclaim};
use latchkey_proto::v1::election_server::Election;
use latchkey_proto::v1::{
    CampaignRequest, CampaignResponse, LeaderRequest, LeaderResponse, ObserveRequest,
    ProclaimRequest, ProclaimResponse, ResignRequest, ResignResponse,
};

use super::{header_at, Api};
use crate::coordination::{validate_value, Event, Kind, LeaseId};
use crate::state_machine::grant_proto;

/// Leader changes buffered per observer before it is considered lagging.
const OBSERVE_BUFFER: usize = 64;

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for Api {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let identity = self.require(&request, PermissionKind::Elect, &request.get_ref().name)?;
        let CampaignRequest {
            name,
            lease,
            value,
            request,
        } = request.into_inner();
        let (header, leadership) = self
            .acquire_grant(
                Kind::Election,
                name,
                LeaseId(lease),
                true,
                value,
                super::lock::Asker {
                    request,
                    caller: super::owner_check(&identity),
                },
            )
            .await?;
        Ok(Response::new(CampaignResponse {
            header: Some(header),
            leadership: Some(leadership),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        self.require(&request, PermissionKind::Elect, &request.get_ref().name)?;
        let ProclaimRequest {
            name,
            token,
            value,
            request,
        } = request.into_inner();
        self.check_name(&name)?;
        validate_value(Kind::Election, &value).map_err(|e| super::refusal(&name, e))?;
        let proclaim = Proclaim { name, token, value };
        let (applied, _) = self
            .propose_once(command::Command::Proclaim(proclaim), request)
            .await?;
        Ok(Response::new(ProclaimResponse {
            header: Some(header_at(self, &applied)),
        }))
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        self.require(&request, PermissionKind::Elect, &request.get_ref().name)?;
        let LeaderRequest { name, serializable } = request.into_inner();
        self.check_name(&name)?;
        self.read_point(serializable).await?;
        Ok(Response::new(self.current_leader(&name)))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        request: Request<ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        self.require(&request, PermissionKind::Elect, &request.get_ref().name)?;
        let ObserveRequest { name } = request.into_inner();
        self.check_name(&name)?;
        let mut events = self.node.subscribe();
        self.read_point(false).await?;
        let (tx, rx) = mpsc::channel(OBSERVE_BUFFER);
        let api = self.clone();
        tokio::spawn(async move {
            let mut last = api.current_leader(&name);
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            let stopping = api.stopping();
            tokio::pin!(stopping);
            loop {
                let received = tokio::select! {
                    received = events.recv() => received,
                    () = &mut stopping => {
                        let _ = tx.send(Err(Status::unavailable("the node is shutting down"))).await;
                        return;
                    }
                };
                let next = match received {
                    Ok(applied) => applied.events.iter().rev().find_map(|event| match event {
                        Event::LeaderChanged { name: n, .. } if *n == name => {
                            Some(api.current_leader(&name))
                        }
                        _ => None,
                    }),
                    Err(RecvError::Lagged(_)) => Some(api.current_leader(&name)),
                    Err(RecvError::Closed) => return,
                };
                let Some(next) = next else { continue };
                if next.leader == last.leader {
                    continue;
                }
                last = next.clone();
                if tx.send(Ok(next)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        self.require(&request, PermissionKind::Elect, &request.get_ref().name)?;
        let ResignRequest {
            name,
            token,
            request,
        } = request.into_inner();
        let header = self
            .release_grant(Kind::Election, name, token, request)
            .await?;
        Ok(Response::new(ResignResponse {
            header: Some(header),
        }))
    }
}

impl Api {
    fn current_leader(&self, name: &str) -> LeaderResponse {
        let header = self.header();
        let state = self.reader.coordination();
        LeaderResponse {
            header: Some(header),
            leader: state
                .describe(Kind::Election, name)
                .map(|lock| grant_proto(name, &lock.holder)),
        }
    }
}
