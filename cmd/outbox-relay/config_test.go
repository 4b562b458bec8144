package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/outbox-relay/outbox-relay/relay"
)

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(context.Background(), args, strings.NewReader(""), &out, &errb)
	return code, out.String(), errb.String()
}

// Precedence: flag > env > config file > preset > default; secrets redacted.
func TestConfigCheckPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "relay.conf")
	os.WriteFile(file, []byte(`# relay settings
database-url: "postgres://app:s3cret@db:5432/app"
workers: 7
queue-events = 1234
slot: from_file
overflow: block
`), 0o600)
	t.Setenv("OUTBOX_RELAY_QUEUE_EVENTS", "999")
	code, out, errOut := runCLI(t, "config", "check", "--config", file, "--preset", "small", "--slot", "from_flag")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	want := map[string]string{
		"slot":                   `from_flag\s+# flag`,
		"queue-events":           `999\s+# env OUTBOX_RELAY_QUEUE_EVENTS`,
		"workers":                `7\s+# .*relay.conf:3`,
		"overflow":               `block\s+# .*relay.conf:6`,
		"endpoint-max-in-flight": `16\s+# preset small`,
		"poll-interval":          `1s\s+# default`,
		"database-url":           `postgres://app:REDACTED@db:5432/app`,
	}
	for name, pattern := range want {
		if !regexp.MustCompile(`(?m)^` + name + `\s+` + pattern).MatchString(out) {
			t.Errorf("%s: no line matching %q in:\n%s", name, pattern, out)
		}
	}
	if strings.Contains(out, "s3cret") {
		t.Error("password printed")
	}
}

// Flags whose 0 or empty value means a derived value print what run uses.
func TestConfigCheckDerivedValues(t *testing.T) {
	t.Setenv("GOMEMLIMIT", "")
	t.Setenv("GOGC", "")
	code, out, errOut := runCLI(t, "config", "check", "--database-url", "postgres://x", "--preset", "large")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	want := map[string]string{
		"memory-limit":         `318767104 \(derived\)\s+# default; --queue-bytes plus 48 MiB, raised by 8 KiB per endpoint`, // 256 MiB + 48 MiB
		"retry-schedule":       `0s,5s,5m0s,30m0s,2h0m0s,5h0m0s,10h0m0s,10h0m0s \(derived\)\s+# default`,
		"queue-held":           `500000 \(derived\)\s+# default; 5 × queue-events`,       // large: 100,000 queue events
		"tenant-max-in-flight": `192 \(derived\)\s+# default; three quarters of workers`, // large: 256 workers
		"gc-percent":           `400\s+# default$`,
	}
	for name, pattern := range want {
		if !regexp.MustCompile(`(?m)^` + name + `\s+` + pattern).MatchString(out) {
			t.Errorf("%s: no line matching %q in:\n%s", name, pattern, out)
		}
	}

	// Values given print as given; GOMEMLIMIT and GOGC win over the flags.
	t.Setenv("GOMEMLIMIT", "300MiB")
	t.Setenv("GOGC", "200")
	code, out, errOut = runCLI(t, "config", "check", "--database-url", "postgres://x",
		"--retry-schedule", "1s,1m", "--queue-held", "-1", "--tenant-max-in-flight", "5")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	want = map[string]string{
		"memory-limit":         `GOMEMLIMIT=300MiB\s+# default; GOMEMLIMIT is set and wins`,
		"gc-percent":           `GOGC=200\s+# default; GOGC is set and wins`,
		"retry-schedule":       `1s,1m0s\s+# flag$`,
		"queue-held":           `-1\s+# flag$`,
		"tenant-max-in-flight": `5\s+# flag$`,
	}
	for name, pattern := range want {
		if !regexp.MustCompile(`(?m)^` + name + `\s+` + pattern).MatchString(out) {
			t.Errorf("%s: no line matching %q in:\n%s", name, pattern, out)
		}
	}
}

func TestConfigCheckRejectsBadSettings(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "bad.conf")
	os.WriteFile(file, []byte("workers: 4\nworkerz: 5\n"), 0o600)
	if code, _, errOut := runCLI(t, "config", "check", "--config", file); code == 0 || !strings.Contains(errOut, "bad.conf:2") || !strings.Contains(errOut, "workerz") {
		t.Errorf("unknown setting: exit %d, %q", code, errOut)
	}
	if code, _, errOut := runCLI(t, "config", "check", "--database-url", "postgres://x", "--overflow", "sometimes"); code == 0 || !strings.Contains(errOut, "Overflow") {
		t.Errorf("bad overflow: exit %d, %q", code, errOut)
	}
	if code, _, errOut := runCLI(t, "config", "check", "--database-url", "postgres://x", "--http-client", "curl"); code == 0 || !strings.Contains(errOut, "HTTPClient") {
		t.Errorf("bad http client: exit %d, %q", code, errOut)
	}
	if code, _, errOut := runCLI(t, "config", "check", "--database-url", "postgres://x", "--stream-batch-bytes", "100"); code == 0 || !strings.Contains(errOut, "StreamBatchBytes") {
		t.Errorf("stream batch of 100 bytes: exit %d, %q", code, errOut)
	}
	if code, _, errOut := runCLI(t, "config", "check", "--preset", "huge"); code == 0 || !strings.Contains(errOut, "small, medium or large") {
		t.Errorf("bad preset: exit %d, %q", code, errOut)
	}
	if code, _, errOut := runCLI(t, "config", "check"); code == 0 || !strings.Contains(errOut, "DatabaseURL") {
		t.Errorf("missing database url: exit %d, %q", code, errOut)
	}
}

func TestRedactKeywordDSN(t *testing.T) {
	if got := redactURL("host=db user=app password=hunter2 dbname=app"); strings.Contains(got, "hunter2") {
		t.Errorf("redactURL kept the password: %q", got)
	}
}

func TestHeapLimit(t *testing.T) {
	for _, tc := range []struct {
		env        string
		flag       int64
		queueBytes int
		want       int64
	}{
		{"", 0, 64 << 20, 112 << 20},
		{"", 0, 16 << 20, 64 << 20},
		{"", 300 << 20, 64 << 20, 300 << 20},
		{"", -1, 64 << 20, 0},
		{"200MiB", 0, 64 << 20, 0}, // the runtime applies GOMEMLIMIT itself
	} {
		t.Setenv("GOMEMLIMIT", tc.env)
		rf := &runFlags{memoryLimit: tc.flag}
		if got, source := rf.heapLimit(relay.Config{QueueBytes: tc.queueBytes}); got != tc.want {
			t.Errorf("GOMEMLIMIT=%q --memory-limit %d --queue-bytes %d: limit %d (%s), want %d", tc.env, tc.flag, tc.queueBytes, got, source, tc.want)
		}
	}
}

func TestGCSetting(t *testing.T) {
	for _, tc := range []struct {
		env  string
		args []string
		want int
		ok   bool
	}{
		{"", nil, 400, true},
		{"", []string{"--gc-percent", "150"}, 150, true},
		{"off", []string{"--gc-percent", "150"}, 0, false}, // the runtime applies GOGC itself
	} {
		t.Setenv("GOGC", tc.env)
		fs, rf := newRunFlags("run", runSynopsis, io.Discard)
		if err := parseFlags(fs, tc.args); err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if got, ok := rf.gcSetting(); got != tc.want || ok != tc.ok {
			t.Errorf("GOGC=%q %v: got %d, %t; want %d, %t", tc.env, tc.args, got, ok, tc.want, tc.ok)
		}
	}
}
