package bench

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Scale (issues 4 and 6): backlogs of several sizes and several steady
// rates in one run, and backlogs spread over many endpoints of many
// tenants, for the relay (drain-many) and the polling peer
// (peer-drain-many).
//
// Runs are planned phase by phase in KnownPhases order; a backlog phase
// runs once per size in Config.EventCounts, a steady phase once per rate
// in Config.Rates, every other phase once (at the first size and rate).
// Each such run is a round; event ids carry the round in their tag, so no
// two rounds share an id. The figures of every round are in
// Result.Backlogs and Result.Steady; the older top-level fields (Bare,
// Drain, Latency, ...) keep the first size's and the first rate's.

const (
	PhaseDrainMany     = "drain-many"      // the relay drains a backlog spread over Endpoints endpoints
	PhasePeerDrainMany = "peer-drain-many" // the polling peer drains the same
)

// Tags of the scale phases' event ids (the base tags; the round goes in
// bits 16-23, see run.tag).
const (
	tagDrainMany     uint32 = 0xbe0000a1
	tagPeerDrainMany uint32 = 0xbe0000a2
)

// Targets of issues 4 and 6.
const (
	TargetIssue6DrainRatio = 0.8 // relay backlog events/s ≥ 0.8 × bare (issue 6)
	TargetManyRatio        = 0.8 // many-endpoint drain ≥ 0.8 × single-endpoint drain, same run (issue 4)
)

// TargetP99At is issue 6's relay p99 target at a steady rate, or 0 when
// the issue sets none for that rate.
func TargetP99At(rate int) time.Duration {
	switch rate {
	case 1000:
		return 5 * time.Millisecond
	case 2500:
		return 30 * time.Millisecond
	}
	return 0
}

// manyRouting is how drain-many and peer-drain-many route: every outbox
// row names its endpoint in endpoint_id.
const manyRouting = "endpoint_id"

func backlogPhase(p string) bool {
	switch p {
	case PhaseBare, PhaseDrain, PhaseDrainMany, PhasePeerDrain, PhasePeerDrainMany:
		return true
	}
	return false
}

func steadyPhase(p string) bool {
	switch p {
	case PhaseLatency, PhaseBareLatency, PhasePeerLatency:
		return true
	}
	return false
}

func (c *Config) scaleDefaults() {
	if len(c.EventCounts) == 0 {
		c.EventCounts = []int{c.Events}
	}
	c.Events = c.EventCounts[0]
	if len(c.Rates) == 0 {
		c.Rates = []int{c.Rate}
	}
	c.Rate = c.Rates[0]
	c.Endpoints = cmp.Or(c.Endpoints, 10_000)
	c.Tenants = cmp.Or(c.Tenants, 1_000)
	if c.Timeout == 0 {
		c.Timeout = max(5*time.Minute, time.Duration(slices.Max(c.EventCounts))*time.Millisecond)
	}
}

func (c Config) validateScale() []error {
	var errs []error
	for i, n := range c.EventCounts {
		if n <= 0 {
			errs = append(errs, fmt.Errorf("EventCounts[%d] must be positive (got %d)", i, n))
		}
	}
	for i, n := range c.Rates {
		if n <= 0 {
			errs = append(errs, fmt.Errorf("%s[%d] must be positive (got %d)", "Rates", i, n))
		}
	}
	if len(c.EventCounts) > 256 || len(c.Rates) > 256 {
		errs = append(errs, errors.New("EventCounts and Rates hold 256 entries at most"))
	}
	if c.Endpoints > 0 && c.Tenants > c.Endpoints {
		errs = append(errs, fmt.Errorf("%s must not exceed Endpoints (got %d tenants, %d endpoints)", "Tenants", c.Tenants, c.Endpoints))
	}
	if c.Endpoints == 0 && c.Tenants > 10_000 {
		errs = append(errs, fmt.Errorf("%s must not exceed Endpoints (got %d tenants, default 10,000 endpoints)", "Tenants", c.Tenants))
	}
	return errs
}

// producersFor is the steady producer's connection count at rate: the
// configured count, or by default one per 250 events/s, at least 4 (at
// 5,000/s, 16 connections kept the schedule on a shared 2-core machine
// where 4 reached ~3,000/s).
func producersFor(configured, rate int) int {
	if configured > 0 {
		return configured
	}
	return max(4, (rate+249)/250)
}

