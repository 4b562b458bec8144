package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/signer"
)

// TestChaos keeps producers committing (and rolling back) events for three
// tenants and five endpoints (one of them ordered) while a seeded fault injector kills relays
// (alone or with a standby that takes over), restarts Postgres, makes
// receivers fail, hang, reset or slow down, and flips endpoint config
// (disable, secret rotation, rate limit). Then it heals everything, lets the
// relay drain, and checks the promises against relay.deliveries and what the
// receivers saw: nothing lost, nothing rolled back delivered, every request
// signed with a secret the endpoint had, every succeeded row received,
// every duplicate explained by a fault, and at the ordered endpoint every
// event's first arrival in commit order.
//
// CHAOS_DURATION (default 90s) is how long faults are injected; CHAOS_SEED
// replays the same fault sequence (timings still vary with the machine).
func TestChaos(t *testing.T) {
	duration := 90 * time.Second
	if s := os.Getenv("CHAOS_DURATION"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("CHAOS_DURATION: %v", err)
		}
		duration = d
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CHAOS_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("CHAOS_SEED: %v", err)
		}
		seed = n
	}
	t.Logf("chaos: duration %s, seed %d (replay the fault sequence with CHAOS_SEED=%d)", duration, seed, seed)

	url, pool := database(t)
	c := &chaos{
		t:        t,
		url:      url,
		pool:     pool,
		rng:      mrand.New(mrand.NewPCG(seed, 0x6368616f73)),
		seed:     seed,
		stop:     make(chan struct{}),
		faults:   map[string]int{},
		disabled: map[string][]interval{},
	}
	c.setupEndpoints()
	c.relays = &relaySupervisor{c: c, desired: 1}
	c.relays.ensure()

	superDone := make(chan struct{})
	go func() { defer close(superDone); c.relays.supervise(c.stop) }()
	var producers sync.WaitGroup
	for p := range chaosProducers {
		producers.Add(1)
		go func() { defer producers.Done(); c.produce(p) }()
	}

	began := time.Now()
	c.inject(began.Add(duration))
	close(c.stop)
	producers.Wait()
	c.timed.Wait() // every timed fault restored
	<-superDone
	t.Logf("chaos: faults stopped after %s; healing and draining", time.Since(began).Round(time.Second))

	c.heal()
	drainStart := time.Now()
	drained := c.drain(chaosDrainTimeout)
	t.Logf("chaos: drain %s after %s", map[bool]string{true: "complete", false: "incomplete"}[drained], time.Since(drainStart).Round(100*time.Millisecond))
	c.check(drainStart)
}

const (
	chaosProducers    = 4
	chaosTimeoutMS    = 500              // endpoints' timeout_ms: a hanging receiver costs little
	chaosGrace        = 10 * time.Second // a removed secret is still accepted this long (config travels through the WAL)
	chaosDrainTimeout = 75 * time.Second
	chaosSlack        = 2 * time.Second // a request sent before a fault can be handled a little after it
)

var chaosEventTypes = []string{"order.created", "invoice.paid", "user.signed_up"}

// interval is one stretch an endpoint was disabled: from before the
// disabling UPDATE was sent to after the enabling one returned (it may have
// been disabled then), and sureFrom, sureTo from the disabling UPDATE's
// return to the enabling one's start (it was disabled then).
type interval struct{ from, to, sureFrom, sureTo time.Time }

type chaosEndpoint struct {
	id, tenant string
	types      []string // subscription; nil = every type
	rcv        *chaosReceiver
	secret     string // the current (newest) secret
	rotating   bool   // a second secret is listed
	disabling  bool   // a disable fault is under way: its restore enables it again
	ordered    bool   // relay.endpoints.ordered: first attempts in commit order
}

func (ep *chaosEndpoint) subscribes(eventType string) bool {
	if ep.types == nil {
		return true
	}
	for _, p := range ep.types {
		if strings.HasSuffix(p, "*") && strings.HasPrefix(eventType, strings.TrimSuffix(p, "*")) || p == eventType {
			return true
		}
	}
	return false
}

// chaosEvent is one outbox row a producer inserted.
type chaosEvent struct {
	id, tenant, eventType, endpoint string
	began                           time.Time // before BEGIN
	done                            time.Time // COMMIT returned (with or without an error)
	rolledBack                      bool
	committed                       bool // COMMIT returned without error
	ambiguous                       bool // COMMIT returned an error: committed or not, the outbox says
}

type faultWindow struct {
	kind     string
	from, to time.Time
}

type chaos struct {
	t    *testing.T
	url  string
	pool *pgxpool.Pool
	rng  *mrand.Rand // the injector's only
	seed uint64
	stop chan struct{}

	endpoints []*chaosEndpoint
	relays    *relaySupervisor
	timed     sync.WaitGroup // faults that restore themselves later

	mu       sync.Mutex
	events   []*chaosEvent
	faults   map[string]int
	windows  []faultWindow         // kills, restarts and exits: what can repeat a delivery
	disabled map[string][]interval // per endpoint, when it was (possibly) disabled
	sqlErrs  int
	bulk     int // committed transactions of 200 rows or more
}

// logf logs with the wall-clock time, to line up with the relays' logs.
func (c *chaos) logf(format string, args ...any) {
	c.t.Logf("%s chaos: "+format, append([]any{time.Now().UTC().Format("15:04:05.000")}, args...)...)
}

func (c *chaos) fault(kind string) {
	c.mu.Lock()
	c.faults[kind]++
	c.mu.Unlock()
}

func (c *chaos) window(kind string, from, to time.Time) {
	c.mu.Lock()
	c.windows = append(c.windows, faultWindow{kind, from, to})
	c.mu.Unlock()
}

func newWebhookSecret(t *testing.T) (string, signer.Secret) {
	key := make([]byte, 32)
	rand.Read(key)
	s := "whsec_" + base64.StdEncoding.EncodeToString(key)
	sec, err := signer.ParseSecret(s)
	if err != nil {
		t.Fatal(err)
	}
	return s, sec
}

