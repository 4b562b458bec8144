package bench

import (
	"cmp"
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
)

// faultsClean is Clean for the fault phases run.
func (r *Result) faultsClean() bool {
	ok := true
	for _, f := range []*Faulted{r.Recovery, r.Takeover} {
		if f != nil {
			ok = ok && f.Clean()
		}
	}
	if r.RateLimit != nil {
		ok = ok && r.RateLimit.Clean()
	}
	if r.Memory != nil {
		ok = ok && r.Memory.Clean()
	}
	return ok
}

// faultsTable writes the fault phases' figures.
func (r *Result) faultsTable(w io.Writer) {
	faulted := func(title string, f *Faulted) {
		fmt.Fprintf(w, "\n%s: producer %d/s (achieved %.0f/s), kills %.0fs + a random 0-1s apart; load average %.2f -> %.2f\n",
			title, f.Rate, f.AchievedRate, f.KillEverySecs, f.Load.Start, f.Load.End)
		fmt.Fprintf(w, "  kill  reaped ms  streaming ms  first delivery ms  first new event ms")
		if f.RestartToFirst != nil {
			fmt.Fprintf(w, "  restart->first ms")
		}
		fmt.Fprintln(w)
		for i, k := range f.Kills {
			fmt.Fprintf(w, "  %4d %10.1f %13.1f %18.1f %19.1f", i+1, k.ReapedMS, k.StreamingMS, k.FirstMS, k.FirstNewMS)
			if f.RestartToFirst != nil {
				fmt.Fprintf(w, " %18.1f", k.RestartToFirstMS)
			}
			fmt.Fprintln(w)
		}
		fmt.Fprintf(w, "  median / max: first delivery %.1f / %.1f ms; first new event %.1f / %.1f ms; streaming %.1f / %.1f ms\n",
			f.First.Median, f.First.Max, f.FirstNew.Median, f.FirstNew.Max, f.Streaming.Median, f.Streaming.Max)
		if f.TargetMS > 0 {
			fmt.Fprintf(w, "  kill -9 to first delivery after restart, every kill: target <= %.0f ms  %s\n", f.TargetMS, verdict(f.Met()))
		} else {
			fmt.Fprintf(w, "  (no target; README: takeover \"in about a second\")\n")
		}
		fmt.Fprintf(w, "  %d events committed: %d delivered, %d missing, %d repeated deliveries (%d with no kill between), %d bad\n",
			f.Committed, f.Distinct, f.Missing, f.Duplicates, f.Unexplained, f.Unexpected+f.BadBodies+f.BadSigs)
		rowsLine(w, f.Rows)
	}
	if f := r.Recovery; f != nil {
		faulted("recovery: SIGKILL the relay, start a new one at once", f)
	}
	if f := r.Takeover; f != nil {
		faulted("takeover: SIGKILL the active relay, a standby on the slot takes over", f)
	}
	if rl := r.RateLimit; rl != nil {
		e, t, u := rl.Endpoint, rl.Tenant, rl.Unthrottled
		fmt.Fprintf(w, "\nrate limits: window of %.0fs starting %.0fs after the first delivery; load average %.2f -> %.2f\n", e.WindowSecs, e.SkipSecs, rl.Load.Start, rl.Load.End)
		fmt.Fprintf(w, "                          limit/s  burst  first s  in window   rate/s   error  per-second min..max  after\n")
		row := func(name string, x RateWindow) {
			fmt.Fprintf(w, "  %-22s %8.0f %6d %8d %10d %8.1f %+6.2f%% %9d..%-9d %6d\n", name, x.Limit, x.Burst, x.FirstSecond, x.InWindow, x.Rate, x.ErrorPct, x.MinPerSecond, x.MaxPerSecond, x.AfterWindow)
		}
		row("endpoint L", e)
		row("tenant, 2 endpoints", t)
		if len(t.PerEndpoint) == 2 {
			fmt.Fprintf(w, "    tenant's endpoints: %.1f + %.1f /s\n", t.PerEndpoint[0], t.PerEndpoint[1])
		}
		fmt.Fprintf(w, "  unthrottled U (other tenant) during L's window: %d deliveries, %.0f/s over the %.1fs it was draining in the window; its %d-event backlog drained in %.1fs\n",
			u.InWindow, u.RatePerSec, u.BusySecs, u.Backlog, u.DrainSecs)
		if rl.Spilled >= 0 {
			fmt.Fprintf(w, "  spilled / loaded over the phase: %.0f / %.0f\n", rl.Spilled, rl.Loaded)
		}
		fmt.Fprintf(w, "  |error| target <= %.0f%%: endpoint %s, tenant %s\n", rl.TargetPct,
			verdict(math.Abs(e.ErrorPct) <= rl.TargetPct), verdict(math.Abs(t.ErrorPct) <= rl.TargetPct))
		for _, x := range []struct {
			name string
			c    Counts
		}{{"L", e.Counts}, {"U", u.Counts}, {"tenant", t.Counts}} {
			if !x.c.Clean() {
				fmt.Fprintf(w, "  %s: %d dups, %d missing, %d bad\n", x.name, x.c.Duplicates, x.c.Missing, x.c.Unexpected+x.c.BadBodies+x.c.BadSigs)
			}
		}
		rowsLine(w, rl.Rows)
	}
	if m := r.Memory; m != nil {
		down := "503 to every request"
		if len(m.Runs) > 0 {
			down = m.Runs[0].ReceiverDown
		}
		fmt.Fprintf(w, "\nmemory: receiver down (%s), events inserted with the relay running, then the receiver back\n", down)
		for _, x := range m.Runs {
			fmt.Fprintf(w, "  %s (load average %.2f -> %.2f): %d events inserted at %.0f rows/s; settled %.1fs after: %.0f read, %.0f queued, %d rows, slot lag %.0f bytes\n",
				x.Policy, x.Load.Start, x.Load.End, x.Events, x.InsertPerSec, x.SettleSecs, x.HeldRead, x.HeldQueue, x.HeldRows, x.HeldLagBytes)
			turnedAway := fmt.Sprintf("%d answers 503", x.Refused)
			if x.Refused == 0 && x.ReceiverDown != "503 to every request" {
				turnedAway = "every connection refused"
			}
			turnedAway += "; failed attempts by class " + classCounts(x.DownErrors)
			fmt.Fprintf(w, "    down: %s; RSS max %.1f MiB (%d samples), VmHWM %.1f MiB; spilled / loaded over a %.0fs hold: %.0f / %.0f\n",
				turnedAway, mib(x.DownMaxRSS), x.DownSamples, mib(x.DownPeakRSS), x.HoldSecs, x.HoldSpilled, x.HoldLoaded)
			fmt.Fprintf(w, "    back: receiver complete in %.1fs, every row succeeded in %.1fs; RSS max during the drain %.1f MiB; spilled / loaded in all %.0f / %.0f; %d dups, %d missing\n",
				x.ReceivedSecs, x.DrainSecs, mib(x.DrainMaxRSS), x.Spilled, x.Loaded, x.Duplicates, x.Missing)
			fmt.Fprintf(w, "    peak RSS (VmHWM) %.1f MiB, target < %.0f MiB  %s\n  ", mib(x.PeakRSS), mib(m.TargetRSS), verdict(x.Met()))
			rowsLine(w, x.Rows)
		}
	}
}

func rowsLine(w io.Writer, rw Rows) {
	state := "exact"
	if !rw.Exact() {
		state = "NOT EXACT"
	}
	fmt.Fprintf(w, "  accounting %s: %d events in relay.outbox, %d rows, %d succeeded, %d events without a row, %d with several\n",
		state, rw.Events, rw.Rows, rw.Succeeded, rw.NoRow, rw.Repeated)
}

// classCounts prints counts by class, largest first ("none" if empty).
func classCounts(m map[string]int) string {
	if len(m) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return m[keys[i]] > m[keys[j]] || m[keys[i]] == m[keys[j]] && keys[i] < keys[j] })
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s %d", cmp.Or(k, "(none)"), m[k])
	}
	return b.String()
}
