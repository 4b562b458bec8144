package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
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
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var progress bytes.Buffer
	res, err := Run(ctx, Config{
		RelayExe:         relayExe,
		Events:           2000,
		TxnRows:          250,
		Workers:          16,
		Rate:             200,
		Duration:         2 * time.Second,
		VerifySignatures: true,
		Timeout:          time.Minute,
		Progress:         &progress,
	})
	if err != nil {
		t.Fatalf("Run: %v\n%s", err, progress.String())
	}
	var table bytes.Buffer
	res.Table(&table)
	t.Logf("%s\n%s", table.String(), res.Line())
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
	for name, l := range map[string]*Latency{"relay": res.Latency, "bare": res.BareLatency} {
		if l.P50 <= 0 || l.P99 < l.P50 || l.Max < l.P99 || l.Sent != 400 {
			t.Errorf("%s latency: %+v", name, l)
		}
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
