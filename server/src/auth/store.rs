//! The replicated users, roles and switch, and how `AuthChange` commands
//! change them.
//!
//! Records (values are protobuf, framed by the storage layer):
//! - `a/meta` → `AuthMetaRecord`: enabled, token key, index of enabling;
//! - `a/user/<name>` → `AuthUserRecord`: password hash, roles, generation;
//! - `a/role/<name>` → `AuthRoleRecord`: permissions.
//!
//! Every change is checked first and refused whole ([`AuthError`]), so a
//! refused change writes nothing. A change that would leave authentication
//! on with no user holding the admin permission is refused: nobody can lock
//! the cluster against every administrator.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use parking_lot::RwLock;
use prost::Message as _;

use latchkey_proto::state::v1::{
    auth_change, AuthChange, AuthMetaRecord, AuthRoleRecord, AuthUserRecord,
};
use latchkey_proto::v1::{Permission, PermissionKind};

use crate::storage::keys::AUTH_PREFIX;

/// The stored key of the switch.
pub const META_KEY: &[u8] = b"a/meta";
const USER_PREFIX: &[u8] = b"a/user/";
const ROLE_PREFIX: &[u8] = b"a/role/";
/// Most users, and most roles, the cluster keeps.
pub const MAX_USERS: usize = 10_000;
pub const MAX_ROLES: usize = 10_000;
/// Most permissions one role holds.
pub const MAX_PERMISSIONS_PER_ROLE: usize = 1_000;

/// Shared, read-mostly auth state; written only by the node task.
pub type SharedAuth = Arc<RwLock<AuthState>>;

/// Why a change was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
}

impl AuthError {
    pub fn code(&self) -> tonic::Code {
        match self {
            AuthError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            AuthError::NotFound(_) => tonic::Code::NotFound,
            AuthError::AlreadyExists(_) => tonic::Code::AlreadyExists,
            AuthError::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            AuthError::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
        }
    }
}

/// Users, roles and the switch, as of the applied index.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthState {
    meta: AuthMetaRecord,
    users: BTreeMap<String, AuthUserRecord>,
    roles: BTreeMap<String, AuthRoleRecord>,
}

/// Record changes of one applied change: `None` deletes the key.
pub type Changes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

