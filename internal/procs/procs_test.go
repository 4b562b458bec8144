package procs

import (
	"context"
	"io"
	"log/slog"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

func TestControllerSteps(t *testing.T) {
	c := NewController(4)
	steps := []struct {
		rate, cpu float64
		want      int
	}{
		{100, 0.1, 4}, {100, 0.1, 4}, {100, 0.1, 4}, {100, 0.1, 1}, // light for IdleWindows windows: one P
		{2000, 0.3, 1}, // still light
		{4000, 0.5, 1}, // between the thresholds: stays
		{6000, 0.2, 4}, // busy by rate: the default at once
		{100, 0.1, 4}, {100, 0.1, 4}, {100, 0.1, 4},
		{4000, 0.2, 4}, // a middling window restarts the count
		{100, 0.1, 4}, {100, 0.1, 4}, {100, 0.1, 4}, {100, 0.1, 1},
		{500, 0.8, 4},                                                             // busy by CPU
		{100, 0.5, 4}, {100, 0.5, 4}, {100, 0.5, 4}, {100, 0.5, 4}, {100, 0.5, 4}, // light rate, CPU between: stays
	}
	for i, s := range steps {
		if got := c.Step(s.rate, s.cpu); got != s.want {
			t.Fatalf("step %d (%v/s, %v cores): %d Ps, want %d", i, s.rate, s.cpu, got, s.want)
		}
	}
}

// Run lowers GOMAXPROCS to one while nothing happens, raises it when the
// attempts come fast, and gives the default back when it ends.
func TestRunAdapts(t *testing.T) {
	def := runtime.GOMAXPROCS(0)
	if def <= 1 {
		t.Skip("one CPU: nothing to adapt")
	}
	var attempts atomic.Uint64
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); Run(ctx, attempts.Load, slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	waitProcs := func(want int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for runtime.GOMAXPROCS(0) != want {
			if time.Now().After(deadline) {
				t.Fatalf("GOMAXPROCS %d after 5s, want %d", runtime.GOMAXPROCS(0), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitProcs(1)
	stop := make(chan struct{})
	go func() { // 10,000 attempts/s
		tk := time.NewTicker(time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tk.C:
				attempts.Add(10)
			}
		}
	}()
	waitProcs(def)
	close(stop)
	waitProcs(1)
	cancel()
	<-done
	if got := runtime.GOMAXPROCS(0); got != def {
		t.Errorf("GOMAXPROCS %d after Run ended, want the default %d", got, def)
	}
}