// newPool opens the bench's pool, large enough for the most producers any
// rate uses plus the peer's claim loops and the bench's own queries, so
// the producer never waits for a connection (its clock is already read).
func newPool(ctx context.Context, url string, cfg Config) (*pgxpool.Pool, error) {
	pc, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	most := 0
	for _, rate := range cfg.Rates {
		most = max(most, producersFor(cfg.Producers, rate))
	}
	pc.MaxConns = int32(max(4, most) + 4)
	return pgxpool.NewWithConfig(ctx, pc)
}

// scaleState is the part of a run the scale code owns.
type scaleState struct {
	base  Config // the configuration as given (after defaults)
	round int    // the running step's index in EventCounts or Rates
	// The many-endpoint set, once registered: endpoint n is manyIDs[n],
	// of tenant manyTenant[n], at <receiver>/ep/<n>.
	manyIDs    []string
	manyTenant []string
}

// step is one phase run at one size or rate.
type step struct {
	phase string
	round int
	label string // "drain (1,000,000 events)"; the phase alone when there is one size or rate
}

func (st step) String() string { return st.label }

// tag is base with the running round in bits 16-23.
func (r *run) tag(base uint32) uint32 { return base + uint32(r.round)<<16 }

// plan lists the steps of the run, in order.
func (r *run) plan() []step {
	r.base = r.cfg
	r.res.ScaleResult = &ScaleResult{EventCounts: r.cfg.EventCounts, Rates: r.cfg.Rates}
	var out []step
	// perValue adds one step of p per value, labelled with the value when
	// there are several.
	perValue := func(p string, values []int, unit string) {
		for i, n := range values {
			l := p
			if len(values) > 1 {
				l = fmt.Sprintf("%s (%s%s)", p, thousands(n), unit)
			}
			out = append(out, step{p, i, l})
		}
	}
	for _, p := range KnownPhases {
		if !slices.Contains(r.cfg.Phases, p) {
			continue
		}
		switch {
		case backlogPhase(p):
			perValue(p, r.cfg.EventCounts, " events")
		case steadyPhase(p):
			perValue(p, r.cfg.Rates, "/s")
		default:
			out = append(out, step{p, 0, p})
		}
	}
	return out
}

// at sets the run up for a step: its size or rate, its round, and a relay
// that is not running when a drain is about to start its own.
func (r *run) at(ctx context.Context, st step) error {
	b := r.base
	r.round = 0
	r.cfg.Events, r.cfg.Rate = b.EventCounts[0], b.Rates[0]
	switch {
	case backlogPhase(st.phase):
		r.round = st.round
		r.cfg.Events = b.EventCounts[st.round]
		if st.phase == PhaseDrain && st.round > 0 {
			r.backlog = false // this round's backlog is not in yet
		}
		if st.phase == PhaseDrain || st.phase == PhaseDrainMany {
			if err := r.stopRelayForDrain(); err != nil {
				return err
			}
		}
	case steadyPhase(st.phase):
		r.round = st.round
		r.cfg.Rate = b.Rates[st.round]
	}
	r.cfg.Producers = producersFor(b.Producers, r.cfg.Rate)
	if r.cfg.RelayExe != "" && st.phase != PhaseBare && st.phase != PhaseBareLatency {
		return r.readRelaySettings(ctx)
	}
	return nil
}

// stopRelayForDrain stops a running relay: a drain is timed from its
// relay's exec.
func (r *run) stopRelayForDrain() error {
	if r.relay == nil {
		return nil
	}
	if err := r.relay.exited(); err != nil {
		return err
	}
	ctx := context.Background()
	r.progress("stopping the relay: the next drain starts its own (%s)", r.slotLag(ctx))
	r.settleSlot(ctx)
	r.relay.stop(30 * time.Second)
	r.relay = nil
	return nil
}

