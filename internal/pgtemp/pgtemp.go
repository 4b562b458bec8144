package pgtemp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// EnvDatabaseURL names the environment variable that makes [Main] use an
// existing server instead of starting one.
const EnvDatabaseURL = "OUTBOX_RELAY_TEST_DATABASE_URL"

// ErrNoServerBinaries means no PostgreSQL server binaries (initdb and
// postgres) were found. The error returned by [Start] wraps it and says what
// to install.
var ErrNoServerBinaries = errors.New("pgtemp: PostgreSQL server binaries (initdb, postgres) not found")

// ErrNotOwned is returned by operations that need a server this package
// started, when called on a cluster from [External].
var ErrNotOwned = errors.New("pgtemp: cluster is external, not owned")

// installHint says exactly what to do when the server binaries are missing.
const installHint = "install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`; " +
	"Fedora: `dnf install postgresql-server`; macOS: `brew install postgresql`), " +
	"or set " + EnvDatabaseURL + " to the URL of a server with wal_level=logical"

// Options configure [Start]. The zero value is ready to use.
type Options struct {
	// Settings are extra postgresql.conf settings, applied after (and so
	// overriding) the package's own, e.g. {"wal_level": "replica"} to test
	// misconfiguration. Default none.
	Settings map[string]string
	// Durable keeps fsync, synchronous_commit and full_page_writes on, for
	// benchmarks. Default off, for speed: see the package documentation for
	// what that means for crash tests.
	Durable bool
	// HBA are extra pg_hba.conf lines, after the package's own (which trust
	// local sockets and 127.0.0.1), e.g. "host all all 10.0.0.0/30 trust"
	// with a matching listen_addresses in Settings. Default none.
	HBA []string
	// Logger receives the package's own events (start, stop, restart) at
	// debug and info level. The server's log goes to a file in the cluster's
	// directory, see [Cluster.LogFile]. Default: discard.
	Logger *slog.Logger
}

// baseSettings are written to postgresql.conf for every owned cluster.
// Port and socket directory are given on the command line instead, so that a
// start can retry with another port.
var baseSettings = map[string]string{
	"listen_addresses":      "127.0.0.1",
	"wal_level":             "logical",
	"max_wal_senders":       "64",
	"max_replication_slots": "64",
	"max_connections":       "300",
	// Enough background workers that parallel queries in many tests do not
	// starve each other; logical walsenders do not need them.
	"max_worker_processes": "16",
	"logging_collector":    "off",
	"log_line_prefix":      "%m [%p] %q%u@%d ",
	"log_min_messages":     "warning",
	"log_timezone":         "UTC",
	"timezone":             "UTC",
	"datestyle":            "iso, mdy",
	"lc_messages":          "C",
}

// fastSettings skip disk flushes. synchronous_commit stays on: with fsync
// off it costs little, and a Restart("immediate") then keeps every commit
// a test saw succeed, as a durable server would.
var fastSettings = map[string]string{
	"fsync":            "off",
	"full_page_writes": "off",
}

// Cluster is a PostgreSQL server: one this package started ([Start]) or an
// existing one ([External]). Its methods are safe for concurrent use.
type Cluster struct {
	owned  bool
	logger *slog.Logger

	// External clusters: the URL as given, with its path replaced by URL.
	base *url.URL

	// Owned clusters.
	port    int
	binDir  string
	dir     string // temporary directory: data/, server.log, socket
	runAs   *runAs
	opts    Options
	mu      sync.Mutex
	proc    *exec.Cmd
	exited  chan struct{} // closed when proc has been reaped
	stopped bool
}

