package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/bench"
)

const benchSynopsis = `Measure the relay on this machine, side by side with a bare Go HTTP client posting the
same bodies to the same loopback receiver, in one run: backlog drain (events/s and the
ratio to the bare client), steady commit-to-delivery latency (p50/p99/p99.9/max), and
the relay process's CPU per 10,000 events, peak RSS and WAL bytes per event.
It starts a durable throwaway PostgreSQL cluster (needs the server binaries) and runs
this binary's 'run' as a child process. Opt-in phases kill the relay (restart, standby
takeover), measure rate limits, and relay memory with the receiver down (see --phases).
Prints a table, then one BENCH_RESULT line of JSON.
Exits 1 if an event was lost, duplicated or altered; targets missed do not change the exit code.`

// profiledRun is the hidden subcommand the bench uses for --relay-cpuprofile:
// `outbox-relay bench profiled-run FILE run-flags...` is `run` under a CPU profile.
const profiledRun = "profiled-run"

func runBench(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) >= 2 && args[0] == profiledRun {
		return runProfiled(ctx, args[1], args[2:], stdin, stdout, stderr)
	}
	fs := newFlagSet("bench", benchSynopsis, stderr)
	var cfg bench.Config
	fs.IntVar(&cfg.Events, "events", 200_000, "backlog size: events inserted before the relay starts, and bare posts")
	fs.IntVar(&cfg.BodyBytes, "body-bytes", 500, "size of each JSON body in bytes (at least 64)")
	fs.IntVar(&cfg.TxnRows, "txn-rows", 500, "backlog rows per insert transaction")
	fs.IntVar(&cfg.Workers, "workers", 64, "the relay's --workers, and the bare client's concurrency")
	fs.IntVar(&cfg.Rate, "rate", 1000, "steady phase: events per second, one per transaction")
	fs.DurationVar(&cfg.Duration, "duration", 20*time.Second, "steady phase: how long the producer runs")
	fs.IntVar(&cfg.Producers, "producers", 4, "steady phase: connections the producer commits on")
	phases := fs.String("phases", "all", "comma-separated phases, run in a fixed order: bare (bare client drains), drain (relay drains the backlog), latency (relay at the steady rate), bare-latency (direct POSTs at the steady rate), peer-drain and peer-latency (the polling peer), which are \"all\"; opt-in: fairness, recovery (SIGKILL and restart under a steady producer), takeover (SIGKILL of the active relay with a standby), ratelimit (endpoint and tenant limits at the receiver), memory (relay RSS with the receiver down, spill and block); e.g. all,recovery")
	fs.BoolVar(&cfg.VerifySignatures, "verify-signatures", false, "the receiver verifies every relay request's signature (costs receiver CPU, so off for throughput figures)")
	fs.DurationVar(&cfg.Timeout, "timeout", 5*time.Minute, "give up a phase if its last event has not arrived by then")
	relayArgs := fs.String("relay-args", "", "extra flags for the relay's 'run', space-separated (e.g. \"--overflow block\")")
	cpuprofile := fs.String("relay-cpuprofile", "", "write a CPU profile of the relay process to this file (read it with go tool pprof)")
	benchFaultFlags(fs, &cfg.Faults)
	if err := parseFlags(fs, args); err != nil {
		return flagExit(err, stderr)
	}
	var err error
	if cfg.Phases, err = bench.ParsePhases(*phases); err != nil {
		return flagExit(fmt.Errorf("--phases: %w", err), stderr)
	}
	if cfg.RelayExe, err = os.Executable(); err != nil {
		fmt.Fprintln(stderr, "outbox-relay bench: find own binary:", err)
		return 1
	}
	cfg.RelayArgs = strings.Fields(*relayArgs)
	if *cpuprofile != "" {
		cfg.RelayPrefix = []string{"bench", profiledRun, *cpuprofile}
	}
	cfg.Progress = stderr
	res, err := bench.Run(ctx, cfg)
	if res != nil {
		res.Table(stdout)
		fmt.Fprintln(stdout, res.Line())
	}
	if err != nil {
		fmt.Fprintln(stderr, "outbox-relay bench:", err)
		return 1
	}
	if !res.Clean() {
		fmt.Fprintln(stderr, "outbox-relay bench: an event was lost, duplicated or altered; see the table")
		return 1
	}
	return 0
}

// runProfiled runs `run` with the remaining args under a CPU profile
// written to file when it stops.
func runProfiled(ctx context.Context, file string, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "run" {
		fmt.Fprintln(stderr, "outbox-relay bench profiled-run FILE run [flags]")
		return 2
	}
	f, err := os.Create(file)
	if err != nil {
		fmt.Fprintln(stderr, "outbox-relay bench:", err)
		return 1
	}
	defer f.Close()
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintln(stderr, "outbox-relay bench:", err)
		return 1
	}
	defer pprof.StopCPUProfile()
	return runRun(ctx, args[1:], stdin, stdout, stderr)
}
