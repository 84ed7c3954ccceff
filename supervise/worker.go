package supervise

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A worker's life has one owner: the functions in this file, and its
// state changes in one place, setState. retire asks a worker to stop,
// onWorkerExit handles the end of its main process, settle stops what is
// left of its tree and forgets it once nothing is, and refill puts a new
// worker in an emptied slot (counting restarts and deciding to give up).
// One deadline timer per worker (arm) serves every state: the ready
// timeout while it starts, the watchdog while it is ready, the drain
// deadline while it drains or lingers.

// setState moves w to state, with what the move implies: the time of
// readiness and the watchdog, the forgetting of a worker that is gone.
func (s *Supervisor) setState(w *worker, state WorkerState) {
	w.State = state
	switch state {
	case WorkerReady:
		w.ReadyAt = s.env.now()
		if s.cfg.Watchdog > 0 {
			w.LastPing = w.ReadyAt
			s.arm(w, s.cfg.Watchdog)
		} else {
			s.arm(w, -1)
		}
	case WorkerGone:
		w.Lingering = nil
		s.arm(w, -1)
		delete(w.gen.live, w)
		s.reapGeneration(w.gen)
	}
}

// arm (re)sets w's deadline timer to fire after d; d < 0 disarms it.
func (s *Supervisor) arm(w *worker, d time.Duration) {
	if w.timer != nil {
		w.timer.Stop()
		w.timer = nil
	}
	w.timerSeq++
	w.Deadline = time.Time{}
	if d < 0 {
		return
	}
	w.Deadline = s.env.now().Add(d)
	w.timer = s.after(d, evDeadline{w, w.timerSeq})
}

// onDeadline handles w's deadline timer, as the state it was armed for.
func (s *Supervisor) onDeadline(w *worker, seq uint64) {
	if seq != w.timerSeq || w.State == WorkerGone {
		return // re-armed or disarmed since
	}
	w.timer = nil
	g := w.gen
	switch w.State {
	case WorkerDraining, WorkerLingering:
		fields := []any{slog.Int("generation", g.N), slog.Int("pid", w.Pid), slog.Duration("drain_timeout", s.cfg.DrainTimeout)}
		if w.Hurried {
			// Its deadline may have been pulled in: the drain timeout
			// alone would not explain the kill.
			fields = append(fields, slog.Bool("hurried", true), slog.Duration("hurry_grace", s.cfg.HurryGrace))
		}
		s.log.Warn("worker did not drain in time, killing its process tree", fields...)
		s.kill9(w)
	case WorkerStarting:
		s.onReadyTimeout(w)
	case WorkerReady:
		if s.cfg.Watchdog > 0 {
			s.onWatchdog(w)
		}
	}
}

func (s *Supervisor) onReadyTimeout(w *worker) {
	reason := fmt.Sprintf("worker %d (pid %d) not ready within %s", w.Slot, w.Pid, w.ReadyTimeout)
	if w.gen.State == GenStarting && s.gens.current != nil {
		s.failGeneration(w.gen, reason)
		return
	}
	// A replacement worker, or one of the first generation, that hangs at
	// start: kill it, and its exit counts as a crash.
	s.log.Error("worker not ready in time, killing its process tree", slog.Int("generation", w.gen.N),
		slog.Int("pid", w.Pid), slog.Duration("ready_timeout", w.ReadyTimeout))
	s.kill9(w)
}

// onWatchdog replaces a worker that sent no WATCHDOG=1 within the watchdog
// (sd_watchdog_enabled(3)); like systemd, it is sent SIGABRT first.
func (s *Supervisor) onWatchdog(w *worker) {
	if since := s.env.now().Sub(w.LastPing); since < s.cfg.Watchdog {
		s.arm(w, s.cfg.Watchdog-since)
		return
	}
	s.replace(w, RestartWatchdog, fmt.Sprintf("no WATCHDOG=1 for %s", s.cfg.Watchdog), unix.SIGABRT)
}

// retire asks w to stop with sig (0: none, it stops by itself) and arms its
// drain deadline, after which its whole process tree is killed. Its exit is
// expected from now on. The drain signal goes to the worker's main process
// only, as systemd's KillMode=mixed does: servers with processes of their
// own (a master and its workers, a Node.js cluster) drain them in their own
// order, and a group signal would cut those short. What is left of the tree
// once the main process has exited gets the drain signal then (settle).
func (s *Supervisor) retire(w *worker, sig syscall.Signal, cause string) {
	if w.asked() || !w.State.running() {
		return
	}
	w.Cause = cause
	s.setState(w, WorkerDraining)
	if sig != 0 {
		s.signalMain(w, sig)
	}
	s.arm(w, s.cfg.DrainTimeout)
}

