//! The Session service: opening and closing exactly-once sessions. Both go
//! through Raft; see `crate::coordination::sessions` for what a session
//! remembers and when it expires.

use tonic::{Request, Response, Status};

use latchkey_proto::state::v1::{command, command_result, CloseSession, OpenSession};
use latchkey_proto::v1::session_server::Session;
use latchkey_proto::v1::{
    SessionCloseRequest, SessionCloseResponse, SessionOpenRequest, SessionOpenResponse,
};

use super::{header_at, Api};
use crate::error::RequestError;

#[tonic::async_trait]
impl Session for Api {
    async fn open(
        &self,
        request: Request<SessionOpenRequest>,
    ) -> Result<Response<SessionOpenResponse>, Status> {
        self.identify(&request)?;
        let (applied, result) = self
            .propose_once(command::Command::OpenSession(OpenSession {}), None)
            .await?;
        let command_result::Result::SessionOpened(opened) = result else {
            return Err(Status::internal("open produced another command's result"));
        };
        Ok(Response::new(SessionOpenResponse {
            header: Some(header_at(self, &applied)),
            session: opened.session,
            idle_timeout_ms: self.settings.session_idle_timeout_ms,
        }))
    }

    async fn close(
        &self,
        request: Request<SessionCloseRequest>,
    ) -> Result<Response<SessionCloseResponse>, Status> {
        self.identify(&request)?;
        let SessionCloseRequest { session } = request.into_inner();
        if session == 0 {
            return Err(self.status(RequestError::InvalidArgument {
                field: "session",
                reason: "0 names no session".into(),
            }));
        }
        let (applied, _) = self
            .propose_once(
                command::Command::CloseSession(CloseSession { session }),
                None,
            )
            .await?;
        Ok(Response::new(SessionCloseResponse {
            header: Some(header_at(self, &applied)),
        }))
    }
}
