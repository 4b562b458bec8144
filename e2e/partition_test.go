package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/pgtemp"
	"github.com/outbox-relay/outbox-relay/signer"
)

// partitionNet is a network namespace joined to this one by a veth pair:
// a relay started in it reaches Postgres and the receiver over the link.
// cut takes the namespace's end of the link down. On this side the link
// then has no carrier and packets sent over it are dropped without a
// word, as in a network partition: Postgres and the receiver get no
// reset and no refusal, only silence. (Inside the namespace the route is
// gone, so the relay's own sends fail at once; it cannot reach anything.)
type partitionNet struct {
	t                  *testing.T
	ns, hostDev, nsDev string
	hostIP, nsIP, cidr string
}

// newPartitionNet sets the namespace up, or skips the test when this
// machine cannot (not root, no `ip`, no network namespaces or veth).
func newPartitionNet(t *testing.T) *partitionNet {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("a network partition needs root (network namespaces)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("a network partition needs ip (iproute2)")
	}
	id := os.Getpid() % 100000
	sub := os.Getpid() % 200
	n := &partitionNet{t: t, ns: fmt.Sprintf("orpart%d", id), hostDev: fmt.Sprintf("orh%d", id), nsDev: fmt.Sprintf("orn%d", id),
		hostIP: fmt.Sprintf("10.231.%d.1", sub), nsIP: fmt.Sprintf("10.231.%d.2", sub), cidr: fmt.Sprintf("10.231.%d.0/30", sub)}
	exec.Command("ip", "netns", "del", n.ns).Run() // a leftover of a killed run
	if err := runCmd("ip", "netns", "add", n.ns); err != nil {
		t.Skipf("cannot create a network namespace: %v", err)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.ns).Run() })
	steps := [][]string{
		{"ip", "link", "add", n.hostDev, "type", "veth", "peer", "name", n.nsDev},
		{"ip", "link", "set", n.nsDev, "netns", n.ns},
		{"ip", "addr", "add", n.hostIP + "/30", "dev", n.hostDev},
		{"ip", "link", "set", n.hostDev, "up"},
		{"ip", "netns", "exec", n.ns, "ip", "addr", "add", n.nsIP + "/30", "dev", n.nsDev},
		{"ip", "netns", "exec", n.ns, "ip", "link", "set", n.nsDev, "up"},
		{"ip", "netns", "exec", n.ns, "ip", "link", "set", "lo", "up"},
	}
	for _, st := range steps {
		if err := runCmd(st...); err != nil {
			t.Skipf("cannot set up the partition's link: %v", err)
		}
	}
	t.Cleanup(func() { exec.Command("ip", "link", "del", n.hostDev).Run() })
	return n
}

// setCut takes the namespace's end of the link down (true) or up (false).
func (n *partitionNet) setCut(cut bool) error {
	state := "up"
	if cut {
		state = "down"
	}
	return runCmd("ip", "netns", "exec", n.ns, "ip", "link", "set", n.nsDev, state)
}

