package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/cdc"
	"github.com/outbox-relay/outbox-relay/dlq"
)

func runDLQ(ctx context.Context, args []string, _ io.Reader, stdout, stderr io.Writer) int {
	subs := []struct {
		name, summary string
		run           func(ctx context.Context, args []string, stdout, stderr io.Writer) int
	}{
		{"list", "list dead letters, newest first", runDLQList},
		{"show", "show a dead letter with its payload and attempt history", runDLQShow},
		{"replay", "replay one dead letter, or all that match filters", runDLQReplay},
	}
	usage := func(w io.Writer) {
		fmt.Fprintln(w, "Usage: outbox-relay dlq <command> [flags]")
		fmt.Fprintln(w, "\nDead letters are deliveries that ended dead (attempts exhausted), failed (a final answer")
		fmt.Fprintln(w, "such as 400 or 410) or rejected (never attempted); SQL: SELECT * FROM relay.dead_letters.")
		fmt.Fprintln(w, "A replay sets the delivery back to pending with a fresh attempt budget; the running relay")
		fmt.Fprintln(w, "delivers it again with the same webhook-id. Event ids are UUIDs or msg_... webhook-ids.")
		fmt.Fprintln(w, "\nCommands:")
		for _, s := range subs {
			fmt.Fprintf(w, "  %-7s %s\n", s.name, s.summary)
		}
		fmt.Fprintln(w, "\nRun 'outbox-relay dlq <command> --help' for a command's flags.")
	}
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	if args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stdout)
		return 0
	}
	for _, s := range subs {
		if s.name == args[0] {
			return s.run(ctx, args[1:], stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "outbox-relay dlq: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

// filterFlags are the flags that select dead letters.
type filterFlags struct {
	endpoint, tenant string
	since, until     timeFlag
	limit            int
}

func (f *filterFlags) register(fs *flag.FlagSet, limitDefault int, limitUsage string) {
	fs.StringVar(&f.endpoint, "endpoint", "", "only this endpoint id")
	fs.StringVar(&f.tenant, "tenant", "", "only this tenant id")
	fs.Var(&f.since, "since", "only dead letters completed at or after this time: RFC 3339, 2006-01-02[ 15:04], or a duration ago such as 2h")
	fs.Var(&f.until, "until", "only dead letters completed before this time (same forms as --since)")
	fs.IntVar(&f.limit, "limit", limitDefault, limitUsage)
}

func (f *filterFlags) filter() dlq.Filter {
	return dlq.Filter{EndpointID: f.endpoint, TenantID: f.tenant, Since: f.since.t, Until: f.until.t, Limit: f.limit}
}

func (f *filterFlags) any() bool {
	return f.endpoint != "" || f.tenant != "" || !f.since.t.IsZero() || !f.until.t.IsZero()
}

// timeFlag is an absolute time or a duration before now.
type timeFlag struct{ t time.Time }

func (f *timeFlag) String() string {
	if f == nil || f.t.IsZero() {
		return ""
	}
	return f.t.UTC().Format(time.RFC3339)
}

func (f *timeFlag) Set(s string) error {
	s = strings.TrimSpace(s)
	if d, err := time.ParseDuration(s); err == nil {
		f.t = time.Now().Add(-d)
		return nil
	}
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05", "2006-01-02 15:04:05", "2006-01-02 15:04", "2006-01-02"} {
		if t, err := time.Parse(layout, s); err == nil {
			f.t = t
			return nil
		}
	}
	return fmt.Errorf("%q is neither a time (RFC 3339, 2006-01-02[ 15:04]) nor a duration (2h)", s)
}

// splitArgs separates positional arguments from flags (and their values),
// so an id may come before or after the flags; the flag package alone
// stops at the first positional argument.
func splitArgs(fs *flag.FlagSet, args []string) (flags, positional []string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			return flags, append(positional, args[i+1:]...)
		}
		if len(a) < 2 || a[0] != '-' {
			positional = append(positional, a)
			continue
		}
		flags = append(flags, a)
		name := strings.TrimLeft(a, "-")
		if strings.Contains(name, "=") {
			continue
		}
		f := fs.Lookup(name)
		if f == nil {
			continue
		}
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
			continue
		}
		if i+1 < len(args) {
			i++
			flags = append(flags, args[i])
		}
	}
	return flags, positional
}

