package relay

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Committed events reach exactly the subscribed endpoints with intact
// bytes and valid signatures; rolled-back ones never arrive.
func TestDeliversCommittedEventsToSubscribers(t *testing.T) {
	t.Parallel()
	// The lean client sends http:// by default; net/http is the other choice.
	for _, client := range []string{HTTPClientLean, HTTPClientNetHTTP} {
		t.Run(client, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			billing, audit, other := newReceiver(t), newReceiver(t), newReceiver(t)
			e.addEndpoint("ep_billing", "acme", billing, "invoice.*")
			e.addEndpoint("ep_audit", "acme", audit)
			e.addEndpoint("ep_other", "globex", other, "invoice.paid")
			e.startRelay(func(c *Config) { c.HTTPClient = client })

			ctx := context.Background()
			e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload, headers, traceparent) VALUES
  ('acme', 'invoice.paid', '{"id": 1, "amount": "12.50", "note": "héllo \"q\""}', '{"X-Custom": "yes"}', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'),
  ('acme', 'customer.updated', '{"id": 2}', NULL, NULL)`)
			// A rolled-back transaction.
			tx, err := e.Pool.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('acme', 'invoice.paid', '{"rolled_back": true}')`); err != nil {
				t.Fatal(err)
			}
			tx.Rollback(ctx)
			e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('acme', 'invoice.voided', '{"id": 3}')`)

			e.WaitFor("5 succeeded deliveries", 20*time.Second, func() bool {
				return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 5
			})
			// billing: invoice.paid, invoice.voided. audit: all three. other: none.
			if got := len(billing.requests()); got != 2 {
				t.Errorf("billing got %d requests, want 2", got)
			}
			if got := len(audit.requests()); got != 3 {
				t.Errorf("audit got %d requests, want 3", got)
			}
			if got := len(other.requests()); got != 0 {
				t.Errorf("other tenant's endpoint got %d requests, want 0", got)
			}
			// Bytes and headers intact, signatures valid.
			rows, _ := e.Pool.Query(ctx, `SELECT id::text, payload::text, event_type FROM relay.outbox`)
			payloads := map[string]string{}
			var id, payload, typ string
			pgx.ForEachRow(rows, []any{&id, &payload, &typ}, func() error {
				payloads["msg_"+strings.ReplaceAll(id, "-", "")] = payload
				return nil
			})
			for _, rcv := range []*receiver{billing, audit} {
				for _, req := range rcv.requests() {
					want, ok := payloads[req.id]
					if !ok {
						t.Errorf("unknown webhook-id %q", req.id)
						continue
					}
					if string(req.body) != want {
						t.Errorf("body %q, want %q", req.body, want)
					}
					if strings.Contains(string(req.body), "rolled_back") {
						t.Errorf("rolled-back event delivered: %s", req.body)
					}
					if req.verifyErr != nil {
						t.Errorf("signature of %s does not verify: %v", req.id, req.verifyErr)
					}
					if req.header.Get("User-Agent") != "outbox-relay" {
						t.Errorf("user-agent %q", req.header.Get("User-Agent"))
					}
					if req.header.Get("Content-Type") != "application/json" {
						t.Errorf("content-type %q", req.header.Get("Content-Type"))
					}
					if strings.Contains(want, "héllo") {
						if req.header.Get("X-Custom") != "yes" || req.header.Get("Traceparent") != "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" {
							t.Errorf("event headers lost: %v", req.header)
						}
					}
				}
			}
			// Status rows: attempts, http status, timings, no payload kept.
			if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded' AND attempts = 1 AND http_status = 200
AND completed_at IS NOT NULL AND duration_ms >= 0 AND payload IS NULL AND commit_lsn IS NOT NULL`); n != 5 {
				t.Errorf("%d well-formed succeeded rows, want 5", n)
			}
			if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'unrouted'`); n != 0 {
				t.Errorf("%d unrouted rows, want 0", n)
			}
		})
	}
}

// Every kind of bad input ends as a final row that says why, and good
// events keep flowing past it.
func TestBadInputGetsAClearFinalState(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	good := newReceiver(t)
	e.addEndpoint("ep_good", "acme", good)
	e.Exec(`INSERT INTO relay.endpoints (id, tenant_id, url, secrets, enabled) VALUES
  ('ep_disabled', 'acme', $1, ARRAY[$2], false),
  ('ep_badurl', 'bad1', 'ht!tp://nope', ARRAY[$2], true),
  ('ep_badsecret', 'bad2', $1, ARRAY['whsec_%%%not-base64'], true),
  ('ep_nosecret', 'bad3', $1, '{}', true)`, good.srv.URL, good.secret)
	e.startRelay(func(c *Config) { c.MaxPayloadBytes = 1024 })

	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload, endpoint_id) VALUES
  ('acme', 'a', '{"case": "unknown endpoint"}', 'ep_missing'),
  ('acme', 'a', '{"case": "disabled endpoint"}', 'ep_disabled'),
  ('bad1', 'a', '{"case": "bad url"}', NULL),
  ('bad2', 'a', '{"case": "bad secret"}', NULL),
  ('bad3', 'a', '{"case": "no secret"}', NULL),
  ('nobody', 'a', '{"case": "no subscriber"}', NULL),
  ('acme', 'a', $1, 'ep_good'),
  ('acme', 'a', '{"case": "fine"}', 'ep_good')`, `{"case": "too big", "pad": "`+strings.Repeat("x", 2000)+`"}`)

	e.WaitFor("8 final rows", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state NOT IN ('pending', 'retrying')`) == 8
	})
	cases := []struct{ caseName, state, errContains string }{
		{"unknown endpoint", "rejected", "unknown endpoint ep_missing"},
		{"disabled endpoint", "rejected", "disabled"},
		{"bad url", "rejected", "invalid url"},
		{"bad secret", "rejected", "secrets[1]"},
		{"no secret", "rejected", "no signing secret"},
		{"no subscriber", "unrouted", "no enabled endpoint"},
		{"too big", "rejected", "over the limit of 1024"},
		{"fine", "succeeded", ""},
	}
	for _, c := range cases {
		var state, errText string
		err := e.Pool.QueryRow(context.Background(), `SELECT d.state, coalesce(d.error, '') FROM relay.deliveries d
JOIN relay.outbox o ON o.id = d.event_id WHERE o.payload->>'case' = $1`, c.caseName).Scan(&state, &errText)
		if err != nil {
			t.Errorf("%s: %v", c.caseName, err)
			continue
		}
		if state != c.state || !strings.Contains(errText, c.errContains) {
			t.Errorf("%s: state %q error %q, want %q containing %q", c.caseName, state, errText, c.state, c.errContains)
		}
		if strings.Contains(errText, "not-base64") {
			t.Errorf("%s: error text leaks the secret: %q", c.caseName, errText)
		}
	}
	// A replayed oversized event is rejected again, not sent: the limit
	// holds on every path to the receiver, not only at routing.
	e.Exec(`SELECT relay.replay_dead_letter(d.event_id, d.endpoint_id) FROM relay.deliveries d
JOIN relay.outbox o ON o.id = d.event_id WHERE o.payload->>'case' = 'too big'`)
	e.WaitFor("the replayed oversized event to end again", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries d JOIN relay.outbox o ON o.id = d.event_id
WHERE o.payload->>'case' = 'too big' AND d.replay_count = 1 AND d.state = 'rejected' AND d.error LIKE '%over the limit of 1024%'`) == 1
	})
	if got := len(good.requests()); got != 1 {
		t.Errorf("good endpoint got %d requests, want 1", got)
	}
}

