package execshim

import (
	"os"
	"runtime"
	"syscall"
	"unsafe"
)

// SpareArg is argv[2] of a spare shim (argv[1] ShimArg, argv[3]
// SpareIdle or SpareUsual, its CPU policy, argv[4] the fd table it grows
// to, in slots, 0 for none; see runSpare): a shim started before it is
// needed, which waits on fd 3, a SOCK_SEQPACKET socket, for the one
// request that makes it a worker (internal/spawn). A resolved command path
// is absolute, so it cannot be taken for one.
const SpareArg = "--spare"

// The spare's CPU policy as it starts, argv[3]: SCHED_IDLE (sched(7)),
// which it leaves once started, or the usual one. A command that is to
// start idle says so as a shim's does (IdleEnv in its environment).
const (
	SpareIdle  = "idle"
	SpareUsual = "usual"
)

// SpareFD is the spare's end of its socket.
const SpareFD = 3

// Request limits: a request that does not fit is started through a shim
// of its own instead (internal/spawn), so that the spare's one read takes
// it whole. SCM_MAX_FD is 253 (unix(7)); an AF_UNIX datagram's size is
// bounded by the socket's send buffer, 208 KiB by default (socket(7)).
const (
	SpareMaxRequest = 64 << 10
	SpareMaxFDs     = 250
)

// SpareMagic begins every request: a spare of another build must not
// misread one.
const SpareMagic = "upgrader-spare-1"

// runSpare grows its fd table to table slots, waits for the request,
// puts its fds in place and execs its command (execCommand). EOF, the
// spawner's end closed, ends it quietly: it is no longer wanted. A
// request it cannot read is printed to stderr and exits 127, as a failed
// exec does.
//
// The fd table is the command's: execve(2) keeps it, slots and all, once
// the other threads are gone. A worker that grows its own as it starts
// (inherit does, for the fds of a handoff: workerenv.HandoffFDTable) then
// finds it grown, and does not wait for the RCU grace period that every
// growth of a table shared by threads waits for (expand_fdtable in
// fs/file.c: milliseconds, up to 22 ms traced here). A worker asked to
// drain within them could not exit until the growth was over. The spare's
// own growth waits for none: its thread makes the table its own first
// (growFDTable).
func runSpare(idle bool, table int) {
	// One thread from the policy call to the exec: the one that execs is
	// the one whose policy the command keeps.
	runtime.LockOSThread()
	if idle {
		// Its start is done: it waits with the usual policy, since an idle
		// thread that the request wakes waits for every busy core (the Go
		// runtime's threads hand work to each other, and upgrader's own
		// work at an upgrade's start took 1.7 ms of a core from it here).
		setThreadsScheduler(schedOther)
	}
	syscall.CloseOnExec(SpareFD)
	growFDTable(table)
	buf := make([]byte, SpareMaxRequest)
	oob := make([]byte, syscall.CmsgSpace(4*SpareMaxFDs))
	var n, oobn, flags int
	var err error
	for {
		n, oobn, flags, _, err = syscall.Recvmsg(SpareFD, buf, oob, syscall.MSG_CMSG_CLOEXEC)
		if err != syscall.EINTR {
			break
		}
	}
	if err == nil && n == 0 && oobn == 0 {
		os.Exit(0)
	}
	if err != nil {
		spareFail("read request: " + err.Error())
	}
	if flags&(syscall.MSG_TRUNC|syscall.MSG_CTRUNC) != 0 {
		spareFail("request truncated")
	}
	var fds []int
	cmsgs, err := syscall.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		spareFail("request fds: " + err.Error())
	}
	for i := range cmsgs {
		got, err := syscall.ParseUnixRights(&cmsgs[i])
		if err != nil {
			spareFail("request fds: " + err.Error())
		}
		fds = append(fds, got...)
	}
	r, ok := parseRequest(buf[:n], len(fds))
	if !ok {
		spareFail("malformed request")
	}
	if err := placeFDs(fds, r.slots); err != "" {
		spareFail(err)
	}
	if idle {
		// Its policy was taken back once started, but the spawner's own
		// SCHED_IDLE for the spare may have come after: the command must
		// not start idle unasked (IdleEnv), for nobody would give it back.
		setScheduler(schedOther)
	}
	execCommand(r.path, r.argv, r.env)
}

// growFDTable grows the calling thread's fd table to n slots, or to the
// soft RLIMIT_NOFILE if that is lower, by duplicating SpareFD at the last
// one (fcntl(2) F_DUPFD_CLOEXEC) and closing the copy; it is best effort.
//
// The table becomes the thread's own first (unshare(2) CLONE_FILES): the
// kernel waits for an RCU grace period only to grow a table that another
// thread shares, and the Go runtime's threads share this one. The spare's
// locked thread does all its fd work from then on, and execs with it.
// It is handoff.ReserveFDTable's dup and close, written again here since
// the shim's package imports only os and syscall (execshim.go says why).
func growFDTable(n int) {
	var rl syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl) == nil && uint64(n) > rl.Cur {
		n = int(rl.Cur)
	}
	if n <= SpareFD+1 {
		return
	}
	if syscall.Unshare(syscall.CLONE_FILES) != nil {
		return // a grown shared table would only cost the wait
	}
	if fd, _, e := syscall.Syscall(syscall.SYS_FCNTL, SpareFD, syscall.F_DUPFD_CLOEXEC, uintptr(n-1)); e == 0 {
		syscall.Close(int(fd))
	}
}