func (c *chaos) setupEndpoints() {
	c.endpoints = []*chaosEndpoint{
		{id: "ep_t1_all", tenant: "t1"},
		{id: "ep_t1_orders", tenant: "t1", types: []string{"order.*"}},
		{id: "ep_t2_all", tenant: "t2"},
		{id: "ep_t3_invoices", tenant: "t3", types: []string{"invoice.*"}}, // t3's other events are unrouted
		{id: "ep_t2_ordered", tenant: "t2", types: []string{"user.*"}, ordered: true},
	}
	for _, ep := range c.endpoints {
		var sec signer.Secret
		ep.secret, sec = newWebhookSecret(c.t)
		ep.rcv = newChaosReceiver(c.t, ep.id, ep.secret, sec)
		var types any
		if ep.types != nil {
			types = ep.types
		}
		// A short timeout so a hanging receiver costs little, and a short
		// breaker cooldown so an open circuit does not outlast the run.
		if _, err := c.pool.Exec(context.Background(), `INSERT INTO relay.endpoints
  (id, tenant_id, url, secrets, event_types, timeout_ms, breaker_cooldown_ms, ordered) VALUES ($1, $2, $3, ARRAY[$4], $5, $6, 1000, $7)`,
			ep.id, ep.tenant, ep.rcv.srv.URL, ep.secret, types, chaosTimeoutMS, ep.ordered); err != nil {
			c.t.Fatal(err)
		}
	}
	if _, err := c.pool.Exec(context.Background(), `INSERT INTO relay.tenants (id, weight) VALUES ('t1', 2)`); err != nil {
		c.t.Fatal(err)
	}
}

