package supervise

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
	"github.com/seed6cb0314a/upgrader/internal/spawn"
)

// Events the loop consumes. Only the loop goroutine reads or writes the
// supervisor's state; everything else talks to it through these.
type event interface{}

type (
	evSignal struct{ sig syscall.Signal }
	evExit   struct {
		pid    int
		status unix.WaitStatus
	}
	evNotify struct {
		dg sdnotify.Datagram
		// dropped counts fds the notify reader closed at once (they came
		// without FDSTORE=1, or over the budget of fds in flight);
		// release returns the budget held by dg.Files.
		dropped   int
		truncated bool // more fds came than --fd-store-max: the kernel closed the rest
		release   func()
	}
	evReady struct {
		pid int
		w   *worker
	} // w is nil when it came by pid (fd readiness)
	evDeadline struct {
		w   *worker
		seq uint64
	}
	evRestart struct {
		g    *generation
		slot int
	}
	evShutdown struct{} // --shutdown-delay is over
	evPoll     struct{} // look at lingering process trees again
	evFunc     struct{ f func() }
	evHandoff  struct {
		w   *worker
		m   handoff.Message
		fds []int
		err error
	}
	evHandoffClosed     struct{ w *worker }
	evHandoffTimeout    struct{ id uint64 }
	evHandoffSendFailed struct {
		w   *worker
		m   handoff.Message
		err error
	}
)

const (
	// Backoff for crash restarts: base·2^k with ±20% jitter, capped; reset
	// after a worker stayed up for stableAfter.
	backoffBase = 100 * time.Millisecond
	backoffMax  = 10 * time.Second
	stableAfter = 10 * time.Second
	// pollInterval is how often lingering process trees are looked at.
	pollInterval = 50 * time.Millisecond
	// recentExitTTL is how long a reaped worker's pid is still known, for
	// its last notify messages.
	recentExitTTL = 10 * time.Second
	// killGrace is how long processes sent SIGKILL are waited for.
	killGrace = 5 * time.Second
)

// Supervisor runs generations of workers. Create it with New, then call Run.
type Supervisor struct {
	cfg    Config
	env    env
	log    *zap.Logger
	events chan event
	// calls carries Status and Upgrade requests apart from events, so that
	// a flood of notify messages cannot delay them.
	calls chan evFunc
	done  chan struct{}

	// State below is owned by the Run goroutine.
	notifyPath string
	baseEnv    []string
	nextGen    int
	current    *generation   // the active generation, serving
	pending    *generation   // the generation an upgrade is starting
	gens       []*generation // every generation with live processes, oldest first
	workers    map[int]*worker
	// recentExits holds the pids of workers reaped lately, for the notify
	// messages they sent just before they exited.
	recentExits map[int]time.Time
	// members maps the pids of workers' trees to their worker, as last
	// read for a notify message; strangers holds pids found in no tree,
	// until when they are not looked up again (treeMember).
	members   map[int]*worker
	strangers map[int]time.Time
	queued    bool // one more upgrade asked for during this one
	restarts  []time.Time
	stopping  bool
	stopErr   error
	// preStopAt is when PreStop first asked for not-ready ahead of a stop
	// (zero: never); the stop's shutdown delay counts from then.
	preStopAt   time.Time
	hooks       Hooks
	lastUp      UpgradeResult
	pid         int
	gaveUp      bool
	lingerUntil time.Time // after giving up, exit no sooner than this
	pollArmed   bool
	swept       bool // stopping, and nothing is left below the supervisor
	// sweepStarted is when the final sweep first found processes to kill.
	sweepStarted time.Time
	warns        *limiter
	// afterEvent, for tests, sees every event once the loop has handled it.
	afterEvent func(event)

	upgradesOK, upgradesFailed, restartCount int
	// Handoffs under way, by the id the supervisor gave the forwarded batch.
	pendingHO map[uint64]*pendingHandoff
	nextHOID  uint64
	rr        int // round-robin over handoff targets
	hoStats   HandoffStats
	// fdStore holds fds workers stored with FDSTORE=1, passed to every
	// later worker after the listeners.
	fdStore []storedFD
	// Watchers of upgrades requested through Upgrade: those for the next
	// generation to start, and those for the upgrade queued behind it.
	startWatchers, queuedWatchers []chan Progress
	// Self-upgrade: the one under way (checking the new binary, or
	// about to exec), the one queued behind a worker upgrade, the last
	// outcome, how many times this process re-executed itself, and the
	// record it resumed from (nil: a fresh start).
	self, selfQueued *selfUpgrade
	lastSelf         *SelfResult
	execs            int
	resumed          *State
}

