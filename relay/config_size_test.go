package relay

import (
	"sync/atomic"
	"testing"
	"time"
)

// EndpointsChanged hears the endpoint count at startup and as endpoints
// are added and deleted through the stream (the binary sizes its heap
// limit with it).
func TestEndpointsChangedFollowsTheConfig(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	e.addEndpoint("a", "t", rcv)
	var got, calls atomic.Int64
	e.startRelay(func(c *Config) {
		c.EndpointsChanged = func(n int) { got.Store(int64(n)); calls.Add(1) }
	})
	if got.Load() != 1 {
		t.Fatalf("at startup: %d endpoints reported, want 1", got.Load())
	}
	e.addEndpoint("b", "t", rcv)
	e.addEndpoint("c", "u", rcv)
	e.WaitFor("3 endpoints reported", 10*time.Second, func() bool { return got.Load() == 3 })
	e.Exec(`UPDATE relay.endpoints SET timeout_ms = 5000 WHERE id = 'b'`)
	e.Exec(`DELETE FROM relay.endpoints WHERE id = 'a'`)
	e.WaitFor("2 endpoints reported", 10*time.Second, func() bool { return got.Load() == 2 })
	if n := calls.Load(); n != 4 {
		t.Errorf("%d calls, want 4 (1, 2, 3, 2: an update that keeps the count is not reported)", n)
	}
}