// exec runs one statement, retrying while Postgres restarts. It returns
// when the statement has committed, or false if it never did in time.
func (c *chaos) exec(sql string, args ...any) bool {
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := c.pool.Exec(ctx, sql, args...)
		cancel()
		if err == nil {
			return true
		}
		c.mu.Lock()
		c.sqlErrs++
		c.mu.Unlock()
		if time.Now().After(deadline) {
			c.t.Errorf("chaos: %s: %v", sql, err)
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// produce commits events until the run stops: mostly one row per
// transaction, some several, some rolled back (tagged "rb" in the payload so
// a delivery of one is recognisable).
func (c *chaos) produce(p int) {
	rng := mrand.New(mrand.NewPCG(c.seed, uint64(p)+1))
	tenants := []string{"t1", "t1", "t2", "t3"}
	for seq := 0; ; seq++ {
		select {
		case <-c.stop:
			return
		case <-time.After(time.Duration(15+rng.IntN(40)) * time.Millisecond):
		}
		rows := 1
		switch r := rng.IntN(1000); {
		case r == 0:
			// A bulk transaction: larger than the relays' stream batch
			// (--stream-batch-bytes 32768), so it reaches them in parts,
			// across kills and Postgres restarts like everything else.
			rows = 200 + rng.IntN(200)
		case r < 100:
			rows = 2 + rng.IntN(4)
		}
		rollback := rng.IntN(7) == 0
		tenant := tenants[rng.IntN(len(tenants))]
		began := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		tx, err := c.pool.Begin(ctx)
		if err != nil {
			cancel()
			time.Sleep(100 * time.Millisecond) // Postgres is restarting
			continue
		}
		var evs []*chaosEvent
		for j := range rows {
			ev := &chaosEvent{tenant: tenant, eventType: chaosEventTypes[rng.IntN(len(chaosEventTypes))], began: began, rolledBack: rollback}
			// Now and then an event names its endpoint (one that subscribes).
			var target any
			if rng.IntN(20) == 0 {
				var subs []string
				for _, ep := range c.endpoints {
					if ep.tenant == tenant && ep.subscribes(ev.eventType) {
						subs = append(subs, ep.id)
					}
				}
				if len(subs) > 0 {
					ev.endpoint = subs[rng.IntN(len(subs))]
					target = ev.endpoint
				}
			}
			payload := fmt.Sprintf(`{"producer": %d, "seq": %d, "row": %d, "rb": %t, "pad": %q}`, p, seq, j, rollback, strings.Repeat("x", rng.IntN(512)))
			err = tx.QueryRow(ctx, `INSERT INTO relay.outbox (tenant_id, event_type, payload, endpoint_id) VALUES ($1, $2, $3, $4) RETURNING id::text`,
				ev.tenant, ev.eventType, payload, target).Scan(&ev.id)
			if err != nil {
				break
			}
			evs = append(evs, ev)
		}
		switch {
		case err != nil:
			tx.Rollback(ctx) // never committed: its rows cannot be anywhere
			evs = nil
		case rollback:
			tx.Rollback(ctx)
		default:
			err := tx.Commit(ctx)
			done := time.Now()
			for _, ev := range evs {
				ev.done = done
				ev.ambiguous, ev.committed = err != nil, err == nil
			}
			if err == nil && rows >= 200 {
				c.mu.Lock()
				c.bulk++
				c.mu.Unlock()
			}
		}
		cancel()
		c.mu.Lock()
		c.events = append(c.events, evs...)
		c.mu.Unlock()
	}
}

// inject picks a fault at random every 0.5-3 s until the deadline.
func (c *chaos) inject(deadline time.Time) {
	type fault struct {
		kind   string
		weight int
		do     func()
	}
	faults := []fault{
		{"kill -9 relay", 3, c.killAll},
		{"kill -9 active, standby takes over", 2, c.killActive},
		{"postgres restart fast", 1, func() { c.restartPostgres("fast") }},
		{"postgres restart immediate", 1, func() { c.restartPostgres("immediate") }},
		{"receiver 5xx", 2, func() { c.receiverMode(mode5xx) }},
		{"receiver hang", 2, func() { c.receiverMode(modeHang) }},
		{"receiver reset", 2, func() { c.receiverMode(modeReset) }},
		{"receiver slow", 2, func() { c.receiverMode(modeSlow) }},
		{"endpoint disable", 2, c.disableEndpoint},
		{"secret rotation", 2, c.rotateSecret},
		{"rate limit change", 2, c.changeRateLimit},
	}
	if !cluster.Owned() {
		c.logf("external cluster: no Postgres restarts")
		faults = slices.DeleteFunc(faults, func(f fault) bool { return strings.HasPrefix(f.kind, "postgres") })
	}
	total := 0
	for _, f := range faults {
		total += f.weight
	}
	for {
		wait := time.Duration(500+c.rng.IntN(2500)) * time.Millisecond
		if time.Now().Add(wait).After(deadline) {
			time.Sleep(time.Until(deadline))
			return
		}
		time.Sleep(wait)
		n := c.rng.IntN(total)
		for _, f := range faults {
			if n -= f.weight; n < 0 {
				c.fault(f.kind)
				c.logf("fault: %s", f.kind)
				f.do()
				break
			}
		}
	}
}

// later runs restore after d, or at once when the run stops.
func (c *chaos) later(d time.Duration, restore func()) {
	c.timed.Add(1)
	go func() {
		defer c.timed.Done()
		select {
		case <-time.After(d):
		case <-c.stop:
		}
		restore()
	}()
}

func (c *chaos) pick() *chaosEndpoint { return c.endpoints[c.rng.IntN(len(c.endpoints))] }

func (c *chaos) killAll() {
	sent := time.Now()
	n := c.relays.killAll()
	c.window("kill", sent, time.Now())
	// Sometimes come back as two, so the next kill can be a takeover.
	if c.rng.IntN(3) == 0 {
		c.relays.setDesired(2)
	} else {
		c.relays.setDesired(1)
	}
	c.relays.ensure()
	c.logf("kill -9 of %d relay(s), %d running again", n, c.relays.running())
}

func (c *chaos) killActive() {
	c.relays.setDesired(2)
	c.relays.ensure()
	if !c.relays.waitStates(15*time.Second, func(a, sb int) bool { return a == 1 && sb >= 1 }) {
		c.logf("no active+standby pair within 15s; killing all instead")
		c.killAll()
		return
	}
	sent := time.Now()
	if !c.relays.killActive() {
		return
	}
	c.window("kill", sent, time.Now())
	took := time.Now()
	if c.relays.waitStates(20*time.Second, func(a, _ int) bool { return a == 1 }) {
		c.logf("killed the active relay, standby took over in %s", time.Since(took).Round(10*time.Millisecond))
	} else {
		c.logf("killed the active relay, no takeover seen within 20s")
	}
	if c.rng.IntN(2) == 0 {
		c.relays.setDesired(1)
	}
	c.relays.ensure()
}

func (c *chaos) restartPostgres(mode string) {
	from := time.Now()
	if err := cluster.Restart(context.Background(), mode); err != nil {
		c.t.Errorf("chaos: restart postgres (%s): %v", mode, err)
	}
	// A relay can lose its lock and exit a little later; that exit is a
	// window of its own (see the supervisor).
	c.window("postgres restart", from, time.Now().Add(chaosSlack))
	c.logf("postgres restarted (%s) in %s", mode, time.Since(from).Round(10*time.Millisecond))
}

func (c *chaos) receiverMode(m rcvMode) {
	ep := c.pick()
	d := time.Duration(1000+c.rng.IntN(5000)) * time.Millisecond
	gen := ep.rcv.setMode(m)
	c.later(d, func() { ep.rcv.restore(gen) })
}

func (c *chaos) disableEndpoint() {
	ep := c.pick()
	// One disable at a time per endpoint: a second one's window would
	// outlast the first's restore, which enables the endpoint again, and
	// the check would expect it disabled while it was not.
	c.mu.Lock()
	busy := ep.disabling
	ep.disabling = true
	c.mu.Unlock()
	if busy {
		return
	}
	from := time.Now()
	if !c.exec(`UPDATE relay.endpoints SET enabled = false, updated_at = now() WHERE id = $1`, ep.id) {
		c.mu.Lock()
		ep.disabling = false
		c.mu.Unlock()
		return
	}
	sureFrom := time.Now()
	c.later(time.Duration(1000+c.rng.IntN(4000))*time.Millisecond, func() {
		sureTo := time.Now()
		c.exec(`UPDATE relay.endpoints SET enabled = true, disabled_reason = NULL, updated_at = now() WHERE id = $1`, ep.id)
		c.mu.Lock()
		c.disabled[ep.id] = append(c.disabled[ep.id], interval{from, time.Now(), sureFrom, sureTo})
		ep.disabling = false
		c.mu.Unlock()
	})
}

// rotateSecret: the receiver accepts the new secret, the endpoint lists both,
// a little later the endpoint drops the old one, and the receiver stops
// accepting it chaosGrace after that.
func (c *chaos) rotateSecret() {
	ep := c.pick()
	c.mu.Lock()
	busy, old := ep.rotating, ep.secret
	ep.rotating = true
	c.mu.Unlock()
	if busy {
		return
	}
	text, sec := newWebhookSecret(c.t)
	ep.rcv.accept(text, sec)
	if !c.exec(`UPDATE relay.endpoints SET secrets = array_append(secrets, $2), updated_at = now() WHERE id = $1`, ep.id, text) {
		c.mu.Lock()
		ep.rotating = false
		c.mu.Unlock()
		return
	}
	c.later(time.Duration(1000+c.rng.IntN(4000))*time.Millisecond, func() {
		if c.exec(`UPDATE relay.endpoints SET secrets = ARRAY[$2], updated_at = now() WHERE id = $1`, ep.id, text) {
			ep.rcv.retire(old)
		}
		c.mu.Lock()
		ep.secret, ep.rotating = text, false
		c.mu.Unlock()
	})
}

func (c *chaos) changeRateLimit() {
	ep := c.pick()
	limit := []int{5, 20, 100}[c.rng.IntN(3)]
	if !c.exec(`UPDATE relay.endpoints SET rate_limit = $2, rate_burst = $3, updated_at = now() WHERE id = $1`, ep.id, limit, max(1, limit/5)) {
		return
	}
	c.later(time.Duration(2000+c.rng.IntN(6000))*time.Millisecond, func() {
		c.exec(`UPDATE relay.endpoints SET rate_limit = NULL, rate_burst = NULL, updated_at = now() WHERE id = $1`, ep.id)
	})
}

// heal leaves one relay, healthy receivers and enabled, unlimited endpoints.
func (c *chaos) heal() {
	for _, ep := range c.endpoints {
		ep.rcv.restore(-1)
	}
	c.exec(`UPDATE relay.endpoints SET enabled = true, disabled_reason = NULL, rate_limit = NULL, rate_burst = NULL, updated_at = now()
WHERE NOT enabled OR rate_limit IS NOT NULL OR disabled_reason IS NOT NULL`)
	c.relays.setDesired(1)
	c.relays.ensure()
}

// drain waits until every committed event has a delivery row at every
// endpoint it must reach (the check's own rule, so a relay still holding a
// delivery in memory or in flight is waited for) and none is pending or
// retrying, or the timeout passes. A standby-free relay keeps running; one
// that exits is restarted.
func (c *chaos) drain(timeout time.Duration) bool {
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); c.relays.supervise(stop) }()
	defer func() { close(stop); <-done }()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if open, err := c.undrained(); err == nil && open == 0 {
			return true
		}
		time.Sleep(250 * time.Millisecond)
	}
	return false
}

