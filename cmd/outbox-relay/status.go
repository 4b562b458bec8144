package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/outbox-relay/outbox-relay/dlq"
)

func runStatus(ctx context.Context, args []string, _ io.Reader, stdout, stderr io.Writer) int {
	fs := newFlagSet("status <event-id|msg_id>",
		"Print every endpoint's delivery of one event: state, attempts, last HTTP status, error, times,\n"+
			"and the failed attempts (relay.attempts). The event id is the outbox row's UUID or the\n"+
			"webhook-id a receiver saw (msg_...). Exits 1 when the event has no delivery row.", stderr)
	dbURL := fs.String("database-url", "", "Postgres URL of the database that holds the relay schema (required)")
	flags, pos := splitArgs(fs, args)
	if err := parseFlags(fs, flags); err != nil {
		return flagExit(err, stderr)
	}
	if len(pos) != 1 {
		return flagExit(errors.New("status needs one event id (a UUID or msg_...)"), stderr)
	}
	if _, err := dlq.ParseEventID(pos[0]); err != nil {
		return dlqExit("status", err, stderr)
	}
	conn, code := connect(ctx, "status", *dbURL, stderr)
	if conn == nil {
		return code
	}
	defer conn.Close(context.Background())
	entries, err := dlq.Deliveries(ctx, conn, pos[0])
	if err != nil {
		return dlqExit("status", err, stderr)
	}
	fmt.Fprintf(stdout, "event %s (webhook-id %s): %d %s\n", entries[0].EventID, entries[0].WebhookID,
		len(entries), plural(len(entries), "delivery", "deliveries"))
	for _, e := range entries {
		fmt.Fprintln(stdout)
		printEntry(stdout, e, false)
	}
	return 0
}