// Hooks are called from the loop goroutine on state transitions, as
// net/http's ConnState is; they must not block.
type Hooks struct {
	// Upgrade is called when an upgrade ends, with its result.
	Upgrade func(UpgradeResult)
	// Restart is called when a worker is replaced unasked (crash,
	// STOPPING=1, watchdog), with the cause: "exit", "stopping" or
	// "watchdog".
	Restart func(cause string)
	// BeforeExec is called, off the loop (which keeps answering), once a
	// self-upgrade is about to exec: it quiesces what serves the carried
	// listeners (the health endpoints) and returns how to resume them,
	// called if the exec does not happen after all.
	BeforeExec func() (resume func())
}

// UpgradeResult describes one finished upgrade.
type UpgradeResult struct {
	Generation int       `json:"generation"`
	OK         bool      `json:"ok"`
	Reason     string    `json:"reason,omitempty"` // why it failed
	Started    time.Time `json:"started"`
	// ReadyAfter is from the start of the new generation until all its
	// workers were ready, or until it failed.
	ReadyAfter time.Duration `json:"ready_after_ns"`
}

// New checks cfg and returns a Supervisor that runs it on the real OS.
func New(cfg Config) (*Supervisor, error) {
	e, err := newOSEnv(cfg)
	if err != nil {
		return nil, err
	}
	return newSupervisor(cfg, e)
}

func newSupervisor(cfg Config, e env) (*Supervisor, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if _, err := e.lookPath(cfg.Command[0]); err != nil {
		return nil, err
	}
	return &Supervisor{
		cfg:         cfg,
		env:         e,
		log:         cfg.Log,
		events:      make(chan event, 256),
		calls:       make(chan evFunc),
		done:        make(chan struct{}),
		workers:     make(map[int]*worker),
		recentExits: make(map[int]time.Time),
		members:     make(map[int]*worker),
		strangers:   make(map[int]time.Time),
		baseEnv:     workerBaseEnv(os.Environ()),
		pid:         os.Getpid(),
		pendingHO:   make(map[uint64]*pendingHandoff),
		warns:       newLimiter(warnBurst, warnWindow),
	}, nil
}

// SetHooks installs hooks; call it before Run.
func (s *Supervisor) SetHooks(h Hooks) { s.hooks = h }

// post hands an event to the loop. It never blocks once the loop is gone.
func (s *Supervisor) post(ev event) {
	select {
	case s.events <- ev:
	case <-s.done:
	}
}

// Run starts generation 1 and supervises until a stop: it returns nil after
// a graceful or fast stop (even one asked for before generation 1 was
// ready), and an error when the supervisor gives up on crashing workers.
// Every child has been reaped, and every process started below the
// supervisor killed, when it returns.
func (s *Supervisor) Run() error {
	defer close(s.done)
	defer s.env.close()
	defer func() {
		for _, st := range s.fdStore {
			unix.Close(st.fd)
		}
	}()
	dir := s.cfg.RuntimeDir
	if dir == "" {
		dir = os.TempDir()
	}
	path, err := s.env.sources(dir, s.cfg.FDStoreMax, s.post)
	if err != nil {
		return err
	}
	s.notifyPath = path
	if st := s.resumed; st != nil {
		s.resumed = nil
		s.resume(st)
	} else {
		s.startGeneration()
	}
	for {
		s.sweep()
		if s.finished() {
			break
		}
		// Calls first: a status request is answered even while a flood of
		// events waits.
		select {
		case c := <-s.calls:
			c.f()
			continue
		default:
		}
		select {
		case c := <-s.calls:
			c.f()
		case ev := <-s.events:
			s.handle(ev)
			if s.afterEvent != nil {
				s.afterEvent(ev)
			}
		}
	}
	s.warns.flush(s.log)
	s.env.notifyManager(daemon.SdNotifyStopping)
	return s.stopErr
}

// finished reports whether a stop is complete: no worker, nothing else
// below the supervisor, and any give-up linger over.
func (s *Supervisor) finished() bool {
	return s.stopping && s.liveWorkers() == 0 && s.swept && !time.Now().Before(s.lingerUntil)
}