// undrained counts what the relay has still to do: outbox rows without any
// delivery row, (event, endpoint) pairs the check will require but that have
// no row yet, and rows pending or retrying.
func (c *chaos) undrained() (int, error) {
	ctx := context.Background()
	var noRow, open int
	if err := c.pool.QueryRow(ctx, `SELECT
  (SELECT count(*) FROM relay.outbox o WHERE NOT EXISTS (SELECT 1 FROM relay.deliveries d WHERE d.event_id = o.id)),
  (SELECT count(*) FROM relay.deliveries WHERE state IN ('pending', 'retrying'))`).Scan(&noRow, &open); err != nil {
		return 0, err
	}
	rows, err := c.pool.Query(ctx, `SELECT event_id::text, endpoint_id FROM relay.deliveries`)
	if err != nil {
		return 0, err
	}
	has := map[[2]string]bool{}
	for rows.Next() {
		var ev, ep string
		if err := rows.Scan(&ev, &ep); err != nil {
			return 0, err
		}
		has[[2]string{ev, ep}] = true
	}
	if err := rows.Err(); err != nil {
		return 0, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	missing := 0
	for _, ev := range c.events {
		if ev.rolledBack || !ev.committed {
			continue // an ambiguous commit is counted by noRow if it landed
		}
		for _, id := range c.subscribers(ev) {
			if !has[[2]string{ev.id, id}] && !c.disabledDuring(id, ev.began, ev.done) {
				missing++
			}
		}
	}
	return noRow + missing + open, nil
}

// subscribers are the endpoints ev may route to: its named endpoint, or
// every endpoint of its tenant subscribed to its type. c.mu is held.
func (c *chaos) subscribers(ev *chaosEvent) []string {
	if ev.endpoint != "" {
		return []string{ev.endpoint}
	}
	var subs []string
	for _, ep := range c.endpoints {
		if ep.tenant == ev.tenant && ep.subscribes(ev.eventType) {
			subs = append(subs, ep.id)
		}
	}
	return subs
}

// disabledThroughout says whether endpoint ep was disabled from from to
// until: an event that began and committed then is not for it. c.mu is held.
func (c *chaos) disabledThroughout(ep string, from, until time.Time) bool {
	for _, iv := range c.disabled[ep] {
		if iv.sureFrom.Before(from) && iv.sureTo.After(until) {
			return true
		}
	}
	return false
}

// disabledDuring says whether endpoint ep may have been disabled at any
// moment from from to until. From an event's BEGIN to its COMMIT's return:
// the event may then be routed without it (the relay, restarted or not,
// routes with the config of the event's commit). To the drain: a routed
// delivery may be rejected by it. c.mu is held.
func (c *chaos) disabledDuring(ep string, from, until time.Time) bool {
	for _, iv := range c.disabled[ep] {
		if iv.from.Before(until) && iv.to.After(from) {
			return true
		}
	}
	return false
}

type deliveryRow struct {
	eventID, endpointID, state string
	next                       *time.Time
}

func (c *chaos) check(drainStart time.Time) {
	t := c.t
	ctx := context.Background()
	c.relays.setDesired(0)
	c.relays.killAll() // nothing changes rows while they are read

	outbox := map[string]bool{}
	rows, err := c.pool.Query(ctx, `SELECT id::text FROM relay.outbox`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		outbox[id] = true
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	byEvent := map[string][]deliveryRow{}
	states := map[string]int{}
	rows, err = c.pool.Query(ctx, `SELECT event_id::text, endpoint_id, state, next_attempt_at FROM relay.deliveries`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var r deliveryRow
		if err := rows.Scan(&r.eventID, &r.endpointID, &r.state, &r.next); err != nil {
			t.Fatal(err)
		}
		byEvent[r.eventID] = append(byEvent[r.eventID], r)
		states[r.state]++
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	eps := map[string]*chaosEndpoint{}
	for _, ep := range c.endpoints {
		eps[ep.id] = ep
	}
	disabledDuring := func(ep string, from time.Time) bool { return c.disabledDuring(ep, from, drainStart) }

	var (
		committed, rolledBack, ambiguous, ambiguousCommitted int
		lost, missingRoute, misrouted, mixed, wrongRejects   int
		rolledBackFound, notFinal, overdue, unknownRows      int
		routedWhileDisabled                                  int
		examples, suspects                                   []string
	)
	example := func(format string, args ...any) {
		if len(examples) < 20 {
			examples = append(examples, fmt.Sprintf(format, args...))
		}
	}
	known := map[string]*chaosEvent{}     // by event id
	byWebhook := map[string]*chaosEvent{} // by webhook-id
	for _, ev := range c.events {
		known[ev.id] = ev
		byWebhook["msg_"+strings.ReplaceAll(ev.id, "-", "")] = ev
		switch {
		case ev.rolledBack:
			rolledBack++
			if outbox[ev.id] || len(byEvent[ev.id]) > 0 {
				rolledBackFound++
				example("rolled-back event %s is in the outbox or has %d delivery rows", ev.id, len(byEvent[ev.id]))
			}
			continue
		case ev.ambiguous:
			ambiguous++
			if !outbox[ev.id] {
				if len(byEvent[ev.id]) > 0 {
					unknownRows++
					example("event %s (commit failed, not in the outbox) has delivery rows", ev.id)
				}
				continue
			}
			ambiguousCommitted++
		case !outbox[ev.id]:
			lost++
			example("event %s committed but missing from relay.outbox", ev.id)
			continue
		}
		committed++
		got := byEvent[ev.id]
		if len(got) == 0 {
			lost++
			example("event %s (%s %s) has no delivery row", ev.id, ev.tenant, ev.eventType)
			continue
		}
		subs := c.subscribers(ev)
		has := map[string]deliveryRow{}
		for _, r := range got {
			has[r.endpointID] = r
			if r.endpointID != "" && !slices.Contains(subs, r.endpointID) {
				misrouted++
				example("event %s (%s %s) has a row for %s", ev.id, ev.tenant, ev.eventType, r.endpointID)
			}
			if r.endpointID != "" && ev.endpoint == "" && c.disabledThroughout(r.endpointID, ev.began, ev.done) {
				routedWhileDisabled++
				suspects = append(suspects, ev.id)
				example("event %s (%s %s), committed while %s was disabled, was routed to it (%s)", ev.id, ev.tenant, ev.eventType, r.endpointID, r.state)
			}
			switch r.state {
			case "succeeded", "failed", "dead", "rejected", "unrouted":
			case "pending", "retrying":
				notFinal++
				if r.next == nil {
					overdue++
					example("event %s at %q is %s without next_attempt_at", ev.id, r.endpointID, r.state)
				} else if time.Since(*r.next) > 20*time.Second {
					overdue++
					example("event %s at %q is %s, due %s ago", ev.id, r.endpointID, r.state, time.Since(*r.next).Round(time.Second))
				}
			}
			if r.state == "rejected" && r.endpointID != "" && !disabledDuring(r.endpointID, ev.began) {
				wrongRejects++
				example("event %s rejected at %s, which was enabled all along", ev.id, r.endpointID)
			}
		}
		if _, ok := has[""]; ok && len(got) > 1 {
			mixed++
			suspects = append(suspects, ev.id)
			example("event %s is unrouted and routed: %v", ev.id, got)
		}
		canBeUnrouted := ev.endpoint == ""
		for _, id := range subs {
			if _, ok := has[id]; !ok && !c.disabledDuring(id, ev.began, ev.done) {
				missingRoute++
				suspects = append(suspects, ev.id)
				example("event %s (%s %s) has no row for %s, enabled when it committed", ev.id, ev.tenant, ev.eventType, id)
			}
			if !c.disabledDuring(id, ev.began, ev.done) {
				canBeUnrouted = false
			}
		}
		if _, ok := has[""]; ok && !canBeUnrouted {
			misrouted++
			example("event %s (%s %s) unrouted although an endpoint enabled when it committed subscribes", ev.id, ev.tenant, ev.eventType)
		}
	}
	for id := range byEvent {
		if known[id] == nil {
			unknownRows++
			example("delivery rows for an event no producer inserted: %s", id)
		}
	}

	// What the receivers saw.
	var requests, badSigs, oldSigs, rbDelivered, phantom, dups, explained, bySlow int
	acked := map[string]map[string]bool{}
	for _, ep := range c.endpoints {
		r := ep.rcv
		r.mu.Lock()
		requests += r.requests
		badSigs += r.badSigs
		oldSigs += r.oldSigs
		rbDelivered += r.rolledBack
		for _, ex := range r.badExamples {
			example("%s: %s", ep.id, ex)
		}
		acked[ep.id] = map[string]bool{}
		for id, acks := range r.acked {
			acked[ep.id][id] = true
			if ev := byWebhook[id]; ev == nil || ev.rolledBack || !outbox[ev.id] {
				phantom++
				example("%s received %s, which is no committed event", ep.id, id)
			}
			for i := 1; i < len(acks); i++ {
				dups++
				switch {
				case acks[i-1].slow:
					bySlow++
				case c.explains(acks[i-1].at, acks[i].at):
					explained++
				default:
					example("%s: %s acknowledged at %s and again at %s with no fault in between", ep.id, id,
						acks[i-1].at.Format("15:04:05.000"), acks[i].at.Format("15:04:05.000"))
				}
			}
		}
		r.mu.Unlock()
	}
	var succeededNotReceived int
	for id, got := range byEvent {
		for _, r := range got {
			if r.state == "succeeded" && !acked[r.endpointID]["msg_"+strings.ReplaceAll(id, "-", "")] {
				succeededNotReceived++
				example("%s succeeded at %s but the receiver never acknowledged it", id, r.endpointID)
			}
		}
	}

	// Ordered endpoints: the first arrival of each event comes in commit
	// order (commit_lsn, then position in the transaction). Later arrivals
	// of an event are retries or repeats after a kill, and a dead-lettered
	// head is followed by the next event; neither may jump the order,
	// across kills, takeovers and disabled stretches alike (a restarted
	// relay routes what it replays with the config of each event's commit).
	var orderedFirsts, outOfOrder, unplaced int
	for _, ep := range c.endpoints {
		if !ep.ordered {
			continue
		}
		type pos struct{ lsn, seq int64 }
		at := map[string]pos{}
		rows, err := c.pool.Query(ctx, `SELECT 'msg_' || replace(event_id::text, '-', ''), (commit_lsn - '0/0')::int8, COALESCE(event_seq, 0)
FROM relay.deliveries WHERE endpoint_id = $1 AND commit_lsn IS NOT NULL`, ep.id)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var id string
			var p pos
			if err := rows.Scan(&id, &p.lsn, &p.seq); err != nil {
				t.Fatal(err)
			}
			at[id] = p
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		ep.rcv.mu.Lock()
		seen := map[string]bool{}
		var last pos
		var lastID string
		for _, id := range ep.rcv.arrivals {
			if seen[id] {
				continue
			}
			seen[id] = true
			p, ok := at[id]
			if !ok {
				unplaced++
				example("%s received %s, which has no delivery row with a commit position", ep.id, id)
				continue
			}
			orderedFirsts++
			if p.lsn < last.lsn || p.lsn == last.lsn && p.seq < last.seq {
				outOfOrder++
				example("%s: %s (commit %d/%d) first arrived after %s (commit %d/%d)", ep.id, id, p.lsn, p.seq, lastID, last.lsn, last.seq)
				continue
			}
			last, lastID = p, id
		}
		ep.rcv.mu.Unlock()
	}

	// The summary.
	var b strings.Builder
	fmt.Fprintf(&b, "\nchaos summary (seed %d)\n", c.seed)
	fmt.Fprintf(&b, "  %-50s %8d\n", "events committed", committed)
	fmt.Fprintf(&b, "  %-50s %8d\n", "  of which commit errored but row exists", ambiguousCommitted)
	fmt.Fprintf(&b, "  %-50s %8d\n", "bulk transactions committed (200-399 rows)", c.bulk)
	fmt.Fprintf(&b, "  %-50s %8d\n", "events rolled back", rolledBack)
	fmt.Fprintf(&b, "  %-50s %8d\n", "commit errors (outcome read from outbox)", ambiguous)
	kinds := slices.Sorted(func(yield func(string) bool) {
		for k := range c.faults {
			if !yield(k) {
				return
			}
		}
	})
	nFaults := 0
	for _, k := range kinds {
		nFaults += c.faults[k]
		fmt.Fprintf(&b, "  fault: %-43s %8d\n", k, c.faults[k])
	}
	fmt.Fprintf(&b, "  %-50s %8d\n", "faults injected", nFaults)
	fmt.Fprintf(&b, "  %-50s %8d\n", "relay processes started", c.relays.started)
	fmt.Fprintf(&b, "  %-50s %8d\n", "relay exits on their own (restarted)", c.relays.exits)
	for _, s := range []string{"succeeded", "failed", "dead", "rejected", "unrouted", "retrying", "pending"} {
		fmt.Fprintf(&b, "  deliveries %-39s %8d\n", s, states[s])
	}
	fmt.Fprintf(&b, "  %-50s %8d\n", "receiver requests", requests)
	fmt.Fprintf(&b, "  %-50s %8d\n", "lost (no row, or a subscribed endpoint missing)", lost+missingRoute)
	fmt.Fprintf(&b, "  %-50s %8d\n", "routed to an endpoint disabled at its commit", routedWhileDisabled)
	fmt.Fprintf(&b, "  %-50s %8d\n", "duplicates (2xx more than once, per endpoint)", dups)
	fmt.Fprintf(&b, "  %-50s %8d\n", "  explained by a kill/restart/exit window", explained)
	fmt.Fprintf(&b, "  %-50s %8d\n", "  explained by a slow answer (maybe timed out)", bySlow)
	fmt.Fprintf(&b, "  %-50s %8d\n", "  unexplained", dups-explained-bySlow)
	fmt.Fprintf(&b, "  %-50s %8d\n", "kill/restart/exit windows", len(c.windows))
	fmt.Fprintf(&b, "  %-50s %8d\n", "ordered endpoint: events in first-arrival order", orderedFirsts)
	fmt.Fprintf(&b, "  %-50s %8d\n", "  of which out of commit order", outOfOrder)
	fmt.Fprintf(&b, "  %-50s %8d\n", "signed only by a secret removed < grace ago", oldSigs)
	fmt.Fprintf(&b, "  %-50s %8d\n", "SQL statements retried (Postgres down)", c.sqlErrs)
	t.Log(b.String())
	for _, ex := range examples {
		t.Log("  e.g. " + ex)
	}

	c.diagnose(suspects)
	check := func(n int, what string) {
		if n != 0 {
			t.Errorf("chaos: %d %s", n, what)
		}
	}
	check(lost, "committed events lost (no delivery row)")
	check(missingRoute, "(event, endpoint) pairs missing for an endpoint enabled when the event committed")
	check(misrouted, "rows routed where the config did not allow")
	check(routedWhileDisabled, "events routed to an endpoint disabled when they committed")
	check(mixed, "events both unrouted and routed")
	check(wrongRejects, "rejections at an endpoint that was never disabled")
	check(overdue, "pending/retrying rows without a due time or long overdue (stuck)")
	check(rolledBackFound, "rolled-back events with an outbox or delivery row")
	check(rbDelivered, "rolled-back events received")
	check(unknownRows, "delivery rows for events that were never committed")
	check(badSigs, "requests without a valid signature for the endpoint's secrets")
	check(phantom, "receptions of no committed event")
	check(succeededNotReceived, "succeeded rows never acknowledged by their receiver")
	check(dups-explained-bySlow, "duplicates no fault explains")
	check(outOfOrder, "first arrivals at an ordered endpoint out of commit order")
	check(unplaced, "arrivals at an ordered endpoint with no commit position")
	if orderedFirsts == 0 {
		t.Errorf("chaos: the ordered endpoint received nothing")
	}
	if committed == 0 || states["succeeded"] == 0 {
		t.Errorf("chaos: nothing flowed (%d committed, %d succeeded)", committed, states["succeeded"])
	}
	if notFinal > 0 {
		t.Logf("chaos: %d deliveries still pending/retrying with a due time after the drain", notFinal)
	}
}

// diagnose logs what the database holds about events routed wrongly or
// not at all, and when endpoints were disabled.
func (c *chaos) diagnose(ids []string) {
	if len(ids) == 0 {
		return
	}
	for name, iv := range c.disabled {
		for _, d := range iv {
			c.t.Logf("  disabled %s from %s to %s", name, d.from.UTC().Format("15:04:05.000"), d.to.UTC().Format("15:04:05.000"))
		}
	}
	ctx := context.Background()
	var confirmed string
	c.pool.QueryRow(ctx, `SELECT coalesce(string_agg(slot_name || ' ' || confirmed_flush_lsn::text, ', '), 'none') FROM pg_replication_slots`).Scan(&confirmed)
	c.t.Logf("  slots confirmed up to: %s (an event committed past this was not yet acknowledged)", confirmed)
	for i, id := range ids {
		if i == 5 {
			break
		}
		ev := c.eventByID(id)
		webhookID := "msg_" + strings.ReplaceAll(id, "-", "")
		for _, ep := range c.endpoints {
			ep.rcv.mu.Lock()
			if acks := ep.rcv.acked[webhookID]; len(acks) > 0 {
				c.t.Logf("  event %s acknowledged by %s's receiver %d times, first at %s", id, ep.id, len(acks), acks[0].at.UTC().Format("15:04:05.000"))
			}
			ep.rcv.mu.Unlock()
		}
		var created time.Time
		c.pool.QueryRow(ctx, `SELECT created_at FROM relay.outbox WHERE id = $1`, id).Scan(&created)
		c.t.Logf("  event %s %s %s target %q began %s created_at %s", id, ev.tenant, ev.eventType, ev.endpoint,
			ev.began.UTC().Format("15:04:05.000"), created.UTC().Format("15:04:05.000"))
		rows, err := c.pool.Query(ctx, `SELECT endpoint_id, state, coalesce(error, ''), commit_lsn::text, committed_at, created_at FROM relay.deliveries WHERE event_id = $1`, id)
		if err != nil {
			c.t.Log(err)
			continue
		}
		for rows.Next() {
			var ep, state, errText, lsn string
			var committed, rowCreated time.Time
			rows.Scan(&ep, &state, &errText, &lsn, &committed, &rowCreated)
			c.t.Logf("    row %q %s %q commit_lsn %s committed_at %s row created %s", ep, state, errText, lsn,
				committed.UTC().Format("15:04:05.000"), rowCreated.UTC().Format("15:04:05.000"))
		}
		rows.Close()
	}
}

func (c *chaos) eventByID(id string) *chaosEvent {
	for _, ev := range c.events {
		if ev.id == id {
			return ev
		}
	}
	return nil
}

// explains reports whether a kill, Postgres restart or relay exit could have
// repeated a delivery first acknowledged at first and again at second.
func (c *chaos) explains(first, second time.Time) bool {
	for _, w := range c.windows {
		if first.Before(w.to.Add(chaosSlack)) && w.from.Before(second) {
			return true
		}
	}
	return false
}

// relaySupervisor runs the relay processes: it restarts any that exit on
// their own (a relay that loses its lock across a Postgres restart exits so
// its supervisor starts it again) and keeps the desired number running.
type relaySupervisor struct {
	c       *chaos
	mu      sync.Mutex
	procs   []*supervised
	desired int
	started int
	exits   int
}

type supervised struct {
	p    *relayProc
	addr string
}

func (s *relaySupervisor) setDesired(n int) {
	s.mu.Lock()
	s.desired = n
	s.mu.Unlock()
}

func (s *relaySupervisor) running() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.procs)
}

func exited(p *relayProc) bool {
	select {
	case err := <-p.done:
		p.done <- err // for kill9 and the cleanup
		return true
	default:
		return false
	}
}

// ensure reaps exited relays and starts or kills some to reach desired.
func (s *relaySupervisor) ensure() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reap()
	for len(s.procs) < s.desired {
		addr := freeAddr(s.c.t)
		p := startRelay(s.c.t, relayArgs(s.c.url, "--http-addr", addr,
			"--retry-schedule", "0s,200ms,500ms,1s,2s,2s,2s,2s,2s,2s", "--poll-interval", "100ms", "--shutdown-grace", "2s",
			"--stream-batch-bytes", "32768")...)
		s.procs = append(s.procs, &supervised{p, addr})
		s.started++
	}
	for len(s.procs) > s.desired {
		// Prefer to stop a standby: fewer duplicates than a takeover.
		i := len(s.procs) - 1
		for j, sp := range s.procs {
			if code, body := readyz(sp.addr); code == 200 && strings.HasPrefix(body, "standby") {
				i = j
				break
			}
		}
		sent := time.Now()
		s.procs[i].p.kill9()
		s.c.window("kill", sent, time.Now())
		s.procs = slices.Delete(s.procs, i, i+1)
	}
}