// connect opens one connection for a CLI command, set up as the relay's
// own are (cdc.Connect: TCP timeouts, and a 10 s connect timeout unless
// the URL sets connect_timeout); the caller closes it.
func connect(ctx context.Context, cmd, url string, stderr io.Writer) (*pgx.Conn, int) {
	if url == "" {
		fmt.Fprintf(stderr, "outbox-relay %s: --database-url (or OUTBOX_RELAY_DATABASE_URL) is required\n", cmd)
		return nil, 2
	}
	conn, err := cdc.Connect(ctx, url)
	if errors.As(err, new(*pgconn.ParseConfigError)) {
		fmt.Fprintf(stderr, "outbox-relay %s: --database-url: %v\n", cmd, err)
		return nil, 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "outbox-relay %s: connect: %v\n", cmd, err)
		return nil, 1
	}
	return conn, 0
}

// dlqExit prints err and returns 2 for a bad id, 1 otherwise.
func dlqExit(cmd string, err error, stderr io.Writer) int {
	fmt.Fprintf(stderr, "outbox-relay %s: %v\n", cmd, err)
	if errors.Is(err, dlq.ErrInvalidEventID) {
		return 2
	}
	return 1
}

func runDLQList(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("dlq list", "List dead letters, most recently completed first.", stderr)
	dbURL := fs.String("database-url", "", "Postgres URL of the database that holds the relay schema (required)")
	var ff filterFlags
	ff.register(fs, dlq.DefaultLimit, "list at most this many")
	flags, pos := splitArgs(fs, args)
	if err := parseFlags(fs, flags); err != nil {
		return flagExit(err, stderr)
	}
	if len(pos) > 0 {
		return flagExit(fmt.Errorf("unexpected argument %q", pos[0]), stderr)
	}
	conn, code := connect(ctx, "dlq list", *dbURL, stderr)
	if conn == nil {
		return code
	}
	defer conn.Close(context.Background())
	entries, err := dlq.List(ctx, conn, ff.filter())
	if err != nil {
		return dlqExit("dlq list", err, stderr)
	}
	if len(entries) == 0 {
		fmt.Fprintln(stdout, "no dead letters")
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "EVENT\tENDPOINT\tTENANT\tTYPE\tSTATE\tATTEMPTS\tHTTP\tCOMPLETED\tREPLAYS\tREASON")
	for _, e := range entries {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%d\t%s\n", e.EventID, e.EndpointID, e.TenantID, e.EventType, e.State,
			e.Attempts, httpStatus(e.HTTPStatus), fmtTime(e.CompletedAt), e.ReplayCount, oneLine(e.Reason, 100))
	}
	tw.Flush()
	if limit := cmp.Or(max(ff.limit, 0), dlq.DefaultLimit); len(entries) == limit {
		fmt.Fprintf(stderr, "showing the newest %d; raise --limit or narrow the filters for more\n", len(entries))
	}
	return 0
}

