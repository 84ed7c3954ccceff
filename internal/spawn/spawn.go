// Package spawn starts worker processes the way socket activation requires.
//
// Go cannot run code between fork and exec, yet LISTEN_PID must be the
// worker's own pid (sd_listen_fds(3)). So a worker is started as a re-exec of
// the supervisor's own binary in "shim" mode: the shim, now running as the
// worker's pid, sets LISTEN_PID (and WATCHDOG_PID) to os.Getpid() and execve()s
// the real command in place. The binary's main must call RunShimIfRequested
// first thing.
//
// Processes are forked from one goroutine locked to its OS thread for the
// life of the process, because PR_SET_PDEATHSIG fires when the forking thread
// exits, not the process.
package spawn

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/execshim"
)

// ShimArg is argv[1] of a shim (internal/execshim, which execs from its
// init); internal/earlysig has its own copy, to depend on nothing but
// os/signal.
const ShimArg = execshim.ShimArg

// RunShimIfRequested turns the process into the requested command when it was
// started as a shim (internal/execshim has done so already, from its init,
// in any binary that imports this package), runs a reaper (Spec.Reaped) when
// started as one, and returns otherwise.
func RunShimIfRequested() {
	if len(os.Args) >= 4 && os.Args[1] == reaperArg {
		runReaper(os.Args[2], os.Args[3:])
	}
	execshim.Run()
}

// Spec describes one process to start.
type Spec struct {
	// Path is the resolved executable, Args its argv (Args[0] included).
	Path string
	Args []string
	// Env is the complete environment. LISTEN_PID and WATCHDOG_PID, if
	// present, are replaced by the process's own pid.
	Env []string
	// Files are the fds of the child: Files[i] becomes fd i. -1 leaves the
	// slot closed. Every other fd is close-on-exec and does not leak.
	Files []int
	// Pdeathsig is sent to the child if the supervisor dies (0: none).
	Pdeathsig syscall.Signal
	// Idle starts the command under SCHED_IDLE (sched(7)), set by the shim
	// before its exec so that every thread inherits it (not with Direct
	// or Reaped).
	Idle bool
	// Direct runs Path with Args as they are, without the shim (for a
	// process that is not a worker: the self-check of a new upgrader).
	Direct bool
	// Reaped runs Path with Args, as Direct does, as the child of a reaper:
	// the supervisor's own binary, its child subreaper, which kills the
	// whole tree below it, setsid children and orphans included, when the
	// supervisor dies or Path exits, and then exits as Path did (runReaper).
	// Pdeathsig is then the reaper's, and SIGTERM: it must live on to kill.
	Reaped bool
}

// Spawner forks processes from one locked OS thread.
type Spawner struct {
	self string
	reqs chan request
	// mu guards spares, waiting for the next Starts (spare.go), and
	// closed (Close was called); sparePids is the spares' pids ([]int),
	// for SparePids.
	mu        sync.Mutex
	spares    []*spare
	closed    bool
	sparePids atomic.Value
	tid       int // the forking thread's (ForkingThread)
}

type request struct {
	fn    func() (int, error)
	reply chan result
}

type result struct {
	pid int
	err error
}

// MainThread carries forks and execs to the process's main thread
// (RunOnMainThread).
type MainThread struct {
	reqs chan request
	tid  int
}

// RunOnMainThread runs run in a goroutine and serves the forks and execs of
// every Spawner made with its MainThread
// and execs on the calling thread, which must be the process's main thread
// (main's goroutine, locked to it by runtime.LockOSThread in an init
// function); it exits the process with run's result. The main thread is
// the one thread that survives an execve made from it, so the workers
// forked by one image of the process (a self-upgrade re-executes it) keep
// their parent thread, and their parent-death signal does not fire, in
// every later image.
func RunOnMainThread(run func(*MainThread) int) {
	m := &MainThread{reqs: make(chan request), tid: unix.Gettid()}
	done := make(chan int, 1)
	go func() { done <- run(m) }()
	for {
		select {
		case r := <-m.reqs:
			r.run()
		case code := <-done:
			os.Exit(code)
		}
	}
}

// NewSpawner returns a Spawner that forks on m, the main thread, or with m
// nil on a locked thread of its own (started here). self is the
// supervisor's own executable; "/proc/self/exe" works even after the file
// was replaced.
func NewSpawner(self string, m *MainThread) *Spawner {
	if m != nil {
		return &Spawner{self: self, reqs: m.reqs, tid: m.tid}
	}
	s := &Spawner{self: self, reqs: make(chan request)}
	tid := make(chan int)
	go s.loop(tid)
	s.tid = <-tid
	return s
}

