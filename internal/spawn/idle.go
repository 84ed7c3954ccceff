package spawn

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// A worker of a new generation may start under SCHED_IDLE (Spec.Idle):
// the CPU its start-up takes (a runtime's start, loading code, warming
// caches) then goes only to cores the serving generation leaves idle, and
// its start does not show in the latency of the requests being served. At
// its READY=1 the supervisor gives it the usual policy back (Unidle).

// CanUnidle tells whether this process may move a thread of its own user
// out of SCHED_IDLE: sched(7) allows that only with CAP_SYS_NICE or an
// RLIMIT_NICE that permits nice 0 (20 or more), since SCHED_IDLE counts as
// nice 20. Without it a worker started idle would stay idle for good.
func CanUnidle() bool {
	var lim unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NICE, &lim) == nil && lim.Cur >= 20 {
		return true
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[unix.CAP_SYS_NICE/32].Effective&(1<<(unix.CAP_SYS_NICE%32)) != 0
}

// Unidle moves every thread of pid, and of every process below it (its
// children inherit the policy), that is under SCHED_IDLE back to
// SCHED_OTHER, its nice value kept; threads under another policy are left
// as they are, a worker may have chosen it. It reads root/PID/task (proc(5))
// and follows children through proctree.ChildrenOf. The error names the
// first thread that could not be moved; the others are still tried.
func Unidle(root string, pid int) error {
	var first error
	seen := map[int]bool{}
	todo := []int{pid}
	for len(todo) > 0 {
		p := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		if seen[p] {
			continue
		}
		seen[p] = true
		tasks, err := os.ReadDir(fmt.Sprintf("%s/%d/task", root, p))
		if err != nil {
			continue // gone
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			if err := unidleThread(tid); err != nil && first == nil {
				first = fmt.Errorf("thread %d of pid %d: %w", tid, p, err)
			}
		}
		kids, _ := proctree.ChildrenOf(root, p)
		todo = append(todo, kids...)
	}
	return first
}

func unidleThread(tid int) error {
	attr, err := unix.SchedGetAttr(tid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil // ended meanwhile
	}
	if err != nil {
		return err
	}
	if attr.Policy != unix.SCHED_IDLE {
		return nil
	}
	attr.Policy = unix.SCHED_NORMAL
	if err := unix.SchedSetAttr(tid, attr, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return err
	}
	return nil
}