impl AuthState {
    /// Rebuilds the state from its records (any order). A record that does
    /// not decode is refused with its key and the reason.
    pub fn load(
        records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<AuthState, (Vec<u8>, String)> {
        let mut state = AuthState::default();
        for (key, value) in records {
            state
                .load_record(&key, &value)
                .map_err(|reason| (key, reason))?;
        }
        Ok(state)
    }

    fn load_record(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        let name = |name: &[u8]| String::from_utf8(name.to_vec()).map_err(|e| e.to_string());
        if key == META_KEY {
            self.meta = AuthMetaRecord::decode(value).map_err(|e| e.to_string())?;
        } else if let Some(user) = key.strip_prefix(USER_PREFIX) {
            let record = AuthUserRecord::decode(value).map_err(|e| e.to_string())?;
            self.users.insert(name(user)?, record);
        } else if let Some(role) = key.strip_prefix(ROLE_PREFIX) {
            let record = AuthRoleRecord::decode(value).map_err(|e| e.to_string())?;
            self.roles.insert(name(role)?, record);
        } else if key.starts_with(AUTH_PREFIX) {
            return Err("not an auth record".into());
        }
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.meta.enabled
    }

    /// The HMAC key of tokens, and the index that set it.
    pub fn token_key(&self) -> (&[u8], u64) {
        (&self.meta.token_key, self.meta.enabled_index)
    }

    pub fn user(&self, name: &str) -> Option<&AuthUserRecord> {
        self.users.get(name)
    }

    pub fn users(&self) -> &BTreeMap<String, AuthUserRecord> {
        &self.users
    }

    pub fn roles(&self) -> &BTreeMap<String, AuthRoleRecord> {
        &self.roles
    }

    /// Every permission `user` holds through its roles.
    pub fn permissions(&self, user: &str) -> Vec<Permission> {
        let Some(record) = self.users.get(user) else {
            return Vec::new();
        };
        record
            .roles
            .iter()
            .filter_map(|role| self.roles.get(role))
            .flat_map(|role| role.permissions.iter().cloned())
            .collect()
    }

    /// Whether `user` holds the admin permission.
    pub fn is_admin(&self, user: &str) -> bool {
        self.permissions(user)
            .iter()
            .any(|p| p.kind == PermissionKind::Admin as i32)
    }

    fn any_admin(&self) -> bool {
        self.users.keys().any(|user| self.is_admin(user))
    }

    /// Applies one change at `index`, or refuses it whole.
    pub fn apply(&mut self, index: u64, change: AuthChange) -> Result<Changes, AuthError> {
        let Some(change) = change.change else {
            return Err(AuthError::InvalidArgument("empty auth change".into()));
        };
        let mut next = self.clone();
        let mut touched = BTreeSet::new();
        next.change(index, change, &mut touched)?;
        if next.meta.enabled && !next.any_admin() {
            return Err(AuthError::FailedPrecondition(
                "authentication is on and this would leave no user with the admin permission; grant admin to another user first".into(),
            ));
        }
        let changes = touched.into_iter().map(|key| next.render(key)).collect();
        *self = next;
        Ok(changes)
    }

    fn change(
        &mut self,
        index: u64,
        change: auth_change::Change,
        touched: &mut BTreeSet<Touched>,
    ) -> Result<(), AuthError> {
        use auth_change::Change;
        match change {
            Change::Enable(token_key) => {
                if token_key.len() < 32 {
                    return Err(AuthError::InvalidArgument(
                        "token key shorter than 32 bytes".into(),
                    ));
                }
                if !self.any_admin() {
                    return Err(AuthError::FailedPrecondition(
                        "no user holds the admin permission; add one before enabling authentication (see docs/security.md)".into(),
                    ));
                }
                if self.meta.enabled {
                    return Ok(());
                }
                self.meta = AuthMetaRecord {
                    enabled: true,
                    token_key,
                    enabled_index: index,
                };
                touched.insert(Touched::Meta);
            }
            Change::Disable(_) => {
                if self.meta.enabled {
                    self.meta.enabled = false;
                    self.meta.token_key.clear();
                    touched.insert(Touched::Meta);
                }
            }
            Change::PutUser(user) => {
                valid("user", &user.name)?;
                match (self.users.get_mut(&user.name), user.replace) {
                    (Some(_), false) => {
                        return Err(AuthError::AlreadyExists(format!(
                            "user {:?} exists",
                            user.name
                        )))
                    }
                    (None, true) => return Err(not_found("user", &user.name)),
                    (Some(record), true) => {
                        record.password_hash = user.password_hash;
                        record.generation = index;
                    }
                    (None, false) => {
                        if self.users.len() >= MAX_USERS {
                            return Err(AuthError::ResourceExhausted(format!(
                                "at most {MAX_USERS} users"
                            )));
                        }
                        let record = AuthUserRecord {
                            password_hash: user.password_hash,
                            roles: Vec::new(),
                            generation: index,
                        };
                        self.users.insert(user.name.clone(), record);
                    }
                }
                touched.insert(Touched::User(user.name));
            }
            Change::DeleteUser(name) => {
                self.users
                    .remove(&name)
                    .ok_or_else(|| not_found("user", &name))?;
                touched.insert(Touched::User(name));
            }
            Change::GrantRole(grant) => {
                if !self.roles.contains_key(&grant.role) {
                    return Err(not_found("role", &grant.role));
                }
                let user = self
                    .users
                    .get_mut(&grant.user)
                    .ok_or_else(|| not_found("user", &grant.user))?;
                if !user.roles.contains(&grant.role) {
                    user.roles.push(grant.role);
                    user.roles.sort();
                    touched.insert(Touched::User(grant.user));
                }
            }
            Change::RevokeRole(revoke) => {
                let user = self
                    .users
                    .get_mut(&revoke.user)
                    .ok_or_else(|| not_found("user", &revoke.user))?;
                let before = user.roles.len();
                user.roles.retain(|role| *role != revoke.role);
                if user.roles.len() == before {
                    return Err(AuthError::NotFound(format!(
                        "user {:?} does not have role {:?}",
                        revoke.user, revoke.role
                    )));
                }
                touched.insert(Touched::User(revoke.user));
            }
            Change::AddRole(name) => {
                valid("role", &name)?;
                if self.roles.contains_key(&name) {
                    return Err(AuthError::AlreadyExists(format!("role {name:?} exists")));
                }
                if self.roles.len() >= MAX_ROLES {
                    return Err(AuthError::ResourceExhausted(format!(
                        "at most {MAX_ROLES} roles"
                    )));
                }
                self.roles.insert(name.clone(), AuthRoleRecord::default());
                touched.insert(Touched::Role(name));
            }
            Change::DeleteRole(name) => {
                self.roles
                    .remove(&name)
                    .ok_or_else(|| not_found("role", &name))?;
                for (user, record) in self.users.iter_mut() {
                    if record.roles.contains(&name) {
                        record.roles.retain(|role| *role != name);
                        touched.insert(Touched::User(user.clone()));
                    }
                }
                touched.insert(Touched::Role(name));
            }
            Change::GrantPermission(grant) => {
                let permission = valid_permission(grant.permission)?;
                let role = self
                    .roles
                    .get_mut(&grant.role)
                    .ok_or_else(|| not_found("role", &grant.role))?;
                if !role.permissions.contains(&permission) {
                    if role.permissions.len() >= MAX_PERMISSIONS_PER_ROLE {
                        return Err(AuthError::ResourceExhausted(format!(
                            "at most {MAX_PERMISSIONS_PER_ROLE} permissions per role"
                        )));
                    }
                    role.permissions.push(permission);
                    touched.insert(Touched::Role(grant.role));
                }
            }
            Change::RevokePermission(revoke) => {
                let permission = valid_permission(revoke.permission)?;
                let role = self
                    .roles
                    .get_mut(&revoke.role)
                    .ok_or_else(|| not_found("role", &revoke.role))?;
                let before = role.permissions.len();
                role.permissions.retain(|p| *p != permission);
                if role.permissions.len() == before {
                    return Err(AuthError::NotFound(format!(
                        "role {:?} does not have that permission",
                        revoke.role
                    )));
                }
                touched.insert(Touched::Role(revoke.role));
            }
        }
        Ok(())
    }

    fn render(&self, touched: Touched) -> (Vec<u8>, Option<Vec<u8>>) {
        match touched {
            Touched::Meta => (META_KEY.to_vec(), Some(self.meta.encode_to_vec())),
            Touched::User(name) => (
                [USER_PREFIX, name.as_bytes()].concat(),
                self.users.get(&name).map(|u| u.encode_to_vec()),
            ),
            Touched::Role(name) => (
                [ROLE_PREFIX, name.as_bytes()].concat(),
                self.roles.get(&name).map(|r| r.encode_to_vec()),
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Touched {
    Meta,
    User(String),
    Role(String),
}

fn valid(what: &str, name: &str) -> Result<(), AuthError> {
    super::validate_name(what, name).map_err(AuthError::InvalidArgument)
}

fn not_found(what: &str, name: &str) -> AuthError {
    AuthError::NotFound(format!("{what} {name:?} does not exist"))
}

fn valid_permission(permission: Option<Permission>) -> Result<Permission, AuthError> {
    let permission =
        permission.ok_or_else(|| AuthError::InvalidArgument("no permission given".into()))?;
    match PermissionKind::try_from(permission.kind) {
        Ok(PermissionKind::Unspecified) | Err(_) => Err(AuthError::InvalidArgument(format!(
            "unknown permission kind {}",
            permission.kind
        ))),
        Ok(_) if permission.prefix.len() > crate::state_machine::MAX_KEY_BYTES => Err(
            AuthError::InvalidArgument("permission prefix is longer than a key may be".into()),
        ),
        Ok(_) => Ok(permission),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use latchkey_proto::state::v1::{AuthRolePermission, AuthUser, AuthUserRole};

    fn change(change: auth_change::Change) -> AuthChange {
        AuthChange {
            change: Some(change),
        }
    }

    /// User and role root, with the admin permission, at indexes 1 to 4;
    /// the records each change wrote.
    fn admin_setup(state: &mut AuthState) -> Vec<Changes> {
        use auth_change::Change;
        let admin = Permission {
            kind: PermissionKind::Admin as i32,
            prefix: String::new(),
        };
        let changes = [
            Change::PutUser(AuthUser {
                name: "root".into(),
                password_hash: "h".into(),
                replace: false,
            }),
            Change::AddRole("root".into()),
            Change::GrantPermission(AuthRolePermission {
                role: "root".into(),
                permission: Some(admin),
            }),
            Change::GrantRole(AuthUserRole {
                user: "root".into(),
                role: "root".into(),
            }),
        ];
        changes
            .into_iter()
            .zip(1..)
            .map(|(one, index)| state.apply(index, change(one)).unwrap())
            .collect()
    }

    #[test]
    fn enabling_needs_an_admin_and_nothing_may_remove_the_last_one() {
        use auth_change::Change;
        let mut state = AuthState::default();
        let err = state
            .apply(1, change(Change::Enable(vec![7; 32])))
            .unwrap_err();
        assert!(matches!(err, AuthError::FailedPrecondition(_)), "{err}");
        assert!(!state.enabled());
        admin_setup(&mut state);
        state.apply(5, change(Change::Enable(vec![7; 32]))).unwrap();
        assert!(state.enabled());
        let before = state.clone();
        for refused in [
            Change::DeleteUser("root".into()),
            Change::DeleteRole("root".into()),
            Change::RevokeRole(AuthUserRole {
                user: "root".into(),
                role: "root".into(),
            }),
        ] {
            let err = state.apply(6, change(refused)).unwrap_err();
            assert!(matches!(err, AuthError::FailedPrecondition(_)), "{err}");
            assert_eq!(state, before, "a refused change changes nothing");
        }
        state
            .apply(7, change(Change::Disable(Default::default())))
            .unwrap();
        state
            .apply(8, change(Change::DeleteUser("root".into())))
            .unwrap();
    }

    #[test]
    fn records_round_trip_through_load() {
        let mut state = AuthState::default();
        let mut records = BTreeMap::new();
        let mut record = |changes: Changes| {
            for (key, value) in changes {
                match value {
                    Some(value) => records.insert(key, value),
                    None => records.remove(&key),
                };
            }
        };
        for changes in admin_setup(&mut state) {
            record(changes);
        }
        use auth_change::Change;
        record(state.apply(5, change(Change::Enable(vec![1; 32]))).unwrap());
        record(
            state
                .apply(6, change(Change::AddRole("gone".into())))
                .unwrap(),
        );
        record(
            state
                .apply(7, change(Change::DeleteRole("gone".into())))
                .unwrap(),
        );
        let loaded = AuthState::load(records).unwrap();
        assert_eq!(loaded, state);
        assert!(loaded.is_admin("root"));
    }

    #[test]
    fn bad_names_and_permissions_are_refused() {
        use auth_change::Change;
        let mut state = AuthState::default();
        for name in ["", " x", "a\nb", &"n".repeat(200)] {
            assert!(state
                .apply(1, change(Change::AddRole(name.to_string())))
                .is_err());
        }
        state.apply(1, change(Change::AddRole("r".into()))).unwrap();
        let bad = Permission {
            kind: 99,
            prefix: String::new(),
        };
        let err = state
            .apply(
                2,
                change(Change::GrantPermission(AuthRolePermission {
                    role: "r".into(),
                    permission: Some(bad),
                })),
            )
            .unwrap_err();
        assert!(matches!(err, AuthError::InvalidArgument(_)), "{err}");
    }
}
