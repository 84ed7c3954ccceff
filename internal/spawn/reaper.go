package spawn

import (
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// reaperArg is argv[1] of a reaper; argv[2] is the path to run and argv[3:]
// its argv.
const reaperArg = "__upgrader-tree-reaper"

// reaperGiveUp bounds the reaper's kill of its tree: a process stuck in
// uninterruptible sleep must not keep it for ever.
const reaperGiveUp = 10 * time.Second

// runReaper runs path as its child and ends the child's whole tree with it.
// A parent-death signal reaches one process only, and a process group or
// session is something a child can leave (setsid); but as the child
// subreaper (PR_SET_CHILD_SUBREAPER) the reaper stays an ancestor of
// everything the child starts, however it forks, so that the process
// table names the whole tree. When the supervisor dies (SIGTERM, the
// reaper's parent-death signal, caught) or the child exits, it SIGKILLs
// every process below it until none is left, then exits as the child did.
// The child shares the reaper's stdin, stdout and stderr, so its output
// needs no relay.
func runReaper(path string, argv []string) {
	// Caught before anything starts: a SIGTERM from here on is a request
	// to clean up, and one that came earlier ended the reaper before it
	// had started anything.
	term := make(chan os.Signal, 1)
	signal.Notify(term, unix.SIGTERM)
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		reaperFail(path, fmt.Errorf("PR_SET_CHILD_SUBREAPER: %w", err))
	}
	// Never unlocked: the child's parent-death signal fires when the
	// forking thread ends.
	runtime.LockOSThread()
	child, err := syscall.ForkExec(path, argv, &syscall.ProcAttr{
		Env:   os.Environ(),
		Files: []uintptr{0, 1, 2},
		// Should the reaper itself be SIGKILLed, the child goes too; what
		// it started is then left to the supervisor (our own subreaper).
		Sys: &syscall.SysProcAttr{Pdeathsig: unix.SIGKILL},
	})
	if err != nil {
		reaperFail(path, err)
	}
	exited := make(chan unix.WaitStatus, 1)
	go reapAll(child, exited)
	var ws unix.WaitStatus
	select {
	case ws = <-exited:
	case <-term:
		ws = unix.WaitStatus(unix.SIGKILL) // what the child got: killed
	}
	killBelow(os.Getpid())
	exitAs(ws)
}

// reaperFail reports a failure to start path on stdout, which is what the
// supervisor reads and quotes, and exits 127, as a shell does for a
// missing command.
func reaperFail(path string, err error) {
	fmt.Printf("upgrader: start %s: %v\n", path, err)
	os.Exit(127)
}

// reapAll reaps every child of the reaper, its own and the orphans it
// adopts, and sends child's wait status on exited.
func reapAll(child int, exited chan<- unix.WaitStatus) {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		switch {
		case err == unix.EINTR:
		case err != nil:
			return // no child left: none can come, nothing is below us
		case pid == child:
			exited <- ws
		}
	}
}

// killBelow SIGKILLs every live process below self, by the process table,
// until there is none: each one killed may leave orphans, which come to
// self, the subreaper, and are found at the next read.
func killBelow(self int) {
	for giveUp := time.Now().Add(reaperGiveUp); ; time.Sleep(5 * time.Millisecond) { // polling the ends
		tab, err := proctree.Read("/proc")
		if err != nil {
			fmt.Fprintf(os.Stderr, "upgrader: reaper: %v\n", err)
			return
		}
		below := tab.Descendants(self)
		if len(below) == 0 {
			return
		}
		if time.Now().After(giveUp) {
			fmt.Fprintf(os.Stderr, "upgrader: reaper: %d processes below pid %d still run after %s: %v\n", len(below), self, reaperGiveUp, below)
			return
		}
		for _, pid := range below {
			unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// exitAs ends the reaper the way its child ended, so that the supervisor
// sees the child's exit: its status, or its signal, raised again.
// It exits by exit_group(2) directly, not os.Exit, whose exit hooks the
// reaper has no use for and which, in a -race build, sleep a second before
// the supervisor sees the status.
func exitAs(ws unix.WaitStatus) {
	if !ws.Signaled() {
		unix.Exit(ws.ExitStatus())
	}
	sig := ws.Signal()
	signal.Reset(sig)
	unix.Kill(os.Getpid(), sig)
	// A signal the runtime keeps for itself, or one whose default is not
	// to end the process, falls back on a shell's convention.
	time.Sleep(time.Second)
	unix.Exit(128 + int(sig))
}
