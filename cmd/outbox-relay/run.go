package main

import (
	"context"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/internal/procs"
	"github.com/outbox-relay/outbox-relay/relay"
)

// relayFlags registers the relay's flags; every default is relay's own.
func relayFlags(fs *flag.FlagSet, cfg *relay.Config, schedule *durationList, allow *prefixList, overflow *string) {
	fs.StringVar(&cfg.DatabaseURL, "database-url", "", "Postgres URL of the database that holds relay.outbox (required); each connection attempt gives up after 10s unless it sets connect_timeout, and its tcp_keepalives_* and tcp_user_timeout override the relay's (see README, Operating it)")
	fs.StringVar(&cfg.SlotName, "slot", "outbox_relay", "logical replication slot name")
	fs.StringVar(&cfg.Publication, "publication", "outbox_relay", "publication name")
	fs.IntVar(&cfg.Workers, "workers", 64, "concurrent HTTP deliveries")
	fs.IntVar(&cfg.QueueEvents, "queue-events", 20000, "deliveries held in memory at most")
	fs.IntVar(&cfg.QueueBytes, "queue-bytes", 64<<20, "payload bytes held in memory at most")
	fs.IntVar(&cfg.HeldEvents, "queue-held", 0, "under spill: deliveries of an endpoint past its share of the queues that wait in memory without their payload (about 100 bytes each) before any spills as a pending row; the acknowledged LSN waits for them (0: 5 × --queue-events; -1: none, spill at once)")
	fs.DurationVar(&cfg.HoldFor, "hold-for", time.Minute, "under spill: the longest a delivery waits in memory without its payload; then it spills and the acknowledged LSN moves past it")
	fs.IntVar(&cfg.EndpointMaxInFlight, "endpoint-max-in-flight", 64, "concurrent deliveries to one endpoint at most")
	fs.IntVar(&cfg.TenantMaxInFlight, "tenant-max-in-flight", 0, "concurrent deliveries of one tenant at most, over all its endpoints, so a slow tenant leaves workers to the others (0: three quarters of --workers)")
	fs.StringVar(overflow, "overflow", "spill", "when queues are full: spill (record as pending rows, keep streaming) or block (stop reading the WAL)")
	fs.IntVar(&cfg.MaxPayloadBytes, "max-payload-bytes", 256<<10, "payloads larger than this are rejected")
	fs.IntVar(&cfg.StreamBatchBytes, "stream-batch-bytes", 4<<20, "WAL message bytes the stream hands over at once, at least 4096: a larger transaction is read in parts of this size, so memory does not grow with one transaction's size")
	fs.Var(schedule, "retry-schedule", "comma-separated delay before each attempt; its length is the attempt budget (default 0s,5s,5m,30m,2h,5h,10h,10h)")
	fs.Float64Var(&cfg.RetryJitter, "retry-jitter", 0.2, "spread each retry delay by ± this fraction")
	fs.DurationVar(&cfg.PollInterval, "poll-interval", time.Second, "how often due retries and spilled deliveries are claimed")
	fs.DurationVar(&cfg.OutboxRetention, "outbox-retention", 24*time.Hour, "how long relay.outbox rows are kept")
	fs.DurationVar(&cfg.DeliveryRetention, "delivery-retention", 7*24*time.Hour, "how long succeeded and unrouted relay.deliveries rows and relay.attempts rows are kept")
	fs.DurationVar(&cfg.DeadLetterRetention, "dead-letter-retention", 30*24*time.Hour, "how long dead, failed and rejected rows (the dead-letter queue) are kept")
	fs.StringVar(&cfg.HTTPClient, "http-client", relay.HTTPClientLean, "what sends http:// deliveries: lean (the relay's own HTTP/1.1 client: no goroutines per connection, less CPU per delivery) or net/http (Go's standard client); https:// always uses net/http, with HTTP/2 when the receiver offers it")
	fs.Var(allow, "allow-networks", "comma-separated CIDRs the SSRF guard lets through (e.g. 127.0.0.0/8 for local receivers); default none")
}

