package cdc

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Config configures a Stream. The zero value of every field but ConnString
// means its default.
type Config struct {
	// ConnString is an ordinary connection URL or DSN for the database that
	// holds the outbox. The replication connection is the same with
	// replication=database added. Required.
	ConnString string
	// SlotName is the logical replication slot (permanent, pgoutput).
	// Default "outbox_relay". Lower-case letters, digits and underscores.
	SlotName string
	// Publication is the publication streamed. Default "outbox_relay".
	// Lower-case letters, digits and underscores.
	Publication string
	// Tables are the schema-qualified tables the publication must contain.
	// Default relay.outbox, relay.endpoints, relay.tenants.
	Tables []string
	// StatusInterval is the period of standby status updates, sent also
	// while the consumer blocks the stream. Default 100ms: the flush
	// position reaches Postgres within 100ms of being acknowledged, at a
	// cost of ten 34-byte messages a second. Must stay well below the
	// server's wal_sender_timeout (default 60s).
	StatusInterval time.Duration
	// HeartbeatInterval: when no transaction data arrived for this long, the
	// stream writes a tiny non-transactional WAL record
	// (pg_logical_emit_message) on an ordinary connection, so the server
	// sends a keepalive the slot can advance to. Default 10s.
	HeartbeatInterval time.Duration
	// ReceiveTimeout ends a replication connection that brought nothing
	// for this long while the stream was reading, and opens a new one: a
	// server or network that vanished without closing the connection (a
	// failover that moved the address, a partition) would otherwise hold
	// the stream for as long as the kernel keeps the socket, which can be
	// many minutes. Halfway through the silence the stream asks the server
	// for an immediate reply, which a live walsender sends at once; the
	// time the consumer blocks the stream does not count. Default 30s (as
	// PostgreSQL's wal_receiver_timeout, which defaults to 60s, and pings
	// at half), or twice the connection string's wal_sender_timeout when
	// that is longer: a walsender decoding a large transaction it does
	// not publish sends nothing meanwhile, and reads replies, so answers
	// the request for one, only every half wal_sender_timeout.
	ReceiveTimeout time.Duration
	// MaxBatchTxns is the most transactions handed over in one Batch.
	// Default 256.
	MaxBatchTxns int
	// MaxBatchBytes closes a Batch once its transactions' WAL messages add
	// up to this many bytes, so what waits between the stream and its
	// consumer stays small however large the transactions are: a
	// transaction larger than this goes over in parts of about this size
	// (Txn.More). Default 4 MiB.
	MaxBatchBytes int
	// MaxBatchDelay is the longest a complete transaction waits for others
	// to share its Batch while more data is arriving. Default 1ms. A
	// transaction followed by nothing buffered is handed over at once.
	MaxBatchDelay time.Duration
	// Logger receives the stream's events. Default: discard.
	Logger *slog.Logger
}

// DefaultTables are the tables the relay reads.
var DefaultTables = []string{"relay.outbox", "relay.endpoints", "relay.tenants"}

// withDefaults applies every default, in this one place.
func (c Config) withDefaults() Config {
	c.SlotName = cmp.Or(c.SlotName, "outbox_relay")
	c.Publication = cmp.Or(c.Publication, "outbox_relay")
	if len(c.Tables) == 0 {
		c.Tables = DefaultTables
	}
	c.StatusInterval = cmp.Or(c.StatusInterval, 100*time.Millisecond)
	c.HeartbeatInterval = cmp.Or(c.HeartbeatInterval, 10*time.Second)
	c.ReceiveTimeout = cmp.Or(c.ReceiveTimeout, receiveTimeoutFor(c.ConnString))
	c.MaxBatchTxns = cmp.Or(c.MaxBatchTxns, 256)
	c.MaxBatchBytes = cmp.Or(c.MaxBatchBytes, 4<<20)
	c.MaxBatchDelay = cmp.Or(c.MaxBatchDelay, time.Millisecond)
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return c
}

