# syntax=docker/dockerfile:1
#
# The `dispatcher` binary in a small image: built on rust:1-bookworm, run on
# debian:bookworm-slim as an unprivileged user.
#
#   docker build -t dispatcher .
#   docker run --rm dispatcher --help
#   docker run --rm -e DISPATCH_NATS_URL=nats://nats.example:4222 dispatcher
#
# ENTRYPOINT is the binary and CMD its subcommand (`serve`), so any other
# subcommand or flag goes after the image name, or in compose's `command:`.
# Every flag can also be set with its DISPATCH_* variable. docs/docker.md
# runs NATS and several nodes with docker compose.

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src

# No dependency-only layer with stand-in sources: the members declare
# benches (and may declare more targets), and Cargo wants every declared
# target's file to exist before it reads a manifest. Cache mounts keep what
# such a layer would save, the downloaded crates and the compiled
# dependencies, from one build to the next. The binary is copied out of the
# cached target directory, which is not part of the image.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin dispatcher \
 && install -D -m 0755 target/release/dispatcher /out/dispatcher

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# CA certificates, for NATS servers reached over TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric id, so that orchestrators can check "not root" without
# reading /etc/passwd.
RUN groupadd --system --gid 10001 dispatcher \
 && useradd --system --uid 10001 --gid dispatcher --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin dispatcher

COPY --from=build /out/dispatcher /usr/local/bin/dispatcher

LABEL org.opencontainers.image.title="dispatcher" \
      org.opencontainers.image.description="Actor-based, distributed task dispatcher on NATS" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

USER 10001:10001
# SIGTERM (docker stop) makes a node drain: it stops taking work, lets
# running tasks finish within --shutdown-timeout (30 s) and says `offline`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dispatcher"]
CMD ["serve"]
