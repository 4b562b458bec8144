package bench

import (
	"fmt"
	"io"
	"strings"
)

// scaleTable writes the per-size and per-rate tables (when there is more
// than one size or rate, or a many-endpoint phase ran) and the issue 4 and
// 6 targets.
func (r *Result) scaleTable(w io.Writer) {
	s := r.ScaleResult
	if s == nil {
		return
	}
	if len(s.Backlogs) > 1 || len(s.Steady) > 1 || s.Endpoints > 0 {
		s.backlogTable(w)
		s.steadyTable(w)
	}
	s.targets(w, r.BareClient)
	if s.BenchPeakRSS > 0 {
		fmt.Fprintf(w, "\nbench process peak RSS: %.1f MiB (receiver tallies, bare client, the in-process polling peer)\n", mib(s.BenchPeakRSS))
	}
}

// cell prints v with format f, or "-" when v is not there.
func cell(width int, ok bool, f string, v ...any) string {
	if !ok {
		return fmt.Sprintf("%*s", width, "-")
	}
	return fmt.Sprintf("%*s", width, fmt.Sprintf(f, v...))
}

func (s *ScaleResult) backlogTable(w io.Writer) {
	if len(s.Backlogs) == 0 {
		return
	}
	fmt.Fprintf(w, "\nbacklog drain by size, events/s")
	if s.Endpoints > 0 {
		fmt.Fprintf(w, "; many = %s endpoints of %s tenants, routed by %s, all at one loopback receiver under /ep/<n>",
			thousands(s.Endpoints), thousands(s.Tenants), s.Routing)
	}
	fmt.Fprintf(w, "\n  %10s %10s %10s %10s %10s %12s\n", "events", "bare", "relay", "peer", "relay many", "peer many")
	for _, b := range s.Backlogs {
		fmt.Fprintf(w, "  %10s %s %s %s %s %s\n", thousands(b.Events),
			cell(10, b.Bare != nil, "%.0f", perSec(b.Bare)),
			cell(10, b.Drain != nil, "%.0f", perSecDrain(b.Drain)),
			cell(10, b.PeerDrain != nil, "%.0f", perSecPeer(b.PeerDrain)),
			cell(10, b.DrainMany != nil, "%.0f", perSecMany(b.DrainMany)),
			cell(12, b.PeerDrainMany != nil, "%.0f", perSecPeer(b.PeerDrainMany)))
	}
	fmt.Fprintf(w, "  %10s %11s %11s %12s %10s %15s %15s\n", "ratios", "relay/bare", "relay/peer", "many/single", "many/bare", "many/peer-many", "peer-many/peer")
	for _, b := range s.Backlogs {
		fmt.Fprintf(w, "  %10s %s %s %s %s %s %s\n", thousands(b.Events),
			cell(11, b.RelayOverBare > 0, "%.2fx", b.RelayOverBare),
			cell(11, b.RelayOverPeer > 0, "%.2fx", b.RelayOverPeer),
			cell(12, b.ManyOverSingle > 0, "%.2fx", b.ManyOverSingle),
			cell(10, b.ManyOverBare > 0, "%.2fx", b.ManyOverBare),
			cell(15, b.ManyOverPeerMany > 0, "%.2fx", b.ManyOverPeerMany),
			cell(15, b.PeerManyOverPeer > 0, "%.2fx", b.PeerManyOverPeer))
	}
	fmt.Fprintf(w, "  %10s %11s %11s %12s\n", "targets", fmt.Sprintf(">= %.2fx", TargetIssue6DrainRatio),
		fmt.Sprintf(">= %.2fx", TargetRelayOverPeer), fmt.Sprintf(">= %.2fx", TargetManyRatio))

	fmt.Fprintf(w, "  relay cost  %10s %8s %8s %17s %8s | %8s %8s %8s %17s %8s\n", "events",
		"us/ev", "RSS MiB", "spilled/loaded", "WAL B/ev", "many us", "RSS MiB", "WAL B/ev", "spilled/loaded", "skipped")
	for _, b := range s.Backlogs {
		var one, many string
		if d := b.Drain; d != nil {
			one = fmt.Sprintf("%8.1f %8.1f %17s %8.0f", d.CPUPerEvent, mib(b.DrainRSS), spillText(d.Spilled, d.Loaded), d.WALPerEvent)
		} else {
			one = fmt.Sprintf("%8s %8s %17s %8s", "-", "-", "-", "-")
		}
		if d := b.DrainMany; d != nil {
			many = fmt.Sprintf("%8.1f %8.1f %8.0f %17s %8.0f", d.CPUPerEvent, mib(d.PeakRSS), d.WALPerEvent, spillText(d.Spilled, d.Loaded), d.RestartSkipped)
		} else {
			many = fmt.Sprintf("%8s %8s %8s %17s %8s", "-", "-", "-", "-", "-")
		}
		fmt.Fprintf(w, "              %10s %s | %s\n", thousands(b.Events), one, many)
	}
	if len(s.RelaySettings) > 0 {
		var kv []string
		for _, k := range []string{"workers", "queue-events", "queue-bytes", "endpoint-max-in-flight", "overflow", "preset"} {
			if v, ok := s.RelaySettings[k]; ok {
				kv = append(kv, k+" "+v)
			}
		}
		fmt.Fprintf(w, "  relay settings (outbox-relay config check): %s\n", strings.Join(kv, ", "))
	}
	// Any event lost, duplicated, misrouted or altered, per phase and size.
	for _, b := range s.Backlogs {
		check := func(name string, c *Counts, extra int) {
			if c == nil || (c.Clean() && extra == 0) {
				return
			}
			fmt.Fprintf(w, "  %s, %s events: dups %d, missing %d, misrouted %d, unexpected %d, bad bodies %d, bad signatures %d, rows not done %d\n",
				name, thousands(b.Events), c.Duplicates, c.Missing, c.Misrouted, c.Unexpected, c.BadBodies, c.BadSigs, extra)
		}
		if b.Bare != nil {
			check("bare", &b.Bare.Counts, 0)
		}
		if b.Drain != nil {
			check("relay", &b.Drain.Counts, b.Drain.OtherRows)
		}
		if b.DrainMany != nil {
			check("relay many", &b.DrainMany.Counts, b.DrainMany.OtherRows)
		}
		if b.PeerDrain != nil {
			check("peer", &b.PeerDrain.Counts, b.PeerDrain.LeftRows)
		}
		if b.PeerDrainMany != nil {
			check("peer many", &b.PeerDrainMany.Counts, b.PeerDrainMany.LeftRows)
		}
	}
}

