package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/signer"
)

var relayExe string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "outbox-relay-bench-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	relayExe = filepath.Join(dir, "outbox-relay")
	build := exec.Command("go", "build", "-o", relayExe, "./cmd/outbox-relay")
	build.Dir = "../.."
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build outbox-relay:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func TestBodyIsJSONBText(t *testing.T) {
	b := appendBody(nil, 42, 1700000000123456789, 500)
	if len(b) != 500 {
		t.Fatalf("body is %d bytes, want 500", len(b))
	}
	if !bytes.HasPrefix(b, []byte(`{"i": 42, "t": 1700000000123456789, "pad": "xx`)) || !bytes.HasSuffix(b, []byte(`x"}`)) {
		t.Fatalf("body %q", b)
	}
	if ts, ok := bodyTime(b); !ok || ts != 1700000000123456789 {
		t.Fatalf("bodyTime = %d, %t", ts, ok)
	}
}

func TestTallyCountsPerWebhookID(t *testing.T) {
	tl := newTally(tagDrain, 3, 0, false, nil)
	h := func(tag uint32, seq int) map[string][]string {
		return map[string][]string{"Webhook-Id": {webhookID(eventID(tag, seq))}}
	}
	now := time.Now()
	tl.record(h(tagDrain, 0), nil, now)
	tl.record(h(tagDrain, 2), nil, now)
	tl.record(h(tagDrain, 2), nil, now)
	tl.record(h(tagBare, 1), nil, now)  // another phase
	tl.record(h(tagDrain, 3), nil, now) // out of range
	var c Counts
	c.count(tl)
	want := Counts{Requests: 5, Distinct: 2, Duplicates: 1, Missing: 1, Unexpected: 2}
	if c != want {
		t.Fatalf("counts = %+v, want %+v", c, want)
	}
	if c.Clean() {
		t.Fatal("a tally with a duplicate and a miss is clean")
	}
}

// Latency from the COMMIT's return is each arrived event's latency less
// its own commit time; events that did not arrive, or have no commit
// time, are left out.
func TestTallyAfterCommit(t *testing.T) {
	const size = 64
	tl := newTally(tagLatency, 4, size, true, nil)
	t0 := time.Now()
	for seq, lat := range []time.Duration{5 * time.Millisecond, 2 * time.Millisecond, 9 * time.Millisecond} {
		body := appendBody(nil, seq, t0.UnixNano(), size)
		tl.record(map[string][]string{"Webhook-Id": {webhookID(eventID(tagLatency, seq))}}, body, t0.Add(lat))
	}
	commits := []time.Duration{time.Millisecond, 3 * time.Millisecond, 0, time.Millisecond}
	got := tl.afterCommit(commits)
	want := []time.Duration{-time.Millisecond, 4 * time.Millisecond} // seq 2 has no commit time, seq 3 did not arrive
	if !slices.Equal(got, want) {
		t.Fatalf("afterCommit = %v, want %v", got, want)
	}
}

func TestQuantile(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 1000; i++ {
		d = append(d, time.Duration(i))
	}
	for q, want := range map[float64]time.Duration{0.5: 500, 0.99: 990, 0.999: 999, 1: 1000} {
		if got := quantile(d, q); got != want {
			t.Errorf("quantile(%g) = %d, want %d", q, got, want)
		}
	}
}

