package limiter_test

import (
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/limiter"
)

// benchLimiter has 1000 endpoints spread over 100 tenants, like a busy relay.
func benchLimiter(ep, tn limiter.Limit) (*limiter.Limiter, []string, []string) {
	l := limiter.New()
	eps := make([]string, 1000)
	tns := make([]string, len(eps))
	for i := range eps {
		eps[i] = "endpoint-" + strconv.Itoa(i)
		tns[i] = "tenant-" + strconv.Itoa(i%100)
		l.Endpoints().Configure(eps[i], ep, t0)
		l.Tenants().Configure(tns[i], tn, t0)
	}
	return l, eps, tns
}

func BenchmarkTake(b *testing.B) {
	b.Run("unlimited", func(b *testing.B) {
		l, eps, tns := benchLimiter(limiter.Limit{}, limiter.Limit{})
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if ok, _ := l.Take(t0, eps[i%len(eps)], tns[i%len(tns)]); !ok {
				b.Fatal("refused")
			}
			i++
		}
	})
	b.Run("limited/granted", func(b *testing.B) {
		// Fast enough buckets and a clock that moves 1µs per call: every
		// Take refills both buckets and is granted.
		l, eps, tns := benchLimiter(limiter.Limit{Rate: 1e6}, limiter.Limit{Rate: 1e7})
		b.ReportAllocs()
		now, i := t0, 0
		for b.Loop() {
			now = now.Add(time.Microsecond)
			if ok, _ := l.Take(now, eps[i%len(eps)], tns[i%len(tns)]); !ok {
				b.Fatal("refused")
			}
			i++
		}
	})
	b.Run("limited/refused", func(b *testing.B) {
		l, eps, tns := benchLimiter(limiter.Limit{Rate: 1, Burst: 1}, limiter.Limit{Rate: 1, Burst: 1})
		for i := range eps {
			l.Take(t0, eps[i], tns[i])
		}
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if ok, _ := l.Take(t0, eps[i%len(eps)], tns[i%len(tns)]); ok {
				b.Fatal("granted")
			}
			i++
		}
	})
	b.Run("limited/parallel", func(b *testing.B) {
		// Contention on the one lock, for scale: the relay calls Take from
		// the scheduler, not from every worker.
		l, eps, tns := benchLimiter(limiter.Limit{Rate: 1e6}, limiter.Limit{Rate: 1e7})
		var clock atomic.Int64
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				now := t0.Add(time.Duration(clock.Add(1000)))
				l.Take(now, eps[i%len(eps)], tns[i%len(tns)])
				i++
			}
		})
	})
}
