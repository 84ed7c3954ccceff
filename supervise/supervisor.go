package supervise

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
	"github.com/seed6cb0314a/upgrader/internal/workerenv"
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
		truncated bool // more fds came than FDStoreMax: the kernel closed the rest
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
	evShutdown struct{} // ShutdownDelay is over
	evPoll     struct{} // look at lingering process trees again
	evFunc     struct{ f func() }
	evHandoff  struct {
		w   *worker
		c   *wchan
		m   handoff.Message
		fds []int
		err error
	}
	evHandoffClosed struct {
		w *worker
		c *wchan
	}
	evHandoffTimeout    struct{ id uint64 }
	evHandoffSendFailed struct {
		w   *worker
		c   *wchan
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

// Supervisor runs generations of workers. Create it with New, then call
// Run; its other methods are safe to call from any goroutine.
//
// Its state is owned by the goroutine in Run and grouped by concern, each
// group with its methods in a file of its own: the generations and their
// workers (generations.go, worker.go), the upgrade queue and its watchers
// (status.go), the stop (stop.go), process trees (trees.go), handoff
// routing (handoff.go), the fd store (fdstore.go), self-upgrade
// (selfupgrade.go, state.go) and the counters.
type Supervisor struct {
	cfg    Config
	env    env
	log    *slog.Logger
	hooks  Hooks
	events chan event
	// calls carries Status and Upgrade requests apart from events, so that
	// a flood of notify messages cannot delay them.
	calls chan evFunc
	done  chan struct{}
	// afterEvent, for tests, sees every event once the loop has handled it.
	afterEvent func(event)
	ran        atomic.Bool // Run was called

	// Owned by the Run goroutine.
	spawnEnv spawnEnv
	gens     generations
	upgrades upgradeQueue
	life     lifecycle
	procs    procTrees
	ho       router
	fdStore  fdStore
	reexec   reexec
	count    Counters
	warns    *limiter
	// listenInodes are the inodes of the listeners' sockets, as fd tables
	// name them ("socket:[INODE]"), for holdsListener.
	listenInodes map[string]struct{}
	// steer is each generation's own listening sockets (steer.go).
	steer steering
}

// spawnEnv is what every worker's environment starts from.
type spawnEnv struct {
	supervisorPid int
	notifyPath    string
	base          []string // the supervisor's environment, less its own activation
}

// Counters count what happened since the first start, across
// self-upgrades.
type Counters struct {
	Restarts       int          `json:"restarts"`
	UpgradesOK     int          `json:"upgrades_ok"`
	UpgradesFailed int          `json:"upgrades_failed"`
	Handoffs       HandoffStats `json:"handoffs"`
}

// Hooks are called from the loop goroutine on state transitions, as
// net/http's ConnState is; they must not block.
type Hooks struct {
	// Upgrade is called when an upgrade ends, with its result.
	Upgrade func(UpgradeResult)
	// Restart is called when a worker is replaced unasked, with the cause.
	Restart func(cause RestartCause)
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

// New checks cfg (Config.Validate) and returns a Supervisor that runs it
// on the real OS. The error is a *ConfigError, or names COMMAND when it is
// not found in PATH.
func New(cfg Config) (*Supervisor, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	e, err := newOSEnv(cfg)
	if err != nil {
		return nil, err
	}
	s, err := newSupervisor(cfg, e)
	if err != nil {
		return nil, err
	}
	s.initGroups()
	return s, nil
}

func newSupervisor(cfg Config, e env) (*Supervisor, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if _, err := e.lookPath(cfg.Command[0]); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.StartIdle {
		if err := e.canStartIdle(); err != nil {
			cfg.StartIdle = false
			log.Info("new generations start as the first one does, not under SCHED_IDLE", slog.String("reason", err.Error()))
		}
	}
	s := &Supervisor{
		cfg:          cfg,
		env:          e,
		log:          log,
		events:       make(chan event, 256),
		calls:        make(chan evFunc),
		done:         make(chan struct{}),
		spawnEnv:     spawnEnv{supervisorPid: os.Getpid(), base: workerBaseEnv(e.ownEnviron())},
		gens:         generations{byPid: make(map[int]*worker)},
		procs:        newProcTrees(),
		ho:           router{pending: make(map[uint64]*pendingHandoff)},
		warns:        newLimiter(warnBurst, warnWindow),
		listenInodes: listenerInodes(cfg.Listeners),
	}
	s.steer = steering{socks: map[*generation][]int{}, quiet: map[*generation]struct{}{}, groups: make([]*group, len(cfg.Listeners))}
	return s, nil
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

// after posts ev to the loop once d has passed, on the env's clock.
func (s *Supervisor) after(d time.Duration, ev event) stopper {
	return s.env.afterFunc(d, func() { s.post(ev) })
}

// ErrNotRunning is returned by the methods that ask the loop when it has
// ended (or was never started).
var ErrNotRunning = errors.New("supervise: the supervisor is not running")

// Run starts generation 1 and supervises until a stop: it returns nil after
// a graceful or fast stop (even one asked for before generation 1 was
// ready), and an error when the supervisor gives up on crashing workers or
// cannot start the first generation. The end of ctx begins a graceful
// stop, as Stop does. Every child has been reaped, and every process
// started below the supervisor killed, when it returns. Run may be called
// once.
func (s *Supervisor) Run(ctx context.Context) error {
	if !s.ran.CompareAndSwap(false, true) {
		return errors.New("supervise: Run called twice")
	}
	defer close(s.done)
	defer s.env.close()
	defer s.fdStore.closeAll()
	dir := s.cfg.RuntimeDir
	if dir == "" {
		dir = os.TempDir()
	}
	path, err := s.env.sources(dir, s.cfg.FDStoreMax, s.post)
	if err != nil {
		return err
	}
	s.spawnEnv.notifyPath = path
	s.prestartSpares()
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, func() { s.post(evFunc{func() { s.beginStop(nil) }}) })
		defer stop()
	}
	if st := s.reexec.resumed; st != nil {
		s.reexec.resumed = nil
		s.resume(st)
	} else {
		s.startGeneration()
	}
	s.loop()
	s.warns.flush(s.env.now(), s.log)
	s.env.notifyManager(daemon.SdNotifyStopping)
	return s.life.err
}

// loop handles events until a stop is complete.
func (s *Supervisor) loop() {
	for {
		s.sweep()
		if s.finished() {
			return
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
			w = s.gens.byPid[ev.pid]
		}
		if w != nil && s.gens.byPid[w.Pid] == w {
			s.onReady(w)
		}
	case evDeadline:
		s.onDeadline(ev.w, ev.seq)
	case evRestart:
		if (ev.g == s.gens.current || ev.g == s.gens.pending) && ev.g.slots[ev.slot] == nil && !s.life.stopping && ev.g.State != GenFailed {
			s.startWorker(ev.g, ev.slot)
		}
	case evShutdown:
		s.drainAll()
	case evPoll:
		s.onPoll()
	case evHandoff:
		s.onHandoff(ev.w, ev.c, ev.m, ev.fds, ev.err)
	case evHandoffClosed:
		s.closeChannel(ev.w, ev.c)
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

// onSignal is where the supervisor's signals are handled (Config.Signals).
func (s *Supervisor) onSignal(sig syscall.Signal) {
	switch sig {
	case unix.SIGUSR2, unix.SIGHUP:
		s.requestUpgrade()
	case unix.SIGTERM, unix.SIGINT:
		if s.life.stopping {
			s.log.Warn("second stop signal: stopping fast", slog.String("signal", unix.SignalName(sig)))
			s.killAll()
			return
		}
		s.log.Info("graceful stop", slog.String("signal", unix.SignalName(sig)),
			slog.Duration("shutdown_delay", s.cfg.ShutdownDelay))
		s.beginStop(nil)
	case unix.SIGQUIT:
		s.log.Info("fast stop", slog.String("signal", "SIGQUIT"))
		s.beginStop(nil)
		s.killAll()
	case unix.SIGUSR1:
		if g := s.gens.current; g != nil {
			for w := range g.live {
				if w.State.running() {
					s.env.kill(w.Pid, unix.SIGUSR1)
				}
			}
		}
	}
}

// workerBaseEnv is the supervisor's environment less what must not leak into
// workers: our own socket activation, notify socket and watchdog.
func workerBaseEnv(environ []string) []string {
	var out []string
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case workerenv.ListenPID, workerenv.ListenFDs, workerenv.ListenFDNames, workerenv.NotifySocket,
			workerenv.WatchdogUSec, workerenv.WatchdogPID,
			// A channel of upgrader's own parent is not a worker's.
			workerenv.NodeChannelFD, workerenv.NodeSerialization:
			continue
		}
		if strings.HasPrefix(k, workerenv.Prefix) {
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
