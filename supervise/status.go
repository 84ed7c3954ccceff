package supervise

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"
)

// Status is a snapshot of the supervisor, taken by its loop. It is what
// /status and `upgrader status --json` show.
type Status struct {
	Pid int `json:"pid"`
	// Ready: a ready worker of the current generation is alive, no stop
	// has begun or been announced (PreStop) and the supervisor has not
	// given up. NotReady says why not, when it is false.
	Ready       bool             `json:"ready"`
	NotReady    string           `json:"not_ready,omitempty"`
	Stopping    bool             `json:"stopping"`
	GaveUp      bool             `json:"gave_up"`
	Current     int              `json:"current_generation"` // 0 before the first is ready
	Listeners   []ListenerStatus `json:"listeners"`
	Generations []GenStatus      `json:"generations"`
	LastUpgrade *UpgradeResult   `json:"last_upgrade,omitempty"`
	Upgrades    map[string]int   `json:"upgrades"` // by result: UpgradeOK, UpgradeFailed
	Restarts    int              `json:"worker_restarts"`
	Handoffs    HandoffStats     `json:"handoffs"`
	FDStore     []string         `json:"fd_store"` // names of the stored fds
	// Spares are the pids of the spare shims, children of the supervisor
	// waiting to become the next workers (internal/spawn).
	Spares []int `json:"spares,omitempty"`
	// Version is the running upgrader's build; Execs how many times it
	// re-executed itself in place (self-upgrades), SelfUpgrade the last
	// self-upgrade's outcome.
	Version     string      `json:"version"`
	Execs       int         `json:"execs"`
	SelfUpgrade *SelfResult `json:"self_upgrade,omitempty"`
}

// ListenerStatus describes one listener passed to workers.
type ListenerStatus struct {
	Name    string `json:"name"`
	Network string `json:"network"`
	Address string `json:"address"`
	FD      int    `json:"worker_fd"` // the fd number workers see
}

// GenStatus describes one generation with live processes: its record and
// its workers' records, ordered by slot.
type GenStatus struct {
	GenerationRecord
	Workers []WorkerRecord `json:"workers"`
}

// call runs f on the loop goroutine and waits for it, for ctx, or for the
// loop's end. Once call has returned, f has run or never will: a caller
// that gives up (ctx) may read what f writes without racing it, since f
// runs under a lock the caller takes to give up.
func (s *Supervisor) call(ctx context.Context, f func()) error {
	done := make(chan struct{})
	var mu sync.Mutex
	abandoned := false
	run := func() {
		mu.Lock()
		defer mu.Unlock()
		if !abandoned {
			f()
		}
		close(done)
	}
	abandon := func(err error) error {
		mu.Lock()
		defer mu.Unlock()
		select {
		case <-done:
			return nil // f ran after all
		default:
		}
		abandoned = true
		return err
	}
	select {
	case s.calls <- evFunc{run}:
	case <-s.done:
		return ErrNotRunning
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-done:
		return nil
	case <-s.done:
		return abandon(ErrNotRunning)
	case <-ctx.Done():
		return abandon(ctx.Err())
	}
}

// Status takes a snapshot. An error means the loop did not answer in time
// (ctx) or has ended (ErrNotRunning): the supervisor is not live.
func (s *Supervisor) Status(ctx context.Context) (Status, error) {
	var st Status
	err := s.call(ctx, func() { st = s.snapshot() })
	return st, err
}

func (s *Supervisor) snapshot() Status {
	cur := s.gens.current
	st := Status{
		Pid:      s.spawnEnv.supervisorPid,
		Stopping: s.life.stopping,
		GaveUp:   s.life.gaveUp,
		Ready:    cur != nil && cur.readyCount() > 0 && !s.life.stopping && !s.life.gaveUp && s.life.preStopAt.IsZero(),
		Upgrades: map[string]int{UpgradeOK: s.count.UpgradesOK, UpgradeFailed: s.count.UpgradesFailed},
		Restarts: s.count.Restarts,
		Handoffs: s.count.Handoffs,
		FDStore:  s.fdStore.names(),
		Version:  s.cfg.Version,
		Execs:    s.reexec.execs,
		Spares:   s.env.spares(),
	}
	if s.reexec.last != nil {
		r := *s.reexec.last
		st.SelfUpgrade = &r
	}
	if cur != nil {
		st.Current = cur.N
	}
	st.NotReady = s.notReady(st.Ready)
	if s.upgrades.last.Generation != 0 {
		r := s.upgrades.last
		st.LastUpgrade = &r
	}
	for i, l := range s.cfg.Listeners {
		st.Listeners = append(st.Listeners, ListenerStatus{Name: l.Name(), Network: l.Network(), Address: l.Addr(), FD: 3 + i})
	}
	for _, g := range s.gens.all {
		gs := GenStatus{GenerationRecord: g.GenerationRecord}
		gs.Failures = slices.Clone(g.Failures) // the loop changes it in place
		for w := range g.live {
			r := w.WorkerRecord
			r.Lingering, r.Accepts = slices.Clone(r.Lingering), maps.Clone(r.Accepts)
			gs.Workers = append(gs.Workers, r)
		}
		slices.SortFunc(gs.Workers, func(a, b WorkerRecord) int {
			return cmp.Or(cmp.Compare(a.Slot, b.Slot), cmp.Compare(a.Pid, b.Pid))
		})
		st.Generations = append(st.Generations, gs)
	}
	return st
}

