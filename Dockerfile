# Build: the agent is a static Go binary.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/redis-agent ./cmd/redis-agent \
 && CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/redis-agent-launch ./cmd/redis-agent-launch

# Run: Debian's redis-server and the agent. The agent runs as the
# unprivileged user "redis" (created by the package), so it runs every
# redis-server as that user too (no user per instance: that needs root);
# redis-agent-launch, beside it, still confines each one (Landlock and
# seccomp need no privilege).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/redis-agent \
 && chown redis:redis /var/lib/redis-agent
COPY --from=build /out/redis-agent /out/redis-agent-launch /usr/local/bin/
USER redis
VOLUME /var/lib/redis-agent
ENV REDIS_AGENT_DATA_DIR=/var/lib/redis-agent \
    REDIS_AGENT_LOG_FORMAT=json
# Listening beyond loopback needs a token: mount one and set
# REDIS_AGENT_TOKEN_FILE, and REDIS_AGENT_LISTEN=0.0.0.0:7070.
EXPOSE 7070 16000-16999
ENTRYPOINT ["/usr/local/bin/redis-agent"]
