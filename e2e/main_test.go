// Package e2e tests the real outbox-relay binary against a real Postgres
// and real HTTP receivers, and kills it for real.
package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	outboxrelay "github.com/outbox-relay/outbox-relay"
	"github.com/outbox-relay/outbox-relay/internal/pgtemp"
	"github.com/outbox-relay/outbox-relay/signer"
)

var (
	cluster *pgtemp.Cluster
	binary  string
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "outbox-relay-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "outbox-relay")
	build := exec.Command("go", "build", "-o", binary, "./cmd/outbox-relay")
	build.Dir = ".."
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build outbox-relay:", err)
		os.Exit(1)
	}
	code := pgtemp.Main(m, &cluster)
	os.RemoveAll(dir)
	os.Exit(code)
}

// receiver counts what arrives per webhook-id and checks every signature.
type receiver struct {
	srv    *httptest.Server
	secret string

	mu       sync.Mutex
	seen     map[string]int
	arrivals map[string][]time.Time
	bodies   map[string]string
	badSigs  int
	requests int
	fail     func() int // status to answer; nil = 204
}

func newReceiver(t *testing.T) *receiver {
	key := make([]byte, 32)
	rand.Read(key)
	rcv := &receiver{secret: "whsec_" + base64.StdEncoding.EncodeToString(key), seen: map[string]int{}, arrivals: map[string][]time.Time{}, bodies: map[string]string{}}
	sec, err := signer.ParseSecret(rcv.secret)
	if err != nil {
		t.Fatal(err)
	}
	v := &signer.Verifier{Secrets: []signer.Secret{sec}}
	rcv.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		ok := v.Verify(r.Header, body) == nil
		rcv.mu.Lock()
		rcv.requests++
		if !ok {
			rcv.badSigs++
		}
		id := r.Header.Get("webhook-id")
		rcv.seen[id]++
		rcv.arrivals[id] = append(rcv.arrivals[id], time.Now())
		rcv.bodies[id] = string(body)
		fail := rcv.fail
		rcv.mu.Unlock()
		if fail != nil {
			w.WriteHeader(fail())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(rcv.srv.Close)
	return rcv
}

func (rcv *receiver) stats() (distinct, total, dups, bad int) {
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	for _, n := range rcv.seen {
		distinct++
		dups += n - 1
	}
	return distinct, rcv.requests, dups, rcv.badSigs
}

// kill is when a SIGKILL was sent and when the process was seen dead.
type kill struct{ sent, dead time.Time }

// repeatsWithoutKill counts deliveries that arrived twice with no kill
// between them: a duplicate a crash does not explain. A request the dead
// process sent can be handled by the receiver a little after the process
// is seen dead, hence the slack.
func (rcv *receiver) repeatsWithoutKill(kills []kill) int {
	const slack = 500 * time.Millisecond
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	n := 0
	for _, times := range rcv.arrivals {
		for i := 1; i < len(times); i++ {
			explained := false
			for _, k := range kills {
				if times[i-1].Before(k.dead.Add(slack)) && k.sent.Before(times[i]) {
					explained = true
					break
				}
			}
			if !explained {
				n++
			}
		}
	}
	return n
}

// relayProc is one running outbox-relay process.
type relayProc struct {
	cmd  *exec.Cmd
	out  *bytes.Buffer
	mu   *sync.Mutex
	done chan error
}

type lockedBuffer struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (l lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func startRelay(t *testing.T, args ...string) *relayProc {
	t.Helper()
	return startRelayIn(t, "", args...)
}

// startRelayIn starts the relay in network namespace netns ("" = this
// process's), through `ip netns exec`, which execs the relay itself.
func startRelayIn(t *testing.T, netns string, args ...string) *relayProc {
	t.Helper()
	p := &relayProc{out: &bytes.Buffer{}, mu: &sync.Mutex{}, done: make(chan error, 1)}
	if netns == "" {
		p.cmd = exec.Command(binary, args...)
	} else {
		p.cmd = exec.Command("ip", append([]string{"netns", "exec", netns, binary}, args...)...)
	}
	p.cmd.Stdout = lockedBuffer{p.mu, p.out}
	p.cmd.Stderr = lockedBuffer{p.mu, p.out}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("relay output:\n%s", p.output())
		}
	})
	return p
}

func (p *relayProc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// dumpStacks ends the relay with SIGQUIT, so that its output ends with
// every goroutine's stack: for a test that found it stuck.
func (p *relayProc) dumpStacks() {
	p.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case err := <-p.done:
		p.done <- err // let the cleanup's receive return
	case <-time.After(5 * time.Second):
	}
}

func (p *relayProc) kill9() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
	p.done <- nil // let the cleanup's receive return
}

// database creates a migrated database and returns its URL and a pool.
func database(t *testing.T) (string, *pgxpool.Pool) {
	t.Helper()
	url := pgtemp.NewDatabase(t, cluster)
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	out, err := exec.Command(binary, "migrate", "--database-url", url).CombinedOutput()
	if err != nil {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	// Re-running is a no-op.
	if err := outboxrelay.Migrate(context.Background(), pool); err != nil {
		t.Fatalf("second migrate: %v", err)
	}
	return url, pool
}

func count(t *testing.T, pool *pgxpool.Pool, sql string, args ...any) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func relayArgs(url string, extra ...string) []string {
	return append([]string{"run", "--database-url", url, "--allow-networks", "127.0.0.0/8", "--http-addr", "127.0.0.1:0",
		"--retry-schedule", "0s,100ms,200ms,500ms,1s,1s,1s,1s", "--poll-interval", "100ms", "--log-level", "info"}, extra...)
}

// freeAddr returns a loopback address with a port that was free just now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func hasAll(s string, parts ...string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}

// runBinary runs the outbox-relay binary to completion.
func runBinary(args ...string) (string, error) {
	out, err := exec.Command(binary, args...).CombinedOutput()
	return string(out), err
}

// connect opens a pool closed when the test ends.
func connect(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}