// Start creates a new cluster in a new temporary directory (initdb), starts
// it on a free port on 127.0.0.1, and waits until it accepts connections or
// ctx ends. The caller must call [Cluster.Stop].
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	binDir, err := FindBinDir()
	if err != nil {
		return nil, err
	}
	for k := range opts.Settings {
		if !settingName.MatchString(k) {
			return nil, fmt.Errorf("pgtemp: Options.Settings: invalid setting name %q", k)
		}
	}
	ra, err := lookupRunAs()
	if err != nil {
		return nil, err
	}

	began := time.Now()
	parent := tempParent(ra)
	removeAbandoned(parent, time.Minute, logger)
	dir, err := os.MkdirTemp(parent, dirPrefix)
	if err != nil {
		return nil, fmt.Errorf("pgtemp: create temporary directory: %w", err)
	}
	c := &Cluster{
		owned:  true,
		logger: logger,
		binDir: binDir,
		dir:    dir,
		runAs:  ra,
		opts:   opts,
	}
	fail := func(err error) (*Cluster, error) {
		if rmErr := os.RemoveAll(dir); rmErr != nil {
			logger.Warn("pgtemp: remove temporary directory", slog.String("dir", dir), slog.Any("error", rmErr))
		}
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return fail(fmt.Errorf("pgtemp: write owner file: %w", err))
	}
	if ra != nil {
		if err := os.Chown(dir, ra.uid, ra.gid); err != nil {
			return fail(fmt.Errorf("pgtemp: give %s to OS user %s: %w", dir, ra.name, err))
		}
	}
	if err := c.initdb(ctx); err != nil {
		return fail(err)
	}
	if err := c.configure(); err != nil {
		return fail(err)
	}

	// A port found free can be taken by someone else before postgres binds
	// it; then the server exits at once and we try another.
	const attempts = 5
	for i := 1; ; i++ {
		c.port, err = freePort()
		if err != nil {
			return fail(err)
		}
		err = c.start(ctx)
		if err == nil {
			break
		}
		var pe *portError
		if !errors.As(err, &pe) || i == attempts {
			return fail(err)
		}
		logger.Debug("pgtemp: port taken, retrying", slog.Int("port", c.port))
	}
	logger.Info("pgtemp: cluster started",
		slog.Int("port", c.port), slog.String("dir", dir),
		slog.Duration("took", time.Since(began)))
	return c, nil
}

// External wraps an existing server given by a postgres:// URL. The cluster
// is not owned: Stop does nothing and Restart fails with [ErrNotOwned].
func External(rawURL string) (*Cluster, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("pgtemp: parse external URL: %w", err)
	}
	if u.Scheme != "postgres" && u.Scheme != "postgresql" {
		return nil, fmt.Errorf("pgtemp: external URL must start with postgres:// or postgresql://, got scheme %q", u.Scheme)
	}
	if _, err := pgx.ParseConfig(rawURL); err != nil {
		return nil, fmt.Errorf("pgtemp: parse external URL: %w", err)
	}
	port := 5432
	if p := u.Port(); p != "" {
		port, err = strconv.Atoi(p)
		if err != nil {
			return nil, fmt.Errorf("pgtemp: external URL port %q: %w", p, err)
		}
	}
	return &Cluster{
		logger: slog.New(slog.DiscardHandler),
		base:   u,
		port:   port,
	}, nil
}

// URL returns a superuser connection URL for database dbname, e.g.
// postgres://postgres@127.0.0.1:PORT/dbname?sslmode=disable. For an external
// cluster it is the given URL with its database replaced.
func (c *Cluster) URL(dbname string) string {
	if c.base != nil {
		u := *c.base
		u.Path = "/" + dbname
		u.RawPath = ""
		return u.String()
	}
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User("postgres"),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(c.port)),
		Path:     "/" + dbname,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// Port returns the server's TCP port.
func (c *Cluster) Port() int { return c.port }

// Owned reports whether this package started the server.
func (c *Cluster) Owned() bool { return c.owned }

// Dir returns the cluster's temporary directory (empty for an external
// cluster). The data directory is Dir()/data.
func (c *Cluster) Dir() string { return c.dir }

// ServerPID returns the postmaster's process id, read from its
// postmaster.pid file; an error for an external cluster.
func (c *Cluster) ServerPID() (int, error) {
	if !c.owned {
		return 0, errors.New("pgtemp: the server of an external cluster is not ours to inspect")
	}
	return readPID(filepath.Join(c.dataDir(), "postmaster.pid"))
}

// SocketDir returns the directory of the server's unix socket (empty for an
// external cluster).
func (c *Cluster) SocketDir() string { return c.dir }

// LogFile returns the path of the server's log (empty for an external
// cluster).
func (c *Cluster) LogFile() string {
	if !c.owned {
		return ""
	}
	return filepath.Join(c.dir, logName)
}

// CreateDatabase creates database name and returns its URL.
func (c *Cluster) CreateDatabase(ctx context.Context, name string) (string, error) {
	conn, err := c.admin(ctx)
	if err != nil {
		return "", err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", fmt.Errorf("pgtemp: create database %q: %w", name, err)
	}
	return c.URL(name), nil
}

