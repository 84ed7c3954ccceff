// Command upgrader holds a server's listening sockets and runs the server as
// generations of workers that inherit them (sd_listen_fds(3)); kill -USR2
// upgrades to what is on disk now with no refused connection and no failed
// request. See README.md and docs/.
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	flag "github.com/spf13/pflag"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/seed6cb0314a/upgrader/health"
	"github.com/seed6cb0314a/upgrader/internal/control"
	"github.com/seed6cb0314a/upgrader/internal/sockets"
	"github.com/seed6cb0314a/upgrader/internal/spawn"
	"github.com/seed6cb0314a/upgrader/internal/supervise"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// errUsage marks an error caused by the command line: exit status 2.
var errUsage = errors.New("usage")

// The main goroutine stays on the main thread: workers are forked from it
// and a self-upgrade execs from it (spawn.RunOnMainThread).
func init() { runtime.LockOSThread() }

func main() {
	// A worker is started as a re-exec of this binary: become the command.
	spawn.RunShimIfRequested()
	spawn.RunOnMainThread(realMain)
}

func realMain(m *spawn.MainThread) int {
	p := proc{main: m}
	// A new image after a self-upgrade: catch the signals ignored across
	// the exec before anything else.
	if os.Getenv(supervise.StateEnv) != "" {
		p.held = supervise.HoldSignals()
	}

	args := os.Args[1:]
	cmd := "run"
	if len(args) > 0 {
		switch args[0] {
		case "run", "upgrade", "status", "prestop", "version", "help", "self-check":
			cmd, args = args[0], args[1:]
		}
	}
	var err error
	switch cmd {
	case "run":
		err = p.run(args)
	case "upgrade":
		err = upgradeCmd(args)
	case "status":
		err = statusCmd(args)
	case "prestop":
		err = preStopCmd(args)
	case "version":
		fmt.Println("upgrader", version)
	case "self-check":
		// Run by a running upgrader on the binary it is about to
		// re-execute (upgrader upgrade --self): say which state format
		// this build reads.
		fmt.Printf("upgrader-self-check state-version %d version %s\n", supervise.StateVersion, version)
	case "help":
		fmt.Print(usage)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "upgrader:", strings.TrimPrefix(err.Error(), "usage: "))
		if errors.Is(err, errUsage) {
			return 2
		}
		return 1
	}
	return 0
}

const usage = `usage:
  upgrader [run] [flags] -- COMMAND [ARG...]
  upgrader upgrade [--control PATH | --pid-file PATH] [--timeout DUR] [--no-wait] [--self | --self-only]
  upgrader status  [--control PATH] [--json]
  upgrader prestop [--control PATH] [--timeout DUR]
  upgrader version

Run 'upgrader run --help' for the flags.
`

type runFlags struct {
	command       []string
	listen        []string
	workers       int
	ready         string
	readyTimeout  time.Duration
	drainTimeout  time.Duration
	drainSignal   string
	shutdownDelay time.Duration
	pidFile       string
	maxRestarts   int
	restartWindow time.Duration
	logFormat     string
	logLevel      string
	health        string
	control       string
	watchdog      time.Duration
	noHandoff     bool
	fdStoreMax    int
	maxDraining   int
}

// validate rejects values the supervisor would otherwise replace by a
// default without a word: a typo such as --drain-timeout -30s must not run
// with 30s. The error names the flag and is a usage error.
func (f *runFlags) validate() error {
	for _, d := range []struct {
		name     string
		v        time.Duration
		zeroIsOK bool // 0 means off
	}{
		{"ready-timeout", f.readyTimeout, false},
		{"drain-timeout", f.drainTimeout, false},
		{"restart-window", f.restartWindow, false},
		{"shutdown-delay", f.shutdownDelay, true},
		{"watchdog", f.watchdog, true},
	} {
		switch {
		case d.v < 0:
			return fmt.Errorf("%w: --%s %s: want a duration of 0 or more", errUsage, d.name, d.v)
		case d.v == 0 && !d.zeroIsOK:
			return fmt.Errorf("%w: --%s 0: want a duration greater than 0", errUsage, d.name)
		}
	}
	for _, n := range []struct {
		name string
		v    int
		min  int
	}{
		{"workers", f.workers, 1},
		{"max-restarts", f.maxRestarts, 0},
		{"fd-store-max", f.fdStoreMax, 0},
		{"max-draining", f.maxDraining, 1},
	} {
		if n.v < n.min {
			return fmt.Errorf("%w: --%s %d: want at least %d", errUsage, n.name, n.v, n.min)
		}
	}
	return nil
}