func (s *relaySupervisor) reap() {
	s.procs = slices.DeleteFunc(s.procs, func(sp *supervised) bool {
		if !exited(sp.p) {
			return false
		}
		s.exits++
		now := time.Now()
		s.c.window("relay exit", now.Add(-time.Second), now)
		out := sp.p.output()
		if len(out) > 1500 {
			out = out[len(out)-1500:]
		}
		s.c.logf("a relay exited on its own (%v); restarting it. Its last output:\n%s", sp.p.cmd.ProcessState, out)
		return true
	})
}

func (s *relaySupervisor) supervise(stop <-chan struct{}) {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
			s.ensure()
		}
	}
}

func (s *relaySupervisor) killAll() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.procs)
	for _, sp := range s.procs {
		sp.p.kill9()
	}
	s.procs = nil
	return n
}

// states counts relays that stream and that stand by.
func (s *relaySupervisor) states() (active, standby int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sp := range s.procs {
		code, body := readyz(sp.addr)
		switch {
		case code == 200 && body == "streaming":
			active++
		case code == 200 && strings.HasPrefix(body, "standby"):
			standby++
		}
	}
	return active, standby
}

// waitStates waits until ok(active, standby) holds, keeping the desired
// number of relays running.
func (s *relaySupervisor) waitStates(timeout time.Duration, ok func(active, standby int) bool) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		s.ensure()
		if ok(s.states()) {
			return true
		}
		time.Sleep(100 * time.Millisecond)
	}
	return false
}

