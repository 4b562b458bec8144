package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/signer"
)

// arrival is one request an ordered receiver saw.
type arrival struct {
	n    int
	at   time.Time
	code int
}

// orderedReceiver records every request in the order it was handled,
// answers a scripted run of 503s, and counts overlapping requests.
type orderedReceiver struct {
	srv    *httptest.Server
	secret string

	mu       sync.Mutex
	arrivals []arrival
	seen     map[int]bool
	badSigs  int
	failFrom int // the first arrival of this event starts the run of failures
	failLeft int // 503s still to answer in the run
	failed   int // 503s answered

	active, peak atomic.Int32
}

func newOrderedReceiver(t *testing.T, failFrom, failures int) *orderedReceiver {
	key := make([]byte, 32)
	rand.Read(key)
	rcv := &orderedReceiver{secret: "whsec_" + base64.StdEncoding.EncodeToString(key), seen: map[int]bool{}, failFrom: failFrom}
	sec, err := signer.ParseSecret(rcv.secret)
	if err != nil {
		t.Fatal(err)
	}
	v := &signer.Verifier{Secrets: []signer.Secret{sec}}
	rcv.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		now := rcv.active.Add(1)
		defer rcv.active.Add(-1)
		for p := rcv.peak.Load(); now > p && !rcv.peak.CompareAndSwap(p, now); p = rcv.peak.Load() {
		}
		body, _ := io.ReadAll(r.Body)
		var p struct{ N int }
		json.Unmarshal(body, &p)
		rcv.mu.Lock()
		defer rcv.mu.Unlock()
		if v.Verify(r.Header, body) != nil {
			rcv.badSigs++
		}
		if p.N == rcv.failFrom && !rcv.seen[p.N] {
			rcv.failLeft = failures
		}
		rcv.seen[p.N] = true
		code := http.StatusNoContent
		if rcv.failLeft > 0 {
			rcv.failLeft--
			rcv.failed++
			code = http.StatusServiceUnavailable
		}
		rcv.arrivals = append(rcv.arrivals, arrival{p.N, time.Now(), code})
		w.WriteHeader(code)
	}))
	t.Cleanup(rcv.srv.Close)
	return rcv
}

func (rcv *orderedReceiver) progress() (distinct, failed int) {
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	return len(rcv.seen), rcv.failed
}

// 10,000 events for an ordered endpoint, committed in transactions of 1 to
// 7 rows, while the relay is killed with SIGKILL (once mid-stream, once
// during a run of receiver failures) and restarted: every event ends with
// exactly one succeeded row, the receiver's first arrivals are exactly
// commit order, it never sees two requests at once, and every repeat of a
// delivered event is explained by a kill.
func TestOrderedEndpointAcrossKillsAndFailures(t *testing.T) {
	const (
		events   = 10000
		failFrom = 6000
		failures = 7 // the breaker opens after 5
	)
	start := time.Now()
	url, pool := database(t)
	rcv := newOrderedReceiver(t, failFrom, failures)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets, ordered, max_attempts, breaker_cooldown_ms)
