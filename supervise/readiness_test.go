package supervise

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
)

// upgradeResults records the upgrades that end, by the hook.
func upgradeResults(h *harness) chan UpgradeResult {
	ch := make(chan UpgradeResult, 8)
	h.s.SetHooks(Hooks{Upgrade: func(r UpgradeResult) { ch <- r }})
	return ch
}

func (h *harness) upgradeResult(results chan UpgradeResult) UpgradeResult {
	h.t.Helper()
	select {
	case r := <-results:
		return r
	case <-time.After(5 * time.Second):
		h.t.Fatal("no upgrade ended")
		return UpgradeResult{}
	}
}

// The old generation drains only once the new one has stayed ready for
// the hold, not at its READY=1.
func TestReadyHoldDelaysTheDrain(t *testing.T) {
	const hold = 200 * time.Millisecond
	h := run(t, Config{ReadyHold: hold})
	results := upgradeResults(h)
	g1 := h.started()
	h.ready(g1)
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := h.started()
	readyAt := time.Now()
	h.ready(g2)
	h.noKill(hold / 2)
	if st := h.status(); st.Current != 1 {
		t.Fatalf("generation %d current within the hold, want 1", st.Current)
	}
	h.killed(g1, unix.SIGTERM)
	if held := time.Since(readyAt); held < hold {
		t.Fatalf("generation 1 asked to drain %s after generation 2 was ready, within the %s hold", held, hold)
	}
	if r := h.upgradeResult(results); !r.OK || r.Generation != 2 {
		t.Fatalf("upgrade %+v, want generation 2 ok", r)
	}
}

// A worker of the new generation that exits within the hold fails the
// upgrade; the old generation, never asked to drain, serves on; the new
// one's other workers are retired.
func TestCrashWithinReadyHoldRollsBack(t *testing.T) {
	h := run(t, Config{Workers: 2, ReadyHold: time.Hour})
	results := upgradeResults(h)
	g1 := []int{h.started(), h.started()}
	h.ready(g1[0])
	h.ready(g1[1])
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := []int{h.started(), h.started()}
	h.ready(g2[0])
	h.ready(g2[1])
	h.exit(g2[0], 3)
	r := h.upgradeResult(results)
	if r.OK || !strings.Contains(r.Reason, "within the ready hold") {
		t.Fatalf("upgrade %+v, want it failed within the ready hold", r)
	}
	h.killed(g2[1], unix.SIGTERM) // the failed generation's other worker
	h.noKill(20 * time.Millisecond)
	st := h.status()
	if st.Current != 1 || st.Generations[0].N != 1 || st.Generations[0].State != GenActive {
		t.Fatalf("after the rollback: %+v; want generation 1 active", st)
	}
	// A later upgrade works, and its hold is its own.
	h.s.post(evSignal{unix.SIGUSR2})
	g3 := h.started()
	h.ready(g3)
	h.exit(g3, 1)
	if r := h.upgradeResult(results); r.OK || r.Generation != 3 {
		t.Fatalf("upgrade %+v, want generation 3 failed", r)
	}
}

// STOPPING=1 unasked within the hold (a fatal error) fails the upgrade as
// an exit does.
func TestStoppingWithinReadyHoldRollsBack(t *testing.T) {
	h := run(t, Config{ReadyHold: time.Hour})
	results := upgradeResults(h)
	g1 := h.started()
	h.ready(g1)
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := h.started()
	h.ready(g2)
	h.s.post(evNotify{dg: sdnotify.Datagram{Pid: g2, Message: sdnotify.Message{{Key: "STOPPING", Value: "1"}}}})
	if r := h.upgradeResult(results); r.OK || !strings.Contains(r.Reason, "within the ready hold") {
		t.Fatalf("upgrade %+v, want it failed within the ready hold", r)
	}
	if st := h.status(); st.Current != 1 {
		t.Fatalf("generation %d current, want 1", st.Current)
	}
}

