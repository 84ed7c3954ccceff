// Package supervise runs a server's processes as generations of workers that
// inherit the supervisor's listeners through socket activation
// (sd_listen_fds(3)), upgrades them generation by generation, and replaces
// crashed workers.
//
// One goroutine, Supervisor.Run, owns all generation and worker state and
// loops over a channel of events (signals, child exits, sd_notify messages,
// timers, control requests), as cloudflare/tableflip's upgrader does; no
// lock guards that state. OS calls go through the env interface so that the
// state machine is tested in-process as well as end to end.
package supervise

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/seed6cb0314a/upgrader/internal/spawn"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// ReadyMode is how a worker says it is ready (--ready).
type ReadyMode struct {
	// Kind is "notify" (READY=1 on NOTIFY_SOCKET, sd_notify(3)), "fd" (the
	// worker writes a newline to fd FD, as s6 does) or "delay" (alive for
	// Delay counts as ready, as Server::Starter does).
	Kind  string
	FD    int
	Delay time.Duration
}

func (m ReadyMode) String() string {
	switch m.Kind {
	case "fd":
		return "fd:" + strconv.Itoa(m.FD)
	case "delay":
		return "delay:" + m.Delay.String()
	}
	return m.Kind
}

// ParseReadyMode parses a --ready value: notify, fd:N (N ≥ 3) or
// delay:DURATION (a time.ParseDuration string, > 0).
func ParseReadyMode(v string) (ReadyMode, error) {
	kind, arg, _ := strings.Cut(v, ":")
	switch kind {
	case "notify":
		if arg == "" {
			return ReadyMode{Kind: "notify"}, nil
		}
	case "fd":
		n, err := strconv.Atoi(arg)
		if err != nil || n < 3 || n > 1023 {
			return ReadyMode{}, fmt.Errorf("--ready %q: fd:N needs N from 3 to 1023 (0-2 are stdio)", v)
		}
		return ReadyMode{Kind: "fd", FD: n}, nil
	case "delay":
		d, err := time.ParseDuration(arg)
		if err != nil || d <= 0 {
			return ReadyMode{}, fmt.Errorf("--ready %q: delay:DURATION needs a positive duration such as 500ms", v)
		}
		return ReadyMode{Kind: "delay", Delay: d}, nil
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

// defaultHurryGrace is how long the oldest generation beyond
// --max-draining has, after its second drain signal, to close its idle
// connections and finish what is in flight before it is killed: long
// enough for a worker to close idle connections and answer a request or
// two, short enough that a burst of upgrades does not pile up old versions
// (each holding its memory) for the whole drain timeout.
const defaultHurryGrace = 2 * time.Second

// Config is what a Supervisor runs.
type Config struct {
	// Command is the worker's argv; Command[0] is looked up in PATH again at
	// every generation, so that an upgrade runs what is on disk now.
	Command []string
	// Workers per generation (≥ 1).
	Workers int
	Ready   ReadyMode
	// ReadyTimeout bounds the wait for a new worker to be ready.
	ReadyTimeout time.Duration
	// DrainTimeout is how long a draining worker has before SIGKILL.
	DrainTimeout time.Duration
	// DrainSignal asks a worker to drain (SIGTERM by default).
	DrainSignal syscall.Signal
	// ShutdownDelay is how long a graceful stop reports not-ready before
	// any worker is asked to drain.
	ShutdownDelay time.Duration
	// More than MaxRestarts restarts within RestartWindow, with no ready
	// worker left, make the supervisor give up; 0 gives up at the first.
	MaxRestarts   int
	RestartWindow time.Duration
	// GiveUpLinger is how long after giving up the supervisor stays, so
	// that health probes see /readyz answer "gave up" (0: 3s).
	GiveUpLinger time.Duration
	// MaxDraining is how many generations may drain at once; beyond it the
	// oldest is sent DrainSignal again, to close what is idle, and killed
	// HurryGrace later if still running (0: 4).
	MaxDraining int
	// HurryGrace is how long a generation beyond MaxDraining has after its
	// second drain signal before SIGKILL (0: defaultHurryGrace).
	HurryGrace time.Duration
	// Watchdog, when > 0, is passed to workers as WATCHDOG_USEC; a ready
	// worker that sends no WATCHDOG=1 for that long is replaced.
	Watchdog time.Duration
	// FDStoreMax bounds the fds workers may keep with FDSTORE=1
	// (sd_notify(3)), as systemd's FileDescriptorStoreMax=; 0 turns the
	// store off.
	FDStoreMax int
	// NoHandoff stops offering live-connection handoff (UPGRADER_HANDOFF_FD).
	NoHandoff bool
	// Sockets are passed to every worker as fds 3, 4, … in this order.
	Sockets []*sockets.Socket
	// RuntimeDir holds the notify socket (a private directory is made in it).
	RuntimeDir string
	Log        *zap.Logger
	// Version is this upgrader's version, shown in the status.
	Version string
	// Executable and Args are what a self-upgrade re-executes: the path
	// of the upgrader binary as resolved at the first start (not
	// /proc/self/exe, which names the image running now) and its argv.
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
	// (HoldSignals), for a new image after a self-upgrade; nil otherwise.
	HeldSignals chan os.Signal
}

// setDefaults fills in the fields whose zero value has no meaning of its
// own; MaxRestarts and FDStoreMax keep theirs.
func (c *Config) setDefaults() {
	if c.Workers < 1 {
		c.Workers = 1
	}
	if c.Ready.Kind == "" {
		c.Ready.Kind = "notify"
	}
	if c.ReadyTimeout == 0 {
		c.ReadyTimeout = 60 * time.Second
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 30 * time.Second
	}
	if c.DrainSignal == 0 {
		c.DrainSignal = syscall.SIGTERM
	}
	if c.RestartWindow == 0 {
		c.RestartWindow = 60 * time.Second
	}
	if c.GiveUpLinger == 0 {
		c.GiveUpLinger = 3 * time.Second
	}
	if c.MaxDraining == 0 {
		c.MaxDraining = 4
	}
	if c.HurryGrace == 0 {
		c.HurryGrace = defaultHurryGrace
	}
	if c.Log == nil {
		c.Log = zap.NewNop()
	}
}

// validate checks what a bad flag combination would break at run time.
func (c *Config) validate() error {
	if len(c.Command) == 0 {
		return fmt.Errorf("no COMMAND given after --")
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"ready timeout", c.ReadyTimeout}, {"drain timeout", c.DrainTimeout}, {"shutdown delay", c.ShutdownDelay},
		{"restart window", c.RestartWindow}, {"watchdog", c.Watchdog}, {"give-up linger", c.GiveUpLinger},
		{"hurry grace", c.HurryGrace},
	} {
		if d.v < 0 {
			return fmt.Errorf("%s %s: must not be negative", d.name, d.v)
		}
	}
	for _, n := range []struct {
		name string
		v    int
	}{{"max restarts", c.MaxRestarts}, {"fd store max", c.FDStoreMax}, {"max draining", c.MaxDraining}} {
		if n.v < 0 {
			return fmt.Errorf("%s %d: must not be negative", n.name, n.v)
		}
	}
	if c.Ready.Kind == "fd" && c.Ready.FD < 3+len(c.Sockets) {
		return fmt.Errorf("--ready fd:%d collides with the listeners at fds 3 to %d; pick fd:%d or higher",
			c.Ready.FD, 2+len(c.Sockets), 3+len(c.Sockets))
	}
	return nil
}