var simpleIdent = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// ValidName reports whether name is a slot or publication name Config
// accepts: 1-63 lower-case letters, digits and underscores, not starting
// with a digit. Such a name needs no quoting in SQL.
func ValidName(name string) bool { return simpleIdent.MatchString(name) }

// Validate reports the first invalid field, by name. It checks the
// configuration as given; New applies defaults before validating.
func (c Config) Validate() error {
	if c.ConnString == "" {
		return errors.New("cdc: Config.ConnString is required")
	}
	if _, err := pgconn.ParseConfig(c.ConnString); err != nil {
		// pgconn's parse errors do not include the password.
		return fmt.Errorf("cdc: Config.ConnString: %w", err)
	}
	if !ValidName(c.SlotName) {
		return fmt.Errorf("cdc: Config.SlotName %q: use 1-63 lower-case letters, digits and underscores", c.SlotName)
	}
	if !ValidName(c.Publication) {
		return fmt.Errorf("cdc: Config.Publication %q: use 1-63 lower-case letters, digits and underscores", c.Publication)
	}
	for _, t := range c.Tables {
		if _, _, ok := splitTable(t); !ok {
			return fmt.Errorf("cdc: Config.Tables: %q is not schema.table", t)
		}
	}
	if c.StatusInterval < 0 {
		return fmt.Errorf("cdc: Config.StatusInterval %v is negative", c.StatusInterval)
	}
	if c.HeartbeatInterval < 0 {
		return fmt.Errorf("cdc: Config.HeartbeatInterval %v is negative", c.HeartbeatInterval)
	}
	if c.ReceiveTimeout < 0 {
		return fmt.Errorf("cdc: Config.ReceiveTimeout %v is negative", c.ReceiveTimeout)
	}
	if c.MaxBatchBytes < 0 {
		return fmt.Errorf("cdc: Config.MaxBatchBytes %d is negative", c.MaxBatchBytes)
	}
	if c.MaxBatchTxns < 0 {
		return fmt.Errorf("cdc: Config.MaxBatchTxns %d is negative", c.MaxBatchTxns)
	}
	if c.MaxBatchDelay < 0 {
		return fmt.Errorf("cdc: Config.MaxBatchDelay %v is negative", c.MaxBatchDelay)
	}
	return nil
}

func splitTable(t string) (schema, name string, ok bool) {
	schema, name, ok = strings.Cut(t, ".")
	return schema, name, ok && schema != "" && name != "" && !strings.Contains(name, ".")
}

func quoteTable(t string) string {
	schema, name, _ := splitTable(t)
	return pgx.Identifier{schema, name}.Sanitize()
}

// receiveTimeoutFor is the default ReceiveTimeout for a connection
// string: 30s, or twice its wal_sender_timeout when that is longer.
func receiveTimeoutFor(connString string) time.Duration {
	d := 30 * time.Second
	c, err := pgconn.ParseConfig(connString)
	if err != nil {
		return d // Validate reports it
	}
	if wst, ok := parseGUCDuration(c.RuntimeParams["wal_sender_timeout"]); ok {
		d = max(d, 2*wst)
	}
	return d
}

// parseGUCDuration reads a PostgreSQL time setting as the server does: a
// number, then an optional unit (us, ms, s, min, h, d; milliseconds
// without one). It reports false for what it cannot read, which the
// server refuses too.
func parseGUCDuration(v string) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	i := strings.IndexFunc(v, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(v)
	}
	n, err := strconv.ParseFloat(v[:i], 64)
	if err != nil || n < 0 {
		return 0, false
	}
	unit := map[string]time.Duration{"": time.Millisecond, "us": time.Microsecond, "ms": time.Millisecond,
		"s": time.Second, "min": time.Minute, "h": time.Hour, "d": 24 * time.Hour}
	u, ok := unit[strings.TrimSpace(v[i:])]
	if !ok {
		return 0, false
	}
	return time.Duration(n * float64(u)), true
}