func (s *Supervisor) handle(ev event) {
	switch ev := ev.(type) {
	case evSignal:
		s.onSignal(ev.sig)
	case evExit:
		s.onExit(ev.pid, ev.status)
	case evNotify:
		s.onNotify(ev)
	case evReady:
		w := ev.w
		if w == nil {
			w = s.workers[ev.pid]
		}
		if w != nil && s.workers[w.pid] == w {
			s.onReady(w)
		}
	case evDeadline:
		s.onDeadline(ev.w, ev.seq)
	case evRestart:
		if (ev.g == s.current || ev.g == s.pending) && ev.g.slots[ev.slot] == nil && !s.stopping && ev.g.state != GenFailed {
			s.startWorker(ev.g, ev.slot)
		}
	case evShutdown:
		s.drainAll()
	case evPoll:
		s.onPoll()
	case evHandoff:
		s.onHandoff(ev.w, ev.m, ev.fds, ev.err)
	case evHandoffClosed:
		s.closeHandoff(ev.w)
	case evHandoffSendFailed:
		s.onSendFailed(ev.w, ev.m, ev.err)
	case evHandoffTimeout:
		s.onAnswerTimeout(ev.id)
	case evFunc:
		ev.f()
	case evCheckOutput:
		s.onCheckOutput(ev.su, ev.out)
	case evCheckTimeout:
		s.onCheckTimeout(ev.su)
	case evSelfExec:
		s.execSelf(ev.su)
	}
}

// onSignal is where the supervisor's signals are handled.
func (s *Supervisor) onSignal(sig syscall.Signal) {
	switch sig {
	case unix.SIGUSR2, unix.SIGHUP:
		s.requestUpgrade()
	case unix.SIGTERM, unix.SIGINT:
		if s.stopping {
			s.log.Warn("second stop signal: stopping fast", zap.String("signal", unix.SignalName(sig)))
			s.killAll()
			return
		}
		s.log.Info("graceful stop", zap.String("signal", unix.SignalName(sig)),
			zap.Duration("shutdown_delay", s.cfg.ShutdownDelay))
		s.beginStop(nil)
	case unix.SIGQUIT:
		s.log.Info("fast stop", zap.String("signal", "SIGQUIT"))
		s.beginStop(nil)
		s.killAll()
	case unix.SIGUSR1:
		if g := s.current; g != nil {
			for w := range g.live {
				if !w.exited {
					s.env.kill(w.pid, unix.SIGUSR1)
				}
			}
		}
	}
}

// requestUpgrade starts an upgrade, or queues exactly one more when one is
// under way.
func (s *Supervisor) requestUpgrade() {
	switch {
	case s.stopping:
		s.log.Warn("upgrade ignored: stopping")
	case s.pending != nil:
		if !s.queued {
			s.log.Info("upgrade queued: one is under way", zap.Int("generation", s.pending.n))
		}
		s.queued = true
	case s.self != nil:
		if !s.queued {
			s.log.Info("upgrade queued: a self-upgrade is under way")
		}
		s.queued = true
	default:
		s.startGeneration()
	}
}

// startGeneration starts generation N+1; it becomes active when every worker
// in it is ready.
func (s *Supervisor) startGeneration() {
	s.nextGen++
	g := &generation{
		n:        s.nextGen,
		state:    GenStarting,
		started:  time.Now(),
		slots:    make([]*worker, s.cfg.Workers),
		live:     make(map[*worker]struct{}),
		failures: make([]int, s.cfg.Workers),
	}
	s.pending = g
	s.gens = append(s.gens, g)
	g.watchers, s.startWatchers = s.startWatchers, nil
	s.emit(g, Progress{Event: "started"})
	if s.current != nil {
		s.env.notifyManager(fmt.Sprintf("%s\nMONOTONIC_USEC=%d\nSTATUS=upgrading to generation %d", daemon.SdNotifyReloading, monotonicUsec(), g.n))
	}
	s.log.Info("starting generation", zap.Int("generation", g.n), zap.Int("workers", s.cfg.Workers))
	for i := range g.slots {
		if err := s.spawnWorker(g, i); err != nil {
			if s.current == nil {
				// Nothing serves yet: a command that cannot be started
				// is fatal, not a crash to retry.
				s.log.Error("cannot start worker", zap.Int("generation", g.n), zap.Error(err))
				g.state = GenFailed
				g.reason = err.Error()
				s.pending = nil
				s.emit(g, Progress{Event: "failed", Reason: err.Error()})
				s.beginStop(fmt.Errorf("generation %d: %w", g.n, err))
				s.reapGeneration(g)
				return
			}
			s.failGeneration(g, err.Error())
			return
		}
	}
}