// DropDatabase drops database name if it exists. It first drops the
// database's replication slots (terminating the walsenders using them) and
// terminates its backends, then runs DROP DATABASE ... WITH (FORCE).
func (c *Cluster) DropDatabase(ctx context.Context, name string) error {
	conn, err := c.admin(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	// A walsender may create a slot or reconnect between the steps below,
	// so the whole sequence is retried while Postgres says "in use".
	const attempts = 20
	for i := 1; ; i++ {
		err := dropOnce(ctx, conn, name)
		if err == nil {
			return nil
		}
		var pgErr *pgconn.PgError
		inUse := errors.As(err, &pgErr) && pgErr.Code == sqlstateObjectInUse
		if !inUse || i == attempts || ctx.Err() != nil {
			return fmt.Errorf("pgtemp: drop database %q: %w", name, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pgtemp: drop database %q: %w", name, ctx.Err())
		case <-time.After(time.Duration(i) * 10 * time.Millisecond):
		}
	}
}

const sqlstateObjectInUse = "55006"

func dropOnce(ctx context.Context, conn *pgx.Conn, name string) error {
	rows, err := conn.Query(ctx,
		`SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = $1`, name)
	if err != nil {
		return fmt.Errorf("list replication slots: %w", err)
	}
	type slot struct {
		name string
		pid  *int32
	}
	slots, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (slot, error) {
		var s slot
		err := r.Scan(&s.name, &s.pid)
		return s, err
	})
	if err != nil {
		return fmt.Errorf("list replication slots: %w", err)
	}
	for _, s := range slots {
		if s.pid != nil {
			// The two-argument form waits (up to 5s) for the walsender to
			// exit, so the slot is released before we drop it.
			if _, err := conn.Exec(ctx, `SELECT pg_terminate_backend($1, 5000)`, *s.pid); err != nil {
				return fmt.Errorf("terminate walsender %d of slot %q: %w", *s.pid, s.name, err)
			}
		}
		// The slot may be gone already (dropped by its user, or temporary).
		if _, err := conn.Exec(ctx,
			`SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1`, s.name); err != nil {
			return fmt.Errorf("drop replication slot %q: %w", s.name, err)
		}
	}
	if _, err := conn.Exec(ctx,
		`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()`, name); err != nil {
		return fmt.Errorf("terminate backends: %w", err)
	}
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
		return err
	}
	return nil
}

// admin connects to the maintenance database "postgres".
func (c *Cluster) admin(ctx context.Context) (*pgx.Conn, error) {
	conn, err := pgx.Connect(ctx, c.URL("postgres"))
	if err != nil {
		return nil, fmt.Errorf("pgtemp: connect to maintenance database: %w", err)
	}
	return conn, nil
}

// Restart stops the server and starts it again with the same port and data.
// mode "fast" is a clean shutdown (SIGINT); "immediate" is a crash (SIGQUIT:
// no checkpoint, recovery from WAL on start). It fails with [ErrNotOwned]
// for an external cluster.
func (c *Cluster) Restart(ctx context.Context, mode string) error {
	if !c.owned {
		return fmt.Errorf("pgtemp: restart: %w", ErrNotOwned)
	}
	sig, err := shutdownSignal(mode)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return errors.New("pgtemp: restart: cluster is stopped")
	}
	began := time.Now()
	if err := c.shutdown(sig, shutdownTimeout); err != nil {
		return fmt.Errorf("pgtemp: restart: %w", err)
	}
	// The port was ours a moment ago; postgres binds with SO_REUSEADDR, so
	// a failure here is someone else taking it, which we report rather than
	// move: callers rely on the port staying the same.
	if err := c.start(ctx); err != nil {
		return fmt.Errorf("pgtemp: restart: %w", err)
	}
	c.logger.Info("pgtemp: cluster restarted",
		slog.Int("port", c.port), slog.String("mode", mode),
		slog.Duration("took", time.Since(began)))
	return nil
}

// Stop shuts the server down (fast shutdown, then SIGKILL if it takes too
// long) and removes the temporary directory. It is idempotent, and does
// nothing for an external cluster.
func (c *Cluster) Stop() error {
	if !c.owned {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return nil
	}
	c.stopped = true
	began := time.Now()
	var errs []error
	if err := c.shutdown(syscall.SIGINT, shutdownTimeout); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(c.dir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", c.dir, err))
	}
	c.logger.Info("pgtemp: cluster stopped", slog.Int("port", c.port), slog.Duration("took", time.Since(began)))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("pgtemp: stop: %w", err)
	}
	return nil
}

const (
	dirPrefix       = "pgtemp-"
	ownerFile       = "owner.pid"
	logName         = "server.log"
	dataName        = "data"
	shutdownTimeout = 30 * time.Second
	readyTimeout    = 60 * time.Second
)

