//! `latchkey auth enable|disable|status|login`, `latchkey user …` and
//! `latchkey role …`: users, roles and permissions, through
//! `latchkey-client`. Every change needs the admin permission once
//! authentication is on (see `docs/security.md`).

use latchkey_client::auth::{Permission, PermissionKind};
use serde::Serialize;

use super::session::{connect_once, failure, ClientArgs};
use super::{write_json, write_stdout, Failure, EXIT_OK};

/// Flags of `latchkey auth`.
#[derive(clap::Args, Debug)]
pub struct AuthArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: AuthCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AuthCommand {
    /// Turn authentication on (a user with the admin permission must exist).
    Enable,
    /// Turn authentication off: every request is allowed again.
    Disable,
    /// Whether authentication is on, and who the cluster takes you for.
    Status,
    /// Exchange --user and --password for a bearer token; prints the token.
    Login,
}

/// Flags of `latchkey user`.
#[derive(clap::Args, Debug)]
pub struct UserArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: UserCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum UserCommand {
    /// Add a user. Without --new-password the user can only authenticate
    /// with a client certificate whose common name is NAME.
    Add {
        name: String,
        #[arg(long, env = "LATCHKEY_NEW_PASSWORD", hide_env_values = true)]
        new_password: Option<String>,
    },
    /// Delete a user; its tokens stop working.
    #[command(alias = "delete")]
    Del { name: String },
    /// Set a user's password; its earlier tokens stop working.
    Passwd {
        name: String,
        #[arg(long, env = "LATCHKEY_NEW_PASSWORD", hide_env_values = true)]
        new_password: String,
    },
    /// Give USER the permissions of ROLE.
    GrantRole { user: String, role: String },
    /// Take ROLE from USER.
    RevokeRole { user: String, role: String },
    /// Every user and its roles.
    List,
}