// settleSlot lets the slot's restart_lsn catch up before the relay stops,
// so the next drain's relay does not start by decoding the whole previous
// backlog's WAL again (a logical slot's restart_lsn moves only past a
// running-transactions record the client has confirmed; CHECKPOINT writes
// one). It waits at most 20 s.
func (r *run) settleSlot(ctx context.Context) {
	if _, err := r.pool.Exec(ctx, `CHECKPOINT`); err != nil {
		r.progress("CHECKPOINT: %v", err)
		return
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		var restart int64
		err := r.pool.QueryRow(ctx, `SELECT coalesce(pg_current_wal_lsn() - restart_lsn, 0)::int8 FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name LIMIT 1`).Scan(&restart)
		if err != nil || restart < 1<<20 || time.Now().After(deadline) {
			r.progress("slot settled: %s", r.slotLag(ctx))
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// slotLag describes how far the slot's restart_lsn and confirmed_flush_lsn
// are behind the WAL end.
func (r *run) slotLag(ctx context.Context) string {
	var restart, confirmed int64
	err := r.pool.QueryRow(ctx, `SELECT coalesce(pg_current_wal_lsn() - restart_lsn, -1)::int8, coalesce(pg_current_wal_lsn() - confirmed_flush_lsn, -1)::int8
FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name LIMIT 1`).Scan(&restart, &confirmed)
	if err != nil {
		return "slot position unread: " + err.Error()
	}
	return fmt.Sprintf("slot restart_lsn %.1f MB and confirmed_flush_lsn %.1f MB behind the WAL end", float64(restart)/1e6, float64(confirmed)/1e6)
}

// record files the step's figures under its size or rate, and puts the
// first size's and rate's back in the top-level fields.
func (r *run) record(st step) {
	s := r.res.ScaleResult
	s.BenchPeakRSS = max(s.BenchPeakRSS, selfPeakRSS())
	switch {
	case backlogPhase(st.phase):
		b := s.backlogRound(st.round)
		first := s.Backlogs[0]
		switch st.phase {
		case PhaseBare:
			b.Bare = r.res.Bare
			r.res.Bare = first.Bare
		case PhaseDrain:
			b.Drain, b.DrainRSS = r.res.Drain, r.res.DrainRSS
			b.InsertPerSec, b.InsertWALPerEvent = r.res.InsertPerSec, r.res.InsertWALPerEvent
			r.res.Drain, r.res.DrainRSS = first.Drain, first.DrainRSS
			r.res.InsertPerSec, r.res.InsertWALPerEvent = first.InsertPerSec, first.InsertWALPerEvent
		case PhasePeerDrain:
			b.PeerDrain = r.res.PeerDrain
			r.res.PeerDrain = first.PeerDrain
		}
		b.ratios()
	case steadyPhase(st.phase):
		l := s.steadyRound(st.round)
		l.Producers = r.cfg.Producers
		first := s.Steady[0]
		switch st.phase {
		case PhaseLatency:
			l.Latency = r.res.Latency
			r.res.Latency = first.Latency
		case PhaseBareLatency:
			l.BareLatency = r.res.BareLatency
			r.res.BareLatency = first.BareLatency
		case PhasePeerLatency:
			l.PeerLatency = r.res.PeerLatency
			r.res.PeerLatency = first.PeerLatency
		}
	}
}

// ScaleResult holds every round's figures and the many-endpoint setup.
type ScaleResult struct {
	EventCounts []int `json:"event_counts"`
	Rates       []int `json:"rates"`
	// Set when a many-endpoint phase ran.
	Endpoints int    `json:"endpoints,omitempty"`
	Tenants   int    `json:"tenants,omitempty"`
	Routing   string `json:"many_routing,omitempty"`
	// RelaySettings are the relay's effective queue and concurrency
	// settings, as `outbox-relay config check` reports them for the
	// relay's command line.
	RelaySettings map[string]string `json:"relay_settings,omitempty"`
	Backlogs      []*BacklogRound   `json:"backlogs,omitempty"`
	Steady        []*SteadyRound    `json:"steady,omitempty"`
	// BenchPeakRSS is the bench process's own peak RSS (receiver
	// tallies, bare client, and the polling peer, which runs in it).
	BenchPeakRSS int64 `json:"bench_peak_rss_bytes,omitempty"`
}

// BacklogRound is the backlog phases at one size.
type BacklogRound struct {
	Events            int         `json:"events"`
	InsertPerSec      float64     `json:"insert_rows_per_s,omitempty"`
	InsertWALPerEvent float64     `json:"insert_wal_bytes_per_event,omitempty"`
	Bare              *Throughput `json:"bare,omitempty"`
	Drain             *Drain      `json:"drain,omitempty"`
	DrainRSS          int64       `json:"relay_peak_rss_drain_bytes,omitempty"` // the drain's relay process
	DrainMany         *ManyDrain  `json:"drain_many,omitempty"`
	PeerDrain         *PeerDrain  `json:"peer_drain,omitempty"`
	PeerDrainMany     *PeerDrain  `json:"peer_drain_many,omitempty"`

	RelayOverBare     float64 `json:"relay_over_bare,omitempty"`
	PeerOverBare      float64 `json:"peer_over_bare,omitempty"`
	RelayOverPeer     float64 `json:"relay_over_peer,omitempty"`
	ManyOverSingle    float64 `json:"many_over_single,omitempty"` // drain-many / drain
	ManyOverBare      float64 `json:"many_over_bare,omitempty"`
	ManyOverPeerMany  float64 `json:"many_over_peer_many,omitempty"` // drain-many / peer-drain-many
	PeerManyOverPeer  float64 `json:"peer_many_over_peer,omitempty"` // peer-drain-many / peer-drain
	PeerManyOverBare  float64 `json:"peer_many_over_bare,omitempty"`
	TargetRelayOvBare float64 `json:"target_relay_over_bare"`
	TargetRelayOvPeer float64 `json:"target_relay_over_peer"`
	TargetManyOvOne   float64 `json:"target_many_over_single"`
}

// ManyDrain is the relay's drain of a backlog spread over many endpoints.
type ManyDrain struct {
	Drain
	Endpoints      int     `json:"endpoints"`
	Tenants        int     `json:"tenants"`
	InsertPerSec   float64 `json:"insert_rows_per_s"`
	PeakRSS        int64   `json:"relay_peak_rss_bytes"`  // the drain's relay process
	RestartSkipped float64 `json:"relay_restart_skipped"` // replayed deliveries of earlier phases, skipped; -1 if unread
}

// SteadyRound is the steady phases at one rate.
type SteadyRound struct {
	Rate        int      `json:"rate"`
	Producers   int      `json:"producers"`
	Latency     *Latency `json:"latency,omitempty"`
	BareLatency *Latency `json:"bare_latency,omitempty"`
	PeerLatency *Latency `json:"peer_latency,omitempty"`
	TargetP99Ms float64  `json:"target_p99_ms,omitempty"` // issue 6, relay
}

func (s *ScaleResult) backlogRound(i int) *BacklogRound {
	for len(s.Backlogs) <= i {
		s.Backlogs = append(s.Backlogs, &BacklogRound{Events: s.EventCounts[len(s.Backlogs)],
			TargetRelayOvBare: TargetIssue6DrainRatio, TargetRelayOvPeer: TargetRelayOverPeer, TargetManyOvOne: TargetManyRatio})
	}
	return s.Backlogs[i]
}

func (s *ScaleResult) steadyRound(i int) *SteadyRound {
	for len(s.Steady) <= i {
		rate := s.Rates[len(s.Steady)]
		s.Steady = append(s.Steady, &SteadyRound{Rate: rate, TargetP99Ms: ms(TargetP99At(rate))})
	}
	return s.Steady[i]
}

func ratio(a, b float64) float64 {
	if a <= 0 || b <= 0 {
		return 0
	}
	return a / b
}

func (b *BacklogRound) ratios() {
	var bare, relay, peer, many, peerMany float64
	if b.Bare != nil {
		bare = b.Bare.PerSec
	}
	if b.Drain != nil {
		relay = b.Drain.PerSec
	}
	if b.PeerDrain != nil {
		peer = b.PeerDrain.PerSec
	}
	if b.DrainMany != nil {
		many = b.DrainMany.PerSec
	}
	if b.PeerDrainMany != nil {
		peerMany = b.PeerDrainMany.PerSec
	}
	b.RelayOverBare, b.PeerOverBare, b.RelayOverPeer = ratio(relay, bare), ratio(peer, bare), ratio(relay, peer)
	b.ManyOverSingle, b.ManyOverBare, b.ManyOverPeerMany = ratio(many, relay), ratio(many, bare), ratio(many, peerMany)
	b.PeerManyOverPeer, b.PeerManyOverBare = ratio(peerMany, peer), ratio(peerMany, bare)
}

// clean reports whether every round beyond the top-level fields saw every
// event exactly once, at its own endpoint, and every status row succeeded.
func (s *ScaleResult) clean() bool {
	if s == nil {
		return true
	}
	ok := true
	for _, b := range s.Backlogs {
		if b.Bare != nil {
			ok = ok && b.Bare.Counts.Clean()
		}
		if b.Drain != nil {
			ok = ok && b.Drain.Counts.Clean() && b.Drain.OtherRows == 0
		}
		if d := b.DrainMany; d != nil {
			ok = ok && d.Counts.Clean() && d.OtherRows == 0
		}
		for _, p := range []*PeerDrain{b.PeerDrain, b.PeerDrainMany} {
			if p != nil {
				ok = ok && p.Counts.Clean() && p.LeftRows == 0
			}
		}
	}
	for _, l := range s.Steady {
		for _, x := range []*Latency{l.Latency, l.BareLatency, l.PeerLatency} {
			if x != nil {
				ok = ok && x.Counts.Clean()
			}
		}
	}
	return ok
}

// registerMany creates Endpoints endpoints across Tenants tenants, all at
// the receiver under distinct paths, once. Endpoint n is ep_m<n> of tenant
// tm<n mod Tenants>, at /ep/<n>, signed with the bench's secret.
func (r *run) registerMany(ctx context.Context) error {
	if r.manyIDs != nil {
		return nil
	}
	n, m := r.cfg.Endpoints, r.cfg.Tenants
	r.progress("registering %s endpoints across %s tenants, at %s/ep/<n>", thousands(n), thousands(m), r.rcvBase())
	_, err := r.pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets)
SELECT 'ep_m' || i, 'tm' || (i % $2), $3 || '/ep/' || i, ARRAY[$4] FROM generate_series(0, $1 - 1) AS i`,
		n, m, r.rcvBase(), r.secretText)
	if err != nil {
		return fmt.Errorf("register %d endpoints: %w", n, err)
	}
	tenants := make([]string, m)
	for i := range tenants {
		tenants[i] = "tm" + strconv.Itoa(i)
	}
	r.manyIDs, r.manyTenant = make([]string, n), make([]string, n)
	for i := range n {
		r.manyIDs[i], r.manyTenant[i] = "ep_m"+strconv.Itoa(i), tenants[i%m]
	}
	s := r.res.ScaleResult
	s.Endpoints, s.Tenants, s.Routing = n, m, manyRouting
	return nil
}

func (r *run) rcvBase() string { return "http://" + r.rcv.ln.Addr().String() }

// checkRoute counts a request that arrived at another endpoint's path than
// its event's: event seq belongs at /ep/<seq mod routes>.
func (tl *tally) checkRoute(path string, h map[string][]string) {
	seq, ok := tl.seq(firstHeader(h, "Webhook-Id"))
	if !ok {
		return // record counts it as unexpected
	}
	rest, ok := strings.CutPrefix(path, "/ep/")
	if !ok {
		tl.misrouted.Add(1)
		return
	}
	n, err := strconv.Atoi(rest)
	if err != nil || n != seq%tl.routes {
		tl.misrouted.Add(1)
	}
}

func firstHeader(h map[string][]string, key string) string {
	if v := h[key]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// copyMany inserts n events of tag into table in TxnRows-row COPY
// transactions while nothing delivers; event seq names endpoint seq mod
// Endpoints (and its tenant). It returns rows per second.
func (r *run) copyMany(ctx context.Context, table pgx.Identifier, tag uint32, n int) (float64, error) {
	r.progress("inserting %s events into %s, round robin over %s endpoints of %s tenants, in %d-row transactions",
		thousands(n), table.Sanitize(), thousands(r.cfg.Endpoints), thousands(r.cfg.Tenants), r.cfg.TxnRows)
	conn, err := r.pool.Acquire(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Release()
	start := time.Now()
	cols := []string{"id", "tenant_id", "event_type", "payload", "endpoint_id"}
	bodies := make([][]byte, r.cfg.TxnRows)
	for from := 0; from < n; from += r.cfg.TxnRows {
		k := min(r.cfg.TxnRows, n-from)
		now := time.Now().UnixNano()
		for i := range k {
			bodies[i] = appendBody(bodies[i][:0], from+i, now, r.cfg.BodyBytes)
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			_, err := tx.CopyFrom(ctx, table, cols, pgx.CopyFromSlice(k, func(i int) ([]any, error) {
				ep := (from + i) % len(r.manyIDs)
				return []any{eventID(tag, from+i), r.manyTenant[ep], "bench.event", bodies[i], r.manyIDs[ep]}, nil
			}))
			return err
		})
		if err != nil {
			return 0, fmt.Errorf("insert backlog: %w", err)
		}
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

// drainMany is the drain phase over many endpoints: the backlog is spread
// round robin over Endpoints endpoints of Tenants tenants (by endpoint_id),
// inserted while no relay runs; a fresh relay is timed from exec until the
// receiver has every event, each at its own endpoint's path, and every
// status row is succeeded.
func (r *run) drainMany(ctx context.Context) error {
	if r.relay != nil {
		return errors.New("the relay must not run before the drain")
	}
	if err := r.registerMany(ctx); err != nil {
		return err
	}
	tag := r.tag(tagDrainMany)
	n := r.cfg.Events
	insertRate, err := r.copyMany(ctx, pgx.Identifier{"relay", "outbox"}, tag, n)
	if err != nil {
		return err
	}
	tl := newTally(tag, n, r.cfg.BodyBytes, false, r.verifier())
	tl.routes = r.cfg.Endpoints
	r.rcv.expect(tl)
	r.progress("relay drains %s events over %s endpoints (%s)", thousands(n), thousands(r.cfg.Endpoints), strings.Join(r.relayArgs("<ops>"), " "))
	drain, err := r.timeRelayDrain(ctx, tl, tag, n)
	if err != nil {
		return err
	}
	d := &ManyDrain{
		Drain:          *drain,
		Endpoints:      r.cfg.Endpoints,
		Tenants:        r.cfg.Tenants,
		InsertPerSec:   insertRate,
		RestartSkipped: r.relay.metric(ctx, "outbox_relay_restart_skipped_total"),
	}
	d.PeakRSS, _, _ = r.relay.memory()
	r.res.ScaleResult.backlogRound(r.round).DrainMany = d
	return nil
}

// peerDrainMany is peer-drain over many endpoints: the same spread backlog
// in the peer's table; the peer routes each row to its endpoint_id's URL,
// read once from relay.endpoints before it starts.
func (r *run) peerDrainMany(ctx context.Context) error {
	if err := r.peerSetup(ctx); err != nil {
		return err
	}
	if err := r.registerMany(ctx); err != nil {
		return err
	}
	tag := r.tag(tagPeerDrainMany)
	n := r.cfg.Events
	insertRate, err := r.copyMany(ctx, pgx.Identifier{peerTable}, tag, n)
	if err != nil {
		return err
	}
	if _, err := r.pool.Exec(ctx, `ANALYZE `+pgx.Identifier{peerTable}.Sanitize()); err != nil {
		return err
	}
	urls := make(map[string]string, r.cfg.Endpoints)
	rows, err := r.pool.Query(ctx, `SELECT id, url FROM relay.endpoints`)
	if err != nil {
		return fmt.Errorf("read endpoints: %w", err)
	}
	var id, url string
	if _, err := pgx.ForEachRow(rows, []any{&id, &url}, func() error { urls[id] = url; return nil }); err != nil {
		return fmt.Errorf("read endpoints: %w", err)
	}

	tl := newTally(tag, n, r.cfg.BodyBytes, false, r.verifier())
	tl.routes = r.cfg.Endpoints
	r.rcv.expect(tl)
	r.progress("polling peer drains %s events over %s endpoints (%d workers)", thousands(n), thousands(r.cfg.Endpoints), r.cfg.Workers)
	cfg := r.peerConfig()
	cfg.URL, cfg.Endpoints = "", urls
	d, err := r.timePeerDrain(ctx, tl, cfg, n, insertRate)
	if err != nil {
		return err
	}
	r.res.ScaleResult.backlogRound(r.round).PeerDrainMany = d
	return nil
}

// readRelaySettings records, once, the relay's effective queue and
// concurrency settings for its command line, from the binary's own
// `config check` (so defaults, presets and OUTBOX_RELAY_* variables are
// what the relay will use).
func (r *run) readRelaySettings(ctx context.Context) error {
	s := r.res.ScaleResult
	if s.RelaySettings != nil {
		return nil
	}
	args := r.relayArgs("127.0.0.1:0")[len(r.cfg.RelayPrefix)+1:] // after "run"
	out, err := exec.CommandContext(ctx, r.cfg.RelayExe, append([]string{"config", "check"}, args...)...).Output()
	if err != nil {
		return fmt.Errorf("outbox-relay config check: %w", err)
	}
	want := []string{"workers", "queue-events", "queue-bytes", "endpoint-max-in-flight", "overflow", "preset"}
	s.RelaySettings = make(map[string]string)
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && slices.Contains(want, f[0]) && f[1] != "#" {
			s.RelaySettings[f[0]] = f[1]
		}
	}
	return nil
}

// selfPeakRSS is this process's peak RSS (VmHWM) in bytes, or 0.
func selfPeakRSS() int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(data)) {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			if f := strings.Fields(rest); len(f) >= 1 {
				kb, _ := strconv.ParseInt(f[0], 10, 64)
				return kb << 10
			}
		}
	}
	return 0
}

// thousands formats n with comma separators.
func thousands(n int) string {
	s := strconv.Itoa(n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	if neg {
		b.WriteByte('-')
	}
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
