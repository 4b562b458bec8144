package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"

	outboxrelay "github.com/outbox-relay/outbox-relay"
	"github.com/outbox-relay/outbox-relay/cdc"
	"github.com/outbox-relay/outbox-relay/relay"
)

func runMigrate(ctx context.Context, args []string, _ io.Reader, stdout, stderr io.Writer) int {
	fs := newFlagSet("migrate", "Apply the relay schema (schema.sql, embedded), then create the publication and the\nreplication slot if they are missing, so every event committed from now on is kept for the relay\neven before it first runs. Safe to run again: it changes nothing the second time.", stderr)
	dbURL := fs.String("database-url", "", "Postgres URL of the application database (required)")
	slot := fs.String("slot", "outbox_relay", "logical replication slot name")
	publication := fs.String("publication", "outbox_relay", "publication name")
	schemaOnly := fs.Bool("schema-only", false, "apply the schema only; the slot is created by the first `run`")
	if err := parseFlags(fs, args); err != nil {
		return flagExit(err, stderr)
	}
	conn, code := connect(ctx, "migrate", *dbURL, stderr)
	if conn == nil {
		return code
	}
	defer conn.Close(context.Background())
	if err := outboxrelay.Migrate(ctx, conn); err != nil {
		fmt.Fprintf(stderr, "outbox-relay migrate: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, "relay schema is up to date")
	if *schemaOnly {
		return 0
	}
	stream, err := cdc.New(cdc.Config{ConnString: *dbURL, SlotName: *slot, Publication: *publication,
		Logger: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		fmt.Fprintf(stderr, "outbox-relay migrate: %v\n", err)
		return 2
	}
	if err := stream.Setup(ctx); err != nil {
		fmt.Fprintf(stderr, "outbox-relay migrate: %v\n", err)
		return 1
	}
	if gap, err := relay.CheckLostSlot(ctx, conn, stream, *slot); err != nil {
		fmt.Fprintf(stderr, "outbox-relay migrate: could not check for events the lost slot held: %v\n", err)
	} else if gap != nil {
		fmt.Fprintf(stderr, "outbox-relay migrate: slot %q: %v\n", *slot, gap)
	}
	fmt.Fprintf(stdout, "publication %q and slot %q are ready\n", *publication, *slot)
	return 0
}
