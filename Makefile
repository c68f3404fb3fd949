# redis-agent. `make test` is the test command the README and CI use.
GO ?= go

.PHONY: build test vmtest fuzz chaos bench microbench generate run clean

# redis-agent-launch, which every redis-server starts through, is built
# static and small: the step costs little more than an exec.
build:
	$(GO) build -o bin/redis-agent ./cmd/redis-agent
	$(GO) build -o bin/redis-broker ./cmd/redis-broker
	CGO_ENABLED=0 $(GO) build -ldflags=-s -o bin/redis-agent-launch ./cmd/redis-agent-launch

# Unit, integration and end-to-end tests, with the race detector. The
# Redis-backed tests need redis-server (apt-get install -y redis-server).
test:
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 15m ./...

# The agent under systemd and cgroup v2, in a Debian 12 guest under qemu
# (test/vm): needs root, qemu-system-x86, debootstrap and e2fsprogs. The
# guest image is built once (about two minutes) and kept under build/vm.
vmtest:
	REDIS_AGENT_VMTEST=1 $(GO) test -count=1 -v -timeout 40m ./test/vm/

# Short runs of every fuzz target (CI runs this after the tests).
FUZZTIME ?= 10s
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzHandler$$' -fuzztime $(FUZZTIME) ./api/
	$(GO) test -run '^$$' -fuzz '^FuzzValidateID$$' -fuzztime $(FUZZTIME) ./volumes/
	$(GO) test -run '^$$' -fuzz '^FuzzParseInfo$$' -fuzztime $(FUZZTIME) ./redis/
	$(GO) test -run '^$$' -fuzz '^FuzzParseVersion$$' -fuzztime $(FUZZTIME) ./redis/
	$(GO) test -run '^$$' -fuzz '^FuzzNormalize$$' -fuzztime $(FUZZTIME) ./agent/
	$(GO) test -run '^$$' -fuzz '^FuzzParseStat$$' -fuzztime $(FUZZTIME) ./internal/procfs/

chaos:
	CHAOS_SECONDS=$${CHAOS_SECONDS:-120} CHAOS_INSTANCES=$${CHAOS_INSTANCES:-20} $(GO) test -count=1 -v -run TestChaos -timeout 30m ./test/

# The benchmark suite: the real agent and a bare redis-server on this
# machine, one table (also written to docs/benchmarks.md). About 7 minutes;
# it starts 1000 redis-servers (~3.5 GiB of memory: ~2.7 MiB of PSS each).
# BENCHFLAGS adds flags (say -port-min 61000 where other work takes ports
# of 30000-31100); go run ./test/bench -only ... runs some scenarios.
bench: build
	$(GO) run ./test/bench -agent bin/redis-agent -out docs/benchmarks.md $(BENCHFLAGS)

# Go micro-benchmarks of the hot paths.
microbench:
	$(GO) test -run '^$$' -bench . -benchtime 200x ./agent/ ./ports/ ./state/ ./redis/

generate:
	$(GO) generate ./...

# An agent and a broker in front of it, on loopback (deploy/run-local.sh).
run: build
	./deploy/run-local.sh

clean:
	rm -rf bin
