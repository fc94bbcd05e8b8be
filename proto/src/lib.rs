//! Protocol buffer types for latchkey.
//!
//! # Layout
//! - [`v1`]: the client API (`latchkey.v1`): key-value store and cluster status.
//! - [`peer::v1`]: the node-to-node transport carrying raft-rs messages.
//! - [`state::v1`]: records the server keeps in its Raft log and state machine.

/// The encoded `FileDescriptorSet` of every `.proto` file above, for gRPC
/// server reflection (`grpcurl list` without the `.proto` files).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/latchkey_descriptor.bin"));

/// The client API.
pub mod v1 {
    tonic::include_proto!("latchkey.v1");
}

/// Node-to-node transport.
pub mod peer {
    /// Version 1 of the peer protocol.
    pub mod v1 {
        tonic::include_proto!("latchkey.peer.v1");
    }
}

/// Replicated command and state-machine records.
pub mod state {
    /// Version 1 of the stored records.
    pub mod v1 {
        tonic::include_proto!("latchkey.state.v1");
    }
}