// A tiny run of every phase against the real binary: every event arrives
// exactly once, intact and signed, every status row succeeds, and the
// figures are there.
func TestRunTiny(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster and the relay")
	}
	res := runTiny(t, Config{
		RelayExe:         relayExe,
		Events:           2000,
		TxnRows:          250,
		Workers:          16,
		Rate:             200,
		Duration:         2 * time.Second,
		VerifySignatures: true, // the bare client signs too
		ReceiverJSON:     true,
		Timeout:          time.Minute,
	})
	if !res.Clean() {
		t.Fatal("an event was lost, duplicated or altered")
	}
	for _, c := range []struct {
		name string
		got  Counts
		want int64
	}{{"bare", res.Bare.Counts, 2000}, {"drain", res.Drain.Counts, 2000}, {"latency", res.Latency.Counts, 400}, {"bare latency", res.BareLatency.Counts, 400},
		{"peer drain", res.PeerDrain.Counts, 2000}, {"peer latency", res.PeerLatency.Counts, 400}} {
		if c.got.Distinct != c.want || c.got.Requests != c.want {
			t.Errorf("%s: %d distinct of %d requests, want %d of %d", c.name, c.got.Distinct, c.got.Requests, c.want, c.want)
		}
	}
	if res.Bare.PerSec <= 0 || res.Drain.PerSec <= 0 || res.Ratio() <= 0 {
		t.Errorf("rates: bare %.0f/s, relay %.0f/s", res.Bare.PerSec, res.Drain.PerSec)
	}
	if res.Drain.CPUSecs <= 0 || res.Drain.WALPerEvent <= 0 || res.RelayPeakRSS <= 0 {
		t.Errorf("drain cost: %+v, peak RSS %d", res.Drain.Cost, res.RelayPeakRSS)
	}
	// Where the CPU went (clock ticks of 10 ms: the tiny drain is long
	// enough for each of these to be seen).
	if c := res.Drain.CPU; c == nil || c.Relay <= 0 || c.Postgres <= 0 || c.Bench <= 0 || c.Available <= 0 {
		t.Errorf("drain CPU split: %+v", c)
	}
	if c := res.Bare.CPU; c == nil || c.Relay != 0 || c.Bench <= 0 {
		t.Errorf("bare CPU split (no relay runs): %+v", c)
	}
	for name, l := range map[string]*Latency{"relay": res.Latency, "peer": res.PeerLatency} {
		if l.CommitP50 <= 0 || l.CommitP99 < l.CommitP50 {
			t.Errorf("%s: producer commit p50 %.2f ms, p99 %.2f ms", name, l.CommitP50, l.CommitP99)
		}
		// Counted from the COMMIT's return, each event's latency is its
		// own commit time shorter.
		if l.AfterP50 >= l.P50 || l.AfterP99 >= l.P99 || l.AfterP999 < l.AfterP99 || l.AfterP99 == 0 {
			t.Errorf("%s: from COMMIT p50/p99/p99.9 %.2f/%.2f/%.2f ms against %.2f/%.2f from before the INSERT", name, l.AfterP50, l.AfterP99, l.AfterP999, l.P50, l.P99)
		}
	}
	for name, l := range map[string]*Latency{"relay": res.Latency, "bare": res.BareLatency} {
		if l.P50 <= 0 || l.P99 < l.P50 || l.Max < l.P99 || l.Sent != 400 {
			t.Errorf("%s latency: %+v", name, l)
		}
	}
	// The bare client posted from a process of its own, which measured
	// its CPU: some, and less than the whole of the 2 s run per request.
	if c := res.BareLatency.ClientCPU; c <= 0 || c > 2e6/400 {
		t.Errorf("bare client CPU per request: %.1f us", c)
	}
	if res.Latency.Cost == nil || res.Latency.Cost.WALPerEvent <= 0 {
		t.Errorf("latency cost: %+v", res.Latency.Cost)
	}
	if res.PostgresVersion == "" || res.InsertPerSec <= 0 {
		t.Errorf("machine: %+v", res)
	}
}

func TestConfigValidate(t *testing.T) {
	if err := (Config{Phases: []string{PhaseBare}}).Validate(); err != nil {
		t.Errorf("bare only needs no relay: %v", err)
	}
	if err := (Config{}).Validate(); err == nil {
		t.Error("no RelayExe: want an error")
	}
	if err := (Config{Phases: []string{PhaseBareLatency}}).Validate(); err == nil {
		t.Error("bare-latency without RelayExe (its client runs in the binary's paced-post): want an error")
	}
	if p, err := ParsePhases("all,fairness"); err != nil || len(p) != len(AllPhases)+1 {
		t.Errorf("ParsePhases(all,fairness) = %v, %v", p, err)
	}
	if p, err := ParsePhases("fairness,peer-drain"); err != nil || len(p) != 2 {
		t.Errorf("ParsePhases(fairness,peer-drain) = %v, %v", p, err)
	}
	if _, err := ParsePhases("drain,nope"); err == nil {
		t.Error("unknown phase: want an error")
	}
}