func (s *Spawner) loop(tid chan<- int) {
	// Never unlocked: the thread must outlive every child it forks.
	runtime.LockOSThread()
	tid <- unix.Gettid()
	for r := range s.reqs {
		r.run()
	}
}

func (r request) run() {
	pid, err := r.fn()
	r.reply <- result{pid, err}
}

// Start starts spec through the shim, a spare one if one waits (Prestart),
// and returns the child's pid. The error names the command.
func (s *Spawner) Start(spec Spec) (int, error) {
	if !spec.Direct && !spec.Reaped {
		// From the caller's goroutine: the spare was forked on the forking
		// thread already, and the trip there and back took up to a
		// millisecond or two here, in the new worker's start.
		if pid, ok := s.startOnSpare(spec); ok {
			return pid, nil
		}
	}
	return s.onThread(func() (int, error) { return s.start(spec) })
}

// onThread runs fn on the forking thread and returns what it returned.
func (s *Spawner) onThread(fn func() (int, error)) (int, error) {
	reply := make(chan result, 1)
	s.reqs <- request{fn, reply}
	r := <-reply
	return r.pid, r.err
}

// ForkingThread returns the thread id of the thread that forks every
// child of s: their parent, as /proc/PID/task/TID/children lists them
// (proc(5)). Safe from any goroutine.
func (s *Spawner) ForkingThread() int { return s.tid }

// Exec replaces the process image with path (execve(2)) from the thread
// that forked every worker: execve ends every other thread of the process,
// and a worker's parent-death signal fires when the thread that forked it
// ends, so an exec from any other thread would signal the workers. It
// returns only on failure.
func (s *Spawner) Exec(path string, argv, env []string) error {
	_, err := s.onThread(func() (int, error) {
		// The spares would outlive the image that knows them; the new
		// image starts its own.
		had := s.takeSpares()
		for _, sp := range had {
			sp.discard()
		}
		err := unix.Exec(path, argv, env)
		if len(had) > 0 {
			s.prestartOnThread(had[0].spec, len(had))
		}
		return 0, err
	})
	return err
}

func (s *Spawner) start(spec Spec) (int, error) {
	files := make([]uintptr, len(spec.Files))
	for i, fd := range spec.Files {
		files[i] = uintptr(fd) // -1 becomes ^uintptr(0): syscall closes that slot
	}
	self, argv := s.self, append([]string{s.self, ShimArg, spec.Path}, spec.Args...)
	pdeathsig := spec.Pdeathsig
	switch {
	case spec.Reaped:
		argv[1], pdeathsig = reaperArg, syscall.SIGTERM
	case spec.Direct:
		self, argv = spec.Path, spec.Args
	}
	env := spec.Env
	if !spec.Direct && !spec.Reaped {
		env = shimEnv(spec)
	}
	pid, _, err := syscall.StartProcess(self, argv, &syscall.ProcAttr{
		Env:   env,
		Files: files,
		Sys: &syscall.SysProcAttr{
			// Own process group: a terminal's Ctrl-C reaches the supervisor
			// only, which then drains the workers in order.
			Setpgid:   true,
			Pdeathsig: pdeathsig,
		},
	})
	if err != nil {
		return 0, fmt.Errorf("start %s: %w", spec.Path, err)
	}
	return pid, nil
}

// shimEnv is spec's environment for a shim, spare or not: with IdleEnv
// when it is to start under SCHED_IDLE.
func shimEnv(spec Spec) []string {
	if !spec.Idle {
		return spec.Env
	}
	return append(spec.Env[:len(spec.Env):len(spec.Env)], execshim.IdleEnv)
}

// CloseOnExecFrom marks every fd ≥ lowfd close-on-exec, so that fds the
// supervisor inherited by accident (a shell's, a test runner's) never reach a
// worker. It uses close_range(2) with CLOSE_RANGE_CLOEXEC, and walks
// /proc/self/fd on kernels older than 5.11.
func CloseOnExecFrom(lowfd int) error {
	if err := unix.CloseRange(uint(lowfd), ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err == nil {
		return nil
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fmt.Errorf("close-on-exec: %w", err)
	}
	for _, e := range ents {
		var fd int
		if _, err := fmt.Sscan(e.Name(), &fd); err == nil && fd >= lowfd {
			unix.CloseOnExec(fd)
		}
	}
	return nil
}
