package supervise

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/proctree"
	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
	"github.com/seed6cb0314a/upgrader/internal/spawn"
)

// env is the supervisor's window on the operating system and the clock.
// Its methods are called from the loop goroutine only, except afterFunc's
// f, which runs on a goroutine of its own and may only post; the event
// sources it starts post into the loop with post.
type env interface {
	// sources starts the OS event sources (signals, child exits, the notify
	// socket in dir) and returns the NOTIFY_SOCKET path for workers. At
	// most fdBudget fds received with FDSTORE=1 are held in events at once;
	// others are closed as they arrive.
	sources(dir string, fdBudget int, post func(event)) (notifyPath string, err error)
	// now and afterFunc are the clock, as time.Now and time.AfterFunc.
	now() time.Time
	afterFunc(d time.Duration, f func()) stopper
	// processes reads the process table (nil when there is none to read).
	processes() (proctree.Table, error)
	// ownChildren lists the supervisor's own children, zombies included,
	// that a worker's tree can leave (proctree.ChildrenOfThreads): the
	// workers and spares, and the orphans of their trees; an error when
	// that cannot be told cheaply.
	ownChildren() ([]int, error)
	// environ reads a process's initial environment (nil if unreadable);
	// ownEnviron is the supervisor's own, as os.Environ.
	environ(pid int) map[string]string
	ownEnviron() []string
	// lookPath resolves the command, as exec.LookPath.
	lookPath(file string) (string, error)
	// start starts a worker. When readyFD ≥ 0 the worker gets the write end
	// of a pipe at that fd, and ready(pid) is called (from another goroutine)
	// when it writes a newline.
	start(spec spawn.Spec, readyFD int, ready func(pid int)) (pid int, err error)
	// prestart keeps n spare shims for the next starts (spawn.Prestart);
	// spares are their pids; closeSpares ends them for good.
	prestart(spec spawn.SpareSpec, n int)
	spares() []int
	closeSpares()
	// canStartIdle says why workers may not start under SCHED_IDLE, nil
	// when they may (spawn.CanStartIdle); unidle gives pid's threads, and
	// its descendants', the usual policy back from SCHED_IDLE
	// (spawn.Unidle).
	canStartIdle() error
	unidle(pid int) error
	// kill sends sig to pid (a negative pid: its process group), kill(2).
	kill(pid int, sig syscall.Signal) error
	// fdSockets maps the inodes of the sockets pid holds to their fds
	// (proctree.Sockets); the error says its fd table cannot be read.
	fdSockets(pid int) (map[string]int, error)
	// holdsFile tells whether pid holds, at one of its first fds, the open
	// file of one of ours (proctree.HoldsFile); false when it cannot tell.
	holdsFile(pid int, ours []int) bool
	// connections counts the established TCP and Unix stream connections
	// the processes hold (for upgrade progress; best effort), leaving out
	// the sockets whose inodes are in ours (the listeners, the workers'
	// channels). It may block: call it off the loop.
	connections(pids []int, ours map[string]struct{}) int
	// notifyManager sends state to our own service manager (sd_notify(3));
	// a no-op when not run by one.
	notifyManager(state string)
	// check starts path as "path self-check -- ARGS..." (args: the
	// command line the exec will give it, less argv[0]) in its own process
	// group, with its stdout on out (its exit is reaped as any child's),
	// below a reaper (spawn.Spec.Reaped) whose pid is returned: a check
	// that forks cannot leave anything behind if the supervisor dies.
	check(path string, args []string) (pid int, out io.ReadCloser, err error)
	// notifyState returns a close-on-exec duplicate of the notify socket,
	// its path and private directory, to carry across an exec.
	notifyState() (fd int, path, dir string, err error)
	// exec replaces the process image from the thread that forks workers,
	// with record in a memfd named by StateEnv and the fds in keep left
	// open across it; it returns only on failure, with keep's fds
	// close-on-exec again.
	exec(path string, argv, env []string, record []byte, keep []int) error
	close()
}

// stopper stops a timer from afterFunc, as (*time.Timer).Stop.
type stopper interface{ Stop() bool }

// osEnv is the real env.
type osEnv struct {
	spawner *spawn.Spawner
	devnull *os.File
	sigs    chan os.Signal
	notify  *sdnotify.Server
	dir     string
	// resume, after a self-upgrade, is the notify socket to take over.
	resume *NotifyState
	// held are the signals caught since the start (HoldSignals), nil if none.
	held chan os.Signal
	// handle: the supervisor's own signals are caught (Config.Signals);
	// subreaper: it reaps any child (Config.Subreaper), otherwise only
	// those it started, listed in children.
	handle, subreaper bool
	claimed           bool // running is ours to release
	// reapAll: every child is reaped, as the subreaper or as PID 1 (a
	// container's init), to which orphans come whatever we ask.
	reapAll  bool
	mu       sync.Mutex
	children map[int]struct{}
}

