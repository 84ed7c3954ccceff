// Command upgrader holds a server's listening sockets and runs the server as
// generations of workers that inherit them (sd_listen_fds(3)); kill -USR2
// upgrades to what is on disk now with no refused connection and no failed
// request. See README.md and docs/.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	flag "github.com/spf13/pflag"
	"go.uber.org/zap"
	"go.uber.org/zap/exp/zapslog"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/health"
	"github.com/seed6cb0314a/upgrader/internal/control"
	"github.com/seed6cb0314a/upgrader/internal/earlysig"
	"github.com/seed6cb0314a/upgrader/internal/sockets"
	"github.com/seed6cb0314a/upgrader/internal/spawn"
	"github.com/seed6cb0314a/upgrader/internal/workerenv"
	"github.com/seed6cb0314a/upgrader/supervise"
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
	supervise.Init()
	spawn.RunOnMainThread(realMain)
}

func realMain(m *spawn.MainThread) int {
	p := proc{main: m}
	args := os.Args[1:]
	cmd := "run"
	if len(args) > 0 {
		switch args[0] {
		case "run", "upgrade", "status", "prestop", "stop", "version", "help", "self-check":
			cmd, args = args[0], args[1:]
		}
	}
	// The supervisor's signals have been caught since the packages' init
	// (earlysig): for the supervisor to handle, in order, once it runs;
	// any other command dies of a SIGTERM as any program does.
	if cmd == "run" {
		p.held = earlysig.Held()
		// The supervisor's live heap is small (a few MiB) and its
		// garbage comes in bursts at each upgrade: at Go's default of
		// 100 the heap settles at twice the live one and stays mapped,
		// which kept upgrader at 16-17 MiB after 1,000 upgrades; at 50
		// it stays under 15 MiB for a collection a little more often
		// (docs/benchmarks.md). GOGC in the environment still decides.
		if _, set := os.LookupEnv("GOGC"); !set {
			debug.SetGCPercent(50)
		}
	} else {
		earlysig.Release()
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
	case "stop":
		err = stopCmd(args)
	case "version":
		fmt.Println("upgrader", version)
	case "self-check":
		err = selfCheck(args)
	case "help":
		fmt.Print(usage)
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0 // the flag set printed the help
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
  upgrader stop    [--control PATH] [--timeout DUR]
  upgrader version

Run 'upgrader run --help' for the flags.
`

type runFlags struct {
	command       []string
	listen        []string
	workers       int
	ready         string
	readyTimeout  time.Duration
	readyHold     time.Duration
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
	ipc           string
	fdStoreMax    int
	maxDraining   int
	perGen        bool
	steerGrace    time.Duration
	startIdle     bool
}

// parseRunFlags parses the command line of "upgrader run"; --help gives
// flag.ErrHelp. The defaults are supervise.DefaultConfig's.
func parseRunFlags(args []string) (runFlags, error) {
	d := supervise.DefaultConfig()
	var f runFlags
	fs := flag.NewFlagSet("upgrader run", flag.ContinueOnError)
	fs.SetInterspersed(false) // everything after COMMAND belongs to COMMAND
	fs.StringArrayVarP(&f.listen, "listen", "l", nil, "listener `[NAME=]ADDR`: tcp://HOST:PORT, tcp4://, tcp6://, unix:///PATH, udp://HOST:PORT, unixgram:///PATH, or HOST:PORT (repeatable)")
	fs.IntVarP(&f.workers, "workers", "w", d.Workers, "workers per generation")
	fs.StringVar(&f.ready, "ready", d.Ready.String(), "readiness `MODE`: notify (READY=1 on NOTIFY_SOCKET), fd:N (newline on fd N), delay:DURATION")
	fs.DurationVar(&f.readyTimeout, "ready-timeout", d.ReadyTimeout, "fail an upgrade whose workers are not ready within this")
	fs.DurationVar(&f.readyHold, "ready-hold", d.ReadyHold, "drain the old generation only once the new one has stayed ready this long; a crash within it fails the upgrade (0: off)")
	fs.DurationVar(&f.drainTimeout, "drain-timeout", d.DrainTimeout, "SIGKILL a draining worker after this")
	fs.StringVar(&f.drainSignal, "drain-signal", strings.TrimPrefix(unix.SignalName(d.DrainSignal), "SIG"), "signal that asks a worker to drain")
	fs.DurationVar(&f.shutdownDelay, "shutdown-delay", d.ShutdownDelay, "on TERM/INT, report not-ready this long before draining (0: off)")
	fs.StringVar(&f.pidFile, "pid-file", "", "write the supervisor's pid to this file")
	fs.IntVar(&f.maxRestarts, "max-restarts", d.MaxRestarts, "crash restarts within --restart-window, with no ready worker left, before giving up (0: give up at the first)")
	fs.DurationVar(&f.restartWindow, "restart-window", d.RestartWindow, "window for --max-restarts")
	fs.StringVar(&f.health, "health", "", "serve /livez /readyz /status /metrics on `HOST:PORT` (default off)")
	fs.StringVar(&f.control, "control", "", "control socket `PATH` (default upgrader.sock in the runtime directory; \"none\" for none)")
	fs.DurationVar(&f.watchdog, "watchdog", d.Watchdog, "workers get WATCHDOG_USEC; a worker silent this long is replaced (0: off)")
	fs.IntVar(&f.fdStoreMax, "fd-store-max", d.FDStoreMax, "fds workers may keep with FDSTORE=1 for later generations (0: fd store off)")
	fs.IntVar(&f.maxDraining, "max-draining", d.MaxDraining, fmt.Sprintf("generations that may drain at once; beyond it the oldest is sent --drain-signal again to close what is idle, and killed %s later if still running", d.HurryGrace))
	fs.BoolVar(&f.perGen, "listener-per-generation", d.ListenerPerGeneration, "give each generation its own socket for each TCP --listen (SO_REUSEPORT), steer new connections to the newest ready one, and drain the old one once its queue is empty (false: one socket shared by every generation)")
	fs.DurationVar(&f.steerGrace, "steer-grace", d.SteerGrace, "with --listener-per-generation, how long a replaced generation's accept queue of a server that takes no handoffs must stay empty before it is asked to drain")
	fs.BoolVar(&f.startIdle, "start-idle", d.StartIdle, "start an upgrade's workers under SCHED_IDLE until they are ready, so that their start-up takes only CPU the serving generation leaves idle (needs CAP_SYS_NICE to undo, and upgrader under SCHED_OTHER, the policy given back; off otherwise)")
	fs.BoolVar(&f.noHandoff, "no-handoff", d.NoHandoff, "do not offer live-connection handoff (UPGRADER_HANDOFF_FD) to workers")
	fs.StringVar(&f.ipc, "ipc", string(d.IPC), "also give workers this `CHANNEL`: node (Node.js's IPC channel at NODE_CHANNEL_FD: ready and handoffs with process.send)")
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

// config turns the flags into the supervisor's Config, the one place the
// two meet, and checks it with the one validator, Config.Validate (whose
// errors configError turns into usage errors naming the flags). The
// listeners and what the process set up come later.
func (f *runFlags) config() (supervise.Config, error) {
	cfg := supervise.DefaultConfig()
	cfg.Version, cfg.Args, cfg.Command = version, os.Args, f.command
	cfg.Workers, cfg.ReadyTimeout, cfg.ReadyHold, cfg.DrainTimeout = f.workers, f.readyTimeout, f.readyHold, f.drainTimeout
	cfg.ShutdownDelay, cfg.MaxRestarts, cfg.RestartWindow = f.shutdownDelay, f.maxRestarts, f.restartWindow
	cfg.MaxDraining, cfg.Watchdog, cfg.NoHandoff, cfg.FDStoreMax = f.maxDraining, f.watchdog, f.noHandoff, f.fdStoreMax
	cfg.IPC = supervise.IPCKind(f.ipc)
	cfg.ListenerPerGeneration, cfg.SteerGrace, cfg.StartIdle = f.perGen, f.steerGrace, f.startIdle
	// The command handles its process's signals, and is the subreaper of
	// its workers' trees.
	cfg.Signals, cfg.Subreaper = true, true
	cfg.RuntimeDir = runtimeDir()
	var err error
	if cfg.Ready, err = supervise.ParseReadyMode(f.ready); err != nil {
		return cfg, fmt.Errorf("%w: %v", errUsage, err)
	}
	if cfg.DrainSignal, err = supervise.ParseSignal(f.drainSignal); err != nil {
		return cfg, fmt.Errorf("%w: --drain-signal: %v", errUsage, err)
	}
	return cfg, configError(cfg.Validate())
}

// flagOf names the flag of each Config field the command line sets.
var flagOf = map[string]string{
	"Command": "COMMAND", "Workers": "--workers", "Ready": "--ready", "ReadyTimeout": "--ready-timeout",
	"ReadyHold": "--ready-hold", "DrainTimeout": "--drain-timeout", "DrainSignal": "--drain-signal", "ShutdownDelay": "--shutdown-delay",
	"MaxRestarts": "--max-restarts", "RestartWindow": "--restart-window", "MaxDraining": "--max-draining",
	"Watchdog": "--watchdog", "FDStoreMax": "--fd-store-max", "IPC": "--ipc",
	"SteerGrace": "--steer-grace", "StartIdle": "--start-idle",
}

// configError turns a *supervise.ConfigError of a field a flag sets into
// a usage error naming the flag; other errors pass unchanged.
func configError(err error) error {
	var ce *supervise.ConfigError
	if errors.As(err, &ce) {
		if name, ok := flagOf[ce.Field]; ok {
			return fmt.Errorf("%w: %s %v: want %s", errUsage, name, ce.Value, ce.Want)
		}
	}
	return err
}

// proc is what the process set up before parsing its command line.
type proc struct {
	main *spawn.MainThread // where workers are forked, and a self-upgrade execs
	held chan os.Signal    // signals caught since the start (earlysig)
}

// selfCheck is run by a running upgrader on the binary it is about to
// re-execute (upgrader upgrade --self), as "self-check -- ARGS", ARGS the
// command line the exec will give it: it says which state formats this
// build reads once it has taken ARGS through what run does before it
// starts anything (flags, configuration, listener specs, logger). A
// refusal is printed on stdout too, which the running upgrader reads and
// quotes in its reason.
func selfCheck(args []string) error {
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) > 0 {
		if err := checkRunArgs(args); err != nil {
			fmt.Println("upgrader-self-check refused:", strings.TrimPrefix(err.Error(), "usage: "))
			return err
		}
	}
	fmt.Println(supervise.SelfCheckLine(version, len(args) > 0))
	return nil
}

// checkRunArgs takes args, a command line of upgrader (less argv[0]),
// through what run does with it before it starts anything.
func checkRunArgs(args []string) error {
	switch args[0] {
	case "run":
		args = args[1:]
	case "upgrade", "status", "prestop", "stop", "version", "help", "self-check":
		return fmt.Errorf("%w: command line %q: not one of upgrader run", errUsage, args)
	}
	f, err := parseRunFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		return fmt.Errorf("%w: command line %q asks for the help, which would not run", errUsage, args)
	}
	if err != nil {
		return err
	}
	if _, err := f.config(); err != nil {
		return err
	}
	if _, err := parseListeners(f.listen, nil); err != nil {
		return err
	}
	if _, err := newLoggerTo(f.logFormat, f.logLevel, zapcore.AddSync(io.Discard), false); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	return nil
}

func (p proc) run(args []string) error {
	f, err := parseRunFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	cfg, err := f.config()
	if err != nil {
		return err
	}
	cfg.MainThread, cfg.HeldSignals = p.main, p.held
	if v := os.Getenv(supervise.StateEnv); v != "" {
		return resumeRun(f, cfg, v)
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
	log, err := newLogger(f.logFormat, f.logLevel)
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	defer log.Sync()
	cfg.Logger = slogOf(log)
	cfg.Executable = invokedPath()
	bind := sockets.Bind
	if f.perGen {
		bind = sockets.BindReusePort
	}
	socks, err := listeners(log, f.listen, activated, bind)
	for _, sock := range socks {
		defer sock.Close()
	}
	if err != nil {
		return err
	}
	// What would make a second upgrader step on a running one is refused
	// before anything is served.
	if f.pidFile != "" {
		if err := checkPidFile(f.pidFile); err != nil {
			return err
		}
	}
	cl, err := listenControl(log, f.control, cfg.RuntimeDir)
	if err != nil {
		return err
	}
	if cl != nil {
		defer cl.Close() // unlinks the socket file
	}
	// Under systemd with FileDescriptorStoreMax=, the --listen sockets
	// outlive this process: a restart or a crash leaves them open.
	storeListeners(log, socks[len(activated):])
	var hl net.Listener
	if f.health != "" {
		if hl, err = health.Listen(f.health); err != nil {
			return err
		}
	}
	for _, sock := range socks {
		cfg.Listeners = append(cfg.Listeners, supervise.SocketListener(sock))
	}
	if len(socks) == 0 {
		warnNoListeners(log)
	}
	cfg.Carry = carry(cl, hl)
	sup, err := supervise.New(cfg)
	if err != nil {
		return configError(err)
	}
	return serve(log, f, sup, cl, hl)
}

// warnNoListeners says that workers get no socket. It is allowed: a worker
// may serve no socket (a queue consumer) or keep its own in the fd store.
// But one that binds a port itself when it inherits none (examples/hello
// binds 8080) holds it against the next generation, whose upgrade then
// fails or, with SO_REUSEPORT, two generations share it.
func warnNoListeners(log *zap.Logger) {
	log.Warn("no listeners: workers get no LISTEN_FDS; give --listen or socket activation for upgrader to hold the sockets",
		zap.Int("listeners", 0))
}

// invokedPath is what a self-upgrade re-executes: the path this binary was
// invoked by, made absolute now (a relative one, against the working
// directory of the start; a bare name, through PATH), with its symlinks
// left in, for the supervisor resolves them at each self-upgrade: deploys
// flip a link (current → releases/N), which os.Executable, resolved once
// at start, would never see. /proc/self/exe would name this image's
// inode, replaced since. "": unknown, self-upgrades are refused.
func invokedPath() string {
	arg0 := os.Args[0]
	if !strings.Contains(arg0, "/") {
		if p, err := exec.LookPath(arg0); err == nil {
			arg0 = p
		} else if exe, err := os.Executable(); err == nil {
			return exe
		} else {
			return ""
		}
	}
	if p, err := filepath.Abs(arg0); err == nil {
		return p
	}
	exe, _ := os.Executable()
	return exe
}

// listeners returns the sockets workers get: the socket-activated ones
// first, then one per --listen value, adopted from the inherited fds when
// an earlier upgrader kept it in systemd's fd store (fdstore.go), bound
// otherwise. On an error, what it returns is what it opened, to close.
func listeners(log *zap.Logger, values []string, activated []*sockets.Socket, bind func(sockets.Spec) (*sockets.Socket, error)) ([]*sockets.Socket, error) {
	specs, err := parseListeners(values, nil)
	if err != nil {
		return activated, err
	}
	// An inherited socket named as a --listen value is that listener:
	// adopt it.
	adopted, activated := adoptForSpecs(log, specs, activated)
	socks := append([]*sockets.Socket(nil), activated...)
	for _, sock := range activated {
		log.Info("listening", zap.String("name", sock.Spec.Name), zap.String("network", sock.Spec.Network),
			zap.String("address", sock.Addr()), zap.String("from", "LISTEN_FDS"))
	}
	for i, spec := range specs {
		sock, from := adopted[i], "LISTEN_FDS (adopted for --listen)"
		if sock == nil {
			if sock, err = bind(spec); err != nil {
				for _, s := range adopted[i:] {
					if s != nil {
						socks = append(socks, s)
					}
				}
				return socks, err
			}
			from = "bound"
		}
		socks = append(socks, sock)
		log.Info("listening", zap.String("name", spec.Name), zap.String("network", spec.Network), zap.String("address", sock.Addr()),
			zap.String("from", from))
	}
	return socks, nil
}

// listenControl opens the control socket at path ("": upgrader.sock in
// dir; "none": none, and nil).
func listenControl(log *zap.Logger, path, dir string) (net.Listener, error) {
	if path == "none" {
		return nil, nil
	}
	if path == "" {
		path = filepath.Join(dir, "upgrader.sock")
	}
	cl, err := control.Listen(path)
	if err != nil {
		return nil, err
	}
	log.Info("control socket", zap.String("path", path))
	return cl, nil
}

// slogOf hands the supervisor a *slog.Logger that writes through log, so
// that the whole process logs in one format.
func slogOf(log *zap.Logger) *slog.Logger { return slog.New(zapslog.NewHandler(log.Core())) }

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
		Restart: func(c supervise.RestartCause) { hs.ObserveRestart(string(c)) },
		// A probe accepted by this image must be answered before the exec
		// (which would cut it); the next ones wait in the carried
		// listener's queue for the new image.
		BeforeExec: func() func() { return hs.Quiesce(time.Second) },
	})
	if hl != nil {
		// The health endpoints face whoever can reach them: their
		// connections must never take the fds a restart or an upgrade
		// needs.
		n, limit, err := health.MaxConns(sup.FDReserve())
		if err != nil {
			log.Warn("health endpoints: cannot read the fd limit", zap.Error(err))
		}
		hs.SetMaxConns(n)
		log.Info("health endpoints", zap.String("address", hl.Addr().String()), zap.Int("max_conns", n),
			zap.Int("fd_reserve", sup.FDReserve()), zap.Uint64("nofile", limit))
		go func() {
			if err := hs.Serve(ctx, hl); err != nil {
				log.Error("health endpoints stopped", zap.Error(err))
			}
		}()
	}
	if cl != nil {
		go control.Serve(ctx, cl, controlHandler(sup, log), log.Named("control"))
	}
	if f.pidFile != "" {
		remove, err := writePidFile(f.pidFile)
		if err != nil {
			return err
		}
		defer remove()
	}
	// Stops come by signal (Config.Signals) or by the control socket:
	// Run's context is never cancelled.
	return sup.Run(context.Background())
}

// parseListeners parses the --listen values. Workers find their listeners
// by name (LISTEN_FDNAMES), so a name given twice, by two --listen values or
// by a --listen value and a socket-activated fd (inherited names, in
// LISTEN_FDS order), would hand a worker two sockets where it asks for one:
// that is a usage error naming both. Names repeated within LISTEN_FDNAMES are
// systemd's business (a socket unit names all its fds alike) and are kept.
// Names are compared as they are, case included, as systemd and every
// sd_listen_fds_with_names(3) reader compare them: "a" and "A" are two
// listeners, and folding case would refuse what systemd accepts.
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
	names, set := os.LookupEnv(workerenv.ListenFDNames)
	if err := workerenv.CheckFDNames(want, n, names, set); err != nil {
		for _, f := range activation.Files(true) {
			f.Close()
		}
		return nil, err
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
