package e2e

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/pgtemp"
	"github.com/outbox-relay/outbox-relay/internal/relaytest"
)

// runFails runs the binary and expects it to exit non-zero quickly with a
// message containing every part.
func runFails(t *testing.T, parts []string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, binary, args...).CombinedOutput()
	if err == nil {
		t.Fatalf("outbox-relay %v succeeded; output:\n%s", args, out)
	}
	if ctx.Err() != nil {
		t.Fatalf("outbox-relay %v did not fail fast; output:\n%s", args, out)
	}
	if !hasAll(string(out), parts...) {
		t.Fatalf("output does not say %q:\n%s", parts, out)
	}
}

func TestMisconfigurationFailsFastWithAFix(t *testing.T) {
	t.Run("wal_level", func(t *testing.T) {
		if !cluster.Owned() {
			t.Skip("needs its own cluster")
		}
		ctx := context.Background()
		c, err := pgtemp.Start(ctx, pgtemp.Options{Settings: map[string]string{"wal_level": "replica"}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Stop()
		url, err := c.CreateDatabase(ctx, "app")
		if err != nil {
			t.Fatal(err)
		}
		runFails(t, []string{"wal_level", "logical"}, "migrate", "--database-url", url)
		if out, err := exec.Command(binary, "migrate", "--schema-only", "--database-url", url).CombinedOutput(); err != nil {
			t.Fatalf("migrate --schema-only: %v %s", err, out)
		}
		runFails(t, []string{"wal_level", "logical"}, relayArgs(url)...)
	})
	t.Run("no replication privilege", func(t *testing.T) {
		url, pool := database(t)
		ctx := context.Background()
		if _, err := pool.Exec(ctx, `DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_norepl') THEN CREATE ROLE app_norepl LOGIN; END IF; END $$;
GRANT ALL ON SCHEMA relay TO app_norepl; GRANT ALL ON ALL TABLES IN SCHEMA relay TO app_norepl`); err != nil {
			t.Fatal(err)
		}
		u := strings.Replace(url, "postgres@", "app_norepl@", 1)
		if u == url {
			t.Fatalf("cannot derive a URL for another role from %s", url)
		}
		runFails(t, []string{"REPLICATION", "ALTER ROLE"}, relayArgs(u)...)
	})
	t.Run("wrong database url", func(t *testing.T) {
		runFails(t, []string{"connect"}, relayArgs("postgres://postgres@127.0.0.1:1/nope?sslmode=disable&connect_timeout=2")...)
	})
	t.Run("database that never answers", func(t *testing.T) {
		// It accepts the TCP connection and says nothing, as a stopped
		// postmaster or a proxy without a backend does. The URL sets no
		// connect_timeout: the relay's own bound (10 s) ends the wait.
		silent := "postgres://postgres@" + relaytest.SilentServer(t) + "/app?sslmode=disable"
		// migrate stands for the other commands: they connect alike.
		for name, args := range map[string][]string{
			"run":     relayArgs(silent),
			"migrate": {"migrate", "--database-url", silent},
		} {
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				t0 := time.Now()
				runFails(t, []string{"connect", "timeout"}, args...)
				if took := time.Since(t0); took < 9*time.Second || took > 20*time.Second {
					t.Errorf("outbox-relay %s gave up after %v, want about 10s", name, took)
				}
			})
		}
	})
	t.Run("schema missing", func(t *testing.T) {
		url := pgtemp.NewDatabase(t, cluster)
		runFails(t, []string{"outbox-relay migrate"}, relayArgs(url)...)
	})
	t.Run("schema of an older version", func(t *testing.T) {
		url, pool := database(t)
		if _, err := pool.Exec(context.Background(), `DROP TABLE relay.endpoint_history`); err != nil {
			t.Fatal(err)
		}
		runFails(t, []string{"older than this relay", "outbox-relay migrate"}, relayArgs(url)...)
	})
	t.Run("bad flag", func(t *testing.T) {
		runFails(t, []string{"Overflow"}, "run", "--database-url", "postgres://x", "--overflow", "sometimes")
	})
}