// setThreadsScheduler gives every thread of the process policy
// (sched_setscheduler(2) on each of /proc/self/task); a failure leaves
// that thread's as it was.
func setThreadsScheduler(policy uintptr) {
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		setScheduler(policy)
		return
	}
	for _, e := range ents {
		if tid, ok := atoi(e.Name()); ok {
			setThreadScheduler(tid, policy)
		}
	}
}

// setScheduler is sched_setscheduler(0, policy, {0}): the calling thread.
// A failure leaves the policy it had.
func setScheduler(policy uintptr) { setThreadScheduler(0, policy) }

func setThreadScheduler(tid int, policy uintptr) {
	var param [1]int32
	syscall.RawSyscall(syscall.SYS_SCHED_SETSCHEDULER, uintptr(tid), policy, uintptr(unsafe.Pointer(&param[0])))
}

func spareFail(msg string) {
	os.Stderr.WriteString("upgrader: spare shim: " + msg + "\n")
	os.Exit(127)
}

// request is a spare's request, as EncodeRequest writes it.
type request struct {
	path      string
	argv, env []string
	slots     []int // slots[i]: the index in the message's fds of fd i, or -1
}

// EncodeRequest writes a request for a spare: SpareMagic, the path, the
// count and strings of argv, of env (a shim's: IdleEnv asks for
// SCHED_IDLE), and the count and values of slots (slots[i] is the index
// among the message's SCM_RIGHTS fds that becomes fd i, -1 to leave fd i
// closed), each followed by a NUL.
func EncodeRequest(path string, argv, env []string, slots []int) []byte {
	b := make([]byte, 0, 4096)
	put := func(s string) { b = append(append(b, s...), 0) }
	put(SpareMagic)
	put(path)
	for _, list := range [][]string{argv, env} {
		put(itoa(len(list)))
		for _, s := range list {
			put(s)
		}
	}
	put(itoa(len(slots)))
	for _, v := range slots {
		if v < 0 {
			put("-1")
		} else {
			put(itoa(v))
		}
	}
	return b
}

// parseRequest reads what EncodeRequest wrote, nfds the fds that came
// with it; ok is false for anything else.
func parseRequest(b []byte, nfds int) (r request, ok bool) {
	next := func() (string, bool) {
		for i, c := range b {
			if c == 0 {
				s := string(b[:i])
				b = b[i+1:]
				return s, true
			}
		}
		return "", false
	}
	count := func() (int, bool) {
		s, ok := next()
		n, ok2 := atoi(s)
		return n, ok && ok2 && n <= len(b)
	}
	list := func() ([]string, bool) {
		n, ok := count()
		if !ok {
			return nil, false
		}
		l := make([]string, n)
		for i := range l {
			if l[i], ok = next(); !ok {
				return nil, false
			}
		}
		return l, true
	}
	magic, ok1 := next()
	path, ok2 := next()
	if !ok1 || !ok2 || magic != SpareMagic || path == "" {
		return r, false
	}
	r.path = path
	if r.argv, ok = list(); !ok || len(r.argv) == 0 {
		return r, false
	}
	if r.env, ok = list(); !ok {
		return r, false
	}
	n, ok := count()
	if !ok {
		return r, false
	}
	r.slots = make([]int, n)
	for i := range r.slots {
		s, ok := next()
		if s == "-1" {
			r.slots[i] = -1
			continue
		}
		v, ok2 := atoi(s)
		if !ok || !ok2 || v >= nfds {
			return r, false
		}
		r.slots[i] = v
	}
	return r, len(b) == 0
}

// placeFDs makes fds[slots[i]] fd i, or closes fd i for -1, and leaves no
// other fd open across the exec: every received fd is close-on-exec
// (MSG_CMSG_CLOEXEC), and each is first moved above the slots, so that
// none is overwritten before it is placed. It returns what failed, or "".
func placeFDs(fds, slots []int) string {
	high := make([]int, len(fds))
	for i, fd := range fds {
		if fd >= len(slots) {
			high[i] = fd
			continue
		}
		nfd, _, e := syscall.RawSyscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_DUPFD_CLOEXEC, uintptr(len(slots)))
		if e != 0 {
			return "move fd: " + e.Error()
		}
		high[i] = int(nfd)
	}
	for i, k := range slots {
		if k < 0 {
			syscall.Close(i)
			continue
		}
		if err := syscall.Dup3(high[k], i, 0); err != nil {
			return "fd " + itoa(i) + ": " + err.Error()
		}
	}
	return ""
}

// atoi reads a decimal count, without strconv's package.
func atoi(s string) (int, bool) {
	if s == "" || len(s) > 9 {
		return 0, false
	}
	n := 0
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}
