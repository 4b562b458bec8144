package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	outboxrelay "github.com/outbox-relay/outbox-relay"
	"github.com/outbox-relay/outbox-relay/internal/pgtemp"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/signer"
)

// demoReceiver is a local webhook receiver that verifies every signature.
type demoReceiver struct {
	name     string
	secret   string
	url      string
	received atomic.Int64
	bad      atomic.Int64 // rolled-back events that arrived: must stay 0
	out      io.Writer
	outMu    *sync.Mutex
	srv      *http.Server
}

func startDemoReceiver(name string, out io.Writer, outMu *sync.Mutex) (*demoReceiver, error) {
	key := make([]byte, 24)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	rcv := &demoReceiver{name: name, secret: "whsec_" + base64.StdEncoding.EncodeToString(key), out: out, outMu: outMu}
	sec, err := signer.ParseSecret(rcv.secret)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	rcv.url = "http://" + ln.Addr().String() + "/webhooks"
	verifier := &signer.Verifier{Secrets: []signer.Secret{sec}}
	rcv.srv = &http.Server{Handler: signer.Middleware(verifier, http.HandlerFunc(rcv.serve)), ReadHeaderTimeout: 5 * time.Second}
	go rcv.srv.Serve(ln) //nolint:errcheck // ends with Shutdown
	return rcv, nil
}

func (rcv *demoReceiver) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	var p struct {
		Order      int  `json:"order"`
		RolledBack bool `json:"rolled_back"`
	}
	_ = json.Unmarshal(body, &p)
	if p.RolledBack {
		rcv.bad.Add(1)
	}
	rcv.received.Add(1)
	rcv.outMu.Lock()
	fmt.Fprintf(rcv.out, "  %-13s <- %s %-16s signature ok  %s\n", rcv.name, r.Header.Get("webhook-id"), r.Header.Get("X-Demo-Type"), body)
	rcv.outMu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func runDemo(ctx context.Context, args []string, _ io.Reader, stdout, stderr io.Writer) int {
	fs := newFlagSet("demo", "Start a throwaway Postgres cluster (wal_level=logical), apply the schema, start three local\nreceivers that verify every signature, register endpoints for two tenants, insert events from\nconcurrent transactions (some rolled back), and print what arrives and the final relay.deliveries\nrows. Removes the cluster on exit. Needs the PostgreSQL server binaries (apt-get install postgresql).", stderr)
	events := fs.Int("events", 40, "transactions each of the 4 producers commits or rolls back")
	timeout := fs.Duration("timeout", 60*time.Second, "give up if not everything is delivered by then")
	var lf logFlags
	lf.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return flagExit(err, stderr)
	}
	lf.level = map[bool]string{true: lf.level, false: "warn"}[isFlagSet(fs, "log-level")]
	log, err := lf.logger(stderr)
	if err != nil {
		return flagExit(err, stderr)
	}
	if err := demo(ctx, *events, *timeout, log, stdout); err != nil {
		fmt.Fprintln(stderr, "outbox-relay demo:", err)
		return 1
	}
	return 0
}

func isFlagSet(fs *flag.FlagSet, name string) bool {
	found := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == name {
			found = true
		}
	})
	return found
}

