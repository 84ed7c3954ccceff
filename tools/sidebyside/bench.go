package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// Options is one benchmark run.
type Options struct {
	Repo    string   // the repository's root
	Systems []string // system names (see systems), in table order
	Modes   []loadgen.Mode
	Rounds  int // runs of every system and mode
	// Reloads are sent Interval apart, starting Lead after the load
	// starts; the load goes on for Tail after the last one.
	Reloads        int
	Interval       time.Duration
	Lead, Tail     time.Duration
	Clients        int
	MaxIdle        time.Duration // keep-alive mode: idle gap up to this
	RequestTimeout time.Duration
	// Steady runs every system and mode once more per round with the same
	// load for as long and no reload, for the latency it has without one.
	Steady bool
	// UpgraderFlags are added to every upgrader command line, to measure
	// one of its options against the defaults.
	UpgraderFlags []string
	Log           io.Writer // progress lines
}

// Bin is the width of the time series' bins.
const Bin = 100 * time.Millisecond

// Failure is one request that did not end OK, or one connection closed
// by the server while idle (Class "idle").
type Failure struct {
	At    time.Duration // since the load started
	Class loadgen.Class
}

// IdleClass marks idle closes among the Failures' events.
const IdleClass loadgen.Class = "idle"

// Run is one system under one mode for one round.
type Run struct {
	System system
	Mode   loadgen.Mode
	Round  int // from 1
	Result loadgen.Result
	// OK holds the OK responses per Bin since the load started.
	OK []int
	// Events holds every failed request and every idle close.
	Events []Failure
	// Reloads holds when each reload was asked for, since the load
	// started; ReloadErrors the reloads that failed (described).
	Reloads      []time.Duration
	ReloadErrors []string
	// ReloadsDone counts the reloads that took effect (server.reloadsDone).
	ReloadsDone int
	Length      time.Duration // from the load's start until it was told to stop
	// WindowFrom is when the window whose latencies are summed begins:
	// the first reload (Options.Lead into a steady run); it ends at Length.
	WindowFrom time.Duration
	// Latency holds the latencies of the OK requests sent in the window,
	// sorted; P99 the p99 latency of the OK requests sent in each Bin (0
	// for a bin in which none was).
	Latency []time.Duration
	P99     []time.Duration
	// Steady is the run of the same system, mode and round with no reload
	// (nil without Options.Steady).
	Steady *Run
}

// Failed counts the run's failed requests.
func (r *Run) Failed() int { return r.Result.Failed() }

// build compiles upgrader, examples/hello, bareflip and plainhttp from the
// repository, without the race detector, into dir.
func build(repo, dir string) error {
	for _, b := range []struct{ out, pkg string }{
		{"upgrader", "./cmd/upgrader"}, {"hello", "./examples/hello"}, {"bareflip", "./integration/cmd/bareflip"},
		{"plainhttp", "./integration/cmd/plainhttp"},
	} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, b.out), b.pkg)
		cmd.Dir = repo
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s in %s: %v\n%s", b.pkg, repo, err, out)
		}
	}
	return nil
}

// Bench builds the binaries, runs every round of every system and mode,
// and returns the runs in order (round, system, mode). A system that
// cannot start ends the benchmark with an error naming it.
func Bench(ctx context.Context, o Options) ([]*Run, error) {
	if err := becomeSubreaper(); err != nil {
		return nil, err
	}
	// Absolute: every system runs in a temp dir of its own.
	repo, err := filepath.Abs(o.Repo)
	if err != nil {
		return nil, err
	}
	o.Repo = repo
	tmp, err := os.MkdirTemp("", "sidebyside-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		return nil, err
	}
	logf(o.Log, "building upgrader, hello, bareflip and plainhttp from %s", o.Repo)
	if err := build(o.Repo, bin); err != nil {
		return nil, err
	}
	var runs []*Run
	for round := 1; round <= o.Rounds; round++ {
		for _, name := range o.Systems {
			sys, ok := systemNamed(name)
			if !ok {
				return runs, fmt.Errorf("system %q: unknown", name)
			}
			for _, mode := range o.Modes {
				if err := ctx.Err(); err != nil {
					return runs, err
				}
				var steady *Run
				if o.Steady {
					s, err := runFresh(ctx, o, sys, mode, tmp, bin, false)
					if err != nil {
						return runs, fmt.Errorf("%s, %s, round %d, steady: %w", name, mode, round, err)
					}
					s.Round, steady = round, s
					logf(o.Log, "round %d %-12s %-9s steady: %s; p99 %s ms", round, name, mode, s.Result, ms(percentile(s.Latency, 0.99)))
				}
				r, err := runFresh(ctx, o, sys, mode, tmp, bin, true)
				if err != nil {
					return runs, fmt.Errorf("%s, %s, round %d: %w", name, mode, round, err)
				}
				r.Round, r.Steady = round, steady
				runs = append(runs, r)
				logf(o.Log, "round %d %-12s %-9s %s; reloads %d, done %d, errors %d; p99 %s ms",
					round, name, mode, r.Result, len(r.Reloads), r.ReloadsDone, len(r.ReloadErrors), ms(percentile(r.Latency, 0.99)))
				for _, e := range r.ReloadErrors[:min(3, len(r.ReloadErrors))] {
					logf(o.Log, "  reload error: %s", e)
				}
			}
		}
	}
	return runs, nil
}