// selfSignals are the signals the supervisor handles, other than SIGCHLD.
var selfSignals = []os.Signal{unix.SIGUSR1, unix.SIGUSR2, unix.SIGHUP, unix.SIGTERM, unix.SIGINT, unix.SIGQUIT}

// CaughtSignals are the signals a supervisor with Config.Signals catches
// (SIGCHLD included), which HoldSignals holds.
func CaughtSignals() []os.Signal { return append([]os.Signal{unix.SIGCHLD}, selfSignals...) }

// HoldSignals catches the supervisor's signals at once; call it first
// thing in main (after Init) and put the channel in Config.HeldSignals,
// whence the supervisor takes them, in order, once it runs. Until a signal
// is caught, the Go runtime's default for SIGHUP and SIGTERM ends the
// process and drops SIGUSR2: a reload or a stop sent during the start-up
// would kill or be lost. A new image after a self-upgrade needs it most:
// the old one ignored these signals across the exec.
func HoldSignals() chan os.Signal {
	held := make(chan os.Signal, 16)
	signal.Notify(held, CaughtSignals()...)
	return held
}

func newOSEnv(cfg Config) (*osEnv, error) {
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	if cfg.Subreaper {
		// Orphans of our workers (daemonising grandchildren) are
		// reparented to us and reaped, instead of to init.
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			devnull.Close()
			return nil, fmt.Errorf("Config.Subreaper: prctl(PR_SET_CHILD_SUBREAPER): %w", err)
		}
	}
	return &osEnv{spawner: spawn.NewSpawner("/proc/self/exe", cfg.MainThread), devnull: devnull, held: cfg.HeldSignals,
		handle: cfg.Signals, subreaper: cfg.Subreaper, reapAll: cfg.Subreaper || os.Getpid() == 1, children: map[int]struct{}{}}, nil
}

// running enforces one supervisor on the real OS per process, as
// tableflip does: two would each reap (or, as subreaper, steal) the
// other's children and handle the same signals.
var running atomic.Bool

// ErrRunning is returned by Run when another supervisor runs in this
// process.
var ErrRunning = errors.New("supervise: a supervisor already runs in this process")

func (e *osEnv) sources(dir string, fdBudget int, post func(event)) (string, error) {
	if !running.CompareAndSwap(false, true) {
		return "", ErrRunning
	}
	e.claimed = true
	var ns *sdnotify.Server
	if r := e.resume; r != nil {
		e.dir = r.Dir
		var err error
		if ns, err = sdnotify.FromFD(r.FD, r.Path, fdBudget); err != nil {
			return "", err
		}
	} else {
		removeStaleNotifyDirs(dir)
		d, err := os.MkdirTemp(dir, fmt.Sprintf("upgrader-%d-", os.Getpid()))
		if err != nil {
			return "", fmt.Errorf("runtime directory %s: %w", dir, err)
		}
		e.dir = d
		ns, err = sdnotify.Listen(filepath.Join(d, "notify.sock"), fdBudget)
		if err != nil {
			os.RemoveAll(d)
			return "", err
		}
	}
	e.notify = ns
	go readNotify(ns, fdBudget, post)
	// The handoff relay holds a few batches of a draining worker's
	// connections at once, and parks some: its fd table grows now, off
	// the relay's path (handoff.ReserveFDTable says why).
	go func() {
		if fd, err := ns.DupFD(); err == nil {
			handoff.ReserveFDTable(fd, relayFDTable)
			unix.Close(fd)
		}
	}()

	switch {
	case e.held != nil:
		e.sigs, e.held = e.held, nil
	case e.handle:
		e.sigs = make(chan os.Signal, 16)
		signal.Notify(e.sigs, CaughtSignals()...)
	default:
		e.sigs = make(chan os.Signal, 16)
		signal.Notify(e.sigs, unix.SIGCHLD)
	}
	// Children that exited while no handler was installed (across a
	// self-upgrade's exec) sent a SIGCHLD that was lost: look now.
	e.sigs <- unix.SIGCHLD
	go func() {
		for sig := range e.sigs {
			if sig == unix.SIGCHLD {
				e.reap(post)
				continue
			}
			post(evSignal{sig.(syscall.Signal)})
		}
	}()
	return ns.Path(), nil
}

