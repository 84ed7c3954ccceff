package supervise

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

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
	evNotify struct{ dg sdnotify.Datagram }
	evReady  struct {
		pid int
		w   *worker
	} // w is nil when it came by pid (fd readiness)
	evReadyTimeout struct{ w *worker }
	evDrainTimeout struct{ w *worker }
	evRestart      struct {
		g    *generation
		slot int
	}
	evShutdown struct{} // --shutdown-delay is over
	evFunc     struct{ f func() }
	evWatchdog struct{ w *worker }
	evHandoff  struct {
		w   *worker
		m   handoff.Message
		fds []int
		err error
	}
	evHandoffClosed struct{ w *worker }
)

// Backoff for crash restarts: base·2^k with ±20% jitter, capped; reset after
// a worker stayed up for stableAfter.
const (
	backoffBase = 100 * time.Millisecond
	backoffMax  = 10 * time.Second
	stableAfter = 10 * time.Second
)

// Supervisor runs generations of workers. Create it with New, then call Run.
type Supervisor struct {
	cfg    Config
	env    env
	log    *zap.Logger
	events chan event
	done   chan struct{}

	// State below is owned by the Run goroutine.
	notifyPath string
	baseEnv    []string
	nextGen    int
	current    *generation   // the active generation, serving
	pending    *generation   // the generation an upgrade is starting
	gens       []*generation // every generation with live processes, oldest first
	workers    map[int]*worker
	queued     bool // one more upgrade asked for during this one
	restarts   []time.Time
	stopping   bool
	stopErr    error
	hooks      Hooks
	lastUp     UpgradeResult
	pid        int
	gaveUp     bool

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
}

// Hooks are called from the loop goroutine on state transitions, as
// net/http's ConnState is; they must not block.
type Hooks struct {
	// Upgrade is called when an upgrade ends, with its result.
	Upgrade func(UpgradeResult)
	// Restart is called when a worker is replaced unasked (crash,
	// STOPPING=1, watchdog), with the reason.
	Restart func(reason string)
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
	e, err := newOSEnv()
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
		cfg:       cfg,
		env:       e,
		log:       cfg.Log,
		events:    make(chan event, 256),
		done:      make(chan struct{}),
		workers:   make(map[int]*worker),
		baseEnv:   workerBaseEnv(os.Environ()),
		pid:       os.Getpid(),
		pendingHO: make(map[uint64]*pendingHandoff),
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
// a graceful or fast stop, and an error when generation 1 fails or the
// supervisor gives up on crashing workers. Every child has been reaped when
// it returns.
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
	path, err := s.env.sources(dir, s.post)
	if err != nil {
		return err
	}
	s.notifyPath = path
	s.startGeneration()
	for !(s.stopping && len(s.workers) == 0) {
		s.handle(<-s.events)
	}
	s.env.notifyManager("STOPPING=1")
	return s.stopErr
}

