package relay

import (
	"cmp"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/cdc"
)

// Overflow says what the relay does when its in-memory queues are full.
type Overflow string

const (
	// OverflowSpill records deliveries that do not fit as pending rows in
	// relay.deliveries and loads them back when there is room. The
	// replication stream keeps flowing and the slot keeps advancing.
	OverflowSpill Overflow = "spill"
	// OverflowBlock stops reading the replication stream until there is
	// room; the WAL waits in the slot.
	OverflowBlock Overflow = "block"
)

// Config configures a Relay. Zero values take the documented defaults.
type Config struct {
	// DatabaseURL is the database holding the relay schema. Required.
	DatabaseURL string
	// SlotName is the logical replication slot. Default "outbox_relay".
	SlotName string
	// Publication is the publication the slot reads. Default "outbox_relay".
	Publication string

	// Workers is the number of concurrent HTTP deliveries. Default 64.
	Workers int
	// QueueEvents bounds the deliveries held in memory. Default 20000.
	QueueEvents int
	// QueueBytes bounds the payload bytes held in memory. Default 64 MiB.
	QueueBytes int
	// HeldEvents bounds, under OverflowSpill, the deliveries of an
	// endpoint past its share of the queues that wait in memory without
	// their payload (about 100 bytes each) before any is spilled as a
	// pending row; the acknowledged LSN waits for them. Default 5 ×
	// QueueEvents; negative: none, every such delivery spills at once.
	HeldEvents int
	// HoldFor is the longest a delivery waits that way; then it spills,
	// and the acknowledged LSN moves past it. Default 1 minute.
	HoldFor time.Duration
	// EndpointMaxInFlight bounds concurrent deliveries to one endpoint.
	// Default 64.
	EndpointMaxInFlight int
	// TenantMaxInFlight bounds concurrent deliveries of one tenant, over
	// all its endpoints, so that a tenant with a slow receiver cannot hold
	// every worker while other tenants wait. Default three quarters of
	// Workers (at least 1); set it to Workers to let one tenant use them
	// all.
	TenantMaxInFlight int
	// Overflow is the policy when queues are full. Default OverflowSpill.
	Overflow Overflow

	// MaxPayloadBytes rejects larger payloads. Default 256 KiB.
	MaxPayloadBytes int
	// StreamBatchBytes bounds the WAL messages the stream hands the
	// dispatcher at once (cdc.Config.MaxBatchBytes): a transaction larger
	// than this comes in parts, so one transaction of any size is held in
	// memory no more than this. Default 4 MiB; at least 4 KiB.
	StreamBatchBytes int
	// StatusBatch is the most status rows written per round trip. Default 2000.
	StatusBatch int
	// StatusInterval is the longest a status row waits to be written:
	// what waits is written once per interval, or at once when
	// StatusBatch rows wait. It bounds how much a crash can deliver
	// twice, not delivery latency. Default 20ms.
	StatusInterval time.Duration

	// RetrySchedule is the delay before each attempt; entry 0 is the
	// first attempt's. Its length is the attempt budget. Default: the
	// Standard Webhooks schedule 0, 5s, 5m, 30m, 2h, 5h, 10h, 10h.
	RetrySchedule []time.Duration
	// RetryJitter spreads each delay by ± this fraction. Default 0.2;
	// negative disables jitter.
	RetryJitter float64
	// PollInterval is how often due retries and spilled deliveries are
	// claimed from relay.deliveries. Default 1s.
	PollInterval time.Duration
	// ClaimLease is how long a claimed row is left alone by other relays.
	// Default 2m.
	ClaimLease time.Duration

	// OutboxRetention is how long relay.outbox rows are kept. Default 24h.
	OutboxRetention time.Duration
	// DeliveryRetention is how long succeeded and unrouted
	// relay.deliveries rows, and relay.attempts rows, are kept. Default 7 days.
	DeliveryRetention time.Duration
	// DeadLetterRetention is how long dead, failed and rejected rows (the
	// dead-letter queue) are kept. Default 30 days.
	DeadLetterRetention time.Duration
	// CleanupInterval is how often old rows are removed. Default 1m.
	CleanupInterval time.Duration

	// AutoDisableAfter disables an endpoint that has failed continuously
	// (no success in between) for this long; its pending and retrying
	// deliveries go to the dead-letter queue. Default 5 days.
	AutoDisableAfter time.Duration

	// AllowNetworks opens holes in the SSRF guard (e.g. 127.0.0.0/8 for
	// local receivers). Default: none.
	AllowNetworks []netip.Prefix
	// RootCAs, when set, replaces the system's CA pool for verifying
	// receivers' TLS certificates. Verification is always on.
	RootCAs *x509.CertPool
	// UserAgent is sent with every request. Default "outbox-relay".
	UserAgent string
	// HTTPClient picks what sends plain-http:// deliveries: "lean" (the
	// relay's own HTTP/1.1 transport, internal/h1, with no goroutines per
	// connection) or "net/http" (Go's client, as https:// always uses).
	// Default "lean".
	HTTPClient string

	// StandbyPoll is how often a standby relay checks whether it can take
	// over. Default 1s.
	StandbyPoll time.Duration

	// Registerer receives the relay's Prometheus metrics. Default: a
	// private registry (metrics are kept but not exported).
	Registerer prometheus.Registerer
	// SlotCheckInterval is how often slot lag and retained WAL are read.
	// Default 10s.
	SlotCheckInterval time.Duration
	// SlotWarnBytes logs a warning when the slot retains this much WAL.
	// Default 1 GiB; negative disables.
	SlotWarnBytes int64

	// Tracer, when set, gets one span per attempt, continuing the trace of
	// the outbox row's traceparent. Default: none (no tracing cost).
	Tracer trace.Tracer

	// ShutdownGrace is how long attempts in flight at shutdown may take
	// before they are cut short and recorded as pending. Default 10s.
	ShutdownGrace time.Duration

	// EndpointsChanged, when set, is called with the number of endpoints
	// in the relay's config once it is loaded and whenever a change
	// through the stream alters it (from the dispatch goroutine; it must
	// not block). The binary sizes the Go heap's soft limit with it.
	EndpointsChanged func(n int)

	// Logger receives the relay's logs. Default: discard.
	Logger *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time

	// historyLag is how far dispatch may run ahead of an unwritten
	// endpoint version (history.go). Default historyLag; tests shorten it.
	historyLag time.Duration
	// slowSQL is how long a status, history or claim statement runs before
	// the relay says, every slowSQL, that it still runs. Default slowSQL;
	// tests shorten it.
	slowSQL time.Duration
}

