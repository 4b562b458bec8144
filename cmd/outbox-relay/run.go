package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/relay"
)

// relayFlags registers the relay's flags; every default is relay's own.
func relayFlags(fs *flag.FlagSet, cfg *relay.Config, schedule *durationList, allow *prefixList, overflow *string) {
	fs.StringVar(&cfg.DatabaseURL, "database-url", "", "Postgres URL of the database that holds relay.outbox (required)")
	fs.StringVar(&cfg.SlotName, "slot", "outbox_relay", "logical replication slot name")
	fs.StringVar(&cfg.Publication, "publication", "outbox_relay", "publication name")
	fs.IntVar(&cfg.Workers, "workers", 64, "concurrent HTTP deliveries")
	fs.IntVar(&cfg.QueueEvents, "queue-events", 20000, "deliveries held in memory at most")
	fs.IntVar(&cfg.QueueBytes, "queue-bytes", 64<<20, "payload bytes held in memory at most")
	fs.IntVar(&cfg.EndpointMaxInFlight, "endpoint-max-in-flight", 64, "concurrent deliveries to one endpoint at most")
	fs.StringVar(overflow, "overflow", "spill", "when queues are full: spill (record as pending rows, keep streaming) or block (stop reading the WAL)")
	fs.IntVar(&cfg.MaxPayloadBytes, "max-payload-bytes", 256<<10, "payloads larger than this are rejected")
	fs.Var(schedule, "retry-schedule", "comma-separated delay before each attempt; its length is the attempt budget (default 0s,5s,5m,30m,2h,5h,10h,10h)")
	fs.Float64Var(&cfg.RetryJitter, "retry-jitter", 0.2, "spread each retry delay by ± this fraction")
	fs.DurationVar(&cfg.PollInterval, "poll-interval", time.Second, "how often due retries and spilled deliveries are claimed")
	fs.DurationVar(&cfg.OutboxRetention, "outbox-retention", 24*time.Hour, "how long relay.outbox rows are kept")
	fs.DurationVar(&cfg.DeliveryRetention, "delivery-retention", 7*24*time.Hour, "how long succeeded and unrouted relay.deliveries rows and relay.attempts rows are kept")
	fs.DurationVar(&cfg.DeadLetterRetention, "dead-letter-retention", 30*24*time.Hour, "how long dead, failed and rejected rows (the dead-letter queue) are kept")
	fs.Var(allow, "allow-networks", "comma-separated CIDRs the SSRF guard lets through (e.g. 127.0.0.0/8 for local receivers); default none")
}

func runRun(ctx context.Context, args []string, _ io.Reader, _, stderr io.Writer) int {
	fs := newFlagSet("run", "Stream relay.outbox through logical replication and deliver signed webhooks.\nStartup checks wal_level, privileges, the publication and the slot, and says what to fix.\nTraces: set OTEL_EXPORTER_OTLP_ENDPOINT (and the other standard OTEL_* variables) to export\none span per attempt over OTLP/HTTP; off when unset.", stderr)
	var cfg relay.Config
	var schedule durationList
	var allow prefixList
	var overflow string
	relayFlags(fs, &cfg, &schedule, &allow, &overflow)
	var lf logFlags
	lf.register(fs)
	httpAddr := fs.String("http-addr", ":9465", "address for /healthz, /readyz and /metrics; empty disables")
	fs.Int64Var(&cfg.SlotWarnBytes, "slot-warn-bytes", 1<<30, "warn when the slot retains this much WAL; negative disables")
	fs.DurationVar(&cfg.ShutdownGrace, "shutdown-grace", 10*time.Second, "on SIGTERM, how long in-flight attempts may finish before they are recorded as pending")
	if err := parseFlags(fs, args); err != nil {
		return flagExit(err, stderr)
	}
	log, err := lf.logger(stderr)
	if err != nil {
		return flagExit(err, stderr)
	}
	cfg.Overflow = relay.Overflow(overflow)
	cfg.RetrySchedule = schedule
	cfg.AllowNetworks = allow
	cfg.Logger = log
	if cfg.RetryJitter == 0 {
		cfg.RetryJitter = -1 // an explicit 0 means no jitter
	}
	tracer, stopTracing, err := tracing(ctx)
	if err != nil {
		fmt.Fprintln(stderr, "outbox-relay run: OpenTelemetry:", err)
		return 2
	}
	defer stopTracing()
	cfg.Tracer = tracer
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	r, err := relay.New(cfg)
	if err != nil {
		fmt.Fprintln(stderr, "outbox-relay run:", err)
		return 2
	}
	stopOps, err := serveOps(ctx, *httpAddr, r, reg, log)
	if err != nil {
		fmt.Fprintln(stderr, "outbox-relay run:", err)
		return 2
	}
	defer stopOps()
	if err := r.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		log.Error("relay stopped", slog.Any("error", err))
		fmt.Fprintln(stderr, "outbox-relay run:", err)
		return 1
	}
	log.Info("relay stopped")
	return 0
}
