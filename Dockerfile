# syntax=docker/dockerfile:1
#
# latchkey server image.
#
#   docker build -t latchkey:dev .
#   docker run --rm latchkey:dev --help
#
# Ports: 2379 client gRPC (applications and the CLI), 2380 peer Raft
# (members only), 2381 HTTP (/metrics, /healthz, /readyz, status page).
# See docs/deployment.md.

# ---------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# protoc for the gRPC code; libprotobuf-dev for protobuf's well-known types
# (the etcd client the benchmarks build imports google/protobuf/*.proto);
# clang and libclang for RocksDB's bindings. The same list as
# scripts/install-deps, minus the test-only tools.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        protobuf-compiler libprotobuf-dev clang libclang-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . .

# Always --workspace: building one package alone resolves a different
# feature set and rebuilds RocksDB. target/ is a cache mount, so the binary
# is copied out of it in this same step.
RUN --mount=type=cache,id=latchkey-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=latchkey-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=latchkey-target,target=/app/target,sharing=locked \
    cargo build --release --locked --workspace --bins \
    && install -D -m 0755 target/release/latchkey /out/latchkey

# ---------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim

# The binary needs only libc, libm, libgcc_s and libstdc++, which
# bookworm-slim already has (apt depends on them).
RUN groupadd --system --gid 10001 latchkey \
    && useradd --system --uid 10001 --gid latchkey \
        --home-dir /var/lib/latchkey --no-create-home \
        --shell /usr/sbin/nologin latchkey \
    && install -d -o latchkey -g latchkey -m 0750 /var/lib/latchkey

COPY --from=builder /out/latchkey /usr/local/bin/latchkey

USER latchkey
WORKDIR /var/lib/latchkey
# A new named volume mounted here takes its owner (latchkey) from the image.
VOLUME ["/var/lib/latchkey"]

EXPOSE 2379 2380 2381

# Healthy while the node answers Cluster.Status on its client port
# (127.0.0.1:2379, so --listen-client must be 0.0.0.0:2379 or
# 127.0.0.1:2379). `latchkey status` exits 3 when no endpoint answers. It
# does not need a quorum or a leader: it reports whether this process
# serves, not whether the cluster does.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["latchkey", "status", "--endpoints", "127.0.0.1:2379", "--timeout", "1s"]

# latchkey handles SIGTERM itself (hands leadership on, flushes, exits 0
# within 15 s), so it can run as PID 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["latchkey"]
CMD ["serve", "--help"]
