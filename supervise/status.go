package supervise

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"
)

// Status is a snapshot of the supervisor, taken by its loop. It is what
// /status and `upgrader status --json` show.
type Status struct {
	Pid int `json:"pid"`
	// Ready: a ready worker of the current generation is alive, no stop
	// has begun or been announced (PreStop) and the supervisor has not
	// given up. NotReady says why
	// not, when it is false.
	Ready       bool             `json:"ready"`
	NotReady    string           `json:"not_ready,omitempty"`
	Stopping    bool             `json:"stopping"`
	GaveUp      bool             `json:"gave_up"`
	Current     int              `json:"current_generation"` // 0 before the first is ready
	Listeners   []ListenerStatus `json:"listeners"`
	Generations []GenStatus      `json:"generations"`
	LastUpgrade *UpgradeResult   `json:"last_upgrade,omitempty"`
	Upgrades    map[string]int   `json:"upgrades"` // by result: ok, failed
	Restarts    int              `json:"worker_restarts"`
	Handoffs    HandoffStats     `json:"handoffs"`
	FDStore     []string         `json:"fd_store"` // names of the stored fds
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

// GenStatus describes one generation with live processes.
type GenStatus struct {
	Generation int             `json:"generation"`
	State      GenerationState `json:"state"`
	Started    time.Time       `json:"started"`
	ReadyAt    *time.Time      `json:"ready_at,omitempty"`
	Restarts   int             `json:"restarts"`
	Reason     string          `json:"reason,omitempty"`
	Workers    []WorkerStatus  `json:"workers"`
}

// WorkerStatus describes one worker process.
type WorkerStatus struct {
	Slot    int         `json:"worker"`
	Pid     int         `json:"pid"`
	State   WorkerState `json:"state"`
	Started time.Time   `json:"started"`
	ReadyAt *time.Time  `json:"ready_at,omitempty"`
	Status  string      `json:"status,omitempty"` // last STATUS= it sent
	// Lingering lists what is left of its process tree once its main
	// process has exited (stopped with the drain signal, killed at its
	// deadline).
	Lingering []int `json:"lingering,omitempty"`
	// Hurried: its generation was beyond --max-draining, so it was sent
	// the drain signal again and is killed at the end of a short grace.
	Hurried bool `json:"hurried,omitempty"`
}

// ErrNotRunning is returned by Status and Upgrade when the loop has ended.
var ErrNotRunning = errors.New("supervisor is not running")

// call runs f on the loop goroutine and waits for it, for ctx, or for the
// loop's end.
func (s *Supervisor) call(ctx context.Context, f func()) error {
	done := make(chan struct{})
	select {
	case s.calls <- evFunc{func() { f(); close(done) }}:
	case <-s.done:
		return ErrNotRunning
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-done:
		return nil
	case <-s.done:
		return ErrNotRunning
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Status takes a snapshot. An error means the loop did not answer in time
// (ctx) or has ended: the supervisor is not live.
func (s *Supervisor) Status(ctx context.Context) (Status, error) {
	var st Status
	err := s.call(ctx, func() { st = s.snapshot() })
	return st, err
}

func (s *Supervisor) snapshot() Status {
	st := Status{
		Pid:      s.pid,
		Stopping: s.stopping,
		GaveUp:   s.gaveUp,
		Ready:    s.current != nil && s.current.readyCount() > 0 && !s.stopping && !s.gaveUp && s.preStopAt.IsZero(),
		Upgrades: map[string]int{"ok": s.upgradesOK, "failed": s.upgradesFailed},
		Restarts: s.restartCount,
		Handoffs: s.hoStats,
		FDStore:  []string{},
		Version:  s.cfg.Version,
		Execs:    s.execs,
	}
	if s.lastSelf != nil {
		r := *s.lastSelf
		st.SelfUpgrade = &r
	}
	for _, f := range s.fdStore {
		st.FDStore = append(st.FDStore, f.name)
	}
	if s.current != nil {
		st.Current = s.current.n
	}
	switch {
	case st.Ready:
	case s.gaveUp:
		st.NotReady = "gave up: " + s.stopErr.Error()
	case s.stopping:
		st.NotReady = "stopping"
	case !s.preStopAt.IsZero():
		st.NotReady = "a stop is coming (prestop)"
	case s.current == nil:
		st.NotReady = "no generation ready yet"
	default:
		st.NotReady = fmt.Sprintf("no ready worker of generation %d alive", s.current.n)
	}
	if s.lastUp.Generation != 0 {
		r := s.lastUp
		st.LastUpgrade = &r
	}
	for i, sock := range s.cfg.Sockets {
		st.Listeners = append(st.Listeners, ListenerStatus{Name: sock.Spec.Name, Network: sock.Spec.Network, Address: sock.Addr(), FD: 3 + i})
	}
	for _, g := range s.gens {
		gs := GenStatus{Generation: g.n, State: g.state, Started: g.started, Restarts: g.restarts, Reason: g.reason}
		if !g.readyAt.IsZero() {
			t := g.readyAt
			gs.ReadyAt = &t
		}
		for w := range g.live {
			ws := WorkerStatus{Slot: w.slot, Pid: w.pid, State: w.state, Started: w.started, Status: w.status, Lingering: w.lingering, Hurried: w.hurried}
			if !w.readyAt.IsZero() {
				t := w.readyAt
				ws.ReadyAt = &t
			}
			gs.Workers = append(gs.Workers, ws)
		}
		sortWorkers(gs.Workers)
		st.Generations = append(st.Generations, gs)
	}
	return st
}

func sortWorkers(ws []WorkerStatus) {
	slices.SortFunc(ws, func(a, b WorkerStatus) int {
		return cmp.Or(cmp.Compare(a.Slot, b.Slot), cmp.Compare(a.Pid, b.Pid))
	})
}

// PreStop makes the supervisor report not-ready from now on, ahead of a
// stop that has not been signalled yet (a Kubernetes preStop hook runs
// before the kubelet sends SIGTERM), and returns how much of
// Config.ShutdownDelay is left to wait, counted from the first PreStop (0
// once it has passed, or once the stop has begun). The workers keep
// serving; the TERM that follows drains once the whole delay has passed
// since the first PreStop, not a second delay after it. There is no way
// back but a restart: a self-upgrade is refused from then on. The error
// is ErrNotRunning or ctx's.
func (s *Supervisor) PreStop(ctx context.Context) (time.Duration, error) {
	var left time.Duration
	err := s.call(ctx, func() {
		if s.stopping {
			return
		}
		if s.preStopAt.IsZero() {
			s.preStopAt = time.Now()
			s.log.Info("prestop: not ready from now on; the stop's shutdown delay starts now",
				zap.Duration("shutdown_delay", s.cfg.ShutdownDelay))
		}
		left = max(0, s.cfg.ShutdownDelay-time.Since(s.preStopAt))
	})
	return left, err
}

// Progress is one step of an upgrade, as `upgrader upgrade` prints it.
type Progress struct {
	// Event is "started", "ready", "draining", "done" or "failed".
	Event      string `json:"event"`
	Generation int    `json:"generation"`
	// ReadyAfterMS: for "ready", from start until every worker was ready.
	ReadyAfterMS int64 `json:"ready_after_ms,omitempty"`
	// Old and Connections: for "draining", the generation draining and the
	// established connections its workers held when asked to drain.
	Old         int    `json:"old_generation,omitempty"`
	Connections int    `json:"connections"`
	Reason      string `json:"reason,omitempty"` // for "failed"
	// Self-upgrade events: "queued", "checking" (Binary), "checked"
	// (Version: the new binary's), "exec", then from the new image
	// "resumed" (Version, Execs), and "done" with --self-only.
	Binary  string `json:"binary,omitempty"`
	Version string `json:"version,omitempty"`
	Execs   int    `json:"execs,omitempty"`
	// Ack, on "exec", is closed by whoever forwards the event once it is
	// written: the exec waits for it.
	Ack chan struct{} `json:"-"`
}

// Upgrade starts an upgrade (or queues one, if one is under way) and
// returns a channel of its progress, closed after "done" or "failed". The
// error is ErrNotRunning, ctx's, or a refusal while stopping.
func (s *Supervisor) Upgrade(ctx context.Context) (<-chan Progress, error) {
	ch := make(chan Progress, 16)
	var err error
	cerr := s.call(ctx, func() {
		if s.stopping {
			err = errors.New("upgrade refused: the supervisor is stopping")
			return
		}
		if s.pending != nil || s.self != nil {
			s.queuedWatchers = append(s.queuedWatchers, ch)
		} else {
			s.startWatchers = append(s.startWatchers, ch)
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

// emit sends p to the watchers of generation g without blocking the loop;
// "done" and "failed" close their channels.
func (s *Supervisor) emit(g *generation, p Progress) {
	p.Generation = g.n
	for _, ch := range g.watchers {
		select {
		case ch <- p:
		default:
		}
		if p.Event == "done" || p.Event == "failed" {
			close(ch)
		}
	}
	if p.Event == "done" || p.Event == "failed" {
		g.watchers = nil
	}
}
