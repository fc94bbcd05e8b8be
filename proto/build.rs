//! Generates the client API, peer and state-machine record types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "latchkey/v1/kv.proto",
        "latchkey/v1/cluster.proto",
        "latchkey/v1/common.proto",
        "latchkey/v1/lease.proto",
        "latchkey/v1/lock.proto",
        "latchkey/v1/election.proto",
        "latchkey/v1/session.proto",
        "latchkey/v1/maintenance.proto",
        "latchkey/v1/auth.proto",
        "latchkey/peer/v1/peer.proto",
        "latchkey/state/v1/state.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // The encoded descriptors of every file, for gRPC server reflection.
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("latchkey_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
