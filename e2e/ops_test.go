package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// scrape returns the value of each metric line (name with labels as key).
func scrape(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || line == "" {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// waitServing waits until the relay's ops server at addr answers, so a
// scrape (which fails the test on a refused connection) can follow a
// start on a loaded machine.
func waitServing(t *testing.T, addr string) {
	t.Helper()
	waitFor(t, "the ops server at "+addr, 30*time.Second, func() bool { code, _ := get(addr, "/healthz"); return code != 0 })
}

func get(addr, path string) (int, string) {
	resp, err := http.Get("http://" + addr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// The metrics agree with the database's own counts, and the probes answer.
func TestMetricsMatchTheDatabase(t *testing.T) {
	url, pool := database(t)
	ok, bad := newReceiver(t), newReceiver(t)
	bad.fail = func() int { return 400 }
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets, event_types) VALUES
  ('ok', 't', $1, ARRAY[$2], '{a}'), ('bad', 't', $3, ARRAY[$4], '{b}')`, ok.srv.URL, ok.secret, bad.srv.URL, bad.secret); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	startRelay(t, relayArgs(url, "--http-addr", addr)...)
	waitFor(t, "readyz 200", 20*time.Second, func() bool { code, _ := get(addr, "/readyz"); return code == 200 })
	if code, _ := get(addr, "/healthz"); code != 200 {
		t.Fatalf("healthz = %d", code)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload)
SELECT 't', CASE WHEN i % 4 = 0 THEN 'b' WHEN i % 4 = 1 THEN 'c' ELSE 'a' END, jsonb_build_object('i', i) FROM generate_series(1, 400) i`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "400 final rows", 30*time.Second, func() bool {
		return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state NOT IN ('pending','retrying')`) == 400
	})
	// The status write and the counter update happen together; give the
	// scrape a moment to catch the last batch.
	var m map[string]float64
	want := map[string]int{}
	for _, state := range []string{"succeeded", "failed", "unrouted"} {
		want[state] = count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = $1`, state)
	}
	waitFor(t, "metrics to match", 10*time.Second, func() bool {
		m = scrape(t, addr)
		for state, n := range want {
			if m[fmt.Sprintf(`outbox_relay_deliveries_total{state="%s"}`, state)] != float64(n) {
				return false
			}
		}
		return true
	})
	if want["succeeded"] != 200 || want["failed"] != 100 || want["unrouted"] != 100 {
		t.Errorf("database counts %v, want succeeded 200, failed 100, unrouted 100", want)
	}
	if m["outbox_relay_events_received_total"] != 400 {
		t.Errorf("events_received_total = %v, want 400", m["outbox_relay_events_received_total"])
	}
	if m[`outbox_relay_attempts_total{class="http_4xx"}`] != 100 || m[`outbox_relay_attempts_total{class="http_2xx"}`] != 200 {
		t.Errorf("attempts by class: 2xx %v 4xx %v, want 200 and 100", m[`outbox_relay_attempts_total{class="http_2xx"}`], m[`outbox_relay_attempts_total{class="http_4xx"}`])
	}
	if m["outbox_relay_commit_to_delivery_seconds_count"] != 200 {
		t.Errorf("commit_to_delivery count = %v, want 200", m["outbox_relay_commit_to_delivery_seconds_count"])
	}
	if m["outbox_relay_active"] != 1 {
		t.Errorf("outbox_relay_active = %v", m["outbox_relay_active"])
	}
	for _, name := range []string{"outbox_relay_replication_lag_bytes", "outbox_relay_slot_retained_wal_bytes", "outbox_relay_queue_deliveries", "outbox_relay_in_flight"} {
		if _, ok := m[name]; !ok {
			t.Errorf("metric %s missing", name)
		}
	}
}

// SIGTERM: the relay stops reading, lets in-flight attempts finish, writes
// their status, and exits 0; nothing is lost or left without a row.
func TestGracefulShutdown(t *testing.T) {
	url, pool := database(t)
	slow := newReceiver(t)
	slow.fail = func() int { time.Sleep(300 * time.Millisecond); return 200 }
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ('slow', 't', $1, ARRAY[$2])`, slow.srv.URL, slow.secret); err != nil {
		t.Fatal(err)
	}
	p := startRelay(t, relayArgs(url, "--workers", "8")...)
	if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) SELECT 't', 'e', jsonb_build_object('i', i) FROM generate_series(1, 200) i`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "some deliveries in flight", 20*time.Second, func() bool {
		_, total, _, _ := slow.stats()
		return total >= 8
	})
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		p.done <- err
		if err != nil {
			t.Fatalf("relay exited with %v after SIGTERM; output:\n%s", err, p.output())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("relay did not exit within 20s of SIGTERM")
	}
	_, received, _, _ := slow.stats()
	succeeded := count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`)
	if succeeded != received {
		t.Errorf("receiver answered 200 to %d requests but %d succeeded rows were written before exit", received, succeeded)
	}
	// A new relay finishes the rest, without repeating what was recorded.
	p2 := startRelay(t, relayArgs(url)...)
	waitFor(t, "200 succeeded", 60*time.Second, func() bool {
		return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == 200
	})
	t.Logf("relay output:\n%s", p2.output())
	if distinct, total, _, _ := slow.stats(); distinct != 200 || total != 200 {
		t.Errorf("receiver saw %d requests for %d events, want 200 and 200", total, distinct)
	}
}
