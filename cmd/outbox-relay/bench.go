package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/bench"
)

const benchSynopsis = `Measure the relay on this machine, side by side with a bare Go HTTP client posting the
same bodies to the same loopback receiver and with a polling outbox relay (the peer), in
one run: backlog drain (events/s and the ratios to the bare client and the peer, at one
endpoint and, with drain-many, over many endpoints and tenants), steady commit-to-delivery
latency (p50/p99/p99.9/max) at one or more rates, and the relay process's CPU per event,
peak RSS and WAL bytes per event, next to the targets of the benchmark issues.
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
	if len(args) == 1 && args[0] == bench.PacedPostCommand {
		return runPacedPost(ctx, stdin, stdout, stderr)
	}
	fs := newFlagSet("bench", benchSynopsis, stderr)
	var cfg bench.Config
	events, rates := intList{200_000}, intList{1000}
	fs.Var(&events, "events", "backlog size: events inserted before the relay starts, and bare posts; a comma-separated list (e.g. 200000,1000000) runs the backlog phases once per size")
	fs.IntVar(&cfg.BodyBytes, "body-bytes", 500, "size of each JSON body in bytes (at least 64)")
	fs.IntVar(&cfg.TxnRows, "txn-rows", 500, "backlog rows per insert transaction")
	fs.IntVar(&cfg.Workers, "workers", 64, "the relay's --workers, and the bare client's and the polling peer's concurrency")
	fs.Var(&rates, "rate", "steady phases: events per second, one per transaction; a comma-separated list (e.g. 1000,2500,5000) runs latency, bare-latency and peer-latency once per rate (fairness uses the first)")
	fs.DurationVar(&cfg.Duration, "duration", 20*time.Second, "steady phases: how long the producer runs, at each rate")
	fs.IntVar(&cfg.Producers, "producers", 0, "steady phases: connections the producer commits on; 0 = one per 250 events/s of the rate, at least 4")
	phases := fs.String("phases", "all", "comma-separated phases: bare (bare client posts the backlog), drain (relay drains the backlog), drain-many (relay drains a backlog spread over --endpoints), "+
		"latency (relay at the steady rate), bare-latency (direct POSTs at the steady rate, from a process of its own with one P, whose CPU per request is reported: the floor under the relay's CPU per event at that rate), fairness (tenant B's latency beside tenant A's slow backlog), "+
		"peer-drain and peer-drain-many (the polling peer drains the same backlogs), peer-latency (the peer at the steady rate); "+
		"all = bare, drain, latency, bare-latency, peer-drain, peer-latency; opt-in besides drain-many, peer-drain-many and fairness: "+
		"recovery (SIGKILL and restart under a steady producer), takeover (SIGKILL of the active relay with a standby), "+
		"ratelimit (endpoint and tenant limits at the receiver), memory (relay RSS with the receiver down, spill and block); combine them, e.g. all,drain-many,recovery")
	fs.IntVar(&cfg.Endpoints, "endpoints", 10_000, "drain-many and peer-drain-many: endpoints the backlog is spread over, round robin, each event naming its endpoint_id")
	fs.IntVar(&cfg.Tenants, "tenants", 1_000, "drain-many and peer-drain-many: tenants owning those endpoints (endpoint n belongs to tenant n mod --tenants)")
	fs.BoolVar(&cfg.VerifySignatures, "verify-signatures", false, "the receiver verifies every request's signature, and the bare client signs its requests as the relay does (costs receiver CPU on both sides)")
	fs.StringVar(&cfg.BareClient, "bare-client", bench.BareNetHTTP, "what the bare client posts with: net/http (Go's client, the ceiling) or lean (the relay's own HTTP/1.1 client, which it uses for http:// unless run with --http-client net/http)")
	fs.BoolVar(&cfg.ReceiverJSON, "receiver-json", false, "the receiver decodes every body with encoding/json, as a webhook handler would (costs receiver CPU on both sides)")
	fs.DurationVar(&cfg.Timeout, "timeout", 0, "give up a phase if its last event has not arrived by then; 0 = 5m, or 1ms per event of the largest backlog if longer")
	pgSettings := fs.String("pg-settings", "", "extra postgresql.conf settings for the bench's cluster, comma-separated name=value (e.g. \"shared_buffers=1GB,max_wal_size=4GB\"); default: the server's own defaults but for what the bench needs (durable, wal_level=logical)")
	relayArgs := fs.String("relay-args", "", "extra flags for the relay's 'run', space-separated (e.g. \"--overflow block\")")
	cpuprofile := fs.String("relay-cpuprofile", "", "write a CPU profile of the relay process to this file (read it with go tool pprof)")
	benchFaultFlags(fs, &cfg.Faults)
	if err := parseFlags(fs, args); err != nil {
		return flagExit(err, stderr)
	}
	cfg.EventCounts, cfg.Rates = events, rates
	var err error
	if cfg.Phases, err = bench.ParsePhases(*phases); err != nil {
		return flagExit(fmt.Errorf("--phases: %w", err), stderr)
	}
	if cfg.RelayExe, err = os.Executable(); err != nil {
		fmt.Fprintln(stderr, "outbox-relay bench: find own binary:", err)
		return 1
	}
	if cfg.PGSettings, err = bench.ParseSettings(*pgSettings); err != nil {
		return flagExit(fmt.Errorf("--pg-settings: %w", err), stderr)
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

// intList is a flag holding a comma-separated list of positive integers.
type intList []int

func (l *intList) String() string {
	s := make([]string, len(*l))
	for i, v := range *l {
		s[i] = strconv.Itoa(v)
	}
	return strings.Join(s, ",")
}

func (l *intList) Set(v string) error {
	var out intList
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.ReplaceAll(strings.TrimSpace(f), "_", ""))
		if err != nil || n <= 0 {
			return fmt.Errorf("want positive integers separated by commas (got %q)", f)
		}
		out = append(out, n)
	}
	*l = out
	return nil
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

// runPacedPost is the hidden subcommand the bench's bare-latency phase
// runs its client in: `outbox-relay bench paced-post` reads a
// bench.PostPlan as JSON from stdin, posts it, and prints a
// bench.PostResult as JSON (exit 1 if it holds an error).
func runPacedPost(ctx context.Context, stdin io.Reader, stdout, stderr io.Writer) int {
	var plan bench.PostPlan
	if err := json.NewDecoder(stdin).Decode(&plan); err != nil {
		fmt.Fprintln(stderr, "outbox-relay bench paced-post: read the plan from stdin:", err)
		return 2
	}
	res := bench.PacedPost(ctx, plan)
	out, err := json.Marshal(res)
	if err != nil {
		fmt.Fprintln(stderr, "outbox-relay bench paced-post:", err)
		return 1
	}
	fmt.Fprintln(stdout, string(out))
	if res.Err != "" {
		return 1
	}
	return 0
}