// runFlags are the flags of `run`, shared with `config check`.
type runFlags struct {
	cfg         relay.Config
	schedule    durationList
	allow       prefixList
	overflow    string
	log         logFlags
	httpAddr    string
	memoryLimit int64
	gcPercent   int
	adaptProcs  bool
	configFile  string
	preset      string
	caBundle    string
}

const runSynopsis = `Stream relay.outbox through logical replication and deliver signed webhooks.
Startup checks wal_level, privileges, the publication and the slot, and says what to fix.
Settings come from, highest first: flags, OUTBOX_RELAY_* variables, the --config file
("name: value" lines, names as the flags), the --preset (small, medium, large), defaults.
Traces: set OTEL_EXPORTER_OTLP_ENDPOINT (and the other standard OTEL_* variables) to export
one span per attempt over OTLP/HTTP; off when unset.`

func newRunFlags(name, synopsis string, out io.Writer) (*flag.FlagSet, *runFlags) {
	fs := newFlagSet(name, synopsis, out)
	rf := &runFlags{}
	relayFlags(fs, &rf.cfg, &rf.schedule, &rf.allow, &rf.overflow)
	rf.log.register(fs)
	fs.StringVar(&rf.httpAddr, "http-addr", ":9465", "address for /healthz, /readyz and /metrics; empty disables")
	fs.IntVar(&rf.gcPercent, "gc-percent", 400, "how far the Go heap may grow past what is live before a collection, in percent (the runtime's GOGC; GOGC, when set, wins); the heap limit still caps it, so a higher value trades memory below that limit for less collector CPU and fewer latency spikes")
	fs.BoolVar(&rf.adaptProcs, "adaptive-procs", true, "run with one Go scheduler P (GOMAXPROCS 1) while the load is light (under 3,000 attempts/s and 0.45 cores of CPU for a second) and with the runtime's default while it is heavy (6,000/s or 0.75 cores): at a live rate that spends less CPU per event waking threads; GOMAXPROCS, when set, wins")
	fs.Int64Var(&rf.memoryLimit, "memory-limit", 0, "soft limit in bytes for the Go heap, so garbage collection keeps RSS near what the bounded queues hold (0: --queue-bytes plus 48 MiB plus 8 KiB per endpoint; negative: none; GOMEMLIMIT, when set, wins)")
	fs.Int64Var(&rf.cfg.SlotWarnBytes, "slot-warn-bytes", 1<<30, "warn when the slot retains this much WAL; negative disables")
	fs.DurationVar(&rf.cfg.SlotCheckInterval, "slot-check-interval", 10*time.Second, "how often slot lag and retained WAL are read")
	fs.DurationVar(&rf.cfg.ShutdownGrace, "shutdown-grace", 10*time.Second, "on SIGTERM, how long in-flight attempts may finish before they are recorded as pending")
	fs.DurationVar(&rf.cfg.AutoDisableAfter, "auto-disable-after", 5*24*time.Hour, "disable an endpoint that has failed continuously this long; its pending deliveries become dead letters")
	fs.StringVar(&rf.configFile, "config", "", "optional settings file: \"name: value\" lines, names as the flags")
	fs.StringVar(&rf.caBundle, "ca-bundle", "", "PEM file of CA certificates to trust for receivers' TLS instead of the system's")
	fs.StringVar(&rf.preset, "preset", "", "sizing preset: small, medium or large (see README); default: the flags' defaults")
	return fs, rf
}