// adopt records pids as children of this supervisor, for reap (a
// self-upgrade's new image adopts the workers the old one started).
func (e *osEnv) adopt(pids ...int) {
	e.mu.Lock()
	for _, pid := range pids {
		e.children[pid] = struct{}{}
	}
	e.mu.Unlock()
}

// reap collects exited children without blocking, so no zombie stays: any
// child as the subreaper (wait4(-1)), otherwise only those this
// supervisor started, so that a host program's own children (os/exec's)
// are left to it.
func (e *osEnv) reap(post func(event)) {
	if e.reapAll {
		reapPid(-1, post)
		return
	}
	e.mu.Lock()
	pids := make([]int, 0, len(e.children))
	for pid := range e.children {
		pids = append(pids, pid)
	}
	e.mu.Unlock()
	for _, pid := range pids {
		if reapPid(pid, post) {
			e.mu.Lock()
			delete(e.children, pid)
			e.mu.Unlock()
		}
	}
}

// reapPid waits without blocking for pid (-1: any child) and posts each
// exit; it reports whether pid was reaped or is no child of ours.
//
// It learns of an exit first with waitid(2) WNOWAIT, which leaves the
// child a zombie, posts it, and only then reaps it: the reap is where the
// kernel releases the process (release_task), invalidating every dentry
// of its /proc/PID on the way, and a worker whose fd table was read (the
// connection count of an upgrade, readlink per fd) leaves one per fd:
// about 10 ms for 10,000 connections here, which the loop need not wait
// for to hear that the generation is gone. (The loop usually handles the
// exit after the reap all the same: post does not wait for it.)
func reapPid(pid int, post func(event)) bool {
	for {
		got, ws, err := peekExit(pid)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.ECHILD) {
			return true
		}
		if got <= 0 || err != nil {
			return false
		}
		post(evExit{pid: got, status: ws})
		for {
			var ws unix.WaitStatus
			if _, err := unix.Wait4(got, &ws, unix.WNOHANG, nil); !errors.Is(err, unix.EINTR) {
				break
			}
		}
		if pid > 0 {
			return true
		}
	}
}

// si_code values of SIGCHLD (include/uapi/asm-generic/siginfo.h).
const (
	cldExited = 1
	cldKilled = 2
	cldDumped = 3
)

// peekExit returns a child of ours that has exited (pid, or any child for
// -1) and its status, as wait4(2) would, but leaves it unreaped
// (waitid(2) with WEXITED|WNOHANG|WNOWAIT); got is 0 when none has
// exited. The status is rebuilt from the siginfo_t's si_code and
// si_status, which x/sys/unix leaves in its union (sigaction(2)).
func peekExit(pid int) (got int, ws unix.WaitStatus, err error) {
	idType, id := unix.P_PID, pid
	if pid < 0 {
		idType, id = unix.P_ALL, 0
	}
	var info unix.Siginfo
	if err := unix.Waitid(idType, id, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil); err != nil {
		return 0, 0, err
	}
	// siginfo_t: si_signo, si_errno, si_code (ints), then the union,
	// aligned as a pointer (byte 16 on 64-bit, 12 on 32-bit), whose
	// SIGCHLD member begins si_pid, si_uid, si_status.
	ptr := int(unsafe.Sizeof(uintptr(0)))
	union := (12 + ptr - 1) &^ (ptr - 1)
	raw := (*[128]byte)(unsafe.Pointer(&info))
	got = int(int32(binary.NativeEndian.Uint32(raw[union:])))
	status := int(int32(binary.NativeEndian.Uint32(raw[union+8:])))
	switch info.Code {
	case cldExited:
		ws = unix.WaitStatus(status&0xff) << 8
	case cldKilled:
		ws = unix.WaitStatus(status & 0x7f)
	case cldDumped:
		ws = unix.WaitStatus(status&0x7f) | 0x80
	default:
		return 0, 0, nil // stopped or continued: waitid was not asked for those
	}
	return got, ws, nil
}

func (e *osEnv) now() time.Time { return time.Now() }

func (e *osEnv) afterFunc(d time.Duration, f func()) stopper { return time.AfterFunc(d, f) }

