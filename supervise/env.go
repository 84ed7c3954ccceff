package supervise

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
	"github.com/seed6cb0314a/upgrader/internal/spawn"
)

// env is the supervisor's window on the operating system. Its methods are
// called from the loop goroutine only; the event sources it starts post into
// the loop with post.
type env interface {
	// sources starts the OS event sources (signals, child exits, the notify
	// socket in dir) and returns the NOTIFY_SOCKET path for workers. At
	// most fdBudget fds received with FDSTORE=1 are held in events at once;
	// others are closed as they arrive.
	sources(dir string, fdBudget int, post func(event)) (notifyPath string, err error)
	// processes reads the process table (nil when there is none to read).
	processes() (proctree.Table, error)
	// environ reads a process's initial environment (nil if unreadable).
	environ(pid int) map[string]string
	// lookPath resolves the command, as exec.LookPath.
	lookPath(file string) (string, error)
	// start starts a worker. When readyFD ≥ 0 the worker gets the write end
	// of a pipe at that fd, and ready(pid) is called (from another goroutine)
	// when it writes a newline.
	start(spec spawn.Spec, readyFD int, ready func(pid int)) (pid int, err error)
	kill(pid int, sig syscall.Signal) error
	// connections counts the established TCP and Unix stream connections
	// the processes hold (for upgrade progress; best effort).
	connections(pids []int) int
	// notifyManager sends state to our own service manager (sd_notify(3));
	// a no-op when not run by one.
	notifyManager(state string)
	// check starts path as "path self-check" in its own process group,
	// with its stdout on out (its exit is reaped as any child's).
	check(path string) (pid int, out io.ReadCloser, err error)
	// notifyState returns a close-on-exec duplicate of the notify socket,
	// its path and private directory, to carry across an exec.
	notifyState() (fd int, path, dir string, err error)
	// exec replaces the process image from the thread that forks workers;
	// it returns only on failure.
	exec(path string, argv, env []string) error
	close()
}

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
}

// selfSignals are the signals the supervisor handles, other than SIGCHLD.
var selfSignals = []os.Signal{unix.SIGUSR1, unix.SIGUSR2, unix.SIGHUP, unix.SIGTERM, unix.SIGINT, unix.SIGQUIT}

// HoldSignals catches the supervisor's signals at once, for a new image
// after a self-upgrade: until then they were ignored (set across the exec)
// and the Go runtime's default for SIGTERM would end the process. The
// channel goes in Config.HeldSignals, whence the supervisor takes them.
func HoldSignals() chan os.Signal {
	held := make(chan os.Signal, 16)
	signal.Notify(held, append([]os.Signal{unix.SIGCHLD}, selfSignals...)...)
	return held
}

func newOSEnv(cfg Config) (*osEnv, error) {
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	// Orphans of our workers (daemonising grandchildren) are reparented to
	// us and reaped, instead of to init.
	_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	return &osEnv{spawner: spawn.NewSpawner("/proc/self/exe", cfg.MainThread), devnull: devnull, held: cfg.HeldSignals}, nil
}

func (e *osEnv) sources(dir string, fdBudget int, post func(event)) (string, error) {
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

	if e.held != nil {
		e.sigs, e.held = e.held, nil
	} else {
		e.sigs = make(chan os.Signal, 16)
		signal.Notify(e.sigs, append([]os.Signal{unix.SIGCHLD}, selfSignals...)...)
	}
	// Children that exited while no handler was installed (across a
	// self-upgrade's exec) sent a SIGCHLD that was lost: look now.
	e.sigs <- unix.SIGCHLD
	go func() {
		for sig := range e.sigs {
			if sig == unix.SIGCHLD {
				reap(post)
				continue
			}
			post(evSignal{sig.(syscall.Signal)})
		}
	}()
	return ns.Path(), nil
}

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

// reap collects every exited child without blocking, so no zombie stays.
func reap(post func(event)) {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
		post(evExit{pid: pid, status: ws})
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
	pid, err := e.spawner.Start(spec)
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

func (e *osEnv) check(path string) (int, io.ReadCloser, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return 0, nil, err
	}
	var env []string
	for _, kv := range workerBaseEnv(os.Environ()) {
		env = append(env, kv)
	}
	pid, err := e.spawner.Start(spawn.Spec{Path: path, Args: []string{path, "self-check"}, Env: env,
		Files: []int{int(e.devnull.Fd()), int(w.Fd()), 2}, Pdeathsig: unix.SIGKILL, Direct: true})
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

func (e *osEnv) exec(path string, argv, env []string) error {
	// A signal that came between here and the new image's handlers would
	// take the default action (SIGTERM, SIGUSR2: end the process, and the
	// workers with it): ignore them across the exec. The new image
	// catches them first thing (HoldSignals).
	signal.Ignore(selfSignals...)
	err := e.spawner.Exec(path, argv, env)
	signal.Notify(e.sigs, selfSignals...)
	return err
}

func (e *osEnv) kill(pid int, sig syscall.Signal) error {
	return unix.Kill(pid, sig)
}

func (e *osEnv) processes() (proctree.Table, error) { return proctree.Read("/proc") }

func (e *osEnv) environ(pid int) map[string]string { return proctree.Environ("/proc", pid) }

func (e *osEnv) notifyManager(state string) {
	_, _ = daemon.SdNotify(false, state)
}

func (e *osEnv) close() {
	if e.sigs != nil {
		signal.Stop(e.sigs)
	}
	if e.notify != nil {
		e.notify.Close()
	}
	if e.dir != "" {
		os.RemoveAll(e.dir)
	}
	e.devnull.Close()
}

func (e *osEnv) connections(pids []int) int {
	// The loop waits for this: the kernel's established sockets by
	// sock_diag, not /proc/PID/net/tcp, whose TIME_WAIT rows (hundreds of
	// thousands on a busy server) took seconds to parse, while /readyz
	// probes timed out.
	est, err := proctree.EstablishedTCP()
	n := 0
	for _, pid := range pids {
		inodes := proctree.SocketInodes("/proc", pid)
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
