# redis-agent. `make test` is the test command the README and CI use.
GO ?= go

.PHONY: build test test-short bench generate lint run clean

build:
	$(GO) build -o bin/redis-agent ./cmd/redis-agent

# Unit, integration and end-to-end tests, with the race detector. The
# Redis-backed tests need redis-server (apt-get install -y redis-server).
test:
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 15m ./...

bench:
	$(GO) test -run '^$$' -bench . -benchtime 200x ./agent/ ./ports/ ./state/ ./redis/

generate:
	$(GO) generate ./...

run: build
	./bin/redis-agent

clean:
	rm -rf bin