// runCmd runs a command, its output in the error if it fails.
func runCmd(args ...string) error {
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// The active relay loses its network without its process dying: packets to
// and from it vanish. The server notices its lock connection is gone (the
// relay sets TCP keepalives on it), a standby takes over, and every event
// committed before, during and after the partition is delivered with one
// succeeded row; the receiver sees each at least once.
func TestTakeoverAfterNetworkPartition(t *testing.T) {
	n := newPartitionNet(t)
	ctx := context.Background()
	cl, err := pgtemp.Start(ctx, pgtemp.Options{
		Settings: map[string]string{"listen_addresses": "127.0.0.1," + n.hostIP},
		HBA:      []string{"host all all " + n.cidr + " trust", "host replication all " + n.cidr + " trust"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Stop() })
	url := pgtemp.NewDatabase(t, cl)
	if out, err := runBinary("migrate", "--database-url", url); err != nil {
		t.Fatalf("migrate: %v %s", err, out)
	}
	pool := connect(t, url)
	nsURL := strings.Replace(url, "127.0.0.1", n.hostIP, 1)

	// The receiver listens on the link's host side, so both relays reach it;
	// it tells them apart by the address a request comes from.
	secretText, sec := newWebhookSecret(t)
	verifier := &signer.Verifier{Secrets: []signer.Secret{sec}}
	var (
		mu                 sync.Mutex
		seen               = map[string]int{}
		fromNS, fromHost   atomic.Int64
		firstFromHost      atomic.Int64 // Unix ns
		badSigs            atomic.Int64
		lastFromNSAtCutOff atomic.Int64
	)
	ln, err := net.Listen("tcp", n.hostIP+":0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if verifier.Verify(r.Header, body) != nil {
			badSigs.Add(1)
		}
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		if host == n.nsIP {
			fromNS.Add(1)
		} else {
			fromHost.Add(1)
			firstFromHost.CompareAndSwap(0, time.Now().UnixNano())
		}
		mu.Lock()
		seen[r.Header.Get("webhook-id")]++
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	if _, err := pool.Exec(ctx, `INSERT INTO relay.endpoints (id, tenant_id, url, secrets) VALUES ('ep', 't', $1, ARRAY[$2])`,
		"http://"+ln.Addr().String()+"/hook", secretText); err != nil {
		t.Fatal(err)
	}
	args := func(dbURL string) []string {
		return []string{"run", "--database-url", dbURL, "--allow-networks", n.cidr + ",127.0.0.0/8", "--http-addr", "127.0.0.1:0",
			"--retry-schedule", "0s,100ms,200ms,500ms,1s,1s,1s,1s", "--log-level", "info"}
	}
	active := startRelayIn(t, n.ns, args(nsURL)...)

	// A steady producer, before, during and after the partition.
	stop := make(chan struct{})
	var produced atomic.Int64
	var prodWG sync.WaitGroup
	prodWG.Add(1)
	go func() {
		defer prodWG.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			if _, err := pool.Exec(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload) VALUES ('t', 'x', jsonb_build_object('i', $1::int))`, i); err == nil {
				produced.Add(1)
			}
		}
	}()
	waitFor(t, "the relay in the namespace delivering", 30*time.Second, func() bool { return fromNS.Load() >= 50 })
	standby := startRelay(t, args(url)...)
	waitFor(t, "the standby standing by", 20*time.Second, func() bool {
		return strings.Contains(standby.output(), "standing by")
	})

	if err := n.setCut(true); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	lastFromNSAtCutOff.Store(fromNS.Load())
	t.Logf("partition: the active relay's link is cut")
	waitFor(t, "the standby delivering after the partition", 90*time.Second, func() bool { return fromHost.Load() > 0 })
	takeover := time.Unix(0, firstFromHost.Load()).Sub(cut)
	t.Logf("partition to the standby's first delivery: %s", takeover.Round(time.Millisecond))

	// The partitioned relay finds out too, from its own end of its
	// connections (keepalives, TCP_USER_TIMEOUT, the stream's receive
	// timeout), and says so, instead of waiting in silence for as long as
	// the kernel retransmits.
	before := len(active.output())
	waitFor(t, "the partitioned relay to notice", 40*time.Second, func() bool {
		return exitState(active) != "is still running" || strings.Contains(active.output()[before:], "connection lost")
	})
	noticed := time.Since(cut)
	said := active.output()[before:]
	if i := strings.Index(said, "connection lost"); i >= 0 {
		said = said[strings.LastIndex(said[:i], "\n")+1:]
		said, _, _ = strings.Cut(said, "\n")
	}
	t.Logf("partition to the partitioned relay's notice: %s (it %s): %s", noticed.Round(time.Millisecond), exitState(active), said)
	time.Sleep(2 * time.Second) // the standby delivers what is committed meanwhile
	if err := n.setCut(false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second) // the old relay hears of the new one, or not, as it may
	close(stop)
	prodWG.Wait()
	want := int(produced.Load())
	waitFor(t, "every event succeeded", 60*time.Second, func() bool {
		return count(t, pool, `SELECT count(*) FROM relay.deliveries WHERE state = 'succeeded'`) == want
	})
	if got := count(t, pool, `SELECT count(*) FROM relay.outbox`); got != want {
		t.Errorf("%d outbox rows, %d inserts succeeded", got, want)
	}
	if got := count(t, pool, `SELECT count(*) FROM relay.outbox o WHERE (SELECT count(*) FROM relay.deliveries d WHERE d.event_id = o.id AND d.state = 'succeeded') <> 1`); got != 0 {
		t.Errorf("%d events without exactly one succeeded row", got)
	}
	mu.Lock()
	distinct, dups := len(seen), 0
	for _, c := range seen {
		dups += c - 1
	}
	mu.Unlock()
	if distinct != want {
		t.Errorf("receiver saw %d distinct events, want %d", distinct, want)
	}
	if badSigs.Load() != 0 {
		t.Errorf("%d requests with a bad signature", badSigs.Load())
	}
	// The server's keepalives on the lock connection (5 s idle, 3 probes a
	// second apart) release the lock within ~10 s; the standby polls every
	// second. 30 s leaves room for a loaded machine.
	if takeover > 30*time.Second {
		t.Errorf("the standby took over %s after the partition, want within 30s", takeover.Round(time.Millisecond))
	}
	t.Logf("partition: %d events, %d requests from the partitioned relay (%d before the cut), %d from the standby, %d duplicates; the partitioned relay %s",
		want, fromNS.Load(), lastFromNSAtCutOff.Load(), fromHost.Load(), dups, exitState(active))
}

// exitState says whether p is still running, or how it ended.
func exitState(p *relayProc) string {
	select {
	case err := <-p.done:
		p.done <- err // for the cleanup
		return fmt.Sprintf("exited (%v)", err)
	default:
		return "is still running"
	}
}
