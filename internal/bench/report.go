package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strings"
	"time"
)

// Targets from the benchmark issues, for the PASS/MISS column. The first
// benchmark issue set the floor (drain ≥ 0.7 × bare, p99 ≤ 10 ms at
// 1,000/s); issue 6 raised both (TargetIssue6DrainRatio, TargetP99At), and
// the report judges against issue 6.
const (
	TargetDrainRatio  = 0.7  // relay events/s ≥ 0.7 × bare (the floor)
	TargetCPUPerEvent = 40.0 // µs of relay CPU per delivered event (issue 6)
)

// Result holds one run's figures. Fields are nil for phases not run.
type Result struct {
	CPUs             int               `json:"cpus"`
	GoVersion        string            `json:"go"`
	PostgresVersion  string            `json:"postgres"`
	Phases           []string          `json:"phases"`
	Events           int               `json:"events"`
	BodyBytes        int               `json:"body_bytes"`
	Workers          int               `json:"workers"`
	TxnRows          int               `json:"txn_rows"`
	Rate             int               `json:"rate"`
	DurationSecs     float64           `json:"duration_s"`
	VerifySignatures bool              `json:"verify_signatures"`
	ReceiverJSON     bool              `json:"receiver_json"`
	BareClient       string            `json:"bare_client"`
	PGSettings       map[string]string `json:"pg_settings,omitempty"`

	InsertPerSec      float64 `json:"insert_rows_per_s,omitempty"`
	InsertWALPerEvent float64 `json:"insert_wal_bytes_per_event,omitempty"`

	Bare        *Throughput `json:"bare,omitempty"`
	Drain       *Drain      `json:"drain,omitempty"`
	Latency     *Latency    `json:"latency,omitempty"`
	BareLatency *Latency    `json:"bare_latency,omitempty"`
	Fairness    *Fairness   `json:"fairness,omitempty"`
	PeerDrain   *PeerDrain  `json:"peer_drain,omitempty"`
	PeerLatency *Latency    `json:"peer_latency,omitempty"`
	Recovery    *Faulted    `json:"recovery,omitempty"`
	Takeover    *Faulted    `json:"takeover,omitempty"`
	RateLimit   *RateLimit  `json:"ratelimit,omitempty"`
	Memory      *Memory     `json:"memory,omitempty"`

	DrainRSS     int64 `json:"relay_peak_rss_after_drain_bytes,omitempty"`
	RelayPeakRSS int64 `json:"relay_peak_rss_bytes,omitempty"`

	*ScaleResult // scale.go: every backlog size and rate, many endpoints
}

// Counts is what the receiver saw in one phase.
type Counts struct {
	Requests   int64 `json:"requests"`
	Distinct   int64 `json:"distinct"`
	Duplicates int64 `json:"duplicates"`
	Missing    int64 `json:"missing"`
	Unexpected int64 `json:"unexpected"`
	BadBodies  int64 `json:"bad_bodies"`
	BadSigs    int64 `json:"bad_signatures"`
	Misrouted  int64 `json:"misrouted"` // arrived at another endpoint's path (drain-many, peer-drain-many)
}

func (c *Counts) count(tl *tally) {
	c.Requests = tl.requests.Load()
	c.Distinct = tl.distinct.Load()
	c.Duplicates = tl.dups.Load()
	c.Missing = int64(tl.n) - c.Distinct
	c.Unexpected = tl.unexpected.Load()
	c.BadBodies = tl.badBody.Load()
	c.BadSigs = tl.badSig.Load()
	c.Misrouted = tl.misrouted.Load()
}

// Clean reports whether every event arrived exactly once, intact.
func (c Counts) Clean() bool {
	return c.Duplicates == 0 && c.Missing == 0 && c.Unexpected == 0 && c.BadBodies == 0 && c.BadSigs == 0 && c.Misrouted == 0
}

// Throughput is a backlog run.
type Throughput struct {
	Counts
	Seconds float64   `json:"seconds"`
	PerSec  float64   `json:"events_per_s"`
	CPU     *CPUSplit `json:"cpu,omitempty"` // where the machine's CPU went, per event
}

// Cost is the relay's resources over a phase.
type Cost struct {
	CPUSecs       float64 `json:"relay_cpu_s"`
	CPUPer10k     float64 `json:"relay_cpu_s_per_10k"`
	CPUPerEvent   float64 `json:"relay_cpu_us_per_event"`
	WALBytes      int64   `json:"wal_bytes"`
	WALPerEvent   float64 `json:"wal_bytes_per_event"`
	EventsCounted int     `json:"events"`
}