func demo(ctx context.Context, txnsPerProducer int, timeout time.Duration, log *slog.Logger, out io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	fmt.Fprintln(out, "starting a throwaway PostgreSQL cluster (wal_level=logical) ...")
	cluster, err := pgtemp.Start(ctx, pgtemp.Options{Logger: log})
	if err != nil {
		return err
	}
	defer cluster.Stop()
	dbURL, err := cluster.CreateDatabase(ctx, "demo")
	if err != nil {
		return err
	}
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := outboxrelay.Migrate(ctx, pool); err != nil {
		return err
	}
	fmt.Fprintf(out, "cluster on port %d, schema applied\n", cluster.Port())

	var outMu sync.Mutex
	acmeBilling, err := startDemoReceiver("acme/billing", out, &outMu)
	if err != nil {
		return err
	}
	acmeAudit, err := startDemoReceiver("acme/audit", out, &outMu)
	if err != nil {
		return err
	}
	globex, err := startDemoReceiver("globex/orders", out, &outMu)
	if err != nil {
		return err
	}
	receivers := []*demoReceiver{acmeBilling, acmeAudit, globex}
	defer func() {
		for _, rcv := range receivers {
			rcv.srv.Close()
		}
	}()
	if _, err = pool.Exec(ctx, `INSERT INTO relay.tenants (id, weight) VALUES ('acme', 2), ('globex', 1)`); err != nil {
		return fmt.Errorf("register tenants: %w", err)
	}
	_, err = pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets, event_types, headers) VALUES
  ('ep_acme_billing', 'acme', $1, ARRAY[$2], ARRAY['invoice.*'], '{"X-Demo-Type": "invoice"}'),
  ('ep_acme_audit',   'acme', $3, ARRAY[$4], NULL,               '{"X-Demo-Type": "any"}'),
  ('ep_globex',       'globex', $5, ARRAY[$6], ARRAY['order.created'], '{"X-Demo-Type": "order"}')`,
		acmeBilling.url, acmeBilling.secret, acmeAudit.url, acmeAudit.secret, globex.url, globex.secret)
	if err != nil {
		return fmt.Errorf("register endpoints: %w", err)
	}
	fmt.Fprintln(out, "endpoints: acme/billing (invoice.*), acme/audit (every type), globex/orders (order.created)")

	r, err := relay.New(relay.Config{
		DatabaseURL:   dbURL,
		Logger:        log,
		AllowNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		RetrySchedule: []time.Duration{0, 200 * time.Millisecond, time.Second},
		PollInterval:  100 * time.Millisecond,
	})
	if err != nil {
		return err
	}
	relayCtx, stopRelay := context.WithCancel(ctx)
	relayDone := make(chan error, 1)
	go func() { relayDone <- r.Run(relayCtx) }()
	for r.State() != "active" {
		select {
		case err := <-relayDone:
			stopRelay()
			return fmt.Errorf("relay: %w", err)
		case <-time.After(20 * time.Millisecond):
		}
	}

	// Four "application" producers; every fourth transaction rolls back.
	fmt.Fprintf(out, "4 producers x %d transactions, every 4th rolled back ...\n", txnsPerProducer)
	var committed atomic.Int64
	var wg sync.WaitGroup
	produceErr := make(chan error, 4)
	types := []struct{ tenant, typ string }{{"acme", "invoice.paid"}, {"acme", "customer.updated"}, {"globex", "order.created"}, {"globex", "order.shipped"}}
	for p := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range txnsPerProducer {
				rollback := i%4 == 3
				err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
					for j := range 1 + i%3 {
						t := types[(p+i+j)%len(types)]
						payload := fmt.Sprintf(`{"order": %d, "producer": %d, "rolled_back": %t}`, i*10+j, p, rollback)
						if err := outboxrelay.Publish(ctx, tx, outboxrelay.Event{TenantID: t.tenant, EventType: t.typ, Payload: []byte(payload)}); err != nil {
							return err
						}
					}
					if rollback {
						return errRollback
					}
					return nil
				})
				if err != nil && !errors.Is(err, errRollback) {
					produceErr <- err
					return
				}
				if err == nil {
					committed.Add(int64(1 + i%3))
				}
			}
		}()
	}
	wg.Wait()
	close(produceErr)
	if err := <-produceErr; err != nil {
		stopRelay()
		return fmt.Errorf("producer: %w", err)
	}

	// Wait until every committed event has a final row at every endpoint
	// it routes to (or an unrouted row).
	var final, total int
	for {
		err := pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE state NOT IN ('pending', 'retrying')),
  (SELECT count(*) FROM relay.outbox) FROM relay.deliveries`).Scan(&final, &total)
		if err == nil {
			var routed int
			_ = pool.QueryRow(ctx, `SELECT count(DISTINCT event_id) FROM relay.deliveries`).Scan(&routed)
			if int64(routed) == committed.Load() && final > 0 {
				var open int
				_ = pool.QueryRow(ctx, `SELECT count(*) FROM relay.deliveries WHERE state IN ('pending','retrying')`).Scan(&open)
				if open == 0 {
					break
				}
			}
		}
		select {
		case <-ctx.Done():
			stopRelay()
			<-relayDone
			return fmt.Errorf("not everything was delivered within %s (%d final delivery rows, %d events committed)", timeout, final, committed.Load())
		case <-time.After(50 * time.Millisecond):
		}
	}
	stopRelay()
	if err := <-relayDone; err != nil {
		return fmt.Errorf("relay: %w", err)
	}

	fmt.Fprintf(out, "\n%d events committed (rolled-back ones never reach the outbox's WAL stream)\n", committed.Load())
	fmt.Fprintln(out, "\nrelay.deliveries, by endpoint and state:")
	type line struct {
		ep, state string
		n         int
		attempts  float64
	}
	var lines []line
	rows, err := pool.Query(context.Background(), `SELECT endpoint_id, state, count(*)::int, round(avg(attempts), 2)::float8
FROM relay.deliveries GROUP BY 1, 2 ORDER BY 1, 2`)
	if err != nil {
		return err
	}
	var l line
	_, err = pgx.ForEachRow(rows, []any{&l.ep, &l.state, &l.n, &l.attempts}, func() error { lines = append(lines, l); return nil })
	if err != nil {
		return err
	}
	sort.Slice(lines, func(i, j int) bool { return lines[i].ep < lines[j].ep })
	fmt.Fprintf(out, "  %-18s %-10s %6s %9s\n", "endpoint_id", "state", "rows", "attempts")
	for _, l := range lines {
		ep := l.ep
		if ep == "" {
			ep = "(none)"
		}
		fmt.Fprintf(out, "  %-18s %-10s %6d %9.2f\n", ep, l.state, l.n, l.attempts)
	}
	var bad int64
	for _, rcv := range receivers {
		bad += rcv.bad.Load()
		fmt.Fprintf(out, "receiver %-13s got %d webhooks, every signature verified\n", rcv.name, rcv.received.Load())
	}
	if bad > 0 {
		return fmt.Errorf("%d rolled-back events were delivered", bad)
	}
	fmt.Fprintln(out, "no rolled-back event was delivered; removing the cluster")
	return nil
}

var errRollback = errors.New("demo rollback")