func shutdownSignal(mode string) (syscall.Signal, error) {
	switch mode {
	case "fast":
		return syscall.SIGINT, nil
	case "immediate":
		return syscall.SIGQUIT, nil
	}
	return 0, fmt.Errorf("pgtemp: restart mode %q: want \"fast\" or \"immediate\"", mode)
}

var settingName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.]*$`)

func (c *Cluster) dataDir() string { return filepath.Join(c.dir, dataName) }

func (c *Cluster) initdb(ctx context.Context) error {
	args := []string{
		"-D", c.dataDir(),
		"-U", "postgres",
		"-A", "trust",
		"-E", "UTF8",
		"--locale=C",
	}
	if !c.opts.Durable {
		args = append(args, "--no-sync")
	}
	cmd := c.command(ctx, "initdb", args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	began := time.Now()
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("pgtemp: initdb: %w\n%s", err, tail(out.Bytes(), 40))
	}
	c.logger.Debug("pgtemp: initdb done", slog.Duration("took", time.Since(began)))
	return nil
}

// configure appends our settings to postgresql.conf (later lines win) and
// replaces pg_hba.conf.
func (c *Cluster) configure() error {
	settings := maps.Clone(baseSettings)
	if !c.opts.Durable {
		maps.Copy(settings, fastSettings)
	}
	maps.Copy(settings, c.opts.Settings)
	var conf strings.Builder
	conf.WriteString("\n# pgtemp\n")
	for _, k := range slices.Sorted(maps.Keys(settings)) {
		fmt.Fprintf(&conf, "%s = '%s'\n", k, strings.ReplaceAll(settings[k], "'", "''"))
	}
	f, err := os.OpenFile(filepath.Join(c.dataDir(), "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("pgtemp: open postgresql.conf: %w", err)
	}
	if _, err := f.WriteString(conf.String()); err != nil {
		f.Close()
		return fmt.Errorf("pgtemp: write postgresql.conf: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("pgtemp: write postgresql.conf: %w", err)
	}
	const hba = `# pgtemp: a throwaway cluster reachable only from this machine.
