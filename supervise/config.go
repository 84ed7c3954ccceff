package supervise

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"log/slog"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/spawn"
)

// ReadyKind is a way for a worker to say it is ready.
type ReadyKind string

const (
	// ReadyNotify: READY=1 on NOTIFY_SOCKET (sd_notify(3)).
	ReadyNotify ReadyKind = "notify"
	// ReadyFD: the worker writes a newline to its fd ReadyMode.FD, as s6
	// does (for runtimes with no Unix datagram sockets).
	ReadyFD ReadyKind = "fd"
	// ReadyDelay: alive for ReadyMode.Delay counts as ready, as
	// Server::Starter does.
	ReadyDelay ReadyKind = "delay"
)

// ReadyMode is how a worker says it is ready (--ready).
type ReadyMode struct {
	Kind  ReadyKind
	FD    int           // for ReadyFD: 3 to 1023, after the listeners
	Delay time.Duration // for ReadyDelay: > 0
}

func (m ReadyMode) String() string {
	switch m.Kind {
	case ReadyFD:
		return "fd:" + strconv.Itoa(m.FD)
	case ReadyDelay:
		return "delay:" + m.Delay.String()
	}
	return string(m.Kind)
}

// ParseReadyMode parses a --ready value: notify, fd:N (N ≥ 3) or
// delay:DURATION (a time.ParseDuration string, > 0).
func ParseReadyMode(v string) (ReadyMode, error) {
	kind, arg, _ := strings.Cut(v, ":")
	switch ReadyKind(kind) {
	case ReadyNotify:
		if arg == "" {
			return ReadyMode{Kind: ReadyNotify}, nil
		}
	case ReadyFD:
		n, err := strconv.Atoi(arg)
		if err != nil || n < 3 || n > 1023 {
			return ReadyMode{}, fmt.Errorf("--ready %q: fd:N needs N from 3 to 1023 (0-2 are stdio)", v)
		}
		return ReadyMode{Kind: ReadyFD, FD: n}, nil
	case ReadyDelay:
		d, err := time.ParseDuration(arg)
		if err != nil || d <= 0 {
			return ReadyMode{}, fmt.Errorf("--ready %q: delay:DURATION needs a positive duration such as 500ms", v)
		}
		return ReadyMode{Kind: ReadyDelay, Delay: d}, nil
	}
	return ReadyMode{}, fmt.Errorf("--ready %q: want notify, fd:N or delay:DURATION", v)
}