func TestTallyChecksRoutes(t *testing.T) {
	tl := newTally(tagDrainMany, 4, 0, false, nil)
	tl.routes = 3
	h := func(seq int) map[string][]string {
		return map[string][]string{"Webhook-Id": {webhookID(eventID(tagDrainMany, seq))}}
	}
	now := time.Now()
	for _, c := range []struct {
		seq  int
		path string
	}{{0, "/ep/0"}, {1, "/ep/1"}, {2, "/ep/0"}, {3, "/ep/0"}, {3, "/hook"}} {
		tl.checkRoute(c.path, h(c.seq))
		tl.record(h(c.seq), nil, now)
	}
	var c Counts
	c.count(tl)
	want := Counts{Requests: 5, Distinct: 4, Duplicates: 1, Misrouted: 2}
	if c != want {
		t.Fatalf("counts = %+v, want %+v", c, want)
	}
	if c.Clean() {
		t.Fatal("a tally with misrouted events is clean")
	}
}

func TestPlanRoundsAndTags(t *testing.T) {
	cfg := Config{RelayExe: "x", Phases: []string{PhaseBare, PhaseDrain, PhaseDrainMany, PhaseLatency, PhaseFairness, PhasePeerLatency},
		EventCounts: []int{10, 20}, Rates: []int{100, 5000}}.withDefaults()
	r := &run{cfg: cfg, res: &Result{}}
	var got []string
	tags := map[uint32]bool{}
	for _, st := range r.plan() {
		r.round = st.round
		got = append(got, st.String())
		for _, base := range []uint32{tagBare, tagDrain, tagDrainMany, tagLatency, tagProbe, tagPeerLatency} {
			if base == map[string]uint32{PhaseBare: tagBare, PhaseDrain: tagDrain, PhaseDrainMany: tagDrainMany, PhaseLatency: tagLatency, PhasePeerLatency: tagPeerLatency}[st.phase] {
				if tags[r.tag(base)] {
					t.Errorf("%s: tag %#x used twice", st, r.tag(base))
				}
				tags[r.tag(base)] = true
			}
		}
	}
	want := []string{"bare (10 events)", "bare (20 events)", "drain (10 events)", "drain (20 events)", "drain-many (10 events)", "drain-many (20 events)",
		"latency (100/s)", "latency (5,000/s)", "fairness", "peer-latency (100/s)", "peer-latency (5,000/s)"}
	if !slices.Equal(got, want) {
		t.Errorf("plan = %q\nwant   %q", got, want)
	}
	if p := producersFor(0, 5000); p != 20 {
		t.Errorf("producers at 5,000/s = %d, want 20", p)
	}
	if p := producersFor(0, 1000); p != 4 {
		t.Errorf("producers at 1,000/s = %d, want 4", p)
	}
	if cfg.Timeout != 5*time.Minute {
		t.Errorf("timeout = %s", cfg.Timeout)
	}
	if c := (Config{EventCounts: []int{1_000_000}}).withDefaults(); c.Timeout != 1000*time.Second || c.Events != 1_000_000 {
		t.Errorf("1M events: timeout %s, events %d", c.Timeout, c.Events)
	}
	if err := (Config{RelayExe: "x", Endpoints: 10, Tenants: 20}).Validate(); err == nil {
		t.Error("more tenants than endpoints: want an error")
	}
}