/// Flags of `latchkey role`.
#[derive(clap::Args, Debug)]
pub struct RoleArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: RoleCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum RoleCommand {
    /// Add an empty role.
    Add { name: String },
    /// Delete a role; its users lose its permissions.
    #[command(alias = "delete")]
    Del { name: String },
    /// Grant PERMISSION (read, write, readwrite, lock, elect, lease, admin)
    /// on names starting with PREFIX (default: every name).
    Grant {
        role: String,
        permission: String,
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Take back a permission granted with `role grant`.
    Revoke {
        role: String,
        permission: String,
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Every role and its permissions.
    List,
}

/// The permission kinds a CLI word names.
pub fn parse_permission(word: &str) -> Result<Vec<PermissionKind>, Failure> {
    let kinds = match word.to_ascii_lowercase().as_str() {
        "read" => vec![PermissionKind::Read],
        "write" => vec![PermissionKind::Write],
        "readwrite" | "read-write" | "rw" => vec![PermissionKind::Read, PermissionKind::Write],
        "lock" => vec![PermissionKind::Lock],
        "elect" | "election" => vec![PermissionKind::Elect],
        "lease" => vec![PermissionKind::Lease],
        "admin" => vec![PermissionKind::Admin],
        _ => {
            return Err(Failure::usage(format!(
            "unknown permission {word:?}; use read, write, readwrite, lock, elect, lease or admin"
        )))
        }
    };
    Ok(kinds)
}

fn permission_word(permission: &Permission) -> &'static str {
    PermissionKind::try_from(permission.kind)
        .map(crate::auth::identity::permission_name)
        .unwrap_or("unknown")
}

#[derive(Serialize)]
struct Done {
    ok: bool,
}

pub(crate) async fn run_auth(args: AuthArgs) -> Result<u8, Failure> {
    let client = connect_once(&args.client).await?;
    let json = args.client.json;
    match args.command {
        AuthCommand::Enable => {
            client.auth_enable().await.map_err(failure)?;
            say(json, "authentication enabled")?;
        }
        AuthCommand::Disable => {
            client.auth_disable().await.map_err(failure)?;
            say(json, "authentication disabled")?;
        }
        AuthCommand::Status => {
            let status = client.auth_status().await.map_err(failure)?;
            if json {
                #[derive(Serialize)]
                struct Out {
                    enabled: bool,
                    user: String,
                }
                write_json(&Out {
                    enabled: status.enabled,
                    user: status.user,
                })?;
            } else {
                let who = if status.user.is_empty() {
                    "anonymous".to_string()
                } else {
                    status.user
                };
                let state = if status.enabled {
                    "enabled"
                } else {
                    "disabled"
                };
                write_stdout(format!("authentication {state}; you are {who}\n").as_bytes())?;
            }
        }
        AuthCommand::Login => {
            let Some((user, password)) = args.client.security.login()? else {
                return Err(Failure::usage("auth login needs --user (and --password)"));
            };
            let (token, ttl) = client
                .authenticate(&user, &password)
                .await
                .map_err(failure)?;
            if json {
                #[derive(Serialize)]
                struct Out {
                    token: String,
                    ttl_seconds: u64,
                }
                write_json(&Out {
                    token,
                    ttl_seconds: ttl,
                })?;
            } else {
                write_stdout(format!("{token}\n").as_bytes())?;
            }
        }
    }
    Ok(EXIT_OK)
}

pub(crate) async fn run_user(args: UserArgs) -> Result<u8, Failure> {
    let client = connect_once(&args.client).await?;
    let json = args.client.json;
    match args.command {
        UserCommand::Add { name, new_password } => {
            client
                .user_add(&name, new_password.as_deref().unwrap_or(""))
                .await
                .map_err(failure)?;
            say(json, &format!("user {name} added"))?;
        }
        UserCommand::Del { name } => {
            client.user_delete(&name).await.map_err(failure)?;
            say(json, &format!("user {name} deleted"))?;
        }
        UserCommand::Passwd { name, new_password } => {
            if new_password.is_empty() {
                return Err(Failure::usage("--new-password must not be empty"));
            }
            client
                .user_change_password(&name, &new_password)
                .await
                .map_err(failure)?;
            say(json, &format!("password of {name} changed"))?;
        }
        UserCommand::GrantRole { user, role } => {
            client
                .user_grant_role(&user, &role)
                .await
                .map_err(failure)?;
            say(json, &format!("role {role} granted to {user}"))?;
        }
        UserCommand::RevokeRole { user, role } => {
            client
                .user_revoke_role(&user, &role)
                .await
                .map_err(failure)?;
            say(json, &format!("role {role} revoked from {user}"))?;
        }
        UserCommand::List => {
            let users = client.users().await.map_err(failure)?;
            if json {
                #[derive(Serialize)]
                struct Out {
                    name: String,
                    roles: Vec<String>,
                    has_password: bool,
                }
                let out: Vec<Out> = users
                    .into_iter()
                    .map(|u| Out {
                        name: u.name,
                        roles: u.roles,
                        has_password: u.has_password,
                    })
                    .collect();
                write_json(&out)?;
            } else {
                let mut text = String::new();
                for user in users {
                    text.push_str(&format!("{}\t{}\n", user.name, user.roles.join(",")));
                }
                write_stdout(text.as_bytes())?;
            }
        }
    }
    Ok(EXIT_OK)
}

pub(crate) async fn run_role(args: RoleArgs) -> Result<u8, Failure> {
    // Bad words are refused before anything is sent.
    if let RoleCommand::Grant { permission, .. } | RoleCommand::Revoke { permission, .. } =
        &args.command
    {
        parse_permission(permission)?;
    }
    let client = connect_once(&args.client).await?;
    let json = args.client.json;
    match args.command {
        RoleCommand::Add { name } => {
            client.role_add(&name).await.map_err(failure)?;
            say(json, &format!("role {name} added"))?;
        }
        RoleCommand::Del { name } => {
            client.role_delete(&name).await.map_err(failure)?;
            say(json, &format!("role {name} deleted"))?;
        }
        RoleCommand::Grant {
            role,
            permission,
            prefix,
        } => {
            for kind in parse_permission(&permission)? {
                client
                    .role_grant(&role, kind, &prefix)
                    .await
                    .map_err(failure)?;
            }
            say(json, &format!("role {role} may {permission} on {prefix:?}"))?;
        }
        RoleCommand::Revoke {
            role,
            permission,
            prefix,
        } => {
            for kind in parse_permission(&permission)? {
                client
                    .role_revoke(&role, kind, &prefix)
                    .await
                    .map_err(failure)?;
            }
            say(
                json,
                &format!("role {role} may no longer {permission} on {prefix:?}"),
            )?;
        }
        RoleCommand::List => {
            let roles = client.roles().await.map_err(failure)?;
            if json {
                #[derive(Serialize)]
                struct Grant {
                    permission: &'static str,
                    prefix: String,
                }
                #[derive(Serialize)]
                struct Out {
                    name: String,
                    permissions: Vec<Grant>,
                }
                let out: Vec<Out> = roles
                    .into_iter()
                    .map(|r| Out {
                        permissions: r
                            .permissions
                            .iter()
                            .map(|p| Grant {
                                permission: permission_word(p),
                                prefix: p.prefix.clone(),
                            })
                            .collect(),
                        name: r.name,
                    })
                    .collect();
                write_json(&out)?;
            } else {
                let mut text = String::new();
                for role in roles {
                    let grants: Vec<String> = role
                        .permissions
                        .iter()
                        .map(|p| format!("{}:{:?}", permission_word(p), p.prefix))
                        .collect();
                    text.push_str(&format!("{}\t{}\n", role.name, grants.join(" ")));
                }
                write_stdout(text.as_bytes())?;
            }
        }
    }
    Ok(EXIT_OK)
}

fn say(json: bool, message: &str) -> Result<(), Failure> {
    if json {
        write_json(&Done { ok: true })
    } else {
        write_stdout(format!("{message}\n").as_bytes())
    }
}