// readNotify turns notify datagrams into events until the socket closes.
// Fds are only worth holding for FDSTORE=1, and at most fdBudget of them at
// once: the rest are closed here, before they queue up in events, so that
// a flood of fds cannot exhaust the fd table.
func readNotify(ns *sdnotify.Server, fdBudget int, post func(event)) {
	var held atomic.Int64
	for {
		dg, err := ns.Recv()
		if err != nil {
			return // closed
		}
		ev := evNotify{dg: dg, truncated: dg.FDsTruncated}
		if n := int64(len(dg.Files)); n > 0 {
			if dg.Err != nil || !dg.Message.Is("FDSTORE", "1") || held.Add(n) > int64(fdBudget) {
				if dg.Err == nil && dg.Message.Is("FDSTORE", "1") {
					held.Add(-n)
				}
				for _, f := range dg.Files {
					f.Close()
				}
				ev.dg.Files, ev.dropped = nil, int(n)
			} else {
				ev.release = func() { held.Add(-n) }
			}
		}
		post(ev)
	}
}

// removeStaleNotifyDirs removes the notify directories that upgraders
// killed without a chance to clean up left in dir: upgrader-PID-* whose
// PID no longer runs.
func removeStaleNotifyDirs(dir string) {
	ents, _ := os.ReadDir(dir)
	for _, ent := range ents {
		rest, ok := strings.CutPrefix(ent.Name(), "upgrader-")
		pidText, _, ok2 := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidText)
		if !ok || !ok2 || err != nil || !ent.IsDir() || pid <= 0 {
			continue
		}
		if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
			os.RemoveAll(filepath.Join(dir, ent.Name()))
		}
	}
}

func (e *osEnv) lookPath(file string) (string, error) {
	p, err := exec.LookPath(file)
	if err != nil {
		return "", fmt.Errorf("COMMAND %q: %w", file, err)
	}
	return filepath.Abs(p)
}

func (e *osEnv) start(spec spawn.Spec, readyFD int, ready func(int)) (int, error) {
	spec.Files[0] = int(e.devnull.Fd())
	var r, w *os.File
	if readyFD >= 0 {
		var err error
		if r, w, err = os.Pipe(); err != nil {
			return 0, fmt.Errorf("ready pipe: %w", err)
		}
		for len(spec.Files) <= readyFD {
			spec.Files = append(spec.Files, -1)
		}
		spec.Files[readyFD] = int(w.Fd())
	}
	pid, err := e.startChild(spec)
	if w != nil {
		w.Close()
	}
	if err != nil {
		if r != nil {
			r.Close()
		}
		return 0, err
	}
	if r != nil {
		go func() {
			defer r.Close()
			// s6 readiness: a newline written to the fd. EOF first means
			// the worker closed it (or died) without saying so.
			if _, err := bufio.NewReader(r).ReadString('\n'); err == nil {
				ready(pid)
			}
		}()
	}
	return pid, nil
}

func (e *osEnv) prestart(spec spawn.SpareSpec, n int) { e.spawner.Prestart(spec, n) }

func (e *osEnv) spares() []int { return e.spawner.SparePids() }

func (e *osEnv) closeSpares() { e.spawner.Close() }

func (e *osEnv) check(path string, args []string) (int, io.ReadCloser, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return 0, nil, err
	}
	pid, err := e.startChild(spawn.Spec{Path: path, Args: append([]string{path, "self-check", "--"}, args...), Env: workerBaseEnv(os.Environ()),
		Files: []int{int(e.devnull.Fd()), int(w.Fd()), 2}, Reaped: true})
	w.Close()
	if err != nil {
		r.Close()
		return 0, nil, err
	}
	return pid, r, nil
}

func (e *osEnv) notifyState() (int, string, string, error) {
	if e.notify == nil {
		return -1, "", e.dir, nil
	}
	fd, err := e.notify.DupFD()
	return fd, e.notify.Path(), e.dir, err
}

// startChild starts spec and, unless the supervisor is the subreaper
// (which reaps any child), records its pid for reap; a SIGCHLD that came
// before the record is looked at again.
func (e *osEnv) startChild(spec spawn.Spec) (int, error) {
	pid, err := e.spawner.Start(spec)
	if err != nil || e.reapAll {
		return pid, err
	}
	e.adopt(pid)
	select {
	case e.sigs <- unix.SIGCHLD:
	default: // a look is queued already
	}
	return pid, nil
}