// Endpoint changes travel in the stream: an endpoint created in a
// transaction is in force for the events committed after it.
func TestEndpointChangesApplyInCommitOrder(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	e.startRelay(nil)

	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t1', 'x', '{"n": 1}')`)
	e.addEndpoint("ep1", "t1", rcv)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t1', 'x', '{"n": 2}')`)
	// Disabling drains what is still queued (see TestDisablingDrainsTheQueue);
	// let event 2 arrive first.
	e.WaitFor("event 2 delivered", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 1
	})
	e.Exec(`UPDATE relay.endpoints SET enabled = false WHERE id = 'ep1'`)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t1', 'x', '{"n": 3}')`)
	e.Exec(`UPDATE relay.endpoints SET enabled = true, event_types = '{y}' WHERE id = 'ep1'`)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t1', 'x', '{"n": 4}'), ('t1', 'y', '{"n": 5}')`)

	e.WaitFor("5 final rows", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state NOT IN ('pending','retrying')`) == 5
	})
	want := map[string]string{"1": "unrouted", "2": "succeeded", "3": "unrouted", "4": "unrouted", "5": "succeeded"}
	for n, state := range want {
		var got string
		if err := e.Pool.QueryRow(context.Background(), `SELECT d.state FROM relay.deliveries d JOIN relay.outbox o ON o.id = d.event_id
WHERE o.payload->>'n' = $1`, n).Scan(&got); err != nil || got != state {
			t.Errorf("event %s: state %q (%v), want %q", n, got, err, state)
		}
	}
	if got := len(rcv.requests()); got != 2 {
		t.Errorf("receiver got %d, want 2", got)
	}
}

// A receiver that fails twice then succeeds gets the event with the same
// webhook-id each time, spaced by the schedule, and the row says so.
func TestRetriesThenSucceeds(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	rcv.answer = func(n int, _ *http.Request) int {
		if n < 2 {
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	}
	e.addEndpoint("ep", "t", rcv)
	e.startRelay(nil)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')`)
	e.WaitFor("success", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 1
	})
	reqs := rcv.requests()
	if len(reqs) != 3 {
		t.Fatalf("receiver saw %d attempts, want 3", len(reqs))
	}
	for i, r := range reqs {
		if r.id != reqs[0].id {
			t.Errorf("attempt %d has webhook-id %s, first had %s", i, r.id, reqs[0].id)
		}
		if r.verifyErr != nil {
			t.Errorf("attempt %d: %v", i, r.verifyErr)
		}
	}
	// Schedule 0, 50ms, 100ms: gaps at least that long.
	if gap := reqs[1].at.Sub(reqs[0].at); gap < 50*time.Millisecond {
		t.Errorf("first retry after %s, want >= 50ms", gap)
	}
	if gap := reqs[2].at.Sub(reqs[1].at); gap < 100*time.Millisecond {
		t.Errorf("second retry after %s, want >= 100ms", gap)
	}
	if n := e.Count(`SELECT attempts FROM relay.deliveries`); n != 3 {
		t.Errorf("row says %d attempts, want 3", n)
	}
	// The two failures left attempt rows; the success is the delivery row.
	if n := e.Count(`SELECT count(*) FROM relay.attempts WHERE http_status = 503 AND error_class = 'http_5xx' AND attempt IN (1, 2)`); n != 2 {
		t.Errorf("%d attempt rows for the two 503s, want 2", n)
	}
}

