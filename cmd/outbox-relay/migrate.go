package main

import (
	"context"
	"fmt"
	"io"

	"github.com/jackc/pgx/v5"

	outboxrelay "github.com/outbox-relay/outbox-relay"
)

func runMigrate(ctx context.Context, args []string, _ io.Reader, stdout, stderr io.Writer) int {
	fs := newFlagSet("migrate", "Apply the relay schema (schema.sql, embedded). Safe to run again: it changes nothing the second time.", stderr)
	dbURL := fs.String("database-url", "", "Postgres URL of the application database (required)")
	if err := parseFlags(fs, args); err != nil {
		return flagExit(err, stderr)
	}
	if *dbURL == "" {
		fmt.Fprintln(stderr, "outbox-relay migrate: --database-url (or OUTBOX_RELAY_DATABASE_URL) is required")
		return 2
	}
	conn, err := pgx.Connect(ctx, *dbURL)
	if err != nil {
		fmt.Fprintf(stderr, "outbox-relay migrate: connect: %v\n", err)
		return 1
	}
	defer conn.Close(context.Background())
	if err := outboxrelay.Migrate(ctx, conn); err != nil {
		fmt.Fprintf(stderr, "outbox-relay migrate: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, "relay schema is up to date")
	return 0
}
