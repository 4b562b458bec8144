package relay

import (
	"fmt"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/sony/gobreaker/v2"
)

func queued(s *scheduler, tenant, endpoint string, n int) {
	ep := &Endpoint{ID: endpoint, TenantID: tenant, Enabled: true}
	ds := make([]*delivery, n)
	for i := range ds {
		ds[i] = &delivery{endpointID: endpoint, tenantID: tenant, ep: ep}
	}
	s.push(ds, false)
}

// A tenant with a huge backlog gets no more turns than a tenant with a
// trickle: picks alternate between tenants.
func TestSchedulerRoundRobinAcrossTenants(t *testing.T) {
	s := newScheduler(1_000_000, 1<<40, 1000)
	queued(s, "big", "big-ep", 10000)
	queued(s, "small", "small-ep", 10)
	var order []string
	for range 20 {
		d := s.pickLocked()
		order = append(order, d.tenantID)
		s.done(d)
	}
	small := 0
	for _, tn := range order[:20] {
		if tn == "small" {
			small++
		}
	}
	if small != 10 {
		t.Fatalf("small tenant got %d of the first 20 picks, want 10: %v", small, order)
	}
}

func TestSchedulerWeights(t *testing.T) {
	s := newScheduler(1_000_000, 1<<40, 1000)
	s.setTenantWeight("gold", 3)
	queued(s, "gold", "g", 1000)
	queued(s, "plain", "p", 1000)
	counts := map[string]int{}
	for range 400 {
		d := s.pickLocked()
		counts[d.tenantID]++
		s.done(d)
	}
	if counts["gold"] != 300 || counts["plain"] != 100 {
		t.Fatalf("weights 3:1 gave %v", counts)
	}
}

// An endpoint at its in-flight limit does not block its tenant's other
// endpoints, nor other tenants.
func TestSchedulerMaxInFlight(t *testing.T) {
	s := newScheduler(1_000_000, 1<<40, 2)
	queued(s, "a", "slow", 100)
	queued(s, "a", "fast", 100)
	var held []*delivery
	got := map[string]int{}
	for range 10 {
		d := s.pickLocked()
		if d == nil {
			break
		}
		got[d.endpointID]++
		held = append(held, d)
	}
	if got["slow"] != 2 || got["fast"] != 2 {
		t.Fatalf("with max in-flight 2 and nothing done, picks = %v", got)
	}
	s.done(held[0])
	if d := s.pickLocked(); d == nil || d.endpointID != held[0].endpointID {
		t.Fatalf("after one done, next pick = %v", d)
	}
}

func TestSchedulerBounds(t *testing.T) {
	s := newScheduler(10, 1<<40, 100)
	ep := &Endpoint{ID: "e", TenantID: "t"}
	var ds []*delivery
	for i := range 15 {
		ds = append(ds, &delivery{endpointID: "e", tenantID: "t", ep: ep, errText: fmt.Sprint(i)})
	}
	rest := s.push(ds, true)
	if len(rest) != 5 || rest[0].errText != "10" {
		t.Fatalf("push past the bound returned %d left over", len(rest))
	}
	if n, _ := s.len(); n != 10 {
		t.Fatalf("queued %d, want 10", n)
	}
	if s.space() != 0 || s.hasRoom(1) {
		t.Fatal("full scheduler reports room")
	}
}

// A burst for one endpoint reaches every idle worker, not just the first
// one woken: workers that hold their delivery (never call done) must still
// all get one.
func TestSchedulerWakesEnoughWorkers(t *testing.T) {
	s := newScheduler(1000, 1<<40, 100)
	got := make(chan *delivery, 4)
	for range 4 {
		go func() { got <- s.next() }()
	}
	for s.idleWorkers() < 4 {
		runtime.Gosched()
	}
	queued(s, "t", "e", 10)
	deadline := time.After(5 * time.Second)
	for i := range 4 {
		select {
		case d := <-got:
			if d == nil {
				t.Fatal("nil delivery")
			}
		case <-deadline:
			t.Fatalf("only %d of 4 idle workers got work from a burst of 10", i)
		}
	}
	s.close()
}