// A receiver that never succeeds exhausts the schedule and the row ends
// dead; a 400 ends failed at once.
func TestExhaustedAndFinalFailures(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	down, picky := newReceiver(t), newReceiver(t)
	down.answer = func(int, *http.Request) int { return 500 }
	picky.answer = func(int, *http.Request) int { return 400 }
	e.addEndpoint("down", "t", down)
	e.addEndpoint("picky", "t", picky)
	e.startRelay(nil)
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{}')`)
	e.WaitFor("two final rows", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state IN ('dead', 'failed')`) == 2
	})
	if n := e.Count(`SELECT attempts FROM relay.deliveries WHERE endpoint_id = 'down' AND state = 'dead' AND http_status = 500`); n != 4 {
		t.Errorf("dead row has %d attempts, want 4 (schedule length)", n)
	}
	if n := e.Count(`SELECT attempts FROM relay.deliveries WHERE endpoint_id = 'picky' AND state = 'failed' AND http_status = 400`); n != 1 {
		t.Errorf("failed row has %d attempts, want 1", n)
	}
	if n := e.Count(`SELECT count(*) FROM relay.attempts WHERE endpoint_id = 'down'`); n != 4 {
		t.Errorf("%d attempt rows for the dead delivery, want 4", n)
	}
	// Dead letters keep their payload so they can be replayed.
	if n := e.Count(`SELECT count(*) FROM relay.deliveries WHERE state IN ('dead', 'failed') AND payload IS NOT NULL`); n != 2 {
		t.Errorf("%d dead/failed rows kept their payload, want 2", n)
	}
	if len(down.requests()) != 4 || len(picky.requests()) != 1 {
		t.Errorf("attempts seen: down %d picky %d", len(down.requests()), len(picky.requests()))
	}
}

// After a restart, events whose final state is recorded are not sent again.
func TestRestartDoesNotRedeliverRecordedEvents(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	rcv := newReceiver(t)
	e.addEndpoint("ep", "t", rcv)
	_, stop := e.startRelay(nil)
	// A second slot created now sees the same events again: it stands in
	// for a slot whose confirmed position was not acknowledged before a crash.
	replay := e.Slot + "_replay"
	e.Exec(`SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, replay)
	for i := range 50 {
		e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', $1)`, fmt.Sprintf(`{"n": %d}`, i))
	}
	e.WaitFor("50 succeeded", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 50
	})
	stop()
	e.Exec(`INSERT INTO relay.relay_state (slot_name, recorded_lsn) SELECT $1, recorded_lsn FROM relay.relay_state WHERE slot_name = $2`, replay, e.Slot)
	r2, _ := e.startRelay(func(c *Config) { c.SlotName = replay })
	e.Exec(`INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', '{"n": "after"}')`)
	e.WaitFor("51 succeeded", 20*time.Second, func() bool {
		return e.Count(`SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 51
	})
	if got := len(rcv.requests()); got != 51 {
		t.Errorf("receiver saw %d requests, want 51 (no re-delivery)", got)
	}
	if got := testutil.ToFloat64(r2.metrics.restartSkipped); got != 50 {
		t.Errorf("restarted relay skipped %v recorded deliveries, want 50", got)
	}
}
