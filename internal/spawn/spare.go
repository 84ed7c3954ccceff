package spawn

import (
	"strconv"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/execshim"
)

// A spare is a shim started before it is needed
// (`/proc/self/exe __upgrader-exec-shim --spare idle|usual SLOTS`), waiting on a
// SOCK_SEQPACKET socket (unix(7)) for the request that makes it a worker:
// the command, its environment and its fds, passed with SCM_RIGHTS. The
// fork and the shim's own start, a Go runtime's, are then off the path of
// the next worker's start, which becomes one sendmsg(2); the spare, a
// process already, sets LISTEN_PID to its pid and execs as a shim does
// (internal/execshim). It has its own process group and the parent-death
// signal the request would have had, and is forked, as every worker, on
// the forking thread; a request is sent from the caller's goroutine.
type spare struct {
	pid   int
	pidfd int       // CLONE_PIDFD's (clone(2)): signalled and waited for without a pid race
	sock  int       // our end of its socket
	spec  SpareSpec // what it was started with
}

// SpareSpec is what spares are started with (Prestart).
type SpareSpec struct {
	// Pdeathsig is their parent-death signal: only a Spec with the same
	// Pdeathsig may use one.
	Pdeathsig syscall.Signal
	// Idle starts them under SCHED_IDLE (sched(7)), where the usual
	// policy can be had back (CanUnidle): each takes it back once
	// started, and their start takes only CPU the serving workers leave.
	Idle bool
	// FDTable, in slots, is the fd table each grows to as it starts, for
	// the command it becomes (execve(2) keeps the table): that of a
	// worker that grows its own at start (workerenv.HandoffFDTable), so
	// that its growth does not wait for an RCU grace period
	// (execshim's runSpare says why). 0: as a fork leaves it (64).
	FDTable int
}

// MaxSpares bounds Prestart's n.
const MaxSpares = 8

// Prestart keeps n spare shims (at most MaxSpares) of spec waiting for
// the next Starts; spares of another spec are ended first. It returns
// once they are forked. A spare that cannot start (no pidfd: Linux before
// 5.3) leaves Start as it was, a shim of its own per worker. After Close
// it does nothing.
func (s *Spawner) Prestart(spec SpareSpec, n int) {
	s.onThread(func() (int, error) {
		s.prestartOnThread(spec, min(n, MaxSpares))
		return 0, nil
	})
}

// Close ends the waiting spares, and Prestart starts none from then on.
func (s *Spawner) Close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	for _, sp := range s.takeSpares() {
		sp.discard()
	}
}

// SparePids returns the waiting spares' pids: children of the supervisor
// that are no workers (yet). Safe from any goroutine.
func (s *Spawner) SparePids() []int {
	p, _ := s.sparePids.Load().([]int)
	return p
}

// prestartOnThread is Prestart on the forking thread, where every child
// is forked.
func (s *Spawner) prestartOnThread(spec SpareSpec, n int) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	var stale []*spare
	kept := s.spares[:0]
	for _, sp := range s.spares {
		if sp.spec == spec && !sp.exited() {
			kept = append(kept, sp)
		} else {
			stale = append(stale, sp)
		}
	}
	s.spares = kept
	missing := n - len(kept)
	s.publishSparesLocked()
	s.mu.Unlock()
	for _, sp := range stale {
		sp.discard()
	}
	var forked []*spare
	for range max(missing, 0) {
		sp := s.forkSpare(spec)
		if sp == nil {
			break
		}
		forked = append(forked, sp)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		for _, sp := range forked {
			sp.discard()
		}
		return
	}
	s.spares = append(s.spares, forked...)
	s.publishSparesLocked()
}

// forkSpare starts one spare, or returns nil.
func (s *Spawner) forkSpare(spec SpareSpec) *spare {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	mode := execshim.SpareUsual
	if spec.Idle {
		mode = execshim.SpareIdle
	}
	pidfd := -1
	closed := ^uintptr(0)
	// Its fds 0 and 1 stay closed and its environment empty: the request
	// brings the worker's.
	pid, _, err := syscall.StartProcess(s.self, []string{s.self, ShimArg, execshim.SpareArg, mode, strconv.Itoa(max(spec.FDTable, 0))}, &syscall.ProcAttr{
		Files: []uintptr{closed, closed, 2, uintptr(fds[1])},
		Sys:   &syscall.SysProcAttr{Setpgid: true, Pdeathsig: spec.Pdeathsig, PidFD: &pidfd},
	})
	unix.Close(fds[1])
	if err != nil {
		unix.Close(fds[0])
		return nil
	}
	// Ours only: the spare reads its end blocking. Non-blocking, as every
	// socket of the supervisor, a send can never hold its caller.
	unix.SetNonblock(fds[0], true)
	if pidfd < 0 {
		// No pidfd to end it with safely later: end it now.
		unix.Kill(pid, unix.SIGKILL)
		var ws unix.WaitStatus
		unix.Wait4(pid, &ws, 0, nil)
		unix.Close(fds[0])
		return nil
	}
	if spec.Idle {
		// Its main thread, from which the runtime makes the others (they
		// inherit it); the spare asks itself too, for any made before.
		var param [1]int32
		unix.RawSyscall(unix.SYS_SCHED_SETSCHEDULER, uintptr(pid), unix.SCHED_IDLE, uintptr(unsafe.Pointer(&param[0])))
	}
	return &spare{pid: pid, pidfd: pidfd, sock: fds[0], spec: spec}
}