// An ordered endpoint's lane hands out one delivery at a time, in the
// order loaded, whatever max_in_flight says; a retryable failure drops
// what is behind the head and the lane waits for the head's time.
func TestSchedulerLaneOneAtATime(t *testing.T) {
	s := newScheduler(1000, 1<<40, 64)
	now := time.Unix(1000, 0)
	s.now = func() time.Time { return now }
	ep := &Endpoint{ID: "ord", TenantID: "t", Enabled: true, Ordered: true, MaxInFlight: 64}
	s.setEndpoint(ep)
	if loads, _ := s.lanesToLoad(now); len(loads.ids) != 0 {
		t.Fatalf("lanes load before openLanes: %v", loads.ids)
	}
	s.openLanes()
	loads, _ := s.lanesToLoad(now)
	if !slices.Equal(loads.ids, []string{"ord"}) || loads.sizes[0] != laneBatch {
		t.Fatalf("lanesToLoad = %v %v", loads.ids, loads.sizes)
	}
	if again, _ := s.lanesToLoad(now); len(again.ids) != 0 {
		t.Fatalf("a loading lane is offered again: %v", again.ids)
	}
	var rows []*delivery
	for i := range 5 {
		rows = append(rows, &delivery{endpointID: "ord", tenantID: "t", eventSeq: int32(i), persisted: true, nextAttempt: now})
	}
	s.laneLoaded(loads, rows, now)
	d := s.pickLocked()
	if d == nil || d.eventSeq != 0 {
		t.Fatalf("first pick = %+v", d)
	}
	if other := s.pickLocked(); other != nil {
		t.Fatalf("a second delivery (%d) was handed out while the head is in flight", other.eventSeq)
	}
	if !s.done(d) {
		t.Fatal("done of an ordered delivery does not defer to finish")
	}
	if other := s.pickLocked(); other != nil {
		t.Fatal("next handed out before finish")
	}
	d.state = StateSucceeded
	s.finish(d)
	d = s.pickLocked()
	if d == nil || d.eventSeq != 1 {
		t.Fatalf("after the head succeeded, pick = %+v", d)
	}
	// The new head fails and retries in a minute: the rest leaves memory.
	s.done(d)
	d.state, d.nextAttempt = StateRetrying, now.Add(time.Minute)
	s.finish(d)
	if n, _ := s.len(); n != 0 {
		t.Fatalf("%d deliveries stay in memory behind a retrying head", n)
	}
	if loads, next := s.lanesToLoad(now); len(loads.ids) != 0 || !next.Equal(now.Add(time.Minute)) {
		t.Fatalf("lanesToLoad while the head waits = %v, next %s", loads.ids, next)
	}
	due, _ := s.lanesToLoad(now.Add(time.Minute))
	if !slices.Equal(due.ids, []string{"ord"}) {
		t.Fatalf("lane not offered when its head is due: %v", due.ids)
	}
	// A load for a lane that was turned off and on meanwhile is dropped:
	// the new lane may have older rows.
	s.setEndpoint(&Endpoint{ID: "ord", TenantID: "t", Enabled: true})
	s.setEndpoint(ep)
	s.laneLoaded(due, []*delivery{{endpointID: "ord", tenantID: "t", persisted: true, nextAttempt: now}}, now.Add(time.Minute))
	if n, _ := s.len(); n != 0 {
		t.Fatalf("a stale load was queued for a new lane")
	}
	// A loaded row pushed to the lane by another way is not queued.
	s.push([]*delivery{{endpointID: "ord", tenantID: "t", ep: ep, persisted: true}}, false)
	if n, _ := s.len(); n != 0 {
		t.Fatalf("a loaded row pushed to an ordered endpoint was queued")
	}
	if loads, _ := s.lanesToLoad(now.Add(time.Minute)); !slices.Equal(loads.ids, []string{"ord"}) {
		t.Fatalf("the new lane is not offered: %v", loads.ids)
	}
}