func (s *relaySupervisor) killActive() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, sp := range s.procs {
		if code, body := readyz(sp.addr); code == 200 && body == "streaming" {
			sp.p.kill9()
			s.procs = slices.Delete(s.procs, i, i+1)
			return true
		}
	}
	return false
}

// chaosReceiver verifies every request against the secrets its endpoint has
// (or had until chaosGrace ago), records what it acknowledged with a 2xx, and
// misbehaves on demand.
type rcvMode int

const (
	modeHealthy rcvMode = iota
	mode5xx
	modeHang
	modeReset
	modeSlow
)

type rcvSecret struct {
	text    string // only to match a retire call; never logged
	sec     signer.Secret
	retired time.Time
}

type ack struct {
	at   time.Time
	slow bool // answered after a deliberate delay: the relay may have timed out first
}

type chaosReceiver struct {
	srv *httptest.Server
	id  string

	mu          sync.Mutex
	mode        rcvMode
	gen         int
	secrets     []*rcvSecret
	requests    int
	badSigs     int
	oldSigs     int
	rolledBack  int
	badExamples []string
	acked       map[string][]ack
	arrivals    []string // webhook-ids in the order their requests arrived
	hangs       atomic.Int64
}

func newChaosReceiver(t *testing.T, id, text string, sec signer.Secret) *chaosReceiver {
	r := &chaosReceiver{id: id, acked: map[string][]ack{}}
	r.secrets = []*rcvSecret{{text: text, sec: sec}}
	r.srv = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *chaosReceiver) serve(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		return // the relay gave up mid-body
	}
	now := time.Now()
	id := req.Header.Get("webhook-id")
	var tag struct {
		RB bool `json:"rb"`
	}
	json.Unmarshal(body, &tag)

	r.mu.Lock()
	r.requests++
	r.arrivals = append(r.arrivals, id)
	valid, onlyOld := false, false
	for _, s := range r.secrets {
		if !s.retired.IsZero() && now.Sub(s.retired) > chaosGrace {
			continue
		}
		if signer.Verify(s.sec, req.Header, body, now, 0) == nil {
			valid, onlyOld = true, !s.retired.IsZero()
			if !onlyOld {
				break
			}
		}
	}
	if !valid {
		r.badSigs++
		if len(r.badExamples) < 5 {
			var verr error
			for _, s := range r.secrets {
				verr = errors.Join(verr, signer.Verify(s.sec, req.Header, body, now, 0))
			}
			r.badExamples = append(r.badExamples, fmt.Sprintf("bad signature on %s: %v", id, verr))
		}
	} else if onlyOld {
		r.oldSigs++
	}
	if tag.RB {
		r.rolledBack++
	}
	mode := r.mode
	r.mu.Unlock()

	slow := false
	switch mode {
	case mode5xx:
		w.WriteHeader([]int{500, 502, 503}[mrand.IntN(3)])
		return
	case modeHang:
		// Past the endpoint's timeout; the relay hangs up first.
		r.hangs.Add(1)
		select {
		case <-req.Context().Done():
		case <-time.After(3 * chaosTimeoutMS * time.Millisecond):
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	case modeReset:
		conn, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetLinger(0) // RST, not FIN
		}
		conn.Close()
		return
	case modeSlow:
		d := time.Duration(100+mrand.IntN(250)) * time.Millisecond // under the timeout
		select {
		case <-req.Context().Done():
			return
		case <-time.After(d):
		}
		slow = true
	}
	r.mu.Lock()
	r.acked[id] = append(r.acked[id], ack{time.Now(), slow})
	r.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// setMode starts a misbehaviour and returns its generation for restore.
func (r *chaosReceiver) setMode(m rcvMode) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.mode = m
	r.gen++
	return r.gen
}

// restore makes the receiver healthy unless a later fault took it over;
// gen -1 restores unconditionally.
func (r *chaosReceiver) restore(gen int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if gen == -1 || gen == r.gen {
		r.mode = modeHealthy
	}
}

func (r *chaosReceiver) accept(text string, sec signer.Secret) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.secrets = append(r.secrets, &rcvSecret{text: text, sec: sec})
}

// retire stops accepting a secret chaosGrace from now.
func (r *chaosReceiver) retire(text string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.secrets {
		if s.text == text && s.retired.IsZero() {
			s.retired = time.Now()
		}
	}
}

var readyzClient = &http.Client{Timeout: time.Second}

// readyz is get(addr, "/readyz") with a timeout: a wedged relay must not
// wedge the supervisor.
func readyz(addr string) (int, string) {
	resp, err := readyzClient.Get("http://" + addr + "/readyz")
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}
