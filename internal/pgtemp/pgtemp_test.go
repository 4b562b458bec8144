package pgtemp

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/goleak"
)

// cluster is shared by the tests that do not stop or restart it.
var cluster *Cluster

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(WithCluster(m, &cluster))
}

func connect(t *testing.T, url string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func queryString(t *testing.T, conn *pgx.Conn, sql string, args ...any) string {
	t.Helper()
	var s string
	if err := conn.QueryRow(t.Context(), sql, args...).Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

// startOwn starts a cluster for one test, stopped in t.Cleanup.
func startOwn(t *testing.T, opts Options) *Cluster {
	t.Helper()
	if os.Getenv(EnvDatabaseURL) != "" {
		t.Skipf("%s is set: not starting clusters", EnvDatabaseURL)
	}
	opts.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	c, err := Start(t.Context(), opts)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Stop(); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	return c
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func TestStartConfiguresLogicalReplication(t *testing.T) {
	if !cluster.Owned() {
		t.Skip("external cluster")
	}
	t.Parallel()
	conn := connect(t, cluster.URL("postgres"))
	want := map[string]string{
		"wal_level":               "logical",
		"max_wal_senders":         "64",
		"max_replication_slots":   "64",
		"max_connections":         "300",
		"listen_addresses":        "127.0.0.1",
		"fsync":                   "off",
		"synchronous_commit":      "on",
		"full_page_writes":        "off",
		"port":                    strconv.Itoa(cluster.Port()),
		"unix_socket_directories": cluster.SocketDir(),
	}
	for name, value := range want {
		if got := queryString(t, conn, "SELECT current_setting($1)", name); got != value {
			t.Errorf("%s = %q, want %q", name, got, value)
		}
	}
	if got := queryString(t, conn, "SELECT current_user"); got != "postgres" {
		t.Errorf("current_user = %q, want postgres", got)
	}
	if super := queryString(t, conn, "SELECT current_setting('is_superuser')"); super != "on" {
		t.Errorf("is_superuser = %q", super)
	}
	if os.Geteuid() == 0 {
		fi, err := os.Stat(filepath.Join(cluster.Dir(), dataName))
		if err != nil {
			t.Fatal(err)
		}
		if uid := fi.Sys().(*syscall.Stat_t).Uid; uid == 0 {
			t.Errorf("running as root, the data directory is owned by root, not postgres")
		}
	}
}

func TestReplicationConnectionIsTrusted(t *testing.T) {
	t.Parallel()
	url := NewDatabase(t, cluster)
	conn, err := pgconn.Connect(t.Context(), url+"&replication=database")
	if err != nil {
		t.Fatalf("replication connection: %v", err)
	}
	defer conn.Close(context.Background())
	sysident, err := pglogrepl.IdentifySystem(t.Context(), conn)
	if err != nil {
		t.Fatalf("IDENTIFY_SYSTEM: %v", err)
	}
	if sysident.DBName == "" {
		t.Errorf("IDENTIFY_SYSTEM returned no database")
	}
}

func TestSettingsOverride(t *testing.T) {
	t.Parallel()
	c := startOwn(t, Options{Settings: map[string]string{
		"wal_level":        "replica",
		"application_name": "it's quoted",
	}})
	conn := connect(t, c.URL("postgres"))
	if got := queryString(t, conn, "SHOW wal_level"); got != "replica" {
		t.Errorf("wal_level = %q, want replica", got)
	}
	if got := queryString(t, conn, "SELECT current_setting('application_name')"); got == "" {
		t.Errorf("application_name empty")
	}
}

func TestStartRejectsBadSettingName(t *testing.T) {
	_, err := Start(t.Context(), Options{Settings: map[string]string{"x = 1\nfsync": "on"}})
	if err == nil || !strings.Contains(err.Error(), "invalid setting name") {
		t.Fatalf("Start with bad setting name: err = %v", err)
	}
}

func TestCreateAndDropDatabase(t *testing.T) {
	t.Parallel()
	name := databaseName(t.Name())
	url, err := cluster.CreateDatabase(t.Context(), name)
	if err != nil {
		t.Fatal(err)
	}
	if want := cluster.URL(name); url != want {
		t.Errorf("CreateDatabase URL = %q, want %q", url, want)
	}
	conn := connect(t, url)
	if _, err := conn.Exec(t.Context(), "CREATE TABLE t (id int); INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	// The open connection must not stop the drop.
	if err := cluster.DropDatabase(t.Context(), name); err != nil {
		t.Fatalf("DropDatabase: %v", err)
	}
	if exists(t, name) {
		t.Errorf("database %s still exists", name)
	}
	if err := cluster.DropDatabase(t.Context(), name); err != nil {
		t.Errorf("DropDatabase of a missing database: %v", err)
	}
}

func exists(t *testing.T, dbname string) bool {
	t.Helper()
	admin := connect(t, cluster.URL("postgres"))
	var n int
	if err := admin.QueryRow(t.Context(), "SELECT count(*) FROM pg_database WHERE datname = $1", dbname).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n > 0
}

func TestDropDatabaseWithActiveLogicalSlot(t *testing.T) {
	t.Parallel()
	name := databaseName(t.Name())
	url, err := cluster.CreateDatabase(t.Context(), name)
	if err != nil {
		t.Fatal(err)
	}
	conn := connect(t, url)
	if _, err := conn.Exec(t.Context(), `
		CREATE TABLE t (id int PRIMARY KEY);
		CREATE PUBLICATION p FOR TABLE t;
	`); err != nil {
		t.Fatal(err)
	}
	for _, slot := range []string{"idle_slot", "busy_slot"} {
		if _, err := conn.Exec(t.Context(), "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot); err != nil {
			t.Fatal(err)
		}
	}

	// A walsender streaming from busy_slot holds it active.
	repl, err := pgconn.Connect(t.Context(), url+"&replication=database")
	if err != nil {
		t.Fatal(err)
	}
	defer repl.Close(context.Background())
	if err := pglogrepl.StartReplication(t.Context(), repl, "busy_slot", 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names 'p'"},
	}); err != nil {
		t.Fatal(err)
	}
	admin := connect(t, cluster.URL("postgres"))
	waitFor(t, "busy_slot to be active", func() bool {
		return queryString(t, admin, "SELECT active::text FROM pg_replication_slots WHERE slot_name = 'busy_slot'") == "true"
	})

	if err := cluster.DropDatabase(t.Context(), name); err != nil {
		t.Fatalf("DropDatabase: %v", err)
	}
	if exists(t, name) {
		t.Errorf("database %s still exists", name)
	}
	var slots int
	if err := admin.QueryRow(t.Context(), "SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ('idle_slot', 'busy_slot')").Scan(&slots); err != nil {
		t.Fatal(err)
	}
	if slots != 0 {
		t.Errorf("%d slots left", slots)
	}
}

// waitFor polls cond until it holds or 10 seconds pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRestartKeepsDataAndPort(t *testing.T) {
	for _, mode := range []string{"fast", "immediate"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			// Crash-safe commits, so that the immediate restart keeps the row.
			c := startOwn(t, Options{Settings: map[string]string{"synchronous_commit": "on"}})
			port := c.Port()
			url, err := c.CreateDatabase(t.Context(), "app")
			if err != nil {
				t.Fatal(err)
			}
			conn, err := pgx.Connect(t.Context(), url)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := conn.Exec(t.Context(), "CREATE TABLE t (v text); INSERT INTO t VALUES ('kept')"); err != nil {
				t.Fatal(err)
			}
			conn.Close(t.Context())

			if err := c.Restart(t.Context(), mode); err != nil {
				t.Fatalf("Restart(%q): %v", mode, err)
			}
			if c.Port() != port {
				t.Errorf("port changed from %d to %d", port, c.Port())
			}
			conn = connect(t, c.URL("app"))
			if got := queryString(t, conn, "SELECT v FROM t"); got != "kept" {
				t.Errorf("after restart: v = %q", got)
			}
			log, err := os.ReadFile(c.LogFile())
			if err != nil {
				t.Fatal(err)
			}
			crashed := strings.Contains(string(log), "not properly shut down")
			if crashed != (mode == "immediate") {
				t.Errorf("log says crash recovery = %v after %s restart:\n%s", crashed, mode, log)
			}
		})
	}
}

