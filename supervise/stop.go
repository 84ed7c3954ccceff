package supervise

import (
	"context"
	"log/slog"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// lifecycle is where the supervisor is between its start and its exit:
// serving, announced to stop (PreStop), stopping, given up.
type lifecycle struct {
	stopping bool
	err      error // what Run returns
	// preStopAt is when PreStop first asked for not-ready ahead of a stop
	// (zero: never); the stop's shutdown delay counts from then.
	preStopAt time.Time
	// restarts are the crash restarts within the restart window.
	restarts    []time.Time
	gaveUp      bool
	lingerUntil time.Time // after giving up, exit no sooner than this
	// swept: stopping, and nothing is left below the supervisor;
	// sweepStarted is when the final sweep first found processes to kill.
	swept        bool
	sweepStarted time.Time
}

// Stop begins a graceful stop, as SIGTERM does (not-ready, ShutdownDelay,
// then every generation drains), and waits until Run has returned. When
// ctx ends first the stop turns fast, as a second SIGTERM does (every
// worker's tree is sent SIGKILL), and Stop returns ctx's error once Run
// has returned. ErrNotRunning: Run is not running.
func (s *Supervisor) Stop(ctx context.Context) error {
	if err := s.call(ctx, func() { s.beginStop(nil) }); err != nil {
		return err
	}
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
	}
	_ = s.call(context.Background(), s.killAll)
	<-s.done
	return ctx.Err()
}

// beginStop starts a graceful stop: not-ready at once, drain after the
// shutdown delay. err is what Run will return.
func (s *Supervisor) beginStop(err error) {
	if s.life.err == nil {
		s.life.err = err
	}
	if s.life.stopping {
		return
	}
	s.life.stopping = true
	s.upgrades.queued = false
	for _, ch := range append(s.upgrades.waiting, s.upgrades.starting...) {
		ch <- Progress{Event: EventFailed, Reason: "the supervisor is stopping"}
		close(ch)
	}
	s.upgrades.waiting, s.upgrades.starting = nil, nil
	for _, su := range []*selfUpgrade{s.reexec.cur, s.reexec.queued} {
		if su != nil {
			s.selfFailed(su, "the supervisor is stopping")
		}
	}
	s.env.notifyManager(daemon.SdNotifyStopping)
	delay := s.cfg.ShutdownDelay
	if !s.life.preStopAt.IsZero() {
		delay -= s.env.now().Sub(s.life.preStopAt) // served, or being served, by PreStop
	}
	if err != nil || delay <= 0 {
		s.drainAll()
		return
	}
	s.after(delay, evShutdown{})
}

// PreStop makes the supervisor report not-ready from now on, ahead of a
// stop that has not been signalled yet (a Kubernetes preStop hook runs
// before the kubelet sends SIGTERM), and returns how much of
// Config.ShutdownDelay is left to wait, counted from the first PreStop (0
// once it has passed, or once the stop has begun). The workers keep
// serving; the stop that follows drains once the whole delay has passed
// since the first PreStop, not a second delay after it. There is no way
// back but a restart: a self-upgrade is refused from then on. The error
// is ErrNotRunning or ctx's.
func (s *Supervisor) PreStop(ctx context.Context) (time.Duration, error) {
	var left time.Duration
	err := s.call(ctx, func() {
		if s.life.stopping {
			return
		}
		if s.life.preStopAt.IsZero() {
			s.life.preStopAt = s.env.now()
			s.log.Info("prestop: not ready from now on; the stop's shutdown delay starts now",
				slog.Duration("shutdown_delay", s.cfg.ShutdownDelay))
		}
		left = max(0, s.cfg.ShutdownDelay-s.env.now().Sub(s.life.preStopAt))
	})
	return left, err
}

// drainAll drains every generation for a stop, and closes the
// supervisor's copies of the listeners.
func (s *Supervisor) drainAll() {
	for _, g := range append([]*generation(nil), s.gens.all...) {
		if g.State == GenStarting {
			s.cancelGeneration(g)
			continue
		}
		s.drainGeneration(g)
	}
	s.closeListeners()
}

// closeListeners closes the supervisor's copy of every listener once a
// stop drains: no later generation will need them. Held open, they would
// keep the kernel completing handshakes and queueing connections after the
// last worker closed its copy, and every such connection, its request
// already sent, would be reset when upgrader exits (one per client, per
// measurement). Closed, the socket goes with the last worker's copy and a
// later connection is refused, which a client or balancer can always
// retry. A copy systemd holds (socket unit, fd store) keeps the socket
// listening for the next start, as it should.
func (s *Supervisor) closeListeners() {
	for _, l := range s.cfg.Listeners {
		if err := l.Close(); err != nil {
			s.log.Warn("closing the listener for the stop", slog.String("listener", l.Name()), slog.Any("error", err))
		}
	}
	s.closeOwnSockets()
}

// killAll kills every worker's process tree at once (a fast stop), and
// cuts any give-up linger short.
func (s *Supervisor) killAll() {
	s.life.stopping = true
	s.life.lingerUntil = time.Time{}
	s.trees() // strays found now are among the workers killed
	var all []*worker
	for _, g := range s.gens.all {
		for w := range g.live {
			all = append(all, w)
		}
	}
	s.kill9All(all)
}

// giveUp stops retrying: /readyz says "gave up" from now until the exit,
// which comes no sooner than GiveUpLinger from now, so that probes see it.
func (s *Supervisor) giveUp(err error) {
	s.log.Error("giving up", slog.Any("error", err), slog.Int("restarts", len(s.life.restarts)), slog.Duration("window", s.cfg.RestartWindow))
	s.life.gaveUp = true
	s.life.lingerUntil = s.env.now().Add(s.cfg.GiveUpLinger)
	s.after(s.cfg.GiveUpLinger, evPoll{})
	s.env.notifyManager("STATUS=" + err.Error())
	s.beginStop(err)
}

// finished reports whether a stop is complete: no worker, nothing else
// below the supervisor, and any give-up linger over.
func (s *Supervisor) finished() bool {
	return s.life.stopping && s.gens.liveWorkers() == 0 && s.life.swept && !s.env.now().Before(s.life.lingerUntil)
}

// sweep, once stopping with no worker left, kills whatever else runs below
// the supervisor (orphans no worker could be named for), so that nothing it
// started outlives it holding a listener.
func (s *Supervisor) sweep() {
	if !s.life.stopping || s.gens.liveWorkers() > 0 || s.life.swept {
		return
	}
	if !s.cfg.Subreaper {
		// Orphans go to init, not to us; what runs below us otherwise is
		// the host program's own.
		s.life.swept = true
		return
	}
	tab, err := s.env.processes()
	if err != nil || tab == nil {
		s.life.swept = true
		return
	}
	left := tab.Descendants(s.spawnEnv.supervisorPid)
	if len(left) == 0 {
		s.life.swept = true
		return
	}
	now := s.env.now()
	if s.life.sweepStarted.IsZero() {
		s.life.sweepStarted = now
		s.log.Warn("killing processes left below the supervisor", slog.Any("pids", left))
	} else if now.Sub(s.life.sweepStarted) > killGrace {
		s.log.Error("processes below the supervisor survive SIGKILL, leaving them", slog.Any("pids", left))
		s.life.swept = true
		return
	}
	for _, pid := range left {
		s.env.kill(pid, unix.SIGKILL)
	}
	s.pollSoon()
}