// A tenant at its in-flight bound gets no more workers, whichever of its
// endpoints has work, while other tenants still do; a done attempt gives
// it its turn back.
func TestSchedulerTenantMaxInFlight(t *testing.T) {
	s := newScheduler(1_000_000, 1<<40, 1000)
	s.tenantMaxInFlight = 3
	queued(s, "slow", "slow-1", 100)
	queued(s, "slow", "slow-2", 100)
	var held []*delivery
	for range 10 {
		d := s.pickLocked()
		if d == nil {
			break
		}
		held = append(held, d)
	}
	if len(held) != 3 {
		t.Fatalf("tenant bound 3: %d picks with nothing done", len(held))
	}
	queued(s, "other", "o", 5)
	for i := range 5 {
		d := s.pickLocked()
		if d == nil || d.tenantID != "other" {
			t.Fatalf("pick %d with slow at its bound = %+v, want other's", i, d)
		}
		s.done(d)
	}
	if d := s.pickLocked(); d != nil {
		t.Fatalf("slow at its bound and other empty, yet picked %s", d.tenantID)
	}
	s.done(held[0])
	d := s.pickLocked()
	if d == nil || d.tenantID != "slow" {
		t.Fatalf("after one of slow's attempts is done, pick = %+v, want slow's", d)
	}
	if s.pickLocked() != nil {
		t.Fatal("slow is at its bound again, yet got a fourth slot")
	}
	for _, d := range append(held[1:], d) {
		s.done(d)
	}
	if n := s.tenants["slow"].inFlight; n != 0 {
		t.Fatalf("slow's in-flight count is %d after every attempt is done", n)
	}
}

// When the queues are full, only an endpoint that holds far more than the
// others spills; a backlog spread evenly waits for room, since spilling
// it would write it twice for nothing; force spills whatever is over its
// share.
func TestSchedulerPushShareSpillsOnlyTheHeavy(t *testing.T) {
	batch := func(tenant, endpoint string, n int) []*delivery {
		ep := &Endpoint{ID: endpoint, TenantID: tenant, Enabled: true}
		ds := make([]*delivery, n)
		for i := range ds {
			ds[i] = &delivery{endpointID: endpoint, tenantID: tenant, ep: ep}
		}
		return ds
	}
	// Even: 100 endpoints with 10 each fill a queue of 1,000.
	s := newScheduler(1000, 1<<40, 1000)
	for i := range 100 {
		if rest := s.push(batch("t", fmt.Sprint("e", i), 10), true); len(rest) != 0 {
			t.Fatalf("setup: %d did not fit", len(rest))
		}
	}
	spill, wait := s.pushShare(batch("t", "e7", 5), 100, false)
	if len(spill) != 0 || len(wait) != 5 {
		t.Fatalf("even backlog: %d spilled, %d wait; want 0 and 5", len(spill), len(wait))
	}
	if spill, wait = s.pushShare(batch("t", "e7", 5), 100, true); len(spill) != 5 || len(wait) != 0 {
		t.Fatalf("even backlog, forced: %d spilled, %d wait; want 5 and 0", len(spill), len(wait))
	}
	// Heavy: one endpoint holds 990, another 10.
	s = newScheduler(1000, 1<<40, 1000)
	s.push(batch("a", "slow", 990), true)
	s.push(batch("b", "fast", 10), true)
	spill, wait = s.pushShare(append(batch("a", "slow", 20), batch("b", "fast", 3)...), 2, false)
	if len(spill) != 20 || len(wait) != 0 {
		t.Fatalf("heavy endpoint: %d spilled, %d wait; want 20 and 0", len(spill), len(wait))
	}
	if n := s.endpoints["fast"].items.len(); n != 13 {
		t.Fatalf("the light endpoint's deliveries were not queued: it holds %d, want 13", n)
	}
}

