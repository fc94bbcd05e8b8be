//! The Auth service: logging in, and the users, roles and switch that
//! `crate::auth` keeps. Changes go through Raft; passwords are hashed here,
//! off the async runtime, before proposing.

use tonic::{Request, Response, Status};

use latchkey_proto::state::v1::{
    auth_change, AuthChange, AuthDisable, AuthRolePermission, AuthUser, AuthUserRole,
};
use latchkey_proto::v1::auth_server::Auth;
use latchkey_proto::v1::{
    AuthChangeResponse, AuthDisableRequest, AuthDisableResponse, AuthEnableRequest,
    AuthEnableResponse, AuthStatusRequest, AuthStatusResponse, AuthenticateRequest,
    AuthenticateResponse, RoleAddRequest, RoleDeleteRequest, RoleInfo, RoleListRequest,
    RoleListResponse, RolePermissionRequest, UserAddRequest, UserChangePasswordRequest,
    UserDeleteRequest, UserInfo, UserListRequest, UserListResponse, UserRoleRequest,
};

use super::{header_at, Api};
use crate::auth::{password, validate_name, MAX_PASSWORD_BYTES};
use crate::error::RequestError;

/// Bytes of the HMAC key drawn when authentication is enabled.
const TOKEN_KEY_BYTES: usize = 32;

impl Api {
    /// Refuses unless the caller may change users and roles: anyone while
    /// authentication is off, an admin once it is on.
    fn require_admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.identify(request)?.require_admin()
    }

    async fn propose_auth(
        &self,
        change: auth_change::Change,
    ) -> Result<AuthChangeResponse, Status> {
        let command = latchkey_proto::state::v1::command::Command::AuthChange(AuthChange {
            change: Some(change),
        });
        let (applied, _) = self.propose_once(command, None).await?;
        Ok(AuthChangeResponse {
            header: Some(header_at(self, &applied)),
        })
    }

    fn invalid(&self, field: &'static str, reason: String) -> Status {
        self.status(RequestError::InvalidArgument { field, reason })
    }

    fn check_auth_name(&self, field: &'static str, what: &str, name: &str) -> Result<(), Status> {
        validate_name(what, name).map_err(|reason| self.invalid(field, reason))
    }

    /// Hashes `password` on a blocking thread (argon2 is slow on purpose).
    async fn hash_password(&self, password: String) -> Result<String, Status> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(self.invalid(
                "password",
                format!("is longer than {MAX_PASSWORD_BYTES} bytes"),
            ));
        }
        if password.is_empty() {
            // A user that can only authenticate with a certificate.
            return Ok(String::new());
        }
        tokio::task::spawn_blocking(move || password::hash(&password))
            .await
            .map_err(|e| Status::internal(format!("hashing failed: {e}")))?
            .map_err(Status::internal)
    }
}

impl Api {
    /// Grants or revokes (`change`) a role of a user.
    async fn change_user_role(
        &self,
        request: Request<UserRoleRequest>,
        change: fn(AuthUserRole) -> auth_change::Change,
    ) -> Result<Response<AuthChangeResponse>, Status> {
        self.require_admin(&request)?;
        let UserRoleRequest { user, role } = request.into_inner();
        self.check_auth_name("user", "user", &user)?;
        self.check_auth_name("role", "role", &role)?;
        let change = change(AuthUserRole { user, role });
        Ok(Response::new(self.propose_auth(change).await?))
    }

    /// Grants or revokes (`change`) a permission of a role.
    async fn change_role_permission(
        &self,
        request: Request<RolePermissionRequest>,
        change: fn(AuthRolePermission) -> auth_change::Change,
    ) -> Result<Response<AuthChangeResponse>, Status> {
        self.require_admin(&request)?;
        let RolePermissionRequest { role, permission } = request.into_inner();
        self.check_auth_name("role", "role", &role)?;
        let change = change(AuthRolePermission { role, permission });
        Ok(Response::new(self.propose_auth(change).await?))
    }
}