// startWorker refills slot of g; a worker that cannot be started is tried
// again after a backoff.
func (s *Supervisor) startWorker(g *generation, slot int) {
	if err := s.spawnWorker(g, slot); err != nil {
		s.log.Error("cannot restart worker", zap.Int("generation", g.n), zap.Int("worker", slot), zap.Error(err))
		s.scheduleRestart(g, slot)
	}
}

// spawnWorker starts the worker for slot i of g. This is where every
// worker process is started.
func (s *Supervisor) spawnWorker(g *generation, slot int) error {
	path, err := s.env.lookPath(s.cfg.Command[0])
	if err != nil {
		return err
	}
	readyFD := -1
	if s.cfg.Ready.Kind == "fd" {
		readyFD = s.cfg.Ready.FD
	}
	files := []int{0, 1, 2} // stdin is replaced by /dev/null in env.start
	var names []string
	for _, sock := range s.cfg.Sockets {
		files = append(files, sock.FD)
		names = append(names, sock.Spec.Name)
	}
	// Then the fd store, as systemd passes it; LISTEN_FDS must be
	// contiguous, so it stops short of --ready fd:N.
	for _, st := range s.fdStore {
		if len(files) == readyFD {
			break
		}
		files = append(files, st.fd)
		names = append(names, st.name)
	}
	env := append([]string(nil), s.baseEnv...)
	if len(names) > 0 {
		env = append(env,
			"LISTEN_FDS="+strconv.Itoa(len(names)),
			"LISTEN_FDNAMES="+strings.Join(names, ":"),
			"LISTEN_PID=0") // the shim replaces it with the worker's pid
	}
	if s.cfg.Watchdog > 0 {
		env = append(env,
			"WATCHDOG_USEC="+strconv.FormatInt(s.cfg.Watchdog.Microseconds(), 10),
			"WATCHDOG_PID=0") // the shim replaces it with the worker's pid
	}
	env = append(env,
		"NOTIFY_SOCKET="+s.notifyPath,
		"UPGRADER_GENERATION="+strconv.Itoa(g.n),
		"UPGRADER_WORKER="+strconv.Itoa(slot))
	// The handoff channel goes at the first fd after the listeners that
	// --ready fd:N does not use.
	var ours, theirs *os.File
	if !s.cfg.NoHandoff {
		if ours, theirs, err = handoff.Pair(); err != nil {
			return err
		}
		defer theirs.Close()
		hfd := len(files)
		if hfd == readyFD {
			hfd++
		}
		for len(files) <= hfd {
			files = append(files, -1)
		}
		files[hfd] = int(theirs.Fd())
		env = append(env, "UPGRADER_HANDOFF_FD="+strconv.Itoa(hfd))
	}
	spec := spawn.Spec{
		Path:      path,
		Args:      s.cfg.Command,
		Env:       env,
		Files:     files,
		Pdeathsig: s.cfg.DrainSignal,
	}
	pid, err := s.env.start(spec, readyFD, func(pid int) { s.post(evReady{pid: pid}) })
	if err != nil {
		if ours != nil {
			ours.Close()
		}
		return err
	}
	w := &worker{gen: g, slot: slot, pid: pid, state: WorkerStarting, started: time.Now(), readyTimeout: s.cfg.ReadyTimeout}
	if ours != nil {
		if sock, err := handoff.NewSocket(ours); err != nil {
			s.log.Error("handoff channel", zap.Int("pid", pid), zap.Error(err))
		} else {
			s.openHandoff(w, sock)
		}
	}
	g.slots[slot] = w
	g.live[w] = struct{}{}
	s.workers[pid] = w
	s.arm(w, s.cfg.ReadyTimeout)
	if s.cfg.Ready.Kind == "delay" {
		time.AfterFunc(s.cfg.Ready.Delay, func() { s.post(evReady{w: w}) })
	}
	s.log.Info("worker started", zap.Int("generation", g.n), zap.Int("worker", slot), zap.Int("pid", pid))
	return nil
}

func (s *Supervisor) onReady(w *worker) {
	if w.state != WorkerStarting {
		return
	}
	w.state = WorkerReady
	w.readyAt = time.Now()
	g := w.gen
	s.log.Info("worker ready", zap.Int("generation", g.n), zap.Int("worker", w.slot), zap.Int("pid", w.pid),
		zap.Duration("after", w.readyAt.Sub(w.started)))
	if s.cfg.Watchdog > 0 {
		w.lastPing = w.readyAt
		s.arm(w, s.cfg.Watchdog)
	} else {
		s.arm(w, -1)
	}
	if g.state == GenStarting && g.allReady() {
		s.promote(g)
	}
}