func spillText(spilled, loaded float64) string {
	if spilled < 0 {
		return "unread"
	}
	return fmt.Sprintf("%.0f/%.0f", spilled, loaded)
}

func perSec(t *Throughput) float64 {
	if t == nil {
		return 0
	}
	return t.PerSec
}
func perSecDrain(d *Drain) float64 {
	if d == nil {
		return 0
	}
	return d.PerSec
}
func perSecPeer(d *PeerDrain) float64 {
	if d == nil {
		return 0
	}
	return d.PerSec
}
func perSecMany(d *ManyDrain) float64 {
	if d == nil {
		return 0
	}
	return d.PerSec
}

func (s *ScaleResult) steadyTable(w io.Writer) {
	if len(s.Steady) == 0 {
		return
	}
	fmt.Fprintf(w, "\nsteady latency by rate   asked/s achieved/s producers  p50 ms   p99 ms p99.9 ms   max ms  dups missing  CPU us/ev  commit p50/p99 ms  from COMMIT p50/p99/p99.9 ms\n")
	for _, l := range s.Steady {
		for _, x := range []struct {
			name string
			l    *Latency
		}{{"relay", l.Latency}, {"bare POST", l.BareLatency}, {"polling peer", l.PeerLatency}} {
			if x.l == nil {
				continue
			}
			prod, cpu := fmt.Sprint(l.Producers), "-"
			if x.name == "bare POST" {
				prod = "-"
			}
			if x.name == "relay" && x.l.Cost != nil {
				cpu = fmt.Sprintf("%.1f", x.l.Cost.CPUPerEvent)
			}
			if x.l.ClientCPU > 0 {
				cpu = fmt.Sprintf("%.1f", x.l.ClientCPU) // the bare client's, in its own process
			}
			fmt.Fprintf(w, "  %-20s %9s %10.0f %9s %7.2f %8.2f %8.2f %8.2f %5d %7d %12s%s\n", x.name, thousands(l.Rate), x.l.RatePerSec, prod,
				x.l.P50, x.l.P99, x.l.P999, x.l.Max, x.l.Duplicates, x.l.Missing, cpu, x.l.commitText())
		}
	}
}

