package supervise

import (
	"fmt"
	"math/rand/v2"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// A worker's life has one owner: the functions in this file. retire asks a
// worker to stop, exited handles the end of its main process, gone forgets
// it once its whole process tree has ended, and refill puts a new worker in
// an emptied slot (counting restarts and deciding to give up). One deadline
// timer per worker (arm) serves every state: the ready timeout while it
// starts, the watchdog while it is ready, the drain deadline while it drains
// or while what is left of its tree lingers.

// arm (re)sets w's deadline timer to fire after d; d < 0 disarms it.
func (s *Supervisor) arm(w *worker, d time.Duration) {
	if w.timer != nil {
		w.timer.Stop()
		w.timer = nil
	}
	w.timerSeq++
	w.deadline = time.Time{}
	if d < 0 {
		return
	}
	w.deadline = time.Now().Add(d)
	seq := w.timerSeq
	w.timer = time.AfterFunc(d, func() { s.post(evDeadline{w, seq}) })
}

// onDeadline handles w's deadline timer, as the state it was armed for.
func (s *Supervisor) onDeadline(w *worker, seq uint64) {
	if seq != w.timerSeq || w.gone {
		return // re-armed or disarmed since
	}
	w.timer = nil
	g := w.gen
	switch {
	case w.exited || w.state == WorkerDraining:
		fields := []zap.Field{zap.Int("generation", g.n), zap.Int("pid", w.pid), zap.Duration("drain_timeout", s.cfg.DrainTimeout)}
		if w.hurried {
			// Its deadline may have been pulled in: the drain timeout
			// alone would not explain the kill.
			fields = append(fields, zap.Bool("hurried", true), zap.Duration("hurry_grace", s.cfg.HurryGrace))
		}
		s.log.Warn("worker did not drain in time, killing its process tree", fields...)
		s.kill9(w)
	case w.state == WorkerStarting:
		s.onReadyTimeout(w)
	case w.state == WorkerReady && s.cfg.Watchdog > 0:
		s.onWatchdog(w)
	}
}

func (s *Supervisor) onReadyTimeout(w *worker) {
	reason := fmt.Sprintf("worker %d (pid %d) not ready within %s", w.slot, w.pid, w.readyTimeout)
	if w.gen.state == GenStarting && s.current != nil {
		s.failGeneration(w.gen, reason)
		return
	}
	// A replacement worker, or one of the first generation, that hangs at
	// start: kill it, and its exit counts as a crash.
	s.log.Error("worker not ready in time, killing its process tree", zap.Int("generation", w.gen.n),
		zap.Int("pid", w.pid), zap.Duration("ready_timeout", w.readyTimeout))
	s.kill9(w)
}

// onWatchdog replaces a worker that sent no WATCHDOG=1 within --watchdog
// (sd_watchdog_enabled(3)); like systemd, it is sent SIGABRT first.
func (s *Supervisor) onWatchdog(w *worker) {
	if since := time.Since(w.lastPing); since < s.cfg.Watchdog {
		s.arm(w, s.cfg.Watchdog-since)
		return
	}
	s.replace(w, "watchdog", fmt.Sprintf("no WATCHDOG=1 for %s", s.cfg.Watchdog), unix.SIGABRT)
}

// retire asks w to stop with sig (0: none, it stops by itself) and arms its
// drain deadline, after which its whole process tree is killed. Its exit is
// expected from now on. The drain signal goes to the worker's main process
// only, as systemd's KillMode=mixed does: servers with processes of their
// own (a master and its workers, a Node.js cluster) drain them in their own
// order, and a group signal would cut those short. What is left of the tree
// once the main process has exited gets the drain signal then (exited).
func (s *Supervisor) retire(w *worker, sig syscall.Signal, cause string) {
	if w.asked || w.exited {
		return
	}
	w.asked = true
	w.cause = cause
	w.state = WorkerDraining
	if sig != 0 {
		s.signalMain(w, sig)
	}
	s.arm(w, s.cfg.DrainTimeout)
}

// signalMain sends sig to w's main process alone (see retire for why not
// its group).
func (s *Supervisor) signalMain(w *worker, sig syscall.Signal) {
	if err := s.env.kill(w.pid, sig); err != nil {
		s.log.Warn("cannot signal worker", zap.Int("pid", w.pid), zap.Error(err))
	}
}

// hurry asks w, draining in a generation beyond --max-draining, to close
// what it cannot hand off now rather than kill it outright with every live
// connection it serves: the drain signal again, to its main process as
// retire sends it (a worker that knows takes it to close its idle
// connections, or simply exits), and its deadline pulled in to HurryGrace
// from now, where the usual deadline kill takes over. Only once per worker:
// the next generation past the cap must not cut a grace short or signal a
// worker a third time.
func (s *Supervisor) hurry(w *worker) {
	if w.hurried || w.gone {
		return
	}
	w.hurried = true
	if !w.exited {
		// Once its main process has exited, what is left of its tree had
		// the drain signal from settle; only the deadline changes.
		s.signalMain(w, s.cfg.DrainSignal)
	}
	if w.deadline.IsZero() || time.Until(w.deadline) > s.cfg.HurryGrace {
		s.arm(w, s.cfg.HurryGrace)
	}
}

// replace takes w out of its slot and retires it with sig, and refills the
// slot at once: w hit a fatal error (STOPPING=1 unasked) or hung (watchdog).
func (s *Supervisor) replace(w *worker, cause, reason string, sig syscall.Signal) {
	g := w.gen
	s.log.Warn("replacing worker", zap.Int("generation", g.n), zap.Int("worker", w.slot),
		zap.Int("pid", w.pid), zap.String("reason", reason))
	s.retire(w, sig, cause)
	if s.stopping {
		return // nothing is refilled once a stop has begun
	}
	if g.state == GenStarting && s.current != nil {
		s.failGeneration(g, fmt.Sprintf("worker %d (pid %d): %s before it was ready", w.slot, w.pid, reason))
		return
	}
	if g.slots[w.slot] == w {
		g.slots[w.slot] = nil
		s.refill(g, w.slot, cause)
	}
}

// exited handles the end of w's main process (reaped with status ws).
func (s *Supervisor) exited(w *worker, ws unix.WaitStatus) {
	delete(s.workers, w.pid)
	s.rememberExit(w.pid)
	w.exited = true
	s.closeHandoff(w)
	g := w.gen
	prev := w.state
	inSlot := g.slots[w.slot] == w
	if inSlot {
		g.slots[w.slot] = nil
	}
	how := describeExit(ws)
	fields := []zap.Field{zap.Int("generation", g.n), zap.Int("worker", w.slot), zap.Int("pid", w.pid), zap.String("status", how)}
	switch {
	case w.asked:
		// Asked to stop: a clean exit, or our own signals, are expected.
		clean := (ws.Exited() && ws.ExitStatus() == 0) ||
			(ws.Signaled() && (ws.Signal() == s.cfg.DrainSignal || (w.killed && ws.Signal() == unix.SIGKILL)))
		if clean {
			s.log.Info("worker exited", fields...)
		} else {
			s.log.Warn("worker exited abnormally while draining", append(fields, zap.String("cause", w.cause))...)
		}
	case s.stopping:
		s.log.Info("worker exited", fields...)
	case g.state == GenStarting && s.current != nil:
		s.log.Error("worker exited before it was ready", fields...)
		s.failGeneration(g, fmt.Sprintf("worker %d (pid %d) %s before it was ready", w.slot, w.pid, how))
	case inSlot && (g == s.current || g == s.pending):
		// The active generation, or the first one, which has nothing to
		// fall back on: crash restarts until giving up.
		s.log.Error("worker exited unasked", append(fields, zap.String("state", string(prev)))...)
		if prev == WorkerReady && time.Since(w.started) >= stableAfter {
			g.failures[w.slot] = 0
		}
		s.refill(g, w.slot, "exit")
	default:
		s.log.Info("worker exited", fields...)
	}
	w.state = WorkerDraining
	s.settle(w, s.trees())
}

// settle forgets w if its process tree (from trees) has ended; otherwise
// what is left of it gets the drain signal once, is killed at w's drain
// deadline, and is polled until it ends, or until killGrace after the
// SIGKILL: a process that survives it (another user's, stuck in the
// kernel) is logged and left, rather than holding the supervisor forever.
func (s *Supervisor) settle(w *worker, trees map[*worker][]int) {
	left := trees[w]
	w.lingering = left
	if len(left) == 0 {
		s.gone(w)
		return
	}
	if !w.lingerSignalled {
		w.lingerSignalled = true
		s.log.Warn("worker's main process exited, stopping what is left of its process tree",
			zap.Int("generation", w.gen.n), zap.Int("pid", w.pid), zap.Ints("processes", left))
		for _, pid := range left {
			s.env.kill(pid, s.cfg.DrainSignal)
		}
		if !w.asked {
			// Its timer was the ready timeout or the watchdog: what is
			// left gets the drain timeout, as a retired worker does.
			s.arm(w, s.cfg.DrainTimeout)
		}
	}
	if w.killed {
		if time.Since(w.killedAt) > killGrace {
			s.log.Error("processes survive SIGKILL, leaving them", zap.Int("generation", w.gen.n),
				zap.Int("pid", w.pid), zap.Ints("processes", left))
			s.gone(w)
			return
		}
		for _, pid := range left {
			s.env.kill(pid, unix.SIGKILL)
		}
	}
	s.pollSoon()
}

// kill9 kills w's whole tree now, and from now on at every poll.
func (s *Supervisor) kill9(w *worker) {
	if !w.killed {
		w.killed = true
		w.killedAt = time.Now()
	}
	s.killTree(w, unix.SIGKILL)
}

// gone forgets w: nothing of its process tree is left.
func (s *Supervisor) gone(w *worker) {
	w.gone = true
	w.state = WorkerExited
	w.lingering = nil
	s.arm(w, -1)
	delete(w.gen.live, w)
	s.reapGeneration(w.gen)
}

// refill puts a new worker in g's emptied slot: at once for a worker that
// was replaced while it still runs (STOPPING=1, watchdog), after a backoff
// for one that exited. Every refill counts as a restart; more than
// MaxRestarts within RestartWindow with no ready worker left in g makes the
// supervisor give up.
func (s *Supervisor) refill(g *generation, slot int, cause string) {
	if s.stopping {
		return
	}
	now := time.Now()
	s.restarts = append(s.restarts, now)
	for len(s.restarts) > 0 && now.Sub(s.restarts[0]) > s.cfg.RestartWindow {
		s.restarts = s.restarts[1:]
	}
	g.restarts++
	s.restartCount++
	if s.hooks.Restart != nil {
		s.hooks.Restart(cause)
	}
	if len(s.restarts) > s.cfg.MaxRestarts && g.readyCount() == 0 {
		s.giveUp(fmt.Errorf("giving up: %d restarts within %s and no ready worker left",
			len(s.restarts), s.cfg.RestartWindow))
		return
	}
	if cause != "exit" {
		s.startWorker(g, slot)
		return
	}
	s.scheduleRestart(g, slot)
}

func (s *Supervisor) scheduleRestart(g *generation, slot int) {
	k := min(g.failures[slot], 16)
	g.failures[slot]++
	d := min(backoffBase<<k, backoffMax)
	d = time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
	s.log.Info("restarting worker", zap.Int("generation", g.n), zap.Int("worker", slot), zap.Duration("backoff", d))
	time.AfterFunc(d, func() { s.post(evRestart{g, slot}) })
}

// giveUp stops retrying: /readyz says "gave up" from now until the exit,
// which comes no sooner than GiveUpLinger from now, so that probes see it.
func (s *Supervisor) giveUp(err error) {
	s.log.Error("giving up", zap.Error(err), zap.Int("restarts", len(s.restarts)), zap.Duration("window", s.cfg.RestartWindow))
	s.gaveUp = true
	s.lingerUntil = time.Now().Add(s.cfg.GiveUpLinger)
	time.AfterFunc(s.cfg.GiveUpLinger, func() { s.post(evPoll{}) })
	s.env.notifyManager("STATUS=" + err.Error())
	s.beginStop(err)
}

// trees maps every worker with live processes to the processes of its tree
// other than its main process: its descendants, and the orphans reparented
// to the supervisor (its subreaper) that came from it. An orphan is
// attributed by what it kept from the worker: its process group (the
// worker leads its own), a pid seen in the worker's tree before, or the
// UPGRADER_GENERATION and UPGRADER_WORKER of its environment. An orphan none
// of these name belongs to no worker; it is killed at the final sweep.
func (s *Supervisor) trees() map[*worker][]int {
	tab, err := s.env.processes()
	if err != nil || tab == nil {
		return nil
	}
	kids := tab.Children()
	byPid := map[int]*worker{}
	var all []*worker
	for _, g := range s.gens {
		for w := range g.live {
			all = append(all, w)
			if w.exited {
				// Its own pid may be reused; its process group id too,
				// which is how orphans still name it.
				byPid[w.pid] = w
			}
			for _, p := range w.lingering {
				byPid[p] = w
			}
		}
	}
	for _, w := range all {
		if !w.exited {
			byPid[w.pid] = w // a running main process wins over any reuse
		}
	}
	out := map[*worker][]int{}
	for _, w := range all {
		if !w.exited {
			out[w] = tab.Below(kids, w.pid)
		}
	}
	for _, pid := range kids[s.pid] {
		if w := byPid[pid]; w != nil && w.pid == pid && !w.exited {
			continue // a worker's own main process
		}
		w := byPid[pid]
		if w == nil {
			w = byPid[tab[pid].Pgid]
		}
		if w == nil {
			w = s.workerByEnviron(all, s.env.environ(pid))
		}
		if w != nil {
			out[w] = append(append(out[w], pid), tab.Below(kids, pid)...)
		}
	}
	return out
}

// workerByEnviron finds the worker whose UPGRADER_GENERATION and
// UPGRADER_WORKER an orphan inherited: the latest started in that slot.
func (s *Supervisor) workerByEnviron(all []*worker, env map[string]string) *worker {
	var found *worker
	gen, slot := env["UPGRADER_GENERATION"], env["UPGRADER_WORKER"]
	if gen == "" || slot == "" {
		return nil
	}
	for _, w := range all {
		if fmt.Sprint(w.gen.n) == gen && fmt.Sprint(w.slot) == slot && (found == nil || w.started.After(found.started)) {
			found = w
		}
	}
	return found
}

// killTree sends sig to w's main process, while it runs, and to every
// process of its tree.
func (s *Supervisor) killTree(w *worker, sig syscall.Signal) {
	if !w.exited {
		s.env.kill(w.pid, sig)
	}
	for _, pid := range s.trees()[w] {
		s.env.kill(pid, sig)
	}
}

// pollSoon has the loop look at lingering process trees again shortly.
func (s *Supervisor) pollSoon() {
	if s.pollArmed {
		return
	}
	s.pollArmed = true
	time.AfterFunc(pollInterval, func() { s.post(evPoll{}) })
}

// onPoll settles lingering trees and, once stopping with no worker left,
// sweeps away every other process below the supervisor.
func (s *Supervisor) onPoll() {
	s.pollArmed = false
	var trees map[*worker][]int
	for _, g := range append([]*generation(nil), s.gens...) {
		for w := range g.live {
			if w.exited {
				if trees == nil {
					trees = s.trees()
				}
				s.settle(w, trees)
			}
		}
	}
	s.sweep()
}

// sweep, once stopping with no worker left, kills whatever else runs below
// the supervisor (orphans no worker could be named for), so that nothing it
// started outlives it holding a listener.
func (s *Supervisor) sweep() {
	if !s.stopping || s.liveWorkers() > 0 || s.swept {
		return
	}
	tab, err := s.env.processes()
	if err != nil || tab == nil {
		s.swept = true
		return
	}
	left := tab.Descendants(s.pid)
	if len(left) == 0 {
		s.swept = true
		return
	}
	if s.sweepStarted.IsZero() {
		s.sweepStarted = time.Now()
		s.log.Warn("killing processes left below the supervisor", zap.Ints("pids", left))
	} else if time.Since(s.sweepStarted) > killGrace {
		s.log.Error("processes below the supervisor survive SIGKILL, leaving them", zap.Ints("pids", left))
		s.swept = true
		return
	}
	for _, pid := range left {
		s.env.kill(pid, unix.SIGKILL)
	}
	s.pollSoon()
}

func (s *Supervisor) liveWorkers() int {
	n := 0
	for _, g := range s.gens {
		n += len(g.live)
	}
	return n
}

// rememberExit keeps a reaped worker's pid for a while: the last notify
// message of a worker can arrive after its exit was reaped.
func (s *Supervisor) rememberExit(pid int) {
	now := time.Now()
	for p, t := range s.recentExits {
		if now.Sub(t) > recentExitTTL {
			delete(s.recentExits, p)
		}
	}
	s.recentExits[pid] = now
}