// signalMain sends sig to w's main process alone (see retire for why not
// its group).
func (s *Supervisor) signalMain(w *worker, sig syscall.Signal) {
	if err := s.env.kill(w.Pid, sig); err != nil {
		s.log.Warn("cannot signal worker", slog.Int("pid", w.Pid), slog.Any("error", err))
	}
}

// hurry asks w, draining in a generation beyond MaxDraining, to close
// what it cannot hand off now rather than kill it outright with every live
// connection it serves: the drain signal again, to its main process as
// retire sends it (a worker that knows takes it to close its idle
// connections, or simply exits), and its deadline pulled in to HurryGrace
// from now, where the usual deadline kill takes over. Only once per worker:
// the next generation past the cap must not cut a grace short or signal a
// worker a third time.
func (s *Supervisor) hurry(w *worker) {
	if w.Hurried || w.State == WorkerGone {
		return
	}
	w.Hurried = true
	if w.State.running() {
		// Once its main process has exited, what is left of its tree had
		// the drain signal from settle; only the deadline changes.
		s.signalMain(w, s.cfg.DrainSignal)
	}
	if w.Deadline.IsZero() || w.Deadline.Sub(s.env.now()) > s.cfg.HurryGrace {
		s.arm(w, s.cfg.HurryGrace)
	}
}

// replace takes w out of its slot and retires it with sig, and refills the
// slot at once: w hit a fatal error (STOPPING=1 unasked) or hung (watchdog).
func (s *Supervisor) replace(w *worker, cause RestartCause, reason string, sig syscall.Signal) {
	g := w.gen
	s.log.Warn("replacing worker", slog.Int("generation", g.N), slog.Int("worker", w.Slot),
		slog.Int("pid", w.Pid), slog.String("reason", reason))
	s.retire(w, sig, string(cause))
	if s.life.stopping {
		return // nothing is refilled once a stop has begun
	}
	if g.State == GenStarting && s.gens.current != nil {
		when := "before it was ready"
		if g.holding {
			when = fmt.Sprintf("within the ready hold (%s)", s.cfg.ReadyHold)
		}
		s.failGeneration(g, fmt.Sprintf("worker %d (pid %d): %s %s", w.Slot, w.Pid, reason, when))
		return
	}
	if g.slots[w.Slot] == w && (g == s.gens.current || g == s.gens.pending) {
		// Only the serving generation, or the one starting, is refilled:
		// a replaced one drains as it is.
		g.slots[w.Slot] = nil
		s.refill(g, w.Slot, cause)
	}
}

// onWorkerExit handles the end of w's main process (reaped with status ws).
func (s *Supervisor) onWorkerExit(w *worker, ws unix.WaitStatus) {
	delete(s.gens.byPid, w.Pid)
	w.stopIdleTimer()
	s.procs.rememberExit(w.Pid, s.env.now())
	s.closeHandoff(w)
	g := w.gen
	prev := w.State
	inSlot := g.slots[w.Slot] == w
	if inSlot {
		g.slots[w.Slot] = nil
	}
	// Lingering until settle finds its tree gone: from now on it has no
	// main process, whatever it was doing.
	s.setState(w, WorkerLingering)
	how := describeExit(ws)
	fields := []any{slog.Int("generation", g.N), slog.Int("worker", w.Slot), slog.Int("pid", w.Pid), slog.String("status", how)}
	switch {
	case prev == WorkerDraining:
		// Asked to stop: a clean exit, or our own signals, are expected.
		clean := (ws.Exited() && ws.ExitStatus() == 0) ||
			(ws.Signaled() && (ws.Signal() == s.cfg.DrainSignal || (!w.KilledAt.IsZero() && ws.Signal() == unix.SIGKILL)))
		if clean {
			s.log.Info("worker exited", fields...)
		} else {
			s.log.Warn("worker exited abnormally while draining", append(fields, slog.String("cause", w.Cause))...)
		}
	case s.life.stopping:
		s.log.Info("worker exited", fields...)
	case g.State == GenStarting && s.gens.current != nil:
		when := "before it was ready"
		if prev == WorkerReady {
			when = fmt.Sprintf("within the ready hold (%s)", s.cfg.ReadyHold)
		}
		s.log.Error("worker exited "+when, fields...)
		s.failGeneration(g, fmt.Sprintf("worker %d (pid %d) %s %s", w.Slot, w.Pid, how, when))
	case inSlot && (g == s.gens.current || g == s.gens.pending):
		// The active generation, or the first one, which has nothing to
		// fall back on: crash restarts until giving up.
		s.log.Error("worker exited unasked", append(fields, slog.String("state", string(prev)))...)
		if prev == WorkerReady && s.env.now().Sub(w.Started) >= stableAfter {
			g.Failures[w.Slot] = 0
		}
		s.refill(g, w.Slot, RestartExit)
	default:
		s.log.Info("worker exited", fields...)
	}
	if prev != WorkerDraining {
		// Its timer was the ready timeout or the watchdog: what is left
		// of its tree gets the drain timeout, as a retired worker does.
		s.arm(w, s.cfg.DrainTimeout)
	}
	s.settle(w, s.treesAfterExit(w))
}

