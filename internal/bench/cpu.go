package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/relay"
)

// CPUSplit says where the machine's CPU went over a phase, in µs per
// event: the relay process, the bench's Postgres cluster (every server
// process, the walsender also on its own), and this process (receiver,
// producers, bare client, polling peer). Available is the wall time
// times the cores, per event: what the phase could have used.
type CPUSplit struct {
	Relay     float64 `json:"relay_us"`
	Postgres  float64 `json:"postgres_us"`
	Walsender float64 `json:"walsender_us"`
	// Autovacuum is the autovacuum workers' share of Postgres (those
	// alive at the end of the phase), and Background the checkpointer's,
	// background writer's and WAL writer's.
	Autovacuum float64 `json:"autovacuum_us"`
	Background float64 `json:"background_us"`
	// RelaySQL is the live backends serving the relay's own SQL (status
	// rows, claims, loads: application_name outbox-relay), Clients the
	// other live client backends (the producers, the peer).
	RelaySQL  float64 `json:"relay_sql_us"`
	Clients   float64 `json:"clients_us"`
	Bench     float64 `json:"bench_us"`
	Available float64 `json:"available_us"`
}

// Total is what the three processes used, per event.
func (s *CPUSplit) Total() float64 { return s.Relay + s.Postgres + s.Bench }

// cpuSnap is one reading of the cumulative CPU times behind CPUSplit.
type cpuSnap struct {
	at                          time.Time
	relay, pg, walsender, bench time.Duration
	autovacuum, background      time.Duration
	relaySQL, clients           time.Duration
	relayPID                    int
	relayOK, pgOK               bool
}

// cpuNow reads the CPU used so far by the relay (if one runs), the
// cluster's processes and this process. A part it cannot read is left
// out and reported as zero.
func (r *run) cpuNow() cpuSnap {
	s := cpuSnap{at: time.Now()}
	if st, err := readStat(os.Getpid()); err == nil {
		s.bench = st.cpu
	}
	if r.relay != nil {
		if cpu, err := r.relay.cpu(); err == nil {
			s.relay, s.relayPID, s.relayOK = cpu, r.relay.pid(), true
		}
	}
	if r.cluster != nil {
		if pid, err := r.cluster.ServerPID(); err == nil {
			if sc, err := serverCPU(pid, r.relayBackends()); err == nil {
				s.pg, s.walsender, s.autovacuum, s.background, s.pgOK = sc.all, sc.walsender, sc.autovacuum, sc.background, true
				s.relaySQL, s.clients = sc.relaySQL, sc.clients
			}
		}
	}
	return s
}

// split turns two readings into µs per event over n events. A relay
// started between the readings counts whole.
func split(a, b cpuSnap, n int) *CPUSplit {
	per := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 / float64(max(1, n)) }
	s := &CPUSplit{
		Bench:     per(b.bench - a.bench),
		Available: per(b.at.Sub(a.at) * time.Duration(runtime.NumCPU())),
	}
	if b.relayOK {
		if a.relayOK && a.relayPID == b.relayPID {
			s.Relay = per(b.relay - a.relay)
		} else {
			s.Relay = per(b.relay)
		}
	}
	if a.pgOK && b.pgOK {
		s.Postgres, s.Walsender = per(b.pg-a.pg), per(b.walsender-a.walsender)
		// Workers that ended within the phase are in Postgres only; one
		// that started within it counts whole (it did nothing before).
		s.Autovacuum, s.Background = per(max(0, b.autovacuum-a.autovacuum)), per(max(0, b.background-a.background))
		s.RelaySQL, s.Clients = per(max(0, b.relaySQL-a.relaySQL)), per(max(0, b.clients-a.clients))
	}
	return s
}

// procStat is what the CPU accounting needs of /proc/<pid>/stat.
type procStat struct {
	ppid     int
	cpu      time.Duration // utime + stime
	children time.Duration // cutime + cstime: exited children it reaped
}

func readStat(pid int) (procStat, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return procStat{}, errors.New("unexpected /proc stat format")
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 15 {
		return procStat{}, errors.New("short /proc stat")
	}
	// f[0] is field 3 (state): ppid is field 4, utime 14, stime 15,
	// cutime 16, cstime 17.
	var v [5]int64
	for k, idx := range []int{1, 11, 12, 13, 14} {
		if v[k], err = strconv.ParseInt(f[idx], 10, 64); err != nil {
			return procStat{}, fmt.Errorf("/proc stat field: %w", err)
		}
	}
	tick := func(t int64) time.Duration { return time.Duration(t) * time.Second / clockTicks }
	return procStat{ppid: int(v[0]), cpu: tick(v[1] + v[2]), children: tick(v[3] + v[4])}, nil
}

// serverCPU is the CPU used so far by a Postgres server: the postmaster,
// its exited children (the postmaster reaps every backend, so a backend
// that ends moves its time from the live sum into the postmaster's
// children time, and the total stays right across readings) and its live
// children, with the live walsenders', autovacuum workers' and
// background processes' shares on their own.
func serverCPU(postmaster int, relayPIDs map[int]bool) (serverTimes, error) {
	var t serverTimes
	pm, err := readStat(postmaster)
	if err != nil {
		return t, err
	}
	t.all = pm.cpu + pm.children
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		return t, err
	}
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		st, err := readStat(pid)
		if err != nil || st.ppid != postmaster {
			continue // gone since the listing, or not the server's
		}
		t.all += st.cpu + st.children
		cmd, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil {
			continue
		}
		switch {
		case bytes.Contains(cmd, []byte("walsender")):
			t.walsender += st.cpu
		case bytes.Contains(cmd, []byte("autovacuum worker")):
			t.autovacuum += st.cpu
		case bytes.Contains(cmd, []byte("checkpointer")), bytes.Contains(cmd, []byte("background writer")), bytes.Contains(cmd, []byte("walwriter")):
			t.background += st.cpu
		case relayPIDs[pid]:
			t.relaySQL += st.cpu
		case relayPIDs != nil:
			t.clients += st.cpu
		}
	}
	return t, nil
}

// serverTimes is what serverCPU reads.
type serverTimes struct {
	all, walsender, autovacuum, background time.Duration
	relaySQL, clients                      time.Duration
}

// relayBackends is the pids of the client backends serving the relay's
// pool (by application_name); nil if they cannot be read.
func (r *run) relayBackends() map[int]bool {
	if r.pool == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	rows, err := r.pool.Query(ctx, `SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND application_name = $1`, relay.ApplicationName)
	if err != nil {
		return nil
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		return nil
	}
	out := make(map[int]bool, len(pids))
	for _, p := range pids {
		out[int(p)] = true
	}
	return out
}