func (s *Supervisor) handle(ev event) {
	switch ev := ev.(type) {
	case evSignal:
		s.onSignal(ev.sig)
	case evExit:
		s.onExit(ev.pid, ev.status)
	case evNotify:
		s.onNotify(ev.dg)
	case evReady:
		w := ev.w
		if w == nil {
			w = s.workers[ev.pid]
		}
		if w != nil && s.workers[w.pid] == w {
			s.onReady(w)
		}
	case evReadyTimeout:
		s.onReadyTimeout(ev.w)
	case evDrainTimeout:
		if s.workers[ev.w.pid] == ev.w {
			s.log.Warn("worker did not drain in time, killing it",
				zap.Int("generation", ev.w.gen.n), zap.Int("pid", ev.w.pid),
				zap.Duration("drain_timeout", s.cfg.DrainTimeout))
			s.env.kill(ev.w.pid, unix.SIGKILL)
		}
	case evRestart:
		first := ev.g == s.pending && s.current == nil
		if (ev.g == s.current || first) && ev.g.slots[ev.slot] == nil && !s.stopping {
			s.startWorker(ev.g, ev.slot)
		}
	case evShutdown:
		s.drainAll()
	case evWatchdog:
		s.onWatchdog(ev.w)
	case evHandoff:
		s.onHandoff(ev.w, ev.m, ev.fds, ev.err)
	case evHandoffClosed:
		s.closeHandoff(ev.w)
	case evFunc:
		ev.f()
	}
}

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
		s.stopping = true
		s.killAll()
	case unix.SIGUSR1:
		if g := s.current; g != nil {
			for w := range g.live {
				s.env.kill(w.pid, unix.SIGUSR1)
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
		s.env.notifyManager(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d\nSTATUS=upgrading to generation %d", monotonicUsec(), g.n))
	}
	s.log.Info("starting generation", zap.Int("generation", g.n), zap.Int("workers", s.cfg.Workers))
	for i := range g.slots {
		if err := s.startWorker(g, i); err != nil {
			s.failGeneration(g, err.Error())
			return
		}
	}
}

// startWorker starts the worker for slot i of g. This is where every worker
// process is started.
func (s *Supervisor) startWorker(g *generation, slot int) error {
	path, err := s.env.lookPath(s.cfg.Command[0])
	if err != nil {
		if g.state != GenStarting {
			s.log.Error("cannot restart worker", zap.Int("generation", g.n), zap.Int("worker", slot), zap.Error(err))
			s.scheduleRestart(g, slot)
		}
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
	if err != nil && ours != nil {
		ours.Close()
	}
	if err != nil {
		if g.state != GenStarting {
			s.log.Error("cannot restart worker", zap.Int("generation", g.n), zap.Int("worker", slot), zap.Error(err))
			s.scheduleRestart(g, slot)
		}
		return err
	}
	w := &worker{gen: g, slot: slot, pid: pid, state: WorkerStarting, started: time.Now()}
	if ours != nil {
		if w.hsock, err = handoff.NewSocket(ours); err != nil {
			s.log.Error("handoff channel", zap.Int("pid", pid), zap.Error(err))
		} else {
			// A worker that stops reading its channel must not stall the
			// loop: past the kernel's buffer (room for dozens of batches),
			// a send fails within 100 ms and the batch is refused.
			w.hsock.SetSendTimeout(100 * time.Millisecond)
			go s.readHandoff(w, w.hsock)
		}
	}
	g.slots[slot] = w
	g.live[w] = struct{}{}
	s.workers[pid] = w
	w.readyStop = time.AfterFunc(s.cfg.ReadyTimeout, func() { s.post(evReadyTimeout{w}) }).Stop
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
	w.readyStop()
	g := w.gen
	s.log.Info("worker ready", zap.Int("generation", g.n), zap.Int("worker", w.slot), zap.Int("pid", w.pid),
		zap.Duration("after", w.readyAt.Sub(w.started)))
	if s.cfg.Watchdog > 0 {
		w.lastPing = w.readyAt
		s.armWatchdog(w, s.cfg.Watchdog)
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
	s.env.notifyManager(fmt.Sprintf("READY=1\nSTATUS=generation %d serving with %d workers", g.n, len(g.slots)))
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
	if s.queued && !s.stopping {
		s.queued = false
		s.startWatchers, s.queuedWatchers = s.queuedWatchers, nil
		s.log.Info("starting the queued upgrade")
		s.startGeneration()
	}
}

// failGeneration stops a generation that could not become ready; the
// active one, if any, keeps serving.
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
		s.stopWorker(w)
	}
	s.reapGeneration(g)
	if s.current == nil {
		// Nothing serves: there is no old generation to fall back on.
		s.beginStop(fmt.Errorf("generation %d failed: %s", g.n, reason))
		return
	}
	s.env.notifyManager(fmt.Sprintf("READY=1\nSTATUS=upgrade to generation %d failed: %s; generation %d serving", g.n, reason, s.current.n))
	s.upgradesFailed++
	s.finishUpgrade(UpgradeResult{Generation: g.n, Reason: reason, Started: g.started, ReadyAfter: time.Since(g.started)})
}

// drainGeneration asks every worker of g to drain, and kills the oldest
// draining generations beyond the cap.
func (s *Supervisor) drainGeneration(g *generation) {
	if g.state == GenDraining || g.state == GenExited {
		return
	}
	g.state = GenDraining
	s.log.Info("draining generation", zap.Int("generation", g.n), zap.Int("workers", len(g.live)))
	for w := range g.live {
		s.stopWorker(w)
	}
	s.reapGeneration(g)
	draining := 0
	for i := len(s.gens) - 1; i >= 0; i-- {
		old := s.gens[i]
		if old.state != GenDraining && old.state != GenFailed {
			continue
		}
		if draining++; draining > s.cfg.MaxDraining {
			s.log.Warn("too many generations draining, killing the oldest", zap.Int("generation", old.n))
			for w := range old.live {
				s.env.kill(w.pid, unix.SIGKILL)
			}
		}
	}
}

// stopWorker sends the drain signal to w once and arms its SIGKILL timer.
func (s *Supervisor) stopWorker(w *worker) {
	if w.asked {
		return
	}
	w.asked = true
	w.readyStop()
	if w.wdStop != nil {
		w.wdStop()
	}
	if w.state != WorkerDraining {
		w.state = WorkerDraining
		if err := s.env.kill(w.pid, s.cfg.DrainSignal); err != nil {
			s.log.Warn("cannot signal worker", zap.Int("pid", w.pid), zap.Error(err))
		}
	}
	if w.stopTimer == nil {
		w.stopTimer = time.AfterFunc(s.cfg.DrainTimeout, func() { s.post(evDrainTimeout{w}) }).Stop
	}
}

func (s *Supervisor) onReadyTimeout(w *worker) {
	if s.workers[w.pid] != w || w.state != WorkerStarting {
		return
	}
	reason := fmt.Sprintf("worker %d (pid %d) not ready within %s", w.slot, w.pid, s.cfg.ReadyTimeout)
	if w.gen.state == GenStarting && s.current != nil {
		s.failGeneration(w.gen, reason)
		return
	}
	// A replacement worker, or one of the first generation, that hangs at
	// start: kill it, and its exit counts as a crash.
	s.log.Error("worker not ready in time, killing it", zap.Int("generation", w.gen.n),
		zap.Int("pid", w.pid), zap.Duration("ready_timeout", s.cfg.ReadyTimeout))
	s.env.kill(w.pid, unix.SIGKILL)
}

func (s *Supervisor) onExit(pid int, ws unix.WaitStatus) {
	w, ok := s.workers[pid]
	if !ok {
		s.log.Debug("reaped a process that is not a worker", zap.Int("pid", pid), zap.String("status", describeExit(ws)))
		return
	}
	delete(s.workers, pid)
	g := w.gen
	delete(g.live, w)
	s.closeHandoff(w)
	if w.stopTimer != nil {
		w.stopTimer()
	}
	if w.wdStop != nil {
		w.wdStop()
	}
	w.readyStop()
	prev := w.state
	w.state = WorkerExited
	how := describeExit(ws)
	inSlot := g.slots[w.slot] == w
	if inSlot {
		g.slots[w.slot] = nil
	}
	fields := []zap.Field{zap.Int("generation", g.n), zap.Int("worker", w.slot), zap.Int("pid", pid), zap.String("status", how)}
	switch {
	case g.state == GenStarting && s.current == nil && !w.asked && !s.stopping:
		// The first generation has nothing to fall back on: its workers
		// get crash restarts until it is ready, or until giving up.
		s.log.Error("worker exited before it was ready", fields...)
		s.crashRestart(g, w.slot)
	case g.state == GenStarting:
		s.log.Error("worker exited before it was ready", fields...)
		s.failGeneration(g, fmt.Sprintf("worker %d (pid %d) %s before it was ready", w.slot, pid, how))
	case w.asked || !inSlot:
		s.log.Info("worker exited", fields...)
	case g == s.current && !s.stopping:
		s.log.Error("worker exited unasked", append(fields, zap.String("state", string(prev)))...)
		if time.Since(w.started) >= stableAfter {
			g.failures[w.slot] = 0
		}
		s.crashRestart(g, w.slot)
	default:
		s.log.Info("worker exited", fields...)
	}
	s.reapGeneration(g)
}

// crashRestart replaces the worker in slot of the active generation after a
// backoff, or gives up when restarts come too fast with nothing ready left.
func (s *Supervisor) crashRestart(g *generation, slot int) {
	now := time.Now()
	s.restarts = append(s.restarts, now)
	for len(s.restarts) > 0 && now.Sub(s.restarts[0]) > s.cfg.RestartWindow {
		s.restarts = s.restarts[1:]
	}
	g.restarts++
	s.restartCount++
	if s.hooks.Restart != nil {
		s.hooks.Restart("exit")
	}
	if len(s.restarts) > s.cfg.MaxRestarts && g.readyCount() == 0 {
		err := fmt.Errorf("giving up: %d crash restarts within %s and no ready worker left",
			len(s.restarts), s.cfg.RestartWindow)
		s.log.Error("giving up", zap.Int("restarts", len(s.restarts)), zap.Duration("window", s.cfg.RestartWindow))
		s.gaveUp = true
		s.env.notifyManager("STATUS=" + err.Error())
		s.beginStop(err)
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

func (s *Supervisor) onNotify(dg sdnotify.Datagram) {
	defer func() {
		for _, f := range dg.Files {
			f.Close() // the fd store keeps its own copies
		}
	}()
	w, ok := s.workers[dg.Pid]
	if !ok {
		s.log.Warn("notify message from a process that is not a worker, dropped",
			zap.Int("pid", dg.Pid), zap.Uint32("uid", dg.UID))
		return
	}
	fields := []zap.Field{zap.Int("generation", w.gen.n), zap.Int("worker", w.slot), zap.Int("pid", w.pid)}
	if dg.Err != nil {
		s.log.Warn("malformed notify message, dropped", append(fields, zap.Error(dg.Err))...)
		return
	}
	m := dg.Message
	if v, ok := m.Get("STATUS"); ok {
		w.status = v
		s.log.Debug("worker status", append(fields, zap.String("status", v))...)
	}
	if v, ok := m.Get("ERRNO"); ok {
		s.log.Warn("worker reports an error", append(fields, zap.String("errno", v))...)
	}
	if v, ok := m.Get("EXTEND_TIMEOUT_USEC"); ok && w.state == WorkerStarting {
		usec, _ := strconv.ParseUint(v, 10, 64)
		w.readyStop()
		w.readyStop = time.AfterFunc(time.Duration(usec)*time.Microsecond, func() { s.post(evReadyTimeout{w}) }).Stop
	}
	if m.Is("WATCHDOG", "1") {
		w.lastPing = time.Now()
	}
	if m.Is("WATCHDOG", "trigger") && !w.asked {
		s.replaceNow(w, "watchdog", "the worker sent WATCHDOG=trigger", unix.SIGABRT)
		return
	}
	if m.Is("FDSTORE", "1") || m.Is("FDSTOREREMOVE", "1") {
		s.onFDStore(w, m, dg.Files)
	} else if len(dg.Files) > 0 {
		s.log.Warn("notify message carried fds without FDSTORE=1, closed", append(fields, zap.Int("fds", len(dg.Files)))...)
	}
	if m.Is("READY", "1") && s.cfg.Ready.Kind == "notify" {
		s.onReady(w)
	}
	if m.Is("STOPPING", "1") && !w.asked {
		s.onSelfStop(w)
	}
}

// onSelfStop handles a worker that announced STOPPING=1 unasked: it hit a
// fatal error and drains itself. Its slot is filled at once.
func (s *Supervisor) onSelfStop(w *worker) {
	s.replaceNow(w, "stopping", "the worker sent STOPPING=1 on its own", 0)
}

// replaceNow takes w out of its slot, starts its replacement at once, and
// sends it sig (0: none, it is stopping by itself); it is killed if still
// there after --drain-timeout. kind names the cause for metrics.
func (s *Supervisor) replaceNow(w *worker, kind, reason string, sig syscall.Signal) {
	g := w.gen
	s.log.Warn("replacing worker", zap.Int("generation", g.n), zap.Int("worker", w.slot),
		zap.Int("pid", w.pid), zap.String("reason", reason))
	w.state = WorkerDraining
	w.asked = true // its exit is expected now
	w.readyStop()
	if w.wdStop != nil {
		w.wdStop()
	}
	if sig != 0 {
		s.env.kill(w.pid, sig)
	}
	w.stopTimer = time.AfterFunc(s.cfg.DrainTimeout, func() { s.post(evDrainTimeout{w}) }).Stop
	if g.state == GenStarting {
		s.failGeneration(g, fmt.Sprintf("worker %d (pid %d): %s before it was ready", w.slot, w.pid, reason))
		return
	}
	if g.slots[w.slot] == w {
		g.slots[w.slot] = nil
		if g == s.current && !s.stopping {
			s.restarts = append(s.restarts, time.Now())
			g.restarts++
			s.restartCount++
			if s.hooks.Restart != nil {
				s.hooks.Restart(kind)
			}
			s.startWorker(g, w.slot)
		}
	}
}

// armWatchdog checks w again after d.
func (s *Supervisor) armWatchdog(w *worker, d time.Duration) {
	w.wdStop = time.AfterFunc(d, func() { s.post(evWatchdog{w}) }).Stop
}

// onWatchdog replaces a worker that sent no WATCHDOG=1 within --watchdog
// (sd_watchdog_enabled(3)); like systemd, it is sent SIGABRT first.
func (s *Supervisor) onWatchdog(w *worker) {
	if s.workers[w.pid] != w || w.asked || w.state != WorkerReady {
		return
	}
	if since := time.Since(w.lastPing); since < s.cfg.Watchdog {
		s.armWatchdog(w, s.cfg.Watchdog-since)
		return
	}
	s.replaceNow(w, "watchdog", fmt.Sprintf("no WATCHDOG=1 for %s", s.cfg.Watchdog), unix.SIGABRT)
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
	s.env.notifyManager("STOPPING=1")
	if err != nil || s.cfg.ShutdownDelay <= 0 {
		s.drainAll()
		return
	}
	time.AfterFunc(s.cfg.ShutdownDelay, func() { s.post(evShutdown{}) })
}

func (s *Supervisor) drainAll() {
	for _, g := range append([]*generation(nil), s.gens...) {
		if g.state == GenStarting {
			s.failGeneration(g, "stopping")
			continue
		}
		s.drainGeneration(g)
	}
}

func (s *Supervisor) killAll() {
	s.stopping = true
	for pid := range s.workers {
		s.env.kill(pid, unix.SIGKILL)
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