// relayConfig turns parsed flags into a validated relay.Config.
func (rf *runFlags) relayConfig(log *slog.Logger) (relay.Config, error) {
	cfg := rf.cfg
	cfg.Overflow = relay.Overflow(rf.overflow)
	cfg.RetrySchedule = rf.schedule
	cfg.AllowNetworks = rf.allow
	cfg.Logger = log
	if cfg.RetryJitter == 0 {
		cfg.RetryJitter = -1 // an explicit 0 means no jitter
	}
	if rf.caBundle != "" {
		pem, err := os.ReadFile(rf.caBundle)
		if err != nil {
			return cfg, fmt.Errorf("--ca-bundle: %w", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return cfg, fmt.Errorf("--ca-bundle: %s holds no PEM certificate", rf.caBundle)
		}
	}
	return cfg, cfg.Validate()
}

func runRun(ctx context.Context, args []string, _ io.Reader, _, stderr io.Writer) int {
	fs, rf := newRunFlags("run", runSynopsis, stderr)
	if err := parseFlags(fs, args); err != nil {
		return flagExit(err, stderr)
	}
	log, err := rf.log.logger(stderr)
	if err != nil {
		return flagExit(err, stderr)
	}
	cfg, err := rf.relayConfig(log)
	if err != nil {
		fmt.Fprintln(stderr, "outbox-relay run:", err)
		return 2
	}
	if pct, ok := rf.gcSetting(); ok {
		debug.SetGCPercent(pct)
	}
	if limit, source := rf.heapLimit(cfg); limit > 0 {
		debug.SetMemoryLimit(limit)
		log.Info("heap soft limit", slog.Int64("bytes", limit), slog.String("source", source))
		if rf.memoryLimit == 0 {
			// Each endpoint's config, breaker, limiter and queue cost some
			// KiB: the automatic limit grows with them, or thousands of
			// endpoints would keep the collector running.
			cfg.EndpointsChanged = func(n int) {
				debug.SetMemoryLimit(limit + int64(n)*perEndpointHeap)
			}
		}
	}
	httpAddr := &rf.httpAddr
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
	if rf.adaptProcs && os.Getenv("GOMAXPROCS") == "" {
		procsCtx, stopProcs := context.WithCancel(ctx)
		defer stopProcs()
		go procs.Run(procsCtx, r.Attempts, log)
	}
	if err := r.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		log.Error("relay stopped", slog.Any("error", err))
		fmt.Fprintln(stderr, "outbox-relay run:", err)
		return 1
	}
	log.Info("relay stopped")
	return 0
}

// gcSetting is the collector's GOGC percentage for run, and false when the
// GOGC variable, the runtime's own setting, is set and wins. The default
// (400) is the collector's 100 raised because the heap limit already
// bounds memory: measured in the fairness benchmark, a slow tenant's
// backlog raised another tenant's p99 3.8x at 100 and 2.4x at 400, and
// relay CPU per drained event fell 7 %, for ~50 MiB more RSS on a drain
// (still under the limit).
func (rf *runFlags) gcSetting() (int, bool) {
	if os.Getenv("GOGC") != "" {
		return 0, false
	}
	return rf.gcPercent, true
}

// perEndpointHeap is what the automatic heap limit allows per configured
// endpoint (measured: 10,000 endpoints added ~60 MiB of RSS).
const perEndpointHeap = 8 << 10

// heapSlack is the heap limit's room above --queue-bytes: what the relay
// holds besides the queued payloads (deliveries, held refs, buffers,
// pools). With the binary's own ~18 MiB outside the Go heap, the default
// keeps RSS under 150 MB (about 143 MiB) with the receiver down.
const heapSlack = 48 << 20

// heapLimit is the Go heap's soft limit for run. Without one the collector
// lets the heap grow to twice what is live, and after a burst (a backlog
// read into the queues, spilled rows on their way out) RSS stays at twice
// the queues' bound. GOMEMLIMIT, the runtime's own setting, wins.
func (rf *runFlags) heapLimit(cfg relay.Config) (int64, string) {
	if os.Getenv("GOMEMLIMIT") != "" {
		return 0, "GOMEMLIMIT"
	}
	switch {
	case rf.memoryLimit < 0:
		return 0, "--memory-limit"
	case rf.memoryLimit > 0:
		return rf.memoryLimit, "--memory-limit"
	}
	queue := int64(cfg.QueueBytes)
	if queue <= 0 {
		queue = 64 << 20
	}
	return queue + heapSlack, "--queue-bytes plus 48 MiB"
}