// parseRunFlags parses the command line of "upgrader run"; --help gives
// flag.ErrHelp.
func parseRunFlags(args []string) (runFlags, error) {
	var f runFlags
	fs := flag.NewFlagSet("upgrader run", flag.ContinueOnError)
	fs.SetInterspersed(false) // everything after COMMAND belongs to COMMAND
	fs.StringArrayVarP(&f.listen, "listen", "l", nil, "listener `[NAME=]ADDR`: tcp://HOST:PORT, tcp4://, tcp6://, unix:///PATH, udp://HOST:PORT, unixgram:///PATH, or HOST:PORT (repeatable)")
	fs.IntVarP(&f.workers, "workers", "w", 1, "workers per generation")
	fs.StringVar(&f.ready, "ready", "notify", "readiness `MODE`: notify (READY=1 on NOTIFY_SOCKET), fd:N (newline on fd N), delay:DURATION")
	fs.DurationVar(&f.readyTimeout, "ready-timeout", 60*time.Second, "fail an upgrade whose workers are not ready within this")
	fs.DurationVar(&f.drainTimeout, "drain-timeout", 30*time.Second, "SIGKILL a draining worker after this")
	fs.StringVar(&f.drainSignal, "drain-signal", "TERM", "signal that asks a worker to drain")
	fs.DurationVar(&f.shutdownDelay, "shutdown-delay", 0, "on TERM/INT, report not-ready this long before draining (0: off)")
	fs.StringVar(&f.pidFile, "pid-file", "", "write the supervisor's pid to this file")
	fs.IntVar(&f.maxRestarts, "max-restarts", 5, "crash restarts within --restart-window, with no ready worker left, before giving up (0: give up at the first)")
	fs.DurationVar(&f.restartWindow, "restart-window", 60*time.Second, "window for --max-restarts")
	fs.StringVar(&f.health, "health", "", "serve /livez /readyz /status /metrics on `HOST:PORT` (default off)")
	fs.StringVar(&f.control, "control", "", "control socket `PATH` (default upgrader.sock in the runtime directory; \"none\" for none)")
	fs.DurationVar(&f.watchdog, "watchdog", 0, "workers get WATCHDOG_USEC; a worker silent this long is replaced (0: off)")
	fs.IntVar(&f.fdStoreMax, "fd-store-max", 64, "fds workers may keep with FDSTORE=1 for later generations (0: fd store off)")
	fs.IntVar(&f.maxDraining, "max-draining", 4, "generations that may drain at once; beyond it the oldest is sent --drain-signal again to close what is idle, and killed 2s later if still running")
	fs.BoolVar(&f.noHandoff, "no-handoff", false, "do not offer live-connection handoff (UPGRADER_HANDOFF_FD) to workers")
	fs.StringVar(&f.logFormat, "log-format", "console", "log format: console or json")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return f, err
		}
		return f, fmt.Errorf("%w: %v", errUsage, err)
	}
	f.command = fs.Args()
	if len(f.command) == 0 {
		return f, fmt.Errorf("%w: no COMMAND: upgrader [flags] -- COMMAND [ARG...]", errUsage)
	}
	return f, nil
}

// config is the supervisor's configuration from the flags, values passed
// through unchanged: 0 means something of its own to the supervisor.
func (f *runFlags) config() supervise.Config {
	return supervise.Config{
		Version:       version,
		Args:          os.Args,
		Command:       f.command,
		Workers:       f.workers,
		ReadyTimeout:  f.readyTimeout,
		DrainTimeout:  f.drainTimeout,
		ShutdownDelay: f.shutdownDelay,
		MaxRestarts:   f.maxRestarts,
		RestartWindow: f.restartWindow,
		MaxDraining:   f.maxDraining,
		Watchdog:      f.watchdog,
		NoHandoff:     f.noHandoff,
		FDStoreMax:    f.fdStoreMax,
	}
}

// proc is what the process set up before parsing its command line.
type proc struct {
	main *spawn.MainThread // where workers are forked, and a self-upgrade execs
	held chan os.Signal    // signals caught since the start, after a self-upgrade
}