// DefaultRetrySchedule is the delay before each attempt.
var DefaultRetrySchedule = []time.Duration{0, 5 * time.Second, 5 * time.Minute, 30 * time.Minute, 2 * time.Hour, 5 * time.Hour, 10 * time.Hour, 10 * time.Hour}

// WithDefaults returns c with every default applied, as New applies them:
// what a relay made from c runs with (config check prints it).
func (c Config) WithDefaults() Config { return c.withDefaults() }

func (c Config) withDefaults() Config {
	c.SlotName = cmp.Or(c.SlotName, "outbox_relay")
	c.Publication = cmp.Or(c.Publication, "outbox_relay")
	c.Workers = cmp.Or(c.Workers, 64)
	c.QueueEvents = cmp.Or(c.QueueEvents, 20000)
	c.QueueBytes = cmp.Or(c.QueueBytes, 64<<20)
	c.HeldEvents = cmp.Or(c.HeldEvents, 5*c.QueueEvents)
	c.HoldFor = cmp.Or(c.HoldFor, time.Minute)
	c.EndpointMaxInFlight = cmp.Or(c.EndpointMaxInFlight, 64)
	c.TenantMaxInFlight = cmp.Or(c.TenantMaxInFlight, max(1, c.Workers-c.Workers/4))
	c.Overflow = cmp.Or(c.Overflow, OverflowSpill)
	c.MaxPayloadBytes = cmp.Or(c.MaxPayloadBytes, 256<<10)
	c.StatusBatch = cmp.Or(c.StatusBatch, 2000)
	c.StatusInterval = cmp.Or(c.StatusInterval, 20*time.Millisecond)
	c.historyLag = cmp.Or(c.historyLag, historyLag)
	c.slowSQL = cmp.Or(c.slowSQL, slowSQL)
	if c.RetrySchedule == nil {
		c.RetrySchedule = DefaultRetrySchedule
	}
	if c.RetryJitter == 0 {
		c.RetryJitter = 0.2
	} else if c.RetryJitter < 0 {
		c.RetryJitter = 0
	}
	c.PollInterval = cmp.Or(c.PollInterval, time.Second)
	c.ClaimLease = cmp.Or(c.ClaimLease, 2*time.Minute)
	c.OutboxRetention = cmp.Or(c.OutboxRetention, 24*time.Hour)
	c.DeliveryRetention = cmp.Or(c.DeliveryRetention, 7*24*time.Hour)
	c.DeadLetterRetention = cmp.Or(c.DeadLetterRetention, 30*24*time.Hour)
	c.AutoDisableAfter = cmp.Or(c.AutoDisableAfter, 5*24*time.Hour)
	c.CleanupInterval = cmp.Or(c.CleanupInterval, time.Minute)
	c.UserAgent = cmp.Or(c.UserAgent, "outbox-relay")
	c.HTTPClient = cmp.Or(c.HTTPClient, HTTPClientLean)
	c.StandbyPoll = cmp.Or(c.StandbyPoll, time.Second)
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
	c.SlotCheckInterval = cmp.Or(c.SlotCheckInterval, 10*time.Second)
	c.SlotWarnBytes = cmp.Or(c.SlotWarnBytes, 1<<30)
	c.ShutdownGrace = cmp.Or(c.ShutdownGrace, 10*time.Second)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

// Validate reports the first invalid field, by name.
func (c Config) Validate() error {
	var errs []error
	if c.DatabaseURL == "" {
		errs = append(errs, errors.New("DatabaseURL is required"))
	}
	for name, v := range map[string]string{"SlotName": c.SlotName, "Publication": c.Publication} {
		if v != "" && !cdc.ValidName(v) {
			errs = append(errs, fmt.Errorf("%s %q: use 1-63 lower-case letters, digits and underscores", name, v))
		}
	}
	for name, v := range map[string]int{"Workers": c.Workers, "QueueEvents": c.QueueEvents, "QueueBytes": c.QueueBytes,
		"EndpointMaxInFlight": c.EndpointMaxInFlight, "TenantMaxInFlight": c.TenantMaxInFlight, "MaxPayloadBytes": c.MaxPayloadBytes, "StatusBatch": c.StatusBatch} {
		if v < 0 {
			errs = append(errs, fmt.Errorf("%s must not be negative (got %d)", name, v))
		}
	}
	if c.StreamBatchBytes != 0 && c.StreamBatchBytes < 4<<10 {
		errs = append(errs, fmt.Errorf("StreamBatchBytes must be 0 (the default, 4 MiB) or at least 4096 (got %d)", c.StreamBatchBytes))
	}
	if c.HoldFor < 0 {
		errs = append(errs, fmt.Errorf("HoldFor must not be negative (got %s)", c.HoldFor))
	}
	if c.Overflow != "" && c.Overflow != OverflowSpill && c.Overflow != OverflowBlock {
		errs = append(errs, fmt.Errorf("Overflow must be %q or %q (got %q)", OverflowSpill, OverflowBlock, c.Overflow))
	}
	if c.HTTPClient != "" && c.HTTPClient != HTTPClientLean && c.HTTPClient != HTTPClientNetHTTP {
		errs = append(errs, fmt.Errorf("HTTPClient must be %q or %q (got %q)", HTTPClientLean, HTTPClientNetHTTP, c.HTTPClient))
	}
	for i, d := range c.RetrySchedule {
		if d < 0 {
			errs = append(errs, fmt.Errorf("RetrySchedule[%d] must not be negative (got %s)", i, d))
		}
	}
	if c.RetrySchedule != nil && len(c.RetrySchedule) == 0 {
		errs = append(errs, errors.New("RetrySchedule must have at least one entry"))
	}
	if c.RetryJitter >= 1 {
		errs = append(errs, fmt.Errorf("RetryJitter must be below 1 (got %g)", c.RetryJitter))
	}
	return errors.Join(errs...)
}
