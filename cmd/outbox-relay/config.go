package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/outbox-relay/outbox-relay/relay"
)

func runConfig(_ context.Context, args []string, _ io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "check" {
		fmt.Fprintln(stderr, "Usage: outbox-relay config check [run's flags]\n\nValidates the settings `run` would use (flags, OUTBOX_RELAY_* variables, --config file,\n--preset) and prints the effective value of each, with where it came from; a value run derives\n(from 0 or an empty flag) is marked (derived). Secrets are redacted.")
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			return 0
		}
		return 2
	}
	fs, rf := newRunFlags("config check", "Validate and print the effective configuration of `run` (same flags).", stderr)
	sources, err := parseFlagSources(fs, args[1:])
	if err != nil {
		return flagExit(err, stderr)
	}
	if _, err := rf.log.logger(io.Discard); err != nil {
		fmt.Fprintln(stderr, "outbox-relay config check:", err)
		return 1
	}
	cfg, err := rf.relayConfig(slog.New(slog.DiscardHandler))
	if err != nil {
		fmt.Fprintln(stderr, "outbox-relay config check:", err)
		return 1
	}
	effective := rf.effectiveValues(cfg)
	var names []string
	fs.VisitAll(func(f *flag.Flag) { names = append(names, f.Name) })
	sort.Strings(names)
	for _, name := range names {
		v := fs.Lookup(name).Value.String()
		if name == "database-url" {
			v = redactURL(v)
		}
		from := sources[name]
		if from == "" {
			from = "default"
		}
		if d, ok := effective[name]; ok {
			v = d.value
			if d.derived {
				v += " (derived)"
			}
			if d.note != "" {
				from += "; " + d.note
			}
		}
		fmt.Fprintf(stdout, "%-24s %-40s # %s\n", name, v, from)
	}
	fmt.Fprintln(stdout, "configuration is valid")
	return 0
}

// effectiveValue is what run uses instead of a flag's value as given.
type effectiveValue struct {
	value   string
	derived bool   // run derives it; false: a runtime variable overrides the flag
	note    string // how, or what overrides the flag
}

// effectiveValues are the flags whose value as given does not say what run
// uses: 0 or empty stands for a derived value, or a runtime variable wins.
// The heap limit and the collector's setting come from the functions run
// calls, the relay's own defaults from relay.Config.WithDefaults.
func (rf *runFlags) effectiveValues(cfg relay.Config) map[string]effectiveValue {
	eff := cfg.WithDefaults()
	d := map[string]effectiveValue{}
	if cfg.RetrySchedule == nil {
		s := durationList(relay.DefaultRetrySchedule)
		d["retry-schedule"] = effectiveValue{s.String(), true, "the Standard Webhooks schedule"}
	}
	if limit, source := rf.heapLimit(cfg); rf.memoryLimit == 0 {
		if limit > 0 {
			d["memory-limit"] = effectiveValue{strconv.FormatInt(limit, 10), true,
				fmt.Sprintf("%s, raised by %d KiB per endpoint once they are loaded", source, perEndpointHeap>>10)}
		} else {
			d["memory-limit"] = effectiveValue{"GOMEMLIMIT=" + os.Getenv("GOMEMLIMIT"), false, source + " is set and wins"}
		}
	}
	if _, ok := rf.gcSetting(); !ok {
		d["gc-percent"] = effectiveValue{"GOGC=" + os.Getenv("GOGC"), false, "GOGC is set and wins"}
	}
	if cfg.HeldEvents == 0 {
		d["queue-held"] = effectiveValue{strconv.Itoa(eff.HeldEvents), true, "5 × queue-events"}
	}
	if cfg.TenantMaxInFlight == 0 {
		d["tenant-max-in-flight"] = effectiveValue{strconv.Itoa(eff.TenantMaxInFlight), true, "three quarters of workers"}
	}
	return d
}

var dsnPassword = regexp.MustCompile(`(password\s*=\s*)('[^']*'|\S+)`)

// redactURL hides the password of a connection URL or keyword DSN.
func redactURL(s string) string {
	if !strings.Contains(s, "://") {
		return dsnPassword.ReplaceAllString(s, "${1}REDACTED")
	}
	u, err := url.Parse(s)
	if err != nil || u.User == nil {
		return s
	}
	if _, has := u.User.Password(); has {
		u.User = url.UserPassword(u.User.Username(), "REDACTED")
	}
	return u.String()
}