func (p proc) run(args []string) error {
	f, err := parseRunFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := f.validate(); err != nil {
		return err
	}
	if v := os.Getenv(supervise.StateEnv); v != "" {
		return p.resumeRun(f, v)
	}
	// Socket activation in: read LISTEN_* once, before anything else.
	activated, err := adoptListeners()
	if err != nil {
		return err
	}
	// Any other fd we were started with must not leak into workers.
	if err := spawn.CloseOnExecFrom(3); err != nil {
		return err
	}
	logger, err := newLogger(f.logFormat, f.logLevel)
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	log := logger
	defer log.Sync()
	specs, err := parseListeners(f.listen, nil)
	if err != nil {
		for _, sock := range activated {
			sock.Close()
		}
		return err
	}
	// An inherited socket named as a --listen value is that listener, kept
	// in systemd's fd store by an earlier upgrader (fdstore.go): adopt it.
	adopted, activated := adoptForSpecs(log, specs, activated)
	for _, sock := range activated {
		defer sock.Close()
		log.Info("listening", zap.String("name", sock.Spec.Name), zap.String("network", sock.Spec.Network),
			zap.String("address", sock.Addr()), zap.String("from", "LISTEN_FDS"))
	}

	cfg := f.config()
	cfg.RuntimeDir, cfg.Log, cfg.Sockets = runtimeDir(), log, activated
	cfg.MainThread = p.main
	// What a self-upgrade re-executes: the path the binary had at start
	// (/proc/self/exe would name this image's inode, replaced since).
	if exe, err := os.Executable(); err == nil {
		cfg.Executable = exe
	}
	if cfg.Ready, err = supervise.ParseReadyMode(f.ready); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if cfg.DrainSignal, err = supervise.ParseSignal(f.drainSignal); err != nil {
		return fmt.Errorf("%w: --drain-signal: %v", errUsage, err)
	}
	// What would make a second upgrader step on a running one is refused
	// before anything is bound.
	if f.pidFile != "" {
		if err := checkPidFile(f.pidFile); err != nil {
			return err
		}
	}
	var cl net.Listener
	if f.control != "none" {
		path := f.control
		if path == "" {
			path = filepath.Join(cfg.RuntimeDir, "upgrader.sock")
		}
		if cl, err = control.Listen(path); err != nil {
			return err
		}
		defer cl.Close() // unlinks the socket file
		log.Info("control socket", zap.String("path", path))
	}
	for i, spec := range specs {
		sock, from := adopted[i], "LISTEN_FDS (adopted for --listen)"
		if sock == nil {
			if sock, err = sockets.Bind(spec); err != nil {
				for _, s := range adopted[i:] {
					if s != nil {
						s.Close()
					}
				}
				return err
			}
			from = "bound"
		}
		defer sock.Close()
		cfg.Sockets = append(cfg.Sockets, sock)
		log.Info("listening", zap.String("name", spec.Name), zap.String("network", spec.Network), zap.String("address", sock.Addr()),
			zap.String("from", from))
	}
	// Under systemd with FileDescriptorStoreMax=, the --listen sockets
	// outlive this process: a restart or a crash leaves them open.
	storeListeners(log, cfg.Sockets[len(activated):])
	var hl net.Listener
	if f.health != "" {
		if hl, err = health.Listen(f.health); err != nil {
			return err
		}
	}
	cfg.Carry = carry(cl, hl)
	sup, err := supervise.New(cfg)
	if err != nil {
		return err
	}
	return serve(log, f, sup, cl, hl)
}

// serve runs sup with the health endpoints on hl and the control socket
// on cl (either may be nil) until it stops.
func serve(log *zap.Logger, f runFlags, sup *supervise.Supervisor, cl, hl net.Listener) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	hs := health.New(func(ctx context.Context) (health.Snapshot, error) {
		st, err := sup.Status(ctx)
		return snapshot(st), err
	})
	sup.SetHooks(supervise.Hooks{
		Upgrade: func(r supervise.UpgradeResult) { hs.ObserveUpgrade(r.OK, r.ReadyAfter) },
		Restart: hs.ObserveRestart,
		// A probe accepted by this image must be answered before the exec
		// (which would cut it); the next ones wait in the carried
		// listener's queue for the new image.
		BeforeExec: func() func() { return hs.Quiesce(time.Second) },
	})
	if hl != nil {
		log.Info("health endpoints", zap.String("address", hl.Addr().String()))
		go func() {
			if err := hs.Serve(ctx, hl); err != nil {
				log.Error("health endpoints stopped", zap.Error(err))
			}
		}()
	}
	if cl != nil {
		go control.Serve(ctx, cl, controlHandler(sup), log.Named("control"))
	}
	if f.pidFile != "" {
		remove, err := writePidFile(f.pidFile)
		if err != nil {
			return err
		}
		defer remove()
	}
	return sup.Run()
}