// promote makes g the active generation and drains the one it replaces.
func (s *Supervisor) promote(g *generation) {
	g.state = GenActive
	g.readyAt = time.Now()
	old := s.current
	s.current, s.pending = g, nil
	s.log.Info("generation ready", zap.Int("generation", g.n), zap.Duration("after", g.readyAt.Sub(g.started)))
	s.env.notifyManager(fmt.Sprintf("%s\nSTATUS=generation %d serving with %d workers", daemon.SdNotifyReady, g.n, len(g.slots)))
	s.emit(g, Progress{Event: "ready", ReadyAfterMS: g.readyAt.Sub(g.started).Milliseconds()})
	if old == nil {
		s.emit(g, Progress{Event: "done"})
		return
	}
	if len(g.watchers) > 0 {
		// Counting reads the kernel's socket tables: only for someone
		// following the upgrade (upgrader upgrade).
		var pids []int
		for w := range old.live {
			pids = append(pids, w.pid)
		}
		s.emit(g, Progress{Event: "draining", Old: old.n, Connections: s.env.connections(pids)})
	}
	// "done" once the old generation has exited.
	old.exitWatchers, g.watchers = g.watchers, nil
	old.replacedBy = g.n
	s.drainGeneration(old)
	s.upgradesOK++
	s.finishUpgrade(UpgradeResult{Generation: g.n, OK: true, Started: g.started, ReadyAfter: g.readyAt.Sub(g.started)})
}

func (s *Supervisor) finishUpgrade(r UpgradeResult) {
	s.lastUp = r
	if s.hooks.Upgrade != nil {
		s.hooks.Upgrade(r)
	}
	if su := s.selfQueued; su != nil && !s.stopping {
		// A self-upgrade waited for this upgrade; a queued worker
		// upgrade waits for it in turn.
		s.selfQueued = nil
		s.startSelf(su)
		return
	}
	s.startQueued()
}

// startQueued starts the upgrade queued behind the one that just ended.
func (s *Supervisor) startQueued() {
	if s.queued && !s.stopping && s.pending == nil && s.self == nil {
		s.queued = false
		s.startWatchers, s.queuedWatchers = s.queuedWatchers, nil
		s.log.Info("starting the queued upgrade")
		s.startGeneration()
	}
}

// failGeneration stops an upgrade's generation that could not become
// ready; the active one keeps serving.
func (s *Supervisor) failGeneration(g *generation, reason string) {
	if g.state != GenStarting {
		return
	}
	g.state = GenFailed
	g.reason = reason
	s.pending = nil
	s.log.Error("generation failed", zap.Int("generation", g.n), zap.String("reason", reason))
	s.emit(g, Progress{Event: "failed", Reason: reason})
	for w := range g.live {
		s.retire(w, s.cfg.DrainSignal, "failed upgrade")
	}
	s.reapGeneration(g)
	s.env.notifyManager(fmt.Sprintf("%s\nSTATUS=upgrade to generation %d failed: %s; generation %d serving", daemon.SdNotifyReady, g.n, reason, s.current.n))
	s.upgradesFailed++
	s.finishUpgrade(UpgradeResult{Generation: g.n, Reason: reason, Started: g.started, ReadyAfter: time.Since(g.started)})
}

// cancelGeneration stops a starting generation because the supervisor
// stops: not a failed upgrade, nothing counted, nothing told to the service
// manager but the stop.
func (s *Supervisor) cancelGeneration(g *generation) {
	if g.state != GenStarting {
		return
	}
	g.state = GenDraining
	g.reason = "the supervisor is stopping"
	s.pending = nil
	s.log.Info("generation stopped before it was ready", zap.Int("generation", g.n))
	s.emit(g, Progress{Event: "failed", Reason: g.reason})
	for w := range g.live {
		s.retire(w, s.cfg.DrainSignal, "stop")
	}
	s.reapGeneration(g)
}

