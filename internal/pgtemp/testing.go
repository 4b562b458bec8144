package pgtemp

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// Main is for TestMain: it sets *c to a cluster (one started with [Start],
// or [External] if OUTBOX_RELAY_TEST_DATABASE_URL is set), runs m.Run(),
// stops the cluster, and returns the exit code. If the cluster cannot be had
// it prints why (and, if the server binaries are missing, what to install)
// and returns 1.
//
//	var cluster *pgtemp.Cluster
//
//	func TestMain(m *testing.M) { os.Exit(pgtemp.Main(m, &cluster)) }
func Main(m *testing.M, c **Cluster) int {
	return WithCluster(m, c).Run()
}

// Runner is what [WithCluster] returns; its Run has the signature of
// testing.M's, so it can be handed to go.uber.org/goleak.VerifyTestMain.
type Runner interface{ Run() int }

// WithCluster wraps m so that Run does what [Main] does. It lets [Main]'s
// behaviour compose with other TestMain wrappers:
//
//	func TestMain(m *testing.M) { goleak.VerifyTestMain(pgtemp.WithCluster(m, &cluster)) }
func WithCluster(m Runner, c **Cluster) Runner {
	return runner{m: m, c: c}
}

type runner struct {
	m Runner
	c **Cluster
}

func (r runner) Run() int {
	cluster, err := clusterForTests()
	if err != nil {
		// When binaries are missing, err already says what to install.
		fmt.Fprintf(os.Stderr, "pgtemp: cannot get a PostgreSQL server for the tests: %v\n", err)
		return 1
	}
	*r.c = cluster
	code := r.m.Run()
	if err := cluster.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "pgtemp: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

func clusterForTests() (*Cluster, error) {
	if u := os.Getenv(EnvDatabaseURL); u != "" {
		return External(u)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return Start(ctx, Options{})
}

// NewDatabase creates a fresh database for t, named after t.Name()
// (lower-cased, non-alphanumerics replaced by "_", shortened) plus a random
// suffix, drops it when t's cleanup runs, and returns its URL. Cleanups that
// t registers later (closing the connections that use the database, say)
// run before the drop.
func NewDatabase(t testing.TB, c *Cluster) string {
	t.Helper()
	if c == nil {
		t.Fatal("pgtemp.NewDatabase: nil cluster (is pgtemp.Main in TestMain?)")
	}
	name := databaseName(t.Name())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	url, err := c.CreateDatabase(ctx, name)
	if err != nil {
		t.Fatalf("pgtemp.NewDatabase: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := c.DropDatabase(ctx, name); err != nil {
			t.Errorf("pgtemp.NewDatabase cleanup: %v", err)
		}
	})
	return url
}

// databaseName turns a test name into a database name: at most 63 bytes
// (Postgres truncates longer identifiers, which could make two names equal),
// of [a-z0-9_], ending in a random suffix.
func databaseName(testName string) string {
	var b strings.Builder
	b.WriteString("t_")
	lastUnderscore := true
	for _, r := range strings.ToLower(testName) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
			lastUnderscore = false
		} else if !lastUnderscore {
			b.WriteByte('_')
			lastUnderscore = true
		}
	}
	base := strings.TrimRight(b.String(), "_")
	var suffix [4]byte
	_, _ = rand.Read(suffix[:])
	const maxLen = 63 - 1 - 2*len(suffix)
	if len(base) > maxLen {
		base = strings.TrimRight(base[:maxLen], "_")
	}
	return base + "_" + hex.EncodeToString(suffix[:])
}
