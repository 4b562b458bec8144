package relay

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/cdc"
)

// BenchmarkStatusWrite writes batches of new succeeded rows each way the
// writer can: the pipelined unnest upsert (what batches of up to
// smallWrite rows took before the one-trip path), COPY in a transaction
// (four round trips; larger batches before it) and the one-trip COPY,
// and for small batches the one-trip COPY without the recorded LSN
// ("nolsn", which no real batch of a streaming relay is: it shows what
// the relay_state upsert costs).
// Besides ns/op (the writer's wall time per batch) it reports pg-us/row,
// the CPU the Postgres backend spent per row (from /proc/PID/schedstat),
// which is what competes with other tenants' commits. The test cluster
// runs without fsync, so neither figure includes a disk flush.
//
//	go test -run '^$' -bench BenchmarkStatusWrite ./relay/
func BenchmarkStatusWrite(b *testing.B) {
	for _, n := range []int{20, 64, 500} {
		paths := []string{"upsert", "one-trip", "nolsn"}
		if n > smallWrite {
			paths = []string{"copy-tx", "one-trip"}
		}
		for _, path := range paths {
			b.Run(fmt.Sprintf("%s/%d", path, n), func(b *testing.B) { benchStatusWrite(b, path, n) })
		}
	}
}

func benchStatusWrite(b *testing.B, path string, n int) {
	e, w := newTestWriter(b, "bw")
	ctx := context.Background()
	var pid int
	if err := w.pool.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
		b.Fatal(err)
	}
	var wm watermark
	at := time.Now()
	seq := 0
	batch := func() []*delivery {
		rows := make([]*delivery, n)
		for i := range rows {
			seq++
			m := wm.add(cdc.LSN(0x1_0000_0000+seq), 1)
			rows[i] = &delivery{eventID: [16]byte{1, byte(seq >> 24), byte(seq >> 16), byte(seq >> 8), byte(seq)}, endpointID: "ep_bench",
				tenantID: "t", eventType: "bench.event", state: StateSucceeded, attempts: 1, httpStatus: 204,
				commitLSN: m.end, endLSN: m.end, committedAt: at, firstAttempt: at, lastAttempt: at, completed: at,
				duration: time.Millisecond, mark: m}
		}
		return rows
	}
	write := func(rows []*delivery) error {
		maxLSN := rows[len(rows)-1].endLSN
		switch path {
		case "upsert":
			return w.writeSmall(ctx, rows, nil, maxLSN)
		case "copy-tx":
			return w.writeTx(ctx, rows, false, maxLSN)
		case "nolsn":
			maxLSN = 0
		}
		sql := oneTripSQL(w.slot, maxLSN)
		return w.writeFresh(ctx, sql, rows)
	}
	if err := write(batch()); err != nil { // warm: the connection's prepared statements
		b.Fatal(err)
	}
	cpu0 := backendCPU(b, pid)
	b.ResetTimer()
	for range b.N {
		if err := write(batch()); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(backendCPU(b, pid)-cpu0)/1e3/float64(b.N*n), "pg-us/row")
	if got := e.Count(`SELECT count(*) FROM relay.deliveries`); got != (b.N+1)*n {
		b.Fatalf("%d rows, want %d", got, (b.N+1)*n)
	}
}

// backendCPU is the CPU time, in ns, that process pid has run.
func backendCPU(b *testing.B, pid int) int64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/schedstat", pid))
	if err != nil {
		b.Fatal(err)
	}
	ns, err := strconv.ParseInt(strings.Fields(string(raw))[0], 10, 64)
	if err != nil {
		b.Fatal(err)
	}
	return ns
}