func TestRestartRejectsUnknownMode(t *testing.T) {
	if err := cluster.Restart(t.Context(), "smart"); err == nil {
		t.Fatal("Restart(\"smart\") succeeded")
	}
}

func TestStopRemovesDirectoryAndIsIdempotent(t *testing.T) {
	t.Parallel()
	c := startOwn(t, Options{})
	dir := c.Dir()
	if _, err := os.Stat(filepath.Join(dir, dataName, "PG_VERSION")); err != nil {
		t.Fatalf("data directory: %v", err)
	}
	if err := c.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after Stop, %s: err = %v, want not exist", dir, err)
	}
	if conn, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(c.Port())), time.Second); err == nil {
		conn.Close()
		t.Errorf("port %d still accepts connections after Stop", c.Port())
	}
	if err := c.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if err := c.Restart(t.Context(), "fast"); err == nil {
		t.Errorf("Restart after Stop succeeded")
	}
}

func TestExternal(t *testing.T) {
	t.Parallel()
	ext, err := External(cluster.URL("postgres") + "&application_name=ext")
	if err != nil {
		t.Fatal(err)
	}
	if ext.Owned() {
		t.Error("external cluster says it is owned")
	}
	if ext.Port() != cluster.Port() {
		t.Errorf("Port = %d, want %d", ext.Port(), cluster.Port())
	}
	if got, want := ext.URL("other"), strings.Replace(cluster.URL("other"), "sslmode=disable", "sslmode=disable&application_name=ext", 1); got != want {
		t.Errorf("URL(other) = %q, want %q", got, want)
	}
	url := NewDatabase(t, ext)
	conn := connect(t, url)
	if got := queryString(t, conn, "SELECT current_setting('application_name')"); got != "ext" {
		t.Errorf("application_name = %q", got)
	}
	if err := ext.Restart(t.Context(), "fast"); !errors.Is(err, ErrNotOwned) {
		t.Errorf("Restart: err = %v, want ErrNotOwned", err)
	}
	if err := ext.Stop(); err != nil {
		t.Errorf("Stop: %v", err)
	}
	// Stop must not have touched the server.
	if got := queryString(t, conn, "SELECT 'alive'"); got != "alive" {
		t.Errorf("server gone after external Stop")
	}
	if _, err := External("host=localhost"); err == nil {
		t.Error("External accepted a keyword/value string")
	}
}

