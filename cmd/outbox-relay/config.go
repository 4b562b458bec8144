package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"regexp"
	"sort"
	"strings"
)

func runConfig(_ context.Context, args []string, _ io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "check" {
		fmt.Fprintln(stderr, "Usage: outbox-relay config check [run's flags]\n\nValidates the settings `run` would use (flags, OUTBOX_RELAY_* variables, --config file,\n--preset) and prints the effective value of each, with where it came from. Secrets are redacted.")
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
	if _, err := rf.relayConfig(slog.New(slog.DiscardHandler)); err != nil {
		fmt.Fprintln(stderr, "outbox-relay config check:", err)
		return 1
	}
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
		fmt.Fprintf(stdout, "%-24s %-40s # %s\n", name, v, from)
	}
	fmt.Fprintln(stdout, "configuration is valid")
	return 0
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