// A fresh delivery for an ordered endpoint that reaches push or pushShare
// (the queue full) becomes a pending row for its lane, never a queued one.
func TestSchedulerPushSendsOrderedToTheLane(t *testing.T) {
	s := newScheduler(2, 1<<40, 64)
	s.now = func() time.Time { return time.Unix(1000, 0) }
	var rows []*delivery
	s.toRows = func(ds []*delivery) { rows = append(rows, ds...) }
	ord := &Endpoint{ID: "ord", TenantID: "t", Enabled: true, Ordered: true}
	s.setEndpoint(ord)
	plain := &Endpoint{ID: "plain", TenantID: "t", Enabled: true}
	fill := []*delivery{{endpointID: "plain", tenantID: "t", ep: plain}, {endpointID: "plain", tenantID: "t", ep: plain}}
	if rest := s.push(fill, true); len(rest) != 0 {
		t.Fatalf("setup: %d did not fit", len(rest))
	}
	fresh := func() []*delivery { return []*delivery{{endpointID: "ord", tenantID: "t", ep: ord}} }
	s.push(fresh(), false)
	spill, wait := s.pushShare(fresh(), 2, false)
	if len(spill) != 0 || len(wait) != 0 {
		t.Fatalf("pushShare returned %d to spill and %d to wait for an ordered endpoint; want none", len(spill), len(wait))
	}
	if n := s.endpoints["ord"].items.len(); n != 0 {
		t.Fatalf("the ordered endpoint's queue holds %d deliveries in memory, want 0", n)
	}
	if len(rows) != 2 || rows[0].state != StatePending || rows[1].state != StatePending {
		t.Fatalf("lane rows written: %d, want 2 pending", len(rows))
	}
}

// The loader leaves an endpoint with an open circuit alone while it has a
// delivery in memory (the probe) or the cooldown runs; then it is listed
// for one probe row. Only tripped endpoints are looked at.
func TestSchedulerLoadExcludesTrippedEndpoints(t *testing.T) {
	s := newScheduler(1000, 1<<40, 10)
	s.breakerChanged = func(string, gobreaker.State, gobreaker.State) {}
	push := func(id string, n int) {
		ep := &Endpoint{ID: id, TenantID: "t", Enabled: true, BreakerFailures: 1, BreakerCooldown: time.Minute}
		ds := make([]*delivery, n)
		for i := range ds {
			ds[i] = &delivery{endpointID: id, tenantID: "t", ep: ep}
		}
		s.push(ds, false)
	}
	push("dead", 2)
	push("fine", 2)
	if ex, probes := s.loadExcluded(time.Now()); len(ex) != 0 || len(probes) != 0 {
		t.Fatalf("nothing tripped, yet excluded %v, probes %v", ex, probes)
	}
	for {
		d := s.pickLocked()
		if d.endpointID == "dead" {
			d.breakerDone(errAttemptFailed)
			d.breakerDone = nil
			s.done(d)
			break
		}
		d.breakerDone(nil)
		s.done(d)
	}
	if ex, probes := s.loadExcluded(time.Now()); !slices.Equal(ex, []string{"dead"}) || len(probes) != 0 {
		t.Fatalf("open circuit with its probe queued: excluded %v, probes %v; want [dead] and none", ex, probes)
	}
	// The queued delivery leaves memory (as an eviction would take it).
	s.mu.Lock()
	s.popLocked(s.endpoints["dead"])
	s.mu.Unlock()
	if ex, probes := s.loadExcluded(time.Now()); !slices.Equal(ex, []string{"dead"}) || len(probes) != 0 {
		t.Fatalf("open circuit in its cooldown: excluded %v, probes %v; want [dead] and none", ex, probes)
	}
	if ex, probes := s.loadExcluded(time.Now().Add(2 * time.Minute)); len(ex) != 0 || !slices.Equal(probes, []string{"dead"}) {
		t.Fatalf("cooldown over, nothing in memory: excluded %v, probes %v; want none and [dead] (one loaded row is the probe)", ex, probes)
	}
}