// Drain is the relay's backlog run.
type Drain struct {
	Throughput
	ReceivedSecs     float64 `json:"received_s"`      // until the receiver had every event
	FirstArrivalSecs float64 `json:"first_arrival_s"` // relay exec to first delivery
	OtherRows        int     `json:"rows_not_succeeded"`
	Cost
	Spilled float64 `json:"spilled"` // relay metric; -1 if unread
	Loaded  float64 `json:"loaded"`
}

// Latency is a steady-rate run.
type Latency struct {
	Counts
	Sent       int     `json:"sent"`
	RatePerSec float64 `json:"achieved_rate"`
	P50        float64 `json:"p50_ms"`
	P99        float64 `json:"p99_ms"`
	P999       float64 `json:"p999_ms"`
	Max        float64 `json:"max_ms"`
	// CommitP50 and CommitP99 are the steady producer's INSERT (and
	// fsync'd COMMIT) times, the part of commit-to-delivery the relay
	// does not see; zero where no producer commits.
	CommitP50 float64 `json:"commit_p50_ms,omitempty"`
	CommitP99 float64 `json:"commit_p99_ms,omitempty"`
	// AfterP50, AfterP99 and AfterP999 are commit-to-delivery counted per
	// event from its COMMIT's return to the producer (P50 and the rest
	// count from before the INSERT); zero where no producer commits.
	AfterP50  float64 `json:"after_commit_p50_ms,omitempty"`
	AfterP99  float64 `json:"after_commit_p99_ms,omitempty"`
	AfterP999 float64 `json:"after_commit_p999_ms,omitempty"`
	Cost      *Cost   `json:"cost,omitempty"`
	// ClientCPU is the bare client's CPU per request, in µs, measured in
	// a process of its own; set by the bare-latency phase.
	ClientCPU float64 `json:"client_cpu_us_per_request,omitempty"`
	// CPU is where the machine's CPU went, per event sent; set by the
	// fairness phase.
	CPU *CPUSplit `json:"cpu,omitempty"`
	// Autovacuums is how many autovacuum and autoanalyze runs finished in
	// the database during the run; set by the fairness phase.
	Autovacuums int64 `json:"autovacuum_runs,omitempty"`
}

func latencyOf(tl *tally, sent int, rate float64) *Latency {
	l := &Latency{Sent: sent, RatePerSec: rate}
	l.count(tl)
	lat := tl.latencies()
	if len(lat) > 0 {
		l.P50, l.P99, l.P999 = ms(quantile(lat, 0.50)), ms(quantile(lat, 0.99)), ms(quantile(lat, 0.999))
		l.Max = ms(lat[len(lat)-1])
	}
	return l
}

// quantile is the nearest-rank quantile of sorted values.
func quantile(sorted []time.Duration, q float64) time.Duration {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// Clean reports whether every phase run saw every event exactly once,
// intact, and (for the relay) every status row succeeded.
func (r *Result) Clean() bool {
	ok := true
	if r.Bare != nil {
		ok = ok && r.Bare.Counts.Clean()
	}
	if r.Drain != nil {
		ok = ok && r.Drain.Counts.Clean() && r.Drain.OtherRows == 0
	}
	if r.Latency != nil {
		ok = ok && r.Latency.Counts.Clean()
	}
	if r.BareLatency != nil {
		ok = ok && r.BareLatency.Counts.Clean()
	}
	if f := r.Fairness; f != nil {
		ok = ok && f.Idle.Counts.Clean() && f.Busy.Counts.Clean() && f.A.Clean()
	}
	if r.PeerDrain != nil {
		ok = ok && r.PeerDrain.Counts.Clean() && r.PeerDrain.LeftRows == 0
	}
	if r.PeerLatency != nil {
		ok = ok && r.PeerLatency.Counts.Clean()
	}
	return ok && r.faultsClean() && r.ScaleResult.clean()
}

// Ratio is the relay's drain rate over the bare client's, or 0.
func (r *Result) Ratio() float64 {
	if r.Drain == nil || r.Bare == nil || r.Bare.PerSec == 0 {
		return 0
	}
	return r.Drain.PerSec / r.Bare.PerSec
}

// PeerRatio is the polling peer's drain rate over the bare client's, or 0.
func (r *Result) PeerRatio() float64 {
	if r.PeerDrain == nil || r.Bare == nil || r.Bare.PerSec == 0 {
		return 0
	}
	return r.PeerDrain.PerSec / r.Bare.PerSec
}

// RelayOverPeer is the relay's drain rate over the polling peer's, or 0.
func (r *Result) RelayOverPeer() float64 {
	if r.PeerDrain == nil || r.Drain == nil || r.PeerDrain.PerSec == 0 {
		return 0
	}
	return r.Drain.PerSec / r.PeerDrain.PerSec
}

// TargetRelayOverPeer: relay backlog throughput ≥ 1.2 × the polling peer (issue 6).
const TargetRelayOverPeer = 1.2

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "MISS"
}