// The scale phases at tiny sizes: two backlog sizes and two rates in one
// run, the backlog spread over 200 endpoints of 20 tenants for the relay
// and the peer; every event arrives exactly once at its own endpoint.
func TestRunTinyScale(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster and the relay")
	}
	phases, err := ParsePhases("bare,drain,drain-many,peer-drain,peer-drain-many,latency,peer-latency")
	if err != nil {
		t.Fatal(err)
	}
	res := runTiny(t, Config{
		RelayExe:         relayExe,
		Phases:           phases,
		EventCounts:      []int{2000, 1000},
		Rates:            []int{200, 300},
		Endpoints:        200,
		Tenants:          20,
		TxnRows:          250,
		Workers:          16,
		Duration:         2 * time.Second,
		VerifySignatures: true,
		Timeout:          time.Minute,
	})
	if !res.Clean() {
		t.Fatal("an event was lost, duplicated, misrouted or altered")
	}
	s := res.ScaleResult
	if len(s.Backlogs) != 2 || len(s.Steady) != 2 || s.Endpoints != 200 || s.Tenants != 20 {
		t.Fatalf("rounds: %d backlogs, %d rates, %d endpoints, %d tenants", len(s.Backlogs), len(s.Steady), s.Endpoints, s.Tenants)
	}
	for _, b := range s.Backlogs {
		n := int64(b.Events)
		for name, c := range map[string]*Counts{"bare": &b.Bare.Counts, "drain": &b.Drain.Counts, "drain-many": &b.DrainMany.Counts,
			"peer-drain": &b.PeerDrain.Counts, "peer-drain-many": &b.PeerDrainMany.Counts} {
			if c.Distinct != n || c.Requests != n || !c.Clean() {
				t.Errorf("%s at %d events: %+v", name, n, *c)
			}
		}
		if b.ManyOverSingle <= 0 || b.ManyOverPeerMany <= 0 || b.RelayOverBare <= 0 {
			t.Errorf("%d events: ratios %+v", n, b)
		}
		if d := b.DrainMany; d.CPUSecs <= 0 || d.PeakRSS <= 0 || d.OtherRows != 0 || d.Spilled < 0 {
			t.Errorf("drain-many at %d events: %+v", n, d)
		}
	}
	if res.Drain != s.Backlogs[0].Drain || res.Bare != s.Backlogs[0].Bare || res.Events != 2000 {
		t.Error("top-level figures are not the first size's")
	}
	for i, l := range s.Steady {
		want := int64([]int{400, 600}[i])
		for name, x := range map[string]*Latency{"relay": l.Latency, "peer": l.PeerLatency} {
			if x == nil || x.Distinct != want || x.P99 <= 0 {
				t.Errorf("%s at %d/s: %+v", name, l.Rate, x)
			}
		}
	}
	if res.Latency != s.Steady[0].Latency || res.Rate != 200 {
		t.Error("top-level latency is not the first rate's")
	}
	if s.RelaySettings["endpoint-max-in-flight"] == "" || s.RelaySettings["queue-events"] == "" {
		t.Errorf("relay settings: %v", s.RelaySettings)
	}
}