func runDLQShow(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("dlq show <event-id|msg_id>", "Show a dead letter: its reason (with the start of the response body), payload and\nattempt history. Without --endpoint, every dead letter of the event.", stderr)
	dbURL := fs.String("database-url", "", "Postgres URL of the database that holds the relay schema (required)")
	endpoint := fs.String("endpoint", "", "the endpoint id (default: every endpoint with a dead letter for the event)")
	flags, pos := splitArgs(fs, args)
	if err := parseFlags(fs, flags); err != nil {
		return flagExit(err, stderr)
	}
	if len(pos) != 1 {
		return flagExit(errors.New("dlq show needs one event id (a UUID or msg_...)"), stderr)
	}
	if _, err := dlq.ParseEventID(pos[0]); err != nil {
		return dlqExit("dlq show", err, stderr)
	}
	conn, code := connect(ctx, "dlq show", *dbURL, stderr)
	if conn == nil {
		return code
	}
	defer conn.Close(context.Background())
	var entries []dlq.Entry
	if *endpoint != "" {
		e, err := dlq.Get(ctx, conn, pos[0], *endpoint)
		if err != nil {
			return dlqExit("dlq show", err, stderr)
		}
		entries = append(entries, e)
	} else {
		list, err := dlq.List(ctx, conn, dlq.Filter{EventID: pos[0], Limit: 1000})
		if err != nil {
			return dlqExit("dlq show", err, stderr)
		}
		if len(list) == 0 {
			id, _ := dlq.ParseEventID(pos[0])
			fmt.Fprintf(stderr, "outbox-relay dlq show: no dead letter for event %s (outbox-relay status %s shows every endpoint's state)\n", id, id)
			return 1
		}
		for _, l := range list {
			e, err := dlq.Get(ctx, conn, l.EventID, l.EndpointID)
			if err != nil {
				return dlqExit("dlq show", err, stderr)
			}
			entries = append(entries, e)
		}
	}
	for i, e := range entries {
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		printEntry(stdout, e, true)
	}
	return 0
}

func runDLQReplay(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("dlq replay (<event-id|msg_id> --endpoint X | --all [filters])",
		"Replay dead letters: set them back to pending, due now, with a fresh attempt budget; the running relay\n"+
			"delivers each again with its original webhook-id. Replaying an entry that is no longer a dead letter\n"+
			"(already replayed, perhaps concurrently) does nothing. With --all, the filters select what is replayed;\n"+
			"without filters, every dead letter is. A delivery to an endpoint that is still disabled ends again without an\n"+
			"attempt: dead with the endpoint's disabled_reason when that is set (the relay disabled it), otherwise rejected.\n"+
			"Re-enable it first.", stderr)
	dbURL := fs.String("database-url", "", "Postgres URL of the database that holds the relay schema (required)")
	all := fs.Bool("all", false, "replay every dead letter that matches the filters")
	var ff filterFlags
	ff.register(fs, 0, "with --all, replay at most this many, oldest first (0 = all)")
	flags, pos := splitArgs(fs, args)
	if err := parseFlags(fs, flags); err != nil {
		return flagExit(err, stderr)
	}
	switch {
	case *all && len(pos) > 0:
		return flagExit(errors.New("give an event id or --all, not both"), stderr)
	case !*all && len(pos) != 1:
		return flagExit(errors.New("dlq replay needs one event id with --endpoint, or --all"), stderr)
	case !*all && ff.endpoint == "":
		return flagExit(errors.New("--endpoint is required to replay one event (or use --all --endpoint X for all of an endpoint's)"), stderr)
	case !*all && (ff.tenant != "" || !ff.since.t.IsZero() || !ff.until.t.IsZero() || ff.limit != 0):
		return flagExit(errors.New("--tenant, --since, --until and --limit only apply with --all"), stderr)
	}
	var id string
	if !*all {
		var err error
		if id, err = dlq.ParseEventID(pos[0]); err != nil {
			return dlqExit("dlq replay", err, stderr)
		}
	}
	conn, code := connect(ctx, "dlq replay", *dbURL, stderr)
	if conn == nil {
		return code
	}
	defer conn.Close(context.Background())
	if *all {
		n, err := dlq.ReplayAll(ctx, conn, ff.filter())
		if err != nil {
			return dlqExit("dlq replay", err, stderr)
		}
		what := "every dead letter"
		if ff.any() {
			what = "the dead letters" + describeFilter(ff)
		}
		fmt.Fprintf(stdout, "replayed %d %s (%s); the running relay delivers them\n", n, plural(n, "delivery", "deliveries"), what)
		return 0
	}
	ok, err := dlq.Replay(ctx, conn, id, ff.endpoint)
	if err != nil {
		return dlqExit("dlq replay", err, stderr)
	}
	if !ok {
		fmt.Fprintf(stderr, "outbox-relay dlq replay: the delivery of event %s to endpoint %s is not a dead letter (not final yet, delivered, or already replayed); nothing replayed\n", id, ff.endpoint)
		return 1
	}
	fmt.Fprintf(stdout, "replayed event %s at endpoint %s: pending; the running relay delivers it with webhook-id %s\n", id, ff.endpoint, dlq.WebhookID(id))
	return 0
}