// settle forgets w if its process tree (from trees) has ended; otherwise
// what is left of it gets the drain signal once, is killed at w's drain
// deadline, and is polled until it ends, or until killGrace after the
// SIGKILL: a process that survives it (another user's, stuck in the
// kernel) is logged and left, rather than holding the supervisor forever.
func (s *Supervisor) settle(w *worker, trees map[*worker][]int) {
	left := trees[w]
	w.Lingering = left
	if len(left) == 0 {
		s.setState(w, WorkerGone)
		return
	}
	s.lingerSignal(w, left)
	if !w.KilledAt.IsZero() {
		if s.env.now().Sub(w.KilledAt) > killGrace {
			s.log.Error("processes survive SIGKILL, leaving them", slog.Int("generation", w.gen.N),
				slog.Int("pid", w.Pid), slog.Any("processes", left))
			s.setState(w, WorkerGone)
			return
		}
		for _, pid := range left {
			s.env.kill(pid, unix.SIGKILL)
		}
	}
	s.pollSoon()
}

// lingerSignal sends what is left of w's tree the drain signal, once.
func (s *Supervisor) lingerSignal(w *worker, left []int) {
	if w.LingerSignalled {
		return
	}
	w.LingerSignalled = true
	msg := "worker's main process exited, stopping what is left of its process tree"
	if w.Stray {
		msg = "stopping a stray process tree"
	}
	s.log.Warn(msg, slog.Int("generation", w.gen.N), slog.Int("pid", w.Pid), slog.Any("processes", left))
	for _, pid := range left {
		s.env.kill(pid, s.cfg.DrainSignal)
	}
}

// kill9 kills w's whole tree now, and from now on at every poll.
func (s *Supervisor) kill9(w *worker) {
	s.kill9All([]*worker{w})
}

// kill9All kills the whole trees of ws, reading the process table once.
func (s *Supervisor) kill9All(ws []*worker) {
	now := s.env.now()
	trees := s.trees()
	for _, w := range ws {
		if w.KilledAt.IsZero() {
			w.KilledAt = now
		}
		if w.State.running() {
			s.env.kill(w.Pid, unix.SIGKILL)
		}
		for _, pid := range trees[w] {
			s.env.kill(pid, unix.SIGKILL)
		}
	}
}

// refill puts a new worker in g's emptied slot: at once for a worker that
// was replaced while it still runs (STOPPING=1, watchdog), after a backoff
// for one that exited. Every refill counts as a restart; more than
// MaxRestarts within RestartWindow with no ready worker left in g makes the
// supervisor give up.
func (s *Supervisor) refill(g *generation, slot int, cause RestartCause) {
	if s.life.stopping {
		return
	}
	now := s.env.now()
	s.life.restarts = append(s.life.restarts, now)
	for len(s.life.restarts) > 0 && now.Sub(s.life.restarts[0]) > s.cfg.RestartWindow {
		s.life.restarts = s.life.restarts[1:]
	}
	g.Restarts++
	s.count.Restarts++
	if s.hooks.Restart != nil {
		s.hooks.Restart(cause)
	}
	if len(s.life.restarts) > s.cfg.MaxRestarts && g.readyCount() == 0 {
		s.giveUp(fmt.Errorf("giving up: %d restarts within %s and no ready worker left",
			len(s.life.restarts), s.cfg.RestartWindow))
		return
	}
	if cause != RestartExit {
		s.startWorker(g, slot)
		return
	}
	s.scheduleRestart(g, slot)
}

func (s *Supervisor) scheduleRestart(g *generation, slot int) {
	k := min(g.Failures[slot], 16)
	g.Failures[slot]++
	d := min(backoffBase<<k, backoffMax)
	d = time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
	s.log.Info("restarting worker", slog.Int("generation", g.N), slog.Int("worker", slot), slog.Duration("backoff", d))
	s.after(d, evRestart{g, slot})
}