// targets writes issue 4's and 6's targets next to this run's figures.
func (s *ScaleResult) targets(w io.Writer, bareClient string) {
	var lines []string
	for _, b := range s.Backlogs {
		var parts []string
		if b.RelayOverBare > 0 {
			parts = append(parts, fmt.Sprintf("relay/bare %.2fx (>= %.2fx %s)", b.RelayOverBare, TargetIssue6DrainRatio, verdict(b.RelayOverBare >= TargetIssue6DrainRatio)))
		}
		if b.RelayOverPeer > 0 {
			parts = append(parts, fmt.Sprintf("relay/peer %.2fx (>= %.2fx %s)", b.RelayOverPeer, TargetRelayOverPeer, verdict(b.RelayOverPeer >= TargetRelayOverPeer)))
		}
		if b.ManyOverSingle > 0 {
			parts = append(parts, fmt.Sprintf("many/single %.2fx (>= %.2fx %s, issue 4)", b.ManyOverSingle, TargetManyRatio, verdict(b.ManyOverSingle >= TargetManyRatio)))
		}
		if b.ManyOverPeerMany > 0 {
			parts = append(parts, fmt.Sprintf("many relay/peer %.2fx (>= %.2fx %s)", b.ManyOverPeerMany, TargetRelayOverPeer, verdict(b.ManyOverPeerMany >= TargetRelayOverPeer)))
		}
		if d := b.Drain; d != nil && d.CPUPerEvent > 0 {
			parts = append(parts, cpuTarget(d.CPUPerEvent))
		}
		if len(parts) > 0 {
			lines = append(lines, fmt.Sprintf("%s events: %s", thousands(b.Events), strings.Join(parts, "; ")))
		}
	}
	for _, l := range s.Steady {
		t := TargetP99At(l.Rate)
		if l.Latency == nil || t == 0 {
			continue
		}
		note := ""
		if l.Latency.RatePerSec < 0.95*float64(l.Rate) {
			note = fmt.Sprintf(" (achieved only %.0f/s)", l.Latency.RatePerSec)
		}
		lines = append(lines, fmt.Sprintf("relay p99 at %s/s: %.2f ms from before the INSERT (<= %s %s), %.2f ms from the COMMIT's return (%s)%s",
			thousands(l.Rate), l.Latency.P99, t, verdict(l.Latency.P99 <= ms(t)), l.Latency.AfterP99, verdict(l.Latency.AfterP99 <= ms(t)), note))
	}
	for _, l := range s.Steady {
		if l.Latency != nil && l.Latency.Cost != nil && l.Latency.Cost.CPUPerEvent > 0 {
			line := fmt.Sprintf("steady %s/s: %s", thousands(l.Rate), cpuTarget(l.Latency.Cost.CPUPerEvent))
			if b := l.BareLatency; b != nil && b.ClientCPU > 0 {
				line += fmt.Sprintf("; the bare %s client alone, one POST per event at this rate: %.1f us/request (relay / bare %.2fx)",
					bareClient, b.ClientCPU, l.Latency.Cost.CPUPerEvent/b.ClientCPU)
			}
			lines = append(lines, line)
		}
	}
	if len(lines) == 0 {
		return
	}
	fmt.Fprintf(w, "\ntargets (issue 6: backlogs, steady p99 and relay CPU; issue 4: many endpoints)\n")
	for _, l := range lines {
		fmt.Fprintf(w, "  %s\n", l)
	}
}

// cpuTarget judges the relay's CPU per delivered event against issue 6's
// target.
func cpuTarget(us float64) string {
	return fmt.Sprintf("relay CPU %.1f us/event (<= %.0f %s)", us, TargetCPUPerEvent, verdict(us <= TargetCPUPerEvent))
}
