//! Users, roles and permissions: the cluster's `Auth` service.
//!
//! Every change needs the admin permission once authentication is on.
//! Changes go through Raft like any write; a change whose answer was lost
//! is resent, so adding a user that the first attempt already added
//! answers "exists".

use latchkey_proto::v1::auth_client::AuthClient;
use latchkey_proto::v1::{
    AuthDisableRequest, AuthEnableRequest, AuthStatusRequest, AuthenticateRequest, RoleAddRequest,
    RoleDeleteRequest, RoleListRequest, RolePermissionRequest, UserAddRequest,
    UserChangePasswordRequest, UserDeleteRequest, UserListRequest, UserRoleRequest,
};

pub use latchkey_proto::v1::{Permission, PermissionKind, RoleInfo, UserInfo};

use crate::client::{CallSpec, Client};
use crate::Error;

/// Whether authentication is on, and who the cluster takes this client for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthStatus {
    pub enabled: bool,
    /// Empty when anonymous.
    pub user: String,
}

/// Runs one call of the `Auth` service as a write (to the leader, retried).
macro_rules! auth_call {
    ($client:expr, $method:ident, $request:expr) => {{
        let inner = &$client.inner;
        let request = $request;
        inner
            .call(CallSpec::write(&inner.options), |channel| {
                let request = request.clone();
                async move { AuthClient::new(channel).$method(request).await }
            })
            .await
    }};
}

impl Client {
    /// Exchanges a user name and password for a bearer token; returns the
    /// token and its lifetime in seconds.
    pub async fn authenticate(&self, user: &str, password: &str) -> Result<(String, u64), Error> {
        let request = AuthenticateRequest {
            user: user.to_string(),
            password: password.to_string(),
        };
        let answer = auth_call!(self, authenticate, request)?;
        Ok((answer.token, answer.ttl_seconds))
    }

    pub async fn auth_status(&self) -> Result<AuthStatus, Error> {
        let answer = auth_call!(self, status, AuthStatusRequest {})?;
        Ok(AuthStatus {
            enabled: answer.enabled,
            user: answer.user,
        })
    }

    /// Turns authentication on; refused unless some user holds the admin permission.
    pub async fn auth_enable(&self) -> Result<(), Error> {
        auth_call!(self, enable, AuthEnableRequest {}).map(|_| ())
    }

    pub async fn auth_disable(&self) -> Result<(), Error> {
        auth_call!(self, disable, AuthDisableRequest {}).map(|_| ())
    }

    /// Adds a user; an empty password makes a user that can only log in
    /// with a client certificate.
    pub async fn user_add(&self, name: &str, password: &str) -> Result<(), Error> {
        let request = UserAddRequest {
            name: name.to_string(),
            password: password.to_string(),
        };
        auth_call!(self, user_add, request).map(|_| ())
    }

    pub async fn user_delete(&self, name: &str) -> Result<(), Error> {
        let request = UserDeleteRequest {
            name: name.to_string(),
        };
        auth_call!(self, user_delete, request).map(|_| ())
    }

    /// Sets a new password; the user's earlier tokens stop working.
    pub async fn user_change_password(&self, name: &str, password: &str) -> Result<(), Error> {
        let request = UserChangePasswordRequest {
            name: name.to_string(),
            password: password.to_string(),
        };
        auth_call!(self, user_change_password, request).map(|_| ())
    }

    pub async fn user_grant_role(&self, user: &str, role: &str) -> Result<(), Error> {
        auth_call!(self, user_grant_role, user_role(user, role)).map(|_| ())
    }

    pub async fn user_revoke_role(&self, user: &str, role: &str) -> Result<(), Error> {
        auth_call!(self, user_revoke_role, user_role(user, role)).map(|_| ())
    }

    pub async fn users(&self) -> Result<Vec<UserInfo>, Error> {
        Ok(auth_call!(self, user_list, UserListRequest {})?.users)
    }

    pub async fn role_add(&self, name: &str) -> Result<(), Error> {
        let request = RoleAddRequest {
            name: name.to_string(),
        };
        auth_call!(self, role_add, request).map(|_| ())
    }

    pub async fn role_delete(&self, name: &str) -> Result<(), Error> {
        let request = RoleDeleteRequest {
            name: name.to_string(),
        };
        auth_call!(self, role_delete, request).map(|_| ())
    }

    /// Grants `kind` on names starting with `prefix` to `role`.
    pub async fn role_grant(
        &self,
        role: &str,
        kind: PermissionKind,
        prefix: &str,
    ) -> Result<(), Error> {
        let request = role_permission(role, kind, prefix);
        auth_call!(self, role_grant_permission, request).map(|_| ())
    }

    /// Takes back a permission [`Client::role_grant`] granted.
    pub async fn role_revoke(
        &self,
        role: &str,
        kind: PermissionKind,
        prefix: &str,
    ) -> Result<(), Error> {
        let request = role_permission(role, kind, prefix);
        auth_call!(self, role_revoke_permission, request).map(|_| ())
    }

    pub async fn roles(&self) -> Result<Vec<RoleInfo>, Error> {
        Ok(auth_call!(self, role_list, RoleListRequest {})?.roles)
    }
}

fn user_role(user: &str, role: &str) -> UserRoleRequest {
    UserRoleRequest {
        user: user.to_string(),
        role: role.to_string(),
    }
}

fn role_permission(role: &str, kind: PermissionKind, prefix: &str) -> RolePermissionRequest {
    RolePermissionRequest {
        role: role.to_string(),
        permission: Some(Permission {
            kind: kind as i32,
            prefix: prefix.to_string(),
        }),
    }
}