// drainGeneration asks every worker of g to drain, and hurries the
// oldest draining generations beyond the cap: a cap bounds the processes
// and memory old versions hold, but a SIGKILL at once would cut every
// connection they still serve.
func (s *Supervisor) drainGeneration(g *generation) {
	if g.state == GenDraining || g.state == GenExited {
		return
	}
	g.state = GenDraining
	s.log.Info("draining generation", zap.Int("generation", g.n), zap.Int("workers", len(g.live)))
	for w := range g.live {
		s.retire(w, s.cfg.DrainSignal, "drain")
	}
	s.reapGeneration(g)
	var draining []*generation // newest first
	for i := len(s.gens) - 1; i >= 0; i-- {
		if old := s.gens[i]; old.state == GenDraining || old.state == GenFailed {
			draining = append(draining, old)
		}
	}
	for _, old := range draining[min(len(draining), s.cfg.MaxDraining):] {
		if !old.anyUnhurried() {
			continue // hurried at an earlier upgrade: its grace runs on
		}
		s.log.Warn("too many generations draining, asking the oldest to close its idle connections",
			zap.Int("generation", old.n), zap.Int("draining", len(draining)), zap.Int("cap", s.cfg.MaxDraining),
			zap.Duration("grace", s.cfg.HurryGrace))
		for w := range old.live {
			s.hurry(w)
		}
	}
}

func (s *Supervisor) onExit(pid int, ws unix.WaitStatus) {
	if s.onCheckExit(pid, ws) {
		return
	}
	w, ok := s.workers[pid]
	if !ok {
		// An orphan reparented to us (we are the subreaper) ended: a
		// lingering tree may be complete now.
		s.log.Debug("reaped a process that is not a worker", zap.Int("pid", pid), zap.String("status", describeExit(ws)))
		s.pollSoon()
		return
	}
	s.exited(w, ws)
}

// reapGeneration forgets a generation whose processes have all exited.
func (s *Supervisor) reapGeneration(g *generation) {
	if len(g.live) > 0 || g.state == GenActive || g.state == GenStarting {
		return
	}
	if g.state == GenDraining || g.state == GenFailed {
		s.log.Info("generation exited", zap.Int("generation", g.n))
	}
	for _, ch := range g.exitWatchers {
		ch <- Progress{Event: "done", Generation: g.replacedBy, Old: g.n}
		close(ch)
	}
	g.exitWatchers = nil
	g.state = GenExited
	for i, x := range s.gens {
		if x == g {
			s.gens = append(s.gens[:i], s.gens[i+1:]...)
			break
		}
	}
}

// beginStop starts a graceful stop: not-ready at once, drain after the
// shutdown delay. err is what Run will return.
func (s *Supervisor) beginStop(err error) {
	if s.stopErr == nil {
		s.stopErr = err
	}
	if s.stopping {
		return
	}
	s.stopping = true
	s.queued = false
	for _, ch := range append(s.queuedWatchers, s.startWatchers...) {
		ch <- Progress{Event: "failed", Reason: "the supervisor is stopping"}
		close(ch)
	}
	s.queuedWatchers, s.startWatchers = nil, nil
	for _, su := range []*selfUpgrade{s.self, s.selfQueued} {
		if su != nil {
			s.selfFailed(su, "the supervisor is stopping")
		}
	}
	s.env.notifyManager(daemon.SdNotifyStopping)
	delay := s.cfg.ShutdownDelay
	if !s.preStopAt.IsZero() {
		delay -= time.Since(s.preStopAt) // served, or being served, by PreStop
	}
	if err != nil || delay <= 0 {
		s.drainAll()
		return
	}
	time.AfterFunc(delay, func() { s.post(evShutdown{}) })
}

// drainAll drains every generation for a stop, and closes the
// supervisor's copies of the listeners.
func (s *Supervisor) drainAll() {
	for _, g := range append([]*generation(nil), s.gens...) {
		if g.state == GenStarting {
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
	for _, sock := range s.cfg.Sockets {
		if err := sock.Close(); err != nil {
			s.log.Warn("closing the listener for the stop", zap.String("listener", sock.Spec.Name), zap.Error(err))
		}
	}
}

// killAll kills every worker's process tree at once (a fast stop), and
// cuts any give-up linger short.
func (s *Supervisor) killAll() {
	s.stopping = true
	s.lingerUntil = time.Time{}
	for _, g := range s.gens {
		for w := range g.live {
			s.kill9(w)
		}
	}
}

// workerBaseEnv is the supervisor's environment less what must not leak into
// workers: our own socket activation, notify socket and watchdog.
func workerBaseEnv(environ []string) []string {
	var out []string
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case k == "LISTEN_PID", k == "LISTEN_FDS", k == "LISTEN_FDNAMES", k == "NOTIFY_SOCKET",
			k == "WATCHDOG_USEC", k == "WATCHDOG_PID", strings.HasPrefix(k, "UPGRADER_"):
			continue
		}
		out = append(out, kv)
	}
	return out
}

func monotonicUsec() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return ts.Nano() / 1000
}