// Past its share, a heavy endpoint's fresh deliveries are held without
// payload up to maxHeld, then spilled; later ones queue behind the held
// ones. Held deliveries keep their transaction's mark (the watermark waits
// for them) and come back in order, with their identity, when filled;
// aged ones and those of a disabled endpoint leave as pending rows.
func TestSchedulerHoldsTheHeavyExcess(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newScheduler(100, 1<<40, 1000)
	s.now = func() time.Time { return now }
	s.maxHeld = 30
	var evicted []*delivery
	s.evicted = func(ds []*delivery, _ time.Time) { evicted = append(evicted, ds...) }
	slow := &Endpoint{ID: "slow", TenantID: "a", Enabled: true}
	mark := &txnMark{}
	fresh := func(i int) *delivery {
		mark.remaining.Add(1)
		return &delivery{eventID: [16]byte{byte(i)}, endpointID: "slow", tenantID: "a", eventType: "x", ep: slow,
			payload: []byte(`{}`), mark: mark, eventSeq: int32(i), committedAt: time.Unix(900, int64(i))}
	}
	var ds []*delivery
	for i := range 140 {
		ds = append(ds, fresh(i))
	}
	s.push(ds[:95], true)
	s.push([]*delivery{{endpointID: "fast", tenantID: "b", ep: &Endpoint{ID: "fast", TenantID: "b", Enabled: true}, payload: []byte(`{}`)}}, true)
	spill, wait := s.pushShare(ds[95:], 2, false)
	if held, _ := s.heldCount(); held != 30 || len(spill) != 15 || len(wait) != 0 {
		t.Fatalf("held %d, spilled %d, wait %d; want 30 held (the bound), 15 spilled, 0 waiting", held, len(spill), len(wait))
	}
	if got := mark.remaining.Load(); got != 140 {
		t.Fatalf("the transaction's mark counts %d pending, want all 140: holding must not let the watermark pass", got)
	}
	// Room for 20: the filler takes the first held, in order.
	for range 20 {
		s.popLocked(s.endpoints["slow"])
	}
	got, qs := s.takeHeld(1000)
	if len(got) == 0 || len(got) != len(qs) {
		t.Fatalf("took %d held deliveries (%d queues)", len(got), len(qs))
	}
	for i, d := range got {
		want := ds[95+i]
		if d.eventID != want.eventID || d.eventSeq != want.eventSeq || d.mark != mark || d.payload != nil ||
			!d.committedAt.Equal(want.committedAt) || d.endpointID != "slow" || d.tenantID != "a" || d.eventType != "x" {
			t.Fatalf("held delivery %d came back as %+v", i, d)
		}
		d.payload = []byte(`{}`)
	}
	before := s.endpoints["slow"].items.len()
	if rows := s.acceptFilled(got, qs); len(rows) != 0 {
		t.Fatalf("%d filled deliveries turned into rows for a usable endpoint", len(rows))
	}
	if after := s.endpoints["slow"].items.len(); after != before+len(got) {
		t.Fatalf("queue went from %d to %d after filling %d", before, after, len(got))
	}
	// Aged: everything held now was held at 1000 s.
	now = now.Add(time.Minute)
	if aged := s.takeAged(30 * time.Second); len(aged) != 30-len(got) {
		t.Fatalf("%d aged, want the %d still held", len(aged), 30-len(got))
	}
	// Disabled: what is held again leaves as pending rows.
	s.pushShare([]*delivery{fresh(200), fresh(201)}, 2, true)
	if held, _ := s.heldCount(); held != 2 {
		t.Fatalf("held %d after two more, want 2", held)
	}
	s.setEndpoint(&Endpoint{ID: "slow", TenantID: "a", Enabled: false})
	if held, _ := s.heldCount(); held != 0 || len(evicted) != 2 || evicted[0].eventSeq != 200 {
		t.Fatalf("after disabling: held %d, evicted %d; want 0 and the 2 held", held, len(evicted))
	}
}