func TestNewDatabaseIsDroppedAfterTest(t *testing.T) {
	t.Parallel()
	var url string
	t.Run("inner/with spaces & Symbols", func(t *testing.T) {
		url = NewDatabase(t, cluster)
		conn := connect(t, url)
		if _, err := conn.Exec(t.Context(), "CREATE TABLE t (id int)"); err != nil {
			t.Fatal(err)
		}
	})
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(cfg.Database, "t_testnewdatabaseisdroppedaftertest_inner_with_spaces") {
		t.Errorf("database name %q", cfg.Database)
	}
	if exists(t, cfg.Database) {
		t.Errorf("database %s exists after its test", cfg.Database)
	}
}

func TestDatabaseName(t *testing.T) {
	for _, tc := range []struct{ test, prefix string }{
		{"TestX", "t_testx_"},
		{"TestX/sub_test#01", "t_testx_sub_test_01_"},
		{"Test/ÄÖ--//x", "t_test_x_"},
		{strings.Repeat("A", 100), "t_" + strings.Repeat("a", 52) + "_"},
	} {
		got := databaseName(tc.test)
		if !strings.HasPrefix(got, tc.prefix) || len(got) != len(tc.prefix)+8 || len(got) > 63 {
			t.Errorf("databaseName(%q) = %q, want %q + 8 hex digits, at most 63 bytes", tc.test, got, tc.prefix)
		}
	}
	if a, b := databaseName("T"), databaseName("T"); a == b {
		t.Errorf("two names for one test are equal: %q", a)
	}
}

func TestFindBinDir(t *testing.T) {
	dir, err := FindBinDir()
	if err != nil {
		t.Fatal(err)
	}
	if !hasServerBinaries(dir) {
		t.Errorf("FindBinDir = %s, which lacks initdb or postgres", dir)
	}
}

func TestMissingBinariesSayWhatToInstall(t *testing.T) {
	// Not parallel: it changes PATH and debianRoot.
	t.Setenv("PATH", t.TempDir())
	saved := debianRoot
	debianRoot = t.TempDir()
	t.Cleanup(func() { debianRoot = saved })
	os.MkdirAll(filepath.Join(debianRoot, "16", "bin"), 0o755) // client-only install

	_, err := Start(t.Context(), Options{})
	if !errors.Is(err, ErrNoServerBinaries) {
		t.Fatalf("Start: err = %v, want ErrNoServerBinaries", err)
	}
	for _, want := range []string{"apt-get install postgresql", EnvDatabaseURL, "wal_level=logical"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

// childEnv makes the test binary, run by TestServerDiesWithItsParent, start
// a cluster and exit without stopping it.
const childEnv = "PGTEMP_TEST_ORPHAN_CHILD"

func TestOrphanChild(t *testing.T) {
	if os.Getenv(childEnv) == "" {
		t.Skip("only run as the child of TestServerDiesWithItsParent")
	}
	c, err := Start(t.Context(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("dir=%s\nserver_pid=%d\n", c.Dir(), c.proc.Process.Pid)
	os.Exit(0) // without Stop, as a killed test binary would
}

func TestServerDiesWithItsParent(t *testing.T) {
	if testing.Short() || os.Getenv(EnvDatabaseURL) != "" {
		t.Skip("starts its own cluster")
	}
	t.Parallel()
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestOrphanChild$", "-test.count=1")
	// The child's TestMain uses the shared cluster instead of starting one.
	cmd.Env = append(os.Environ(), childEnv+"=1", EnvDatabaseURL+"="+cluster.URL("postgres"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	var dir string
	var pid int
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "dir="); ok {
			dir = v
		}
		if v, ok := strings.CutPrefix(sc.Text(), "server_pid="); ok {
			pid, _ = strconv.Atoi(v)
		}
	}
	if dir == "" || pid == 0 {
		t.Fatalf("child output lacks dir or server_pid:\n%s", out)
	}
	waitFor(t, "the orphaned server to die", func() bool { return !alive(pid) })

	removeAbandoned(filepath.Dir(dir), 0, slog.New(slog.DiscardHandler))
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("abandoned directory %s not removed: %v", dir, err)
		os.RemoveAll(dir)
	}
}
