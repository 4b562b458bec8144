package relay

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the relay's Prometheus collectors. Per-event work touches
// only pre-resolved children; labels never carry endpoint or tenant ids,
// so 10,000 endpoints cannot blow up a scrape.
type metrics struct {
	eventsReceived  prometheus.Counter
	deliveries      map[State]prometheus.Counter
	attemptsByClass *prometheus.CounterVec
	attemptsOK      prometheus.Counter // attemptsByClass{class="http_2xx"}, resolved once
	attemptDuration prometheus.Histogram
	commitToDeliver prometheus.Histogram
	spilled         prometheus.Counter
	loaded          prometheus.Counter
	slotLagBytes    prometheus.Gauge
	slotRetainedWAL prometheus.Gauge
	ackAge          prometheus.Gauge
	statusWriteSecs prometheus.Histogram

	breakerTransitions *prometheus.CounterVec
	restartSkipped     prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, r *Relay) *metrics {
	m := &metrics{
		eventsReceived: prometheus.NewCounter(prometheus.CounterOpts{Name: "outbox_relay_events_received_total",
			Help: "Outbox rows read from the replication stream."}),
		attemptsByClass: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outbox_relay_attempts_total",
			Help: "HTTP delivery attempts by result class (http_2xx, http_4xx, http_5xx, timeout, connection_refused, blocked, ...)."}, []string{"class"}),
		attemptDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outbox_relay_attempt_duration_seconds",
			Help: "Duration of one HTTP delivery attempt.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}),
		commitToDeliver: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outbox_relay_commit_to_delivery_seconds",
			Help: "From the outbox transaction's commit to the receiver's 2xx answer.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 20)}),
		spilled: prometheus.NewCounter(prometheus.CounterOpts{Name: "outbox_relay_spilled_total",
			Help: "Deliveries recorded as pending because the queues were full."}),
		loaded: prometheus.NewCounter(prometheus.CounterOpts{Name: "outbox_relay_loaded_total",
			Help: "Pending and retrying deliveries claimed back from relay.deliveries."}),
		slotLagBytes: prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_replication_lag_bytes",
			Help: "Server WAL end minus the slot's confirmed flush position."}),
		slotRetainedWAL: prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_slot_retained_wal_bytes",
			Help: "WAL the slot keeps on the server (server WAL end minus restart_lsn)."}),
		ackAge: prometheus.NewGauge(prometheus.GaugeOpts{Name: "outbox_relay_last_ack_age_seconds",
			Help: "Seconds since the last standby status update was sent."}),
		statusWriteSecs: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outbox_relay_status_write_duration_seconds",
			Help: "Duration of one batched status write.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
	}
	m.attemptsOK = m.attemptsByClass.WithLabelValues("http_2xx")
	m.breakerTransitions = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outbox_relay_breaker_transitions_total",
		Help: "Circuit breaker state changes, by the state entered (open, half-open, closed). Per-endpoint state is in relay.endpoint_health."}, []string{"to"})
	m.restartSkipped = prometheus.NewCounter(prometheus.CounterOpts{Name: "outbox_relay_restart_skipped_total",
		Help: "Deliveries streamed again after a restart and skipped because their row was already recorded."})
	deliveries := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outbox_relay_deliveries_total",
		Help: "Delivery rows written, by state (succeeded, retrying, failed, dead, rejected, unrouted, pending)."}, []string{"state"})
	m.deliveries = make(map[State]prometheus.Counter)
	for _, s := range []State{StatePending, StateRetrying, StateSucceeded, StateFailed, StateDead, StateRejected, StateUnrouted} {
		m.deliveries[s] = deliveries.WithLabelValues(string(s))
	}
	gauges := []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_queue_deliveries", Help: "Deliveries waiting in memory."},
			func() float64 { n, _ := r.sched.len(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_queue_bytes", Help: "Payload bytes waiting in memory."},
			func() float64 { _, b := r.sched.len(); return float64(b) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_queue_held", Help: "Deliveries of a backlogged endpoint waiting in memory without their payload; the acknowledged LSN waits for them."},
			func() float64 { n, _ := r.sched.heldCount(); return float64(n) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "outbox_relay_held_total", Help: "Deliveries that waited in memory without their payload instead of spilling at once."},
			func() float64 { _, n := r.sched.heldCount(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_in_flight", Help: "HTTP attempts under way."},
			func() float64 { return float64(r.sched.inFlight()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_unacknowledged_transactions", Help: "Transactions holding the acknowledged LSN back."},
			func() float64 { return float64(r.wm.pending()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outbox_relay_active", Help: "1 when this relay streams, 0 when it stands by or starts."},
			func() float64 {
				if r.State() == "active" {
					return 1
				}
				return 0
			}),
	}
	for _, c := range append(gauges, m.eventsReceived, deliveries, m.attemptsByClass, m.attemptDuration, m.commitToDeliver,
		m.spilled, m.loaded, m.breakerTransitions, m.restartSkipped, m.slotLagBytes, m.slotRetainedWAL, m.ackAge, m.statusWriteSecs) {
		reg.MustRegister(c)
	}
	return m
}

// written accounts for a batch of durable rows.
func (m *metrics) written(rows []*delivery) {
	for _, d := range rows {
		if c := m.deliveries[d.state]; c != nil {
			c.Inc()
		}
		if d.state == StateSucceeded && !d.committedAt.IsZero() {
			m.commitToDeliver.Observe(d.completed.Sub(d.committedAt).Seconds())
		}
	}
}

// slotLoop refreshes the slot gauges and warns when retained WAL crosses
// the configured threshold.
func (r *Relay) slotLoop(ctx context.Context) {
	t := time.NewTicker(r.cfg.SlotCheckInterval)
	defer t.Stop()
	warned := false
	for {
		var lag, retained float64
		err := r.pool.QueryRow(ctx, `SELECT coalesce(pg_current_wal_lsn() - confirmed_flush_lsn, 0)::float8,
coalesce(pg_current_wal_lsn() - restart_lsn, 0)::float8 FROM pg_replication_slots WHERE slot_name = $1`, r.cfg.SlotName).Scan(&lag, &retained)
		if err == nil {
			r.metrics.slotLagBytes.Set(lag)
			r.metrics.slotRetainedWAL.Set(retained)
			if over := r.cfg.SlotWarnBytes > 0 && retained >= float64(r.cfg.SlotWarnBytes); over && !warned {
				r.log.Warn("replication slot retains a lot of WAL; the relay is behind or stopped — see max_slot_wal_keep_size in the README",
					slog.String("slot", r.cfg.SlotName), slog.Float64("retained_bytes", retained), slog.Int64("threshold_bytes", r.cfg.SlotWarnBytes))
				warned = true
			} else if !over {
				warned = false
			}
		}
		if st := r.stream.Status(); !st.LastStatusAt.IsZero() {
			r.metrics.ackAge.Set(time.Since(st.LastStatusAt).Seconds())
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
