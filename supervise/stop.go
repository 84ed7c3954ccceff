package supervise

import (
	"context"
	"log/slog"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/sockets"
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
	// quiescing: the stop's listeners refuse new connections, and the
	// drain waits for their queues; drained: the stop has drained.
	quiescing, drained bool
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
	s.env.closeSpares() // no worker starts from now on
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
// supervisor's copies of the listeners; first, the listeners upgrader owns
// stop taking new connections, and the drain waits (bounded) until the
// workers have accepted what their queues hold.
func (s *Supervisor) drainAll() {
	if s.life.quiescing {
		return
	}
	s.life.quiescing = true
	// Draining from now on, as status says: no new connection comes, and
	// the signal follows once the queues are accepted.
	for _, g := range s.gens.all {
		if g.State != GenStarting {
			s.markDraining(g)
		}
	}
	s.awaitEmptyQueues(s.quiesceListeners(), s.drainNow)
}

// drainNow drains every generation and closes the listeners.
func (s *Supervisor) drainNow() {
	if s.life.drained {
		return
	}
	s.life.drained = true
	for _, g := range append([]*generation(nil), s.gens.all...) {
		if g.State == GenStarting {
			s.cancelGeneration(g)
			continue
		}
		s.drainGeneration(g)
	}
	s.closeListeners()
}

const (
	// quiesceMax bounds the wait for the accept queues to empty before a
	// stop drains. Workers that accept at all take a queue of thousands
	// in milliseconds; one still not empty after a second is one no
	// worker accepts from (all stalled, or busy in a server that accepts
	// only between requests), and the stop must not hang on it: what is
	// left is reset at the close, as without the wait.
	quiesceMax = time.Second
	// quiescePoll is how often the queues are looked at (a TCP_INFO
	// getsockopt per listener; a sock_diag dump of the listener's port's
	// SYN_RECV sockets once the queues are empty).
	quiescePoll = 5 * time.Millisecond
)

// quiesceListeners makes the listeners upgrader owns stop taking new
// connections while their queues stay accept()-able: a TCP socket gets the
// SYN filter (sockets.RefuseNewConnections: new SYNs are dropped, the
// client retransmits and is refused once the socket is closed), a Unix
// socket whose path upgrader bound loses the path (new connect()s fail
// with ENOENT). It returns the fds whose queues the drain waits on. A
// socket systemd keeps for the next start (a socket unit's, Own unset) is
// left alone: its queue waits for that start, and a filter would keep the
// connections that trigger it from arriving. An abstract Unix socket, or
// one whose path the fd store keeps, cannot refuse without losing what
// the next start needs, and is left alone too. The generations' own
// sockets (a listener per generation, steer.go) are upgrader's whoever
// holds the listener's, and are filtered with it.
func (s *Supervisor) quiesceListeners() []int {
	var fds []int
	for i, l := range s.cfg.Listeners {
		sock := l.Socket()
		if sock.FD < 0 || !sock.Spec.Stream() || (!sock.Own && sock.Spec.Network == "unix") {
			continue
		}
		if sock.Spec.Network == "unix" {
			if removed, err := sock.Unlink(); err != nil {
				s.log.Warn("stop: cannot remove the listener's path; new connections queue until the close resets them",
					slog.String("listener", l.Name()), slog.Any("error", err))
			} else if removed {
				fds = append(fds, sock.FD)
			}
			continue
		}
		all := s.listenSockets(i) // the listener's own first
		if !sock.Own {
			all = all[1:]
		}
		fds = append(fds, s.refuseNew(all)...)
	}
	return fds
}

// refuseNew attaches the SYN filter to each TCP listener of fds and
// returns those it is on.
func (s *Supervisor) refuseNew(fds []int) []int {
	var on []int
	for _, fd := range fds {
		if err := sockets.RefuseNewConnections(fd); err != nil {
			s.log.Warn("stop: cannot make the listener refuse new connections; those queued at the close are reset", slog.Any("error", err))
			continue
		}
		on = append(on, fd)
	}
	return on
}

// awaitEmptyQueues calls then, on the loop, once no connection waits in
// the accept queue of any of fds and no handshake is under way on them
// (SYN_RECV: it would join the queue once its ACK comes), or quiesceMax
// from now, or at once when no worker is left to accept.
func (s *Supervisor) awaitEmptyQueues(fds []int, then func()) {
	if len(fds) == 0 || s.gens.liveWorkers() == 0 {
		then()
		return
	}
	start := s.env.now()
	told := false
	var look func()
	look = func() {
		queued, handshakes := s.queued(fds)
		waited := s.env.now().Sub(start)
		if handshakes > 0 && !told {
			told = true
			s.log.Info("stop: handshakes under way, waiting for them to complete and be accepted",
				slog.Int("handshakes", handshakes), slog.Duration("waited", waited))
		}
		switch {
		case queued+handshakes == 0:
			s.log.Info("stop: no new connections taken, the queues accepted; draining",
				slog.Int("listeners", len(fds)), slog.Duration("waited", waited))
		case waited >= quiesceMax || s.gens.liveWorkers() == 0:
			s.log.Warn("stop: connections still queued, draining anyway; they are reset at the close",
				slog.Int("queued", queued), slog.Int("handshakes", handshakes), slog.Duration("waited", waited))
		default:
			s.after(quiescePoll, evFunc{look})
			return
		}
		then()
	}
	s.after(quiescePoll, evFunc{look})
}

// queued sums the accept queues of fds and, once those are empty, the
// handshakes under way on the TCP ones (a sock_diag dump each, so only
// then). A socket that cannot be read counts as empty: the wait is a
// bounded help, never a reason to hang the stop.
func (s *Supervisor) queued(fds []int) (queued, handshakes int) {
	for _, fd := range fds {
		n, err := sockets.QueueLen(fd)
		if err != nil {
			s.log.Warn("stop: cannot read the listener's accept queue", slog.Any("error", err))
		}
		queued += n
	}
	if queued > 0 {
		return queued, 0
	}
	for _, fd := range fds {
		if dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); err != nil || dom == unix.AF_UNIX {
			continue
		}
		n, err := sockets.HandshakesPending(fd)
		if err != nil {
			s.log.Warn("stop: cannot count the listener's handshakes under way", slog.Any("error", err))
		}
		handshakes += n
	}
	return 0, handshakes
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
	s.closeOwnSockets() // first: it tells the listener's own socket by its fd
	for _, l := range s.cfg.Listeners {
		if err := l.Close(); err != nil {
			s.log.Warn("closing the listener for the stop", slog.String("listener", l.Name()), slog.Any("error", err))
		}
	}
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
