package spawn

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// A worker of a new generation may start under SCHED_IDLE (Spec.Idle):
// the CPU its start-up takes (a runtime's start, loading code, warming
// caches) then goes only to cores the serving generation leaves idle, and
// its start does not show in the latency of the requests being served. At
// its READY=1 the supervisor gives it the usual policy back (Unidle).

// CanStartIdle tells whether the workers this process starts may start
// under SCHED_IDLE: nil when the calling thread is under SCHED_OTHER and
// CanUnidle, otherwise why not. Unidle, and a spare shim that waits, give
// SCHED_OTHER back, which is the policy a worker would otherwise inherit
// only when this process has it: under SCHED_BATCH, SCHED_FIFO, SCHED_RR
// or SCHED_DEADLINE (sched(7); systemd.exec(5) CPUSchedulingPolicy=) an
// idle start would leave the upgraded workers under another policy than
// the first generation's, so they start as it did.
func CanStartIdle() error {
	attr, err := unix.SchedGetAttr(0, 0)
	if err != nil {
		return fmt.Errorf("sched_getattr: %w", err)
	}
	if attr.Policy != unix.SCHED_NORMAL {
		return fmt.Errorf("this process runs under %s, not SCHED_OTHER, and its workers inherit it", policyName(attr.Policy))
	}
	if !CanUnidle() {
		return errors.New("returning a worker from SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE 20")
	}
	return nil
}

// policyName is the name in <linux/sched.h> of a policy other than
// SCHED_OTHER.
func policyName(p uint32) string {
	switch p {
	case unix.SCHED_FIFO:
		return "SCHED_FIFO"
	case unix.SCHED_RR:
		return "SCHED_RR"
	case unix.SCHED_BATCH:
		return "SCHED_BATCH"
	case unix.SCHED_IDLE:
		return "SCHED_IDLE"
	case unix.SCHED_DEADLINE:
		return "SCHED_DEADLINE"
	}
	return fmt.Sprintf("policy %d", p)
}

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
//
// A thread that an idle thread starts while a pass runs, after the pass
// listed the threads, is idle too, and would stay so for good (with one
// pass, 5 of 150 upgrades of examples/hello left its new worker such a
// thread, whose goroutines then ran only on idle CPU). So passes repeat
// until one moves nothing, which proves that no idle thread is left to
// start another, for at most unidlePasses; each pass moves the newest
// threads first, since a thread that has just started is the likeliest to
// start the next. A process that starts threads faster than that keeps
// some idle: the error says so.
func Unidle(root string, pid int) error {
	var first error
	for range unidlePasses {
		moved, err := unidlePass(root, pid)
		if err != nil && first == nil {
			first = err
		}
		if moved == 0 {
			return first
		}
	}
	if first == nil {
		first = fmt.Errorf("pid %d: threads still under SCHED_IDLE after %d passes: it starts them as fast as they are moved", pid, unidlePasses)
	}
	return first
}

// unidlePasses bounds Unidle's passes over a process tree: a worker's
// start is done by its READY=1, and its threads are moved in one or two.
const unidlePasses = 16

// unidlePass is one pass of Unidle over pid's tree; moved counts the
// threads it moved.
func unidlePass(root string, pid int) (moved int, first error) {
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
		tids := make([]int, 0, len(tasks))
		for _, t := range tasks {
			if tid, err := strconv.Atoi(t.Name()); err == nil {
				tids = append(tids, tid)
			}
		}
		// Newest first (thread ids grow until they wrap at pid_max).
		slices.Sort(tids)
		slices.Reverse(tids)
		for _, tid := range tids {
			ok, err := unidleThread(tid)
			if err != nil && first == nil {
				first = fmt.Errorf("thread %d of pid %d: %w", tid, p, err)
			}
			if ok {
				moved++
			}
		}
		kids, _ := proctree.ChildrenOf(root, p)
		todo = append(todo, kids...)
	}
	return moved, first
}

// unidleThread moves tid from SCHED_IDLE to SCHED_OTHER; moved is false
// for a thread under another policy or gone.
func unidleThread(tid int) (moved bool, err error) {
	attr, err := unix.SchedGetAttr(tid, 0)
	if errors.Is(err, unix.ESRCH) {
		return false, nil // ended meanwhile
	}
	if err != nil {
		return false, err
	}
	if attr.Policy != unix.SCHED_IDLE {
		return false, nil
	}
	attr.Policy = unix.SCHED_NORMAL
	if err := unix.SchedSetAttr(tid, attr, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return false, nil
		}
		return false, err
	}
	return true, nil
}