func describeFilter(ff filterFlags) string {
	var parts []string
	if ff.endpoint != "" {
		parts = append(parts, "endpoint "+ff.endpoint)
	}
	if ff.tenant != "" {
		parts = append(parts, "tenant "+ff.tenant)
	}
	if !ff.since.t.IsZero() {
		parts = append(parts, "completed since "+fmtTime(ff.since.t))
	}
	if !ff.until.t.IsZero() {
		parts = append(parts, "completed before "+fmtTime(ff.until.t))
	}
	return " of " + strings.Join(parts, ", ")
}

// printEntry prints one delivery row as "name  value" lines, then its
// attempt history.
func printEntry(w io.Writer, e dlq.Entry, payload bool) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	line := func(k, v string) { fmt.Fprintf(tw, "%s\t%s\n", k, v) }
	line("event", e.EventID)
	line("webhook-id", e.WebhookID)
	line("endpoint", cmp.Or(e.EndpointID, "- (unrouted)"))
	line("tenant", e.TenantID)
	line("type", e.EventType)
	line("state", e.State)
	if e.Reason != "" {
		line("reason", oneLine(e.Reason, 0))
	}
	line("attempts", fmt.Sprint(e.Attempts))
	line("http status", httpStatus(e.HTTPStatus))
	line("recorded", fmtTime(e.CreatedAt))
	line("first attempt", fmtTime(e.FirstAttemptAt))
	line("last attempt", fmtTime(e.LastAttemptAt))
	if !e.NextAttemptAt.IsZero() && (e.State == "pending" || e.State == "retrying") {
		line("next attempt", fmtTime(e.NextAttemptAt))
	}
	line("completed", fmtTime(e.CompletedAt))
	replays := fmt.Sprint(e.ReplayCount)
	if !e.ReplayedAt.IsZero() {
		replays += ", last at " + fmtTime(e.ReplayedAt)
	}
	line("replays", replays)
	if payload {
		switch {
		case e.Payload != nil:
			line("payload", string(e.Payload))
		case e.State == "dead" || e.State == "failed" || e.State == "rejected":
			line("payload", "- (not kept: this dead letter cannot be replayed)")
		}
	}
	tw.Flush()
	if len(e.History) == 0 {
		fmt.Fprintln(w, "failed attempts: none recorded")
		return
	}
	fmt.Fprintln(w, "failed attempts:")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	marked := e.ReplayedAt.IsZero()
	for _, a := range e.History {
		if !marked && !a.AttemptedAt.Before(e.ReplayedAt) {
			fmt.Fprintf(tw, "  -- replayed at %s --\n", fmtTime(e.ReplayedAt))
			marked = true
		}
		fmt.Fprintf(tw, "  #%d\t%s\t%s\t%s\t%s\t%s\n", a.Attempt, fmtTime(a.AttemptedAt), httpStatus(a.HTTPStatus), a.ErrorClass,
			a.Duration.Round(time.Millisecond), oneLine(a.Error, 200))
	}
	if !marked {
		fmt.Fprintf(tw, "  -- replayed at %s --\n", fmtTime(e.ReplayedAt))
	}
	tw.Flush()
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format("2006-01-02T15:04:05.000Z")
}

func httpStatus(s int) string {
	if s == 0 {
		return "-"
	}
	return fmt.Sprint(s)
}

// oneLine keeps a value on one line and, with n > 0, at most n runes.
func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if r := []rune(s); n > 0 && len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return s
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