// Table writes the figures for people.
func (r *Result) Table(w io.Writer) {
	fmt.Fprintf(w, "\noutbox-relay bench: %d CPUs, %s, PostgreSQL %s (durable: fsync on)\n", r.CPUs, r.GoVersion, r.PostgresVersion)
	if len(r.PGSettings) > 0 {
		fmt.Fprintf(w, "cluster settings besides the defaults: %s\n", settingsText(r.PGSettings))
	}
	if r.Bare != nil || r.Drain != nil {
		fmt.Fprintf(w, "backlog of %d events, ", r.Events)
	}
	fmt.Fprintf(w, "%d-byte bodies, %d workers, signatures verified by receiver: %t, bodies decoded by receiver: %t, bare client: %s\n", r.BodyBytes, r.Workers, r.VerifySignatures, r.ReceiverJSON, r.BareClient)
	if r.InsertPerSec > 0 {
		fmt.Fprintf(w, "backlog inserted at %.0f rows/s in %d-row transactions, %.0f WAL bytes/event\n", r.InsertPerSec, r.TxnRows, r.InsertWALPerEvent)
	}
	if r.Bare != nil || r.Drain != nil {
		fmt.Fprintf(w, "\nbacklog drain                     events/s  seconds     dups  missing  other\n")
		if r.Bare != nil {
			b := r.Bare
			fmt.Fprintf(w, "  bare HTTP client (ceiling)  %12.0f %8.2f %8d %8d %6d\n", b.PerSec, b.Seconds, b.Duplicates, b.Missing, b.Unexpected+b.BadBodies)
		}
		if d := r.Drain; d != nil {
			fmt.Fprintf(w, "  relay                       %12.0f %8.2f %8d %8d %6d\n", d.PerSec, d.Seconds, d.Duplicates, d.Missing, d.Unexpected+d.BadBodies+d.BadSigs+int64(d.OtherRows))
			fmt.Fprintf(w, "    first delivery %.2fs after exec; receiver complete at %.2fs; status rows complete at %.2fs\n",
				d.FirstArrivalSecs, d.ReceivedSecs, d.Seconds)
			if d.Spilled >= 0 {
				fmt.Fprintf(w, "    spilled to relay.deliveries and loaded back: %.0f / %.0f\n", d.Spilled, d.Loaded)
			}
		}
		if d := r.PeerDrain; d != nil {
			fmt.Fprintf(w, "  polling peer (bench/pollrelay) %9.0f %8.2f %8d %8d %6d\n", d.PerSec, d.Seconds, d.Duplicates, d.Missing, d.Unexpected+d.BadBodies+d.BadSigs+int64(d.LeftRows))
			fmt.Fprintf(w, "    first delivery %.2fs after start; receiver complete at %.2fs; table empty at %.2fs; %d claims, %d failed posts; %.0f WAL bytes/event\n",
				d.FirstArrivalSecs, d.ReceivedSecs, d.Seconds, d.Claims, d.FailedPosts, d.WALPerEvent)
		}
		if ratio := r.Ratio(); ratio > 0 {
			fmt.Fprintf(w, "  relay / bare                %11.2fx   target >= %.2fx  %s (floor %.2fx %s)\n", ratio,
				TargetIssue6DrainRatio, verdict(ratio >= TargetIssue6DrainRatio), TargetDrainRatio, verdict(ratio >= TargetDrainRatio))
		}
		if ratio := r.PeerRatio(); ratio > 0 {
			fmt.Fprintf(w, "  peer / bare                 %11.2fx\n", ratio)
		}
		if ratio := r.RelayOverPeer(); ratio > 0 {
			fmt.Fprintf(w, "  relay / peer                %11.2fx   target >= %.2fx  %s\n", ratio, TargetRelayOverPeer, verdict(ratio >= TargetRelayOverPeer))
		}
	}
	r.cpuTable(w)
	if r.Latency != nil || r.BareLatency != nil || r.PeerLatency != nil {
		fmt.Fprintf(w, "\nsteady latency, %d/s for %.0fs     count  rate/s   p50 ms   p99 ms p99.9 ms   max ms  dups missing  commit p50/p99 ms  from COMMIT p50/p99/p99.9 ms\n", r.Rate, r.DurationSecs)
		row := func(name string, l *Latency) {
			fmt.Fprintf(w, "  %-30s %7d %7.0f %8.2f %8.2f %8.2f %8.2f %5d %7d%s\n", name, l.Distinct, l.RatePerSec, l.P50, l.P99, l.P999, l.Max, l.Duplicates, l.Missing, l.commitText())
		}
		if r.Latency != nil {
			row("relay, commit -> delivered", r.Latency)
		}
		if r.BareLatency != nil {
			row("bare POST (no database)", r.BareLatency)
		}
		if r.PeerLatency != nil {
			row("polling peer, commit -> deliv.", r.PeerLatency)
		}
		if r.Latency != nil && r.PeerLatency != nil && r.Latency.P99 > 0 {
			fmt.Fprintf(w, "  peer p99 / relay p99: %.1fx\n", r.PeerLatency.P99/r.Latency.P99)
		}
		if t, l := TargetP99At(r.Rate), r.Latency; l != nil && t > 0 {
			fmt.Fprintf(w, "  relay p99 target <= %s at %d/s: %s from before the INSERT, %s from the COMMIT's return\n", t, r.Rate,
				verdict(l.P99 <= ms(t)), verdict(l.AfterP99 <= ms(t)))
		}
	}
	if f := r.Fairness; f != nil {
		fmt.Fprintf(w, "\nfairness (relay): tenant B %d/s for %.0fs to a fast endpoint; tenant A %d events to a receiver answering in %.0f ms\n",
			r.Rate, r.DurationSecs, f.Backlog, f.SlowMillis)
		fmt.Fprintf(w, "                                     count  rate/s   p50 ms   p99 ms p99.9 ms   max ms  dups missing  commit p50/p99 ms  from COMMIT p50/p99/p99.9 ms\n")
		row := func(name string, l *Latency) {
			fmt.Fprintf(w, "  %-30s %7d %7.0f %8.2f %8.2f %8.2f %8.2f %5d %7d%s\n", name, l.Distinct, l.RatePerSec, l.P50, l.P99, l.P999, l.Max, l.Duplicates, l.Missing, l.commitText())
		}
		row("B, A idle", f.Idle)
		row("B, A's backlog draining", f.Busy)
		for _, x := range []struct {
			name string
			l    *Latency
		}{{"A idle", f.Idle}, {"A draining", f.Busy}} {
			if c := x.l.CPU; c != nil {
				fmt.Fprintf(w, "  CPU per B event, %-10s  relay %.1f us, Postgres %.1f us (walsender %.1f, relay's SQL %.1f, producers %.1f, live autovacuum workers %.1f, checkpointer+writers %.1f), bench process %.1f us; of %.1f us available; %d autovacuum/autoanalyze runs ended\n",
					x.name, c.Relay, c.Postgres, c.Walsender, c.RelaySQL, c.Clients, c.Autovacuum, c.Background, c.Bench, c.Available, x.l.Autovacuums)
			}
		}
		fmt.Fprintf(w, "  A delivered: %d when B started, %d when B ended; all %d after %.1fs (dups %d, missing %d)\n",
			f.AAtStart, f.AAtEnd, f.Backlog, f.ADrainSecs, f.A.Duplicates, f.A.Missing)
		if f.AReadSecs >= 0 {
			fmt.Fprintf(w, "  B's run began once the relay had read all of A's backlog from the WAL, %.2fs after its insert ended\n", f.AReadSecs)
		}
		if f.Spilled >= 0 {
			fmt.Fprintf(w, "  spilled to relay.deliveries and loaded back during the phase: %.0f / %.0f\n", f.Spilled, f.Loaded)
		}
		fmt.Fprintf(w, "  B p99 with backlog / idle: %.2fx   target <= %.1fx  %s; counted from each COMMIT's return: %.2fx %s\n",
			f.P99Ratio, f.TargetRatio, verdict(f.P99Ratio <= f.TargetRatio), f.AfterRatio, verdict(f.AfterRatio <= f.TargetRatio))
	}
	if r.Drain != nil || r.Latency != nil || r.BareLatency != nil && r.BareLatency.ClientCPU > 0 {
		fmt.Fprintf(w, "\nrelay cost                 CPU s/10k events  us/event  WAL bytes/event (relay's writes + inserts)\n")
		if d := r.Drain; d != nil {
			fmt.Fprintf(w, "  backlog drain            %16.2f %9.1f %9.0f (relay only)\n", d.CPUPer10k, d.CPUPerEvent, d.WALPerEvent)
		}
		if l := r.Latency; l != nil && l.Cost != nil {
			fmt.Fprintf(w, "  steady %5d/s            %16.2f %9.1f %9.0f (inserts and relay)\n", r.Rate, l.Cost.CPUPer10k, l.Cost.CPUPerEvent, l.Cost.WALPerEvent)
		}
		if b := r.BareLatency; b != nil && b.ClientCPU > 0 {
			fmt.Fprintf(w, "  bare client %5d/s       %16.2f %9.1f           (%s, a process of its own with one P: one POST per event, no database)\n", r.Rate, b.ClientCPU/100, b.ClientCPU, r.BareClient)
		}
		if r.RelayPeakRSS > 0 {
			fmt.Fprintf(w, "  relay peak RSS: %.1f MiB (the last relay process)", float64(r.RelayPeakRSS)/(1<<20))
			if r.DrainRSS > 0 {
				fmt.Fprintf(w, "; the drain's relay after the drain: %.1f MiB", float64(r.DrainRSS)/(1<<20))
			}
			fmt.Fprintln(w)
		}
	}
	r.scaleTable(w)
	r.faultsTable(w)
}