// listenerFake runs a supervisor with one real listener and returns it
// with the listener's socket inode, as fd tables name it.
func listenerFake(t *testing.T, cfg Config) (*harness, string) {
	l, err := Listen("tcp://127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	cfg.Listeners = []*Listener{l}
	var st unix.Stat_t
	if err := unix.Fstat(l.sock.FD, &st); err != nil {
		t.Fatal(err)
	}
	return run(t, cfg), strconv.FormatUint(st.Ino, 10)
}

// A new worker that says READY=1 but holds none of the listeners fails
// its upgrade at once, hold or none; one whose child holds them (a master
// and its workers) is ready.
func TestReadyWithoutListenersIsRefused(t *testing.T) {
	h, inode := listenerFake(t, Config{})
	results := upgradeResults(h)
	g1 := h.started()
	h.env.setFDs(g1, map[string]int{inode: 3})
	h.ready(g1)
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := h.started()
	h.env.setFDs(g2, map[string]int{"12345": 5}) // a socket, not the listener
	h.ready(g2)
	r := h.upgradeResult(results)
	if r.OK || !strings.Contains(r.Reason, "holds none of the listeners") {
		t.Fatalf("upgrade %+v, want it refused: no listener held", r)
	}
	h.killed(g2, unix.SIGTERM)
	h.exit(g2, 0)

	h.s.post(evSignal{unix.SIGUSR2})
	g3 := h.started()
	child := 9000
	h.env.setTable(proctree.Table{g3: {Pid: g3, PPid: 1, State: 'S'}, child: {Pid: child, PPid: g3, Pgid: g3, State: 'S'}})
	h.env.setFDs(g3, map[string]int{})
	h.env.setFDs(child, map[string]int{inode: 3})
	h.ready(g3)
	if r := h.upgradeResult(results); !r.OK || r.Generation != 3 {
		t.Fatalf("upgrade %+v, want generation 3 ready: its child holds the listener", r)
	}
	h.killed(g1, unix.SIGTERM)
}

// A replacement worker of the serving generation that holds none of the
// listeners is not ready: it is killed, and its exit counts as a crash.
func TestReplacementWithoutListenersIsKilled(t *testing.T) {
	h, inode := listenerFake(t, Config{})
	g1 := h.started()
	h.env.setFDs(g1, map[string]int{inode: 3})
	h.ready(g1)
	h.exit(g1, 1)
	w := h.started()
	h.env.setFDs(w, map[string]int{})
	h.ready(w)
	h.killed(w, unix.SIGKILL)
	if st := h.status(); st.Generations[0].Workers[0].State != WorkerStarting {
		t.Fatalf("replacement %+v, want it still starting, not ready", st.Generations[0].Workers[0])
	}
	h.exit(w, 1) // its exit counts as a crash: it is restarted
	h.started()
}

// An upgrade's workers start idle (Config.StartIdle), the first
// generation's do not; one not ready within idleMax gets the usual policy
// back then, and its READY=1 does not ask again.
func TestStartIdleEndsAtReadyOrIdleMax(t *testing.T) {
	h := run(t, Config{StartIdle: true})
	g1 := h.started()
	if spec := <-h.env.starts; spec.Idle {
		t.Fatal("generation 1 started idle")
	}
	h.ready(g1)
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := h.started()
	if spec := <-h.env.starts; !spec.Idle {
		t.Fatal("generation 2 not started idle")
	}
	unidled := func() []int {
		h.env.mu.Lock()
		defer h.env.mu.Unlock()
		return append([]int(nil), h.env.unidled...)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(unidled()) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("generation 2 (pid %d) still idle 5 s after its start", g2)
		}
		time.Sleep(10 * time.Millisecond) // polling the fake env's record
	}
	h.ready(g2)
	h.killed(g1, unix.SIGTERM)
	if got := unidled(); len(got) != 1 || got[0] != g2 {
		t.Fatalf("unidled %v, want [%d] once", got, g2)
	}
}
