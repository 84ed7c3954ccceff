package main

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// sample is one OK request: when it was sent, since the load started,
// and how long it took (loadgen.Config.OnLatency).
type sample struct {
	at, took time.Duration
}

// percentile is the nearest-rank q-quantile of sorted: the smallest
// latency that at least a fraction q of them do not exceed, so that it is
// always one that was measured; 0 for none.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// latencies is one set of latencies' summary.
type latencies struct {
	n                     int
	p50, p99, p999, worst time.Duration
}

func summarize(sorted []time.Duration) latencies {
	l := latencies{n: len(sorted), p50: percentile(sorted, 0.50), p99: percentile(sorted, 0.99), p999: percentile(sorted, 0.999)}
	if len(sorted) > 0 {
		l.worst = sorted[len(sorted)-1]
	}
	return l
}

// inWindow is the latencies of the samples sent in [from, to), sorted.
func inWindow(s []sample, from, to time.Duration) []time.Duration {
	var out []time.Duration
	for _, x := range s {
		if x.at >= from && x.at < to {
			out = append(out, x.took)
		}
	}
	slices.Sort(out)
	return out
}

// p99PerBin is the p99 latency of the samples sent in each Bin of the
// first bins, 0 for a bin in which no OK request was sent. By send time,
// so that a request held up by a reload shows at the reload, not where it
// ended.
func p99PerBin(s []sample, bins int) []time.Duration {
	by := make([][]time.Duration, bins)
	for _, x := range s {
		if i := int(x.at / Bin); i >= 0 && i < bins {
			by[i] = append(by[i], x.took)
		}
	}
	out := make([]time.Duration, bins)
	for i, b := range by {
		slices.Sort(b)
		out[i] = percentile(b, 0.99)
	}
	return out
}

// ms formats a latency in milliseconds with about three significant
// digits; "–" for none.
func ms(d time.Duration) string {
	if d <= 0 {
		return "–"
	}
	f := float64(d) / float64(time.Millisecond)
	switch {
	case f < 10:
		return fmt.Sprintf("%.2f", f)
	case f < 100:
		return fmt.Sprintf("%.1f", f)
	}
	return fmt.Sprintf("%.0f", f)
}

// ratio formats reloads ÷ steady; "–" when either is missing.
func ratio(reloads, steady time.Duration) string {
	if reloads <= 0 || steady <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", float64(reloads)/float64(steady))
}