// A tiny run of the fault phases against the real binary: every committed
// event arrives and ends with exactly one succeeded row across kills, a
// takeover, rate limits and a receiver outage, and the figures are there.
func TestFaultPhasesTiny(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster and several relays")
	}
	res := runTiny(t, Config{
		RelayExe:  relayExe,
		Phases:    FaultPhases,
		TxnRows:   250,
		Workers:   16,
		Producers: 2,
		// A queue smaller than the memory backlog, so spill spills and
		// block leaves events in the slot.
		RelayArgs:        []string{"--queue-events", "1000"},
		VerifySignatures: true,
		Timeout:          time.Minute,
		Faults: FaultConfig{
			Rate: 200, Kills: 2, Takeovers: 2, KillEvery: time.Second, RestartTimeout: 20 * time.Second,
			RateDuration: 3 * time.Second, EndpointRate: 50, TenantRate: 80, UnthrottledBacklog: 5000,
			MemoryEvents: 5000, MemorySettle: 2 * time.Second,
		},
	})
	if !res.Clean() {
		t.Fatal("an event was lost, altered or mis-recorded (the run's progress is in the log)")
	}
	for name, f := range map[string]*Faulted{"recovery": res.Recovery, "takeover": res.Takeover} {
		if f == nil || len(f.Kills) != 2 || f.Committed == 0 || f.Distinct != int64(f.Committed) {
			t.Fatalf("%s: %+v", name, f)
		}
		for _, k := range f.Kills {
			if k.FirstMS <= 0 || k.FirstNewMS < k.FirstMS || k.ReapedMS < 0 {
				t.Errorf("%s kill timings: %+v", name, k)
			}
		}
	}
	if res.Recovery.RestartToFirst == nil || res.Takeover.RestartToFirst != nil {
		t.Errorf("restart-to-first: recovery %v, takeover %v", res.Recovery.RestartToFirst, res.Takeover.RestartToFirst)
	}
	rl := res.RateLimit
	if rl == nil || rl.Endpoint.InWindow == 0 || rl.Tenant.InWindow == 0 || rl.Unthrottled.Distinct != 5000 {
		t.Fatalf("ratelimit: %+v", rl)
	}
	// Loose bounds: a shared machine; the figure itself is the output.
	if rl.Endpoint.Rate > 50*1.5 || rl.Tenant.Rate > 80*1.5 {
		t.Errorf("rate limits not enforced: endpoint %.1f/s (limit 50), tenant %.1f/s (limit 80)", rl.Endpoint.Rate, rl.Tenant.Rate)
	}
	if res.Memory == nil || len(res.Memory.Runs) != 2 {
		t.Fatalf("memory: %+v", res.Memory)
	}
	for _, m := range res.Memory.Runs {
		if m.Distinct != 5000 || m.PeakRSS <= 0 || m.DownMaxRSS <= 0 || m.DrainSecs <= 0 {
			t.Errorf("memory %s: %+v", m.Policy, m)
		}
		// The default outage refuses connections: no request reaches the
		// receiver, and the relay's attempts say why they failed.
		if m.Refused != 0 || m.DownErrors["connection_refused"] == 0 {
			t.Errorf("memory %s: receiver down by refusing connections, but %d requests answered 503 and the failed attempts were %v",
				m.Policy, m.Refused, m.DownErrors)
		}
		if m.Policy == "spill" && (m.Spilled <= 0 || m.HeldRows != 5000) {
			t.Errorf("memory spill: spilled %.0f, %d rows while down", m.Spilled, m.HeldRows)
		}
		if m.Policy == "block" && m.HeldRead >= 5000 {
			t.Errorf("memory block: the relay read all %.0f events with a 1,000-event queue", m.HeldRead)
		}
	}
}

// runTiny runs the bench with cfg (at most 3 minutes) and logs its table:
// the tiny runs' shared part; they check the result themselves.
func runTiny(t *testing.T, cfg Config) *Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var progress bytes.Buffer
	cfg.Progress = &progress
	res, err := Run(ctx, cfg)
	if err != nil {
		t.Fatalf("Run: %v\n%s", err, progress.String())
	}
	var table bytes.Buffer
	res.Table(&table)
	t.Logf("%s\n%s\n%s", progress.String(), table.String(), res.Line())
	return res
}

// With VerifySignatures the bare client's requests (either client) carry a signature the
// receiver accepts; without, none.
func TestBareClientSigns(t *testing.T) {
	rc, err := startReceiver(true)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.close()
	sec, err := signer.ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	if err != nil {
		t.Fatal(err)
	}
	for i, sign := range []bool{true, false, true, false} {
		lean := i >= 2 // both clients
		tl := newTally(tagBare, 20, 200, false, &signer.Verifier{Secrets: []signer.Secret{sec}})
		rc.expect(tl)
		var s *signer.Signer
		if sign {
			s = signer.NewSigner(sec)
		}
		c := newBareClient(rc.url, 4, 200, s, lean)
		if _, err := c.drain(context.Background(), tagBare, 20, 4); err != nil {
			t.Fatal(err)
		}
		c.CloseIdleConnections()
		var got Counts
		got.count(tl)
		want := int64(0)
		if !sign {
			want = 20
		}
		if got.Distinct != 20 || got.BadSigs != want || got.BadBodies != 0 {
			t.Errorf("signing %t, lean %t: %+v, want 20 distinct, %d bad signatures, 0 bad bodies", sign, lean, got, want)
		}
	}
}