// ParseSignal parses a signal name with or without "SIG" (TERM, SIGQUIT) or
// a number. The error names the value.
func ParseSignal(v string) (syscall.Signal, error) {
	if n, err := strconv.Atoi(v); err == nil && n > 0 && n < 65 {
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(v)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if s := unix.SignalNum(name); s != 0 {
		return s, nil
	}
	return 0, fmt.Errorf("signal %q: not a signal name (TERM, QUIT, INT, …) or number", v)
}

// Config is what a Supervisor runs. Start from DefaultConfig, which is
// where every default lives (upgrader's flags take theirs from it): a
// zero that means nothing (a ReadyTimeout of 0, say) is refused by
// Validate, never replaced by a default behind the caller's back.
type Config struct {
	// Command is the worker's argv; Command[0] is looked up in PATH again at
	// every generation, so that an upgrade runs what is on disk now.
	Command []string
	// Workers per generation (≥ 1).
	Workers int
	Ready   ReadyMode
	// ReadyTimeout bounds the wait for a new worker to be ready (> 0).
	ReadyTimeout time.Duration
	// ReadyHold is how long a new generation must stay ready, every
	// worker, before the one it replaces is asked to drain, as
	// Kubernetes' minReadySeconds: a worker that exits or is replaced
	// within it fails the upgrade, and the old generation, never drained,
	// serves on. It adds to every upgrade's time. 0: off, the old
	// generation drains at the new one's READY=1.
	ReadyHold time.Duration
	// DrainTimeout is how long a draining worker has before its process
	// tree is sent SIGKILL (> 0).
	DrainTimeout time.Duration
	// DrainSignal asks a worker to drain.
	DrainSignal syscall.Signal
	// ShutdownDelay is how long a graceful stop reports not-ready before
	// any worker is asked to drain (≥ 0; 0: none).
	ShutdownDelay time.Duration
	// More than MaxRestarts crash restarts within RestartWindow, with no
	// ready worker left, make the supervisor give up; 0 gives up at the
	// first.
	MaxRestarts   int
	RestartWindow time.Duration
	// GiveUpLinger is how long after giving up the supervisor stays, so
	// that health probes see /readyz answer "gave up" (≥ 0).
	GiveUpLinger time.Duration
	// MaxDraining is how many generations may drain at once (≥ 1); beyond
	// it the oldest is sent DrainSignal again, to close what is idle, and
	// killed HurryGrace later if still running.
	MaxDraining int
	HurryGrace  time.Duration
	// Watchdog, when > 0, is passed to workers as WATCHDOG_USEC
	// (sd_watchdog_enabled(3)); a ready worker that sends no WATCHDOG=1 for
	// that long is replaced. 0: off.
	Watchdog time.Duration
	// FDStoreMax bounds the fds workers may keep with FDSTORE=1
	// (sd_notify(3)), as systemd's FileDescriptorStoreMax=; 0 turns the
	// store off.
	FDStoreMax int
	// NoHandoff stops offering live-connection handoff (UPGRADER_HANDOFF_FD;
	// an ACCEPT on Node's IPC channel is ignored).
	NoHandoff bool
	// IPC, when IPCNode, gives every worker Node.js's IPC channel too
	// (NODE_CHANNEL_FD, docs/reference/node-ipc.md): ready, stopping,
	// status, watchdog and handoffs with process.send.
	IPC IPCKind
	// ListenerPerGeneration gives each generation its own socket for every
	// TCP listener with SO_REUSEPORT set (upgrader's --listen binds them
	// so), in the listener's reuseport group, and steers new connections
	// to the newest ready generation's socket, so that a generation is
	// asked to drain only once none reach it (docs/architecture.md). Other
	// listeners are shared by every generation, as with it off.
	ListenerPerGeneration bool
	// SteerGrace is how long a replaced generation's sockets must have
	// had an empty accept queue before it is asked to drain: time for the
	// server to answer the last connection it accepted, and for a
	// handshake begun before the steering to complete (with
	// ListenerPerGeneration).
	SteerGrace time.Duration
	// StartIdle starts the workers of an upgrade's new generation under
	// SCHED_IDLE (sched(7)) and gives them the usual policy back at their
	// READY=1, or after 500 ms ready or not, so that their start-up takes
	// only CPU that the serving generation leaves idle and does not show
	// in its requests' latency. Under full load a start then waits for
	// idle CPU, for those 500 ms at most. It needs CAP_SYS_NICE or an
	// RLIMIT_NICE of 20 to undo, and a supervisor under SCHED_OTHER, the
	// policy it gives back (spawn.CanStartIdle); without, New turns it
	// off and logs why. The first generation and the replacement of a
	// crashed worker start as usual.
	StartIdle bool
	// Listeners are passed to every worker as fds 3, 4, … in this order.
	// The supervisor closes its copies when a stop drains.
	Listeners []*Listener
	// RuntimeDir holds the notify socket, in a private directory made in
	// it ("": os.TempDir()).
	RuntimeDir string
	// Logger receives the supervisor's log (nil: none).
	Logger *slog.Logger
	// Stdout and Stderr are the workers' fds 1 and 2 (nil: the process's
	// own), so that a program whose own stdout is a protocol keeps it.
	Stdout, Stderr *os.File
	// Signals makes the supervisor handle its process's signals as the
	// upgrader command does: USR2 and HUP upgrade, TERM and INT stop
	// gracefully (a second one fast), QUIT stops fast, USR1 goes to the
	// current workers. Off, the program calls Upgrade and Stop itself.
	Signals bool
	// Subreaper makes the process the child subreaper (PR_SET_CHILD_SUBREAPER,
	// prctl(2)) so that a worker's daemonised descendants are reparented
	// to it, attributed to their worker and stopped with it; it then reaps
	// every child (wait4(-1)), treats a child it did not start that no
	// worker can be named for as a stray of a generation (drained and
	// killed with it), and at a stop kills whatever is left below it. Off, the supervisor reaps only the processes it started and
	// leaves a host program's own children alone; a worker's descendants
	// that outlive it go to init, untracked.
	Subreaper bool

	// The fields below are for upgrader's own command line, which
	// re-executes itself in place (upgrader upgrade --self).

	// Version is this upgrader's version, shown in the status.
	Version string
	// Executable and Args are what a self-upgrade re-executes: the path
	// of the upgrader binary as invoked (absolute, its symlinks resolved
	// at each self-upgrade, so that a flipped current → releases/N link
	// takes effect; not /proc/self/exe, which names the image running
	// now) and its argv.
	// No Executable: self-upgrades are refused.
	Executable string
	Args       []string
	// Carry, when set, returns close-on-exec duplicates of the fds the
	// caller wants carried across a self-upgrade (the control and health
	// listeners), by role; the supervisor owns them from then on.
	Carry func() ([]CarriedFD, error)
	// MainThread, when set, is where workers are forked and a self-upgrade
	// execs (spawn.RunOnMainThread): the one thread that survives every
	// exec, so that no worker's parent-death signal fires. nil: a locked
	// thread of the supervisor's own, and no self-upgrade keeps workers.
	MainThread *spawn.MainThread
	// HeldSignals are the signals caught since the process started
	// (HoldSignals), which the supervisor handles, in order, once it runs
	// (a SIGUSR2 is an upgrade queued behind generation 1, a SIGTERM a
	// graceful stop); nil: they are caught from Run on, and what came
	// before took the Go runtime's default action.
	HeldSignals chan os.Signal
}

// DefaultConfig returns the defaults of every field: one worker ready by
// sd_notify, 60 s to be ready, 500 ms of ready hold, 30 s to drain on SIGTERM, give up after 5
// crash restarts in 60 s, at most 4 generations draining (2 s of grace
// beyond), 64 stored fds, handoff on. Set Command and Listeners.
func DefaultConfig() Config {
	return Config{
		Workers:      1,
		Ready:        ReadyMode{Kind: ReadyNotify},
		ReadyTimeout: 60 * time.Second,
		// Long enough to catch a worker that crashes on its first
		// requests or right after its READY=1, short enough to add
		// little to an upgrade.
		ReadyHold:     500 * time.Millisecond,
		DrainTimeout:  30 * time.Second,
		DrainSignal:   syscall.SIGTERM,
		MaxRestarts:   5,
		RestartWindow: 60 * time.Second,
		GiveUpLinger:  3 * time.Second,
		MaxDraining:   4,
		// Long enough for a worker to close idle connections and answer a
		// request or two, short enough that a burst of upgrades does not
		// pile up old versions (each holding its memory) for the whole
		// drain timeout.
		HurryGrace: 2 * time.Second,
		FDStoreMax: 64,
		// A connection accepted just before the steering is read by the
		// server within a few milliseconds; a handshake in flight takes a
		// round trip. 200 ms covers both on a LAN and adds little to an
		// upgrade; see docs/architecture.md.
		ListenerPerGeneration: true,
		SteerGrace:            200 * time.Millisecond,
		StartIdle:             true,
	}
}

// ConfigError is a Config field whose value Validate refuses.
type ConfigError struct {
	Field string // the Config field, such as "ReadyTimeout"
	Value any
	Want  string // what it takes, such as "a duration greater than 0"
}

func (e *ConfigError) Error() string {
	return fmt.Sprintf("supervise: Config.%s %v: want %s", e.Field, e.Value, e.Want)
}

// Validate checks c, the one check of a configuration (New calls it):
// the error is a *ConfigError naming the first field refused.
func (c *Config) Validate() error {
	if len(c.Command) == 0 || c.Command[0] == "" {
		return &ConfigError{"Command", c.Command, "the worker's argv (at least the program)"}
	}
	for _, n := range []struct {
		field  string
		v, min int
	}{{"Workers", c.Workers, 1}, {"MaxRestarts", c.MaxRestarts, 0}, {"FDStoreMax", c.FDStoreMax, 0}, {"MaxDraining", c.MaxDraining, 1}} {
		if n.v < n.min {
			return &ConfigError{n.field, n.v, fmt.Sprintf("at least %d", n.min)}
		}
	}
	for _, d := range []struct {
		field    string
		v        time.Duration
		zeroIsOK bool // 0 means off, or none
	}{
		{"ReadyTimeout", c.ReadyTimeout, false}, {"DrainTimeout", c.DrainTimeout, false},
		{"RestartWindow", c.RestartWindow, false}, {"HurryGrace", c.HurryGrace, false},
		{"ShutdownDelay", c.ShutdownDelay, true}, {"Watchdog", c.Watchdog, true}, {"GiveUpLinger", c.GiveUpLinger, true},
		{"ReadyHold", c.ReadyHold, true}, {"SteerGrace", c.SteerGrace, true},
	} {
		switch {
		case d.v < 0:
			return &ConfigError{d.field, d.v, "a duration of 0 or more"}
		case d.v == 0 && !d.zeroIsOK:
			return &ConfigError{d.field, d.v, "a duration greater than 0"}
		}
	}
	if c.DrainSignal <= 0 || c.DrainSignal >= 65 {
		return &ConfigError{"DrainSignal", int(c.DrainSignal), "a signal (1 to 64)"}
	}
	switch c.Ready.Kind {
	case ReadyNotify:
	case ReadyFD:
		if c.Ready.FD < 3+len(c.Listeners) || c.Ready.FD > 1023 {
			return &ConfigError{"Ready", c.Ready, fmt.Sprintf("fd:N with N from %d (after the listeners at fds 3 to %d) to 1023",
				3+len(c.Listeners), 2+len(c.Listeners))}
		}
	case ReadyDelay:
		if c.Ready.Delay <= 0 {
			return &ConfigError{"Ready", c.Ready, "delay:DURATION with a duration greater than 0"}
		}
	default:
		return &ConfigError{"Ready", c.Ready, "notify, fd:N or delay:DURATION"}
	}
	if c.IPC != IPCNone && c.IPC != IPCNode {
		return &ConfigError{"IPC", c.IPC, `"node" or none`}
	}
	for i, l := range c.Listeners {
		if l == nil || l.sock == nil {
			return &ConfigError{fmt.Sprintf("Listeners[%d]", i), nil, "a Listener from Listen or FileListener"}
		}
	}
	return nil
}