// Held deliveries taken for a fill whose payload read failed go back to
// the front of their list, in order, still counted and still marked.
func TestSchedulerUntakeRestoresTheHeldOrder(t *testing.T) {
	s := newScheduler(10, 1<<40, 1000)
	s.maxHeld = 100
	s.evicted = func([]*delivery, time.Time) { t.Error("nothing is spilled here") }
	now := time.Unix(1000, 0)
	s.now = func() time.Time { return now }
	ep := &Endpoint{ID: "slow", TenantID: "a", Enabled: true}
	mark := &txnMark{}
	q := &endpointQueue{ep: ep, tenant: s.tenantLocked("a"), parkIdx: -1}
	s.endpoints["slow"] = q
	for i := range 30 {
		mark.remaining.Add(1)
		if !s.holdLocked(q, &delivery{eventID: [16]byte{byte(i)}, endpointID: "slow", tenantID: "a", ep: ep, payload: []byte(`{}`), mark: mark, eventSeq: int32(i)}) {
			t.Fatalf("delivery %d not held", i)
		}
	}
	ds, qs := s.takeHeld(1000)
	if len(ds) != 10 {
		t.Fatalf("took %d, want 10 (the queue's room)", len(ds))
	}
	if s.filling != 10 || q.filling != 10 {
		t.Fatalf("filling %d / %d after the take, want 10", s.filling, q.filling)
	}
	now = now.Add(time.Hour)
	s.untake(ds, qs)
	if held, _ := s.heldCount(); held != 30 || s.filling != 0 || q.filling != 0 {
		t.Fatalf("after untake: held %d, filling %d / %d; want 30, 0, 0", held, s.filling, q.filling)
	}
	for i := range 30 {
		h := q.held.pop()
		if h.eventSeq != int32(i) || h.mark != mark {
			t.Fatalf("held %d is event %d (mark kept: %v), want %d in order", i, h.eventSeq, h.mark == mark, i)
		}
		if h.heldAt != time.Unix(1000, 0).UnixNano() {
			t.Fatalf("held %d: held at %v after untake, want the 1000 s of those behind it (oldest first for takeAged)", i, time.Unix(0, h.heldAt))
		}
	}
}

// underShare tells the endpoint that fills the queues from the others:
// with a bound of 100 over two queued endpoints (a share of 50 each), a
// delivery of the one holding 90 is not under its share, one of the one
// holding 5 is, and so is one of an endpoint with nothing queued (a share
// of 33 over three).
func TestUnderShare(t *testing.T) {
	s := newScheduler(100, 1<<40, 1000)
	queued(s, "tu", "u", 90)
	queued(s, "tl", "l", 5)
	d := func(endpoint string) []*delivery { return []*delivery{{endpointID: endpoint}} }
	if s.underShare(d("u")) {
		t.Error("the endpoint holding 90 of 100 is under its share")
	}
	if !s.underShare(d("l")) {
		t.Error("the endpoint holding 5 of 100 is not under its share")
	}
	if !s.underShare(d("new")) {
		t.Error("an endpoint with nothing queued is not under its share")
	}
	if !s.underShare(append(d("u"), d("new")...)) {
		t.Error("a batch with one delivery under its share is not")
	}

	// Alone, an endpoint is never under its share, however little short
	// of the bound its queue is (workers take from it all the time).
	lone := newScheduler(100, 1<<40, 1000)
	queued(lone, "tu", "u", 98)
	if lone.underShare(d("u")) {
		t.Error("the only endpoint queued, 98 of 100, is under its share")
	}
	if !lone.underShare(d("new")) {
		t.Error("an endpoint with nothing queued, beside a lone backlog, is not under its share")
	}
}