func logf(w io.Writer, format string, args ...any) {
	if w != nil {
		fmt.Fprintf(w, time.Now().Format("15:04:05 ")+format+"\n", args...)
	}
}

// runFresh is runOne in a temp dir of its own under tmp, with the
// processes the system left behind ended after it.
func runFresh(ctx context.Context, o Options, sys system, mode loadgen.Mode, tmp, bin string, reload bool) (*Run, error) {
	dir, err := os.MkdirTemp(tmp, sys.name+"-")
	if err != nil {
		return nil, err
	}
	defer killOrphans()
	return runOne(ctx, o, sys, mode, env{bin: bin, repo: o.Repo, dir: dir, upgraderFlags: o.UpgraderFlags}, reload)
}

// runOne starts sys, puts the load on it, reloads it o.Reloads times
// o.Interval apart (or, without reload, lets it serve as long), and stops
// it.
func runOne(ctx context.Context, o Options, sys system, mode loadgen.Mode, e env, reload bool) (*Run, error) {
	srv, err := sys.start(e)
	if err != nil {
		return nil, err
	}
	var stopOnce sync.Once
	stop := func() { stopOnce.Do(srv.stop) }
	defer stop()
	if err := waitServing(srv.addr(), 10*time.Second); err != nil {
		return nil, err
	}
	r := &Run{System: sys, Mode: mode}
	var mu sync.Mutex
	var samples []sample
	start := time.Now()
	since := func(at time.Time) time.Duration { return max(0, at.Sub(start)) }
	cfg := loadgen.Config{
		Addr: srv.addr(), Clients: o.Clients, Mode: mode, MaxIdle: o.MaxIdle, Timeout: o.RequestTimeout,
		OnOutcome: func(c loadgen.Class, at time.Time) {
			mu.Lock()
			defer mu.Unlock()
			if c != loadgen.OK {
				r.Events = append(r.Events, Failure{since(at), c})
				return
			}
			i := int(since(at) / Bin)
			for len(r.OK) <= i {
				r.OK = append(r.OK, 0)
			}
			r.OK[i]++
		},
		OnLatency: func(sent time.Time, took time.Duration) {
			mu.Lock()
			defer mu.Unlock()
			samples = append(samples, sample{since(sent), took})
		},
		OnIdleClosed: func(at time.Time) {
			mu.Lock()
			defer mu.Unlock()
			r.Events = append(r.Events, Failure{since(at), IdleClass})
		},
	}
	lctx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	done := make(chan loadgen.Result, 1)
	go func() { done <- loadgen.Run(lctx, cfg) }()

	for i := range o.Reloads {
		if !reload {
			break
		}
		if !sleepUntil(ctx, start.Add(o.Lead+time.Duration(i)*o.Interval)) {
			break
		}
		at := time.Since(start)
		err := srv.reload()
		mu.Lock()
		r.Reloads = append(r.Reloads, at)
		if err != nil {
			r.ReloadErrors = append(r.ReloadErrors, fmt.Sprintf("reload %d at %s: %v", i+1, at.Round(time.Millisecond), err))
		}
		mu.Unlock()
	}
	sleepUntil(ctx, start.Add(o.Lead+time.Duration(max(0, o.Reloads-1))*o.Interval+o.Tail))
	stopLoad()
	r.Length = time.Since(start)
	r.Result = <-done
	r.WindowFrom = o.Lead
	if len(r.Reloads) > 0 {
		r.WindowFrom = r.Reloads[0]
	}
	r.Latency = inWindow(samples, r.WindowFrom, r.Length)
	r.P99 = p99PerBin(samples, int(r.Length/Bin))
	// After the stop, so that the logs it reads are complete.
	stop()
	r.ReloadsDone = srv.reloadsDone(r.Result)
	return r, nil
}

// sleepUntil sleeps until t, or reports false if ctx ends first.
func sleepUntil(ctx context.Context, t time.Time) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(time.Until(t)):
		return true
	}
}
