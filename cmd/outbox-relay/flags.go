package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"
)

// envName is the environment variable for a flag: --queue-events is
// OUTBOX_RELAY_QUEUE_EVENTS.
func envName(flagName string) string {
	return "OUTBOX_RELAY_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// newFlagSet builds a flag set whose usage lists each flag with its env
// variable and default.
func newFlagSet(name, synopsis string, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() {
		fmt.Fprintf(out, "Usage: outbox-relay %s [flags]\n\n%s\n\nFlags:\n", name, synopsis)
		fs.VisitAll(func(f *flag.Flag) {
			def := ""
			if f.DefValue != "" {
				def = fmt.Sprintf(" (default %s)", f.DefValue)
			}
			fmt.Fprintf(out, "  --%s\n      %s%s\n      env %s\n", f.Name, f.Usage, def, envName(f.Name))
		})
	}
	return fs
}

// presets are named sets of defaults for --preset: queue sizes, workers
// and batch sizes for a class of deployment. Any other source wins.
var presets = map[string]map[string]string{
	// A sidecar next to a small service: little memory, few receivers.
	"small": {"workers": "16", "queue-events": "5000", "queue-bytes": "16777216", "endpoint-max-in-flight": "16"},
	// The defaults: tens of endpoints, thousands of events per second.
	"medium": {"workers": "64", "queue-events": "20000", "queue-bytes": "67108864", "endpoint-max-in-flight": "64"},
	// Many endpoints or a high rate, with memory to match.
	"large": {"workers": "256", "queue-events": "100000", "queue-bytes": "268435456", "endpoint-max-in-flight": "128"},
}

// parseFlags parses args, then fills every flag not given on the command
// line from, in order: its environment variable, the --config file, the
// --preset.
func parseFlags(fs *flag.FlagSet, args []string) error {
	_, err := parseFlagSources(fs, args)
	return err
}

// parseFlagSources is parseFlags, also returning where each value came from.
func parseFlagSources(fs *flag.FlagSet, args []string) (map[string]string, error) {
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 && fs.Name() != "verify" {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	source := map[string]string{}
	fs.Visit(func(f *flag.Flag) { source[f.Name] = "flag" })
	var errs []error
	fill := func(name, value, from string) {
		if _, done := source[name]; done || fs.Lookup(name) == nil {
			return
		}
		if err := fs.Set(name, value); err != nil {
			errs = append(errs, fmt.Errorf("%s: %v", from, err))
			return
		}
		source[name] = from
	}
	fs.VisitAll(func(f *flag.Flag) {
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			fill(f.Name, v, "env "+envName(f.Name))
		}
	})
	if f := fs.Lookup("config"); f != nil && f.Value.String() != "" {
		entries, err := readConfigFile(f.Value.String())
		if err != nil {
			return nil, err
		}
		for _, e := range entries {
			if fs.Lookup(e.key) == nil {
				errs = append(errs, fmt.Errorf("%s:%d: unknown setting %q (settings are flag names, e.g. workers)", f.Value.String(), e.line, e.key))
				continue
			}
			fill(e.key, e.value, fmt.Sprintf("%s:%d", f.Value.String(), e.line))
		}
	}
	if f := fs.Lookup("preset"); f != nil && f.Value.String() != "" {
		p, ok := presets[f.Value.String()]
		if !ok {
			return nil, fmt.Errorf("--preset must be small, medium or large (got %q)", f.Value.String())
		}
		for name, v := range p {
			fill(name, v, "preset "+f.Value.String())
		}
	}
	return source, errors.Join(errs...)
}

type configEntry struct {
	key, value string
	line       int
}

// readConfigFile reads "name: value" (or "name = value") lines; names are
// flag names; '#' starts a comment; values may be quoted.
func readConfigFile(path string) ([]configEntry, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	var out []configEntry
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, ":")
		if eq := strings.IndexByte(line, '='); eq >= 0 && (!ok || eq < len(k)) {
			k, v, ok = line[:eq], line[eq+1:], true
		}
		if !ok {
			return nil, fmt.Errorf("%s:%d: want \"name: value\"", path, i+1)
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '"' && v[len(v)-1] == '"' || v[0] == '\'' && v[len(v)-1] == '\'') {
			v = v[1 : len(v)-1]
		}
		out = append(out, configEntry{key: strings.TrimSpace(k), value: v, line: i + 1})
	}
	return out, nil
}

// flagExit turns a parse error into an exit code: 0 for --help.
func flagExit(err error, stderr io.Writer) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintln(stderr, "outbox-relay:", err)
	return 2
}

type durationList []time.Duration

func (d *durationList) String() string {
	parts := make([]string, len(*d))
	for i, v := range *d {
		parts[i] = v.String()
	}
	return strings.Join(parts, ",")
}

func (d *durationList) Set(s string) error {
	*d = nil
	for _, p := range strings.Split(s, ",") {
		v, err := time.ParseDuration(strings.TrimSpace(p))
		if err != nil {
			return fmt.Errorf("retry schedule entry %q: %v", p, err)
		}
		*d = append(*d, v)
	}
	return nil
}

type prefixList []netip.Prefix

func (p *prefixList) String() string {
	parts := make([]string, len(*p))
	for i, v := range *p {
		parts[i] = v.String()
	}
	return strings.Join(parts, ",")
}

func (p *prefixList) Set(s string) error {
	*p = nil
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		pre, err := netip.ParsePrefix(part)
		if err != nil {
			addr, aerr := netip.ParseAddr(part)
			if aerr != nil {
				return fmt.Errorf("%q is not a CIDR or an address", part)
			}
			pre = netip.PrefixFrom(addr, addr.BitLen())
		}
		*p = append(*p, pre)
	}
	return nil
}

type logFlags struct {
	level  string
	format string
}

func (l *logFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&l.level, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&l.format, "log-format", "text", "log format: text or json")
}

func (l *logFlags) logger(w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(l.level)); err != nil {
		return nil, fmt.Errorf("--log-level: %v", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch l.format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format must be text or json (got %q)", l.format)
}