VALUES ('ep_ord', 'acme', $1, ARRAY[$2], true, 30, 300)`, rcv.srv.URL, rcv.secret); err != nil {
		t.Fatal(err)
	}
	proc := startRelay(t, relayArgs(url)...)

	// One producer: commit order is n's order, and within a transaction,
	// insert order is too.
	prodDone := make(chan error, 1)
	go func() {
		sizes := []int{1, 3, 7, 2, 5, 1, 4}
		for n, i := 0, 0; n < events; i++ {
			size := min(sizes[i%len(sizes)], events-n)
			err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
				for j := range size {
					if _, err := tx.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('acme', 'e', $1)`,
						fmt.Sprintf(`{"n": %d}`, n+j)); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				prodDone <- err
				return
			}
			n += size
		}
		prodDone <- nil
	}()

	var kills []kill
	killAndRestart := func(why string) {
		sent := time.Now()
		proc.kill9()
		kills = append(kills, kill{sent, time.Now()})
		distinct, failed := rcv.progress()
		t.Logf("kill -9 #%d %s: %d events arrived, %d failures answered", len(kills), why, distinct, failed)
		proc = startRelay(t, relayArgs(url)...)
	}
	waitFor(t, "2,500 events to arrive", time.Minute, func() bool { d, _ := rcv.progress(); return d >= 2500 })
	killAndRestart("mid-stream")
	waitFor(t, "the run of failures", time.Minute, func() bool { _, f := rcv.progress(); return f >= 3 })
	killAndRestart("during the run of failures")

	if err := <-prodDone; err != nil {
		t.Fatal(err)
	}
	waitFor(t, "every delivery to succeed", 2*time.Minute, func() bool {
		return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE endpoint_id = 'ep_ord' AND state = 'succeeded'`) == events
	})
	elapsed := time.Since(start)

	if n := count(t, pool, `SELECT count(*) FROM relay.deliveries`); n != events {
		t.Errorf("%d delivery rows, want exactly %d", n, events)
	}
	if n := count(t, pool, `SELECT count(*) FROM relay.outbox o WHERE
(SELECT count(*) FROM relay.deliveries d WHERE d.event_id = o.id AND d.state = 'succeeded') <> 1`); n != 0 {
		t.Errorf("%d events without exactly one succeeded row", n)
	}

	rcv.mu.Lock()
	arrivals := append([]arrival(nil), rcv.arrivals...)
	badSigs, failed := rcv.badSigs, rcv.failed
	rcv.mu.Unlock()
	// First arrivals, in the order the receiver handled them, are commit
	// order; no older event comes again after a newer one, and no delivered
	// event comes again, unless a kill came in between.
	const slack = 500 * time.Millisecond // a request of the dead process may be handled just after it is seen dead
	explained := func(before, after time.Time) bool {
		for _, k := range kills {
			if before.Before(k.dead.Add(slack)) && k.sent.Before(after) {
				return true
			}
		}
		return false
	}
	next, outOfOrder, retries, repeats, unexplained := 0, 0, 0, 0, 0
	firstAt := make(map[int]time.Time, events)
	delivered := make(map[int]time.Time, events)
	var newest time.Time // first arrival of the newest event seen
	for _, a := range arrivals {
		if _, seen := firstAt[a.n]; !seen {
			if a.n != next {
				outOfOrder++
				if outOfOrder <= 5 {
					t.Errorf("event %d arrived for the first time when event %d was due", a.n, next)
				}
			}
			next = max(next, a.n+1)
			firstAt[a.n], newest = a.at, a.at
		} else {
			if at, ok := delivered[a.n]; ok {
				repeats++ // delivered (2xx) and sent again
				if !explained(at, a.at) {
					unexplained++
				}
			} else {
				retries++ // after a 503, or a repeat of an attempt cut short by a kill
			}
			if a.n < next-1 && !explained(newest, a.at) {
				unexplained++
				if unexplained <= 5 {
					t.Errorf("event %d came again after event %d had arrived, with no kill in between", a.n, next-1)
				}
			}
		}
		if a.code < 300 {
			if _, ok := delivered[a.n]; !ok {
				delivered[a.n] = a.at
			}
		}
	}
	if len(firstAt) != events || outOfOrder != 0 {
		t.Errorf("%d distinct events arrived (want %d), %d for the first time out of commit order", len(firstAt), events, outOfOrder)
	}
	if unexplained != 0 {
		t.Errorf("%d repeats not explained by a kill", unexplained)
	}
	if p := rcv.peak.Load(); p != 1 {
		t.Errorf("the receiver saw %d requests at once, want 1", p)
	}
	if badSigs != 0 {
		t.Errorf("%d bad signatures", badSigs)
	}
	if failed < failures {
		t.Errorf("the receiver answered %d failures, want the run of %d", failed, failures)
	}
	t.Logf("%d events in commit order in %s (%d requests: %d answered 503 and retried, %d other retries, %d repeats of delivered events after %d kills)",
		events, elapsed.Round(100*time.Millisecond), len(arrivals), failed, retries-failed, repeats, len(kills))
}