// notReady says why the supervisor is not ready ("" when it is).
func (s *Supervisor) notReady(ready bool) string {
	switch {
	case ready:
		return ""
	case s.life.gaveUp:
		return "gave up: " + s.life.err.Error()
	case s.life.stopping:
		return "stopping"
	case !s.life.preStopAt.IsZero():
		return "a stop is coming (prestop)"
	case s.gens.current == nil:
		return "no generation ready yet"
	}
	return fmt.Sprintf("no ready worker of generation %d alive", s.gens.current.N)
}

// Progress is one step of an upgrade, as `upgrader upgrade` prints it.
type Progress struct {
	Event      Event `json:"event"`
	Generation int   `json:"generation"`
	// ReadyAfterMS: for EventReady, from start until every worker was ready.
	ReadyAfterMS int64 `json:"ready_after_ms,omitempty"`
	// ReadyAfterUS is ReadyAfterMS in microseconds, for a figure finer
	// than a whole millisecond (a worker may start in a few).
	ReadyAfterUS int64 `json:"ready_after_us,omitempty"`
	// Old and Connections: for EventDraining, the generation draining and
	// the established connections its workers held when asked to drain.
	Old         int    `json:"old_generation,omitempty"`
	Connections int    `json:"connections"`
	Reason      string `json:"reason,omitempty"` // for EventFailed
	// Self-upgrade: Binary (the resolved path) for EventChecking, Binary
	// and Version (the new binary's) for EventChecked, Binary, Version and
	// Execs (the image now running) for EventResumed.
	Binary  string `json:"binary,omitempty"`
	Version string `json:"version,omitempty"`
	Execs   int    `json:"execs,omitempty"`
	// Ack, on EventExec, is closed by whoever forwards the event once it is
	// written: the exec waits for it.
	Ack chan struct{} `json:"-"`
}

// upgradeQueue is the upgrades asked for: the one queued behind the
// upgrade under way, the watchers of the next generation to start
// (starting) and of the queued upgrade (waiting), and the last result.
type upgradeQueue struct {
	queued   bool
	counting int // replaced generations whose connections are being counted
	starting []chan Progress
	waiting  []chan Progress
	last     UpgradeResult
}

// StartUpgrade starts an upgrade (or queues one, if one is under way) and
// returns a channel of its progress, closed after EventDone or
// EventFailed. The error is ErrNotRunning, ctx's, or a refusal while
// stopping.
func (s *Supervisor) StartUpgrade(ctx context.Context) (<-chan Progress, error) {
	ch := make(chan Progress, 16)
	var err error
	cerr := s.call(ctx, func() {
		if s.life.stopping {
			err = errors.New("upgrade refused: the supervisor is stopping")
			return
		}
		if s.gens.pending != nil || s.reexec.cur != nil {
			s.upgrades.waiting = append(s.upgrades.waiting, ch)
			if s.reexec.cur != nil || s.reexec.queued != nil {
				// This channel ends at the exec, before the upgrade
				// runs in the new image: say so, with the lowest
				// generation it can start and the exec count, so that
				// its client can follow it there (upgrader upgrade
				// reconnects and asks the status).
				send(ch, Progress{Event: EventQueued, Generation: s.gens.next + 1, Execs: s.reexec.execs})
			}
		} else {
			s.upgrades.starting = append(s.upgrades.starting, ch)
		}
		s.requestUpgrade()
	})
	if cerr != nil {
		return nil, cerr
	}
	if err != nil {
		return nil, err
	}
	return ch, nil
}

// Upgrade runs an upgrade to its end, as kill -USR2 does, and returns its
// result: OK once the new generation is ready (the old one drains on), or
// the reason it failed. It waits for an upgrade under way and the one
// queued behind it, and for the old generation to have exited. The error
// is ErrNotRunning, ctx's, or a refusal while stopping; a failed upgrade
// is a result, not an error.
func (s *Supervisor) Upgrade(ctx context.Context) (UpgradeResult, error) {
	ch, err := s.StartUpgrade(ctx)
	if err != nil {
		return UpgradeResult{}, err
	}
	var r UpgradeResult
	for {
		select {
		case p, ok := <-ch:
			if !ok {
				// The loop's own record has the start time.
				_ = s.call(ctx, func() {
					if s.upgrades.last.Generation == r.Generation {
						r = s.upgrades.last
					}
				})
				return r, nil
			}
			switch p.Event {
			case EventStarted:
				r = UpgradeResult{Generation: p.Generation}
			case EventReady:
				r.OK, r.ReadyAfter = true, time.Duration(p.ReadyAfterMS)*time.Millisecond
				if p.ReadyAfterUS > 0 {
					r.ReadyAfter = time.Duration(p.ReadyAfterUS) * time.Microsecond
				}
			case EventFailed:
				r.OK, r.Reason = false, p.Reason
			}
		case <-ctx.Done():
			return r, ctx.Err()
		}
	}
}

// emit sends p to the watchers of generation g without blocking the loop;
// EventDone and EventFailed close their channels.
func (s *Supervisor) emit(g *generation, p Progress) {
	p.Generation = g.N
	for _, ch := range g.watchers {
		send(ch, p)
		if p.Event.Final() {
			close(ch)
		}
	}
	if p.Event.Final() {
		g.watchers = nil
	}
}

// send gives p to a watcher without blocking the loop: a watcher that
// does not read loses the step, never the loop.
func send(ch chan Progress, p Progress) {
	select {
	case ch <- p:
	default:
	}
}
