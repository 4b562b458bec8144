# The README's commands. `make help` lists the targets.

GO          ?= go
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
# Two packages at a time: each test package starts its own PostgreSQL
# cluster, and CI machines have two cores.
TEST_FLAGS  ?= -race -count=1 -timeout 14m -p 2
BENCH_TIME  ?= 1s

.DEFAULT_GOAL := help
.PHONY: help demo test bench lint build

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  %-8s %s\n", $$1, $$2}'

demo: ## run the demo: throwaway Postgres, relay and receiver
	$(GO) run ./cmd/outbox-relay demo

test: ## vet and run all tests with the race detector (needs PostgreSQL server binaries or OUTBOX_RELAY_TEST_DATABASE_URL)
	$(GO) vet ./...
	$(GO) test $(TEST_FLAGS) ./...

bench: ## go test micro-benchmarks (BENCH_TIME=1s), then `outbox-relay bench` (flags in BENCH_ARGS): drain, latency and cost vs bare HTTP
	$(GO) test -run '^$$' -bench . -benchmem -benchtime $(BENCH_TIME) ./...
	$(GO) build -o bin/outbox-relay ./cmd/outbox-relay
	./bin/outbox-relay bench $(BENCH_ARGS)

lint: ## gofmt, go vet and staticcheck (pinned)
	@unformatted="$$(gofmt -l .)"; \
	if [ -n "$$unformatted" ]; then echo "gofmt needed on:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

build: ## build bin/outbox-relay
	$(GO) build -o bin/outbox-relay ./cmd/outbox-relay

CHAOS_DURATION ?= 10m
CHAOS_TIMEOUT  ?= 30m
.PHONY: chaos
chaos: ## chaos suite: kills, Postgres restarts, receiver and config faults while events flow, then prove nothing is lost (CHAOS_DURATION=10m; CHAOS_SEED=n replays)
	CHAOS_DURATION=$(CHAOS_DURATION) CHAOS_SEED=$(CHAOS_SEED) $(GO) test -count=1 -timeout $(CHAOS_TIMEOUT) -run '^TestChaos$$' -v ./e2e/