func (e *osEnv) exec(path string, argv, env []string, record []byte, keep []int) error {
	mfd, err := unix.MemfdCreate("upgrader-state", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("memfd: %w", err)
	}
	defer unix.Close(mfd)
	if _, err := unix.Pwrite(mfd, record, 0); err != nil {
		return fmt.Errorf("state record: %w", err)
	}
	defer func() {
		for _, fd := range keep {
			unix.CloseOnExec(fd)
		}
	}()
	for _, fd := range append([]int{mfd}, keep...) {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, 0); err != nil {
			return fmt.Errorf("clear close-on-exec on fd %d: %w", fd, err)
		}
	}
	env = append(env, StateEnv+"="+strconv.Itoa(mfd))
	// A signal that came between here and the new image's handlers would
	// take the default action (SIGTERM, SIGUSR2: end the process, and the
	// workers with it): ignore them across the exec. The new image
	// catches them first thing (HoldSignals).
	signal.Ignore(selfSignals...)
	err = e.spawner.Exec(path, argv, env)
	if e.handle {
		signal.Notify(e.sigs, selfSignals...)
	}
	return err
}

func (e *osEnv) ownEnviron() []string { return os.Environ() }

func (e *osEnv) kill(pid int, sig syscall.Signal) error {
	return unix.Kill(pid, sig)
}

func (e *osEnv) processes() (proctree.Table, error) { return proctree.Read("/proc") }

func (e *osEnv) canStartIdle() error { return spawn.CanStartIdle() }

func (e *osEnv) unidle(pid int) error { return spawn.Unidle("/proc", pid) }

// ownChildren reads two of the supervisor's threads: a child's parent is
// the thread that forked it, and the spawner forks every worker and spare
// on its thread, while an orphan is reparented to the subreaper's first
// live thread, its leader (find_new_reaper, kernel/exit.c), which a Go
// process keeps. Children that other threads fork (an embedding program's
// own) are not the supervisor's business here.
func (e *osEnv) ownChildren() ([]int, error) {
	pid := os.Getpid()
	return proctree.ChildrenOfThreads("/proc", pid, []int{pid, e.spawner.ForkingThread()})
}

func (e *osEnv) fdSockets(pid int) (map[string]int, error) { return proctree.Sockets("/proc", pid) }

// holdsFileLimit is how many of a worker's first fds holdsFile compares
// with ours: those a worker that has just started puts its listeners at.
const holdsFileLimit = 64

func (e *osEnv) holdsFile(pid int, ours []int) bool {
	found, err := proctree.HoldsFile(pid, ours, holdsFileLimit)
	return found && err == nil
}

func (e *osEnv) environ(pid int) map[string]string { return proctree.Environ("/proc", pid) }

func (e *osEnv) notifyManager(state string) {
	_, _ = daemon.SdNotify(false, state)
}

func (e *osEnv) close() {
	if e.claimed {
		defer running.Store(false)
	}
	if e.sigs != nil {
		signal.Stop(e.sigs)
	}
	if e.notify != nil {
		e.notify.Close()
	}
	if e.dir != "" {
		os.RemoveAll(e.dir)
	}
	e.spawner.Close()
	e.devnull.Close()
}

func (e *osEnv) connections(pids []int, ours map[string]struct{}) int {
	tables := map[int]map[string]int{}
	for _, pid := range pids {
		inodes := proctree.SocketInodes("/proc", pid)
		for in := range inodes {
			if _, ok := ours[in]; ok {
				delete(inodes, in)
			}
		}
		if len(inodes) > 0 {
			tables[pid] = inodes
		}
	}
	if len(tables) == 0 {
		// Nothing but our own sockets: no dump, which walks the kernel's
		// whole established hash (a millisecond of CPU a family here,
		// taken from the new worker's start).
		return 0
	}
	// The loop waits for this: the kernel's established sockets by
	// sock_diag, not /proc/PID/net/tcp, whose TIME_WAIT rows (hundreds of
	// thousands on a busy server) took seconds to parse, while /readyz
	// probes timed out.
	est, err := proctree.EstablishedTCP()
	n := 0
	for _, pid := range pids {
		inodes := tables[pid]
		if len(inodes) == 0 {
			continue
		}
		if err == nil && proctree.SameNetNamespace("/proc", pid) {
			for in := range inodes {
				if _, ok := est[in]; ok {
					n++
				}
			}
		} else {
			// The tables of the worker's own network namespace.
			n += len(proctree.TCPSockets("/proc", pid, proctree.TCPEstablished, inodes))
		}
		n += countUnixConnected(fmt.Sprintf("/proc/%d/net/unix", pid), inodes)
	}
	return n
}

// countUnixConnected counts the rows of a /proc/net/unix table for
// connected stream sockets (Type 0001, St 03) whose inode is one of inodes.
// Columns: Num RefCount Protocol Flags Type St Inode.
func countUnixConnected(path string, inodes map[string]int) int {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) > 6 && fs[4] == "0001" && fs[5] == "03" {
			if _, ok := inodes[fs[6]]; ok {
				n++
			}
		}
	}
	return n
}