#[tonic::async_trait]
impl Auth for Api {
    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let peer = request.remote_addr();
        let AuthenticateRequest { user, password } = request.into_inner();
        self.check_auth_name("user", "user", &user)?;
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(self.invalid(
                "password",
                format!("is longer than {MAX_PASSWORD_BYTES} bytes"),
            ));
        }
        let auth = self.auth.clone();
        let (token, ttl) = tokio::task::spawn_blocking(move || auth.login(&user, &password, peer))
            .await
            .map_err(|e| Status::internal(format!("login failed: {e}")))??;
        Ok(Response::new(AuthenticateResponse {
            header: Some(self.header()),
            token,
            ttl_seconds: ttl.as_secs(),
        }))
    }

    async fn enable(
        &self,
        request: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        self.require_admin(&request)?;
        let mut key = vec![0u8; TOKEN_KEY_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
        let answer = self.propose_auth(auth_change::Change::Enable(key)).await?;
        Ok(Response::new(AuthEnableResponse {
            header: answer.header,
        }))
    }

    async fn disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        self.require_admin(&request)?;
        let answer = self
            .propose_auth(auth_change::Change::Disable(AuthDisable {}))
            .await?;
        Ok(Response::new(AuthDisableResponse {
            header: answer.header,
        }))
    }

    async fn status(
        &self,
        request: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        let identity = self.identify(&request)?;
        Ok(Response::new(AuthStatusResponse {
            header: Some(self.header()),
            enabled: self.auth.enabled(),
            user: identity.name().unwrap_or_default().to_string(),
        }))
    }

    async fn user_add(
        &self,
        request: Request<UserAddRequest>,
    ) -> Result<Response<AuthChangeResponse>, Status> {
        self.require_admin(&request)?;
        let UserAddRequest { name, password } = request.into_inner();
        self.check_auth_name("name", "user", &name)?;
        let password_hash = self.hash_password(password).await?;
        let user = AuthUser {
            name,
            password_hash,
            replace: false,
        };
        Ok(Response::new(
            self.propose_auth(auth_change::Change::PutUser(user))
                .await?,
        ))
    }

    async fn user_delete(
        &self,
        request: Request<UserDeleteRequest>,
    ) -> Result<Response<AuthChangeResponse>, Status> {
        self.require_admin(&request)?;
        let name = request.into_inner().name;
        self.check_auth_name("name", "user", &name)?;
        Ok(Response::new(
            self.propose_auth(auth_change::Change::DeleteUser(name))
                .await?,
        ))
    }

    async fn user_change_password(
        &self,
        request: Request<UserChangePasswordRequest>,
    ) -> Result<Response<AuthChangeResponse>, Status> {
        self.require_admin(&request)?;
        let UserChangePasswordRequest { name, password } = request.into_inner();
        self.check_auth_name("name", "user", &name)?;
        let password_hash = self.hash_password(password).await?;
        let user = AuthUser {
            name,
            password_hash,
            replace: true,
        };
        Ok(Response::new(
            self.propose_auth(auth_change::Change::PutUser(user))
                .await?,
        ))
    }

    async fn user_grant_role(
        &self,
        request: Request<UserRoleRequest>,
    ) -> Result<Response<AuthChangeResponse>, Status> {
        self.change_user_role(request, auth_change::Change::GrantRole)
            .await
    }

    async fn user_revoke_role(
        &self,
        request: Request<UserRoleRequest>,
    ) -> Result<Response<AuthChangeResponse>, Status> {
        self.change_user_role(request, auth_change::Change::RevokeRole)
            .await
    }

    async fn user_list(
        &self,
        request: Request<UserListRequest>,
    ) -> Result<Response<UserListResponse>, Status> {
        self.require_admin(&request)?;
        self.read_point(false).await?;
        let header = self.header();
        let auth = self.reader.auth();
        let auth = auth.read();
        let users = auth
            .users()
            .iter()
            .map(|(name, record)| UserInfo {
                name: name.clone(),
                roles: record.roles.clone(),
                has_password: !record.password_hash.is_empty(),
            })
            .collect();
        Ok(Response::new(UserListResponse {
            header: Some(header),
            users,
        }))
    }

    async fn role_add(
        &self,
        request: Request<RoleAddRequest>,
    ) -> Result<Response<AuthChangeResponse>, Status> {
        self.require_admin(&request)?;
        let name = request.into_inner().name;
        self.check_auth_name("name", "role", &name)?;
        Ok(Response::new(
            self.propose_auth(auth_change::Change::AddRole(name))
                .await?,
        ))
    }

    async fn role_delete(
        &self,
        request: Request<RoleDeleteRequest>,
    ) -> Result<Response<AuthChangeResponse>, Status> {
        self.require_admin(&request)?;
        let name = request.into_inner().name;
        self.check_auth_name("name", "role", &name)?;
        Ok(Response::new(
            self.propose_auth(auth_change::Change::DeleteRole(name))
                .await?,
        ))
    }

    async fn role_grant_permission(
        &self,
        request: Request<RolePermissionRequest>,
    ) -> Result<Response<AuthChangeResponse>, Status> {
        self.change_role_permission(request, auth_change::Change::GrantPermission)
            .await
    }

    async fn role_revoke_permission(
        &self,
        request: Request<RolePermissionRequest>,
    ) -> Result<Response<AuthChangeResponse>, Status> {
        self.change_role_permission(request, auth_change::Change::RevokePermission)
            .await
    }

    async fn role_list(
        &self,
        request: Request<RoleListRequest>,
    ) -> Result<Response<RoleListResponse>, Status> {
        self.require_admin(&request)?;
        self.read_point(false).await?;
        let header = self.header();
        let auth = self.reader.auth();
        let auth = auth.read();
        let roles = auth
            .roles()
            .iter()
            .map(|(name, record)| RoleInfo {
                name: name.clone(),
                permissions: record.permissions.clone(),
            })
            .collect();
        Ok(Response::new(RoleListResponse {
            header: Some(header),
            roles,
        }))
    }
}
