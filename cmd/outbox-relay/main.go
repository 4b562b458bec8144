// Command outbox-relay delivers webhooks from a Postgres outbox.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int
}

func commands() []command {
	return []command{
		{"run", "stream the outbox and deliver webhooks", runRun},
		{"migrate", "apply the relay schema (idempotent)", runMigrate},
		{"demo", "run a throwaway Postgres, sample receivers and events, end to end", runDemo},
		{"verify", "check a Standard Webhooks signature", runVerify},
		{"config", "config check: validate and print the effective settings of run", runConfig},
		{"dlq", "list, show and replay dead letters", runDLQ},
		{"status", "print every endpoint's delivery state of one event, with attempt history", runStatus},
		{"bench", "measure drain throughput, latency and cost against a bare HTTP client", runBench},
	}
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(ctx, args[1:], stdin, stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "outbox-relay: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "outbox-relay delivers webhooks from a Postgres outbox, through logical replication.")
	fmt.Fprintln(w, "\nUsage: outbox-relay <command> [flags]\n\nCommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nEvery flag can also be set with an environment variable: --database-url is")
	fmt.Fprintln(w, "OUTBOX_RELAY_DATABASE_URL. A flag on the command line wins over the variable.")
	fmt.Fprintln(w, "Run 'outbox-relay <command> --help' for a command's flags.")
}
