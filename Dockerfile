# syntax=docker/dockerfile:1
#
# syncrelay container image.
#
#   docker build -t syncrelay .
#   docker run --rm -p 8080:8080 -v syncrelay-data:/var/lib/syncrelay \
#       -e SYNCRELAY__AUTH__TOKENS='["change-me"]' syncrelay
#
# Configuration is the same as outside a container: compiled-in defaults, then `--config PATH`,
# then SYNCRELAY__SECTION__KEY environment variables (see docs/OPERATIONS.md).
# The build runs the same command as the README (`cargo build --release --locked`).

############################ builder ############################
FROM rust:1-bookworm AS builder

# What librdkafka needs when built from source (rdkafka's `cmake-build` feature): a C/C++
# toolchain, cmake, and the optional codecs / TLS / SASL libraries it links.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        build-essential \
        cmake \
        pkg-config \
        python3 \
        libssl-dev \
        zlib1g-dev \
        libzstd-dev \
        liblz4-dev \
        libsasl2-dev \
        libcurl4-openssl-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependency-caching layer: build every dependency against placeholder sources, so that changing
# only src/ re-runs only the last build step.
COPY Cargo.toml Cargo.lock ./
# Build settings (.cargo/config.toml: SQLite's compile-time options) before the dependencies build.
COPY .cargo ./.cargo
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && echo '' > src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src \
    target/release/syncrelay* \
    target/release/deps/syncrelay-* \
    target/release/deps/libsyncrelay-* \
    target/release/.fingerprint/syncrelay-*

# The real sources (config/default.toml is compiled in).
COPY src ./src
COPY config ./config
# Schema migrations are compiled in (src/store/sqlite/migrate.rs).
COPY migrations ./migrations
# `touch` so cargo never mistakes the copied sources for the placeholder build.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked

############################ runtime ############################
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g libzstd1 liblz4-1 libsasl2-2 libcurl4 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 syncrelay \
 && useradd --system --uid 10001 --gid syncrelay --home-dir /var/lib/syncrelay --shell /usr/sbin/nologin syncrelay \
 && mkdir -p /var/lib/syncrelay /etc/syncrelay \
 && chown syncrelay:syncrelay /var/lib/syncrelay

COPY --from=builder /build/target/release/syncrelay /usr/local/bin/syncrelay

ENV SYNCRELAY__HTTP__LISTEN=0.0.0.0:8080 \
    SYNCRELAY__STORE__PATH=/var/lib/syncrelay/syncrelay.db

USER syncrelay:syncrelay
WORKDIR /var/lib/syncrelay
VOLUME /var/lib/syncrelay
EXPOSE 8080

# `syncrelay healthcheck` GETs /health/ready on the configured listen address and exits non-zero
# unless it answers 200.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["syncrelay", "healthcheck"]

# SIGTERM (docker stop) drains in-flight attempts for up to shutdown.deadline_ms; give
# `docker stop --time` / the orchestrator's grace period a few seconds more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["syncrelay"]
