// Package procs adapts GOMAXPROCS to the relay's load.
//
// On a small machine the relay shares the cores with Postgres, its
// walsender and often the receivers. At a live rate of a few thousand
// events a second each event is a handful of goroutine hand-offs (stream
// reader, dispatcher, worker, writer), and with two or more Ps every
// hand-off may wake an idle P's thread through futex and epoll: that
// scheduling, not the delivering, was most of the relay's CPU per event
// at 1,000/s. With one P the same hand-offs stay on one thread. A backlog
// drain is the opposite case: it wants every core. So the relay runs
// with one P while the load is light and with the runtime's default
// (the machine's or the container's CPUs) while it is heavy.
package procs

import (
	"context"
	"log/slog"
	"runtime"
	"syscall"
	"time"
)

// Thresholds: the relay goes to the default Ps when a window sees
// BusyRate attempts a second or BusyCPU cores of process CPU, and back
// to one P after IdleWindows windows in a row under both IdleRate and
// IdleCPU. The gap between them keeps it from flapping.
const (
	Window      = 250 * time.Millisecond
	BusyRate    = 6000.0
	BusyCPU     = 0.75
	IdleRate    = 3000.0
	IdleCPU     = 0.45
	IdleWindows = 4
)

// Controller decides the number of Ps from one window's figures at a
// time. Its zero value is not usable; see NewController.
type Controller struct {
	max   int // the runtime's default, > 1
	cur   int
	quiet int // windows in a row under the idle thresholds
}

// NewController starts at max Ps (a relay often starts on a backlog).
func NewController(max int) *Controller { return &Controller{max: max, cur: max} }

// Step takes one window's attempt rate (per second) and process CPU (in
// cores) and returns the number of Ps to run with.
func (c *Controller) Step(rate, cpu float64) int {
	switch {
	case rate >= BusyRate || cpu >= BusyCPU:
		c.quiet = 0
		c.cur = c.max
	case rate < IdleRate && cpu < IdleCPU:
		if c.quiet++; c.quiet >= IdleWindows {
			c.cur = 1
		}
	default:
		c.quiet = 0
	}
	return c.cur
}

// Run adapts GOMAXPROCS until ctx ends, then gives the runtime its
// default back. attempts returns the relay's attempts so far. It does
// nothing when the default is one P.
func Run(ctx context.Context, attempts func() uint64, log *slog.Logger) {
	max := runtime.GOMAXPROCS(0)
	if max <= 1 {
		return
	}
	defer runtime.SetDefaultGOMAXPROCS()
	c := NewController(max)
	t := time.NewTicker(Window)
	defer t.Stop()
	last, lastCPU, lastAt := attempts(), CPUTime(), time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, cpu, now := attempts(), CPUTime(), time.Now()
		secs := now.Sub(lastAt).Seconds()
		if secs <= 0 {
			continue
		}
		was := c.cur
		want := c.Step(float64(n-last)/secs, (cpu-lastCPU).Seconds()/secs)
		last, lastCPU, lastAt = n, cpu, now
		if want == was {
			continue
		}
		if want > 1 {
			// Back to the default, which also lets the runtime follow a
			// changed container CPU limit again.
			runtime.SetDefaultGOMAXPROCS()
			c.max = runtime.GOMAXPROCS(0)
			c.cur = c.max
		} else {
			runtime.GOMAXPROCS(want)
		}
		log.Debug("GOMAXPROCS adapted to the load", slog.Int("procs", runtime.GOMAXPROCS(0)))
	}
}

// CPUTime is the CPU this process has used, user and system (0 if the
// kernel will not say).
func CPUTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
