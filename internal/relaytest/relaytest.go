// Package relaytest is the test harness the relay's packages share: a
// fresh database with the relay schema on a throwaway cluster, with a
// unique slot name, and small helpers that fail the test on error.
package relaytest

import (
	"context"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	outboxrelay "github.com/outbox-relay/outbox-relay"
	"github.com/outbox-relay/outbox-relay/internal/pgtemp"
)

// Env is one isolated database with the relay schema.
type Env struct {
	T    testing.TB
	URL  string
	Slot string // slots are cluster-wide: each Env has its own name
	Pool *pgxpool.Pool
}

// New creates the database (dropped when t ends), applies the schema and
// picks a slot name starting with prefix.
func New(t testing.TB, cluster *pgtemp.Cluster, prefix string) *Env {
	t.Helper()
	url := pgtemp.NewDatabase(t, cluster)
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if err := outboxrelay.Migrate(context.Background(), pool); err != nil {
		t.Fatal(err)
	}
	suffix := make([]byte, 6)
	rand.Read(suffix)
	return &Env{T: t, URL: url, Pool: pool, Slot: fmt.Sprintf("%s_%x", prefix, suffix)}
}

// Exec runs a statement or fails the test.
func (e *Env) Exec(sql string, args ...any) {
	e.T.Helper()
	if _, err := e.Pool.Exec(context.Background(), sql, args...); err != nil {
		e.T.Fatalf("%s: %v", sql, err)
	}
}

// Count runs a query returning one integer or fails the test.
func (e *Env) Count(sql string, args ...any) int {
	e.T.Helper()
	var n int
	if err := e.Pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		e.T.Fatalf("%s: %v", sql, err)
	}
	return n
}

// WaitFor polls cond until it holds, or fails the test after timeout.
func (e *Env) WaitFor(what string, timeout time.Duration, cond func() bool) {
	e.T.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			e.T.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Main is for TestMain: a cluster in *c for the package's tests, and
// goleak's check that no goroutine outlives them (idle keep-alive
// connections of HTTP clients excepted).
func Main(m *testing.M, c **pgtemp.Cluster) {
	goleak.VerifyTestMain(pgtemp.WithCluster(m, c),
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}