func (s *Spawner) publishSparesLocked() {
	pids := make([]int, len(s.spares))
	for i, sp := range s.spares {
		pids[i] = sp.pid
	}
	s.sparePids.Store(pids)
}

// takeSpares removes every waiting spare from s and returns them.
func (s *Spawner) takeSpares() []*spare {
	s.mu.Lock()
	defer s.mu.Unlock()
	had := s.spares
	s.spares = nil
	s.publishSparesLocked()
	return had
}

// exited tells whether sp has died (killed, out of memory): its pidfd is
// readable then (pidfd_open(2)), and its zombie waits for discard.
func (sp *spare) exited() bool {
	fds := []unix.PollFd{{Fd: int32(sp.pidfd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0
}

// discard ends sp and reaps it. The supervisor may have reaped it first
// (a subreaper waits for any child): ECHILD.
func (sp *spare) discard() {
	unix.Close(sp.sock) // EOF: a spare that reads it exits by itself
	unix.PidfdSendSignal(sp.pidfd, unix.SIGKILL, nil, 0)
	var info unix.Siginfo
	for unix.Waitid(unix.P_PIDFD, sp.pidfd, &info, unix.WEXITED, nil) == unix.EINTR {
	}
	unix.Close(sp.pidfd)
}

// startOnSpare hands spec to a waiting spare and returns its pid, now the
// worker's; ok is false when none is fit for it (its parent-death signal
// differs, or the request is too large for the spare's one read) or those
// that were are gone, and spec must start through a shim of its own.
func (s *Spawner) startOnSpare(spec Spec) (pid int, ok bool) {
	if len(s.SparePids()) == 0 {
		return 0, false // nothing to encode the request for
	}
	msg, oob, fits := encodeRequest(spec)
	if !fits {
		return 0, false // the spares wait for the next
	}
	for {
		sp := s.takeSpare(spec.Pdeathsig)
		if sp == nil {
			return 0, false
		}
		if sp.spec.Idle && !spec.Idle {
			// Best effort, before it reads the request: it takes the usual
			// policy back itself once started, but may be starting still,
			// and under load an idle thread gets next to nothing.
			Unidle("/proc", sp.pid)
		}
		if err := unix.Sendmsg(sp.sock, msg, oob, nil, unix.MSG_NOSIGNAL); err != nil {
			sp.discard() // it died: EPIPE
			continue
		}
		// The request is in its queue: closing our end loses nothing of it.
		unix.Close(sp.sock)
		unix.Close(sp.pidfd)
		return sp.pid, true
	}
}

// takeSpare removes a waiting spare with parent-death signal pdeathsig
// from s and returns it, or nil.
func (s *Spawner) takeSpare(pdeathsig syscall.Signal) *spare {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.spares)
	if n == 0 || s.spares[n-1].spec.Pdeathsig != pdeathsig {
		return nil
	}
	sp := s.spares[n-1]
	s.spares = s.spares[:n-1]
	s.publishSparesLocked()
	return sp
}

// encodeRequest is spec as a spare's request: the message and its
// SCM_RIGHTS, each distinct fd of spec.Files once; fits is false when
// they exceed what a spare reads (execshim.SpareMaxRequest, SpareMaxFDs).
func encodeRequest(spec Spec) (msg, oob []byte, fits bool) {
	var fds []int
	index := map[int]int{}
	slots := make([]int, len(spec.Files))
	for i, fd := range spec.Files {
		if fd < 0 {
			slots[i] = -1
			continue
		}
		k, seen := index[fd]
		if !seen {
			k = len(fds)
			index[fd] = k
			fds = append(fds, fd)
		}
		slots[i] = k
	}
	msg = execshim.EncodeRequest(spec.Path, spec.Args, shimEnv(spec), slots)
	if len(msg) > execshim.SpareMaxRequest || len(fds) > execshim.SpareMaxFDs {
		return nil, nil, false
	}
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	return msg, oob, true
}