// Line is the machine-readable result: "BENCH_RESULT " and one JSON object.
func (r *Result) Line() string {
	b, err := json.Marshal(struct {
		*Result
		Ratio         float64 `json:"drain_ratio"`
		PeerRatio     float64 `json:"peer_drain_ratio,omitempty"`
		RelayOverPeer float64 `json:"relay_over_peer,omitempty"`
	}{r, r.Ratio(), r.PeerRatio(), r.RelayOverPeer()})
	if err != nil {
		return "BENCH_RESULT {}"
	}
	return "BENCH_RESULT " + string(b)
}

// cpuTable writes where the CPU went in the backlog phases: what
// separates the relay from the bare client when both are CPU-bound.
func (r *Result) cpuTable(w io.Writer) {
	rows := []struct {
		name string
		t    *Throughput
	}{{"bare HTTP client", r.Bare}}
	if r.Drain != nil {
		rows = append(rows, struct {
			name string
			t    *Throughput
		}{"relay", &r.Drain.Throughput})
	}
	if r.PeerDrain != nil {
		rows = append(rows, struct {
			name string
			t    *Throughput
		}{"polling peer", &r.PeerDrain.Throughput})
	}
	header := false
	for _, row := range rows {
		c := row.t.cpuSplit()
		if c == nil {
			continue
		}
		if !header {
			fmt.Fprintf(w, "\nCPU per event, backlog drain (us)  relay  Postgres (walsender)  bench process  total  cores x wall\n")
			header = true
		}
		fmt.Fprintf(w, "  %-30s %8.1f %9.1f %11.1f %14.1f %6.1f %12.1f\n", row.name, c.Relay, c.Postgres, c.Walsender, c.Bench, c.Total(), c.Available)
	}
	if header {
		fmt.Fprintf(w, "  (bench process: receiver, plus the bare client or the peer in their rows)\n")
	}
}

func (t *Throughput) cpuSplit() *CPUSplit {
	if t == nil {
		return nil
	}
	return t.CPU
}

// commitText is the producer's commit p50/p99 column and the
// from-COMMIT's-return p50/p99/p99.9 column, empty without a producer.
func (l *Latency) commitText() string {
	if l.CommitP99 == 0 {
		return ""
	}
	return fmt.Sprintf("  %7.2f /%6.2f   %7.2f /%6.2f /%6.2f", l.CommitP50, l.CommitP99, l.AfterP50, l.AfterP99, l.AfterP999)
}

func settingsText(m map[string]string) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, k+"="+m[k])
	}
	return strings.Join(parts, ", ")
}