local   all           all                 trust
local   replication   all                 trust
host    all           all   127.0.0.1/32  trust
host    replication   all   127.0.0.1/32  trust
`
	extra := ""
	for _, line := range c.opts.HBA {
		if strings.ContainsAny(line, "\n\r") {
			return fmt.Errorf("pgtemp: Options.HBA: a line holds a line break: %q", line)
		}
		extra += line + "\n"
	}
	// Rewriting in place keeps the file's owner (postgres when we are root).
	if err := os.WriteFile(filepath.Join(c.dataDir(), "pg_hba.conf"), []byte(hba+extra), 0o600); err != nil {
		return fmt.Errorf("pgtemp: write pg_hba.conf: %w", err)
	}
	return nil
}

// portError means the server could not bind its port.
type portError struct{ err error }

func (e *portError) Error() string { return e.err.Error() }
func (e *portError) Unwrap() error { return e.err }

// start runs postgres on c.port and waits until it accepts connections.
// Callers hold c.mu or own c exclusively.
func (c *Cluster) start(ctx context.Context) error {
	logPath := filepath.Join(c.dir, logName)
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("pgtemp: open server log: %w", err)
	}
	logStart, _ := logFile.Seek(0, 2)
	// Not ctx: the server must outlive the context of the call that started it.
	cmd := c.command(context.Background(), "postgres",
		"-D", c.dataDir(),
		"-p", strconv.Itoa(c.port),
		"-k", c.dir,
	)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	err = cmd.Start()
	logFile.Close() // the child has its own copy
	if err != nil {
		return fmt.Errorf("pgtemp: start postgres: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait() // the exit status is in the log
		close(exited)
	}()
	c.proc, c.exited = cmd, exited

	if err := c.waitReady(ctx); err != nil {
		logTail := readTail(logPath, logStart, 30)
		select {
		case <-exited:
			err = fmt.Errorf("pgtemp: postgres exited during startup (%s): %w", cmd.ProcessState, err)
		default:
			// Still running: on its Unix socket only, if it could not bind
			// its TCP port (another cluster has it).
			_ = c.shutdown(syscall.SIGQUIT, shutdownTimeout)
		}
		if pe := (*portError)(nil); !errors.As(err, &pe) &&
			(bytes.Contains(logTail, []byte("could not create any TCP/IP sockets")) ||
				bytes.Contains(logTail, []byte("Address already in use"))) {
			err = &portError{err}
		}
		return fmt.Errorf("%w\nserver log %s (last lines):\n%s", err, logPath, logTail)
	}
	return nil
}

// waitReady polls until a connection succeeds, the server exits, or the
// deadline passes.
func (c *Cluster) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	cfg, err := pgx.ParseConfig(c.URL("postgres"))
	if err != nil {
		return err
	}
	cfg.ConnectTimeout = 2 * time.Second
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		conn, err := pgx.ConnectConfig(ctx, cfg)
		if err == nil {
			// The port was free when picked, but another cluster started
			// at the same moment may hold it; a postmaster that cannot
			// bind TCP still runs on its Unix socket. Check the server
			// answering is this one.
			var dir string
			err = conn.QueryRow(ctx, `SHOW data_directory`).Scan(&dir)
			conn.Close(ctx)
			if err != nil {
				return err
			}
			if !sameDir(dir, c.dataDir()) {
				return &portError{fmt.Errorf("port %d is served by another cluster (%s)", c.port, dir)}
			}
			return nil
		}
		select {
		case <-c.exited:
			return err
		case <-ctx.Done():
			return fmt.Errorf("wait for server to accept connections: %w (last error: %v)", ctx.Err(), err)
		case <-tick.C:
		}
	}
}

// sameDir reports whether a and b name the same directory.
func sameDir(a, b string) bool {
	ai, errA := os.Stat(a)
	bi, errB := os.Stat(b)
	if errA != nil || errB != nil {
		return filepath.Clean(a) == filepath.Clean(b)
	}
	return os.SameFile(ai, bi)
}

// shutdown signals the server and waits for it to exit, killing it after
// timeout. Callers hold c.mu or own c exclusively.
func (c *Cluster) shutdown(sig syscall.Signal, timeout time.Duration) error {
	if c.proc == nil {
		return nil
	}
	proc, exited := c.proc, c.exited
	c.proc, c.exited = nil, nil
	select {
	case <-exited:
		return nil // already gone (crashed, or killed from outside)
	default:
	}
	if err := proc.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal postgres: %w", err)
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-exited:
		return nil
	case <-timer.C:
	}
	_ = proc.Process.Kill()
	<-exited
	return fmt.Errorf("postgres did not stop within %s after %s; killed", timeout, sig)
}

// command builds a command for a server binary that runs as the right OS
// user, in the cluster directory, and dies with us.
func (c *Cluster) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(c.binDir, name), args...)
	// The caller's working directory may be unreadable for the postgres user.
	cmd.Dir = c.dir
	cmd.Env = serverEnv(c.runAs)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// SIGKILL the server when the thread that started it dies; Go does
		// not end threads of goroutines that are not locked to them, so in
		// practice this is when the process dies. Setting it after the
		// credential change (Go does) keeps it from being cleared.
		Pdeathsig: syscall.SIGKILL,
		// A terminal's Ctrl-C goes to the test binary, not to the server:
		// we shut it down ourselves (or Pdeathsig does).
		Setpgid: true,
	}
	if c.runAs != nil {
		cmd.SysProcAttr.Credential = &syscall.Credential{
			Uid:    uint32(c.runAs.uid),
			Gid:    uint32(c.runAs.gid),
			Groups: c.runAs.groups,
		}
	}
	return cmd
}

// serverEnv is the caller's environment without the libpq variables that
// would confuse the server tools, and with HOME and locale pinned.
func serverEnv(ra *runAs) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "PG") || strings.HasPrefix(k, "LC_") || k == "LANG" || k == "HOME" {
			continue
		}
		env = append(env, kv)
	}
	home := os.Getenv("HOME")
	if ra != nil {
		home = ra.home
	}
	return append(env, "HOME="+home, "LANG=C", "LC_ALL=C")
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pgtemp: find a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("pgtemp: find a free port: %w", err)
	}
	return port, nil
}

// readTail returns the last n lines written to path at or after offset.
func readTail(path string, offset int64, n int) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		return []byte(fmt.Sprintf("(cannot read server log: %v)", err))
	}
	if offset >= 0 && offset <= int64(len(b)) {
		b = b[offset:]
	}
	return tail(b, n)
}

func tail(b []byte, n int) []byte {
	b = bytes.TrimRight(b, "\n")
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == '\n' {
			n--
			if n == 0 {
				return b[i+1:]
			}
		}
	}
	return b
}