// parseListeners parses the --listen values. Workers find their listeners
// by name (LISTEN_FDNAMES), so a name given twice, by two --listen values or
// by a --listen value and a socket-activated fd (inherited names, in
// LISTEN_FDS order), would hand a worker two sockets where it asks for one:
// that is a usage error naming both. Names repeated within LISTEN_FDNAMES are
// systemd's business (a socket unit names all its fds alike) and are kept.
func parseListeners(values, inherited []string) ([]sockets.Spec, error) {
	specs := make([]sockets.Spec, 0, len(values))
	from := map[string]string{} // name → who gave it, for the error
	for i, n := range inherited {
		if _, ok := from[n]; !ok {
			from[n] = fmt.Sprintf("the socket-activated fd %d (LISTEN_FDNAMES)", 3+i)
		}
	}
	for _, v := range values {
		spec, err := sockets.ParseSpec(v)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		if prev, ok := from[spec.Name]; ok {
			return nil, fmt.Errorf("%w: --listen %q: listener name %q is already taken by %s; give one of them another NAME=", errUsage, v, spec.Name, prev)
		}
		from[spec.Name] = fmt.Sprintf("--listen %q", v)
		specs = append(specs, spec)
	}
	return specs, nil
}

// runtimeDir is where the notify socket goes: systemd's RuntimeDirectory=,
// then the user's XDG_RUNTIME_DIR, then the temporary directory.
func runtimeDir() string {
	for _, k := range []string{"RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"} {
		if d := os.Getenv(k); d != "" {
			if fi, err := os.Stat(d); err == nil && fi.IsDir() {
				return strings.SplitN(d, ":", 2)[0]
			}
		}
	}
	return os.TempDir()
}

func newLogger(format, level string) (*zap.Logger, error) {
	return newLoggerTo(format, level, os.Stderr, stderrOnJournal())
}

// newLoggerTo builds the logger writing to w; journal puts each line's
// syslog priority in front of it for journald (journal.go).
func newLoggerTo(format, level string, w zapcore.WriteSyncer, journal bool) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	var cfg zap.Config
	var enc zapcore.Encoder
	switch format {
	case "json":
		cfg = zap.NewProductionConfig()
		enc = zapcore.NewJSONEncoder(cfg.EncoderConfig)
	case "console":
		cfg = zap.NewDevelopmentConfig()
		cfg.DisableCaller = true
		enc = zapcore.NewConsoleEncoder(cfg.EncoderConfig)
	default:
		return nil, fmt.Errorf("--log-format %q: want json or console", format)
	}
	if journal {
		enc = journalEncoder{enc}
	}
	// A stack trace says where in upgrader an error was logged, which is
	// noise to an operator: the message and its fields say what happened
	// (and it would be lines without a priority prefix). No sampling.
	out := zapcore.Lock(w)
	opts := []zap.Option{zap.ErrorOutput(out), zap.Fields(zap.Int("supervisor_pid", os.Getpid()))}
	if cfg.Development {
		opts = append(opts, zap.Development())
	}
	if !cfg.DisableCaller {
		opts = append(opts, zap.AddCaller())
	}
	return zap.New(zapcore.NewCore(enc, out, zap.NewAtomicLevelAt(lvl)), opts...), nil
}

// adoptListeners takes the listeners systemd (or systemd-socket-activate)
// passed in, with their names, through go-systemd's activation.Files, read
// once. An fd that LISTEN_FDS names but that is not an open socket is an
// error naming LISTEN_FDS.
func adoptListeners() ([]*sockets.Socket, error) {
	want := os.Getenv("LISTEN_FDS")
	if want == "" {
		return nil, nil
	}
	if pid := os.Getenv("LISTEN_PID"); pid != fmt.Sprint(os.Getpid()) {
		fmt.Fprintf(os.Stderr, "upgrader: LISTEN_FDS=%s ignored: LISTEN_PID=%s is not this process (%d)\n", want, pid, os.Getpid())
		activation.Files(true)
		return nil, nil
	}
	n, err := strconv.Atoi(want)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("LISTEN_FDS=%q: not a number of fds", want)
	}
	var out []*sockets.Socket
	for i, f := range activation.Files(true) {
		s, err := sockets.AdoptFile(f, 3+i)
		if err != nil {
			for _, s := range out {
				s.Close()
			}
			return nil, fmt.Errorf("LISTEN_FDS=%s: %w", want, err)
		}
		out = append(out, s)
	}
	return out, nil
}
